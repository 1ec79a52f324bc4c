//! Raw mode for the serial console while stdin is a TTY, always restored (on drop, which also
//! runs on the signal-driven shutdown path).

use std::io;
use std::os::fd::RawFd;

use log::debug;

/// Restores the saved terminal attributes on drop.
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

impl RawModeGuard {
    /// Put `fd` in raw mode if it is a TTY; `Ok(None)` when it is not.
    pub fn new(fd: RawFd) -> io::Result<Option<RawModeGuard>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; zeroed is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill in.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits it.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side newlines stay newlines.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: `raw` is a valid termios for `fd`.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        debug!("terminal in raw mode");
        Ok(Some(RawModeGuard { fd, saved }))
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same fd in `new`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
        debug!("terminal restored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_tty_is_left_alone() {
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        let g = RawModeGuard::new(std::os::fd::AsRawFd::as_raw_fd(&f)).expect("not an error");
        assert!(g.is_none());
    }
}
