//! Emergency messages (CiA 301 v4.2, 7.2.7): 0x080 + node, 8 bytes:
//! error code (u16 LE), error register (u8, object 0x1001), 5 manufacturer-specific bytes.
//! Error code 0x0000 means "error reset or no error": the node's fault is gone.

use servogate_core::EventKind;

use crate::frame::{cob, Frame, NodeId};

/// CiA 301 length of an EMCY message.
pub const EMCY_LEN: usize = 8;

/// A decoded EMCY message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emcy {
    /// Emergency error code (CiA 301 table 21; CiA 402 drive codes such as 0x2310).
    pub code: u16,
    /// Error register (0x1001).
    pub register: u8,
    pub manufacturer: [u8; 5],
}

impl Emcy {
    /// `None` unless `data` is exactly 8 bytes.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let [c0, c1, register, m0, m1, m2, m3, m4] = *data else {
            return None;
        };
        Some(Self {
            code: u16::from_le_bytes([c0, c1]),
            register,
            manufacturer: [m0, m1, m2, m3, m4],
        })
    }

    /// True for error code 0x0000 (error reset / no error).
    pub fn is_reset(&self) -> bool {
        self.code == 0
    }
}

/// A node's fault state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultChange {
    Fault {
        node: NodeId,
        code: u16,
        register: u8,
    },
    /// `code` is the fault that was active.
    FaultCleared { node: NodeId, code: u16 },
}

impl FaultChange {
    pub fn node(&self) -> NodeId {
        match *self {
            Self::Fault { node, .. } | Self::FaultCleared { node, .. } => node,
        }
    }

    /// The core event kind (`fault` / `fault_cleared`).
    pub fn to_event_kind(&self) -> EventKind {
        match *self {
            Self::Fault { code, register, .. } => EventKind::Fault {
                code,
                register: Some(register),
            },
            Self::FaultCleared { code, .. } => EventKind::FaultCleared { code },
        }
    }
}

/// Tracks the active fault of each node from its EMCY messages.
#[derive(Debug, Clone, Default)]
pub struct EmcyConsumer {
    /// (node, active error code); a node with no entry has no fault.
    active: Vec<(NodeId, u16)>,
    malformed: u64,
}

impl EmcyConsumer {
    pub fn new() -> Self {
        Self::default()
    }

    /// EMCY frames that were not 8 bytes long.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// The node's active error code, if it has a fault.
    pub fn active(&self, node: NodeId) -> Option<u16> {
        self.active
            .iter()
            .find(|(n, _)| *n == node)
            .map(|&(_, c)| c)
    }

    /// Feeds a received frame. A fault (a new or different code) gives `Fault`; code 0
    /// after a fault gives `FaultCleared`; a repeat of the active code gives nothing.
    pub fn handle_frame(&mut self, frame: &Frame) -> Option<FaultChange> {
        let node = NodeId::from_cob_id(frame.id(), cob::EMCY)?;
        let Some(emcy) = Emcy::parse(frame.data()) else {
            self.malformed += 1;
            return None;
        };
        let slot = self.active.iter().position(|(n, _)| *n == node);
        match (emcy.is_reset(), slot) {
            (true, None) => None,
            (true, Some(i)) => {
                let (_, code) = self.active.swap_remove(i);
                Some(FaultChange::FaultCleared { node, code })
            }
            (false, Some(i)) if self.active[i].1 == emcy.code => None,
            (false, slot) => {
                match slot {
                    Some(i) => self.active[i].1 = emcy.code,
                    None => self.active.push((node, emcy.code)),
                }
                Some(FaultChange::Fault {
                    node,
                    code: emcy.code,
                    register: emcy.register,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn emcy(node: u8, data: &[u8]) -> Frame {
        Frame::new(0x080 + u16::from(node), data).unwrap()
    }

    #[test]
    fn an_emcy_frame_decodes_code_register_and_manufacturer_bytes() {
        // 0x2310: continuous over-current (CiA 402); register 0x03: generic + current.
        let e = Emcy::parse(&[0x10, 0x23, 0x03, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(e.code, 0x2310);
        assert_eq!(e.register, 0x03);
        assert_eq!(e.manufacturer, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn an_emcy_with_a_code_gives_a_fault_and_code_zero_clears_it() {
        let mut c = EmcyConsumer::new();
        let fault = c.handle_frame(&emcy(4, &[0x10, 0x23, 0x03, 0, 0, 0, 0, 0]));
        assert_eq!(
            fault,
            Some(FaultChange::Fault {
                node: n(4),
                code: 0x2310,
                register: 0x03
            })
        );
        assert_eq!(c.active(n(4)), Some(0x2310));
        let cleared = c.handle_frame(&emcy(4, &[0, 0, 0, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!(
            cleared,
            FaultChange::FaultCleared {
                node: n(4),
                code: 0x2310
            }
        );
        assert_eq!(
            cleared.to_event_kind(),
            EventKind::FaultCleared { code: 0x2310 }
        );
        assert_eq!(c.active(n(4)), None);
    }

    #[test]
    fn a_repeated_emcy_is_no_new_fault_but_a_different_code_is() {
        let mut c = EmcyConsumer::new();
        let f = emcy(1, &[0x10, 0x23, 0x03, 0, 0, 0, 0, 0]);
        assert!(c.handle_frame(&f).is_some());
        assert_eq!(c.handle_frame(&f), None);
        let other = c.handle_frame(&emcy(1, &[0x10, 0x43, 0x09, 0, 0, 0, 0, 0]));
        assert_eq!(
            other.unwrap().to_event_kind(),
            EventKind::Fault {
                code: 0x4310,
                register: Some(0x09)
            }
        );
    }

    #[test]
    fn an_error_reset_without_a_fault_is_ignored() {
        let mut c = EmcyConsumer::new();
        assert_eq!(c.handle_frame(&emcy(1, &[0; 8])), None);
    }

    #[test]
    fn short_emcy_frames_are_counted_as_malformed_without_a_panic() {
        let mut c = EmcyConsumer::new();
        for len in 0..8 {
            assert_eq!(c.handle_frame(&emcy(2, &[0x10; 8][..len])), None);
        }
        assert_eq!(c.malformed(), 8);
    }

    #[test]
    fn sync_and_other_cob_ids_are_not_emcy() {
        let mut c = EmcyConsumer::new();
        assert_eq!(c.handle_frame(&Frame::new(0x080, &[]).unwrap()), None);
        assert_eq!(c.handle_frame(&Frame::new(0x181, &[1; 8]).unwrap()), None);
        assert_eq!(c.malformed(), 0);
    }

    #[test]
    fn faults_are_tracked_per_node() {
        let mut c = EmcyConsumer::new();
        c.handle_frame(&emcy(1, &[0x10, 0x23, 1, 0, 0, 0, 0, 0]));
        c.handle_frame(&emcy(2, &[0x10, 0x43, 1, 0, 0, 0, 0, 0]));
        let cleared = c.handle_frame(&emcy(2, &[0; 8])).unwrap();
        assert_eq!(cleared.node(), n(2));
        assert_eq!(c.active(n(1)), Some(0x2310));
    }
}
