//! Heartbeat consumer (CiA 301 v4.2, 7.2.8.3.2.2).
//!
//! Each node produces a 1-byte heartbeat (its NMT state) on 0x700 + node every producer
//! time. A node is `offline` once 1.5 x its producer time has passed without one, and
//! `online` again at the next. A boot-up message counts as a heartbeat (the node is alive).
//! A node that never sends anything goes `offline` 1.5 x producer time after it was added.
//!
//! `handle_frame` for heartbeats, `poll_timeout` for when to wake, `handle_timeout` at that
//! time; both return the availability transitions, never the same state twice in a row.

use std::time::{Duration, Instant};

use servogate_core::AvailabilityState;

use crate::frame::{cob, Frame, NodeId};
use crate::nmt::{parse_error_control, NmtState};

/// A node's availability changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvailabilityChange {
    pub node: NodeId,
    pub state: AvailabilityState,
    /// The NMT state in the heartbeat that brought the node back (`None` for `offline`).
    pub nmt_state: Option<NmtState>,
}

#[derive(Debug, Clone)]
struct Consumer {
    node: NodeId,
    producer_time: Duration,
    /// When the node goes offline unless a heartbeat comes first; `None` once offline.
    deadline: Option<Instant>,
    state: Option<AvailabilityState>,
}

/// Heartbeat consumer for the nodes of one bus.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatConsumer {
    nodes: Vec<Consumer>,
    malformed: u64,
}

/// 1.5 x producer time, saturating (CiA 301 leaves the consumer time to the integrator;
/// DESIGN.md section 5 fixes 1.5 x).
pub fn consumer_time(producer_time: Duration) -> Duration {
    producer_time.saturating_mul(3) / 2
}

impl HeartbeatConsumer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Watches `node`, whose producer time is `producer_time` (from config). A zero
    /// producer time means the node sends no heartbeat: it is never declared offline.
    /// Adding a node again replaces its producer time and restarts its watch.
    pub fn add(&mut self, node: NodeId, producer_time: Duration, now: Instant) {
        let deadline = deadline(producer_time, now);
        match self.nodes.iter_mut().find(|c| c.node == node) {
            Some(c) => {
                c.producer_time = producer_time;
                c.deadline = deadline;
            }
            None => self.nodes.push(Consumer {
                node,
                producer_time,
                deadline,
                state: None,
            }),
        }
    }

    /// Stops watching `node` (it left the config).
    pub fn remove(&mut self, node: NodeId) {
        self.nodes.retain(|c| c.node != node);
    }

    /// The availability last reported for `node` (`None` before the first transition).
    pub fn state(&self, node: NodeId) -> Option<AvailabilityState> {
        self.nodes.iter().find(|c| c.node == node)?.state
    }

    /// Heartbeat frames that were not one byte long.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Feeds a received frame. Returns `online` when a watched node's heartbeat arrives
    /// and the node was not online.
    pub fn handle_frame(&mut self, frame: &Frame, now: Instant) -> Option<AvailabilityChange> {
        let Some((node, nmt_state)) = parse_error_control(frame) else {
            if NodeId::from_cob_id(frame.id(), cob::HEARTBEAT).is_some() {
                self.malformed += 1;
            }
            return None;
        };
        let c = self.nodes.iter_mut().find(|c| c.node == node)?;
        c.deadline = deadline(c.producer_time, now);
        if c.state == Some(AvailabilityState::Online) {
            return None;
        }
        c.state = Some(AvailabilityState::Online);
        Some(AvailabilityChange {
            node,
            state: AvailabilityState::Online,
            nmt_state: Some(nmt_state),
        })
    }

    /// The earliest time a node may go offline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.nodes.iter().filter_map(|c| c.deadline).min()
    }

    /// Marks offline every node whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<AvailabilityChange> {
        let mut changes = Vec::new();
        for c in &mut self.nodes {
            if c.deadline.is_some_and(|d| d <= now) {
                c.deadline = None;
                if c.state != Some(AvailabilityState::Offline) {
                    c.state = Some(AvailabilityState::Offline);
                    changes.push(AvailabilityChange {
                        node: c.node,
                        state: AvailabilityState::Offline,
                        nmt_state: None,
                    });
                }
            }
        }
        changes
    }
}

