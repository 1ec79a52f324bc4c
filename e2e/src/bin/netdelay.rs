//! `netdelay`: a delay line (and random loss) for the two-host rig on kernels without
//! `sch_netem`. Run inside a network namespace whose egress is queued to it
//! (`iptables -A OUTPUT -o DEV -j NFQUEUE --queue-num N`), it holds every packet for the
//! given delay and then lets it go (in order, one batch verdict for all that are due), or
//! drops it with the given probability. Packets stay in the kernel: only their ids come up
//! (`NFQNL_COPY_META`), and GSO packets are not split (`NFQA_CFG_F_GSO`), so the loss is per
//! packet as the kernel queues it, as netem's is.
//!
//! Usage: `netdelay --queue N --delay-us US [--loss FRACTION]`; ends on SIGTERM or SIGINT
//! (packets still held are let go).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;
const NFQA_CFG_F_GSO: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
/// Packets the kernel holds for us at most (beyond: dropped, as a full switch buffer).
const QUEUE_MAXLEN: u32 = 65536;

struct Args {
    queue: u16,
    delay: Duration,
    loss: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        queue: 0,
        delay: Duration::ZERO,
        loss: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--queue" => a.queue = val()?.parse().map_err(|e| format!("--queue: {e}"))?,
            "--delay-us" => {
                a.delay =
                    Duration::from_micros(val()?.parse().map_err(|e| format!("--delay-us: {e}"))?)
            }
            "--loss" => a.loss = val()?.parse().map_err(|e| format!("--loss: {e}"))?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !(0.0..=1.0).contains(&a.loss) {
        return Err(format!("--loss {} is not a fraction 0..=1", a.loss));
    }
    Ok(a)
}

/// A netlink message: header, `nfgenmsg` for `queue`, then attributes.
fn message(msg: u16, flags: u16, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    m.extend_from_slice(&queue.to_be_bytes());
    for (kind, payload) in attrs {
        let len = 4 + payload.len();
        m.extend_from_slice(&(len as u16).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m
}

struct Queue {
    fd: OwnedFd,
    num: u16,
}

impl Queue {
    fn open(num: u16) -> io::Result<Queue> {
        // SAFETY: socket(2) with constant arguments; the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is the socket just created, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let q = Queue { fd, num };
        // A big receive buffer, and no ENOBUFS if it overflows anyway (the kernel then keeps
        // queueing; what is lost is only our copy of an id, released by the next batch).
        q.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
        q.setsockopt(libc::SOL_NETLINK, libc::NETLINK_NO_ENOBUFS, 1);
        q.send(&message(
            NFQNL_MSG_CONFIG,
            NLM_F_ACK,
            num,
            &[(
                NFQA_CFG_CMD,
                &[NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8],
            )],
        ))?;
        q.ack()?;
        let mut params = 0u32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        q.send(&message(
            NFQNL_MSG_CONFIG,
            NLM_F_ACK,
            num,
            &[
                (NFQA_CFG_PARAMS, &params),
                (NFQA_CFG_QUEUE_MAXLEN, &QUEUE_MAXLEN.to_be_bytes()),
                (NFQA_CFG_MASK, &NFQA_CFG_F_GSO.to_be_bytes()),
                (NFQA_CFG_FLAGS, &NFQA_CFG_F_GSO.to_be_bytes()),
            ],
        ))?;
        q.ack()?;
        Ok(q)
    }

    fn setsockopt(&self, level: i32, opt: i32, value: i32) {
        // SAFETY: setsockopt(2) reads one c_int from `value`, which outlives the call.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
    }

    fn send(&self, m: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) reads `m.len()` bytes from `m`; the kernel is the destination.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the acknowledgement of a request; an error code becomes an error.
    fn ack(&self) -> io::Result<()> {
        let mut buf = vec![0u8; 8192];
        let n = self.recv(&mut buf, 0)?;
        for (kind, payload) in messages(&buf[..n]) {
            if kind == NLMSG_ERROR && payload.len() >= 4 {
                let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn verdict(&self, kind: u16, verdict: u32, id: u32) -> io::Result<()> {
        let mut hdr = verdict.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        self.send(&message(kind, 0, self.num, &[(NFQA_VERDICT_HDR, &hdr)]))
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let _ = self.send(&message(
            NFQNL_MSG_CONFIG,
            0,
            self.num,
            &[(
                NFQA_CFG_CMD,
                &[NFQNL_CFG_CMD_UNBIND, 0, 0, libc::AF_INET as u8],
            )],
        ));
    }
}

/// The netlink messages in `buf`: (type, payload after the header).
fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        out.push((kind, &buf[16..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

/// The packet id of an `NFQNL_MSG_PACKET` payload (after `nfgenmsg`).
fn packet_id(payload: &[u8]) -> Option<u32> {
    let mut attrs = payload.get(4..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 8 {
            return Some(u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

/// xorshift64*: enough randomness for loss.
struct Rng(u64);

impl Rng {
    fn fraction(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn run(args: &Args) -> io::Result<()> {
    let q = Queue::open(args.queue)?;
    // SAFETY: the handler only stores to an atomic; no SA_RESTART, so ppoll wakes with EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        // Wake-ups within a microsecond or so of the deadline rather than the default 50 us.
        libc::prctl(libc::PR_SET_TIMERSLACK, 1u64);
    }
    let mut rng = Rng(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1);
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut buf = vec![0u8; 1 << 16];
    eprintln!(
        "netdelay: queue {} delay {:?} loss {}",
        args.queue, args.delay, args.loss
    );
    while !STOP.load(std::sync::atomic::Ordering::Relaxed) {
        let timeout = held.front().map(|(at, _)| {
            let left = at.saturating_duration_since(Instant::now());
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            }
        });
        let mut pfd = libc::pollfd {
            fd: q.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: ppoll(2) on one pollfd that outlives the call; the timeout, when given,
        // points at a timespec on this stack frame.
        let r = unsafe {
            libc::ppoll(
                &mut pfd,
                1,
                timeout
                    .as_ref()
                    .map_or(std::ptr::null(), |t| t as *const libc::timespec),
                std::ptr::null(),
            )
        };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        loop {
            let n = match q.recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => break,
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            for (kind, payload) in messages(&buf[..n]) {
                if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    continue;
                }
                let Some(id) = packet_id(payload) else {
                    continue;
                };
                if args.loss > 0.0 && rng.fraction() < args.loss {
                    q.verdict(NFQNL_MSG_VERDICT, NF_DROP, id)?;
                } else {
                    held.push_back((now + args.delay, id));
                }
            }
        }
        let now = Instant::now();
        let mut due = None;
        while let Some(&(at, id)) = held.front() {
            if at > now {
                break;
            }
            due = Some(id);
            held.pop_front();
        }
        if let Some(id) = due {
            q.verdict(NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, id)?;
        }
    }
    if let Some(&(_, id)) = held.back() {
        q.verdict(NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, id)?;
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("netdelay: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("netdelay: {e}");
        std::process::exit(1);
    }
}
