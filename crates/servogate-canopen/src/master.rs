//! The CANopen master of one bus: every protocol piece of this crate behind one sans-IO
//! state, producing typed events into an [`EventSink`] (as `servogate_modbus::poll` does
//! for Modbus).
//!
//! The bus task owns the socket and the timer and calls:
//! - [`Master::handle_frame`] with every received frame (and the acquisition time),
//! - [`Master::poll_transmit`] until `None` after every call, and sends what it returns,
//! - [`Master::handle_timeout`] at [`Master::poll_timeout`].
//!
//! What becomes an event:
//! - heartbeat transitions: the availability topic plus an `online` / `offline` notice;
//! - EMCY: `fault` / `fault_cleared` notices (the fast, pushed fault path; the 0x603F error
//!   code in a TPDO is telemetry only, so one fault is not reported twice);
//! - TPDOs: one telemetry event per transmission cycle (every mapped TPDO of the node,
//!   [`TpdoDecoder`]), and a `state_change` notice when the CiA 402 state changes;
//! - a TPDO cycle that has not come `late_after` after the previous one: a `late` notice
//!   at that moment, and the telemetry that finally comes is `uncertain` (`late`);
//! - objects polled over SDO: a telemetry event holding that object's value;
//! - SDO aborts and timeouts: a `comm_error` notice naming the object and the abort code.
//!
//! Each node has one SDO client and a queue of jobs for it: at start-up (and again after
//! the node's boot-up message) the heartbeat producer time is written to 0x1017 when the
//! config asks for it, and the TPDO mappings are read from 0x1800../0x1A00.. when the
//! config does not give them; after that the polled objects are read on their schedule.
//! Boot-up messages queue an NMT start for the node. Transfers started with
//! [`Master::sdo_upload`] / [`Master::sdo_download`] share the same client.
//!
//! Commands ([`Master::command`]) run on the same client, ahead of everything else: while
//! a node has a command job, the client is the job's (its downloads, its statusword
//! uploads), and its start-up jobs and polls wait. Each order's outcome comes back once
//! through [`Master::poll_outcome`] ([`crate::command`] has the rules).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use servogate_core::{
    Availability, AvailabilityState, CommandReason, DeviceEvents, DriveState, EventBody, EventKind,
    EventSink, SeqBook, Telemetry,
};

use servogate_command::{Action, Order, Outcome, QueuedJob};

use crate::command::{self, Executor, Reply, Request};
use crate::emcy::{EmcyConsumer, FaultChange};
use crate::frame::{CobKind, Frame, NodeId};
use crate::heartbeat::{consumer_time, AvailabilityChange, HeartbeatConsumer};
use crate::nmt::NodeTable;
use crate::objects::{ObjectSpec, ObjectTable};
use crate::pdo::{MappingReader, TpdoDecoder, TpdoMapping};
use crate::rpdo::StartRpdoCheck;
use crate::sdo::{AbortCode, SdoClient, SdoError, SdoEvent};
use crate::sync::{sync_frame, SyncProducer};

/// 0x1017 producer heartbeat time (u16, ms), CiA 301 v4.2 7.5.2.32.
pub const PRODUCER_HEARTBEAT_TIME: u16 = 0x1017;

/// First and longest wait before the start-up SDO jobs of a node are tried again after
/// the drive did not answer (busy, not yet booted, a lost frame).
pub const STARTUP_RETRY_MIN: Duration = Duration::from_millis(500);
pub const STARTUP_RETRY_MAX: Duration = Duration::from_secs(10);

/// Where a node's TPDO mappings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpdoSource {
    /// Given in the config.
    Config(Vec<TpdoMapping>),
    /// Read from the drive over SDO at start-up: these TPDO numbers (1..=4).
    Read(Vec<u8>),
}

/// An object read over SDO on a schedule of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct SdoPoll {
    pub object: ObjectSpec,
    pub every: Duration,
}

/// One configured drive on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// Device name (MQTT topic level).
    pub name: Arc<str>,
    pub node: NodeId,
    /// Heartbeat producer time of the drive; zero = not watched.
    pub heartbeat: Duration,
    /// Write `heartbeat` into the drive's 0x1017 at start-up and after each boot-up.
    pub configure_heartbeat: bool,
    pub tpdos: TpdoSource,
    /// Names, types and scales of the drive's objects (the `cia402` profile + config).
    pub objects: Arc<ObjectTable>,
    pub polls: Vec<SdoPoll>,
    /// A TPDO cycle later than this after the previous one is `late`; `None`: not watched.
    pub late_after: Option<Duration>,
    /// Time each SDO response may take.
    pub sdo_timeout: Duration,
    /// The RPDO (1..=512) that carries the controlword alone, synchronously: group moves
    /// start through it on one SYNC. Read and checked at start-up ([`crate::rpdo`]).
    pub start_rpdo: Option<u16>,
}

impl NodeSettings {
    /// A node with the `cia402` profile, TPDOs 1-4 read from the drive, nothing polled.
    pub fn new(name: &str, node: NodeId, heartbeat: Duration) -> Self {
        Self {
            name: Arc::from(name),
            node,
            heartbeat,
            configure_heartbeat: false,
            tpdos: TpdoSource::Read(vec![1, 2, 3, 4]),
            objects: Arc::new(ObjectTable::cia402()),
            polls: Vec::new(),
            late_after: None,
            sdo_timeout: Duration::from_millis(100),
            start_rpdo: None,
        }
    }
}

/// The end of an SDO transfer started through the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdoResult {
    Uploaded {
        node: NodeId,
        index: u16,
        sub: u8,
        data: Vec<u8>,
    },
    Downloaded {
        node: NodeId,
        index: u16,
        sub: u8,
    },
    Aborted {
        node: NodeId,
        index: u16,
        sub: u8,
        code: AbortCode,
        by_server: bool,
    },
}

/// What a node's SDO client is doing on the master's behalf.
#[derive(Debug, Clone)]
enum Job {
    WriteHeartbeat,
    ReadMapping(MappingReader),
    CheckStartRpdo(StartRpdoCheck),
    Poll(usize),
    /// A transfer of the node's command job.
    Command,
}

#[derive(Debug)]
struct Node {
    settings: NodeSettings,
    events: DeviceEvents,
    decoder: TpdoDecoder,
    sdo: SdoClient,
    drive_state: Option<DriveState>,
    /// Start-up jobs still to run, in order.
    jobs: VecDeque<Job>,
    /// The job of the running transfer (`None`: idle, or a transfer of the caller's).
    current: Option<Job>,
    /// When each of `settings.polls` is due next.
    poll_due: Vec<Instant>,
    /// When the last complete TPDO cycle arrived.
    last_telemetry: Option<Instant>,
    /// A `late` notice went out for the current gap.
    late_raised: bool,
    /// True once the TPDO mappings are known (from config, or read).
    mapped: bool,
    /// Start-up jobs wait until then after one failed (the drive did not answer).
    jobs_not_before: Option<Instant>,
    /// The wait before the next retry of the start-up jobs.
    retry_pause: Duration,
    /// Whether group moves can start on this drive, and through which COB-ID.
    start: StartRpdo,
}

/// What the start-up check found of a node's `start_rpdo`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StartRpdo {
    NotConfigured,
    NotRead,
    Ready(u16),
    Unfit(String),
}

impl Node {
    /// A node first seen (or changed) at `now`, its start-up jobs queued.
    fn new(settings: NodeSettings, now: Instant, book: &SeqBook) -> Self {
        let (mappings, mapped) = match &settings.tpdos {
            TpdoSource::Config(m) => (m.clone(), true),
            TpdoSource::Read(_) => (Vec::new(), false),
        };
        let mut node = Node {
            events: book.events(&settings.name),
            decoder: TpdoDecoder::new(mappings, settings.objects.clone()),
            sdo: SdoClient::new(settings.node),
            drive_state: None,
            jobs: VecDeque::new(),
            current: None,
            // The first reads go out at once, one after the other.
            poll_due: vec![now; settings.polls.len()],
            last_telemetry: None,
            late_raised: false,
            mapped,
            jobs_not_before: None,
            retry_pause: STARTUP_RETRY_MIN,
            start: StartRpdo::NotConfigured,
            settings,
        };
        node.startup_jobs();
        node
    }

