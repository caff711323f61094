//! `servosim canopen`: simulated CiA 402 servo drives on one SocketCAN interface.
//!
//! Each node of a [`CanSim`] is a CANopen slave as servogate meets it on a real bus: boot-up
//! message, NMT, heartbeat producer, an SDO server (expedited and segmented), three TPDOs
//! on a timer or on SYNC, EMCY, and the CiA 402 state machine driven by the controlword.
//! The values come from the same deterministic model as the Modbus simulator
//! ([`crate::model::drive_sample`]), in the same resolutions, so a test recomputes what a
//! TPDO carried from the model time TPDO3 carries with it. README.md has the object
//! dictionary and the console commands.
//!
//! - [`CanSim`]: the sans-IO core. [`CanSim::handle_frame`] for what arrives,
//!   [`CanSim::poll`] for what is due, [`CanSim::poll_timeout`] for when to call it next;
//!   time is passed in (quinn-proto's shape), so unit tests need no socket.
//! - [`drive`]: one node (NMT, heartbeat, CiA 402, TPDO, EMCY); [`od`]: its object
//!   dictionary; [`sdo`]: its SDO server, with its own framing (it checks the gateway's
//!   client rather than mirroring it).
//! - [`io`]: the tokio task that owns the CAN socket; [`console`]: the stdin commands.
//!
//! RPDO1 carries the controlword (0x200 + node, synchronous by default: acted on at the
//! next SYNC), so a master can load several drives' set-points and start them in one SYNC
//! cycle; `stats` says at which SYNC each node last took a set-point that way.
//!
//! It does not do: SDO block transfer, RPDOs 2-4, node guarding (RTR), LSS, 29-bit ids,
//! CAN FD, or writable PDO mappings.

pub mod console;
pub mod drive;
pub mod io;
pub mod od;
pub mod sdo;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

pub use drive::{Cia402State, NmtState, NodeDefaults, NodeTruth, TpdoMode};
pub use io::{serve_can, ConsoleRequest};

use crate::units::UnitList;
use crate::SimError;
use drive::Node;

/// COB-IDs of the CiA 301 predefined connection set (CiA 301 v4.2, 7.3.3), plus the
/// simulator's flood id.
pub mod cob {
    pub const NMT: u16 = 0x000;
    pub const SYNC: u16 = 0x080;
    /// EMCY of node n: 0x080 + n.
    pub const EMCY: u16 = 0x080;
    pub const TPDO1: u16 = 0x180;
    /// RPDO1 of node n (the controlword here): 0x200 + n.
    pub const RPDO1: u16 = 0x200;
    pub const TPDO2: u16 = 0x280;
    pub const TPDO3: u16 = 0x380;
    pub const TPDO4: u16 = 0x480;
    /// SDO server to client: 0x580 + n.
    pub const SDO_TX: u16 = 0x580;
    /// SDO client to server: 0x600 + n.
    pub const SDO_RX: u16 = 0x600;
    /// Boot-up and heartbeat of node n: 0x700 + n.
    pub const HEARTBEAT: u16 = 0x700;
    /// Filler frames of `flood`: outside every node's range (0x7F0 would be the
    /// heartbeat of node 240, which cannot exist).
    pub const FLOOD: u16 = 0x7F0;
}

/// Lowest CANopen node id.
pub const FIRST_NODE: u8 = 1;
/// Highest CANopen node id (CiA 301 v4.2, 7.3.3: 1-127).
pub const LAST_NODE: u8 = 127;
/// Highest `flood` rate accepted, frames/s (a 1 Mbit/s bus carries about 8,000).
pub const MAX_FLOOD_RATE: u32 = 1_000_000;
/// Most flood frames one [`CanSim::poll`] returns: when the loop falls behind, the flood
/// thins out instead of piling up.
const MAX_FLOOD_BURST: u64 = 256;

/// A classic CAN data frame with an 11-bit identifier, as the simulator sees it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frame {
    id: u16,
    len: u8,
    data: [u8; 8],
}

impl Frame {
    /// A frame; `None` when `id` is above 0x7FF or `data` longer than 8 bytes.
    pub fn new(id: u16, data: &[u8]) -> Option<Self> {
        if id > 0x7FF || data.len() > 8 {
            return None;
        }
        let mut d = [0u8; 8];
        d[..data.len()].copy_from_slice(data);
        Some(Self {
            id,
            len: data.len() as u8,
            data: d,
        })
    }

