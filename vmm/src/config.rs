//! Validated configurations, checked before any KVM work: [`VmConfig`] (what `minivmm run`
//! was asked for) and [`ReceiveConfig`] (what `minivmm receive` was asked for).

use std::fmt;
use std::path::PathBuf;

use std::time::Duration;

use migration::{receive, Endpoint};

/// Default guest memory size.
pub const DEFAULT_MEM_BYTES: u64 = 512 << 20;
/// Smallest guest memory we boot: room for the boot structures below 1 MiB and a kernel above.
pub const MIN_MEM_BYTES: u64 = 16 << 20;
/// Largest guest memory: a KVM memory slot holds less than 8 TiB and the dirty bitmaps grow with
/// the size, so stay well inside both.
pub const MAX_MEM_BYTES: u64 = 4 << 40;
/// Most vCPUs: APIC ids are 8 bits in the MP table and the xAPIC, 0xff is the broadcast id.
pub const MAX_CPUS: u8 = 254;
/// Command line given to the built-in test guest when `--cmdline` is absent.
pub const DEFAULT_TEST_GUEST_CMDLINE: &str = "touch=64M rate=1000";
/// Longest command line accepted (Linux's x86 COMMAND_LINE_SIZE).
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Errors in the command-line values of `minivmm run`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid memory size {0:?}: expected a number with an optional K, M, G or T suffix")]
    MemSyntax(String),
    #[error("--mem must be greater than zero")]
    MemZero,
    #[error("--mem {0} is below the minimum of 16M")]
    MemTooSmall(String),
    #[error("--mem {0} is above the maximum of 4T")]
    MemTooLarge(String),
    #[error("--mem {0} is not a multiple of 4K")]
    MemUnaligned(String),
    #[error("--cpus must be at least 1")]
    CpusZero,
    #[error("--cpus {0} is above the maximum of {MAX_CPUS}")]
    CpusTooMany(u32),
    #[error("--cmdline is {0} bytes long, the maximum is {MAX_CMDLINE_LEN}")]
    CmdlineTooLong(usize),
    #[error("--cmdline contains a NUL byte")]
    CmdlineNul,
    #[error("{0}")]
    Endpoint(#[from] migration::EndpointError),
    #[error("--from takes file:PATH (use --listen for sockets)")]
    FromNotFile,
    #[error("--listen takes unix:PATH or tcp:HOST:PORT (use --from for snapshots)")]
    ListenFile,
    #[error("give either --listen or --from")]
    NoSource,
    #[error("--attempts must be 1..={MAX_ATTEMPTS}, not {0}")]
    Attempts(u32),
    #[error("--tls-dir takes a tcp: endpoint, not {0}")]
    TlsNeedsTcp(String),
    #[error(
        "refusing to listen on {0} without TLS: anyone who reaches it could send a VM or read \
         one in flight. Give --tls-dir (see `minivmm tls-init`), listen on a loopback address, \
         or say --insecure-plaintext"
    )]
    PlaintextOnNetwork(String),
}

/// Most incoming attempts a `receive` accepts.
pub const MAX_ATTEMPTS: u32 = 100;

/// Where the guest kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The test guest embedded in the binary (`guest::TEST_GUEST_ELF`).
    BuiltinTestGuest,
    /// A bzImage or a PVH ELF file on the host.
    File(PathBuf),
}