    /// Its `start_rpdo` cannot start a group: said once, as a `comm_error` of the drive.
    fn start_unfit(&mut self, why: String, wall: SystemTime, sink: &dyn EventSink) {
        let node = self.settings.node;
        sink.push(self.events.notice(
            wall,
            EventKind::CommError {
                error: "bad_mapping",
            },
            format!("group moves cannot start node {node}: {why}"),
        ));
        self.start = StartRpdo::Unfit(why);
    }

    fn startup_jobs(&mut self) {
        self.jobs.clear();
        self.jobs_not_before = None;
        self.retry_pause = STARTUP_RETRY_MIN;
        if self.settings.configure_heartbeat {
            self.jobs.push_back(Job::WriteHeartbeat);
        }
        if !self.mapped {
            if let TpdoSource::Read(numbers) = &self.settings.tpdos {
                if let Ok(reader) = MappingReader::new(numbers) {
                    self.jobs.push_back(Job::ReadMapping(reader));
                }
            }
        }
        // Read again after every boot-up: the drive may have come back with other PDOs.
        self.start = match self.settings.start_rpdo.map(StartRpdoCheck::new) {
            None => StartRpdo::NotConfigured,
            Some(Ok(check)) => {
                self.jobs.push_back(Job::CheckStartRpdo(check));
                StartRpdo::NotRead
            }
            Some(Err(why)) => StartRpdo::Unfit(why),
        };
    }
}

/// Counters of one bus's master.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MasterStats {
    /// TPDO frames shorter than their mapping.
    pub malformed_tpdos: u64,
    /// Heartbeat frames that were not one byte.
    pub malformed_heartbeats: u64,
    /// EMCY frames that were not eight bytes.
    pub malformed_emcy: u64,
}

/// The sans-IO master of one CAN bus.
#[derive(Debug)]
pub struct Master {
    nodes: Vec<Node>,
    nmt: NodeTable,
    heartbeat: HeartbeatConsumer,
    emcy: EmcyConsumer,
    sync: Option<SyncProducer>,
    transmit: VecDeque<Frame>,
    /// Numbers the events of nodes added later (a reload).
    book: SeqBook,
    /// The command jobs of every node.
    commands: Executor,
    /// Orders that ended, for [`Master::poll_outcome`] (at most one per job held).
    outcomes: VecDeque<(Order, Outcome)>,
    /// Orders of group moves waiting for the rest of their group to arrive.
    gathering: Vec<Order>,
    /// Group moves admitted and not yet started: their devices.
    groups: Vec<(u64, Vec<Arc<str>>)>,
}

impl Master {
    /// Replaces the configured nodes (a reload): a node whose settings did not change
    /// keeps its state (heartbeat watch, mappings, SDO jobs, sequences), a changed or new
    /// node starts afresh (NMT start, start-up jobs, availability announced again) with
    /// its sequences continued from the book, and a node no longer listed is forgotten.
    pub fn update_nodes(&mut self, nodes: Vec<NodeSettings>, now: Instant) {
        let mut old = std::mem::take(&mut self.nodes);
        for settings in nodes {
            if self.nodes.iter().any(|n| n.settings.node == settings.node) {
                continue; // a node id given twice keeps its first settings
            }
            if let Some(i) = old.iter().position(|n| n.settings == settings) {
                self.nodes.push(old.swap_remove(i));
                continue;
            }
            // The old state of this node id or device goes first, so one numberer at a time.
            old.retain(|n| n.settings.node != settings.node && n.settings.name != settings.name);
            self.heartbeat.remove(settings.node);
            self.heartbeat.add(settings.node, settings.heartbeat, now);
            self.nmt.add(settings.node);
            self.nodes.push(Node::new(settings, now, &self.book));
        }
        for gone in old {
            let node = gone.settings.node;
            if !self.nodes.iter().any(|n| n.settings.node == node) {
                self.heartbeat.remove(node);
                self.nmt.remove(node);
            }
        }
        let names: Vec<Arc<str>> = self.nodes.iter().map(|n| n.settings.name.clone()).collect();
        for (job, outcome) in self.commands.retain(|d| names.iter().any(|n| &**n == d)) {
            self.outcomes.push_back((job.into_order(), outcome));
        }
        self.drain_nmt();
        self.service_jobs(now);
    }

    /// A master for `nodes` (a node id given twice keeps its first settings), with an
    /// optional SYNC producer. NMT start commands for every node are queued at once, then
    /// the start-up SDO jobs.
    pub fn new(nodes: Vec<NodeSettings>, sync: Option<SyncProducer>, now: Instant) -> Self {
        Self::with_seq_book(nodes, sync, now, &SeqBook::default())
    }

