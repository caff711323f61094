//! The forwarder: moves events from the [`Outbox`] to the broker and removes each one only
//! after the broker acknowledged it (DESIGN.md section 4).
//!
//! Two tasks share one small [`Track`] under a `std` mutex:
//!
//! - the **event loop task** only calls `EventLoop::poll()` and updates `Track`; it never
//!   awaits anything else while connected, so rumqttc is never stalled by us (rumqttc issues
//!   1025, 910);
//! - the **publisher** (the `run` future) takes entries from the ring and hands them to
//!   rumqttc with `try_publish`, which never waits: the in-flight window (below) guarantees
//!   the request channel has room.
//!
//! Matching acknowledgements to ring entries: rumqttc takes requests from its channel in
//! order and reports each with `Outgoing::Publish(pkid)`, so the publisher pushes what it
//! hands on the `handed` FIFO and the event loop pops the front on each such event (pkid 0
//! = QoS 0: done once written; else the pkid is remembered in `on_wire` until its PUBACK).
//!
//! A lost connection: rumqttc discards everything unacknowledged when the broker answers
//! with a new session (PITFALLS.md), so the event loop task, under the `Track` lock, marks
//! the connection down, drains rumqttc's request channel itself (`EventLoop::clean`) and
//! forgets its pending queue, forgets `handed`/`on_wire`, and puts every handed ring entry
//! back to unsent. The publisher hands requests only under the same lock and only while
//! connected, so after that nothing of the old connection is left anywhere: no request can
//! slip into the channel between rumqttc's own clean-up and ours and be matched to the
//! wrong entry later.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rumqttc::QoS;
use servogate_core::ring::Id;
use servogate_core::{ReplyTo, RingStats};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::feed::{Feed, Kind, Prepared};
use crate::payload::{self, DeviceMeta};
use crate::session::{Control, JsonSession, Session};
use crate::settings::{BrokerUrl, MqttError, MqttSettings};
use crate::wire::{Client, Conn, Ev, Props, Version};

/// Largest number of publishes handed to rumqttc and not yet acknowledged.
///
/// Why bounded: rumqttc keeps whatever it accepted in memory and throws it away on a new
/// session; the ring is where events wait. 1000 is rumqttc's in-flight setting too (its
/// packet ids run 1..=1000), well below MQTT's 65535 packet ids; at ~30k msg/s on loopback
/// it is ~30 ms of traffic, enough to keep the link busy.
pub const MAX_IN_FLIGHT: usize = 1000;

/// rumqttc request channel: the window plus room for the final DISCONNECT.
const CHANNEL_CAPACITY: usize = MAX_IN_FLIGHT + 8;

/// Publishes per pump before yielding to other tasks.
const PUMP_BATCH: usize = 256;

/// A publish that arrived on a subscription (a command), as the event loop saw it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub payload: bytes::Bytes,
    /// The broker's retain flag: set only for a message retained before we subscribed,
    /// so a stale one.
    pub retain: bool,
    /// Receipt, wall clock and monotonic.
    pub received: SystemTime,
    pub at: std::time::Instant,
    /// MQTT 5: the Response Topic and Correlation Data the result also goes to.
    pub reply: Option<Arc<ReplyTo>>,
    /// MQTT 5: the Message Expiry left when the broker delivered it.
    pub expiry: Option<Duration>,
}

/// Where incoming commands go: the topic filters to subscribe to on every new session,
/// and a bounded channel the event loop task fills with `try_send` (it never waits: a
/// full channel drops the message, counted and logged).
#[derive(Debug, Clone)]
pub struct Intake {
    pub filters: Vec<String>,
    pub tx: tokio::sync::mpsc::Sender<Incoming>,
    /// Messages dropped because the channel was full.
    pub dropped: Arc<AtomicU64>,
}