    /// One of the simulator's own frames, whose ids and lengths are right by
    /// construction; an impossible one is clipped rather than a panic.
    pub(crate) fn ours(id: u16, data: &[u8]) -> Self {
        let data = &data[..data.len().min(8)];
        Self::new(id & 0x7FF, data).unwrap_or(Self {
            id: 0,
            len: 0,
            data: [0; 8],
        })
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn data(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }
}

/// candump's notation: `181#3702A0860100FA00`.
impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03X}#", self.id)?;
        for b in self.data() {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// What `servosim canopen` simulates (its command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanOptions {
    /// Node ids, 1-127.
    pub nodes: UnitList,
    pub defaults: NodeDefaults,
    /// Nodes that start silent (no boot-up, nothing at all until `alive`).
    pub silent: Vec<u8>,
    /// Nodes that start in Fault with this error code.
    pub faults: Vec<(u8, u16)>,
}

impl CanOptions {
    pub fn new(nodes: UnitList) -> Self {
        Self {
            nodes,
            defaults: NodeDefaults::default(),
            silent: Vec::new(),
            faults: Vec::new(),
        }
    }
}

/// A snapshot of the counters (the console's `stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanStats {
    /// Frames received.
    pub rx: u64,
    /// Frames written to the socket.
    pub tx: u64,
    /// Writes refused with ENOBUFS (the interface's queue was full).
    pub enobufs: u64,
    /// SDO requests answered (aborts included).
    pub sdo: u64,
    /// SDO aborts sent.
    pub aborts: u64,
    /// Frames given up: the outgoing queue was full, or a write failed for another reason.
    pub dropped: u64,
    /// TPDO frames sent, per node.
    pub tpdo: BTreeMap<u8, u64>,
    /// SDO downloads begun, per node (each initiate download request, an abort included).
    pub downloads: BTreeMap<u8, u64>,
    /// SDO downloads whose value was written into the node's dictionary, per node.
    pub applied: BTreeMap<u8, u64>,
    /// SYNC frames received.
    pub syncs: u64,
    /// RPDO frames taken, per node.
    pub rpdo: BTreeMap<u8, u64>,
    /// The SYNC number (1 = the first since start) at which each node last took a
    /// set-point sent by RPDO; 0: never.
    pub started: BTreeMap<u8, u64>,
}

#[derive(Debug, Clone)]
struct Flood {
    rate: u32,
    start: Instant,
    until: Instant,
    sent: u64,
}

impl Flood {
    /// When frame number `n` is due: computed from the start, so no rounding piles up.
    fn due(&self, n: u64) -> Instant {
        let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.rate.max(1));
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// The simulated nodes of one CAN interface: the sans-IO core of `servosim canopen`.
#[derive(Debug, Clone)]
pub struct CanSim {
    start: Instant,
    nodes: BTreeMap<u8, Node>,
    /// Frames caused outside `handle_frame` (power-on, console commands), handed out by
    /// the next `poll`.
    pending: Vec<Frame>,
    flood: Option<Flood>,
    stats: CanStats,
}

impl CanSim {
    /// Powers the nodes on at `start` (model time 0): each queues its boot-up message
    /// (and the EMCY of a `faults` entry) for the first [`Self::poll`].
    pub fn new(options: &CanOptions, start: Instant) -> Result<Self, SimError> {
        if let Some(bad) = options.nodes.iter().find(|&n| n > LAST_NODE) {
            return Err(SimError::BadUnitList(format!(
                "node {bad} is outside {FIRST_NODE}-{LAST_NODE}"
            )));
        }
        let check = |n: u8| {
            if options.nodes.contains(n) {
                Ok(())
            } else {
                Err(SimError::UnknownNode(n))
            }
        };
        for &n in &options.silent {
            check(n)?;
        }
        for &(n, _) in &options.faults {
            check(n)?;
        }
        let mut pending = Vec::new();
        let nodes = options
            .nodes
            .iter()
            .map(|id| {
                let fault = options
                    .faults
                    .iter()
                    .rev()
                    .find(|(n, _)| *n == id)
                    .map(|&(_, c)| c);
                let silent = options.silent.contains(&id);
                let mut node = Node::new(id, options.defaults, fault, silent);
                node.power_on(start, &mut pending);
                (id, node)
            })
            .collect();
        Ok(Self {
            start,
            nodes,
            pending,
            flood: None,
            stats: CanStats::default(),
        })
    }

    /// Model time at `at`: ms since the simulator started, wrapping after about 49.7 days
    /// like the u32 of 0x2000.
    pub fn t_ms_at(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.start).as_millis() as u32
    }