    /// As [`Master::new`], with each node's sequences continued from `book` (the daemon
    /// keeps one book for the life of the process, so a restarted bus goes on counting).
    pub fn with_seq_book(
        nodes: Vec<NodeSettings>,
        sync: Option<SyncProducer>,
        now: Instant,
        book: &SeqBook,
    ) -> Self {
        let mut heartbeat = HeartbeatConsumer::new();
        let mut kept: Vec<Node> = Vec::new();
        for settings in nodes {
            if kept.iter().any(|n| n.settings.node == settings.node) {
                continue;
            }
            heartbeat.add(settings.node, settings.heartbeat, now);
            kept.push(Node::new(settings, now, book));
        }
        let mut nmt = NodeTable::new(kept.iter().map(|n| n.settings.node));
        nmt.start_all();
        let mut master = Self {
            nodes: kept,
            nmt,
            heartbeat,
            emcy: EmcyConsumer::new(),
            sync,
            transmit: VecDeque::new(),
            book: book.clone(),
            commands: Executor::default(),
            outcomes: VecDeque::new(),
            gathering: Vec::new(),
            groups: Vec::new(),
        };
        master.drain_nmt();
        master.service_jobs(now);
        master
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// Takes a command for one of the bus's drives. Its first frame is queued at once
    /// when the node's SDO client is free (else as soon as its transfer ends, ahead of
    /// the master's own jobs). `Err`: refused before anything was sent (a device not on
    /// this bus, a full queue, an order the drive's objects cannot carry).
    ///
    /// A `move` of a group command with other members on this bus is held until all of
    /// them arrived, then planned together: every drive's set-point is loaded over SDO and
    /// they start on one SYNC, each through its `start_rpdo` (a drive without a usable
    /// one refuses the whole group; nothing is sent). Their outcomes come from
    /// [`Master::poll_outcome`].
    pub fn command(&mut self, order: Order, now: Instant) -> Result<(), Outcome> {
        if let Some(tag) = order.group.filter(|g| g.members > 1) {
            if matches!(order.action, Action::Move { .. }) {
                if self.gathering.len() >= Executor::CAPACITY {
                    return Err(Outcome::rejected(
                        CommandReason::RateLimited,
                        "the bus's command queue is full",
                    ));
                }
                self.gathering.push(order);
                let arrived = self
                    .gathering
                    .iter()
                    .filter(|o| o.group.is_some_and(|g| g.key == tag.key))
                    .count();
                if arrived >= tag.members {
                    self.admit_group(tag.key, now);
                }
                self.service_jobs(now);
                return Ok(());
            }
        }
        let Some(n) = self.nodes.iter().find(|n| n.settings.name == order.device) else {
            return Err(Outcome::rejected(
                CommandReason::BusDown,
                "the device is not on this bus (removed by a reload?)",
            ));
        };
        if self.commands.is_full() {
            return Err(Outcome::rejected(
                CommandReason::RateLimited,
                "the bus's command queue is full",
            ));
        }
        let job = command::Job::plan(order, &n.settings.objects, now)?;
        for (job, outcome) in self.commands.push(job) {
            self.outcomes.push_back((job.into_order(), outcome));
        }
        self.service_jobs(now);
        Ok(())
    }

    /// Plans every order of group `key` (all arrived) or refuses them all.
    fn admit_group(&mut self, key: u64, now: Instant) {
        let (orders, rest) = std::mem::take(&mut self.gathering)
            .into_iter()
            .partition::<Vec<Order>, _>(|o| o.group.is_some_and(|g| g.key == key));
        self.gathering = rest;
        let mut planned: Vec<Result<command::Job, (Order, Outcome)>> = Vec::new();
        for order in orders {
            let Some(n) = self.nodes.iter().find(|n| n.settings.name == order.device) else {
                let o = Outcome::rejected(
                    CommandReason::BusDown,
                    "the device is not on this bus (removed by a reload?)",
                );
                planned.push(Err((order, o)));
                continue;
            };
            let why = match &n.start {
                StartRpdo::Ready(_) => None,
                StartRpdo::NotConfigured => Some(
                    "a group move starts every drive on one SYNC through its `start_rpdo`, \
                     and this drive has none configured"
                        .to_owned(),
                ),
                StartRpdo::NotRead => {
                    Some("its start_rpdo has not been read from the drive yet".to_owned())
                }
                StartRpdo::Unfit(why) => Some(format!("its start_rpdo cannot start it: {why}")),
            };
            if let Some(why) = why {
                planned.push(Err((
                    order,
                    Outcome::rejected(CommandReason::NotAllowed, why),
                )));
                continue;
            }
            let objects = n.settings.objects.clone();
            planned.push(command::Job::plan(order.clone(), &objects, now).map_err(|o| (order, o)));
        }
        let refused = planned.iter().any(Result::is_err) || !self.commands.has_room(planned.len());
        if refused {
            let full = !self.commands.has_room(planned.len());
            for p in planned {
                let (order, outcome) = match p {
                    Err(refusal) => refusal,
                    Ok(job) if full => (
                        job.into_order(),
                        Outcome::rejected(
                            CommandReason::RateLimited,
                            "the bus's command queue has no room for the whole group",
                        ),
                    ),
                    Ok(job) => (
                        job.into_order(),
                        Outcome::rejected(
                            CommandReason::GroupRejected,
                            "another drive of the group on this bus was refused: nothing was sent",
                        ),
                    ),
                };
                self.outcomes.push_back((order, outcome));
            }
            return;
        }
        let mut devices = Vec::new();
        for job in planned.into_iter().flatten() {
            devices.push(job.device().clone());
            for (job, outcome) in self.commands.push(job) {
                self.outcomes.push_back((job.into_order(), outcome));
            }
        }
        self.groups.push((key, devices));
    }

    /// Starts every admitted group whose drives all loaded their set-points: each
    /// drive's start controlword in its RPDO, then one SYNC, so they take it in the same
    /// cycle. A group one of whose drives ended first (refused, failed, stopped, out of
    /// time) is ended whole: the others never start.
    fn tend_groups(&mut self, now: Instant) {
        let mut k = 0;
        while k < self.groups.len() {
            let (key, devices) = &self.groups[k];
            let key = *key;
            let stages: Vec<Option<Option<u16>>> = devices
                .iter()
                .map(|d| self.commands.group_stage(d, key))
                .collect();
            if let Some(gone) = devices
                .iter()
                .zip(&stages)
                .find_map(|(d, s)| s.is_none().then(|| d.clone()))
            {
                let why = format!("{gone} of the group ended before the start");
                for (job, outcome) in self.commands.end_group(key, &why) {
                    self.outcomes.push_back((job.into_order(), outcome));
                }
                self.groups.swap_remove(k);
                continue;
            }
            if stages.iter().any(|s| !matches!(s, Some(Some(_)))) {
                k += 1;
                continue;
            }
            let mut frames = Vec::new();
            for (device, stage) in devices.iter().zip(stages) {
                let cob = self.nodes.iter().find_map(|n| match n.start {
                    StartRpdo::Ready(cob) if n.settings.name == *device => Some(cob),
                    _ => None,
                });
                if let (Some(cob), Some(Some(word))) = (cob, stage) {
                    frames.push(Frame::known(cob, &word.to_le_bytes()));
                }
            }
            if frames.len() < devices.len() {
                // A drive rebooted while it loaded: its RPDO is being checked again.
                let why = "a drive of the group rebooted before the start";
                for (job, outcome) in self.commands.end_group(key, why) {
                    self.outcomes.push_back((job.into_order(), outcome));
                }
                self.groups.swap_remove(k);
                continue;
            }
            self.transmit.extend(frames);
            let sync = match self.sync.as_mut() {
                Some(producer) => producer.fire(now),
                None => sync_frame(None),
            };
            self.transmit.push_back(sync);
            self.commands.group_started(key, now);
            self.groups.swap_remove(k);
        }
    }

    /// Queues an NMT start for every configured node again: the bus task calls it when
    /// an NMT start it was given could not be sent (the interface was down or missing),
    /// since a drive that never heard it stays pre-operational and sends no TPDO. A
    /// start to a node already operational changes nothing (CiA 301 v4.2, 7.3.2.2.1).
    pub fn start_all_again(&mut self) {
        self.nmt.start_all();
        self.drain_nmt();
    }

    /// True when no more commands can be taken now.
    pub fn is_command_queue_full(&self) -> bool {
        self.commands.is_full()
    }

    /// An order that ended, with its outcome (each order exactly once).
    pub fn poll_outcome(&mut self) -> Option<(Order, Outcome)> {
        self.outcomes.pop_front()
    }

    /// Ends every command job (the bus stops): never started `rejected` (`bus_down`),
    /// started `unknown`; they come out of [`Master::poll_outcome`].
    pub fn drain_commands(&mut self) {
        for (job, outcome) in self.commands.drain() {
            self.outcomes.push_back((job.into_order(), outcome));
        }
        for order in self.gathering.drain(..) {
            let o = Outcome::rejected(CommandReason::BusDown, "the bus stopped before it was sent");
            self.outcomes.push_back((order, o));
        }
        self.groups.clear();
    }

    /// The earliest time `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let per_node = self.nodes.iter().filter_map(|n| {
            let sdo = n.sdo.poll_timeout();
            // A poll can only start when the client is free; when it is busy, its
            // response or its timeout wakes us first.
            let poll = if !n.sdo.is_idle() {
                None
            } else if !n.jobs.is_empty() {
                n.jobs_not_before
            } else {
                n.poll_due.iter().min().copied()
            };
            let late = match (n.settings.late_after, n.last_telemetry) {
                (Some(after), Some(last)) if !n.late_raised => Some(last + after),
                _ => None,
            };
            // A command job holds the client: its times replace the polls'.
            let (poll, cmd) = if self.commands.has_job(&n.settings.name) {
                let cmd = n.sdo.is_idle().then(|| {
                    self.commands
                        .next_due(&n.settings.name, statusword_mapped(&n.decoder))
                });
                (None, cmd.flatten())
            } else {
                (poll, None)
            };
            [sdo, poll, late, cmd].into_iter().flatten().min()
        });
        let sync = self.sync.as_ref().and_then(SyncProducer::poll_timeout);
        // A group still gathering expires with its first deadline.
        let gathering = self.gathering.iter().map(|o| o.deadline).min();
        per_node
            .chain(self.heartbeat.poll_timeout())
            .chain(sync)
            .chain(gathering)
            .min()
    }

    /// Feeds a received frame; `wall` is its acquisition time. Returns the end of an SDO
    /// transfer when this frame ended one.
    pub fn handle_frame(
        &mut self,
        frame: &Frame,
        now: Instant,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) -> Option<SdoResult> {
        let result = match CobKind::of(frame.id()) {
            CobKind::Heartbeat(_) => {
                if let Some(booted) = self.nmt.handle_frame(frame) {
                    self.on_boot(booted);
                }
                self.drain_nmt();
                if let Some(change) = self.heartbeat.handle_frame(frame, now) {
                    self.on_availability(change, wall, sink);
                }
                None
            }
            CobKind::Emcy(_) => {
                if let Some(change) = self.emcy.handle_frame(frame) {
                    self.on_fault(change, wall, sink);
                }
                None
            }
            CobKind::SdoResponse(node) => {
                let n = self.nodes.iter_mut().find(|n| n.settings.node == node)?;
                let current = n.sdo.current();
                let event = n.sdo.handle_frame(frame, now)?;
                self.on_sdo(node, current, event, now, wall, sink)
            }
            // TPDOs, on their predefined COB-IDs or any other one a mapping names.
            _ => {
                self.on_tpdo(frame, now, wall, sink);
                None
            }
        };
        self.service_jobs(now);
        result
    }

    /// Handles everything due at `now`: heartbeat deadlines, SDO timeouts and polls, late
    /// TPDO cycles, SYNC. Returns the SDO transfers that timed out.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) -> Vec<SdoResult> {
        for change in self.heartbeat.handle_timeout(now) {
            self.on_availability(change, wall, sink);
        }
        let mut results = Vec::new();
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let node = n.settings.node;
            let current = n.sdo.current();
            if let Some(event) = n.sdo.handle_timeout(now) {
                results.extend(self.on_sdo(node, current, event, now, wall, sink));
            }
        }
        for i in 0..self.nodes.len() {
            self.check_late(i, now, wall, sink);
        }
        if let Some(frame) = self.sync.as_mut().and_then(|s| s.handle_timeout(now)) {
            self.transmit.push_back(frame);
        }
        self.expire_gathering(now);
        self.service_jobs(now);
        results
    }

    /// A group whose members did not all arrive before one's deadline: every member
    /// that did is `expired` (nothing was sent).
    fn expire_gathering(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .gathering
            .iter()
            .filter(|o| now > o.deadline)
            .filter_map(|o| o.group.map(|g| g.key))
            .collect();
        if late.is_empty() {
            return;
        }
        let (gone, kept) = std::mem::take(&mut self.gathering)
            .into_iter()
            .partition::<Vec<Order>, _>(|o| o.group.is_some_and(|g| late.contains(&g.key)));
        self.gathering = kept;
        for order in gone {
            let o = Outcome::expired("its group's other members did not reach the bus in time");
            self.outcomes.push_back((order, o));
        }
    }

    /// Starts reading `index:sub` of `node`; the request is queued for transmission.
    pub fn sdo_upload(
        &mut self,
        node: NodeId,
        index: u16,
        sub: u8,
        timeout: Duration,
        now: Instant,
    ) -> Result<(), SdoError> {
        let n = self.node_mut(node)?;
        let frame = n.sdo.start_upload(index, sub, timeout, now)?;
        self.transmit.push_back(frame);
        Ok(())
    }

    /// Starts writing `data` to `index:sub` of `node`; the request is queued.
    pub fn sdo_download(
        &mut self,
        node: NodeId,
        index: u16,
        sub: u8,
        data: &[u8],
        timeout: Duration,
        now: Instant,
    ) -> Result<(), SdoError> {
        let n = self.node_mut(node)?;
        let frame = n.sdo.start_download(index, sub, data, timeout, now)?;
        self.transmit.push_back(frame);
        Ok(())
    }

    /// True when `node` has no SDO transfer running.
    pub fn is_sdo_idle(&self, node: NodeId) -> bool {
        self.nodes
            .iter()
            .find(|n| n.settings.node == node)
            .is_some_and(|n| n.sdo.is_idle())
    }

    /// Replaces the TPDO mappings of `node` (after reading them from the drive).
    pub fn set_tpdos(&mut self, node: NodeId, tpdos: Vec<TpdoMapping>) -> Result<(), SdoError> {
        let n = self.node_mut(node)?;
        n.decoder = TpdoDecoder::new(tpdos, n.settings.objects.clone());
        n.mapped = true;
        Ok(())
    }

    /// The TPDO mappings `node` is decoded with (empty until they are read).
    pub fn tpdos(&self, node: NodeId) -> &[TpdoMapping] {
        self.nodes
            .iter()
            .find(|n| n.settings.node == node)
            .map_or(&[], |n| n.decoder.mappings())
    }

    /// True when the start-up jobs of `node` are done (mappings read, 0x1017 written).
    pub fn is_configured(&self, node: NodeId) -> bool {
        self.nodes
            .iter()
            .find(|n| n.settings.node == node)
            .is_some_and(|n| {
                n.jobs.is_empty()
                    && !matches!(n.current, Some(Job::WriteHeartbeat | Job::ReadMapping(_)))
            })
    }

    /// The availability the heartbeat consumer last reported for `node`.
    pub fn availability(&self, node: NodeId) -> Option<AvailabilityState> {
        self.heartbeat.state(node)
    }

    /// The device name of every node, with its node id.
    pub fn devices(&self) -> impl Iterator<Item = (NodeId, &Arc<str>)> {
        self.nodes
            .iter()
            .map(|n| (n.settings.node, &n.settings.name))
    }

    pub fn stats(&self) -> MasterStats {
        MasterStats {
            malformed_tpdos: self.nodes.iter().map(|n| n.decoder.malformed()).sum(),
            malformed_heartbeats: self.heartbeat.malformed(),
            malformed_emcy: self.emcy.malformed(),
        }
    }

    /// Pushes the same notice to every device of the bus (bus state, lost frames): each
    /// drive's consumer learns that its bus is in trouble.
    pub fn notify_all(
        &mut self,
        wall: SystemTime,
        kind: EventKind,
        message: &str,
        sink: &dyn EventSink,
    ) {
        for n in &mut self.nodes {
            sink.push(n.events.notice(wall, kind.clone(), message.to_owned()));
        }
    }

    fn node_mut(&mut self, node: NodeId) -> Result<&mut Node, SdoError> {
        self.nodes
            .iter_mut()
            .find(|n| n.settings.node == node)
            .ok_or(SdoError::UnknownNode(node))
    }

    fn drain_nmt(&mut self) {
        while let Some(frame) = self.nmt.poll_transmit() {
            self.transmit.push_back(frame);
        }
    }

    /// A drive that booted has its defaults back: configure it again, and do not call the
    /// silence while it booted `late` (its heartbeat tells whether it is there).
    fn on_boot(&mut self, node: NodeId) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.settings.node == node) {
            n.startup_jobs();
            n.last_telemetry = None;
            n.late_raised = false;
        }
    }

    /// Starts the next SDO job of every idle node: start-up jobs first, then due polls.
    fn service_jobs(&mut self, now: Instant) {
        if !self.groups.is_empty() {
            self.tend_groups(now);
        }
        for i in 0..self.nodes.len() {
            // Cheap checks first: this runs after every frame, and for most nodes there is
            // nothing to start (the reachability look-up walks the heartbeat table).
            let n = &self.nodes[i];
            if !n.sdo.is_idle() {
                continue;
            }
            if !self.commands.is_empty() && self.commands.has_job(&n.settings.name) {
                // Commands first: the client is the job's until it ends. No reachability
                // check: a stop is sent even to a drive whose heartbeat is late.
                self.service_command(i, now);
                continue;
            }
            if n.jobs.is_empty() && !n.poll_due.iter().any(|d| *d <= now) {
                continue;
            }
            if !self.node_reachable(i) {
                continue;
            }
            let n = &mut self.nodes[i];
            let timeout = n.settings.sdo_timeout;
            let waiting = n.jobs_not_before.is_some_and(|t| now < t);
            let start = if !n.jobs.is_empty() {
                if waiting {
                    continue;
                }
                n.jobs.pop_front()
            } else {
                // The most overdue poll first.
                n.poll_due
                    .iter()
                    .enumerate()
                    .filter(|(_, due)| **due <= now)
                    .min_by_key(|(_, due)| **due)
                    .map(|(k, _)| Job::Poll(k))
            };
            let Some(job) = start else { continue };
            let frame = match &job {
                Job::WriteHeartbeat => {
                    let ms = n.settings.heartbeat.as_millis().min(u128::from(u16::MAX)) as u16;
                    n.sdo.start_download(
                        PRODUCER_HEARTBEAT_TIME,
                        0,
                        &ms.to_le_bytes(),
                        timeout,
                        now,
                    )
                }
                Job::ReadMapping(reader) => match reader.next_object() {
                    Some((index, sub)) => n.sdo.start_upload(index, sub, timeout, now),
                    None => {
                        n.mapped = true;
                        continue;
                    }
                },
                Job::CheckStartRpdo(check) => match check.next_object() {
                    Some((index, sub)) => n.sdo.start_upload(index, sub, timeout, now),
                    None => continue,
                },
                Job::Poll(k) => {
                    let k = *k;
                    let every = n.settings.polls[k].every;
                    // On schedule, without drift; after a long stall, from now.
                    let next = n.poll_due[k] + every;
                    n.poll_due[k] = if next <= now { now + every } else { next };
                    let o = &n.settings.polls[k].object;
                    n.sdo.start_upload(o.index, o.sub, timeout, now)
                }
                // Command transfers start in `service_command`, never from the queue.
                Job::Command => continue,
            };
            // The client was checked idle and no request carries more than 2 bytes, so
            // starting cannot fail; if it did, the job is dropped, not retried forever.
            if let Ok(frame) = frame {
                self.transmit.push_back(frame);
                self.nodes[i].current = Some(job);
            }
        }
    }

    /// Starts the next transfer of node `i`'s command job (its client is idle); jobs that
    /// end without one (expired, done, out of time) are answered, and the node's next job
    /// is asked in turn.
    fn service_command(&mut self, i: usize, now: Instant) {
        let n = &self.nodes[i];
        let name = n.settings.name.clone();
        let by_tpdo = statusword_mapped(&n.decoder);
        let mut ended = Vec::new();
        let request = self.commands.poll(&name, now, by_tpdo, &mut ended);
        for (job, outcome) in ended {
            self.outcomes.push_back((job.into_order(), outcome));
        }
        let Some(request) = request else { return };
        let n = &mut self.nodes[i];
        let timeout = n.settings.sdo_timeout;
        let frame = match &request {
            Request::Download { index, sub, data } => {
                n.sdo.start_download(*index, *sub, data, timeout, now)
            }
            Request::Upload { index, sub } => n.sdo.start_upload(*index, *sub, timeout, now),
        };
        match frame {
            Ok(frame) => {
                self.transmit.push_back(frame);
                n.current = Some(Job::Command);
                self.commands.sent(&name);
            }
            // The client was checked idle and no request is longer than 4 bytes; should
            // it refuse anyway, the job tries again shortly (and can still expire).
            Err(_) => self.commands.not_sent(&name, now),
        }
    }

    /// False while the heartbeat consumer has the node offline: SDO requests to a silent
    /// node would only time out.
    fn node_reachable(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        n.settings.heartbeat.is_zero()
            || self.heartbeat.state(n.settings.node) != Some(AvailabilityState::Offline)
    }

    fn check_late(&mut self, i: usize, now: Instant, wall: SystemTime, sink: &dyn EventSink) {
        if !self.node_reachable(i) {
            return;
        }
        let n = &mut self.nodes[i];
        let (Some(after), Some(last)) = (n.settings.late_after, n.last_telemetry) else {
            return;
        };
        let elapsed = now.saturating_duration_since(last);
        if n.late_raised || elapsed < after {
            return;
        }
        n.late_raised = true;
        late_notice(&mut n.events, wall, elapsed, after, "no TPDO for", sink);
    }

    fn on_availability(
        &mut self,
        change: AvailabilityChange,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) {
        let Some(n) = self
            .nodes
            .iter_mut()
            .find(|n| n.settings.node == change.node)
        else {
            return;
        };
        let reason = match change.nmt_state {
            Some(nmt) => format!("heartbeat received (NMT {})", nmt.as_str()),
            None => {
                let hb = n.settings.heartbeat;
                format!(
                    "no heartbeat for {} ms (1.5 x producer time {} ms)",
                    consumer_time(hb).as_millis(),
                    hb.as_millis()
                )
            }
        };
        let state = change.state;
        if state == AvailabilityState::Offline {
            // Back online, the first TPDO cycle starts a new gap measurement.
            n.last_telemetry = None;
            n.late_raised = false;
        }
        sink.push(n.events.event(
            wall,
            EventBody::Availability(Availability {
                state,
                since: wall,
                reason: reason.clone(),
            }),
        ));
        sink.push(
            n.events
                .notice(wall, EventKind::Availability { state }, reason),
        );
    }

    fn on_fault(&mut self, change: FaultChange, wall: SystemTime, sink: &dyn EventSink) {
        let Some(n) = self
            .nodes
            .iter_mut()
            .find(|n| n.settings.node == change.node())
        else {
            return;
        };
        let message = match change {
            FaultChange::Fault { code, register, .. } => {
                format!("EMCY {code:#06x}, error register {register:#04x}")
            }
            FaultChange::FaultCleared { code, .. } => format!("fault {code:#06x} cleared"),
        };
        sink.push(n.events.notice(wall, change.to_event_kind(), message));
    }

    fn on_tpdo(&mut self, frame: &Frame, now: Instant, wall: SystemTime, sink: &dyn EventSink) {
        for n in &mut self.nodes {
            let Some(mut telemetry) = n.decoder.handle_frame(frame) else {
                continue;
            };
            // The state change goes out before the telemetry that shows it.
            if let Some(state) = telemetry.state {
                if n.drive_state != Some(state) {
                    sink.push(n.events.notice(
                        wall,
                        EventKind::StateChange {
                            from: n.drive_state,
                            to: state,
                        },
                        format!(
                            "{} -> {}",
                            n.drive_state.map_or("unknown", DriveState::as_str),
                            state.as_str()
                        ),
                    ));
                    n.drive_state = Some(state);
                }
            }
            if let (Some(after), Some(last)) = (n.settings.late_after, n.last_telemetry) {
                let elapsed = now.saturating_duration_since(last);
                if elapsed >= after || n.late_raised {
                    if !n.late_raised {
                        // The timer did not fire first (a busy task): say it now.
                        let what = "TPDO cycle after the previous:";
                        late_notice(&mut n.events, wall, elapsed, after, what, sink);
                    }
                    telemetry.quality.late = true;
                }
            }
            n.last_telemetry = Some(now);
            n.late_raised = false;
            let statusword = telemetry.statusword;
            sink.push(n.events.event(wall, EventBody::Telemetry(telemetry)));
            if let Some(sw) = statusword {
                if let Some((job, outcome)) = self.commands.on_statusword(&n.settings.name, sw, now)
                {
                    self.outcomes.push_back((job.into_order(), outcome));
                }
            }
            return;
        }
    }

    fn on_sdo(
        &mut self,
        node: NodeId,
        current: Option<(u16, u8)>,
        event: SdoEvent,
        now: Instant,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) -> Option<SdoResult> {
        let (index, sub) = current.unwrap_or((0, 0));
        let result = match event {
            SdoEvent::NextFrame(frame) => {
                self.transmit.push_back(frame);
                return None;
            }
            SdoEvent::Uploaded(data) => SdoResult::Uploaded {
                node,
                index,
                sub,
                data,
            },
            SdoEvent::Downloaded => SdoResult::Downloaded { node, index, sub },
            SdoEvent::Aborted {
                index,
                sub,
                code,
                by_server,
                frame,
            } => {
                if let Some(frame) = frame {
                    self.transmit.push_back(frame);
                }
                let error = if code == AbortCode::TIMEOUT && !by_server {
                    "timeout"
                } else {
                    "sdo_abort"
                };
                let who = if by_server { "drive" } else { "gateway" };
                if let Some(n) = self.nodes.iter_mut().find(|n| n.settings.node == node) {
                    sink.push(n.events.notice(
                        wall,
                        EventKind::CommError { error },
                        format!("SDO {index:#06x}:{sub} aborted by the {who}: {code}"),
                    ));
                }
                SdoResult::Aborted {
                    node,
                    index,
                    sub,
                    code,
                    by_server,
                }
            }
        };
        self.finish_job(node, &result, now, wall, sink);
        Some(result)
    }

    /// Hands the end of a transfer to the job that started it.
    fn finish_job(
        &mut self,
        node: NodeId,
        result: &SdoResult,
        now: Instant,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) {
        let Some(n) = self.nodes.iter_mut().find(|n| n.settings.node == node) else {
            return;
        };
        let Some(job) = n.current.take() else {
            return;
        };
        if let Job::Command = job {
            let reply = match result {
                SdoResult::Downloaded { .. } => Reply::Downloaded,
                SdoResult::Uploaded { data, .. } => Reply::Uploaded(data.clone()),
                SdoResult::Aborted {
                    code,
                    by_server: true,
                    ..
                } => Reply::Aborted(*code),
                // The gateway gave up (timeout, a garbled answer): the drive may or may
                // not have taken it.
                SdoResult::Aborted { .. } => Reply::Timeout,
            };
            if let Some((job, outcome)) = self.commands.on_reply(&n.settings.name, now, reply) {
                self.outcomes.push_back((job.into_order(), outcome));
            }
            return;
        }
        match (job, result) {
            (Job::ReadMapping(mut reader), SdoResult::Uploaded { data, .. }) => {
                if let Err(e) = reader.on_uploaded(data) {
                    sink.push(n.events.notice(
                        wall,
                        EventKind::CommError {
                            error: "bad_mapping",
                        },
                        format!("TPDO mapping of node {node} refused: {e}"),
                    ));
                }
                if reader.next_object().is_some() {
                    // Go on with the next mapping object before anything else.
                    n.jobs.push_front(Job::ReadMapping(reader));
                } else {
                    n.decoder = TpdoDecoder::new(reader.finish(), n.settings.objects.clone());
                    n.mapped = true;
                }
            }
            (
                Job::ReadMapping(mut reader),
                SdoResult::Aborted {
                    by_server: true,
                    code,
                    ..
                },
            ) if *code == AbortCode::NO_OBJECT || *code == AbortCode::NO_SUB_INDEX => {
                // The drive has no such TPDO: keep the others and go on.
                reader.skip_tpdo();
                if reader.next_object().is_some() {
                    n.jobs.push_front(Job::ReadMapping(reader));
                } else {
                    n.decoder = TpdoDecoder::new(reader.finish(), n.settings.objects.clone());
                    n.mapped = true;
                }
            }
            (Job::CheckStartRpdo(mut check), SdoResult::Uploaded { data, .. }) => {
                match check.on_uploaded(data) {
                    Ok(None) => n.jobs.push_front(Job::CheckStartRpdo(check)),
                    Ok(Some(cob)) => n.start = StartRpdo::Ready(cob),
                    Err(why) => n.start_unfit(why, wall, sink),
                }
            }
            (
                Job::CheckStartRpdo(check),
                SdoResult::Aborted {
                    by_server: true,
                    code,
                    ..
                },
            ) if *code == AbortCode::NO_OBJECT || *code == AbortCode::NO_SUB_INDEX => {
                let why = format!("the drive has no RPDO {} ({code})", check.number());
                n.start_unfit(why, wall, sink);
            }
            (
                job @ (Job::ReadMapping(_) | Job::WriteHeartbeat | Job::CheckStartRpdo(_)),
                SdoResult::Aborted { .. },
            ) => {
                // No answer, or a refusal that may pass (the drive was busy or booting):
                // the start-up jobs run again from this one after a growing pause. The
                // comm_error already said why.
                let retry = match job {
                    Job::ReadMapping(_) => match &n.settings.tpdos {
                        TpdoSource::Read(numbers) => {
                            MappingReader::new(numbers).ok().map(Job::ReadMapping)
                        }
                        TpdoSource::Config(_) => None,
                    },
                    Job::CheckStartRpdo(check) => StartRpdoCheck::new(check.number())
                        .ok()
                        .map(Job::CheckStartRpdo),
                    other => Some(other),
                };
                if let Some(retry) = retry {
                    n.jobs.push_front(retry);
                }
                n.jobs_not_before = Some(now + n.retry_pause);
                n.retry_pause = (n.retry_pause * 2).min(STARTUP_RETRY_MAX);
            }
            (Job::WriteHeartbeat, SdoResult::Downloaded { .. }) => {
                n.retry_pause = STARTUP_RETRY_MIN;
            }
            (Job::Poll(k), SdoResult::Uploaded { data, .. }) => {
                let Some(poll) = n.settings.polls.get(k) else {
                    return;
                };
                let o = &poll.object;
                match o.ty.decode_bytes(data) {
                    Some(raw) => {
                        let mut t = Telemetry::default();
                        t.set(&o.name, raw * o.scale + o.offset);
                        sink.push(n.events.event(wall, EventBody::Telemetry(t)));
                    }
                    None => sink.push(n.events.notice(
                        wall,
                        EventKind::CommError {
                            error: "wrong_reply",
                        },
                        format!(
                            "SDO {:#06x}:{} gave {} bytes for a {:?}",
                            o.index,
                            o.sub,
                            data.len(),
                            o.ty
                        ),
                    )),
                }
            }
            _ => {}
        }
    }
}