/// Counters the daemon can read at any time (all monotonic except `connected`).
#[derive(Debug, Default)]
pub struct MqttStats {
    connected: AtomicBool,
    connects: AtomicU64,
    connection_errors: AtomicU64,
    publishes: AtomicU64,
    acks: AtomicU64,
    republished: AtomicU64,
    control_publishes: AtomicU64,
    refused: AtomicU64,
    responses: AtomicU64,
    /// MQTT 5 publishes the broker refused, by reason code name.
    broker_refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// A copy of [`MqttStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStatsSnapshot {
    /// The broker accepted our CONNECT and the connection has not failed since.
    pub connected: bool,
    /// CONNACKs received (the first connect and every reconnect).
    pub connects: u64,
    /// Failed connection attempts and lost connections.
    pub connection_errors: u64,
    /// Ring events handed to rumqttc (a re-published event counts again).
    pub publishes: u64,
    /// Ring events confirmed: PUBACK for QoS 1, written to the socket for QoS 0.
    pub acks: u64,
    /// Ring events handed again because their connection was lost before the PUBACK.
    pub republished: u64,
    /// Status, meta and retained availability messages (birth and after every reconnect).
    pub control_publishes: u64,
    /// Ring events that could never be sent (packet larger than `max_packet_size`, or a
    /// device name that makes an invalid topic): logged, counted and removed from the ring.
    pub refused: u64,
    /// Command results also published on an MQTT 5 Response Topic.
    pub responses: u64,
}

impl MqttStats {
    pub fn snapshot(&self) -> MqttStatsSnapshot {
        MqttStatsSnapshot {
            connected: self.connected.load(Relaxed),
            connects: self.connects.load(Relaxed),
            connection_errors: self.connection_errors.load(Relaxed),
            publishes: self.publishes.load(Relaxed),
            acks: self.acks.load(Relaxed),
            republished: self.republished.load(Relaxed),
            control_publishes: self.control_publishes.load(Relaxed),
            refused: self.refused.load(Relaxed),
            responses: self.responses.load(Relaxed),
        }
    }

    /// MQTT 5 publishes the broker refused (a PUBACK reason code of 0x80 or above), by
    /// reason: each is logged and, for an event, counted in `refused` too.
    pub fn broker_refused(&self) -> Vec<(&'static str, u64)> {
        let m = self
            .broker_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }
}

/// What a finished forwarder leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderReport {
    /// Ring events handed to the broker (re-publishes included).
    pub published: u64,
    /// Ring events the broker acknowledged.
    pub acked: u64,
    /// Events still in the ring without an acknowledgement when the grace period ended.
    pub left_unacked: usize,
    /// The ring's counters at the end (`dropped` is the total loss to overflow).
    pub ring: RingStats,
    /// The offline status was acknowledged and DISCONNECT went out, so the broker does not
    /// fire the Last Will.
    pub clean_disconnect: bool,
}

/// What a publish handed to rumqttc stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tracked {
    /// A ring entry: acknowledge it in the ring.
    Ring(Id),
    /// Birth, meta, a repeated availability or an MQTT 5 response: nothing to do on the
    /// acknowledgement.
    Control,
    /// The shutdown status (`online:false`): the shutdown waits for it.
    Farewell,
}

/// Connection and acknowledgement tracking shared by the two tasks.
#[derive(Debug, Default)]
struct Track {
    connected: bool,
    /// Grows at every CONNACK: the publisher re-sends the birth when it changes.
    epoch: u64,
    /// The Topic Alias Maximum the broker granted on this connection (MQTT 5).
    alias_max: u16,
    /// Handed to rumqttc, not yet reported by `Outgoing::Publish`, in order.
    handed: VecDeque<Tracked>,
    /// Written with a packet id, waiting for its PUBACK.
    on_wire: HashMap<u16, Tracked>,
    /// rumqttc held a publish back on a packet id collision (only if the broker acked out
    /// of order); it is reported by the next `Outgoing::Publish`.
    collided: Option<Tracked>,
    farewell_acked: bool,
}

impl Track {
    fn in_flight(&self) -> usize {
        self.handed.len() + self.on_wire.len() + usize::from(self.collided.is_some())
    }
}

struct Shared {
    track: Mutex<Track>,
    /// Wakes the publisher: connection state changed or an acknowledgement freed room.
    wake: tokio::sync::Notify,
    feed: Arc<dyn Feed>,
    stats: Arc<MqttStats>,
}

