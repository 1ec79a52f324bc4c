//! A minimal i8042 keyboard controller: enough for Linux to probe it quickly and to reset the
//! machine with command 0xfe, which ends minivmm with exit status 0.

use std::sync::Arc;

use log::{debug, info};

use super::PioDevice;
use crate::exit::{ExitSignal, VmExit};

/// Base port (data at +0, status/command at +4).
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

const DATA: u16 = 0;
const STATUS_COMMAND: u16 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_INTERFACE_TEST: u8 = 0xab;
const CMD_PULSE_RESET: u8 = 0xfe;

/// The i8042.
pub struct I8042 {
    exit: Arc<ExitSignal>,
    ctr: u8,
    output: Option<u8>,
    expect_ctr: bool,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> I8042 {
        I8042 {
            exit,
            ctr: 0,
            output: None,
            expect_ctr: false,
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.output = Some(self.ctr),
            CMD_WRITE_CTR => self.expect_ctr = true,
            CMD_SELF_TEST => self.output = Some(0x55),
            CMD_INTERFACE_TEST => self.output = Some(0x00),
            CMD_PULSE_RESET => {
                info!("guest reset through the i8042");
                self.exit.trigger(VmExit::Reset);
            }
            other => debug!("i8042 command {other:#x} ignored"),
        }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            DATA => self.output.take().unwrap_or(0),
            STATUS_COMMAND => {
                STATUS_SYSTEM
                    | if self.output.is_some() {
                        STATUS_OUTPUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            STATUS_COMMAND => self.command(v),
            DATA if self.expect_ctr => {
                self.ctr = v;
                self.expect_ctr = false;
            }
            _ => debug!("i8042 write {v:#x} at offset {offset} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &mut I8042, off: u16) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_ends_the_vm_cleanly() {
        let exit = Arc::new(ExitSignal::new().expect("eventfd"));
        let mut d = I8042::new(exit.clone());
        d.write(STATUS_COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn ctr_round_trip_and_self_test() {
        let exit = Arc::new(ExitSignal::new().expect("eventfd"));
        let mut d = I8042::new(exit.clone());
        assert_eq!(read(&mut d, STATUS_COMMAND) & STATUS_OUTPUT_FULL, 0);
        d.write(STATUS_COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x47]);
        d.write(STATUS_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, STATUS_COMMAND) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(read(&mut d, DATA), 0x47);
        d.write(STATUS_COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, DATA), 0x55);
        assert_eq!(exit.reason(), None);
    }
}
