//! File descriptors over a unix socket (`SCM_RIGHTS`), for local migration: the two halves
//! of [`Transport::send_with_fds`](crate::transport::Transport::send_with_fds) and of the
//! descriptor-collecting receive of a unix [`Connection`](crate::transport::Connection).
//!
//! A stream socket carries descriptors attached to a byte: the receiver gets them with the
//! `recvmsg` that reads that byte. The receiving side therefore reads every unix socket with
//! `recvmsg` and a control buffer for at most [`MAX_PASSED_FDS`] descriptors, keeps at most
//! that many queued, and closes any beyond (a peer cannot make it hold more open files).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message may carry, and most kept queued on a connection (one per
/// memory region of the largest layout).
pub const MAX_PASSED_FDS: usize = crate::wire::MAX_REGIONS;

/// `CMSG_SPACE` of `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends `data` (non-empty) on the unix socket `fd` with `fds` attached to its first byte, in
/// one `sendmsg`. Returns the bytes sent, which may be fewer than `data.len()`: the caller
/// sends the rest without descriptors.
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if data.is_empty() || fds.is_empty() || fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "passing {} descriptors with {} bytes: expected 1..={MAX_PASSED_FDS} with data",
                fds.len(),
                data.len()
            ),
        ));
    }
    // u64 keeps the buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(fds.len());
    // SAFETY: `msg` points at a control buffer of `msg_controllen` bytes, room for one header
    // and `fds.len()` descriptors (CMSG_SPACE above); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
        let out = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, f) in fds.iter().enumerate() {
            out.add(i).write_unaligned(f.as_raw_fd());
        }
    }
    loop {
        // SAFETY: `msg` and everything it points to (data, control) outlive the call;
        // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads into `buf` from the unix socket `fd` like `read`, and queues the descriptors that
/// arrive with the bytes in `queue` (close-on-exec), up to [`MAX_PASSED_FDS`] queued: others
/// are closed at once.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8], queue: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut control = vec![0u64; cmsg_space(MAX_PASSED_FDS).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    // SAFETY: `buf` and `control` outlive the call and the lengths are theirs. The kernel
    // installs at most as many descriptors as the control buffer holds and closes the rest.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of the control buffer with well-formed
    // headers; CMSG_FIRSTHDR/CMSG_NXTHDR walk only within them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    // Each one is a new descriptor the kernel installed for us: ours to own.
                    let owned = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if queue.len() < MAX_PASSED_FDS {
                        queue.push(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_arrive_with_their_byte() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        (&file).write_all(b"shared").unwrap();
        (&a).write_all(b"before").unwrap();
        let n = send_with_fds(a.as_raw_fd(), b"with", &[file.as_fd()]).unwrap();
        assert_eq!(n, 4);
        // A plain read of the bytes before does not swallow them.
        let mut first = [0u8; 6];
        b.read_exact(&mut first).unwrap();
        let mut queue = Vec::new();
        let mut buf = [0u8; 16];
        let n = recv_with_fds(b.as_raw_fd(), &mut buf, &mut queue).unwrap();
        assert_eq!(&buf[..n], b"with");
        assert_eq!(queue.len(), 1);
        let mut got = std::fs::File::from(queue.pop().unwrap());
        use std::io::Seek;
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "shared");
    }

    #[test]
    fn the_queue_is_bounded() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..MAX_PASSED_FDS).map(|_| file.as_fd()).collect();
        let mut queue = Vec::new();
        let mut buf = [0u8; 1];
        for _ in 0..3 {
            send_with_fds(a.as_raw_fd(), b"x", &fds).unwrap();
            recv_with_fds(b.as_raw_fd(), &mut buf, &mut queue).unwrap();
        }
        assert_eq!(queue.len(), MAX_PASSED_FDS, "the rest were closed");
        assert!(send_with_fds(a.as_raw_fd(), b"x", &[]).is_err());
    }
}
