//! NMT module control and boot-up detection (CiA 301 v4.2, 7.2.8.3.1 and 7.2.8.3.2.1).
//!
//! The master sends 2-byte commands on COB-ID 0x000: `[command, node]` (node 0 = all).
//! A node that finishes booting sends one byte 0x00 on 0x700 + node (the boot-up message,
//! the same COB-ID as its heartbeat). [`NodeTable`] queues a start command for every
//! configured node at [`NodeTable::start_all`] and again whenever one of them boots, so a
//! drive that reboots (power cycle, watchdog) is back in `operational` without a restart of
//! the gateway.

use std::collections::VecDeque;

use crate::frame::{cob, Frame, NodeId};

/// NMT command specifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NmtCommand {
    /// 1 (0x01) Start remote node: to `operational`.
    Start = 0x01,
    /// 2 (0x02) Stop remote node: to `stopped`.
    Stop = 0x02,
    /// 128 (0x80) Enter pre-operational.
    EnterPreOperational = 0x80,
    /// 129 (0x81) Reset node (application and communication).
    ResetNode = 0x81,
    /// 130 (0x82) Reset communication.
    ResetCommunication = 0x82,
}

impl NmtCommand {
    /// The command frame for one node, or for all nodes when `node` is `None`.
    pub fn frame(self, node: Option<NodeId>) -> Frame {
        Frame::known(cob::NMT, &[self as u8, node.map_or(0, NodeId::get)])
    }
}

/// NMT states as reported in heartbeat messages (CiA 301 v4.2, table 54).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NmtState {
    /// 0 (0x00) Boot-up.
    BootUp,
    /// 4 (0x04) Stopped.
    Stopped,
    /// 5 (0x05) Operational.
    Operational,
    /// 127 (0x7F) Pre-operational.
    PreOperational,
    /// A value the standard does not define (kept, not refused).
    Unknown(u8),
}

impl NmtState {
    pub fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::BootUp,
            0x04 => Self::Stopped,
            0x05 => Self::Operational,
            0x7F => Self::PreOperational,
            _ => Self::Unknown(b),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BootUp => "boot_up",
            Self::Stopped => "stopped",
            Self::Operational => "operational",
            Self::PreOperational => "pre_operational",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// A heartbeat or boot-up message: 0x700 + node, exactly one byte. (Node guarding, whose
/// replies carry a toggle in bit 7, is not used: a set bit 7 decodes as `Unknown`.)
/// `None` for anything else.
pub fn parse_error_control(frame: &Frame) -> Option<(NodeId, NmtState)> {
    let node = NodeId::from_cob_id(frame.id(), cob::HEARTBEAT)?;
    match frame.data() {
        [state] => Some((node, NmtState::from_byte(*state))),
        _ => None,
    }
}

/// The node of a boot-up message (0x700 + node, data `[0x00]`), if `frame` is one.
pub fn boot_up_node(frame: &Frame) -> Option<NodeId> {
    let node = NodeId::from_cob_id(frame.id(), cob::HEARTBEAT)?;
    (frame.data() == [0x00]).then_some(node)
}

#[derive(Debug, Clone)]
struct Entry {
    node: NodeId,
    last_state: Option<NmtState>,
    boots: u32,
}

/// The configured nodes of one bus and the NMT commands they need.
///
/// `handle_frame` for what arrives; `poll_transmit` for the commands to send.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    nodes: Vec<Entry>,
    transmit: VecDeque<Frame>,
}

impl NodeTable {
    /// A table of the configured nodes (duplicates are kept once).
    pub fn new(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        let mut table = Self::default();
        for node in nodes {
            if !table.nodes.iter().any(|e| e.node == node) {
                table.nodes.push(Entry {
                    node,
                    last_state: None,
                    boots: 0,
                });
            }
        }
        table
    }

    /// Adds a configured node (a reload) and queues its start command.
    pub fn add(&mut self, node: NodeId) {
        if !self.nodes.iter().any(|e| e.node == node) {
            self.nodes.push(Entry {
                node,
                last_state: None,
                boots: 0,
            });
        }
        self.transmit.push_back(NmtCommand::Start.frame(Some(node)));
    }

