//! Typed events (DESIGN.md section 2).
//!
//! Every event names its device, belongs to one [`Stream`], carries a sequence number that
//! grows by exactly one per (device, stream) since start-up, and the acquisition time: when
//! the bytes arrived from the field, not when they were published.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::cia402::DriveState;
use crate::command::CommandReport;

/// The MQTT streams of a device, each with its own sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Telemetry,
    Availability,
    Events,
    CommandResult,
}

impl Stream {
    pub const ALL: [Stream; 4] = [
        Stream::Telemetry,
        Stream::Availability,
        Stream::Events,
        Stream::CommandResult,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One event, ready for the ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub device: Arc<str>,
    pub seq: u64,
    /// Acquisition time (UTC wall clock).
    pub ts: SystemTime,
    pub body: EventBody,
}

impl Event {
    pub fn stream(&self) -> Stream {
        match self.body {
            EventBody::Telemetry(_) => Stream::Telemetry,
            EventBody::Availability(_) => Stream::Availability,
            EventBody::Notice(_) => Stream::Events,
            EventBody::CommandResult(_) => Stream::CommandResult,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    Telemetry(Telemetry),
    Availability(Availability),
    Notice(Notice),
    /// The result of a command (DESIGN.md section 7).
    CommandResult(CommandReport),
}

/// Why a reading is not `good`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QualityReason {
    /// The reply came after the device's `late_after`.
    Late,
    /// A value fell outside the range its profile declares.
    OutOfRange,
}

impl QualityReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Late => "late",
            Self::OutOfRange => "out_of_range",
        }
    }
}

/// `good`, or `uncertain` with its reasons.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quality {
    pub late: bool,
    pub out_of_range: bool,
}

impl Quality {
    pub fn is_good(&self) -> bool {
        !self.late && !self.out_of_range
    }

    pub fn reasons(&self) -> impl Iterator<Item = QualityReason> {
        let late = self.late.then_some(QualityReason::Late);
        let range = self.out_of_range.then_some(QualityReason::OutOfRange);
        late.into_iter().chain(range)
    }
}

/// Servo telemetry in canonical fields, already scaled to the profile's units.
#[derive(Debug, Default, PartialEq)]
pub struct Telemetry {
    pub quality: Quality,
    pub position: Option<f64>,
    pub velocity: Option<f64>,
    pub torque: Option<f64>,
    pub current: Option<f64>,
    pub temperature: Option<f64>,
    pub statusword: Option<u16>,
    /// Decoded from `statusword` when there is one.
    pub state: Option<DriveState>,
    pub fault_code: Option<u16>,
    /// Other named readings the profile defines, in profile order.
    pub values: Vec<(Arc<str>, f64)>,
}

impl Clone for Telemetry {
    fn clone(&self) -> Self {
        Self {
            quality: self.quality,
            position: self.position,
            velocity: self.velocity,
            torque: self.torque,
            current: self.current,
            temperature: self.temperature,
            statusword: self.statusword,
            state: self.state,
            fault_code: self.fault_code,
            values: self.values.clone(),
        }
    }

    /// Reuses `values`' storage: a copy kept per sample (the Sparkplug node's latest
    /// values) allocates nothing once it has its size.
    fn clone_from(&mut self, source: &Self) {
        self.quality = source.quality;
        self.position = source.position;
        self.velocity = source.velocity;
        self.torque = source.torque;
        self.current = source.current;
        self.temperature = source.temperature;
        self.statusword = source.statusword;
        self.state = source.state;
        self.fault_code = source.fault_code;
        self.values.clone_from(&source.values);
    }
}

impl Telemetry {
    /// Names of the canonical fields; a profile field with any other name goes to `values`.
    pub const CANONICAL: [&'static str; 7] = [
        "position",
        "velocity",
        "torque",
        "current",
        "temperature",
        "statusword",
        "fault_code",
    ];

