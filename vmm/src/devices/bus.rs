//! Port-I/O bus: devices registered on port ranges, looked up by binary search.
//!
//! Guest port I/O never panics: ports without a device read as all-ones and ignore writes.

use std::sync::{Arc, Mutex};

use log::debug;

use crate::sync::lock;

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("port range {base:#x}+{len} overlaps a registered device")]
    Overlap { base: u16, len: u16 },
    #[error("port range {base:#x}+{len} is empty or wraps around")]
    BadRange { base: u16, len: u16 },
}

struct BusEntry {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

impl BusEntry {
    fn end(&self) -> u32 {
        u32::from(self.base) + u32::from(self.len)
    }
}

/// The port-I/O bus, shared read-only by every vCPU thread once built.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<BusEntry>,
}

impl PioBus {
    pub fn new() -> PioBus {
        PioBus::default()
    }

    /// Register `device` on ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 || u32::from(base) + u32::from(len) > 0x1_0000 {
            return Err(BusError::BadRange { base, len });
        }
        let new_end = u32::from(base) + u32::from(len);
        if self
            .entries
            .iter()
            .any(|e| u32::from(base) < e.end() && u32::from(e.base) < new_end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, BusEntry { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&BusEntry> {
        let i = self.entries.partition_point(|e| e.base <= port);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (u32::from(port) < e.end()).then_some(e)
    }

    /// Guest `in` from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some(e) => lock(&e.device).read(port - e.base, data),
            None => {
                data.fill(0xff);
                debug!("unhandled port read {port:#x} ({} bytes)", data.len());
            }
        }
    }

    /// Guest `out` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some(e) => lock(&e.device).write(port - e.base, data),
            None => debug!("unhandled port write {port:#x} <- {data:02x?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn lookup_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, a.clone()).expect("a");
        bus.insert(0x60, 5, b.clone()).expect("b");
        let mut d = [0u8; 1];
        bus.read(0x3fd, &mut d);
        assert_eq!(d, [5]);
        bus.write(0x64, &[0xfe]);
        bus.write(0x3f8, b"x");
        assert_eq!(b.lock().expect("b").writes, vec![(4, vec![0xfe])]);
        assert_eq!(a.lock().expect("a").writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Recorder::default())))
            .expect("insert");
        for port in [0u16, 0x3f7, 0x400, 0xffff] {
            let mut d = [0u8; 4];
            bus.read(port, &mut d);
            assert_eq!(d, [0xff; 4], "port {port:#x}");
            bus.write(port, &[1, 2]);
        }
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = PioBus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, d()).expect("first");
        assert_eq!(
            bus.insert(0x10f, 1, d()),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf0, 0x11, d()),
            Err(BusError::Overlap {
                base: 0xf0,
                len: 0x11
            })
        );
        assert!(bus.insert(0xf0, 0x10, d()).is_ok());
        assert!(bus.insert(0x110, 1, d()).is_ok());
        assert_eq!(
            bus.insert(5, 0, d()),
            Err(BusError::BadRange { base: 5, len: 0 })
        );
        assert!(matches!(
            bus.insert(0xffff, 2, d()),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.insert(0xffff, 1, d()).is_ok());
    }
}