    /// Forgets a node that left the config (it is not stopped: another master may own it).
    pub fn remove(&mut self, node: NodeId) {
        self.nodes.retain(|e| e.node != node);
    }

    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().map(|e| e.node)
    }

    /// Queues a start command for every configured node (addressed one by one, so nodes
    /// on the bus that are not ours are left alone).
    pub fn start_all(&mut self) {
        for e in &self.nodes {
            self.transmit
                .push_back(NmtCommand::Start.frame(Some(e.node)));
        }
    }

    /// Feeds a received frame. Returns the node when it is a boot-up message of a
    /// configured node; a start command for that node is then queued.
    pub fn handle_frame(&mut self, frame: &Frame) -> Option<NodeId> {
        let (node, state) = parse_error_control(frame)?;
        let entry = self.nodes.iter_mut().find(|e| e.node == node)?;
        entry.last_state = Some(state);
        if state != NmtState::BootUp {
            return None;
        }
        entry.boots = entry.boots.saturating_add(1);
        self.transmit.push_back(NmtCommand::Start.frame(Some(node)));
        Some(node)
    }

    /// The next NMT frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The NMT state a configured node last reported.
    pub fn state(&self, node: NodeId) -> Option<NmtState> {
        self.nodes.iter().find(|e| e.node == node)?.last_state
    }

    /// How many boot-up messages a configured node has sent since start-up.
    pub fn boots(&self, node: NodeId) -> u32 {
        self.nodes
            .iter()
            .find(|e| e.node == node)
            .map_or(0, |e| e.boots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn frame(id: u16, data: &[u8]) -> Frame {
        Frame::new(id, data).unwrap()
    }

    #[test]
    fn nmt_commands_are_two_bytes_on_cob_id_zero() {
        // CiA 301 v4.2, 7.2.8.3.1: [command specifier, node id].
        assert_eq!(
            NmtCommand::Start.frame(Some(n(5))),
            frame(0x000, &[0x01, 0x05])
        );
        assert_eq!(
            NmtCommand::Stop.frame(Some(n(5))),
            frame(0x000, &[0x02, 0x05])
        );
        assert_eq!(
            NmtCommand::EnterPreOperational.frame(None),
            frame(0x000, &[0x80, 0x00])
        );
        assert_eq!(
            NmtCommand::ResetNode.frame(Some(n(127))),
            frame(0, &[0x81, 0x7F])
        );
        assert_eq!(
            NmtCommand::ResetCommunication.frame(None),
            frame(0, &[0x82, 0])
        );
    }

    #[test]
    fn a_boot_up_message_is_0x700_plus_node_with_a_single_zero_byte() {
        assert_eq!(boot_up_node(&frame(0x705, &[0x00])), Some(n(5)));
        assert_eq!(boot_up_node(&frame(0x705, &[0x05])), None);
        assert_eq!(boot_up_node(&frame(0x705, &[])), None);
        assert_eq!(boot_up_node(&frame(0x700, &[0x00])), None);
        assert_eq!(boot_up_node(&frame(0x605, &[0x00])), None);
    }

    #[test]
    fn start_all_queues_one_start_per_configured_node() {
        let mut table = NodeTable::new([n(1), n(2), n(1)]);
        table.start_all();
        assert_eq!(table.poll_transmit(), Some(frame(0, &[0x01, 1])));
        assert_eq!(table.poll_transmit(), Some(frame(0, &[0x01, 2])));
        assert_eq!(table.poll_transmit(), None);
    }

    #[test]
    fn a_configured_node_that_boots_is_started_again() {
        // Given a table with node 3, started
        let mut table = NodeTable::new([n(3)]);
        table.start_all();
        while table.poll_transmit().is_some() {}
        // When node 3 sends its boot-up message
        let booted = table.handle_frame(&frame(0x703, &[0x00]));
        // Then a start for node 3 goes out
        assert_eq!(booted, Some(n(3)));
        assert_eq!(table.poll_transmit(), Some(frame(0, &[0x01, 3])));
        assert_eq!(table.boots(n(3)), 1);
        assert_eq!(table.state(n(3)), Some(NmtState::BootUp));
    }

    #[test]
    fn an_unconfigured_node_booting_is_left_alone() {
        let mut table = NodeTable::new([n(3)]);
        assert_eq!(table.handle_frame(&frame(0x704, &[0x00])), None);
        assert_eq!(table.poll_transmit(), None);
    }

    #[test]
    fn heartbeats_update_the_last_nmt_state_without_a_restart() {
        let mut table = NodeTable::new([n(3)]);
        assert_eq!(table.handle_frame(&frame(0x703, &[0x05])), None);
        assert_eq!(table.state(n(3)), Some(NmtState::Operational));
        assert_eq!(table.poll_transmit(), None);
    }
}
