//! CAN frames and the CiA 301 predefined connection set.
//!
//! A [`Frame`] is a classic CAN data frame with an 11-bit identifier and 0..=8 data bytes.
//! It cannot hold anything else: [`Frame::new`] refuses a longer payload or a wider id.

use std::fmt;

/// Largest 11-bit CAN identifier.
pub const MAX_ID: u16 = 0x7FF;

/// CiA 301 predefined connection set, function codes (CiA 301 v4.2, table 43).
pub mod cob {
    /// 0x000: NMT module control (master to all).
    pub const NMT: u16 = 0x000;
    /// 0x080: SYNC (no node id).
    pub const SYNC: u16 = 0x080;
    /// 0x080 + node: EMCY.
    pub const EMCY: u16 = 0x080;
    /// 0x180 + node: TPDO1 (then 0x280, 0x380, 0x480 for TPDO2..4).
    pub const TPDO1: u16 = 0x180;
    /// 0x200 + node: RPDO1 (then 0x300, 0x400, 0x500 for RPDO2..4).
    pub const RPDO1: u16 = 0x200;
    /// 0x580 + node: SDO server to client (responses).
    pub const SDO_TX: u16 = 0x580;
    /// 0x600 + node: SDO client to server (requests).
    pub const SDO_RX: u16 = 0x600;
    /// 0x700 + node: NMT error control (heartbeat, boot-up).
    pub const HEARTBEAT: u16 = 0x700;
}

/// A CANopen node id, 1..=127 (CiA 301: 0 addresses all nodes in NMT only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(u8);

impl NodeId {
    /// `None` outside 1..=127.
    pub const fn new(id: u8) -> Option<Self> {
        if id >= 1 && id <= 127 {
            Some(Self(id))
        } else {
            None
        }
    }

    pub const fn get(self) -> u8 {
        self.0
    }

    /// The COB-ID `function + node`.
    pub const fn cob_id(self, function: u16) -> u16 {
        function + self.0 as u16
    }

    /// The node of a COB-ID `function + node`, if the id has that function code.
    pub fn from_cob_id(id: u16, function: u16) -> Option<Self> {
        let node = id.checked_sub(function)?;
        if node > 0x7F {
            return None;
        }
        Self::new(node as u8)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A classic CAN data frame: 11-bit id, 0..=8 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    id: u16,
    data: heapless::Vec<u8, 8>,
}

impl Frame {
    /// `None` when `id` is wider than 11 bits or `data` longer than 8 bytes.
    pub fn new(id: u16, data: &[u8]) -> Option<Self> {
        if id > MAX_ID {
            return None;
        }
        let data = heapless::Vec::from_slice(data).ok()?;
        Some(Self { id, data })
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Parses one line of a `candump -l` log (`(1700000000.000000) can0 701#05`) or a
    /// bare `701#05`. `None` for anything else: extended (29-bit) ids, remote frames,
    /// CAN FD (`##`), odd hex, more than 8 bytes.
    pub fn from_candump(line: &str) -> Option<Self> {
        let token = line.split_whitespace().last()?;
        let (id, data) = token.split_once('#')?;
        if id.is_empty() || id.len() > 3 || data.len() % 2 != 0 || data.len() > 16 {
            return None;
        }
        let id = u16::from_str_radix(id, 16).ok()?;
        let mut bytes = [0u8; 8];
        let mut len = 0;
        for (i, pair) in data.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).ok()?;
            // chunks(2) of at most 16 bytes gives i < 8.
            *bytes.get_mut(i)? = u8::from_str_radix(pair, 16).ok()?;
            len = i + 1;
        }
        Self::new(id, &bytes[..len])
    }

    /// Builds a frame the crate itself knows to be valid (a constant id + node, <= 8 bytes).
    pub(crate) fn known(id: u16, data: &[u8]) -> Self {
        let mut frame = Self {
            id: id & MAX_ID,
            data: heapless::Vec::new(),
        };
        // Callers pass at most 8 bytes; a longer slice is truncated rather than panicking.
        for &b in data.iter().take(8) {
            let _ = frame.data.push(b);
        }
        frame
    }
}

