//! Small readers of `/proc`: the resident set size, from `/proc/<pid>/statm` (a few counters,
//! cheaper to produce than `status`: the destination reports its RSS inside the downtime),
//! and the host's memory, from `/proc/meminfo`.

/// Resident size in KiB from a `/proc/<pid>/statm` text (second field, in pages); `None`
/// when it is missing or unparsable.
pub fn rss_kib_of_statm(statm: &str) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()? / 1024)
}

/// Resident set size in KiB of process `pid`, or of this process for `None`; 0 when the file
/// cannot be read (e.g. the process is gone).
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/statm"),
        None => "/proc/self/statm".to_string(),
    };
    rss_kib_of_statm(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or(0)
}

/// `MemTotal` in bytes from a `/proc/meminfo` text.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next()? == "kB").then_some(kib)?.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_total() {
        let text = "MemTotal:       24594184 kB\nMemFree:          512 kB\n";
        assert_eq!(mem_total_bytes(text), Some(24594184 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 5 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: 5 MB\n"), None);
    }

    #[test]
    fn parses_resident_pages() {
        assert_eq!(
            rss_kib_of_statm("5000 1234 300 10 0 900 0\n"),
            Some(1234 * 4)
        );
    }

    #[test]
    fn missing_or_bad_fields_are_none() {
        assert_eq!(rss_kib_of_statm("5000"), None);
        assert_eq!(rss_kib_of_statm("5000 lots 3"), None);
        assert_eq!(rss_kib_of_statm(""), None);
    }

    #[test]
    fn agrees_with_status() {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let vmrss: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        let ours = rss_kib(None);
        assert!(ours > 0);
        // The two reads are a moment apart: allow a little growth either way.
        assert!(
            ours.abs_diff(vmrss) < 1024,
            "statm {ours} KiB, status {vmrss} KiB"
        );
        assert!(rss_kib(Some(std::process::id())) > 0);
    }
}
