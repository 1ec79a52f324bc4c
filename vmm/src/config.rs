//! Validated configurations, checked before any KVM work: [`VmConfig`] (what `minivmm run`
//! was asked for) and [`ReceiveConfig`] (what `minivmm receive` was asked for).

use std::fmt;
use std::path::PathBuf;

use std::time::Duration;

use migration::{receive, Endpoint};

use crate::kvm::dirty_ring::{DEFAULT_RING_ENTRIES, MIN_RING_ENTRIES};

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

/// Errors in the values of a VM's shape, from the command line (`--mem`) or from a migration
/// stream (`mem_bytes`): `field` names the value, and the same limits apply to both.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid memory size {0:?}: expected a number with an optional K, M, G or T suffix")]
    MemSyntax(String),
    #[error("{field} must be greater than zero")]
    MemZero { field: &'static str },
    #[error("{field} {value} is below the minimum of 16M")]
    MemTooSmall { field: &'static str, value: String },
    #[error("{field} {value} is above the maximum of 4T")]
    MemTooLarge { field: &'static str, value: String },
    #[error("{field} {value} is not a multiple of 4K")]
    MemUnaligned { field: &'static str, value: String },
    #[error("{field} must be at least 1")]
    CpusZero { field: &'static str },
    #[error("{field} {value} is above the maximum of {MAX_CPUS}")]
    CpusTooMany { field: &'static str, value: u64 },
    #[error("{field} is {len} bytes long, the maximum is {MAX_CMDLINE_LEN}")]
    CmdlineTooLong { field: &'static str, len: usize },
    #[error("{field} contains a NUL byte")]
    CmdlineNul { field: &'static str },
    #[error("--mem {mem} is above --max-mem {max}")]
    ShapeAboveMaxMem { mem: String, max: String },
    #[error("--cpus {cpus} is above --max-cpus {max}")]
    ShapeAboveMaxCpus { cpus: u8, max: u8 },
    #[error("cannot read this host's memory size from /proc/meminfo: give --max-mem")]
    HostMemory,
    #[error("--listen {0:?}")]
    Listen(String, #[source] migration::EndpointError),
    #[error("--from {0:?}")]
    From(String, #[source] migration::EndpointError),
    #[error("--from takes file:PATH (use --listen for sockets)")]
    FromNotFile,
    #[error("--listen takes unix:PATH or tcp:HOST:PORT (use --from for snapshots)")]
    ListenFile,
    #[error("give either --listen or --from")]
    NoSource,
    #[error("--attempts must be 1..={MAX_ATTEMPTS}, not {0}")]
    Attempts(u32),
    #[error("{0} must be at least 1 (milliseconds)")]
    ZeroWait(&'static str),
    #[error("--tls-dir takes a tcp: endpoint, not {0}")]
    TlsNeedsTcp(String),
    #[error(
        "refusing to listen on {0} without TLS: anyone who reaches it could send a VM or read \
         one in flight. Give --tls-dir (see `minivmm tls-init`), listen on a loopback address, \
         or say --insecure-plaintext"
    )]
    PlaintextOnNetwork(String),
    #[error("--mem-hugepages needs --mem {0} to be a multiple of 2M (the huge page size)")]
    MemNotHugeAligned(String),
    #[error(
        "--dirty-tracker {0:?}: expected bitmap, bitmap-protect, ring or ring:ENTRIES (a power \
         of two, 256..=65536)"
    )]
    DirtyTracker(String),
}

/// How a VM tracks the pages its guest writes, for migration (`--dirty-tracker`). Chosen when
/// the VM is created: the ring must exist before the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracker {
    /// KVM's dirty bitmaps, initially set where KVM offers it: switching logging on
    /// write-protects nothing, the migration re-protects pages as it reads them. Where KVM
    /// lacks `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, as `BitmapProtect`.
    #[default]
    Bitmap,
    /// KVM's dirty bitmaps, every page write-protected when logging starts (what KVM does
    /// without the manual-protect capability; kept to compare).
    BitmapProtect,
    /// KVM's per-vCPU dirty rings of `entries` entries each.
    Ring { entries: u32 },
}

impl DirtyTracker {
    /// Parses the command-line value.
    pub fn parse(s: &str) -> Result<DirtyTracker, ConfigError> {
        match s {
            "bitmap" => Ok(DirtyTracker::Bitmap),
            "bitmap-protect" => Ok(DirtyTracker::BitmapProtect),
            "ring" => Ok(DirtyTracker::Ring {
                entries: DEFAULT_RING_ENTRIES,
            }),
            _ => s
                .strip_prefix("ring:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| {
                    n.is_power_of_two() && (MIN_RING_ENTRIES..=DEFAULT_RING_ENTRIES).contains(n)
                })
                .map(|entries| DirtyTracker::Ring { entries })
                .ok_or_else(|| ConfigError::DirtyTracker(s.to_string())),
        }
    }
}

/// Most incoming attempts a `receive` accepts.
pub const MAX_ATTEMPTS: u32 = 100;

/// How the command line names the shape's values in errors.
pub const CLI_FIELDS: ShapeFields = ShapeFields {
    mem: "--mem",
    cpus: "--cpus",
    cmdline: "--cmdline",
};

/// The names of a VM's shape values in errors: command-line flags, or the fields of a
/// migration stream's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeFields {
    pub mem: &'static str,
    pub cpus: &'static str,
    pub cmdline: &'static str,
}

/// Guest memory within [MIN_MEM_BYTES, MAX_MEM_BYTES] and page-aligned; `shown` is the
/// value as the user wrote it (or the byte count).
pub fn check_mem(field: &'static str, bytes: u64, shown: &str) -> Result<u64, ConfigError> {
    let value = || shown.to_string();
    if bytes == 0 {
        return Err(ConfigError::MemZero { field });
    }
    if bytes < MIN_MEM_BYTES {
        return Err(ConfigError::MemTooSmall {
            field,
            value: value(),
        });
    }
    if bytes > MAX_MEM_BYTES {
        return Err(ConfigError::MemTooLarge {
            field,
            value: value(),
        });
    }
    if !bytes.is_multiple_of(4096) {
        return Err(ConfigError::MemUnaligned {
            field,
            value: value(),
        });
    }
    Ok(bytes)
}

/// vCPUs within 1..=[`MAX_CPUS`] (APIC id 0xff is the broadcast id).
pub fn check_cpus(field: &'static str, n: u64) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        _ if n == 0 => Err(ConfigError::CpusZero { field }),
        Ok(n) if n <= MAX_CPUS => Ok(n),
        _ => Err(ConfigError::CpusTooMany { field, value: n }),
    }
}

/// A command line shorter than [`MAX_CMDLINE_LEN`] (room for its NUL) without NUL bytes.
pub fn check_cmdline(field: &'static str, cmdline: &str) -> Result<(), ConfigError> {
    if cmdline.len() >= MAX_CMDLINE_LEN {
        return Err(ConfigError::CmdlineTooLong {
            field,
            len: cmdline.len(),
        });
    }
    if cmdline.contains('\0') {
        return Err(ConfigError::CmdlineNul { field });
    }
    Ok(())
}

/// A size in the units `--mem` takes, as short as exact (`24G`, `1536M`, `4097K`... bytes).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

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

/// What backs guest RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBacking {
    /// Private anonymous memory of this process (the default): only a copy can leave it.
    #[default]
    Private,
    /// A shared memfd per region (`--mem-shared`): another process may map it, so a local
    /// migration hands it over instead of copying it.
    Shared,
    /// Like `Shared`, on hugetlbfs huge pages (`--mem-hugepages`; needs pages reserved in
    /// `/proc/sys/vm/nr_hugepages`).
    HugePages,
}

impl MemoryBacking {
    /// Another process can map this memory (a local migration can hand it over).
    pub fn is_shared(self) -> bool {
        self != MemoryBacking::Private
    }
}

/// Huge page size `--mem-hugepages` needs the memory size to be a multiple of.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

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
    /// What backs guest RAM.
    pub memory: MemoryBacking,
    pub dirty_tracker: DirtyTracker,
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
    pub mem_shared: bool,
    pub mem_hugepages: bool,
    pub dirty_tracker: Option<String>,
}

