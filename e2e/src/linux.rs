//! Linux guests: `minivmm run --kernel …` and the `MINIVMM_LINUX_GUEST` switch.
//!
//! Under nested KVM (guest kernel mode emulated) the Debian cloud kernel gets through its early
//! boot only; tests that need a Linux guest to run to userspace are enabled on hardware KVM
//! with `MINIVMM_LINUX_GUEST=1`.

use std::path::Path;

use crate::Proc;

/// The kernel command line of the early-boot tests: log on the serial console from the start.
pub const EARLY_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0";

/// Whether `MINIVMM_LINUX_GUEST=1` (hardware KVM: Linux boots to userspace).
pub fn guest_enabled() -> bool {
    std::env::var("MINIVMM_LINUX_GUEST").as_deref() == Ok("1")
}

/// [`guest_enabled`], else prints `SKIP: <test>: …` so the calling test can return.
pub fn require_guest(test: &str) -> bool {
    if guest_enabled() {
        return true;
    }
    eprintln!("SKIP: {test}: needs hardware KVM (set MINIVMM_LINUX_GUEST=1)");
    false
}

/// What `minivmm run` boots: a kernel, optionally an initrd, a command line, memory and vCPUs.
#[derive(Clone, Copy, Debug)]
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem: &'a str,
    /// `None` leaves minivmm's default.
    pub cpus: Option<&'a str>,
}

impl<'a> Boot<'a> {
    /// `kernel` with `cmdline` in `mem`, no initrd, default vCPUs.
    pub fn new(kernel: &'a Path, cmdline: &'a str, mem: &'a str) -> Boot<'a> {
        Boot {
            kernel,
            initrd: None,
            cmdline,
            mem,
            cpus: None,
        }
    }

    /// The early-boot setup: [`EARLY_CMDLINE`] in 512M.
    pub fn early(kernel: &'a Path) -> Boot<'a> {
        Boot::new(kernel, EARLY_CMDLINE, "512M")
    }

    pub fn initrd(self, initrd: &'a Path) -> Boot<'a> {
        Boot {
            initrd: Some(initrd),
            ..self
        }
    }

    pub fn cpus(self, cpus: &'a str) -> Boot<'a> {
        Boot {
            cpus: Some(cpus),
            ..self
        }
    }

    /// `minivmm run` arguments, with the control socket at `api`.
    pub fn args(&self, api: &'a Path) -> Vec<&'a str> {
        let mut a = vec!["run", "--kernel", self.kernel.to_str().unwrap()];
        if let Some(initrd) = self.initrd {
            a.extend(["--initrd", initrd.to_str().unwrap()]);
        }
        a.extend(["--cmdline", self.cmdline, "--mem", self.mem]);
        if let Some(cpus) = self.cpus {
            a.extend(["--cpus", cpus]);
        }
        a.extend(["--api-socket", api.to_str().unwrap()]);
        a
    }
}

/// Start `minivmm run` for `boot` with its control socket at `api` (not waited for).
pub fn run_kernel(name: &str, boot: &Boot, api: &Path) -> Proc {
    Proc::minivmm(name, &boot.args(api))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_boot_args() {
        let b = Boot::early(Path::new("/k"));
        assert_eq!(
            b.args(Path::new("/a")),
            [
                "run",
                "--kernel",
                "/k",
                "--cmdline",
                "console=ttyS0 earlyprintk=ttyS0",
                "--mem",
                "512M",
                "--api-socket",
                "/a",
            ]
        );
    }

    #[test]
    fn initrd_and_cpus_args() {
        let b = Boot::new(Path::new("/k"), "console=ttyS0", "1G")
            .initrd(Path::new("/i"))
            .cpus("2");
        assert_eq!(
            b.args(Path::new("/a")),
            [
                "run",
                "--kernel",
                "/k",
                "--initrd",
                "/i",
                "--cmdline",
                "console=ttyS0",
                "--mem",
                "1G",
                "--cpus",
                "2",
                "--api-socket",
                "/a",
            ]
        );
    }
}
