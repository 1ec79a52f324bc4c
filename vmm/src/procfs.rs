//! Small readers of `/proc`: the resident set size reported in `/proc/<pid>/status`.

/// The `VmRSS` value (KiB) of a `/proc/<pid>/status` text; `None` when the line is missing or
/// unparsable.
pub fn rss_kib_of(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident set size in KiB of process `pid`, or of this process for `None`; 0 when the status
/// file cannot be read (e.g. the process is gone) or has no `VmRSS` line.
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    rss_kib_of(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmrss_line() {
        let status = "Name:\tminivmm\nVmPeak:\t  20000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(rss_kib_of(status), Some(1234));
    }

    #[test]
    fn missing_or_bad_vmrss_is_none() {
        assert_eq!(rss_kib_of("Name:\tkthreadd\nThreads:\t1\n"), None);
        assert_eq!(rss_kib_of("VmRSS:\tlots kB\n"), None);
        assert_eq!(rss_kib_of(""), None);
    }

    #[test]
    fn own_rss_is_nonzero() {
        assert!(rss_kib(None) > 0);
        assert!(rss_kib(Some(std::process::id())) > 0);
    }
}