    /// Stores a value under its field name: a canonical field, or `values`.
    pub fn set(&mut self, name: &Arc<str>, value: f64) {
        match &**name {
            "position" => self.position = Some(value),
            "velocity" => self.velocity = Some(value),
            "torque" => self.torque = Some(value),
            "current" => self.current = Some(value),
            "temperature" => self.temperature = Some(value),
            "statusword" => {
                // Register values are integral; clamp so a scaled value cannot wrap.
                let sw = value.clamp(0.0, f64::from(u16::MAX)) as u16;
                self.statusword = Some(sw);
                self.state = Some(DriveState::from_statusword(sw));
            }
            "fault_code" => self.fault_code = Some(value.clamp(0.0, f64::from(u16::MAX)) as u16),
            _ => self.values.push((name.clone(), value)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AvailabilityState {
    Online,
    Offline,
}

impl AvailabilityState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Availability {
    pub state: AvailabilityState,
    pub since: SystemTime,
    pub reason: String,
}

/// Something that happened, for the `events` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: EventKind,
    /// Human-readable detail, for logs and dashboards.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// The drive reported a fault (CiA 402 error code; CANopen error register if known).
    Fault { code: u16, register: Option<u8> },
    /// The drive's fault is gone.
    FaultCleared { code: u16 },
    /// A reply arrived after `late_after`.
    Late {
        elapsed: Duration,
        late_after: Duration,
    },
    /// A transaction failed: `error` is a short machine-readable kind
    /// (`timeout`, `crc`, `exception`, `wrong_reply`, `io`).
    CommError { error: &'static str },
    /// The CiA 402 state changed.
    StateChange {
        from: Option<DriveState>,
        to: DriveState,
    },
    /// The device went offline or came back (the availability topic has the state).
    Availability { state: AvailabilityState },
    /// The bus the device is on changed state: `error_active`, `error_passive`,
    /// `bus_off`, `down`, `up` (CAN), so every drive's consumer learns of it at once.
    BusState { state: &'static str },
}

impl EventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Fault { .. } => "fault",
            Self::FaultCleared { .. } => "fault_cleared",
            Self::Late { .. } => "late",
            Self::CommError { .. } => "comm_error",
            Self::StateChange { .. } => "state_change",
            Self::Availability { state } => state.as_str(),
            Self::BusState { .. } => "bus_state",
        }
    }
}

/// Sequence counters of one device: each stream starts at 1 and grows by exactly 1.
///
/// Shared (`Arc`) between the [`DeviceEvents`] that number a device's events and the
/// daemon's [`SeqBook`], so a device whose bus task is restarted (a reload) goes on
/// counting where it stopped: a consumer keyed on (boot_id, device, stream, seq) sees no
/// gap and no repeat. Only one live `DeviceEvents` numbers a device at a time.
#[derive(Debug, Default)]
pub struct SeqCounters {
    last: [AtomicU64; 4],
}

impl SeqCounters {
    /// Takes the next sequence number of `stream`.
    pub fn next(&self, stream: Stream) -> u64 {
        self.last[stream.index()].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The last number handed out on `stream` (0 before the first).
    pub fn last(&self, stream: Stream) -> u64 {
        self.last[stream.index()].load(Ordering::Relaxed)
    }
}

/// The sequence counters of every device for the life of the process, by device name.
///
/// Bus tasks take a device's counters from here when they start numbering it, so a
/// restarted bus or a replaced device continues its sequences.
#[derive(Debug, Default, Clone)]
pub struct SeqBook {
    devices: Arc<Mutex<HashMap<Arc<str>, Arc<SeqCounters>>>>,
}

impl SeqBook {
    /// The counters of `device`, new (all zero) the first time it is named.
    pub fn counters(&self, device: &Arc<str>) -> Arc<SeqCounters> {
        // A panic elsewhere while holding this lock cannot leave the map inconsistent
        // (one insert), so a poisoned lock is taken over.
        let mut map = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(device.clone()).or_default().clone()
    }

    /// A numberer for `device` that continues its sequences.
    pub fn events(&self, device: &Arc<str>) -> DeviceEvents {
        DeviceEvents::with_counters(device.clone(), self.counters(device))
    }
}

/// Builds events for one device, numbering them per stream.
#[derive(Debug)]
pub struct DeviceEvents {
    device: Arc<str>,
    seq: Arc<SeqCounters>,
}

impl DeviceEvents {
    /// A device whose sequences start at 1.
    pub fn new(device: impl Into<Arc<str>>) -> Self {
        Self::with_counters(device, Arc::default())
    }

    /// A device whose sequences continue from `seq` (see [`SeqBook`]).
    pub fn with_counters(device: impl Into<Arc<str>>, seq: Arc<SeqCounters>) -> Self {
        Self {
            device: device.into(),
            seq,
        }
    }

    pub fn device(&self) -> &Arc<str> {
        &self.device
    }

    /// Wraps `body` into the next event of its stream.
    pub fn event(&mut self, ts: SystemTime, body: EventBody) -> Event {
        let mut event = Event {
            device: self.device.clone(),
            seq: 0,
            ts,
            body,
        };
        event.seq = self.seq.next(event.stream());
        event
    }

    pub fn notice(&mut self, ts: SystemTime, kind: EventKind, message: String) -> Event {
        self.event(ts, EventBody::Notice(Notice { kind, message }))
    }
}

/// Where bus tasks put their events: the delivery ring behind a lock, in the daemon.
///
/// Architecture invariant: `push` never blocks on the network and never waits for room;
/// a full ring applies its `on_full` policy and counts the drop.
pub trait EventSink: Send + Sync {
    fn push(&self, event: Event);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_grow_by_one_per_stream_independently() {
        let mut dev = DeviceEvents::new("axis-1");
        let t = SystemTime::UNIX_EPOCH;
        let a = dev.event(t, EventBody::Telemetry(Telemetry::default()));
        let b = dev.notice(t, EventKind::CommError { error: "timeout" }, String::new());
        let c = dev.event(t, EventBody::Telemetry(Telemetry::default()));
        assert_eq!((a.seq, b.seq, c.seq), (1, 1, 2));
        assert_eq!(a.stream(), Stream::Telemetry);
        assert_eq!(b.stream(), Stream::Events);
    }

    #[test]
    fn a_device_numbered_again_from_the_book_continues_its_sequences() {
        let book = SeqBook::default();
        let name: Arc<str> = Arc::from("axis-1");
        let t = SystemTime::UNIX_EPOCH;
        let mut first = book.events(&name);
        first.event(t, EventBody::Telemetry(Telemetry::default()));
        first.event(t, EventBody::Telemetry(Telemetry::default()));
        drop(first);
        // As after a reload that restarted the device's bus task.
        let mut second = book.events(&name);
        let next = second.event(t, EventBody::Telemetry(Telemetry::default()));
        let other = book
            .events(&Arc::from("axis-2"))
            .event(t, EventBody::Telemetry(Telemetry::default()));
        assert_eq!((next.seq, other.seq), (3, 1));
    }

    #[test]
    fn a_field_outside_the_canonical_names_goes_to_values() {
        let mut t = Telemetry::default();
        t.set(&Arc::from("dc_bus"), 48.2);
        t.set(&Arc::from("position"), 1.5);
        assert_eq!(t.position, Some(1.5));
        assert_eq!(t.values, vec![(Arc::from("dc_bus"), 48.2)]);
    }

    #[test]
    fn statusword_field_also_sets_the_decoded_state() {
        let mut t = Telemetry::default();
        t.set(&Arc::from("statusword"), f64::from(0x0237u16));
        assert_eq!(t.statusword, Some(0x0237));
        assert_eq!(t.state, Some(DriveState::OperationEnabled));
    }

    #[test]
    fn quality_is_uncertain_with_each_reason() {
        let q = Quality {
            late: true,
            out_of_range: false,
        };
        assert!(!q.is_good());
        assert_eq!(q.reasons().collect::<Vec<_>>(), vec![QualityReason::Late]);
        assert!(Quality::default().is_good());
    }
}
