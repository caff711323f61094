//! The gateway as a Sparkplug B 3.0 edge node (DESIGN.md section 10), on the forwarder of
//! `servogate-mqtt` with a contract of its own:
//!
//! - [`NodeSession`] (a [`Session`]): the Will is an NDEATH with the connection's bdSeq
//!   (a new bdSeq at every connection attempt), a new session opens with NBIRTH (seq 0,
//!   the same bdSeq, `Node Control/Rebirth`, the node's own metrics) and a DBIRTH for every
//!   device online, a clean stop says NDEATH; a rebirth request (NCMD) births everything
//!   again on the same connection, at most once per `rebirth_interval`.
//! - [`NodeFeed`] (a [`Feed`]): the events, in order, as Sparkplug messages: telemetry as
//!   DDATA, a device coming online as DBIRTH (with its current values), going offline as
//!   DDEATH, a command's outcome as DDATA of its `Command/*` metrics. Events acquired
//!   before the connection was made go out after the births, their metrics marked
//!   `is_historical`. Notices have no Sparkplug form and are passed over.
//! - [`Node`]: what both share under one lock: the sequence number (0-255 across every
//!   message of the node, so it is taken when a message is handed to the broker, in wire
//!   order), bdSeq, the metric aliases, and each device's metrics and latest values.
//!
//! Every Sparkplug message but NDEATH goes at QoS 0, not retained (the specification's
//! rule); NDEATH at QoS 1.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use rumqttc::QoS;
use servogate_core::{AvailabilityState, CommandReport, Event, EventBody, RingStats, Telemetry};
use servogate_mqtt::batch::{self, Batches, Linger, Take};
use servogate_mqtt::wire::Will;
use servogate_mqtt::{
    Batching, Control, DeviceMeta, Feed, Forwarder, Incoming, Kind, Outbox, Prepared, Session,
};
use servogate_sparkplug::device::{birth_metrics, sample_values, MetricSpec, Raw};
use servogate_sparkplug::node::{self as spb, BirthMetric};
use servogate_sparkplug::{Aliases, BdSeq, DataType, MessageType, Sequence, Topic, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, Device, Sparkplug};

/// A device's command metrics (devices with a policy): the last command's id, status and
/// reason, in the DDATA that follows its outcome.
pub const COMMAND_ID: &str = "Command/Id";
pub const COMMAND_STATUS: &str = "Command/Status";
pub const COMMAND_REASON: &str = "Command/Reason";

/// The metrics of a device: one per profile field, with its type, unit and scale.
pub fn device_specs(cfg: &Config, d: &Device) -> Vec<MetricSpec> {
    let int = |bits, signed| Raw::Int { bits, signed };
    if let Some(c) = &d.canopen {
        use servogate_canopen::objects::ObjType as T;
        return c
            .objects
            .iter()
            .map(|o| MetricSpec {
                name: o.name.clone(),
                raw: match o.ty {
                    T::Bool => Raw::Bool,
                    T::F32 => Raw::Float,
                    T::I8 | T::I16 | T::I32 | T::I64 => int(o.ty.bits(), true),
                    T::U8 | T::U16 | T::U32 | T::U64 => int(o.ty.bits(), false),
                },
                scale: o.scale,
                offset: o.offset,
                unit: o.unit.clone(),
            })
            .collect();
    }
    use servogate_modbus::profile::DataType as T;
    cfg.fields(d)
        .iter()
        .flat_map(|f| f.iter())
        .map(|f| MetricSpec {
            name: f.name.clone(),
            raw: match f.data_type {
                T::Bool => Raw::Bool,
                T::F32 | T::F64 => Raw::Float,
                T::I16 => int(16, true),
                T::U16 => int(16, false),
                T::I32 => int(32, true),
                T::U32 => int(32, false),
                T::I64 => int(64, true),
                T::U64 => int(64, false),
            },
            scale: f.scale,
            offset: f.offset,
            unit: f.unit.clone(),
        })
        .collect()
}

/// One device of the node.
#[derive(Debug)]
struct Dev {
    specs: Arc<[MetricSpec]>,
    /// The metric names of its birth: data names no other (kept, not rebuilt per sample).
    names: std::collections::HashSet<String>,
    /// Takes commands: its births carry the `Command/*` metrics.
    commands: bool,
    /// The newest sample acquired (whatever has been published): a birth's values.
    latest: Option<Telemetry>,
    /// The last availability seen.
    online: bool,
    /// A DBIRTH went out on this session (and no DDEATH since).
    born: bool,
    /// No longer configured (a reload): its DDEATH is due, then it goes.
    removed: bool,
}

/// What the session and the feed share.
#[derive(Debug)]
struct State {
    group: String,
    node: String,
    version: String,
    boot_id: String,
    seq: Sequence,
    bd_seq: BdSeq,
    /// Wills handed out: the first connection keeps bdSeq 0, each later one takes the next.
    wills: u64,
    aliases: Option<Aliases>,
    devices: BTreeMap<Arc<str>, Dev>,
    /// When the session's births went out; events acquired before are historical.
    born_at: Option<SystemTime>,
    /// A rebirth was asked for and not yet done.
    rebirth_pending: bool,
    last_rebirth: Option<Instant>,
    rebirth_interval: Duration,
    /// Births the primary host must see first: false until its STATE says online (always
    /// true without a primary host).
    host_online: bool,
    /// Messages a second of data held while away, at most.
    historical_rate: f64,
    primary_host: Option<String>,
}