    /// The node ids.
    pub fn node_ids(&self) -> impl Iterator<Item = u8> + '_ {
        self.nodes.keys().copied()
    }

    /// Handles one frame from the bus that arrived at `now`; returns the answers. Frames
    /// for nobody here, and malformed ones, are ignored.
    pub fn handle_frame(&mut self, frame: &Frame, now: Instant) -> Vec<Frame> {
        self.stats.rx += 1;
        let t_ms = self.t_ms_at(now);
        let mut out = Vec::new();
        let id = frame.id();
        match id {
            // NMT is always 2 bytes: command, node (0 = all).
            cob::NMT => {
                if let &[command, target] = frame.data() {
                    for node in self.nodes.values_mut() {
                        if target == 0 || target == node.id() {
                            node.handle_nmt(command, now, t_ms, &mut out);
                        }
                    }
                }
            }
            // SYNC: no data, or a one-byte counter (CiA 301 v4.2, 7.2.5.3.1).
            cob::SYNC if frame.data().len() <= 1 => {
                self.stats.syncs += 1;
                let sync = self.stats.syncs;
                for node in self.nodes.values_mut() {
                    node.handle_sync(sync, t_ms, &mut out);
                }
            }
            _ if (cob::SDO_RX + 1..=cob::SDO_RX + u16::from(LAST_NODE)).contains(&id) => {
                let target = (id - cob::SDO_RX) as u8;
                if let Some(node) = self.nodes.get_mut(&target) {
                    if let Some(aborted) = node.handle_sdo(frame.data(), now, t_ms, &mut out) {
                        self.stats.sdo += 1;
                        self.stats.aborts += u64::from(aborted);
                    }
                }
            }
            _ => {
                for node in self.nodes.values_mut() {
                    if node.rpdo_cob() == Some(id) {
                        node.handle_rpdo(frame.data(), t_ms, &mut out);
                    }
                }
            }
        }
        out
    }

    /// Counts a frame that could not be handed to [`Self::handle_frame`] (a remote,
    /// error or 29-bit frame).
    pub fn count_rx_other(&mut self) {
        self.stats.rx += 1;
    }

    /// Frames due at `now`: queued ones first, then heartbeats and TPDOs node by node,
    /// then flood frames.
    pub fn poll(&mut self, now: Instant) -> Vec<Frame> {
        let t_ms = self.t_ms_at(now);
        let mut out = std::mem::take(&mut self.pending);
        for node in self.nodes.values_mut() {
            node.poll(now, t_ms, &mut out);
        }
        if let Some(flood) = &mut self.flood {
            let mut burst = 0;
            while burst < MAX_FLOOD_BURST && flood.due(flood.sent) <= now {
                if flood.due(flood.sent) >= flood.until {
                    break;
                }
                out.push(Frame::ours(cob::FLOOD, &flood.sent.to_le_bytes()));
                flood.sent += 1;
                burst += 1;
            }
            if burst == MAX_FLOOD_BURST && flood.due(flood.sent) <= now {
                // Behind by more than a burst: drop the backlog rather than chase it.
                let behind = now.saturating_duration_since(flood.start);
                flood.sent = (behind.as_nanos() * u128::from(flood.rate) / 1_000_000_000) as u64;
            }
            if flood.due(flood.sent) >= flood.until {
                tracing::info!(frames = flood.sent, "flood over");
                self.flood = None;
            }
        }
        out
    }

    /// When [`Self::poll`] has something to send next (`now`-ish when frames are queued).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.pending.is_empty() {
            return Some(self.start);
        }
        let flood = self.flood.as_ref().map(|f| f.due(f.sent));
        self.nodes
            .values()
            .filter_map(Node::poll_timeout)
            .chain(flood)
            .min()
    }

    fn node(&mut self, id: u8) -> Result<&mut Node, SimError> {
        self.nodes.get_mut(&id).ok_or(SimError::UnknownNode(id))
    }

    /// `silent N` / `alive N`.
    pub fn set_silent(&mut self, id: u8, silent: bool, now: Instant) -> Result<(), SimError> {
        self.node(id)?.set_silent(silent, now);
        Ok(())
    }

    /// `fault N CODE`: Fault, 0x603F = code, EMCY (queued for the next poll). Code 0
    /// clears.
    pub fn inject_fault(&mut self, id: u8, code: u16, now: Instant) -> Result<(), SimError> {
        let t_ms = self.t_ms_at(now);
        let mut out = std::mem::take(&mut self.pending);
        let result = self.node(id).map(|n| n.inject_fault(code, t_ms, &mut out));
        self.pending = out;
        result
    }

    /// `clear N`: EMCY error reset, back to the start state.
    pub fn clear_fault(&mut self, id: u8, now: Instant) -> Result<(), SimError> {
        self.inject_fault(id, 0, now)
    }

    /// `abort N CODE` (`Some`) / `noabort N` (`None`): every SDO download to node `id` is
    /// answered with abort `code` and applies nothing.
    pub fn set_abort(&mut self, id: u8, code: Option<u32>) -> Result<(), SimError> {
        self.node(id)?.set_abort(code);
        Ok(())
    }

    /// `reboot N`: as NMT reset node.
    pub fn reboot(&mut self, id: u8, now: Instant) -> Result<(), SimError> {
        let t_ms = self.t_ms_at(now);
        let mut out = std::mem::take(&mut self.pending);
        let result = self.node(id).map(|n| n.reset_node(now, t_ms, &mut out));
        self.pending = out;
        result
    }

    /// `flood RATE DURATION`: filler frames on 0x7F0 at `rate` frames/s from `now` on;
    /// replaces a flood still running.
    pub fn start_flood(&mut self, rate: u32, duration: Duration, now: Instant) {
        self.flood = Some(Flood {
            rate: rate.clamp(1, MAX_FLOOD_RATE),
            start: now,
            until: now + duration,
            sent: 0,
        });
    }

    /// True while a flood runs.
    pub fn is_flooding(&self) -> bool {
        self.flood.is_some()
    }

    /// Node `id` at `now`.
    pub fn truth(&self, id: u8, now: Instant) -> Option<NodeTruth> {
        let t_ms = self.t_ms_at(now);
        self.nodes.get(&id).map(|n| n.truth(t_ms))
    }

    /// The process values node `id` would send at `now`.
    pub fn process_values(&self, id: u8, now: Instant) -> Option<od::ProcessValues> {
        let t_ms = self.t_ms_at(now);
        self.nodes.get(&id).map(|n| n.process_values(t_ms))
    }

    pub fn stats(&self) -> CanStats {
        CanStats {
            tpdo: self
                .nodes
                .iter()
                .map(|(&id, n)| (id, n.tpdo_sent()))
                .collect(),
            downloads: self
                .nodes
                .iter()
                .map(|(&id, n)| (id, n.downloads()))
                .collect(),
            applied: self
                .nodes
                .iter()
                .map(|(&id, n)| (id, n.applied()))
                .collect(),
            rpdo: self.nodes.iter().map(|(&id, n)| (id, n.rpdos())).collect(),
            started: self
                .nodes
                .iter()
                .map(|(&id, n)| (id, n.started_at_sync().unwrap_or(0)))
                .collect(),
            ..self.stats.clone()
        }
    }

    /// Counters the IO loop keeps.
    pub fn count_sent(&mut self) {
        self.stats.tx += 1;
    }

    pub fn count_enobufs(&mut self) {
        self.stats.enobufs += 1;
    }

    pub fn count_dropped(&mut self, n: u64) {
        self.stats.dropped += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;

    const MS: Duration = Duration::from_millis(1);

    fn sim(nodes: &str) -> (CanSim, Instant) {
        let t0 = Instant::now();
        let sim = CanSim::new(&CanOptions::new(nodes.parse().unwrap()), t0).unwrap();
        (sim, t0)
    }

    fn f(id: u16, data: &[u8]) -> Frame {
        Frame::new(id, data).unwrap()
    }

    fn ids(frames: &[Frame]) -> Vec<u16> {
        frames.iter().map(Frame::id).collect()
    }

    /// A minimal SDO client, written apart from the server: uploads `index:sub` from
    /// `node`, expedited or segmented, and returns the bytes or the abort code.
    fn upload(
        sim: &mut CanSim,
        node: u8,
        index: u16,
        sub: u8,
        now: Instant,
    ) -> Result<Vec<u8>, u32> {
        let i = index.to_le_bytes();
        let tx = 0x580 + u16::from(node);
        let rx = 0x600 + u16::from(node);
        let answer = |out: Vec<Frame>| -> [u8; 8] {
            let r = out.iter().find(|f| f.id() == tx).expect("an SDO answer");
            r.data().try_into().expect("8 bytes")
        };
        let r = answer(sim.handle_frame(&f(rx, &[0x40, i[0], i[1], sub, 0, 0, 0, 0]), now));
        match r[0] {
            0x80 => return Err(u32::from_le_bytes([r[4], r[5], r[6], r[7]])),
            cs if cs & 0xE2 == 0x42 => {
                let n = if cs & 1 != 0 {
                    usize::from((cs >> 2) & 3)
                } else {
                    0
                };
                return Ok(r[4..8 - n].to_vec());
            }
            0x41 => {}
            other => panic!("unexpected initiate answer {other:#04x}"),
        }
        let size = u32::from_le_bytes([r[4], r[5], r[6], r[7]]) as usize;
        let mut data = Vec::new();
        let mut toggle = 0;
        loop {
            let r = answer(sim.handle_frame(&f(rx, &[0x60 | toggle, 0, 0, 0, 0, 0, 0, 0]), now));
            if r[0] == 0x80 {
                return Err(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
            }
            assert_eq!(r[0] & 0x10, toggle);
            let n = usize::from((r[0] >> 1) & 7);
            data.extend_from_slice(&r[1..8 - n]);
            toggle ^= 0x10;
            if r[0] & 1 != 0 {
                break;
            }
        }
        assert_eq!(data.len(), size);
        Ok(data)
    }

    #[test]
    fn every_node_boots_in_pre_operational_with_a_boot_up_message() {
        let (mut sim, t0) = sim("1-4");
        assert_eq!(sim.poll_timeout(), Some(t0));
        let out = sim.poll(t0);
        assert_eq!(ids(&out), [0x701, 0x702, 0x703, 0x704]);
        assert!(out.iter().all(|f| f.data() == [0x00]));
        assert_eq!(sim.poll_timeout(), Some(t0 + 100 * MS));
        assert_eq!(sim.truth(3, t0).unwrap().nmt, NmtState::PreOperational);
    }

    #[test]
    fn node_ids_above_127_and_unknown_fault_nodes_are_refused() {
        let t0 = Instant::now();
        let opts = CanOptions::new("1,128".parse().unwrap());
        assert!(CanSim::new(&opts, t0).is_err());
        let mut opts = CanOptions::new("1-2".parse().unwrap());
        opts.faults.push((3, 0x2310));
        assert_eq!(
            CanSim::new(&opts, t0).unwrap_err(),
            SimError::UnknownNode(3)
        );
    }

    #[test]
    fn nmt_to_one_node_or_to_all_and_malformed_nmt_is_ignored() {
        let (mut sim, t0) = sim("1-3");
        sim.poll(t0);
        sim.handle_frame(&f(0x000, &[0x01, 2]), t0);
        let nmt = |sim: &CanSim| {
            (1..=3)
                .map(|n| sim.truth(n, t0).unwrap().nmt)
                .collect::<Vec<_>>()
        };
        use NmtState::*;
        assert_eq!(nmt(&sim), [PreOperational, Operational, PreOperational]);
        sim.handle_frame(&f(0x000, &[0x01, 0]), t0);
        assert_eq!(nmt(&sim), [Operational; 3]);
        sim.handle_frame(&f(0x000, &[0x02]), t0);
        sim.handle_frame(&f(0x000, &[0x02, 0, 0]), t0);
        sim.handle_frame(&f(0x000, &[0x02, 9]), t0);
        assert_eq!(nmt(&sim), [Operational; 3]);
        sim.handle_frame(&f(0x000, &[0x02, 0]), t0);
        assert_eq!(nmt(&sim), [Stopped; 3]);
        // Reset node: boot-up again, pre-operational
        let out = sim.handle_frame(&f(0x000, &[0x81, 3]), t0);
        assert_eq!(out, [f(0x703, &[0])]);
        assert_eq!(nmt(&sim), [Stopped, Stopped, PreOperational]);
        let out = sim.handle_frame(&f(0x000, &[0x82, 0]), t0);
        assert_eq!(ids(&out), [0x701, 0x702, 0x703]);
    }

    #[test]
    fn the_heartbeat_comes_every_producer_time_and_not_in_bursts_after_a_stall() {
        let (mut sim, t0) = sim("1");
        sim.poll(t0);
        let beats =
            |sim: &mut CanSim, at| sim.poll(at).into_iter().filter(|f| f.id() == 0x701).count();
        assert_eq!(beats(&mut sim, t0 + 100 * MS), 1);
        assert_eq!(beats(&mut sim, t0 + 150 * MS), 0);
        assert_eq!(beats(&mut sim, t0 + 200 * MS), 1);
        // A loop that slept for a second sends one heartbeat, not ten
        assert_eq!(beats(&mut sim, t0 + 1_200 * MS), 1);
        assert_eq!(sim.poll_timeout(), Some(t0 + 1_300 * MS));
    }

    #[test]
    fn sdo_uploads_read_the_dictionary_expedited_and_segmented() {
        let (mut sim, t0) = sim("1-2");
        let now = t0 + 5 * MS;
        assert_eq!(
            upload(&mut sim, 1, 0x1008, 0, now).unwrap(),
            b"servosim CiA 402 drive"
        );
        assert_eq!(
            upload(&mut sim, 2, 0x1000, 0, now).unwrap(),
            0x0002_0192u32.to_le_bytes()
        );
        assert_eq!(upload(&mut sim, 2, 0x1018, 0, now).unwrap(), [4]);
        assert_eq!(
            upload(&mut sim, 2, 0x1018, 1, now).unwrap(),
            0x539u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 2, 0x1018, 2, now).unwrap(),
            0x402u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 2, 0x1018, 3, now).unwrap(),
            0x0001_0000u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 2, 0x1018, 4, now).unwrap(),
            2u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 2, 0x1017, 0, now).unwrap(),
            100u16.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 1, 0x1800, 1, now).unwrap(),
            0x181u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 1, 0x1801, 1, now).unwrap(),
            0x281u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 1, 0x1802, 1, now).unwrap(),
            0x381u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 1, 0x1803, 1, now).unwrap(),
            0x8000_0481u32.to_le_bytes()
        );
        assert_eq!(upload(&mut sim, 1, 0x1800, 0, now).unwrap(), [5]);
        assert_eq!(upload(&mut sim, 1, 0x1800, 2, now).unwrap(), [0xFE]);
        assert_eq!(
            upload(&mut sim, 1, 0x1800, 5, now).unwrap(),
            10u16.to_le_bytes()
        );
        assert_eq!(upload(&mut sim, 1, 0x1A00, 0, now).unwrap(), [3]);
        assert_eq!(
            upload(&mut sim, 1, 0x1A01, 3, now).unwrap(),
            0x2010_0010u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 1, 0x1A02, 1, now).unwrap(),
            0x2000_0020u32.to_le_bytes()
        );
        assert_eq!(upload(&mut sim, 1, 0x1A03, 0, now).unwrap(), [0]);
        assert_eq!(
            upload(&mut sim, 1, 0x2000, 0, now).unwrap(),
            5u32.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 1, 0x6041, 0, now).unwrap(),
            0x0237u16.to_le_bytes()
        );
        assert_eq!(upload(&mut sim, 1, 0x6060, 0, now).unwrap(), [8]);
        assert_eq!(upload(&mut sim, 1, 0x6061, 0, now).unwrap(), [8]);
        assert_eq!(
            upload(&mut sim, 1, 0x6040, 0, now).unwrap(),
            0x000Fu16.to_le_bytes()
        );
        let v = sim.process_values(1, now).unwrap();
        assert_eq!(
            upload(&mut sim, 1, 0x6064, 0, now).unwrap(),
            v.position.to_le_bytes()
        );
        assert_eq!(
            upload(&mut sim, 1, 0x2011, 0, now).unwrap(),
            v.dc_bus_mv.to_le_bytes()
        );
        assert_eq!(upload(&mut sim, 1, 0x1234, 0, now), Err(0x0602_0000));
        assert_eq!(upload(&mut sim, 1, 0x6064, 1, now), Err(0x0609_0011));
        // A node that is not simulated does not answer at all
        assert!(sim
            .handle_frame(&f(0x605, &[0x40, 0, 0x10, 0, 0, 0, 0, 0]), now)
            .is_empty());
        let stats = sim.stats();
        assert_eq!((stats.sdo, stats.aborts), (32, 2));
    }

    #[test]
    fn a_download_to_the_controlword_drives_the_state_machine_and_a_read_only_write_aborts() {
        let (mut sim, t0) = sim("1");
        let out = sim.handle_frame(&f(0x601, &[0x2B, 0x40, 0x60, 0, 0x06, 0, 0, 0]), t0);
        assert_eq!(out, [f(0x581, &[0x60, 0x40, 0x60, 0, 0, 0, 0, 0])]);
        assert_eq!(
            sim.truth(1, t0).unwrap().state,
            Cia402State::ReadyToSwitchOn
        );
        assert_eq!(sim.truth(1, t0).unwrap().statusword, 0x0231);
        let out = sim.handle_frame(&f(0x601, &[0x2B, 0x41, 0x60, 0, 0x06, 0, 0, 0]), t0);
        assert_eq!(
            out,
            [f(0x581, &[0x80, 0x41, 0x60, 0, 0x02, 0x00, 0x01, 0x06])]
        );
        let out = sim.handle_frame(&f(0x601, &[0x23, 0x00, 0x1A, 1, 0, 0, 0, 0]), t0);
        assert_eq!(
            out,
            [f(0x581, &[0x80, 0x00, 0x1A, 1, 0x02, 0x00, 0x01, 0x06])]
        );
        // Target position is stored
        sim.handle_frame(
            &f(0x601, &[0x23, 0x7A, 0x60, 0, 0x18, 0xFC, 0xFF, 0xFF]),
            t0,
        );
        assert_eq!(
            upload(&mut sim, 1, 0x607A, 0, t0).unwrap(),
            (-1000i32).to_le_bytes()
        );
    }

    #[test]
    fn tpdos_in_operational_carry_the_model_at_the_t_ms_of_tpdo3() {
        let (mut sim, t0) = sim("1-2");
        sim.poll(t0);
        sim.handle_frame(&f(0x000, &[0x01, 0]), t0);
        let at = t0 + 10 * MS + Duration::from_micros(300);
        let out = sim.poll(at);
        assert_eq!(ids(&out), [0x181, 0x281, 0x381, 0x182, 0x282, 0x382]);
        for group in out.chunks(3) {
            let node = (group[0].id() - 0x180) as u8;
            let d: Vec<&[u8]> = group.iter().map(Frame::data).collect();
            let t = u32::from_le_bytes(d[2][0..4].try_into().unwrap());
            assert_eq!(t, 10);
            // Recompute with the model, as the vcan test and the gateway's tests do
            let s = model::drive_sample(node, t, &model::DriveState::running(t));
            let i32_at = |b: &[u8]| i32::from_le_bytes(b.try_into().unwrap());
            let i16_at = |b: &[u8]| i16::from_le_bytes(b.try_into().unwrap());
            assert_eq!(u16::from_le_bytes([d[0][0], d[0][1]]), 0x0237);
            assert_eq!(i32_at(&d[0][2..6]), (s.position_mm / 0.001).round() as i32);
            assert_eq!(i16_at(&d[0][6..8]), (s.torque_pct / 0.1).round() as i16);
            assert_eq!(
                i32_at(&d[1][0..4]),
                (s.velocity_mm_s / 0.001).round() as i32
            );
            assert_eq!(i16_at(&d[1][4..6]), (s.current_a / 0.001).round() as i16);
            assert_eq!(i16_at(&d[1][6..8]), (s.temperature_c / 0.1).round() as i16);
            assert_eq!(&d[2][4..7], &[0, 0, 8]);
        }
        // Pre-operational again: no TPDO
        sim.handle_frame(&f(0x000, &[0x80, 0]), at);
        let out = sim.poll(t0 + 30 * MS);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(sim.stats().tpdo, BTreeMap::from([(1, 3), (2, 3)]));
    }

    #[test]
    fn sync_mode_answers_each_sync_with_every_tpdo() {
        let t0 = Instant::now();
        let mut opts = CanOptions::new("1".parse().unwrap());
        opts.defaults.tpdo = TpdoMode::Sync;
        let mut sim = CanSim::new(&opts, t0).unwrap();
        sim.handle_frame(&f(0x000, &[0x01, 1]), t0);
        assert!(sim.poll(t0 + 50 * MS).iter().all(|f| f.id() == 0x701));
        let out = sim.handle_frame(&f(0x080, &[]), t0 + 60 * MS);
        assert_eq!(ids(&out), [0x181, 0x281, 0x381]);
        // With a counter byte too; a 2-byte frame on 0x080 is an EMCY of nobody
        assert_eq!(sim.handle_frame(&f(0x080, &[7]), t0 + 70 * MS).len(), 3);
        assert!(sim
            .handle_frame(&f(0x080, &[7, 7]), t0 + 70 * MS)
            .is_empty());
    }

    #[test]
    fn a_fault_from_the_console_sends_emcy_at_the_next_poll_and_clear_resets_it() {
        let t0 = Instant::now();
        let mut opts = CanOptions::new("1-2".parse().unwrap());
        opts.faults.push((1, 0x7500));
        let mut sim = CanSim::new(&opts, t0).unwrap();
        // A node faulted at power-on says so right after its boot-up
        let out = sim.poll(t0);
        assert_eq!(
            out,
            [
                f(0x701, &[0]),
                f(0x081, &[0x00, 0x75, 0x01, 0, 0, 0, 0, 0]),
                f(0x702, &[0])
            ]
        );
        sim.inject_fault(2, 0x2310, t0 + MS).unwrap();
        assert_eq!(sim.poll_timeout(), Some(t0));
        assert_eq!(
            sim.poll(t0 + MS),
            [f(0x082, &[0x10, 0x23, 0x01, 0, 0, 0, 0, 0])]
        );
        let truth = sim.truth(2, t0 + MS).unwrap();
        assert_eq!((truth.statusword, truth.error_code), (0x0218, 0x2310));
        sim.clear_fault(2, t0 + 2 * MS).unwrap();
        assert_eq!(sim.poll(t0 + 2 * MS), [f(0x082, &[0; 8])]);
        assert_eq!(
            sim.truth(2, t0).unwrap().state,
            Cia402State::OperationEnabled
        );
        assert_eq!(sim.inject_fault(9, 1, t0), Err(SimError::UnknownNode(9)));
    }

    #[test]
    fn a_silent_node_boots_quietly_and_resumes_without_boot_up() {
        let t0 = Instant::now();
        let mut opts = CanOptions::new("1-2".parse().unwrap());
        opts.silent.push(2);
        let mut sim = CanSim::new(&opts, t0).unwrap();
        assert_eq!(ids(&sim.poll(t0)), [0x701]);
        sim.handle_frame(&f(0x000, &[0x01, 0]), t0);
        let out = sim.poll(t0 + 100 * MS);
        assert!(out.iter().all(|f| f.id() & 0x7F == 1), "{out:?}");
        sim.set_silent(2, false, t0 + 100 * MS).unwrap();
        let out = sim.poll(t0 + 200 * MS);
        assert!(
            out.contains(&f(0x702, &[0x7F])),
            "still pre-operational: {out:?}"
        );
        assert!(!out.contains(&f(0x702, &[0x00])));
    }

    #[test]
    fn reboot_from_the_console_is_a_reset_node() {
        let (mut sim, t0) = sim("1-2");
        sim.poll(t0);
        sim.handle_frame(&f(0x000, &[0x01, 0]), t0);
        sim.reboot(2, t0 + 5 * MS).unwrap();
        assert_eq!(sim.poll(t0 + 5 * MS), [f(0x702, &[0])]);
        assert_eq!(sim.truth(2, t0).unwrap().nmt, NmtState::PreOperational);
        assert_eq!(sim.truth(1, t0).unwrap().nmt, NmtState::Operational);
    }

    #[test]
    fn a_flood_sends_its_rate_for_its_duration_and_then_stops() {
        let (mut sim, t0) = sim("1");
        sim.poll(t0);
        sim.handle_frame(&f(0x000, &[0x02, 0]), t0);
        sim.start_flood(1_000, Duration::from_millis(50), t0);
        let mut floods = 0;
        let mut at = t0;
        while let Some(next) = sim.poll_timeout() {
            if next > t0 + Duration::from_secs(1) {
                break;
            }
            at = next.max(at);
            floods += sim.poll(at).iter().filter(|f| f.id() == 0x7F0).count();
            if !sim.is_flooding() {
                break;
            }
        }
        assert_eq!(floods, 50);
        assert!(!sim.is_flooding());
        assert!(at <= t0 + 50 * MS);
    }

    #[test]
    fn a_flood_that_falls_behind_thins_out_instead_of_bursting() {
        let (mut sim, t0) = sim("1");
        sim.start_flood(100_000, Duration::from_secs(10), t0);
        let n = sim
            .poll(t0 + Duration::from_secs(1))
            .iter()
            .filter(|f| f.id() == 0x7F0)
            .count();
        assert_eq!(n as u64, MAX_FLOOD_BURST);
        let next = sim.poll_timeout().unwrap();
        assert!(next >= t0 + Duration::from_millis(999), "{next:?}");
    }

    #[test]
    fn any_frame_from_the_bus_is_handled_without_a_panic() {
        let t0 = Instant::now();
        let mut opts = CanOptions::new("1-4".parse().unwrap());
        opts.defaults.tpdo = TpdoMode::Sync;
        let mut sim = CanSim::new(&opts, t0).unwrap();
        let mut rng = fastrand::Rng::with_seed(402);
        let mut now = t0;
        for i in 0..200_000u32 {
            // Mostly the ids the nodes listen to, with short and long frames.
            let id = match rng.u8(..6) {
                0 => 0x000,
                1 => 0x080,
                2 | 3 => 0x600 + u16::from(rng.u8(0..=5)),
                _ => rng.u16(..=0x7FF),
            };
            let mut data = [0u8; 8];
            rng.fill(&mut data);
            if id == 0x000 {
                data[1] = rng.u8(0..=5);
            }
            let len = if rng.bool() { 8 } else { rng.usize(..=8) };
            sim.handle_frame(&f(id, &data[..len]), now);
            if i % 64 == 0 {
                now += MS;
                sim.poll(now);
            }
        }
    }
}