impl Shared {
    fn track(&self) -> MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one event of the event loop (called by the event loop task only).
    fn apply(&self, t: &mut Track, event: &Ev) {
        match event {
            Ev::OutPublish(pkid) => {
                let Some(tracked) = t.collided.take().or_else(|| t.handed.pop_front()) else {
                    warn!(pkid, "rumqttc sent a publish the forwarder did not hand it");
                    return;
                };
                if *pkid == 0 {
                    self.complete(t, tracked);
                } else {
                    t.on_wire.insert(*pkid, tracked);
                }
            }
            Ev::AwaitAck(pkid) => {
                debug!(pkid, "packet id collision: rumqttc holds a publish back");
                t.collided = t.handed.pop_front();
            }
            Ev::PubAck { pkid, refused } => {
                if let Some(tracked) = t.on_wire.remove(pkid) {
                    if let Some(reason) = refused {
                        self.refused_by_broker(tracked, reason);
                    }
                    self.complete(t, tracked);
                }
            }
            Ev::ConnAck {
                session_present,
                alias_max,
            } => {
                if t.in_flight() > 0 {
                    // Cannot happen (a lost connection clears everything) but if it did,
                    // those acknowledgements can no longer come.
                    self.forget_in_flight(t);
                }
                t.connected = true;
                t.epoch += 1;
                t.alias_max = *alias_max;
                self.stats.connected.store(true, Relaxed);
                self.stats.connects.fetch_add(1, Relaxed);
                info!(
                    session_present,
                    topic_alias_max = alias_max,
                    "connected to the MQTT broker"
                );
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    /// The broker refused a message (MQTT 5): retrying would be refused again, so an event
    /// goes from the feed like one too large to send, logged and counted, never silently.
    fn refused_by_broker(&self, tracked: Tracked, reason: &'static str) {
        let n = {
            let mut m = self
                .stats
                .broker_refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let n = m.entry(reason).or_default();
            *n += 1;
            *n
        };
        if let Tracked::Ring(_) = tracked {
            self.stats.refused.fetch_add(1, Relaxed);
        }
        // The 1st, 2nd, 4th, 8th... of each reason: visible, never a flood.
        if n.is_power_of_two() {
            error!(reason, count = n, "the broker refused a publish");
        }
    }

    fn complete(&self, t: &mut Track, tracked: Tracked) {
        match tracked {
            Tracked::Ring(id) => {
                self.feed.ack(id);
                self.stats.acks.fetch_add(1, Relaxed);
            }
            Tracked::Control => {}
            Tracked::Farewell => t.farewell_acked = true,
        }
        self.wake.notify_one();
    }

    /// Every acknowledgement still expected is lost with its connection: the ring hands
    /// those entries out again.
    fn forget_in_flight(&self, t: &mut Track) {
        t.handed.clear();
        t.on_wire.clear();
        t.collided = None;
        let n = self.feed.requeue_all();
        self.stats.republished.fetch_add(n as u64, Relaxed);
        if n > 0 {
            debug!(requeued = n, "unacknowledged events go out again");
        }
    }
}

/// Capped exponential backoff with jitter: each wait is uniform in [d/2, d], d doubling
/// from `min` to `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = d.saturating_mul(2).min(self.max);
        let half = d / 2;
        let jitter = fastrand::u64(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_nanos(jitter)
    }
}

/// The session, shared by the event loop task (its Will) and the publisher.
type SharedSession = Arc<Mutex<Box<dyn Session>>>;

fn lock(session: &SharedSession) -> MutexGuard<'_, Box<dyn Session>> {
    session.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the event loop task ended.
#[derive(Debug, PartialEq, Eq)]
enum LoopExit {
    /// DISCONNECT was written and flushed.
    Disconnected,
    /// Stopped from outside.
    Stopped,
}

/// The event loop task: poll, track, and on errors clean up and back off.
async fn drive(
    mut conn: Conn,
    shared: Arc<Shared>,
    session: SharedSession,
    mut backoff: Backoff,
    intake: Option<Intake>,
    stop: CancellationToken,
) -> LoopExit {
    let mut was_connected = false;
    let mut failures = 0u64;
    // One wait for the task's life (see `Forwarder::run`).
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let polled = tokio::select! {
            biased;
            _ = stopped.as_mut() => return LoopExit::Stopped,
            polled = conn.poll() => polled,
        };
        match polled {
            Ok(event) => {
                if let Ev::ConnAck { .. } = &event {
                    // A new session: whatever rumqttc still holds from before must not be
                    // sent; the ring re-publishes it.
                    conn.clear_pending();
                    backoff.reset();
                    was_connected = true;
                    failures = 0;
                }
                let event = match (event, &intake) {
                    (Ev::Publish(p), Some(intake)) => {
                        take_in(intake, p);
                        continue;
                    }
                    (Ev::Unreadable, Some(intake)) => {
                        intake.dropped.fetch_add(1, Relaxed);
                        warn!("a message whose topic is not UTF-8 was dropped");
                        continue;
                    }
                    (event, _) => event,
                };
                let disconnected = matches!(event, Ev::OutDisconnect);
                shared.apply(&mut shared.track(), &event);
                if disconnected {
                    return LoopExit::Disconnected;
                }
            }
            Err(err) => {
                shared.stats.connection_errors.fetch_add(1, Relaxed);
                shared.stats.connected.store(false, Relaxed);
                // Visible without flooding the log: a lost connection, the first failed
                // attempt of a streak (bad credentials, TLS refusal), then every tenth.
                failures += 1;
                let error = &err.message;
                if was_connected {
                    warn!(%error, "MQTT connection lost");
                    failures = 0;
                } else if failures % 10 == 1 {
                    warn!(%error, attempts = failures, "cannot connect to the MQTT broker");
                } else {
                    debug!(%error, attempts = failures, "MQTT connect failed");
                }
                was_connected = false;
                {
                    let mut t = shared.track();
                    // Events rumqttc buffered before failing (PUBACKs read in the same batch)
                    // are genuine: apply them before forgetting the rest. Under the lock,
                    // so the publisher cannot add a request after the channel is drained.
                    for event in &conn.reset() {
                        shared.apply(&mut t, event);
                    }
                    t.connected = false;
                    shared.forget_in_flight(&mut t);
                }
                shared.wake.notify_one();
                if err.requests_done {
                    return LoopExit::Stopped;
                }
                // The session's Will for the next attempt (a Sparkplug node's bdSeq moves on).
                conn.set_will(lock(&session).will());
                tokio::select! {
                    _ = stopped.as_mut() => return LoopExit::Stopped,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Hands an incoming publish to the intake without waiting (this runs in the event loop
/// task, which must never block).
fn take_in(intake: &Intake, incoming: Incoming) {
    if intake.tx.try_send(incoming).is_err() {
        let n = intake.dropped.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(dropped = n, "command intake full: incoming message dropped");
        }
    }
}

/// Aborts the task when dropped, so a cancelled `run` future also drops the connection.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The publishing side (runs in the `run` future).
struct Publisher {
    client: Client,
    version: Version,
    /// Topic aliases we may use (MQTT 5; 0: none): the smaller of `[mqtt] topic_aliases`
    /// and what the broker granted.
    topic_aliases: u16,
    /// Aliases given on this connection to telemetry topics (the ones repeated many times
    /// a second), first come first served, until the connection ends.
    aliases: HashMap<String, u16>,
    /// MQTT 5 responses (topic, payload, correlation data) to send, oldest first.
    responses: VecDeque<(String, Vec<u8>, Option<Vec<u8>>)>,
    shared: Arc<Shared>,
    session: SharedSession,
    prefix: String,
    telemetry_qos: QoS,
    max_packet_size: usize,
    /// New device lists (a reload), when the daemon gave a channel for them.
    meta_updates: Option<watch::Receiver<Vec<DeviceMeta>>>,
    /// Session messages still to send on this connection.
    preamble: VecDeque<Control>,
    /// The session asked to be asked what is due ([`Forwarder::nudge`]).
    nudged: bool,
    /// The session's farewell goes after everything else, and nothing after it.
    farewell_last: bool,
    /// Handing over: the farewell now, not after a drain.
    hurry: bool,
    seen_epoch: u64,
    shutting_down: bool,
    farewell_epoch: Option<u64>,
    /// Command topics to subscribe to on every new session (rumqttc does not).
    filters: Vec<String>,
}

/// One publish ready for rumqttc.
struct Msg {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
    correlation: Option<Vec<u8>>,
    /// May go with a topic alias (telemetry).
    aliased: bool,
}

impl Msg {
    fn control(c: Control) -> Self {
        Msg {
            topic: c.topic,
            payload: c.payload,
            qos: c.qos,
            retain: c.retain,
            correlation: None,
            aliased: false,
        }
    }
}

/// Responses waiting at most: beyond it the oldest goes (logged); its result is on the
/// result topic all the same.
const MAX_RESPONSES: usize = 1024;

impl Publisher {
    /// Hands out as much as the window allows, at most [`PUMP_BATCH`]; true if it stopped
    /// only because of the batch limit.
    fn pump(&mut self) -> bool {
        for _ in 0..PUMP_BATCH {
            if !self.pump_one() {
                return false;
            }
        }
        true
    }

    /// Hands one message to rumqttc; false when there is nothing to do now.
    fn pump_one(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut t = shared.track();
        if !t.connected {
            return false;
        }
        if t.epoch != self.seen_epoch {
            self.seen_epoch = t.epoch;
            self.new_session();
        }
        self.take_meta_update();
        if self.nudged {
            self.nudged = false;
            lock(&self.session).due(&mut self.preamble);
        }
        if t.in_flight() >= MAX_IN_FLIGHT {
            return false;
        }
        if self.shutting_down && self.farewell_last && self.farewell_epoch == Some(t.epoch) {
            // The farewell was the session's last word (a Sparkplug NDEATH): nothing after.
            return false;
        }
        if self.shutting_down
            && !t.farewell_acked
            && self.farewell_epoch != Some(t.epoch)
            && (!self.farewell_last || self.hurry || !self.shared.feed.has_unsent())
        {
            self.farewell_epoch = Some(t.epoch);
            let msg = Msg::control(lock(&self.session).farewell());
            return self.hand(&mut t, msg, Tracked::Farewell);
        }
        if let Some(c) = self.preamble.pop_front() {
            return self.hand(&mut t, Msg::control(c), Tracked::Control);
        }
        if let Some((topic, payload, correlation)) = self.responses.pop_front() {
            let msg = Msg {
                topic,
                payload,
                qos: QoS::AtLeastOnce,
                retain: false,
                correlation,
                aliased: false,
            };
            if self.hand(&mut t, msg, Tracked::Control) {
                self.shared.stats.responses.fetch_add(1, Relaxed);
            }
            return true;
        }
        let Some((id, prepared)) = self.shared.feed.take_next(&self.prefix) else {
            return false;
        };
        let Prepared {
            topic,
            payload,
            kind,
            device,
            seq,
            reply,
        } = prepared;
        let (qos, retain) = match kind {
            Kind::Telemetry => (self.telemetry_qos, false),
            Kind::Availability => (QoS::AtLeastOnce, true),
            Kind::Notice | Kind::CommandResult => (QoS::AtLeastOnce, false),
            Kind::Sparkplug => (QoS::AtMostOnce, false),
        };
        if let Err(why) = self.sendable(&topic, payload.len(), qos, &Props::default()) {
            error!(%topic, seq, "event refused: {why}");
            self.shared.stats.refused.fetch_add(1, Relaxed);
            self.shared.feed.ack(id);
            return true;
        }
        if retain {
            // Only retained messages concern the session (and take its lock): not the
            // telemetry that makes up nearly all of the traffic.
            lock(&self.session).retained(&device, &topic, &payload);
        }
        if let Some(reply) = reply.filter(|_| self.version == Version::V5) {
            // After the result itself: a requester that also watches the result topic
            // sees the two in that order.
            if self.responses.len() >= MAX_RESPONSES {
                self.responses.pop_front();
                warn!("too many MQTT 5 responses waiting: the oldest was dropped");
            }
            self.responses.push_back((
                reply.topic.clone(),
                payload.clone(),
                reply.correlation.clone(),
            ));
        }
        let msg = Msg {
            topic,
            payload,
            qos,
            retain,
            correlation: None,
            aliased: matches!(kind, Kind::Telemetry | Kind::Sparkplug),
        };
        self.hand(&mut t, msg, Tracked::Ring(id))
    }

    fn sendable(
        &self,
        topic: &str,
        payload_len: usize,
        qos: QoS,
        props: &Props,
    ) -> Result<(), String> {
        if !rumqttc::valid_topic(topic) || topic.contains('\0') {
            return Err("the device name makes an invalid topic".into());
        }
        let mut size = payload::publish_packet_size(topic.len(), payload_len, qos as u8);
        if self.version == Version::V5 {
            // A v5 PUBLISH carries its properties (a topic alias costs 3 bytes).
            size += props.wire_len() + 3;
        }
        if size > self.max_packet_size {
            return Err(format!(
                "packet of {size} bytes exceeds max_packet_size {}",
                self.max_packet_size
            ));
        }
        Ok(())
    }

    /// Gives one publish to rumqttc under the `Track` lock. `try_publish` never waits: the
    /// window keeps the channel from filling.
    fn hand(&mut self, t: &mut Track, msg: Msg, tracked: Tracked) -> bool {
        let mut props = Props {
            alias: None,
            correlation: msg.correlation,
            user: Vec::new(),
        };
        // Ring events were checked (and refused) before; control messages are checked here.
        if !matches!(tracked, Tracked::Ring(_)) {
            if let Err(why) = self.sendable(&msg.topic, msg.payload.len(), msg.qos, &props) {
                error!(topic = %msg.topic, "control message not sent: {why}");
                return true;
            }
        }
        let mut topic = msg.topic;
        let limit = self.topic_aliases.min(t.alias_max);
        if msg.aliased && limit > 0 {
            if let Some(&alias) = self.aliases.get(&topic) {
                // Known to the broker on this connection: the alias alone.
                props.alias = Some(alias);
                topic = String::new();
            } else if self.aliases.len() < usize::from(limit) {
                let alias = self.aliases.len() as u16 + 1;
                self.aliases.insert(topic.clone(), alias);
                props.alias = Some(alias);
            }
        }
        match self
            .client
            .try_publish(topic, msg.qos, msg.retain, msg.payload, props)
        {
            Ok(()) => {
                t.handed.push_back(tracked);
                let counter = match tracked {
                    Tracked::Ring(_) => &self.shared.stats.publishes,
                    Tracked::Control | Tracked::Farewell => &self.shared.stats.control_publishes,
                };
                counter.fetch_add(1, Relaxed);
                true
            }
            Err(err) => {
                // Only possible if the window accounting were wrong: put it back and wait.
                error!(error = %err, "rumqttc refused a publish; retrying later");
                match tracked {
                    Tracked::Ring(id) => {
                        self.shared.feed.requeue(id);
                    }
                    Tracked::Farewell => self.farewell_epoch = None,
                    Tracked::Control => self.seen_epoch = 0,
                }
                false
            }
        }
    }

    /// A new session: the commands subscribed again, the session's opening (the birth)
    /// first in line.
    fn new_session(&mut self) {
        // Topic aliases live as long as their connection.
        self.aliases.clear();
        for f in &self.filters {
            // The request channel keeps room beside the publish window, so this fits.
            if let Err(e) = self.client.try_subscribe(f.clone()) {
                error!(filter = %f, error = %e, "cannot subscribe to the command topic");
            }
        }
        self.preamble.clear();
        lock(&self.session).opening(self.shutting_down, &mut self.preamble);
    }

    /// Takes a new device list, if one came, and lets the session say what it must.
    fn take_meta_update(&mut self) {
        let Some(rx) = self.meta_updates.as_mut() else {
            return;
        };
        if !rx.has_changed().unwrap_or(false) {
            return;
        }
        let list = rx.borrow_and_update().clone();
        lock(&self.session).devices(&list, &mut self.preamble);
    }

    /// All done: the offline status and every ring entry acknowledged.
    fn drained(&self) -> bool {
        self.shared.track().farewell_acked && self.shared.feed.unacked() == 0
    }
}

/// The forwarder, built and checked before it runs so a bad setting fails at start-up and
/// the daemon gets its [`MqttStats`] handle first.
pub struct Forwarder {
    settings: MqttSettings,
    url: BrokerUrl,
    session: SessionKind,
    feed: Arc<dyn Feed>,
    meta_updates: Option<watch::Receiver<Vec<DeviceMeta>>>,
    stats: Arc<MqttStats>,
    handover: CancellationToken,
    intake: Option<Intake>,
    nudge: Arc<tokio::sync::Notify>,
}

/// The JSON contract's session (adjustable until the forwarder runs), or another.
enum SessionKind {
    Json(JsonSession),
    Other(Box<dyn Session>),
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Validates the settings and reads the TLS files.
    pub fn new(
        settings: MqttSettings,
        boot_id: String,
        version: String,
        feed: Arc<dyn Feed>,
        meta: Vec<DeviceMeta>,
    ) -> Result<Self, MqttError> {
        let url = settings.validate()?;
        if let Some(files) = &settings.tls {
            // Fail now, naming the file, rather than at the first connect.
            crate::settings::tls_client_config(files)?;
        }
        let session = JsonSession::new(&settings.topic_prefix, boot_id, version, &meta);
        Ok(Self {
            settings,
            url,
            session: SessionKind::Json(session),
            feed,
            meta_updates: None,
            stats: Arc::default(),
            handover: CancellationToken::new(),
            intake: None,
            nudge: Arc::default(),
        })
    }

    /// The status says `"recovered":n` (durable mode: events of earlier boots first).
    pub fn with_recovered(mut self, n: u64) -> Self {
        if let SessionKind::Json(j) = &mut self.session {
            j.recovered(n);
        }
        self
    }

    /// Speaks another contract than JSON: `session` gives the Will, the birth and the
    /// farewell (a Sparkplug edge node). Notifying `nudge` makes the publisher ask the
    /// session what is due ([`Session::due`]).
    pub fn with_session(
        mut self,
        session: Box<dyn Session>,
        nudge: Arc<tokio::sync::Notify>,
    ) -> Self {
        self.session = SessionKind::Other(session);
        self.nudge = nudge;
        self
    }

    /// Device lists sent on `updates` replace the one given to [`Forwarder::new`] while
    /// the forwarder runs (a reload): see the publisher's handling of retained topics.
    pub fn with_meta_updates(mut self, updates: watch::Receiver<Vec<DeviceMeta>>) -> Self {
        self.meta_updates = Some(updates);
        self
    }

    pub fn stats(&self) -> Arc<MqttStats> {
        self.stats.clone()
    }

    /// Subscribes to `intake.filters` on every session and hands what arrives on them to
    /// `intake.tx` (the command path).
    pub fn with_intake(mut self, intake: Intake) -> Self {
        self.intake = Some(intake);
        self
    }

    /// Cancelling this token ends the run like the shutdown token, but without waiting
    /// for the ring to drain: for a hand-over to a forwarder with other settings on the
    /// same ring, which publishes again everything this one leaves unacknowledged.
    pub fn handover_token(&self) -> CancellationToken {
        self.handover.clone()
    }

    /// Counts into `stats` (the daemon keeps one for the life of the process, so a
    /// forwarder restarted by a reload does not look like a counter reset).
    pub fn with_stats(mut self, stats: Arc<MqttStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Runs until `shutdown` is cancelled, then publishes `online:false`, waits up to
    /// `shutdown_grace` for the ring to be acknowledged, and disconnects cleanly.
    ///
    /// Dropping the future (or aborting its task) drops the connection without DISCONNECT,
    /// so the broker publishes the Last Will.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ForwarderReport, MqttError> {
        let session: SharedSession = Arc::new(Mutex::new(match self.session {
            SessionKind::Json(j) => Box::new(j),
            SessionKind::Other(s) => s,
        }));
        let (will, farewell_last) = {
            let mut s = lock(&session);
            (s.will(), s.farewell_last())
        };
        let (client, mut conn) =
            self.settings
                .connect(&self.url, will, MAX_IN_FLIGHT as u16, CHANNEL_CAPACITY)?;
        // Nagle off: a PUBACK (and with it a command's result) would otherwise wait for
        // the broker's delayed ACK, about 40 ms (BENCHMARKS.md, "Command latency").
        // rumqttc already writes each batch of packets in one go.
        conn.set_nodelay();
        // Entries an earlier forwarder on this ring handed out and never saw acknowledged
        // (the daemon restarts the forwarder when a reload changes [mqtt]) go out again.
        self.feed.flush(false);
        let requeued = self.feed.requeue_all();
        if requeued > 0 {
            debug!(
                requeued,
                "unacknowledged events of the previous connection go out again"
            );
        }
        let shared = Arc::new(Shared {
            track: Mutex::new(Track::default()),
            wake: tokio::sync::Notify::new(),
            feed: self.feed.clone(),
            stats: self.stats.clone(),
        });
        let stop = CancellationToken::new();
        let mut event_loop = AbortOnDrop(tokio::spawn(drive(
            conn,
            shared.clone(),
            session.clone(),
            Backoff::new(self.settings.reconnect_min, self.settings.reconnect_max),
            self.intake.clone(),
            stop.clone(),
        )));
        let mut publisher = Publisher {
            client: client.clone(),
            version: self.settings.version,
            topic_aliases: self.settings.topic_aliases,
            aliases: HashMap::new(),
            responses: VecDeque::new(),
            shared: shared.clone(),
            session,
            prefix: self.settings.topic_prefix.clone(),
            telemetry_qos: self.settings.telemetry_qos(),
            max_packet_size: self.settings.max_packet_size,
            meta_updates: self.meta_updates,
            preamble: VecDeque::new(),
            nudged: false,
            farewell_last,
            hurry: false,
            seen_epoch: 0,
            shutting_down: false,
            farewell_epoch: None,
            filters: self
                .intake
                .as_ref()
                .map(|i| i.filters.clone())
                .unwrap_or_default(),
        };

        // A receiver of its own to wake on: the publisher's keeps its change unseen
        // until it takes the new list.
        let mut meta_wake = publisher.meta_updates.clone();
        let mut deadline: Option<Instant> = None;
        // One wait for each token for the forwarder's life: a `cancelled()` made for each
        // `select!` below registers with its token and leaves it again, every event.
        let handover = self.handover.clone();
        let mut handed_over = std::pin::pin!(handover.cancelled());
        let mut shut_down = std::pin::pin!(shutdown.cancelled());
        loop {
            if deadline.is_none() && self.handover.is_cancelled() {
                // A reload moves us to other broker settings: no drain, the next
                // forwarder publishes whatever this one leaves unacknowledged.
                info!("handing over: publishing offline status and disconnecting");
                self.feed.flush(true);
                deadline = Some(Instant::now());
                publisher.shutting_down = true;
                publisher.hurry = true;
            } else if deadline.is_none() && shutdown.is_cancelled() {
                info!("shutting down: publishing offline status and draining the ring");
                // No batch waits to fill any more: everything goes.
                self.feed.flush(true);
                deadline = Some(Instant::now() + self.settings.shutdown_grace);
                publisher.shutting_down = true;
            }
            let more = publisher.pump();
            if let Some(d) = deadline {
                if publisher.drained() {
                    break;
                }
                if Instant::now() >= d {
                    if !publisher.hurry {
                        // Out of time: one more turn hands a farewell still waiting for
                        // the feed to drain, then we go.
                        publisher.hurry = true;
                        continue;
                    }
                    break;
                }
            }
            if more {
                tokio::task::yield_now().await;
                continue;
            }
            // A batch filling in the feed: ask again when it is due, if no push comes first.
            let batch_due = self.feed.wake_at();
            tokio::select! {
                // In async blocks: a disabled branch's future is still built, and a
                // `Sleep` built is a timer entry made and dropped for nothing, every event.
                _ = async { tokio::time::sleep_until(batch_due.map_or_else(Instant::now, Instant::from_std)).await },
                    if batch_due.is_some() => {}
                _ = self.feed.notify().notified() => {}
                _ = shared.wake.notified() => {}
                _ = self.nudge.notified() => publisher.nudged = true,
                _ = shut_down.as_mut(), if deadline.is_none() => {}
                _ = handed_over.as_mut(), if deadline.is_none() => {}
                changed = async { meta_wake.as_mut()?.changed().await.ok() },
                    if meta_wake.is_some() => {
                    if changed.is_none() {
                        meta_wake = None;
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                    if deadline.is_some() => {}
                ended = &mut event_loop.0 => {
                    let why = match ended {
                        Ok(exit) => format!("{exit:?}"),
                        Err(e) => e.to_string(),
                    };
                    return Err(MqttError::EventLoop(why));
                }
            }
        }

        // Leave cleanly if we can: DISCONNECT goes behind everything already handed.
        let drained = publisher.drained();
        let connected = shared.track().connected;
        let mut clean_disconnect = false;
        let mut loop_ended = false;
        if connected && client.try_disconnect().is_ok() {
            let flush = Duration::from_secs(1).max(
                deadline
                    .map(|d| d.saturating_duration_since(Instant::now()))
                    .unwrap_or_default(),
            );
            if let Ok(ended) = tokio::time::timeout(flush, &mut event_loop.0).await {
                loop_ended = true;
                clean_disconnect = drained && ended.ok() == Some(LoopExit::Disconnected);
            }
        }
        stop.cancel();
        if !loop_ended {
            let _ = (&mut event_loop.0).await;
        }
        shared.stats.connected.store(false, Relaxed);

        let ring = self.feed.stats();
        let stats = self.stats.snapshot();
        let report = ForwarderReport {
            published: stats.publishes,
            acked: stats.acks,
            left_unacked: ring.unacked,
            ring,
            clean_disconnect,
        };
        if report.left_unacked > 0 {
            warn!(
                left_unacked = report.left_unacked,
                "shutdown grace ended with events unacknowledged"
            );
        }
        info!(?report, "MQTT forwarder stopped");
        Ok(report)
    }
}

/// Builds a [`Forwarder`] and runs it; see [`Forwarder::run`]. Use [`Forwarder::new`] and
/// [`Forwarder::stats`] when the counters are needed while it runs.
pub async fn run(
    settings: MqttSettings,
    boot_id: String,
    version: String,
    feed: Arc<dyn Feed>,
    meta: Vec<DeviceMeta>,
    shutdown: CancellationToken,
) -> Result<ForwarderReport, MqttError> {
    Forwarder::new(settings, boot_id, version, feed, meta)?
        .run(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_down_to_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let expected_caps = [100, 200, 350, 350];
        for cap in expected_caps {
            let d = b.next_delay();
            let cap = Duration::from_millis(cap);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
