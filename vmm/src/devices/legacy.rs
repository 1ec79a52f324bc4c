//! Ports Linux probes that have nothing behind them here: answered like absent hardware
//! (all-ones), logged at trace level only so `RUST_LOG=debug` stays readable.

use log::trace;

use super::PioDevice;

/// Ranges answered by [`Absent`]: POST code port 0x80, PCI configuration 0xcf8..0xd00.
pub const ABSENT_RANGES: &[(u16, u16)] = &[(0x80, 1), (0xcf8, 8)];

/// A device that is not there.
pub struct Absent;

impl PioDevice for Absent {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        trace!("read of absent device at offset {offset}");
        data.fill(0xff);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        trace!("write {data:02x?} to absent device at offset {offset}");
    }
}

/// A register block that reads as zero and ignores writes (the ACPI PM1a event block:
/// no events pending, none enabled).
pub struct Zero;

impl PioDevice for Zero {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        trace!("write {data:02x?} to zero register at offset {offset}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_ones() {
        let mut d = [0u8; 4];
        Absent.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        Absent.write(0, &[1, 2, 3, 4]);
    }

    #[test]
    fn zero_reads_zero() {
        let mut d = [0xaau8; 2];
        Zero.read(0, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