/// The edge node's shared state.
#[derive(Debug)]
pub struct Node {
    state: Mutex<State>,
    /// The ring the node's metrics report on.
    ring: Arc<Outbox>,
    /// Wakes the forwarder's publisher for a rebirth or a host coming online.
    nudge: Arc<Notify>,
    /// A rebirth (or a first birth) is due: checked by the session's `due`.
    due: AtomicBool,
    births: AtomicU64,
    rebirth_requests: AtomicU64,
}

/// What the metrics show of the node.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub bd_seq: u64,
    pub births: u64,
    pub rebirth_requests: u64,
}

/// Acquired before the birth at `born_at`, at the millisecond resolution of Sparkplug
/// timestamps (the NBIRTH carries `born_at` in milliseconds).
fn held(ts: SystemTime, born_at: SystemTime) -> bool {
    ms(ts) < ms(born_at)
}

fn now_ms() -> u64 {
    ms(SystemTime::now())
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    pub fn new(
        sp: &Sparkplug,
        version: &str,
        boot_id: &str,
        ring: Arc<Outbox>,
        nudge: Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                group: sp.group_id.clone(),
                node: sp.edge_node_id.clone(),
                version: version.to_owned(),
                boot_id: boot_id.to_owned(),
                seq: Sequence::default(),
                bd_seq: BdSeq::default(),
                wills: 0,
                aliases: sp.aliases.then(Aliases::default),
                devices: BTreeMap::new(),
                born_at: None,
                rebirth_pending: false,
                last_rebirth: None,
                rebirth_interval: sp.rebirth_interval,
                host_online: sp.primary_host_id.is_none(),
                historical_rate: f64::from(sp.historical_rate),
                primary_host: sp.primary_host_id.clone(),
            }),
            ring,
            nudge,
            due: AtomicBool::new(false),
            births: AtomicU64::new(0),
            rebirth_requests: AtomicU64::new(0),
        })
    }

    pub fn figures(&self) -> Figures {
        Figures {
            bd_seq: self.lock().bd_seq.current(),
            births: self.births.load(Relaxed),
            rebirth_requests: self.rebirth_requests.load(Relaxed),
        }
    }

    /// New `[sparkplug]` settings (a reload), before the node connects again with them.
    pub fn configure(&self, sp: &Sparkplug) {
        let mut st = self.lock();
        st.group = sp.group_id.clone();
        st.node = sp.edge_node_id.clone();
        if sp.aliases != st.aliases.is_some() {
            st.aliases = sp.aliases.then(Aliases::default);
        }
        st.rebirth_interval = sp.rebirth_interval;
        st.historical_rate = f64::from(sp.historical_rate);
        if sp.primary_host_id.is_none() {
            st.host_online = true;
        } else if st.primary_host != sp.primary_host_id {
            // Another host: its STATE decides, once subscribed.
            st.host_online = false;
        }
        st.primary_host = sp.primary_host_id.clone();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The devices configured now: a kept device keeps its values and birth.
    pub fn set_devices(&self, devices: Vec<(Arc<str>, Vec<MetricSpec>, bool)>) {
        let mut st = self.lock();
        let mut old = std::mem::take(&mut st.devices);
        for (name, specs, commands) in devices {
            let dev = match old.remove(&name) {
                Some(mut d) => {
                    if *d.specs != *specs {
                        // Other metrics: the host must be told with a new birth.
                        d.born = false;
                    }
                    d.specs = specs.into();
                    d.commands = commands;
                    d
                }
                None => Dev {
                    specs: specs.into(),
                    names: Default::default(),
                    commands,
                    latest: None,
                    online: false,
                    born: false,
                    removed: false,
                },
            };
            let mut dev = dev;
            dev.removed = false;
            dev.names = dev_birth(&dev).into_iter().map(|m| m.name).collect();
            st.devices.insert(name, dev);
        }
        // A device gone that the host knows of stays until its DDEATH (the session's
        // `devices`, right after this).
        for (name, mut d) in old {
            if d.born {
                d.removed = true;
                st.devices.insert(name, d);
            }
        }
    }

    /// Sees every event as it is acquired (before any queue): the newest values and
    /// availability, for births.
    pub fn observe(&self, e: &Event) {
        match &e.body {
            EventBody::Telemetry(t) => {
                if let Some(d) = self.lock().devices.get_mut(&e.device) {
                    // In place: the sample's storage is reused from the last one.
                    match &mut d.latest {
                        Some(l) => l.clone_from(t),
                        None => d.latest = Some(t.clone()),
                    }
                }
            }
            EventBody::Availability(a) => {
                if let Some(d) = self.lock().devices.get_mut(&e.device) {
                    d.online = a.state == AvailabilityState::Online;
                }
            }
            _ => {}
        }
    }

    /// A rebirth was asked for (NCMD `Node Control/Rebirth`): done at once, or at the end
    /// of the current `rebirth_interval` when one was done just before, so a storm of
    /// requests makes one rebirth.
    pub fn request_rebirth(self: &Arc<Self>) {
        self.rebirth_requests.fetch_add(1, Relaxed);
        let wait = {
            let mut st = self.lock();
            if st.rebirth_pending {
                return;
            }
            st.rebirth_pending = true;
            st.last_rebirth
                .map(|t| st.rebirth_interval.saturating_sub(t.elapsed()))
                .unwrap_or_default()
        };
        let node = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            node.due.store(true, Relaxed);
            node.nudge.notify_one();
        });
    }

    /// The primary host's STATE: births wait for it to be online. True when the host
    /// went from online to offline while the node was born: the session must end.
    pub fn host_state(&self, online: bool) -> bool {
        let (was, born) = {
            let mut st = self.lock();
            let was = st.host_online;
            st.host_online = online;
            (was, st.born_at.is_some())
        };
        if online && !was {
            self.due.store(true, Relaxed);
            self.nudge.notify_one();
        }
        // A retained offline STATE on a new session is no news: the births just wait.
        was && !online && born
    }

    /// The metric of `device` (`""`: the node) that `alias` stands for.
    fn alias_name(&self, device: &str, alias: u64) -> Option<String> {
        let st = self.lock();
        st.aliases
            .as_ref()?
            .name_of(device, alias)
            .map(str::to_owned)
    }

    /// The node's own metrics in NBIRTH.
    fn own_metrics(&self, st: &State) -> Vec<BirthMetric> {
        let ring = self.ring.stats();
        let s = |name: &str, v: &str| BirthMetric {
            name: name.to_owned(),
            datatype: DataType::String,
            value: Some(Value::Str(v.to_owned())),
            properties: None,
        };
        let u = |name: &str, v: u64| BirthMetric {
            name: name.to_owned(),
            datatype: DataType::UInt64,
            value: Some(Value::UInt(v, DataType::UInt64)),
            properties: None,
        };
        vec![
            s("Node Info/Version", &st.version),
            s("Node Info/Boot ID", &st.boot_id),
            u("Ring/Capacity", self.ring.capacity() as u64),
            u("Ring/Events", ring.len as u64),
            u("Ring/Dropped", ring.dropped),
        ]
    }
}

