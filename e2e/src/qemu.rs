//! QEMU command lines for the same test guest image that minivmm boots (`-kernel` with its PVH
//! note), shared by the QEMU end-to-end test and the benchmark's QEMU scenarios.

use std::path::Path;

/// QEMU arguments for `image` with `mem` (e.g. `"256M"`), `cpus` vCPUs and the kernel command
/// line `cmdline`: KVM, host CPU, serial console on stdio, no display, monitor or reboot.
/// `qmp` adds a QMP server socket (`-qmp unix:…,server=on,wait=off`), `incoming` makes the
/// process a migration destination listening there (`-incoming unix:…`).
pub fn args(
    mem: &str,
    cpus: u32,
    image: &Path,
    cmdline: &str,
    qmp: Option<&Path>,
    incoming: Option<&Path>,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        mem,
        "-smp",
        &cpus.to_string(),
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        p(image),
        "-append",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(q) = qmp {
        a.push("-qmp".into());
        a.push(format!("unix:{},server=on,wait=off", p(q)));
    }
    if let Some(i) = incoming {
        a.push("-incoming".into());
        a.push(format!("unix:{}", p(i)));
    }
    a
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_boot_has_no_qmp_or_incoming() {
        let a = args("256M", 2, Path::new("/i.elf"), "touch=16M", None, None);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        assert_eq!(
            a,
            [
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-m",
                "256M",
                "-smp",
                "2",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-no-reboot",
                "-kernel",
                "/i.elf",
                "-append",
                "touch=16M",
            ]
        );
    }

    #[test]
    fn qmp_then_incoming_come_last() {
        let a = args(
            "1G",
            1,
            Path::new("/i.elf"),
            "x=1",
            Some(Path::new("/q")),
            Some(Path::new("/m")),
        );
        assert_eq!(
            a[a.len() - 4..],
            ["-qmp", "unix:/q,server=on,wait=off", "-incoming", "unix:/m"]
        );
    }
}