impl VmConfig {
    /// Validate raw values; the files themselves are checked when they are loaded.
    pub fn new(raw: RawConfig) -> Result<VmConfig, ConfigError> {
        let mem_bytes = match raw.mem.as_deref() {
            None => DEFAULT_MEM_BYTES,
            Some(s) => validate_mem(CLI_FIELDS.mem, s)?,
        };
        let cpus = match raw.cpus {
            None => 1,
            Some(n) => check_cpus(CLI_FIELDS.cpus, u64::from(n))?,
        };
        let kernel = raw
            .kernel
            .map_or(KernelSource::BuiltinTestGuest, KernelSource::File);
        let cmdline = match (raw.cmdline, &kernel) {
            (Some(c), _) => c,
            (None, KernelSource::BuiltinTestGuest) => DEFAULT_TEST_GUEST_CMDLINE.to_string(),
            (None, KernelSource::File(_)) => String::new(),
        };
        check_cmdline(CLI_FIELDS.cmdline, &cmdline)?;
        let memory = match (raw.mem_shared, raw.mem_hugepages) {
            (_, true) => MemoryBacking::HugePages,
            (true, false) => MemoryBacking::Shared,
            (false, false) => MemoryBacking::Private,
        };
        if memory == MemoryBacking::HugePages && !mem_bytes.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(ConfigError::MemNotHugeAligned(
                raw.mem.unwrap_or_else(|| mem_bytes.to_string()),
            ));
        }
        Ok(VmConfig {
            mem_bytes,
            cpus,
            kernel,
            initrd: raw.initrd,
            cmdline,
            api_socket: raw.api_socket.unwrap_or_else(default_api_socket),
            memory,
            dirty_tracker: raw
                .dirty_tracker
                .as_deref()
                .map_or(Ok(DirtyTracker::default()), DirtyTracker::parse)?,
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
    /// What a stream's guest may be: at most `--max-mem` and `--max-cpus`, or exactly
    /// `--mem` and `--cpus` (the VM built before the source connects).
    pub limits: GuestLimits,
    /// Longest wait for any one read or write on a connection.
    pub io_timeout: Duration,
    /// Longest from a connection to the `Ready` reply.
    pub handshake_timeout: Duration,
    /// Longest the restored guest waits for the source's `Go`.
    pub commit_timeout: Duration,
    /// Longest from a connection to the end of its stream (`--deadline-ms`; none by default).
    pub deadline: Option<Duration>,
    /// Mutual TLS on `tcp:`: the directory to load, and the certificate names allowed.
    pub tls: Option<TlsSettings>,
    /// A non-loopback `tcp:` endpoint without TLS, as asked for (`--insecure-plaintext`):
    /// every connection is warned about.
    pub insecure_plaintext: bool,
    /// How the received VM tracks its guest's writes when it migrates on.
    pub dirty_tracker: DirtyTracker,
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
    pub max_mem: Option<String>,
    pub max_cpus: Option<u32>,
    pub io_timeout_ms: Option<u64>,
    pub handshake_timeout_ms: Option<u64>,
    pub commit_timeout_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub tls_dir: Option<PathBuf>,
    pub tls_allow: Vec<String>,
    pub insecure_plaintext: bool,
    pub dirty_tracker: Option<String>,
}

impl ReceiveConfig {
    pub fn new(raw: RawReceiveConfig) -> Result<ReceiveConfig, ConfigError> {
        let source = match (raw.listen.as_deref(), raw.from.as_deref()) {
            (Some(uri), None) => {
                match Endpoint::parse(uri).map_err(|e| ConfigError::Listen(uri.to_string(), e))? {
                    Endpoint::File(_) => return Err(ConfigError::ListenFile),
                    e => e,
                }
            }
            (None, Some(uri)) => {
                match Endpoint::parse(uri).map_err(|e| ConfigError::From(uri.to_string(), e))? {
                    e @ Endpoint::File(_) => e,
                    _ => return Err(ConfigError::FromNotFile),
                }
            }
            _ => return Err(ConfigError::NoSource),
        };
        if !(1..=MAX_ATTEMPTS).contains(&raw.attempts) {
            return Err(ConfigError::Attempts(raw.attempts));
        }
        for (flag, ms) in [
            ("--io-timeout-ms", raw.io_timeout_ms),
            ("--handshake-timeout-ms", raw.handshake_timeout_ms),
            ("--commit-timeout-ms", raw.commit_timeout_ms),
            ("--deadline-ms", raw.deadline_ms),
        ] {
            if ms == Some(0) {
                return Err(ConfigError::ZeroWait(flag));
            }
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
        let max_mem_bytes = match raw.max_mem.as_deref() {
            Some(s) => validate_mem("--max-mem", s)?,
            None => {
                host_mem_bytes()
                    .ok_or(ConfigError::HostMemory)?
                    .clamp(MIN_MEM_BYTES, MAX_MEM_BYTES)
                    & !4095
            }
        };
        let max_cpus = match raw.max_cpus {
            Some(n) => check_cpus("--max-cpus", u64::from(n))?,
            None => host_cpus(),
        };
        let shape = match (raw.mem, raw.cpus) {
            (Some(mem), Some(cpus)) => {
                let c = VmConfig::new(RawConfig {
                    mem: Some(mem.clone()),
                    cpus: Some(cpus),
                    ..Default::default()
                })?;
                if c.mem_bytes > max_mem_bytes {
                    return Err(ConfigError::ShapeAboveMaxMem {
                        mem,
                        max: format_size(max_mem_bytes),
                    });
                }
                if c.cpus > max_cpus {
                    return Err(ConfigError::ShapeAboveMaxCpus {
                        cpus: c.cpus,
                        max: max_cpus,
                    });
                }
                Some((c.mem_bytes, c.cpus))
            }
            _ => None,
        };
        let ms = |v: Option<u64>, default| v.map_or(default, Duration::from_millis);
        Ok(ReceiveConfig {
            source,
            api_socket: raw.api_socket.unwrap_or_else(default_api_socket),
            attempts: raw.attempts,
            limits: GuestLimits {
                max_mem_bytes,
                max_cpus,
                shape,
            },
            io_timeout: ms(raw.io_timeout_ms, receive::DEFAULT_IO_TIMEOUT),
            handshake_timeout: ms(raw.handshake_timeout_ms, receive::DEFAULT_HANDSHAKE_TIMEOUT),
            commit_timeout: ms(raw.commit_timeout_ms, receive::DEFAULT_GO_TIMEOUT),
            deadline: raw.deadline_ms.map(Duration::from_millis),
            insecure_plaintext: on_network && tls.is_none(),
            tls,
            dirty_tracker: raw
                .dirty_tracker
                .as_deref()
                .map_or(Ok(DirtyTracker::default()), DirtyTracker::parse)?,
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

/// What a destination takes from a stream, checked before it allocates or maps anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLimits {
    /// `--max-mem` (default: this host's memory).
    pub max_mem_bytes: u64,
    /// `--max-cpus` (default: this host's online CPUs).
    pub max_cpus: u8,
    /// `--mem` and `--cpus`: memory bytes and vCPUs of the VM built before the source
    /// connects; a stream of another shape is refused.
    pub shape: Option<(u64, u8)>,
}

/// This host's memory (`MemTotal`).
fn host_mem_bytes() -> Option<u64> {
    crate::procfs::mem_total_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// This host's online CPUs, at most [`MAX_CPUS`].
fn host_cpus() -> u8 {
    // SAFETY: sysconf(3) with a constant name; no memory is involved.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u8::try_from(n.clamp(1, i64::from(MAX_CPUS))).unwrap_or(1)
}

fn validate_mem(field: &'static str, s: &str) -> Result<u64, ConfigError> {
    check_mem(field, parse_size(s)?, s)
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
            Err(ConfigError::MemZero { field: "--mem" })
        );
        assert!(matches!(
            VmConfig::new(raw(Some("1M"), None)),
            Err(ConfigError::MemTooSmall { .. })
        ));
        assert!(matches!(
            VmConfig::new(raw(Some("1024T"), None)),
            Err(ConfigError::MemTooLarge { .. })
        ));
        assert_eq!(
            VmConfig::new(raw(Some("16777217"), None))
                .unwrap_err()
                .to_string(),
            "--mem 16777217 is not a multiple of 4K"
        );
        let c = VmConfig::new(raw(Some("16G"), None)).expect("16G is valid");
        assert_eq!(c.mem_bytes, 16 << 30);
    }

    #[test]
    fn cpus_bounds_are_checked() {
        assert_eq!(
            VmConfig::new(raw(None, Some(0))),
            Err(ConfigError::CpusZero { field: "--cpus" })
        );
        assert_eq!(
            VmConfig::new(raw(None, Some(100_000))),
            Err(ConfigError::CpusTooMany {
                field: "--cpus",
                value: 100_000
            })
        );
        // 255 would be the broadcast APIC id.
        assert_eq!(
            check_cpus("cpus", 255).unwrap_err().to_string(),
            "cpus 255 is above the maximum of 254"
        );
        assert_eq!(VmConfig::new(raw(None, Some(8))).map(|c| c.cpus), Ok(8));
        assert_eq!(check_cpus("cpus", 254), Ok(254));
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
    fn memory_backing_follows_the_flags() {
        let backing = |shared, huge, mem: &str| {
            let mut r = raw(Some(mem), None);
            r.mem_shared = shared;
            r.mem_hugepages = huge;
            VmConfig::new(r).map(|c| c.memory)
        };
        assert_eq!(backing(false, false, "64M"), Ok(MemoryBacking::Private));
        assert_eq!(backing(true, false, "64M"), Ok(MemoryBacking::Shared));
        assert_eq!(backing(false, true, "64M"), Ok(MemoryBacking::HugePages));
        assert_eq!(
            backing(false, true, "65M"),
            Err(ConfigError::MemNotHugeAligned("65M".into()))
        );
        assert!(!MemoryBacking::Private.is_shared() && MemoryBacking::HugePages.is_shared());
    }

    #[test]
    fn dirty_trackers_parse_and_bad_ones_are_named() {
        assert_eq!(
            VmConfig::new(raw(None, None)).map(|c| c.dirty_tracker),
            Ok(DirtyTracker::Bitmap)
        );
        for (text, tracker) in [
            ("bitmap", DirtyTracker::Bitmap),
            ("bitmap-protect", DirtyTracker::BitmapProtect),
            ("ring", DirtyTracker::Ring { entries: 65536 }),
            ("ring:256", DirtyTracker::Ring { entries: 256 }),
        ] {
            let mut r = raw(None, None);
            r.dirty_tracker = Some(text.into());
            assert_eq!(VmConfig::new(r).map(|c| c.dirty_tracker), Ok(tracker));
        }
        for bad in [
            "rings",
            "ring:",
            "ring:300",
            "ring:128",
            "ring:131072",
            "ring:-1",
        ] {
            let mut r = raw(None, None);
            r.dirty_tracker = Some(bad.into());
            let err = VmConfig::new(r).unwrap_err();
            assert_eq!(err, ConfigError::DirtyTracker(bad.into()));
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn long_or_nul_cmdline_is_refused() {
        let mut r = raw(None, None);
        r.cmdline = Some("x".repeat(MAX_CMDLINE_LEN));
        assert!(matches!(
            VmConfig::new(r),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        let mut r = raw(None, None);
        r.cmdline = Some("a\0b".into());
        assert_eq!(
            VmConfig::new(r),
            Err(ConfigError::CmdlineNul { field: "--cmdline" })
        );
    }

    fn receive_raw(
        extra: impl FnOnce(&mut RawReceiveConfig),
    ) -> Result<ReceiveConfig, ConfigError> {
        let mut r = RawReceiveConfig {
            listen: Some("unix:/tmp/x.mig".into()),
            attempts: 1,
            ..Default::default()
        };
        extra(&mut r);
        ReceiveConfig::new(r)
    }

    #[test]
    fn receive_waits_are_at_least_a_millisecond() {
        let c = receive_raw(|_| {}).expect("defaults");
        assert_eq!(c.deadline, None, "no overall deadline unless asked for");
        let c = receive_raw(|r| r.deadline_ms = Some(2500)).expect("a deadline");
        assert_eq!(c.deadline, Some(Duration::from_millis(2500)));
        for flag in [
            "--io-timeout-ms",
            "--handshake-timeout-ms",
            "--commit-timeout-ms",
            "--deadline-ms",
        ] {
            let err = receive_raw(|r| match flag {
                "--io-timeout-ms" => r.io_timeout_ms = Some(0),
                "--handshake-timeout-ms" => r.handshake_timeout_ms = Some(0),
                "--commit-timeout-ms" => r.commit_timeout_ms = Some(0),
                _ => r.deadline_ms = Some(0),
            })
            .unwrap_err();
            assert_eq!(err, ConfigError::ZeroWait(flag));
            assert_eq!(
                err.to_string(),
                format!("{flag} must be at least 1 (milliseconds)")
            );
        }
    }

    #[test]
    fn receive_limits_default_to_the_host_and_bound_the_shape() {
        let c = receive_raw(|_| {}).expect("defaults");
        let host = host_mem_bytes().expect("meminfo");
        assert!(c.limits.max_mem_bytes <= host && c.limits.max_mem_bytes > host - 4096);
        assert_eq!(c.limits.max_cpus, host_cpus());
        assert_eq!(c.limits.shape, None);
        let c = receive_raw(|r| {
            r.max_mem = Some("2G".into());
            r.max_cpus = Some(4);
            r.mem = Some("1G".into());
            r.cpus = Some(2);
        })
        .expect("a shape within the limits");
        assert_eq!(
            c.limits,
            GuestLimits {
                max_mem_bytes: 2 << 30,
                max_cpus: 4,
                shape: Some((1 << 30, 2))
            }
        );
        let err = receive_raw(|r| {
            r.max_mem = Some("1G".into());
            r.mem = Some("2G".into());
            r.cpus = Some(1);
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "--mem 2G is above --max-mem 1G");
        let err = receive_raw(|r| r.max_cpus = Some(255)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--max-cpus 255 is above the maximum of 254"
        );
        let err = receive_raw(|r| r.max_mem = Some("1M".into())).unwrap_err();
        assert_eq!(err.to_string(), "--max-mem 1M is below the minimum of 16M");
    }

    #[test]
    fn sizes_format_as_short_as_exact() {
        assert_eq!(format_size(24 << 30), "24G");
        assert_eq!(format_size(1536 << 20), "1536M");
        assert_eq!(format_size(4 << 40), "4T");
        assert_eq!(format_size(4097 << 10), "4097K");
        assert_eq!(format_size(1000), "1000");
    }
}
