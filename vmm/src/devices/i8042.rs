//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU
//! reset line (command 0xfe on port 0x64) and quiet answers to probes.

use super::{BusDevice, GuestEvent};

/// Base port; the device spans 0x60..0x65 (data at 0, command/status at 4).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller.
#[derive(Debug, Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Empty output buffer, no errors: the guest's probe finds nothing to read.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<GuestEvent> {
        (offset == 4 && data.first() == Some(&CMD_RESET_CPU)).then_some(GuestEvent::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_resets() {
        let mut d = I8042;
        assert_eq!(d.write(4, &[0xfe]), Some(GuestEvent::Reset));
        assert_eq!(d.write(4, &[0xaa]), None);
        assert_eq!(d.write(0, &[0xfe]), None);
        assert_eq!(d.write(4, &[]), None);
        let mut b = [9u8];
        d.read(4, &mut b);
        assert_eq!(b, [0]);
    }
}
