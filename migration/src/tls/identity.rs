//! Who a peer is: the certificate subjects a destination allows ([`AllowList`]), the
//! identity read from a certificate ([`PeerIdentity`], with just enough DER in `x509`).

use std::fmt;

/// Longest certificate subject shown.
const MAX_SUBJECT_LEN: usize = 512;

/// The certificate subjects a destination accepts (`--tls-allow`): a name matches a
/// certificate whose subject common name (CN) is that name, or that lists it as a DNS subject
/// alternative name. Exact matches, ASCII case-insensitive; no wildcards. Empty: any
/// certificate the CA signed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(Vec<String>);

/// Which part of a certificate matched an [`AllowList`] entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowMatch {
    /// The subject's common name.
    CommonName(String),
    /// A DNS subject alternative name.
    DnsName(String),
}

impl fmt::Display for AllowMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowMatch::CommonName(n) => write!(f, "--tls-allow {n} by subject CN"),
            AllowMatch::DnsName(n) => write!(f, "--tls-allow {n} by DNS name"),
        }
    }
}

impl AllowList {
    pub fn new(names: Vec<String>) -> AllowList {
        AllowList(names)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entry `identity` matches, and by what; `None` if it matches none.
    pub fn check(&self, identity: &PeerIdentity) -> Option<AllowMatch> {
        let named = |n: &str| self.0.iter().find(|a| a.eq_ignore_ascii_case(n));
        if let Some(a) = identity.common_name.as_deref().and_then(named) {
            return Some(AllowMatch::CommonName(a.clone()));
        }
        identity
            .dns_names
            .iter()
            .find_map(|n| named(n))
            .map(|a| AllowMatch::DnsName(a.clone()))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "any certificate the CA signed");
        }
        write!(f, "{}", self.0.join(", "))
    }
}

/// Who the peer's certificate says it is: its subject (the attributes known by name, as
/// `CN=…, O=…`), and its DNS subject alternative names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub subject: String,
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subject.is_empty() {
            write!(f, "an empty subject")?;
        } else {
            write!(f, "{}", self.subject)?;
        }
        if !self.dns_names.is_empty() {
            write!(f, " (DNS {})", self.dns_names.join(", "))?;
        }
        Ok(())
    }
}

impl PeerIdentity {
    /// Reads the subject and the DNS names of a DER certificate; what cannot be read stays
    /// empty (the certificate was verified before: this is for the allow-list and the logs).
    pub fn from_der(cert: &[u8]) -> PeerIdentity {
        x509::identity(cert).unwrap_or_default()
    }
}

/// Just enough DER to read a certificate's subject and DNS names.
mod x509 {
    use super::{printable, PeerIdentity, MAX_SUBJECT_LEN};

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const INTEGER: u8 = 0x02;
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    /// `[0] EXPLICIT Version`.
    const VERSION: u8 = 0xa0;
    /// `[3] EXPLICIT Extensions`.
    const EXTENSIONS: u8 = 0xa3;
    /// `GeneralName` `dNSName [2] IA5String`.
    const DNS_NAME: u8 = 0x82;
    /// id-ce-subjectAltName, 2.5.29.17.
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

    /// DER elements one after another.
    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        /// The next element's tag and contents (`None` at the end or on malformed input).
        fn next(&mut self) -> Option<(u8, &'a [u8])> {
            let (&tag, rest) = self.0.split_first()?;
            let (&first, rest) = rest.split_first()?;
            let (len, rest) = if first < 0x80 {
                (usize::from(first), rest)
            } else {
                let n = usize::from(first & 0x7f);
                if n == 0 || n > 4 || rest.len() < n {
                    return None;
                }
                let len = rest[..n]
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                (len, &rest[n..])
            };
            if rest.len() < len {
                return None;
            }
            let (contents, rest) = rest.split_at(len);
            self.0 = rest;
            Some((tag, contents))
        }