impl fmt::Display for KernelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSource::BuiltinTestGuest => write!(f, "built-in test guest"),
            KernelSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A checked VM configuration. Build it with [`VmConfig::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in bytes (multiple of 4 KiB, within [MIN_MEM_BYTES, MAX_MEM_BYTES]).
    pub mem_bytes: u64,
    /// Number of vCPUs (1..=MAX_CPUS; the KVM limit is checked when the VM is created).
    pub cpus: u8,
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub api_socket: PathBuf,
}

/// Unvalidated values as they come from the command line.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    pub mem: Option<String>,
    pub cpus: Option<u32>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub api_socket: Option<PathBuf>,
}

impl VmConfig {
    /// Validate raw values; the files themselves are checked when they are loaded.
    pub fn new(raw: RawConfig) -> Result<VmConfig, ConfigError> {
        let mem_bytes = match raw.mem.as_deref() {
            None => DEFAULT_MEM_BYTES,
            Some(s) => validate_mem(s)?,
        };
        let cpus = match raw.cpus {
            None => 1,
            Some(0) => return Err(ConfigError::CpusZero),
            Some(n) if n > u32::from(MAX_CPUS) => return Err(ConfigError::CpusTooMany(n)),
            Some(n) => n as u8,
        };
        let kernel = raw
            .kernel
            .map_or(KernelSource::BuiltinTestGuest, KernelSource::File);
        let cmdline = match (raw.cmdline, &kernel) {
            (Some(c), _) => c,
            (None, KernelSource::BuiltinTestGuest) => DEFAULT_TEST_GUEST_CMDLINE.to_string(),
            (None, KernelSource::File(_)) => String::new(),
        };
        if cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        Ok(VmConfig {
            mem_bytes,
            cpus,
            kernel,
            initrd: raw.initrd,
            cmdline,
            api_socket: raw.api_socket.unwrap_or_else(default_api_socket),
        })
    }
}

/// A checked `minivmm receive` configuration. Build it with [`ReceiveConfig::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// Where the guest comes from: a socket to listen on, or a snapshot file.
    pub source: Endpoint,
    pub api_socket: PathBuf,
    /// Incoming attempts to accept (1..=[`MAX_ATTEMPTS`]).
    pub attempts: u32,
    /// Memory bytes and vCPUs of a VM to build before the source connects.
    pub shape: Option<(u64, u8)>,
    /// Longest wait for any one read or write on a connection.
    pub io_timeout: Duration,
    /// Longest from a connection to the `Ready` reply.
    pub handshake_timeout: Duration,
    /// Longest the restored guest waits for the source's `Go`.
    pub commit_timeout: Duration,
    /// Mutual TLS on `tcp:`: the directory to load, and the certificate names allowed.
    pub tls: Option<TlsSettings>,
    /// A non-loopback `tcp:` endpoint without TLS, as asked for (`--insecure-plaintext`):
    /// every connection is warned about.
    pub insecure_plaintext: bool,
}

/// `receive --tls-dir DIR [--tls-allow NAME]...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub dir: PathBuf,
    /// Empty: any certificate the CA signed.
    pub allow: Vec<String>,
}

/// Unvalidated `receive` values as they come from the command line.
#[derive(Debug, Clone, Default)]
pub struct RawReceiveConfig {
    pub listen: Option<String>,
    pub from: Option<String>,
    pub api_socket: Option<PathBuf>,
    pub attempts: u32,
    pub mem: Option<String>,
    pub cpus: Option<u32>,
    pub io_timeout_ms: Option<u64>,
    pub handshake_timeout_ms: Option<u64>,
    pub commit_timeout_ms: Option<u64>,
    pub tls_dir: Option<PathBuf>,
    pub tls_allow: Vec<String>,
    pub insecure_plaintext: bool,
}

