//! The kernel's `struct can_frame` (linux/can.h) as bytes, and its error frames
//! (linux/can/error.h): what a CAN_RAW socket hands us, decoded without IO.
//!
//! ```text
//! struct can_frame {            16 bytes
//!     canid_t can_id;           u32, native endian: 11/29-bit id + EFF/RTR/ERR flags
//!     __u8    len;              0..=8
//!     __u8    __pad, __res0, len8_dlc;
//!     __u8    data[8];
//! };
//! ```

use servogate_canopen::Frame;

/// Size of `struct can_frame`.
pub const CAN_MTU: usize = 16;

/// linux/can.h: extended frame format (29-bit id).
const CAN_EFF_FLAG: u32 = 0x8000_0000;
/// linux/can.h: remote transmission request.
const CAN_RTR_FLAG: u32 = 0x4000_0000;
/// linux/can.h: error message frame.
const CAN_ERR_FLAG: u32 = 0x2000_0000;

/// linux/can/error.h: error classes in `can_id` of an error frame.
pub mod err {
    /// TX timeout (by netdevice driver).
    pub const TX_TIMEOUT: u32 = 0x0001;
    /// Lost arbitration, data[0].
    pub const LOSTARB: u32 = 0x0002;
    /// Controller problems, data[1].
    pub const CRTL: u32 = 0x0004;
    /// Protocol violations, data[2..=3].
    pub const PROT: u32 = 0x0008;
    /// Transceiver status, data[4].
    pub const TRX: u32 = 0x0010;
    /// No acknowledge on transmission.
    pub const ACK: u32 = 0x0020;
    /// Bus off.
    pub const BUSOFF: u32 = 0x0040;
    /// Bus error (may flood).
    pub const BUSERROR: u32 = 0x0080;
    /// Controller restarted.
    pub const RESTARTED: u32 = 0x0100;
    /// The classes we ask the kernel for: state changes and the counters' causes.
    pub const MASK: u32 = TX_TIMEOUT | CRTL | PROT | ACK | BUSOFF | BUSERROR | RESTARTED;

    /// data[1] of CAN_ERR_CRTL.
    pub const CRTL_RX_OVERFLOW: u8 = 0x01;
    pub const CRTL_TX_OVERFLOW: u8 = 0x02;
    pub const CRTL_RX_WARNING: u8 = 0x04;
    pub const CRTL_TX_WARNING: u8 = 0x08;
    pub const CRTL_RX_PASSIVE: u8 = 0x10;
    pub const CRTL_TX_PASSIVE: u8 = 0x20;
    /// Recovered to error active state.
    pub const CRTL_ACTIVE: u8 = 0x40;
}

/// The CAN controller's fault confinement state (ISO 11898-1), as error frames tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusState {
    ErrorActive,
    /// An error counter passed 96.
    ErrorWarning,
    /// An error counter passed 127: the node may only send passive error flags.
    ErrorPassive,
    /// The transmit error counter passed 255: the controller is off the bus.
    BusOff,
}

impl BusState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorActive => "error_active",
            Self::ErrorWarning => "error_warning",
            Self::ErrorPassive => "error_passive",
            Self::BusOff => "bus_off",
        }
    }
}

/// What an error frame reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorReport {
    /// The state it moves the controller to, if it says.
    pub state: Option<BusState>,
    /// The controller's own receive or transmit buffer overflowed: frames were lost.
    pub controller_overflow: bool,
    /// A protocol violation, bus error, missing ACK or TX timeout: counted.
    pub bus_error: bool,
}

/// One read from the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A classic data frame with an 11-bit id: CANopen's.
    Data(Frame),
    /// An error frame from the controller (needs the error filter set).
    Error(ErrorReport),
    /// A frame CANopen does not use here (29-bit id, RTR) or a malformed length.
    Ignored,
}

/// Decodes one `struct can_frame`. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Received {
    if bytes.len() < CAN_MTU {
        return Received::Ignored;
    }
    let can_id = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let len = usize::from(bytes[4]);
    if len > 8 {
        return Received::Ignored;
    }
    let data = &bytes[8..8 + len];
    if can_id & CAN_ERR_FLAG != 0 {
        return Received::Error(error_report(can_id, &bytes[8..16]));
    }
    if can_id & (CAN_EFF_FLAG | CAN_RTR_FLAG) != 0 {
        return Received::Ignored;
    }
    // An 11-bit id and at most 8 bytes: Frame::new cannot refuse it.
    match Frame::new((can_id & 0x7FF) as u16, data) {
        Some(frame) => Received::Data(frame),
        None => Received::Ignored,
    }
}