fn topic_node(st: &State, kind: MessageType) -> String {
    Topic::node(&st.group, kind, &st.node).to_string()
}

fn topic_device(st: &State, kind: MessageType, device: &str) -> String {
    Topic::device(&st.group, kind, &st.node, device).to_string()
}

/// A message at QoS 0, not retained (every Sparkplug message but NDEATH).
fn qos0(topic: String, payload: spb_proto::Payload) -> Control {
    Control {
        topic,
        payload: payload.encode_to_vec(),
        qos: QoS::AtMostOnce,
        retain: false,
    }
}

use servogate_sparkplug::proto as spb_proto;

/// A device's birth metrics: its fields, `state`, `quality`, and the command metrics.
fn dev_birth(d: &Dev) -> Vec<BirthMetric> {
    let mut m = birth_metrics(&d.specs, d.latest.as_ref());
    if d.commands {
        for name in [COMMAND_ID, COMMAND_STATUS, COMMAND_REASON] {
            m.push(BirthMetric {
                name: name.to_owned(),
                datatype: DataType::String,
                value: None,
                properties: None,
            });
        }
    }
    m
}

impl State {
    fn dbirth(&mut self, device: &Arc<str>, now: u64) -> Option<Control> {
        let d = self.devices.get(device)?;
        let metrics = dev_birth(d);
        let topic = topic_device(self, MessageType::DBirth, device);
        let payload = spb::dbirth(&mut self.seq, self.aliases.as_mut(), device, &metrics, now);
        if let Some(d) = self.devices.get_mut(device) {
            d.born = true;
        }
        Some(qos0(topic, payload))
    }

    fn ddeath(&mut self, device: &Arc<str>, now: u64) -> Control {
        let topic = topic_device(self, MessageType::DDeath, device);
        if let Some(d) = self.devices.get_mut(device) {
            d.born = false;
        }
        qos0(topic, spb::ddeath(&mut self.seq, now))
    }

    /// NBIRTH and the DBIRTH of every device online.
    fn births(&mut self, own: Vec<BirthMetric>, out: &mut VecDeque<Control>) {
        // One instant for the NBIRTH's timestamp and the line between held and live data,
        // so a host reading timestamps draws it where we did.
        let born = SystemTime::now();
        let now = ms(born);
        let topic = topic_node(self, MessageType::NBirth);
        let nbirth = spb::nbirth(
            &mut self.seq,
            &self.bd_seq,
            self.aliases.as_mut(),
            &own,
            now,
        );
        out.push_back(qos0(topic, nbirth));
        // A new birth forgets the devices a reload removed: the host learns the node anew.
        self.devices.retain(|_, d| !d.removed);
        let names: Vec<Arc<str>> = self.devices.keys().cloned().collect();
        for name in names {
            let online = self
                .devices
                .get(&name)
                .is_some_and(|d| d.online && !d.removed);
            if online {
                if let Some(c) = self.dbirth(&name, now) {
                    out.push_back(c);
                }
            } else if let Some(d) = self.devices.get_mut(&name) {
                d.born = false;
            }
        }
        self.born_at = Some(born);
        self.rebirth_pending = false;
        self.last_rebirth = Some(Instant::now());
    }
}

/// The edge node's side of its connection.
pub struct NodeSession(pub Arc<Node>);

impl Session for NodeSession {
    fn will(&mut self) -> Will {
        let mut st = self.0.lock();
        if st.wills > 0 {
            st.bd_seq.next_session();
        }
        st.wills += 1;
        // Nothing is born on the next connection until its NBIRTH.
        st.born_at = None;
        Will {
            topic: topic_node(&st, MessageType::NDeath),
            payload: spb::ndeath(&st.bd_seq, now_ms()).encode_to_vec(),
            retain: false,
        }
    }