impl ReceiveConfig {
    pub fn new(raw: RawReceiveConfig) -> Result<ReceiveConfig, ConfigError> {
        let source = match (raw.listen.as_deref(), raw.from.as_deref()) {
            (Some(uri), None) => match Endpoint::parse(uri)? {
                Endpoint::File(_) => return Err(ConfigError::ListenFile),
                e => e,
            },
            (None, Some(uri)) => match Endpoint::parse(uri)? {
                e @ Endpoint::File(_) => e,
                _ => return Err(ConfigError::FromNotFile),
            },
            _ => return Err(ConfigError::NoSource),
        };
        if !(1..=MAX_ATTEMPTS).contains(&raw.attempts) {
            return Err(ConfigError::Attempts(raw.attempts));
        }
        let tls = match (raw.tls_dir, &source) {
            (None, _) => None,
            (Some(dir), Endpoint::Tcp { .. }) => Some(TlsSettings {
                dir,
                allow: raw.tls_allow,
            }),
            (Some(_), other) => return Err(ConfigError::TlsNeedsTcp(other.to_string())),
        };
        let on_network = matches!(&source, Endpoint::Tcp { host, .. } if !is_loopback(host));
        if on_network && tls.is_none() && !raw.insecure_plaintext {
            return Err(ConfigError::PlaintextOnNetwork(source.to_string()));
        }
        let shape = match (raw.mem, raw.cpus) {
            (Some(mem), Some(cpus)) => {
                let c = VmConfig::new(RawConfig {
                    mem: Some(mem),
                    cpus: Some(cpus),
                    ..Default::default()
                })?;
                Some((c.mem_bytes, c.cpus))
            }
            _ => None,
        };
        let ms = |v: Option<u64>, default| v.map_or(default, Duration::from_millis);
        Ok(ReceiveConfig {
            source,
            api_socket: raw.api_socket.unwrap_or_else(default_api_socket),
            attempts: raw.attempts,
            shape,
            io_timeout: ms(raw.io_timeout_ms, receive::DEFAULT_IO_TIMEOUT),
            handshake_timeout: ms(raw.handshake_timeout_ms, receive::DEFAULT_HANDSHAKE_TIMEOUT),
            commit_timeout: ms(raw.commit_timeout_ms, receive::DEFAULT_GO_TIMEOUT),
            insecure_plaintext: on_network && tls.is_none(),
            tls,
        })
    }
}

/// A host that only this machine can reach: a loopback address, or `localhost`. Any other
/// name counts as reachable from the network (it is not resolved here).
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn validate_mem(s: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(s)?;
    if bytes == 0 {
        return Err(ConfigError::MemZero);
    }
    if bytes < MIN_MEM_BYTES {
        return Err(ConfigError::MemTooSmall(s.to_string()));
    }
    if bytes > MAX_MEM_BYTES {
        return Err(ConfigError::MemTooLarge(s.to_string()));
    }
    if bytes % 4096 != 0 {
        return Err(ConfigError::MemUnaligned(s.to_string()));
    }
    Ok(bytes)
}

/// Parse a size such as `512M`, `1G`, `16G`, `4096K`, `1T` or a plain byte count.
/// Suffixes are binary (K = 1024) and case-insensitive; an optional trailing `B`/`iB` is allowed.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::MemSyntax(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .unwrap_or(t);
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(err());
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" => 10,
        "M" | "MB" => 20,
        "G" | "GB" => 30,
        "T" | "TB" => 40,
        _ => return Err(err()),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// `$XDG_RUNTIME_DIR/minivmm.sock`, else `/tmp/minivmm.sock`.