/// Encodes a CANopen frame as a `struct can_frame` to write.
pub fn encode(frame: &Frame) -> [u8; CAN_MTU] {
    let mut b = [0u8; CAN_MTU];
    b[..4].copy_from_slice(&u32::from(frame.id()).to_ne_bytes());
    let data = frame.data();
    b[4] = data.len() as u8;
    b[8..8 + data.len()].copy_from_slice(data);
    b
}

fn error_report(can_id: u32, data: &[u8]) -> ErrorReport {
    let mut r = ErrorReport::default();
    if can_id & err::CRTL != 0 {
        let d1 = data[1];
        r.controller_overflow = d1 & (err::CRTL_RX_OVERFLOW | err::CRTL_TX_OVERFLOW) != 0;
        r.state = if d1 & (err::CRTL_RX_PASSIVE | err::CRTL_TX_PASSIVE) != 0 {
            Some(BusState::ErrorPassive)
        } else if d1 & (err::CRTL_RX_WARNING | err::CRTL_TX_WARNING) != 0 {
            Some(BusState::ErrorWarning)
        } else if d1 & err::CRTL_ACTIVE != 0 {
            Some(BusState::ErrorActive)
        } else {
            None
        };
    }
    if can_id & err::RESTARTED != 0 {
        r.state = Some(BusState::ErrorActive);
    }
    // Bus-off outranks whatever else the same frame says.
    if can_id & err::BUSOFF != 0 {
        r.state = Some(BusState::BusOff);
    }
    r.bus_error = can_id & (err::PROT | err::BUSERROR | err::ACK | err::TX_TIMEOUT) != 0;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(can_id: u32, data: &[u8]) -> [u8; CAN_MTU] {
        let mut b = [0u8; CAN_MTU];
        b[..4].copy_from_slice(&can_id.to_ne_bytes());
        b[4] = data.len() as u8;
        b[8..8 + data.len()].copy_from_slice(data);
        b
    }

    #[test]
    fn a_standard_data_frame_decodes_into_a_canopen_frame() {
        assert_eq!(
            decode(&raw(0x185, &[1, 2, 3])),
            Received::Data(Frame::new(0x185, &[1, 2, 3]).unwrap())
        );
        assert_eq!(
            decode(&raw(0x080, &[])),
            Received::Data(Frame::new(0x080, &[]).unwrap())
        );
    }

    #[test]
    fn an_encoded_frame_decodes_to_itself() {
        let f = Frame::new(0x605, &[0x40, 0x41, 0x60, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(decode(&encode(&f)), Received::Data(f));
    }

    #[test]
    fn extended_remote_short_and_overlong_frames_are_ignored() {
        assert_eq!(decode(&raw(CAN_EFF_FLAG | 0x185, &[1])), Received::Ignored);
        assert_eq!(decode(&raw(CAN_RTR_FLAG | 0x185, &[])), Received::Ignored);
        assert_eq!(decode(&[0u8; 8]), Received::Ignored);
        let mut b = raw(0x185, &[]);
        b[4] = 9;
        assert_eq!(decode(&b), Received::Ignored);
    }

    #[test]
    fn error_frames_report_bus_off_passive_and_recovery() {
        let e = |id: u32, d1: u8| match decode(&raw(CAN_ERR_FLAG | id, &[0, d1, 0, 0, 0, 0, 0, 0]))
        {
            Received::Error(r) => r,
            other => panic!("not an error frame: {other:?}"),
        };
        assert_eq!(e(err::BUSOFF, 0).state, Some(BusState::BusOff));
        assert_eq!(
            e(err::CRTL, err::CRTL_TX_PASSIVE).state,
            Some(BusState::ErrorPassive)
        );
        assert_eq!(
            e(err::CRTL, err::CRTL_RX_WARNING).state,
            Some(BusState::ErrorWarning)
        );
        assert_eq!(e(err::RESTARTED, 0).state, Some(BusState::ErrorActive));
        let overflow = e(err::CRTL, err::CRTL_RX_OVERFLOW);
        assert!(overflow.controller_overflow);
        assert_eq!(overflow.state, None);
        assert!(e(err::ACK, 0).bus_error);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = [0u8; CAN_MTU];
            b[..8].copy_from_slice(&x.to_le_bytes());
            b[8..].copy_from_slice(&x.rotate_left(17).to_le_bytes());
            let _ = decode(&b);
        }
    }
}