    fn opening(&mut self, closing: bool, out: &mut VecDeque<Control>) {
        let mut st = self.0.lock();
        for d in st.devices.values_mut() {
            d.born = false;
        }
        st.born_at = None;
        if closing || !st.host_online {
            // A primary host not online yet: the births wait for its STATE.
            return;
        }
        let own = self.0.own_metrics(&st);
        st.births(own, out);
        self.0.births.fetch_add(1, Relaxed);
        info!(bd_seq = st.bd_seq.current(), "Sparkplug NBIRTH");
    }

    fn devices(&mut self, list: &[DeviceMeta], out: &mut VecDeque<Control>) {
        // The node's device table was set by the daemon before this list was sent: a
        // device gone dies, a device with other metrics is born again.
        let mut st = self.0.lock();
        if st.born_at.is_none() {
            return;
        }
        let now = now_ms();
        let listed: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
        let names: Vec<Arc<str>> = st.devices.keys().cloned().collect();
        for name in names {
            let (online, born, removed) = st
                .devices
                .get(&name)
                .map_or((false, false, true), |d| (d.online, d.born, d.removed));
            if removed || !listed.contains(&&*name) {
                if born {
                    out.push_back(st.ddeath(&name, now));
                }
                st.devices.remove(&name);
            } else if online && !born {
                if let Some(c) = st.dbirth(&name, now) {
                    out.push_back(c);
                }
            }
        }
    }

    fn due(&mut self, out: &mut VecDeque<Control>) {
        if !self.0.due.swap(false, Relaxed) {
            return;
        }
        let mut st = self.0.lock();
        if !st.host_online {
            return;
        }
        let first = st.born_at.is_none();
        if !first && !st.rebirth_pending {
            return;
        }
        let own = self.0.own_metrics(&st);
        st.births(own, out);
        self.0.births.fetch_add(1, Relaxed);
        info!(
            bd_seq = st.bd_seq.current(),
            first, "Sparkplug NBIRTH (rebirth)"
        );
    }

    fn farewell_last(&self) -> bool {
        true
    }

    fn farewell(&mut self) -> Control {
        let st = self.0.lock();
        Control {
            topic: topic_node(&st, MessageType::NDeath),
            payload: spb::ndeath(&st.bd_seq, now_ms()).encode_to_vec(),
            qos: QoS::AtLeastOnce,
            retain: false,
        }
    }
}

/// An event waiting for its birth to go first.
#[derive(Debug)]
struct Held {
    id: u64,
    event: Event,
}

/// Ids of messages the feed made itself (births before their data): nothing to ack.
const OWN: u64 = 1 << 63;

/// The events as Sparkplug messages (see the module doc).
#[derive(Debug)]
pub struct NodeFeed {
    ring: Arc<Outbox>,
    node: Arc<Node>,
    /// An event whose device's DBIRTH was just handed: it goes next.
    held: Mutex<Option<Held>>,
    /// Several samples of a device per DDATA (`[mqtt] batch_max`).
    batching: Mutex<Batching>,
    batches: Batches,
    linger: Linger,
    pace: Mutex<Pace>,
}

impl NodeFeed {
    pub fn new(ring: Arc<Outbox>, node: Arc<Node>) -> Self {
        Self {
            ring,
            node,
            held: Mutex::new(None),
            batching: Mutex::default(),
            batches: Batches::default(),
            linger: Linger::default(),
            pace: Mutex::new(Pace {
                born_at: None,
                live_from: 0,
                live_cursor: 0,
                tokens: 0.0,
                refilled: std::time::Instant::now(),
            }),
        }
    }

    /// Telemetry of one device goes in DDATA of up to `b.max` samples.
    pub fn set_batching(&self, b: Batching) {
        *self.batching.lock().unwrap_or_else(PoisonError::into_inner) = b;
    }

    /// A batch of samples of one born device as one DDATA: each metric with its sample's
    /// timestamp, in order.
    fn batch_ddata(&self, st: &mut State, events: &[Event]) -> Option<Prepared> {
        let first = events.first()?;
        let born_at = st.born_at?;
        let dev = st.devices.get(&first.device)?;
        let mut metrics = Vec::new();
        let mut scratch = Sequence::default();
        let now = now_ms();
        for e in events {
            let EventBody::Telemetry(t) = &e.body else {
                continue;
            };
            let mut values = sample_values(&dev.specs, t);
            values.retain(|(n, _)| dev.names.contains(*n));
            let one = spb::ddata(
                &mut scratch,
                st.aliases.as_mut(),
                &e.device,
                &values,
                ms(e.ts),
                now,
                held(e.ts, born_at),
            );
            metrics.extend(one.metrics);
        }
        let payload = spb_proto::Payload {
            timestamp: Some(now),
            metrics,
            seq: Some(st.seq.take()),
            ..Default::default()
        };
        let topic = topic_device(st, MessageType::DData, &first.device);
        Some(Self::prepared(topic, payload, first))
    }