pub fn default_api_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("minivmm.sock"),
        _ => PathBuf::from("/tmp/minivmm.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(mem: Option<&str>, cpus: Option<u32>) -> RawConfig {
        RawConfig {
            mem: mem.map(str::to_string),
            cpus,
            api_socket: Some(PathBuf::from("/tmp/x.sock")),
            ..Default::default()
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert_eq!(parse_size("4096K"), Ok(4 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("8192"), Ok(8192));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_text() {
        for bad in [
            "",
            "lots",
            "M",
            "1X",
            "-1G",
            "1.5G",
            "99999999999999999999T",
            "1G2",
        ] {
            match parse_size(bad) {
                Err(ConfigError::MemSyntax(s)) => assert_eq!(s, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        assert!(ConfigError::MemSyntax("lots".into())
            .to_string()
            .contains("lots"));
    }

    #[test]
    fn mem_bounds_are_checked() {
        assert_eq!(
            VmConfig::new(raw(Some("0"), None)),
            Err(ConfigError::MemZero)
        );
        assert!(matches!(
            VmConfig::new(raw(Some("1M"), None)),
            Err(ConfigError::MemTooSmall(_))
        ));
        assert!(matches!(
            VmConfig::new(raw(Some("1024T"), None)),
            Err(ConfigError::MemTooLarge(_))
        ));
        assert!(matches!(
            VmConfig::new(raw(Some("16777217"), None)),
            Err(ConfigError::MemUnaligned(_))
        ));
        let c = VmConfig::new(raw(Some("16G"), None)).expect("16G is valid");
        assert_eq!(c.mem_bytes, 16 << 30);
    }

    #[test]
    fn cpus_bounds_are_checked() {
        assert_eq!(
            VmConfig::new(raw(None, Some(0))),
            Err(ConfigError::CpusZero)
        );
        assert_eq!(
            VmConfig::new(raw(None, Some(100_000))),
            Err(ConfigError::CpusTooMany(100_000))
        );
        assert_eq!(VmConfig::new(raw(None, Some(8))).map(|c| c.cpus), Ok(8));
        assert!(ConfigError::CpusZero.to_string().contains("cpus"));
    }

    #[test]
    fn defaults_boot_the_test_guest_with_its_cmdline() {
        let c = VmConfig::new(raw(None, None)).expect("defaults are valid");
        assert_eq!(c.kernel, KernelSource::BuiltinTestGuest);
        assert_eq!(c.cmdline, DEFAULT_TEST_GUEST_CMDLINE);
        assert_eq!(c.mem_bytes, DEFAULT_MEM_BYTES);
        assert_eq!(c.cpus, 1);

        let mut r = raw(None, None);
        r.cmdline = Some("touch=8M".into());
        assert_eq!(VmConfig::new(r).map(|c| c.cmdline), Ok("touch=8M".into()));

        let mut r = raw(None, None);
        r.kernel = Some(PathBuf::from("/k"));
        assert_eq!(VmConfig::new(r).map(|c| c.cmdline), Ok(String::new()));
    }

    fn receive(listen: &str) -> RawReceiveConfig {
        RawReceiveConfig {
            listen: Some(listen.into()),
            attempts: 1,
            api_socket: Some(PathBuf::from("/tmp/x.sock")),
            ..Default::default()
        }
    }

    #[test]
    fn a_network_listener_needs_tls_or_an_explicit_insecure_flag() {
        for host in ["0.0.0.0", "10.1.2.3", "[::]", "dst.example"] {
            let uri = format!("tcp:{host}:4444");
            let e = ReceiveConfig::new(receive(&uri)).unwrap_err();
            assert!(
                matches!(e, ConfigError::PlaintextOnNetwork(_)),
                "{uri}: {e}"
            );
            assert!(e.to_string().contains("--tls-dir"), "{e}");
            let mut r = receive(&uri);
            r.insecure_plaintext = true;
            let c = ReceiveConfig::new(r).expect("insecure, as asked");
            assert!(c.insecure_plaintext && c.tls.is_none());
            let mut r = receive(&uri);
            r.tls_dir = Some("/t".into());
            r.tls_allow = vec!["src".into()];
            let c = ReceiveConfig::new(r).expect("TLS");
            assert_eq!(
                c.tls,
                Some(TlsSettings {
                    dir: "/t".into(),
                    allow: vec!["src".into()]
                })
            );
            assert!(!c.insecure_plaintext);
        }
        for uri in [
            "tcp:127.0.0.1:4444",
            "tcp:127.3.2.1:1",
            "tcp:[::1]:4444",
            "tcp:localhost:1",
            "unix:/tmp/m.sock",
        ] {
            let c = ReceiveConfig::new(receive(uri)).expect("local");
            assert!(!c.insecure_plaintext && c.tls.is_none(), "{uri}");
        }
        let mut r = receive("unix:/tmp/m.sock");
        r.tls_dir = Some("/t".into());
        let e = ReceiveConfig::new(r).unwrap_err();
        assert_eq!(e, ConfigError::TlsNeedsTcp("unix:/tmp/m.sock".into()));
    }

    #[test]
    fn long_or_nul_cmdline_is_refused() {
        let mut r = raw(None, None);
        r.cmdline = Some("x".repeat(MAX_CMDLINE_LEN));
        assert!(matches!(
            VmConfig::new(r),
            Err(ConfigError::CmdlineTooLong(_))
        ));
        let mut r = raw(None, None);
        r.cmdline = Some("a\0b".into());
        assert_eq!(VmConfig::new(r), Err(ConfigError::CmdlineNul));
    }
}
