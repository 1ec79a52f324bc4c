//! The two-host rig from a test: `scripts/rig.sh` brings up two network namespaces joined by a
//! shaped veth pair; a [`Rig`] takes it down again when dropped, whether the test passed or
//! not. minivmm runs in either namespace (`ip netns exec`); the control sockets are unix
//! paths on the shared filesystem, so the test talks to both sides as usual.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::migrate::{Vm, T};
use crate::{minivmm_bin, wait_for_socket, Proc, TempDir};

/// A link the rig emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// 10 Gbit/s, 0.2 ms RTT.
    TenGbE,
    /// 1 Gbit/s, 2 ms RTT, 0.1 % loss.
    OneGbE,
    /// The bare veth pair.
    Unshaped,
}

impl Link {
    /// The name `rig.sh shape` takes.
    pub fn arg(self) -> &'static str {
        match self {
            Link::TenGbE => "10g",
            Link::OneGbE => "1g",
            Link::Unshaped => "none",
        }
    }

    /// How benchmarks and reports name it.
    pub fn label(self) -> &'static str {
        match self {
            Link::TenGbE => "10GbE",
            Link::OneGbE => "1GbE",
            Link::Unshaped => "veth",
        }
    }
}

/// Which namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Src,
    Dst,
}

impl Host {
    fn arg(self) -> &'static str {
        match self {
            Host::Src => "src",
            Host::Dst => "dst",
        }
    }
}

/// The test guest a VM boots.
#[derive(Clone, Copy, Debug)]
pub struct Guest<'a> {
    pub mem: &'a str,
    pub cpus: u32,
    pub cmdline: &'a str,
}

/// Extra flags of each side for the migration's transport: the source's `migrate` and the
/// destination's `receive`.
#[derive(Clone, Debug, Default)]
pub struct TransportFlags {
    pub source: Vec<String>,
    pub destination: Vec<String>,
}

impl TransportFlags {
    /// Plaintext TCP: the destination listens on a non-loopback address, which it must be
    /// told is meant.
    pub fn plaintext() -> TransportFlags {
        TransportFlags {
            source: Vec::new(),
            destination: vec!["--insecure-plaintext".into()],
        }
    }

    /// Mutual TLS: `minivmm tls-init` makes a CA and the source's certificate (named by its
    /// address), then the destination's with the same CA; the destination allows only the
    /// source's name.
    pub fn tls(rig: &Rig, dir: &TempDir) -> TransportFlags {
        let (src, dst) = (dir.join("src-tls"), dir.join("dst-tls"));
        let src_name = rig.addr(Host::Src);
        tls_init(&src, &src_name, None);
        tls_init(&dst, &rig.addr(Host::Dst), Some(&src));
        let path = |p: &Path| p.to_string_lossy().into_owned();
        TransportFlags {
            source: vec!["--tls-dir".into(), path(&src)],
            destination: vec![
                "--tls-dir".into(),
                path(&dst),
                "--tls-allow".into(),
                src_name,
            ],
        }
    }
}

/// `minivmm tls-init DIR --name NAME [--ca CA]`, which must succeed.
fn tls_init(dir: &Path, name: &str, ca: Option<&Path>) {
    let dir_s = dir.to_string_lossy().into_owned();
    let mut args = vec!["tls-init", &dir_s, "--name", name];
    let ca_s = ca.map(|c| c.to_string_lossy().into_owned());
    if let Some(c) = &ca_s {
        args.extend(["--ca", c]);
    }
    let mut p = Proc::minivmm("tls-init", &args);
    let st = p.wait_exit(T).expect("tls-init finished");
    assert!(st.success(), "tls-init failed: {}", p.stderr());
}

/// Whether the rig can run here: root (namespaces, tc). Otherwise a skip, or a failure
/// under `MINIVMM_REQUIRE_KVM=1` (CI runs as root).
pub fn rig_available(test: &str) -> bool {
    // SAFETY: geteuid(2) reads the process's credentials and has no failure mode.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("MINIVMM_REQUIRE_KVM").as_deref() != Ok("1"),
        "{test}: the two-host rig needs root (CI runs as root)"
    );
    eprintln!("SKIP: {test}: the two-host rig needs root");
    false
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rig.sh")
}

/// Two namespaces and the link between them; removed on drop.
pub struct Rig {
    name: String,
    index: u32,
}

impl Rig {
    /// Brings a new rig up (its name is unique to this process and call).
    pub fn up() -> Rig {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("mv{:x}{n}", std::process::id() & 0xfffff);
        // Each rig has namespaces of its own, so every one may use the same subnet.
        let rig = Rig { name, index: 1 };
        rig.run(&["up", &rig.name.clone(), &rig.index.to_string()]);
        rig
    }

    fn run(&self, args: &[&str]) {
        let netdelay = minivmm_bin().with_file_name("netdelay");
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .env("NETDELAY", netdelay)
            .output()
            .expect("run scripts/rig.sh");
        assert!(
            out.status.success(),
            "rig.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
    }

    /// Shapes the link.
    pub fn shape(&self, link: Link) {
        self.run(&["shape", &self.name, link.arg()]);
    }

    /// Cuts the link (both ends down: packets vanish, nothing is reset).
    pub fn cut(&self) {
        self.run(&["cut", &self.name]);
    }

    /// Brings the link back.
    pub fn heal(&self) {
        self.run(&["heal", &self.name]);
    }

    /// The address of `host` on the link.
    pub fn addr(&self, host: Host) -> String {
        let last = match host {
            Host::Src => 1,
            Host::Dst => 2,
        };
        format!("10.213.{}.{last}", self.index)
    }

    /// The namespace of `host`.
    pub fn netns(&self, host: Host) -> String {
        format!("{}-{}", self.name, host.arg())
    }

    /// `minivmm ARGS` in `host`'s namespace, with extra environment variables.
    pub fn minivmm(&self, host: Host, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let bin = minivmm_bin();
        let mut full: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            self.netns(host),
            bin.to_string_lossy().into_owned(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        Proc::spawn_env(name, Path::new("/usr/sbin/ip"), &full, env)
    }

    /// `minivmm run` with the test guest in `host`'s namespace.
    pub fn run_vm(
        &self,
        dir: &TempDir,
        host: Host,
        name: &str,
        guest: Guest<'_>,
        env: &[(&str, &str)],
    ) -> Vm {
        let api = dir.join(&format!("{name}.api"));
        let (mem, cmdline) = (guest.mem, guest.cmdline);
        let cpus = guest.cpus.to_string();
        let mut proc = self.minivmm(
            host,
            name,
            &[
                "run",
                "--mem",
                mem,
                "--cpus",
                &cpus,
                "--cmdline",
                cmdline,
                "--api-socket",
                api.to_str().expect("utf-8 path"),
            ],
            env,
        );
        wait_for_socket(&mut proc, &api, T);
        Vm { proc, api }
    }

    /// `minivmm receive --listen tcp:ADDR:0` in `host`'s namespace (plus `extra`); returns
    /// the destination and the endpoint it listens on.
    pub fn receive(
        &self,
        dir: &TempDir,
        host: Host,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Vm, String) {
        let api = dir.join(&format!("{name}.api"));
        let listen = format!("tcp:{}:0", self.addr(host));
        let mut args = vec![
            "receive",
            "--listen",
            &listen,
            "--api-socket",
            api.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let mut proc = self.minivmm(host, name, &args, env);
        wait_for_socket(&mut proc, &api, T);
        let mut vm = Vm { proc, api };
        let to = crate::migrate::listening(&mut vm);
        (vm, to)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", &self.name])
            .output();
    }
}