    fn held(&self) -> MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One DDATA of `e`'s device with `values`, acquired at `e`'s time (the node's seq
    /// and aliases passed apart, so a device's borrowed values can go along).
    fn ddata(
        (seq, aliases): (&mut Sequence, Option<&mut Aliases>),
        topic: String,
        e: &Event,
        values: &[(&str, Value)],
        (now, historical): (u64, bool),
    ) -> Prepared {
        let payload = spb::ddata(seq, aliases, &e.device, values, ms(e.ts), now, historical);
        Self::prepared(topic, payload, e)
    }

    fn prepared(topic: String, payload: spb_proto::Payload, e: &Event) -> Prepared {
        Prepared {
            topic,
            payload: payload.encode_to_vec(),
            kind: Kind::Sparkplug,
            device: e.device.clone(),
            seq: e.seq,
            reply: None,
        }
    }

    /// The message of `e`, if it has one; a DBIRTH first when its device is not born.
    fn encode(&self, st: &mut State, e: &Event) -> Encoded {
        let Some(born_at) = st.born_at else {
            // Not born on this connection (a primary host not online): nothing goes.
            return Encoded::NotNow;
        };
        let Some(dev) = st.devices.get(&e.device).filter(|d| !d.removed) else {
            return Encoded::Skip;
        };
        let now = now_ms();
        let historical = held(e.ts, born_at);
        match &e.body {
            EventBody::Telemetry(t) => {
                if !dev.born {
                    return Encoded::BirthFirst;
                }
                // Only what the birth named (a field the profile does not list never
                // reaches here, but a host must never see an unborn metric).
                let mut values = sample_values(&dev.specs, t);
                values.retain(|(n, _)| dev.names.contains(*n));
                let topic = topic_device(st, MessageType::DData, &e.device);
                let node = (&mut st.seq, st.aliases.as_mut());
                Encoded::Message(Self::ddata(node, topic, e, &values, (now, historical)))
            }
            EventBody::Availability(a) => match (a.state, dev.born) {
                (AvailabilityState::Online, false) => match st.dbirth(&e.device, now) {
                    Some(c) => Encoded::Message(of_control(c, e)),
                    None => Encoded::Skip,
                },
                (AvailabilityState::Offline, true) => {
                    Encoded::Message(of_control(st.ddeath(&e.device, now), e))
                }
                _ => Encoded::Skip,
            },
            EventBody::CommandResult(r) if dev.commands => {
                if !dev.born {
                    return Encoded::Skip;
                }
                let topic = topic_device(st, MessageType::DData, &e.device);
                let node = (&mut st.seq, st.aliases.as_mut());
                let values = command_values(r);
                Encoded::Message(Self::ddata(node, topic, e, &values, (now, historical)))
            }
            _ => Encoded::Skip,
        }
    }
}

impl NodeFeed {
    /// The next message from the front of the ring (a batch when batching is on).
    fn take_in_order(&self, st: &mut State, held: &mut Option<Held>) -> Option<(u64, Prepared)> {
        let batching = *self.batching.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if batching.on() {
                let mut ring = self.ring.lock();
                let (_, head) = ring.peek_next()?;
                let born = matches!(head.body, EventBody::Telemetry(_))
                    && st
                        .devices
                        .get(&head.device)
                        .is_some_and(|d| d.born && !d.removed);
                if born {
                    let mut events = Vec::new();
                    let flush = self.linger.flushing();
                    let taken =
                        batch::take(&mut ring, batching, flush, SystemTime::now(), |_, e| {
                            events.push(e.clone())
                        });
                    drop(ring);
                    return match taken {
                        Take::Empty => None,
                        Take::WaitUntil(at) => {
                            self.linger.wait_until(at);
                            None
                        }
                        Take::Taken(ids) => {
                            let p = self.batch_ddata(st, &events)?;
                            let first = ids[0];
                            self.batches.insert(ids);
                            Some((first, p))
                        }
                    };
                }
            }
            let (id, event) = {
                let mut ring = self.ring.lock();
                let (id, e) = ring.take_next()?;
                (id, e.clone())
            };
            if let Some(out) = self.one(st, held, id, event) {
                return out;
            }
        }
    }

    /// The message of one taken event; `None`: it had none (acknowledged), take another.
    fn one(
        &self,
        st: &mut State,
        held: &mut Option<Held>,
        id: u64,
        event: Event,
    ) -> Option<Option<(u64, Prepared)>> {
        match self.encode(st, &event) {
            Encoded::Message(p) => Some(Some((id, p))),
            Encoded::Skip => {
                self.ring.lock().ack(id);
                None
            }
            Encoded::NotNow => {
                self.ring.lock().requeue(id);
                Some(None)
            }
            Encoded::BirthFirst => {
                let Some(c) = st.dbirth(&event.device, now_ms()) else {
                    self.ring.lock().ack(id);
                    return None;
                };
                debug!(device = %event.device, "DBIRTH before the device's first data");
                let birth = of_control(c, &event);
                *held = Some(Held { id, event });
                Some(Some((OWN, birth)))
            }
        }
    }
}

/// Pacing of what was held while the node was away (see [`NodeFeed`]).
#[derive(Debug)]
struct Pace {
    /// The session (or rebirth) this split belongs to.
    born_at: Option<SystemTime>,
    /// Ring ids from here on were queued after the births: live.
    live_from: u64,
    /// Where the next live entry is looked for.
    live_cursor: u64,
    /// A token bucket of `historical_rate` messages a second.
    tokens: f64,
    refilled: std::time::Instant,
}

/// What one event becomes.
enum Encoded {
    Message(Prepared),
    /// Its device must be born first: a DBIRTH goes, the event right after.
    BirthFirst,
    /// No Sparkplug form (a notice, an unknown device): passed over.
    Skip,
    /// Not now: the node is not born on this connection.
    NotNow,
}

/// A birth or death message made for `e` (it goes in `e`'s place in the feed).
fn of_control(c: Control, e: &Event) -> Prepared {
    Prepared {
        topic: c.topic,
        payload: c.payload,
        kind: Kind::Sparkplug,
        device: e.device.clone(),
        seq: e.seq,
        reply: None,
    }
}