/// True when a TPDO of the node carries the statusword (0x6041): command jobs then wait
/// for it instead of reading it over SDO.
fn statusword_mapped(decoder: &TpdoDecoder) -> bool {
    decoder.mappings().iter().any(|m| {
        m.entries()
            .iter()
            .any(|e| e.index == crate::pdo::objects::STATUSWORD && e.sub == 0)
    })
}

/// The `late` notice of a TPDO gap of `elapsed` against `late_after`.
fn late_notice(
    events: &mut DeviceEvents,
    wall: SystemTime,
    elapsed: Duration,
    late_after: Duration,
    what: &str,
    sink: &dyn EventSink,
) {
    sink.push(events.notice(
        wall,
        EventKind::Late {
            elapsed,
            late_after,
        },
        format!(
            "{what} {} ms (late_after {} ms)",
            elapsed.as_millis(),
            late_after.as_millis()
        ),
    ));
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use servogate_core::{Event, Notice, Telemetry};

    use super::*;

    #[derive(Default)]
    struct VecSink(Mutex<Vec<Event>>);

    impl EventSink for VecSink {
        fn push(&self, event: Event) {
            self.0.lock().unwrap().push(event);
        }
    }

    impl VecSink {
        fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    const MS: Duration = Duration::from_millis(1);
    const WALL: SystemTime = SystemTime::UNIX_EPOCH;

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn f(id: u16, data: &[u8]) -> Frame {
        Frame::new(id, data).unwrap()
    }

    /// Drive `id` (device `axis-{id}`): TPDO1 maps statusword and position.
    fn node_settings(id: u8) -> NodeSettings {
        let mut objects = ObjectTable::cia402();
        let mut position = ObjectTable::builtin("position").unwrap();
        position.scale = 0.001;
        objects.insert(position);
        NodeSettings {
            tpdos: TpdoSource::Config(vec![TpdoMapping::from_raw(
                0x180 + u16::from(id),
                &[0x6041_0010, 0x6064_0020],
            )
            .unwrap()]),
            objects: Arc::new(objects),
            ..NodeSettings::new(&format!("axis-{id}"), n(id), 100 * MS)
        }
    }

    fn master(t0: Instant) -> Master {
        Master::new(vec![node_settings(1), node_settings(2)], None, t0)
    }

    /// Node 1 of [`master`], changed by `edit`, alone on the bus.
    fn master_with(edit: impl Fn(&mut NodeSettings), t0: Instant) -> Master {
        let mut settings = NodeSettings {
            tpdos: TpdoSource::Config(vec![TpdoMapping::from_raw(
                0x181,
                &[0x6041_0010, 0x6064_0020],
            )
            .unwrap()]),
            ..NodeSettings::new("axis-1", n(1), 100 * MS)
        };
        edit(&mut settings);
        let mut m = Master::new(vec![settings], None, t0);
        // The NMT start of node 1.
        assert_eq!(m.poll_transmit(), Some(f(0, &[1, 1])));
        m
    }

    fn drain(m: &mut Master) -> Vec<Frame> {
        std::iter::from_fn(|| m.poll_transmit()).collect()
    }

    #[test]
    fn a_new_master_starts_every_configured_node() {
        let mut m = master(Instant::now());
        assert_eq!(drain(&mut m), vec![f(0, &[1, 1]), f(0, &[1, 2])]);
    }

    #[test]
    fn a_heartbeat_brings_a_drive_online_and_silence_takes_it_offline() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        m.handle_frame(&f(0x701, &[0x05]), t0, WALL, &sink);
        let events = sink.take();
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0].body,
            EventBody::Availability(a) if a.state == AvailabilityState::Online));
        assert_eq!(&*events[0].device, "axis-1");
        // Node 2 never sent anything; node 1 is silent after t0.
        m.handle_timeout(t0 + 150 * MS, WALL, &sink);
        let offline: Vec<_> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Availability(a) => Some((e.device, a.reason)),
                _ => None,
            })
            .collect();
        assert_eq!(offline.len(), 2);
        assert_eq!(
            offline[0].1,
            "no heartbeat for 150 ms (1.5 x producer time 100 ms)"
        );
    }

    #[test]
    fn an_update_starts_only_new_and_changed_nodes_and_the_others_keep_state_and_seq() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.handle_frame(&f(0x701, &[0x05]), t0, WALL, &sink);
        m.handle_frame(&f(0x702, &[0x05]), t0, WALL, &sink);
        let tpdo1 = f(0x181, &[0x37, 0x02, 0xE8, 0x03, 0, 0]);
        m.handle_frame(&tpdo1, t0, WALL, &sink);
        sink.take();

        // Node 1 as it was, node 2 with another heartbeat time, node 3 new.
        let mut two = node_settings(2);
        two.heartbeat = 200 * MS;
        m.update_nodes(vec![node_settings(1), two, node_settings(3)], t0);
        assert_eq!(drain(&mut m), vec![f(0, &[1, 2]), f(0, &[1, 3])]);

        m.handle_frame(&f(0x701, &[0x05]), t0, WALL, &sink);
        m.handle_frame(&tpdo1, t0, WALL, &sink);
        m.handle_frame(&f(0x702, &[0x05]), t0, WALL, &sink);
        let events = sink.take();
        let of = |device: &str| -> Vec<&Event> {
            events.iter().filter(|e| &*e.device == device).collect()
        };
        // Node 1 kept its watch (no new availability) and goes on counting.
        let one = of("axis-1");
        assert_eq!(one.len(), 1, "{one:?}");
        assert!(matches!(one[0].body, EventBody::Telemetry(_)));
        assert_eq!(one[0].seq, 2);
        // Node 2 is watched afresh: announced again, its availability seq continued.
        let two = of("axis-2");
        assert!(matches!(&two[0].body,
            EventBody::Availability(a) if a.state == AvailabilityState::Online));
        assert_eq!(two[0].seq, 2);
    }

    #[test]
    fn an_update_that_drops_a_node_stops_watching_it() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.handle_frame(&f(0x702, &[0x05]), t0, WALL, &sink);
        m.update_nodes(vec![node_settings(1)], t0);
        sink.take();
        // Node 2's silence is no longer anybody's concern.
        m.handle_timeout(t0 + 500 * MS, WALL, &sink);
        assert!(sink.take().iter().all(|e| &*e.device != "axis-2"));
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn a_rebooted_drive_is_started_again() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.handle_frame(&f(0x702, &[0x00]), t0, WALL, &sink);
        assert_eq!(drain(&mut m), vec![f(0, &[1, 2])]);
    }

    #[test]
    fn a_tpdo_gives_a_state_change_then_telemetry_with_growing_seq() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        let tpdo = f(0x181, &[0x37, 0x02, 0xE8, 0x03, 0, 0]);
        m.handle_frame(&tpdo, t0, WALL, &sink);
        m.handle_frame(&tpdo, t0, WALL, &sink);
        let events = sink.take();
        assert_eq!(events.len(), 3);
        assert!(matches!(
            &events[0].body,
            EventBody::Notice(notice) if notice.kind == EventKind::StateChange {
                from: None,
                to: DriveState::OperationEnabled,
            }
        ));
        let EventBody::Telemetry(Telemetry { position, .. }) = &events[1].body else {
            panic!("expected telemetry");
        };
        assert_eq!(*position, Some(1.0));
        assert_eq!((events[1].seq, events[2].seq), (1, 2));
    }

    #[test]
    fn an_emcy_gives_a_fault_notice_for_its_device() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        m.handle_frame(
            &f(0x082, &[0x10, 0x23, 0x03, 0, 0, 0, 0, 0]),
            t0,
            WALL,
            &sink,
        );
        let events = sink.take();
        assert_eq!(&*events[0].device, "axis-2");
        assert!(matches!(
            &events[0].body,
            EventBody::Notice(notice) if notice.kind == EventKind::Fault {
                code: 0x2310,
                register: Some(0x03),
            }
        ));
    }

    #[test]
    fn an_sdo_abort_is_a_comm_error_and_a_result_and_the_bus_goes_on() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.sdo_upload(n(1), 0x2FFF, 0, 50 * MS, t0).unwrap();
        assert_eq!(
            drain(&mut m),
            vec![f(0x601, &[0x40, 0xFF, 0x2F, 0, 0, 0, 0, 0])]
        );
        let abort = f(0x581, &[0x80, 0xFF, 0x2F, 0, 0x00, 0x00, 0x02, 0x06]);
        let result = m.handle_frame(&abort, t0, WALL, &sink);
        assert_eq!(
            result,
            Some(SdoResult::Aborted {
                node: n(1),
                index: 0x2FFF,
                sub: 0,
                code: AbortCode::NO_OBJECT,
                by_server: true,
            })
        );
        let EventBody::Notice(notice) = &sink.take()[0].body else {
            panic!("expected a notice");
        };
        assert_eq!(notice.kind, EventKind::CommError { error: "sdo_abort" });
        assert_eq!(
            notice.message,
            "SDO 0x2fff:0 aborted by the drive: 0x06020000 (object does not exist)"
        );
        assert!(m.is_sdo_idle(n(1)));
        assert!(m.sdo_upload(n(1), 0x6041, 0, 50 * MS, t0).is_ok());
    }

    #[test]
    fn an_sdo_timeout_sends_an_abort_and_reports_a_timeout() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.sdo_upload(n(2), 0x6041, 0, 50 * MS, t0).unwrap();
        drain(&mut m);
        assert_eq!(m.poll_timeout(), Some(t0 + 50 * MS));
        let results = m.handle_timeout(t0 + 50 * MS, WALL, &sink);
        assert!(matches!(
            results[..],
            [SdoResult::Aborted {
                code: AbortCode::TIMEOUT,
                by_server: false,
                ..
            }]
        ));
        assert_eq!(
            drain(&mut m),
            vec![f(0x602, &[0x80, 0x41, 0x60, 0, 0x00, 0x00, 0x04, 0x05])]
        );
        let kinds: Vec<_> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Notice(n) => Some(n.kind),
                _ => None,
            })
            .collect();
        assert!(kinds.contains(&EventKind::CommError { error: "timeout" }));
    }

    #[test]
    fn sdo_requests_to_unknown_nodes_are_refused() {
        let mut m = master(Instant::now());
        assert_eq!(
            m.sdo_upload(n(9), 0x6041, 0, MS, Instant::now()),
            Err(SdoError::UnknownNode(n(9)))
        );
    }

    #[test]
    fn the_sync_producer_sends_on_its_period() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = Master::new(vec![], Some(SyncProducer::new(10 * MS, None, t0)), t0);
        assert_eq!(m.poll_timeout(), Some(t0));
        m.handle_timeout(t0, WALL, &sink);
        assert_eq!(drain(&mut m), vec![f(0x080, &[])]);
        assert_eq!(m.poll_timeout(), Some(t0 + 10 * MS));
    }

    /// An expedited upload response of node `id` for `index:sub` with `value` (4 bytes).
    fn upload_reply(id: u8, index: u16, sub: u8, value: u32) -> Frame {
        let mut d = vec![0x43, index as u8, (index >> 8) as u8, sub];
        d.extend_from_slice(&value.to_le_bytes());
        f(0x580 + u16::from(id), &d)
    }

    #[test]
    fn the_tpdo_mapping_is_read_over_sdo_then_tpdos_decode_with_it() {
        // Given node 4 whose TPDO1 mapping is read from the drive
        let t0 = Instant::now();
        let sink = VecSink::default();
        let settings = NodeSettings {
            tpdos: TpdoSource::Read(vec![1]),
            ..NodeSettings::new("axis-4", n(4), 100 * MS)
        };
        let mut m = Master::new(vec![settings], None, t0);
        // When the drive answers 0x1800:01, 0x1A00:00 and the two entries
        let replies = [
            (0x1800, 1, 0x184),
            (0x1A00, 0, 2),
            (0x1A00, 1, 0x6041_0010),
            (0x1A00, 2, 0x6064_0020),
        ];
        let mut asked = Vec::new();
        for (index, sub, value) in replies {
            let request = drain(&mut m).pop().expect("an SDO request");
            asked.push((request.data()[1], request.data()[2], request.data()[3]));
            assert!(!m.is_configured(n(4)));
            m.handle_frame(&upload_reply(4, index, sub, value), t0, WALL, &sink);
        }
        // Then it asked for exactly those objects, in order, and is configured
        assert_eq!(
            asked,
            vec![
                (0x00, 0x18, 1),
                (0x00, 0x1A, 0),
                (0x00, 0x1A, 1),
                (0x00, 0x1A, 2)
            ]
        );
        assert!(m.is_configured(n(4)));
        assert_eq!(m.tpdos(n(4)).len(), 1);
        // and a TPDO on 0x184 now gives telemetry
        m.handle_frame(&f(0x184, &[0x37, 0x02, 7, 0, 0, 0]), t0, WALL, &sink);
        let position = sink.take().into_iter().find_map(|e| match e.body {
            EventBody::Telemetry(t) => t.position,
            _ => None,
        });
        assert_eq!(position, Some(7.0));
    }

    #[test]
    fn the_heartbeat_time_is_written_at_start_and_again_after_a_boot_up() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let settings = NodeSettings {
            configure_heartbeat: true,
            tpdos: TpdoSource::Config(vec![]),
            ..NodeSettings::new("axis-5", n(5), 250 * MS)
        };
        let mut m = Master::new(vec![settings], None, t0);
        // 0x2B: download, expedited, 2 bytes; 250 ms = 0x00FA
        let write = f(0x605, &[0x2B, 0x17, 0x10, 0, 0xFA, 0, 0, 0]);
        assert_eq!(drain(&mut m), vec![f(0, &[1, 5]), write.clone()]);
        m.handle_frame(
            &f(0x585, &[0x60, 0x17, 0x10, 0, 0, 0, 0, 0]),
            t0,
            WALL,
            &sink,
        );
        assert!(m.is_configured(n(5)));
        // When the drive reboots, it is started and configured again
        m.handle_frame(&f(0x705, &[0x00]), t0, WALL, &sink);
        assert_eq!(drain(&mut m), vec![f(0, &[1, 5]), write]);
    }

    #[test]
    fn a_missing_tpdo_cycle_raises_late_at_once_and_the_next_one_is_uncertain() {
        // Given node 1 whose TPDO cycle must come within 20 ms
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master_with(|s| s.late_after = Some(20 * MS), t0);
        let tpdo = f(0x181, &[0x37, 0x02, 0, 0, 0, 0]);
        m.handle_frame(&f(0x701, &[0x05]), t0, WALL, &sink);
        m.handle_frame(&tpdo, t0, WALL, &sink);
        m.handle_frame(&tpdo, t0 + 10 * MS, WALL, &sink);
        sink.take();
        // When nothing comes for 20 ms, the deadline is the next wake-up and raises `late`
        assert_eq!(m.poll_timeout(), Some(t0 + 30 * MS));
        m.handle_timeout(t0 + 30 * MS, WALL, &sink);
        let late: Vec<_> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Notice(Notice {
                    kind: EventKind::Late { elapsed, .. },
                    ..
                }) => Some(elapsed),
                _ => None,
            })
            .collect();
        assert_eq!(late, vec![20 * MS]);
        // Then the cycle that finally comes is uncertain, and the one after good again
        m.handle_frame(&tpdo, t0 + 45 * MS, WALL, &sink);
        m.handle_frame(&tpdo, t0 + 55 * MS, WALL, &sink);
        let quality: Vec<_> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Telemetry(t) => Some(t.quality.late),
                _ => None,
            })
            .collect();
        assert_eq!(quality, vec![true, false]);
    }

    #[test]
    fn a_polled_object_is_read_on_its_schedule_into_telemetry() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut dc = ObjectSpec::new("dc_bus", 0x2011, 0, crate::ObjType::U32);
        dc.scale = 0.001;
        let mut m = master_with(
            |s| {
                s.polls = vec![SdoPoll {
                    object: dc.clone(),
                    every: 100 * MS,
                }]
            },
            t0,
        );
        let request = drain(&mut m).pop().unwrap();
        assert_eq!(request, f(0x601, &[0x40, 0x11, 0x20, 0, 0, 0, 0, 0]));
        m.handle_frame(&upload_reply(1, 0x2011, 0, 48_000), t0, WALL, &sink);
        let values: Vec<_> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Telemetry(t) => Some(t.values),
                _ => None,
            })
            .collect();
        assert_eq!(values, vec![vec![(Arc::from("dc_bus"), 48.0)]]);
        // The next read is due one period after the first
        assert_eq!(m.poll_timeout(), Some(t0 + 100 * MS));
        m.handle_timeout(t0 + 100 * MS, WALL, &sink);
        assert_eq!(drain(&mut m).len(), 1);
    }

    #[test]
    fn a_mapping_read_that_times_out_is_tried_again_after_a_pause() {
        // Given node 4 whose TPDO1 mapping is read from the drive
        let t0 = Instant::now();
        let sink = VecSink::default();
        let settings = NodeSettings {
            tpdos: TpdoSource::Read(vec![1]),
            ..NodeSettings::new("axis-4", n(4), Duration::ZERO)
        };
        let mut m = Master::new(vec![settings], None, t0);
        let first = drain(&mut m).pop().unwrap();
        // When the drive does not answer within the SDO timeout
        let timeout = t0 + 100 * MS;
        m.handle_timeout(timeout, WALL, &sink);
        let abort = drain(&mut m);
        assert_eq!(abort.len(), 1, "the abort frame");
        // Then nothing is asked until the pause is over, and then the read starts again
        assert_eq!(m.poll_timeout(), Some(timeout + STARTUP_RETRY_MIN));
        m.handle_timeout(timeout + STARTUP_RETRY_MIN / 2, WALL, &sink);
        assert!(drain(&mut m).is_empty());
        m.handle_timeout(timeout + STARTUP_RETRY_MIN, WALL, &sink);
        assert_eq!(drain(&mut m), vec![first]);
        assert!(!m.is_configured(n(4)));
    }

    #[test]
    fn a_tpdo_the_drive_does_not_have_is_skipped_and_the_others_are_read() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let settings = NodeSettings {
            tpdos: TpdoSource::Read(vec![1, 2]),
            ..NodeSettings::new("axis-4", n(4), Duration::ZERO)
        };
        let mut m = Master::new(vec![settings], None, t0);
        drain(&mut m);
        // 0x1800:01 does not exist on this drive
        let abort = f(0x584, &[0x80, 0x00, 0x18, 1, 0x00, 0x00, 0x02, 0x06]);
        m.handle_frame(&abort, t0, WALL, &sink);
        // so TPDO2's 0x1801:01 is asked next, at once
        assert_eq!(
            drain(&mut m),
            vec![f(0x604, &[0x40, 0x01, 0x18, 1, 0, 0, 0, 0])]
        );
        for (index, sub, value) in [(0x1801, 1, 0x284), (0x1A01, 0, 1), (0x1A01, 1, 0x606C_0020)] {
            m.handle_frame(&upload_reply(4, index, sub, value), t0, WALL, &sink);
            drain(&mut m);
        }
        assert!(m.is_configured(n(4)));
        assert_eq!(m.tpdos(n(4)).len(), 1);
        assert_eq!(m.tpdos(n(4))[0].cob_id(), 0x284);
    }
}
