//! COM1 (16550 at 0x3f8) from ring 3, one whole line at a time under a spinlock, so lines of
//! several CPUs never interleave. Use the [`say!`] macro.

use core::fmt;
use core::sync::atomic::Ordering;

use crate::hw;

const COM1: u16 = 0x3f8;
/// Longest line: a whole `TESTGUEST boot` line with the longest kept command line fits.
const LINE: usize = 1400;

/// 8N1, no interrupts, FIFOs on.
pub fn init() {
    hw::outb(COM1 + 1, 0x00);
    hw::outb(COM1 + 3, 0x03);
    hw::outb(COM1 + 2, 0x07);
}

fn putc(b: u8) {
    // Emulated UARTs are always ready; a real one would be within a few thousand polls.
    for _ in 0..100_000 {
        if hw::inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    hw::outb(COM1, b);
}

/// A line being formatted; truncated (with `...`) if longer than the buffer.
pub struct Line {
    buf: [u8; LINE],
    len: usize,
    truncated: bool,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; LINE],
            len: 0,
            truncated: false,
        }
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == LINE - 4 {
                self.truncated = true;
                break;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

impl Line {
    /// Sends the line and a `\n` while holding the serial lock.
    pub fn emit(mut self) {
        if self.truncated {
            self.buf[self.len..self.len + 3].copy_from_slice(b"...");
            self.len += 3;
        }
        self.buf[self.len] = b'\n';
        self.len += 1;
        let lock = hw::serial_lock_byte();
        while lock.swap(1, Ordering::Acquire) != 0 {
            core::hint::spin_loop();
        }
        for &b in &self.buf[..self.len] {
            putc(b);
        }
        lock.store(0, Ordering::Release);
    }
}

/// `say!("VERIFY-OK round={r}")`: formats one line and prints it atomically.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = $crate::serial::Line::default();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.emit();
    }};
}

/// Displays a byte string as printable ASCII (others as `?`, `"` as `'`).
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = match b {
                b'"' => '\'',
                0x20..=0x7e => b as char,
                _ => '?',
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}