fn command_values(r: &CommandReport) -> Vec<(&'static str, Value)> {
    vec![
        (
            COMMAND_ID,
            Value::Str(r.id.as_deref().unwrap_or("").to_owned()),
        ),
        (COMMAND_STATUS, Value::Str(r.status.as_str().to_owned())),
        (
            COMMAND_REASON,
            Value::Str(r.reason.map_or("", |x| x.as_str()).to_owned()),
        ),
    ]
}

impl Feed for NodeFeed {
    fn take_next(&self, _prefix: &str) -> Option<(u64, Prepared)> {
        let mut held = self.held();
        let mut st = self.node.lock();
        if let Some(h) = held.take() {
            return match self.encode(&mut st, &h.event) {
                Encoded::Message(p) => Some((h.id, p)),
                Encoded::NotNow => {
                    *held = Some(h);
                    None
                }
                Encoded::Skip | Encoded::BirthFirst => {
                    // Cannot be born (removed meanwhile): passed over.
                    self.ring.lock().ack(h.id);
                    drop(st);
                    drop(held);
                    self.take_next(_prefix)
                }
            };
        }
        // Not born on this connection yet: nothing goes before the births.
        let born_at = st.born_at?;
        let mut pace = self.pace.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ring = self.ring.lock();
        if pace.born_at != Some(born_at) {
            // A new session (or a rebirth): what is queued now was acquired before it.
            let next = ring.next_id();
            *pace = Pace {
                born_at: Some(born_at),
                live_from: next,
                live_cursor: next,
                tokens: 1.0,
                refilled: std::time::Instant::now(),
            };
        }
        let backlog = ring.peek_next().is_some_and(|(id, _)| id < pace.live_from);
        if !backlog {
            drop(ring);
            drop(pace);
            return self.take_in_order(&mut st, &mut held);
        }
        // Held events of the outage go out behind live data, at most `historical_rate`
        // messages a second, so a long backlog never holds the present back.
        drop(ring);
        loop {
            let mut live = None;
            let from = pace.live_cursor;
            self.ring
                .lock()
                .take_after(from.saturating_sub(1), batch::SCAN, 1, |id, e| {
                    live = Some((id, e.clone()));
                    true
                });
            let Some((id, event)) = live else {
                break;
            };
            pace.live_cursor = id + 1;
            if let Some(out) = self.one(&mut st, &mut held, id, event) {
                return out;
            }
        }
        let rate = st.historical_rate;
        let now = std::time::Instant::now();
        pace.tokens = (pace.tokens + now.duration_since(pace.refilled).as_secs_f64() * rate)
            .min(rate.max(1.0) / 10.0 + 1.0);
        pace.refilled = now;
        if pace.tokens < 1.0 && !self.linger.flushing() {
            let wait = Duration::from_secs_f64((1.0 - pace.tokens) / rate.max(1e-3));
            self.linger.wait_until(now + wait);
            return None;
        }
        pace.tokens -= 1.0;
        drop(pace);
        self.take_in_order(&mut st, &mut held)
    }

    fn ack(&self, id: u64) {
        if id & OWN == 0 {
            self.batches.ack(&mut self.ring.lock(), id);
        }
    }

    fn requeue(&self, id: u64) {
        if id & OWN == 0 {
            self.batches.requeue(&mut self.ring.lock(), id);
        }
    }

    fn requeue_all(&self) -> usize {
        // A held event was handed by the ring: it goes back with the rest.
        self.held().take();
        self.batches.clear();
        self.ring.lock().requeue_all()
    }

    fn wake_at(&self) -> Option<std::time::Instant> {
        self.linger.wake_at()
    }

    fn flush(&self, on: bool) {
        self.linger.set_flushing(on);
    }

    fn unacked(&self) -> usize {
        self.ring.stats().unacked
    }

    fn has_unsent(&self) -> bool {
        // Not born: nothing can go, so nothing waits to.
        let held = self.held().is_some();
        let born = self.node.lock().born_at.is_some();
        born && (held || self.ring.lock().has_unsent())
    }

    fn notify(&self) -> &Notify {
        self.ring.notify()
    }

    fn stats(&self) -> RingStats {
        self.ring.stats()
    }
}

/// What the edge node's connection is built from; a change (a reload) reconnects it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    pub mqtt: servogate_mqtt::MqttSettings,
    pub sparkplug: Sparkplug,
    /// `{prefix}` of the JSON command topics the desk reads.
    pub prefix: String,
    /// Devices that take commands, with their `max_age` (a DCMD's time to live).
    pub commands: BTreeMap<String, Option<Duration>>,
    /// Samples of a device per DDATA.
    pub batching: Batching,
}

/// The parts of the edge node that live as long as the process.
#[derive(Debug, Clone)]
pub struct NodeParts {
    pub node: Arc<Node>,
    pub feed: Arc<NodeFeed>,
    pub nudge: Arc<Notify>,
    /// The edge node connection's counters (across reconnects and reloads).
    pub stats: Arc<servogate_mqtt::MqttStats>,
    /// Sparkplug messages that could not be read (bad protobuf, bad STATE).
    pub unreadable: Arc<std::sync::atomic::AtomicU64>,
}

/// The topics the edge node subscribes to: its NCMD, its devices' DCMD, and the primary
/// host's STATE. Subscribed before the NBIRTH of every session (the forwarder sends
/// SUBSCRIBE ahead of the session's opening).
pub fn filters(sp: &Sparkplug) -> Vec<String> {
    let ns = servogate_sparkplug::topic::NAMESPACE;
    let (g, n) = (&sp.group_id, &sp.edge_node_id);
    let mut f = vec![format!("{ns}/{g}/NCMD/{n}"), format!("{ns}/{g}/DCMD/{n}/+")];
    if let Some(h) = &sp.primary_host_id {
        f.push(format!("{ns}/STATE/{h}"));
    }
    f
}