fn deadline(producer_time: Duration, now: Instant) -> Option<Instant> {
    if producer_time.is_zero() {
        return None;
    }
    now.checked_add(consumer_time(producer_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn hb(node: u8, state: u8) -> Frame {
        Frame::new(0x700 + u16::from(node), &[state]).unwrap()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_heartbeat_brings_a_node_online() {
        let t0 = Instant::now();
        let mut hb_c = HeartbeatConsumer::new();
        hb_c.add(n(1), 100 * MS, t0);
        let change = hb_c.handle_frame(&hb(1, 0x05), t0 + 10 * MS);
        assert_eq!(
            change,
            Some(AvailabilityChange {
                node: n(1),
                state: AvailabilityState::Online,
                nmt_state: Some(NmtState::Operational),
            })
        );
        // A second heartbeat is no transition.
        assert_eq!(hb_c.handle_frame(&hb(1, 0x05), t0 + 110 * MS), None);
    }

    #[test]
    fn heartbeat_timeout_marks_node_offline_after_one_and_a_half_producer_times() {
        // Given node 1 online with a 100 ms producer time, last heartbeat at t0
        let t0 = Instant::now();
        let mut c = HeartbeatConsumer::new();
        c.add(n(1), 100 * MS, t0);
        c.handle_frame(&hb(1, 0x05), t0);
        // Then the wake-up is at t0 + 150 ms
        assert_eq!(c.poll_timeout(), Some(t0 + 150 * MS));
        // When 149 ms pass, nothing happens
        assert!(c.handle_timeout(t0 + 149 * MS).is_empty());
        // When 150 ms pass, the node is offline, once
        let changes = c.handle_timeout(t0 + 150 * MS);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].state, AvailabilityState::Offline);
        assert!(c.handle_timeout(t0 + 500 * MS).is_empty());
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn an_offline_node_comes_back_online_at_its_next_heartbeat() {
        let t0 = Instant::now();
        let mut c = HeartbeatConsumer::new();
        c.add(n(2), 100 * MS, t0);
        c.handle_frame(&hb(2, 0x05), t0);
        c.handle_timeout(t0 + 200 * MS);
        assert_eq!(c.state(n(2)), Some(AvailabilityState::Offline));
        let back = c.handle_frame(&hb(2, 0x7F), t0 + 300 * MS).unwrap();
        assert_eq!(back.state, AvailabilityState::Online);
        assert_eq!(back.nmt_state, Some(NmtState::PreOperational));
        assert_eq!(c.poll_timeout(), Some(t0 + 450 * MS));
    }

    #[test]
    fn a_node_that_never_sends_a_heartbeat_goes_offline() {
        let t0 = Instant::now();
        let mut c = HeartbeatConsumer::new();
        c.add(n(3), 200 * MS, t0);
        let changes = c.handle_timeout(t0 + 300 * MS);
        assert_eq!(changes[0].node, n(3));
        assert_eq!(changes[0].state, AvailabilityState::Offline);
    }

    #[test]
    fn regular_heartbeats_keep_a_node_online() {
        let t0 = Instant::now();
        let mut c = HeartbeatConsumer::new();
        c.add(n(1), 100 * MS, t0);
        for i in 0..20u32 {
            let t = t0 + i * 100 * MS;
            c.handle_frame(&hb(1, 0x05), t);
            assert!(c.handle_timeout(t + 99 * MS).is_empty());
        }
    }

    #[test]
    fn a_zero_producer_time_disables_the_watch() {
        let t0 = Instant::now();
        let mut c = HeartbeatConsumer::new();
        c.add(n(1), Duration::ZERO, t0);
        assert_eq!(c.poll_timeout(), None);
        assert!(c.handle_timeout(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn a_heartbeat_of_the_wrong_length_is_counted_and_ignored() {
        let t0 = Instant::now();
        let mut c = HeartbeatConsumer::new();
        c.add(n(1), 100 * MS, t0);
        let bad = Frame::new(0x701, &[0x05, 0x00]).unwrap();
        assert_eq!(c.handle_frame(&bad, t0), None);
        assert_eq!(c.malformed(), 1);
        assert_eq!(c.state(n(1)), None);
    }

    #[test]
    fn heartbeats_of_unwatched_nodes_are_ignored() {
        let t0 = Instant::now();
        let mut c = HeartbeatConsumer::new();
        c.add(n(1), 100 * MS, t0);
        assert_eq!(c.handle_frame(&hb(9, 0x05), t0), None);
    }
}