impl fmt::Display for Frame {
    /// candump style: `701#05`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03X}#", self.id)?;
        for b in &self.data {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// What a frame is, by its COB-ID in the predefined connection set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CobKind {
    Nmt,
    Sync,
    Emcy(NodeId),
    /// TPDO number 1..=4 of a node.
    Tpdo(u8, NodeId),
    /// RPDO number 1..=4 of a node.
    Rpdo(u8, NodeId),
    SdoResponse(NodeId),
    SdoRequest(NodeId),
    Heartbeat(NodeId),
    /// Anything else (time stamp 0x100, LSS, vendor ids).
    Other,
}

impl CobKind {
    pub fn of(id: u16) -> Self {
        let function = id & 0x780;
        let Some(node) = NodeId::new((id & 0x7F) as u8) else {
            return match id {
                cob::NMT => Self::Nmt,
                cob::SYNC => Self::Sync,
                _ => Self::Other,
            };
        };
        match function {
            0x080 => Self::Emcy(node),
            0x180 => Self::Tpdo(1, node),
            0x280 => Self::Tpdo(2, node),
            0x380 => Self::Tpdo(3, node),
            0x480 => Self::Tpdo(4, node),
            0x200 => Self::Rpdo(1, node),
            0x300 => Self::Rpdo(2, node),
            0x400 => Self::Rpdo(3, node),
            0x500 => Self::Rpdo(4, node),
            0x580 => Self::SdoResponse(node),
            0x600 => Self::SdoRequest(node),
            0x700 => Self::Heartbeat(node),
            _ => Self::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_refuses_more_than_eight_bytes_or_a_29_bit_id() {
        assert!(Frame::new(0x123, &[0; 9]).is_none());
        assert!(Frame::new(0x800, &[]).is_none());
        let f = Frame::new(0x7FF, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(f.data().len(), 8);
    }

    #[test]
    fn node_ids_outside_1_to_127_are_refused() {
        assert!(NodeId::new(0).is_none());
        assert!(NodeId::new(128).is_none());
        assert_eq!(NodeId::new(127).unwrap().cob_id(cob::HEARTBEAT), 0x77F);
    }

    #[test]
    fn cob_ids_classify_into_the_predefined_connection_set() {
        let n5 = NodeId::new(5).unwrap();
        assert_eq!(CobKind::of(0x000), CobKind::Nmt);
        assert_eq!(CobKind::of(0x080), CobKind::Sync);
        assert_eq!(CobKind::of(0x085), CobKind::Emcy(n5));
        assert_eq!(CobKind::of(0x285), CobKind::Tpdo(2, n5));
        assert_eq!(CobKind::of(0x585), CobKind::SdoResponse(n5));
        assert_eq!(CobKind::of(0x705), CobKind::Heartbeat(n5));
        assert_eq!(CobKind::of(0x100), CobKind::Other);
    }

    #[test]
    fn frames_print_in_candump_style() {
        assert_eq!(Frame::new(0x701, &[0x05]).unwrap().to_string(), "701#05");
    }

    #[test]
    fn candump_log_lines_parse_back_into_frames() {
        let f = Frame::from_candump("(1700000000.000100) vcan0 581#4B41600037020000").unwrap();
        assert_eq!(f.id(), 0x581);
        assert_eq!(f.data(), [0x4B, 0x41, 0x60, 0x00, 0x37, 0x02, 0x00, 0x00]);
        assert!(Frame::from_candump("080#").unwrap().data().is_empty());
        for bad in [
            "",
            "701",
            "12345678#00",
            "701#R",
            "701##005",
            "701#0",
            "701#zz",
            "701#000102030405060708",
            "800#00",
            "#00",
            "70é#00",
        ] {
            assert_eq!(Frame::from_candump(bad), None, "{bad:?}");
        }
    }
}