/// A forwarder of the edge node, running.
struct Running {
    task:
        tokio::task::JoinHandle<Result<servogate_mqtt::ForwarderReport, servogate_mqtt::MqttError>>,
    stop: CancellationToken,
    handover: CancellationToken,
}

impl Running {
    async fn end(mut self, token_of: fn(&Self) -> &CancellationToken, grace: Duration) {
        token_of(&self).cancel();
        let grace = grace + Duration::from_secs(2);
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => warn!("Sparkplug forwarder stopped with an error: {e}"),
            Ok(Err(e)) => warn!("Sparkplug forwarder task failed: {e}"),
            Err(_) => {
                warn!("Sparkplug forwarder did not stop within {grace:?}");
                self.task.abort();
            }
        }
    }
}

/// Everything [`run_node`] needs besides its settings.
pub struct NodeRun {
    pub parts: NodeParts,
    pub boot_id: String,
    pub version: String,
    /// Device lists (a reload): DBIRTH for a new device, DDEATH for a removed one.
    pub meta: watch::Sender<Vec<DeviceMeta>>,
    /// The command desk's intake: a DCMD becomes a command there.
    pub desk: mpsc::Sender<Incoming>,
}

/// Runs the edge node until `stop`: its connection (restarted when `settings` change or
/// the primary host goes offline), and what arrives on its subscriptions.
pub async fn run_node(
    run: NodeRun,
    mut settings: watch::Receiver<NodeSettings>,
    stop: CancellationToken,
    grace: Duration,
) {
    let (tx, mut rx) = mpsc::channel::<Incoming>(INTAKE);
    let mut current = settings.borrow_and_update().clone();
    let start = |s: &NodeSettings| -> Option<Running> {
        run.parts.feed.set_batching(s.batching);
        let forwarder = match Forwarder::new(
            s.mqtt.clone(),
            run.boot_id.clone(),
            run.version.clone(),
            run.parts.feed.clone(),
            Vec::new(),
        ) {
            Ok(f) => f,
            Err(e) => {
                error!("the Sparkplug edge node cannot connect: {e}");
                return None;
            }
        };
        let forwarder = forwarder
            .with_session(
                Box::new(NodeSession(run.parts.node.clone())),
                run.parts.nudge.clone(),
            )
            .with_stats(run.parts.stats.clone())
            .with_meta_updates(run.meta.subscribe())
            .with_intake(servogate_mqtt::Intake {
                filters: filters(&s.sparkplug),
                tx: tx.clone(),
                dropped: run.parts.unreadable.clone(),
            });
        let stop = CancellationToken::new();
        let handover = forwarder.handover_token();
        let task = tokio::spawn(forwarder.run(stop.clone()));
        Some(Running {
            task,
            stop,
            handover,
        })
    };
    let mut running = start(&current);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = settings.changed() => {
                if changed.is_err() {
                    break;
                }
                let new = settings.borrow_and_update().clone();
                // The connection's own settings reconnect; the command table does not.
                let reconnect = new.mqtt != current.mqtt
                    || new.sparkplug != current.sparkplug
                    || new.batching != current.batching;
                if !reconnect {
                    current = new;
                } else {
                    info!("Sparkplug settings changed: the edge node reconnects");
                    if let Some(r) = running.take() {
                        r.end(|r| &r.handover, Duration::ZERO).await;
                    }
                    run.parts.node.configure(&new.sparkplug);
                    current = new;
                    running = start(&current);
                }
            }
            Some(msg) = rx.recv() => {
                if take(&run, &current, msg) == Next::Reconnect {
                    // The primary host went offline: NDEATH, then a new session whose
                    // births wait for the host (Sparkplug 3.0, host application state).
                    info!("primary host offline: NDEATH and a new session");
                    if let Some(r) = running.take() {
                        r.end(|r| &r.handover, Duration::ZERO).await;
                    }
                    running = start(&current);
                }
            }
            ended = async { (&mut running.as_mut()?.task).await.ok() }, if running.is_some() => {
                warn!(?ended, "the Sparkplug forwarder ended: starting it again");
                tokio::time::sleep(current.mqtt.reconnect_min).await;
                running = start(&current);
            }
        }
    }
    if let Some(r) = running.take() {
        r.end(|r| &r.stop, grace).await;
    }
}

/// Messages from the edge node's subscriptions waiting to be read.
const INTAKE: usize = 256;

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Go,
    Reconnect,
}