        /// The next element's contents if it has `tag`.
        fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
            match self.next()? {
                (t, contents) if t == tag => Some(contents),
                _ => None,
            }
        }
    }

    pub(super) fn identity(cert: &[u8]) -> Option<PeerIdentity> {
        let cert = Reader(cert).expect(SEQUENCE)?;
        let mut tbs = Reader(Reader(cert).expect(SEQUENCE)?);
        let (mut tag, _) = tbs.next()?;
        if tag == VERSION {
            tag = tbs.next()?.0;
        }
        if tag != INTEGER {
            return None;
        }
        tbs.expect(SEQUENCE)?; // signature algorithm
        tbs.expect(SEQUENCE)?; // issuer
        tbs.expect(SEQUENCE)?; // validity
        let subject = tbs.expect(SEQUENCE)?;
        tbs.expect(SEQUENCE)?; // public key
        let (subject, common_name) = name(subject);
        let mut dns_names = Vec::new();
        while let Some((tag, contents)) = tbs.next() {
            if tag == EXTENSIONS {
                dns_names = alt_dns_names(contents);
            }
        }
        Some(PeerIdentity {
            subject,
            common_name,
            dns_names,
        })
    }

    /// A `Name` as `CN=…, O=…` (attributes in their order), and its first common name.
    fn name(der: &[u8]) -> (String, Option<String>) {
        let mut parts = Vec::new();
        let mut common_name = None;
        let mut rdns = Reader(der);
        while let Some((SET, set)) = rdns.next() {
            let mut attributes = Reader(set);
            while let Some((SEQUENCE, attribute)) = attributes.next() {
                let mut a = Reader(attribute);
                let (Some(oid), Some((tag, value))) = (a.expect(OID), a.next()) else {
                    continue;
                };
                let value = string(tag, value);
                let label = match oid {
                    [0x55, 0x04, 0x03] => "CN".to_string(),
                    [0x55, 0x04, 0x06] => "C".to_string(),
                    [0x55, 0x04, 0x07] => "L".to_string(),
                    [0x55, 0x04, 0x08] => "ST".to_string(),
                    [0x55, 0x04, 0x0a] => "O".to_string(),
                    [0x55, 0x04, 0x0b] => "OU".to_string(),
                    other => dotted(other),
                };
                if label == "CN" && common_name.is_none() {
                    common_name = Some(value.clone());
                }
                parts.push(format!("{label}={value}"));
            }
        }
        let mut subject = parts.join(", ");
        if subject.len() > MAX_SUBJECT_LEN {
            let mut end = MAX_SUBJECT_LEN;
            while !subject.is_char_boundary(end) {
                end -= 1;
            }
            subject.truncate(end);
            subject.push('…');
        }
        (subject, common_name)
    }

    /// The DNS names of the subjectAltName extension, in `[3] EXPLICIT Extensions`.
    fn alt_dns_names(extensions: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let Some(list) = Reader(extensions).expect(SEQUENCE) else {
            return names;
        };
        let mut list = Reader(list);
        while let Some((SEQUENCE, extension)) = list.next() {
            let mut e = Reader(extension);
            let Some(oid) = e.expect(OID) else { continue };
            let Some(mut value) = e.next() else { continue };
            if value.0 == BOOLEAN {
                let Some(v) = e.next() else { continue };
                value = v;
            }
            if oid != SUBJECT_ALT_NAME || value.0 != OCTET_STRING {
                continue;
            }
            let Some(general_names) = Reader(value.1).expect(SEQUENCE) else {
                continue;
            };
            let mut general_names = Reader(general_names);
            while let Some((tag, name)) = general_names.next() {
                if tag == DNS_NAME {
                    names.push(printable(&String::from_utf8_lossy(name)));
                }
            }
        }
        names
    }

    /// A directory string's text (UTF8String, PrintableString, IA5String, TeletexString as
    /// Latin-1, BMPString), control characters escaped; others in hex.
    fn string(tag: u8, value: &[u8]) -> String {
        let text = match tag {
            0x0c | 0x13 | 0x16 => String::from_utf8_lossy(value).into_owned(),
            0x14 => value.iter().map(|&b| char::from(b)).collect(),
            0x1e => {
                let units: Vec<u16> = value
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            }
            _ => return value.iter().map(|b| format!("{b:02x}")).collect(),
        };
        printable(&text)
    }

    /// An OID's dotted form.
    fn dotted(oid: &[u8]) -> String {
        let mut arcs: Vec<u64> = Vec::new();
        let mut value: u64 = 0;
        for &b in oid {
            value = (value << 7) | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                if arcs.is_empty() {
                    let first = (value / 40).min(2);
                    arcs.push(first);
                    arcs.push(value - first * 40);
                } else {
                    arcs.push(value);
                }
                value = 0;
            }
        }
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn dotted_oids() {
            assert_eq!(dotted(&[0x55, 0x04, 0x03]), "2.5.4.3");
            assert_eq!(
                dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]),
                "1.2.840.113549.1.9.1"
            );
        }

        #[test]
        fn malformed_der_reads_as_nothing() {
            for bad in [
                &[][..],
                &[0x30],
                &[0x30, 0x85, 1, 2, 3, 4, 5],
                &[0x30, 0x82, 0xff, 0xff, 0],
                &[0x30, 0x03, 0x30, 0x01],
            ] {
                assert_eq!(identity(bad), None, "{bad:x?}");
            }
        }

        #[test]
        fn control_characters_are_escaped() {
            assert_eq!(string(0x0c, b"a\nb"), "a\\nb");
            assert_eq!(string(0x14, &[0x41, 0xe9]), "Aé");
            assert_eq!(string(0x1e, &[0, 0x41, 0, 0x42]), "AB");
        }
    }
}

/// `text` with control characters escaped (it goes into logs and replies).
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}