/// One message on the node's subscriptions.
fn take(run: &NodeRun, s: &NodeSettings, msg: Incoming) -> Next {
    let topic = msg.topic.clone();
    let bad = |why: &str| {
        let n = run.parts.unreadable.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(%topic, count = n, "Sparkplug message ignored: {why}");
        }
    };
    match Topic::parse(&topic) {
        Some(Topic::State { host }) => {
            if s.sparkplug.primary_host_id.as_deref() != Some(host.as_str()) {
                return Next::Go;
            }
            let online = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get("online").and_then(serde_json::Value::as_bool));
            match online {
                Some(true) => {
                    info!(host, "primary host online");
                    run.parts.node.host_state(true);
                }
                Some(false) => {
                    info!(host, "primary host offline");
                    if run.parts.node.host_state(false) {
                        return Next::Reconnect;
                    }
                }
                None => bad("a STATE payload without \"online\""),
            }
        }
        Some(Topic::Node {
            kind: MessageType::NCmd,
            ..
        }) => {
            let Ok(p) = spb_proto::Payload::decode(msg.payload.as_ref()) else {
                bad("not a Sparkplug B payload");
                return Next::Go;
            };
            for m in &p.metrics {
                let name = m.name.clone().or_else(|| {
                    let alias = m.alias?;
                    run.parts.node.alias_name("", alias)
                });
                match (name.as_deref(), &m.value) {
                    (Some(spb::REBIRTH), Some(spb_proto::MetricValue::BooleanValue(true))) => {
                        info!("rebirth requested (NCMD)");
                        run.parts.node.request_rebirth();
                    }
                    _ => bad("an NCMD metric the node does not have"),
                }
            }
        }
        Some(Topic::Device {
            kind: MessageType::DCmd,
            device,
            ..
        }) => dcmd(run, s, &device, msg, &bad),
        _ => bad("a topic the node does not answer"),
    }
    Next::Go
}

/// A DCMD: a write of each metric, as a `write` command of section 7 through the desk,
/// so the device's policy decides (allow, writable, limits, deadline, dedup). Its id is
/// made from the DCMD's timestamp and bytes (a repeated DCMD is the same command), its
/// deadline is the DCMD's timestamp plus the device's `max_age`.
fn dcmd(run: &NodeRun, s: &NodeSettings, device: &str, msg: Incoming, bad: &dyn Fn(&str)) {
    let Some(max_age) = s.commands.get(device) else {
        bad("a DCMD for a device that takes no commands");
        return;
    };
    let Ok(p) = spb_proto::Payload::decode(msg.payload.as_ref()) else {
        bad("not a Sparkplug B payload");
        return;
    };
    let mut values = serde_json::Map::new();
    for m in &p.metrics {
        let name = m
            .name
            .clone()
            .or_else(|| run.parts.node.alias_name(device, m.alias?));
        let (Some(name), Some(v)) = (name, m.value.as_ref().and_then(|v| number(m.datatype, v)))
        else {
            bad("a DCMD metric without a name or a number");
            return;
        };
        values.insert(name, v);
    }
    let ts = p.timestamp.unwrap_or_else(now_ms);
    let mut cmd = serde_json::json!({
        "id": format!("dcmd-{ts}-{:016x}", fnv1a(&msg.payload)),
        "action": "write",
        "values": values,
    });
    if let Some(age) = max_age {
        cmd["ts"] = serde_json::json!(servogate_mqtt::payload::rfc3339_millis(
            UNIX_EPOCH + Duration::from_millis(ts)
        ));
        cmd["ttl_ms"] = serde_json::json!(age.as_millis() as u64);
    }
    let incoming = Incoming {
        topic: format!("{}/devices/{device}/cmd", s.prefix),
        payload: cmd.to_string().into_bytes().into(),
        ..msg
    };
    if run.desk.try_send(incoming).is_err() {
        bad("the command intake is full");
    }
}

/// A metric's value as a JSON number (integers by their Sparkplug type's sign).
fn number(datatype: Option<u32>, v: &spb_proto::MetricValue) -> Option<serde_json::Value> {
    use spb_proto::MetricValue as V;
    let ty = datatype.and_then(|d| DataType::try_from(d as i32).ok());
    Some(match (v, ty) {
        // Signed values by their own width: a host may send an Int16 of -5 as 0xFFFB
        // or sign-extended as 0xFFFFFFFB; both are -5.
        (V::IntValue(i), Some(DataType::Int8)) => serde_json::json!(*i as u8 as i8),
        (V::IntValue(i), Some(DataType::Int16)) => serde_json::json!(*i as u16 as i16),
        (V::IntValue(i), Some(DataType::Int32)) => serde_json::json!(*i as i32),
        (V::LongValue(l), Some(DataType::Int64)) => serde_json::json!(*l as i64),
        (V::IntValue(i), _) => serde_json::json!(i),
        (V::LongValue(l), _) => serde_json::json!(l),
        (V::FloatValue(f), _) => serde_json::Number::from_f64(f64::from(*f))?.into(),
        (V::DoubleValue(d), _) => serde_json::Number::from_f64(*d)?.into(),
        (V::BooleanValue(b), _) => serde_json::json!(u8::from(*b)),
        _ => return None,
    })
}

/// 64-bit FNV-1a: a DCMD's identity in its command id.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spb_proto::MetricValue as V;

    #[test]
    fn a_dcmd_int16_of_minus_five_reads_the_same_in_either_width() {
        let int16 = Some(DataType::Int16 as u32);
        assert_eq!(
            number(int16, &V::IntValue(0xFFFB)),
            Some(serde_json::json!(-5))
        );
        assert_eq!(
            number(int16, &V::IntValue(0xFFFF_FFFB)),
            Some(serde_json::json!(-5))
        );
        let uint16 = Some(DataType::UInt16 as u32);
        assert_eq!(
            number(uint16, &V::IntValue(0xFFFB)),
            Some(serde_json::json!(65531))
        );
        assert_eq!(
            number(Some(DataType::Double as u32), &V::DoubleValue(f64::NAN)),
            None,
            "not a number a command can carry"
        );
        assert_eq!(number(None, &V::StringValue("x".into())), None);
    }

    #[test]
    fn a_dcmd_id_is_the_same_for_the_same_bytes() {
        assert_eq!(fnv1a(b"abc"), fnv1a(b"abc"));
        assert_ne!(fnv1a(b"abc"), fnv1a(b"abd"));
    }
}
