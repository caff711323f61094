//! The sans-IO state of one polled device.
//!
//! [`DevicePoller`] decides when a device is due, which reads a poll cycle needs, and what
//! each outcome means: telemetry, lateness, faults, CiA 402 state changes, availability and
//! back-off. It never touches a port or a clock: the bus task passes the time in and hands
//! every reply or failure over. That keeps every rule of DESIGN.md section 5 testable with
//! plain instants.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use servogate_core::{
    Availability, AvailabilityState, DeviceEvents, DriveState, EventBody, EventKind, EventSink,
    Telemetry,
};

use crate::plan::{field_registers, Block, ReadPlan, SplitOutcome};
use crate::profile::{Field, RegisterKind};

/// Late events of one device are raised at once, then at most this often while it stays late.
const LATE_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// How one device is polled (from the config).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSettings {
    pub name: Arc<str>,
    /// Modbus unit id, 1-247.
    pub unit: u8,
    pub poll: Duration,
    /// A reply slower than this marks telemetry `uncertain` (`late`) and raises `late`.
    pub late_after: Duration,
    pub timeout: Duration,
    /// Consecutive failed cycles before the device is `offline`.
    pub offline_after: u32,
    /// Longest wait between retries of an offline device.
    pub backoff_max: Duration,
    pub fields: Arc<[Field]>,
    pub max_gap: u16,
    pub max_registers: u16,
}

/// Why a transaction failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No (complete) reply within the timeout.
    Timeout,
    /// The reply's CRC was wrong.
    Crc,
    /// The device answered with an exception code other than Illegal Data Address.
    Exception(u8),
    /// A reply from another unit, or with the wrong function code or length.
    WrongReply,
    /// The port itself failed (the bus task reopens it).
    Io,
}

impl Failure {
    /// The machine-readable kind used in `comm_error` events and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Crc => "crc",
            Self::Exception(_) => "exception",
            Self::WrongReply => "wrong_reply",
            Self::Io => "io",
        }
    }
}

/// One read the bus task must perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub unit: u8,
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
}

/// Counters of one device, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub transactions: u64,
    pub cycles_ok: u64,
    pub failures: u64,
    pub late: u64,
}

#[derive(Debug)]
struct Cycle {
    block: usize,
    telemetry: Telemetry,
    late: Option<Duration>,
}

/// The state of one polled device.
#[derive(Debug)]
pub struct DevicePoller {
    settings: DeviceSettings,
    plan: ReadPlan,
    events: DeviceEvents,
    next_due: Instant,
    /// Consecutive failed cycles.
    failures: u32,
    backoff: Duration,
    availability: Option<AvailabilityState>,
    drive_state: Option<DriveState>,
    fault_code: u16,
    late_since: Option<Instant>,
    last_late_event: Option<Instant>,
    cycle: Option<Cycle>,
    counters: DeviceCounters,
}

impl DevicePoller {
    /// A device first due at `now`, its sequences starting at 1.
    pub fn new(settings: DeviceSettings, now: Instant) -> Self {
        let events = DeviceEvents::new(settings.name.clone());
        Self::with_events(settings, now, events)
    }

    /// A device first due at `now` whose events are numbered by `events` (which may
    /// continue the sequences of an earlier poller of the same device).
    pub fn with_events(settings: DeviceSettings, now: Instant, events: DeviceEvents) -> Self {
        let plan = ReadPlan::new(&settings.fields, settings.max_gap, settings.max_registers);
        Self {
            events,
            plan,
            next_due: now,
            failures: 0,
            backoff: settings.poll,
            availability: None,
            drive_state: None,
            fault_code: 0,
            late_since: None,
            last_late_event: None,
            cycle: None,
            counters: DeviceCounters::default(),
            settings,
        }
    }

    pub fn settings(&self) -> &DeviceSettings {
        &self.settings
    }

    pub fn plan(&self) -> &ReadPlan {
        &self.plan
    }

    pub fn counters(&self) -> DeviceCounters {
        self.counters
    }

    pub fn availability(&self) -> Option<AvailabilityState> {
        self.availability
    }

    /// When the next cycle should start (or, mid-cycle, when the last one started).
    pub fn next_due(&self) -> Instant {
        self.next_due
    }

    /// The next read of the current cycle, starting a cycle if none is running.
    /// `None` when the device has nothing left to read (every field unreadable).
    pub fn next_request(&mut self) -> Option<ReadRequest> {
        let cycle = self.cycle.get_or_insert_with(|| Cycle {
            block: 0,
            telemetry: Telemetry::default(),
            late: None,
        });
        let block = self.plan.blocks.get(cycle.block)?;
        Some(ReadRequest {
            unit: self.settings.unit,
            kind: block.kind,
            start: block.start,
            count: block.count,
        })
    }

    /// The device has nothing left to read: skip this cycle.
    pub fn skip_cycle(&mut self, now: Instant) {
        self.cycle = None;
        self.advance_schedule(now);
    }

    /// The current read was answered with `regs`, `elapsed` after it was sent.
    /// Returns true when the cycle needs another read.
    pub fn on_reply(
        &mut self,
        now: Instant,
        wall: SystemTime,
        elapsed: Duration,
        regs: &[u16],
        sink: &dyn EventSink,
    ) -> bool {
        self.counters.transactions += 1;
        let Some(cycle) = self.cycle.as_mut() else {
            return false;
        };
        let Some(block) = self.plan.blocks.get(cycle.block) else {
            return false;
        };
        if regs.len() != usize::from(block.count) {
            // The line discipline checks lengths, so this means a broken device.
            return self.fail(now, wall, Failure::WrongReply, sink);
        }
        decode_block(block, &self.settings.fields, regs, &mut cycle.telemetry);
        if elapsed > self.settings.late_after {
            cycle.late = Some(cycle.late.map_or(elapsed, |l| l.max(elapsed)));
        }
        cycle.block += 1;
        if cycle.block < self.plan.blocks.len() {
            return true;
        }
        self.finish_cycle(now, wall, sink);
        false
    }

    /// The device answered Illegal Data Address to the current read: split the block and
    /// remember it. Returns true when the cycle needs another read.
    pub fn on_illegal_address(
        &mut self,
        now: Instant,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) -> bool {
        self.counters.transactions += 1;
        let Some(cycle) = self.cycle.as_ref() else {
            return false;
        };
        let index = cycle.block;
        if index >= self.plan.blocks.len() {
            return false;
        }
        if let SplitOutcome::Unreadable(fields) = self.plan.split(index, &self.settings.fields) {
            let names: Vec<&str> = fields
                .iter()
                .map(|&i| &*self.settings.fields[i].name)
                .collect();
            sink.push(self.events.notice(
                wall,
                EventKind::CommError {
                    error: "illegal_address",
                },
                format!(
                    "field {} is not readable (illegal data address); no longer polled",
                    names.join(", ")
                ),
            ));
        }
        // The same index now holds the first half of the split, or the next block.
        if index < self.plan.blocks.len() {
            return true;
        }
        self.finish_cycle(now, wall, sink);
        false
    }

    /// The current read failed. Ends the cycle: a failed read publishes no values.
    /// Returns false (no further read in this cycle).
    pub fn on_failure(
        &mut self,
        now: Instant,
        wall: SystemTime,
        failure: Failure,
        sink: &dyn EventSink,
    ) -> bool {
        self.counters.transactions += 1;
        self.fail(now, wall, failure, sink)
    }

    fn fail(
        &mut self,
        now: Instant,
        wall: SystemTime,
        failure: Failure,
        sink: &dyn EventSink,
    ) -> bool {
        self.cycle = None;
        self.counters.failures += 1;
        self.failures = self.failures.saturating_add(1);
        let offline = self.availability == Some(AvailabilityState::Offline);
        if !offline {
            // While offline, retries fail quietly: the availability event said it all.
            let detail = match &failure {
                Failure::Exception(code) => format!("exception code {code:#04x}"),
                other => other.kind().to_owned(),
            };
            sink.push(self.events.notice(
                wall,
                EventKind::CommError {
                    error: failure.kind(),
                },
                format!(
                    "read of unit {} failed: {detail} ({} in a row)",
                    self.settings.unit, self.failures
                ),
            ));
        }
        if !offline && self.failures >= self.settings.offline_after.max(1) {
            self.set_availability(
                wall,
                AvailabilityState::Offline,
                format!(
                    "{} consecutive failures, last: {}",
                    self.failures,
                    failure.kind()
                ),
                sink,
            );
            // Each retry of a dead device costs the bus a whole timeout, in which no other
            // device can be polled: start the back-off at ten timeouts (at most 10 % of the
            // bus time), then double it up to `backoff_max`.
            let max = self.settings.backoff_max.max(self.settings.poll);
            self.backoff = (self.settings.timeout * 10)
                .max(self.settings.poll)
                .min(max);
            self.next_due = now + self.backoff;
        } else if offline {
            let max = self.settings.backoff_max.max(self.settings.poll);
            self.backoff = (self.backoff * 2).min(max);
            self.next_due = now + self.backoff;
        } else {
            self.advance_schedule(now);
        }
        false
    }

    fn finish_cycle(&mut self, now: Instant, wall: SystemTime, sink: &dyn EventSink) {
        let Some(mut cycle) = self.cycle.take() else {
            return;
        };
        self.counters.cycles_ok += 1;
        if self.availability != Some(AvailabilityState::Online) {
            let reason = if self.failures > 0 {
                format!("replying again after {} failures", self.failures)
            } else {
                "first reply".to_owned()
            };
            self.set_availability(wall, AvailabilityState::Online, reason, sink);
        }
        self.failures = 0;
        self.backoff = self.settings.poll;

        // CiA 402 state and fault transitions come before the telemetry that shows them.
        if let Some(state) = cycle.telemetry.state {
            if self.drive_state != Some(state) {
                sink.push(self.events.notice(
                    wall,
                    EventKind::StateChange {
                        from: self.drive_state,
                        to: state,
                    },
                    format!(
                        "{} -> {}",
                        self.drive_state.map_or("unknown", DriveState::as_str),
                        state.as_str()
                    ),
                ));
                self.drive_state = Some(state);
            }
        }
        if let Some(code) = cycle.telemetry.fault_code {
            if code != self.fault_code {
                if self.fault_code != 0 {
                    sink.push(self.events.notice(
                        wall,
                        EventKind::FaultCleared {
                            code: self.fault_code,
                        },
                        format!("fault {:#06x} cleared", self.fault_code),
                    ));
                }
                if code != 0 {
                    sink.push(self.events.notice(
                        wall,
                        EventKind::Fault {
                            code,
                            register: None,
                        },
                        format!("drive fault {code:#06x}"),
                    ));
                }
                self.fault_code = code;
            }
        }

        match cycle.late {
            Some(elapsed) => {
                self.counters.late += 1;
                cycle.telemetry.quality.late = true;
                let since = *self.late_since.get_or_insert(now);
                let due = self
                    .last_late_event
                    .is_none_or(|t| since > t || now.duration_since(t) >= LATE_EVENT_INTERVAL);
                if due {
                    self.last_late_event = Some(now);
                    sink.push(self.events.notice(
                        wall,
                        EventKind::Late {
                            elapsed,
                            late_after: self.settings.late_after,
                        },
                        format!(
                            "reply took {:.1} ms, late after {:.1} ms",
                            elapsed.as_secs_f64() * 1e3,
                            self.settings.late_after.as_secs_f64() * 1e3
                        ),
                    ));
                }
            }
            None => self.late_since = None,
        }
        sink.push(
            self.events
                .event(wall, EventBody::Telemetry(cycle.telemetry)),
        );
        self.advance_schedule(now);
    }

    fn set_availability(
        &mut self,
        wall: SystemTime,
        state: AvailabilityState,
        reason: String,
        sink: &dyn EventSink,
    ) {
        self.availability = Some(state);
        sink.push(self.events.event(
            wall,
            EventBody::Availability(Availability {
                state,
                since: wall,
                reason: reason.clone(),
            }),
        ));
        sink.push(
            self.events
                .notice(wall, EventKind::Availability { state }, reason),
        );
    }

    /// Fixed-rate schedule: the next cycle is one period after this one was due, so the
    /// rate holds on average; a device that fell more than a period behind (a slow bus)
    /// restarts from now instead of bursting to catch up.
    fn advance_schedule(&mut self, now: Instant) {
        self.next_due += self.settings.poll;
        if self.next_due + self.settings.poll < now {
            self.next_due = now;
        }
    }
}

/// Decodes the fields of `block` from its reply into `telemetry`.
fn decode_block(block: &Block, fields: &[Field], regs: &[u16], telemetry: &mut Telemetry) {
    for &i in &block.fields {
        let field = &fields[i];
        let Some(words) = field_registers(block, field, regs) else {
            continue;
        };
        // The plan guarantees the length, so decoding cannot fail; skip rather than panic.
        let Ok(value) = field.decode(words) else {
            continue;
        };
        if !field.in_range(value) {
            telemetry.quality.out_of_range = true;
        }
        telemetry.set(&field.name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::DataType;
    use servogate_core::{Event, Stream};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<Event>>);
    impl EventSink for Sink {
        fn push(&self, e: Event) {
            self.0.lock().unwrap().push(e);
        }
    }
    impl Sink {
        fn take(&self) -> Vec<Event> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
        fn kinds(&self) -> Vec<String> {
            self.take()
                .iter()
                .map(|e| match &e.body {
                    EventBody::Telemetry(t) if t.quality.is_good() => "telemetry".into(),
                    EventBody::Telemetry(_) => "telemetry(uncertain)".into(),
                    EventBody::Availability(a) => format!("availability:{}", a.state.as_str()),
                    EventBody::Notice(n) => n.kind.as_str().into(),
                    EventBody::CommandResult(r) => format!("cmd_result:{}", r.status.as_str()),
                })
                .collect()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn settings() -> DeviceSettings {
        let mut sw = Field::new("statusword", 7, DataType::U16);
        sw.kind = RegisterKind::Holding;
        DeviceSettings {
            name: "axis-1".into(),
            unit: 1,
            poll: 10 * MS,
            late_after: 10 * MS,
            timeout: 50 * MS,
            offline_after: 3,
            backoff_max: 1000 * MS,
            fields: vec![
                {
                    let mut f = Field::new("position", 0, DataType::I32);
                    f.scale = 0.001;
                    f
                },
                sw,
                Field::new("fault_code", 8, DataType::U16),
            ]
            .into(),
            max_gap: 8,
            max_registers: 125,
        }
    }

    /// Registers 0..=8: position 1234 (raw 1_234_000), statusword operation enabled.
    fn regs(fault: u16) -> Vec<u16> {
        vec![0x0012, 0xD450, 0, 0, 0, 0, 0, 0x0027, fault]
    }

    fn cycle_ok(p: &mut DevicePoller, now: Instant, elapsed: Duration, sink: &Sink) {
        let req = p.next_request().expect("a read");
        assert_eq!((req.start, req.count), (0, 9));
        let more = p.on_reply(now, SystemTime::now(), elapsed, &regs(0), sink);
        assert!(!more);
    }

    #[test]
    fn a_good_cycle_publishes_scaled_telemetry_and_comes_online() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut p = DevicePoller::new(settings(), t0);
        cycle_ok(&mut p, t0, MS, &sink);
        let events = sink.take();
        let tel = events
            .iter()
            .find_map(|e| match &e.body {
                EventBody::Telemetry(t) => Some(t.clone()),
                _ => None,
            })
            .expect("telemetry");
        assert_eq!(tel.position, Some(1234.0));
        assert_eq!(tel.state, Some(DriveState::OperationEnabled));
        assert!(tel.quality.is_good());
        assert!(events.iter().any(|e| matches!(&e.body,
            EventBody::Availability(a) if a.state == AvailabilityState::Online)));
        assert_eq!(p.next_due(), t0 + 10 * MS);
    }

    #[test]
    fn telemetry_seq_grows_by_one_per_cycle() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut p = DevicePoller::new(settings(), t0);
        for i in 0..5 {
            cycle_ok(&mut p, t0 + i * 10 * MS, MS, &sink);
        }
        let seqs: Vec<u64> = sink
            .take()
            .iter()
            .filter(|e| e.stream() == Stream::Telemetry)
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_device_goes_offline_after_the_configured_failures_and_backs_off() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut p = DevicePoller::new(settings(), t0);
        cycle_ok(&mut p, t0, MS, &sink);
        sink.take();
        let mut now = t0;
        for _ in 0..3 {
            now = p.next_due() + 50 * MS;
            p.next_request();
            p.on_failure(now, SystemTime::now(), Failure::Timeout, &sink);
        }
        assert_eq!(
            sink.kinds(),
            vec![
                "comm_error",
                "comm_error",
                "comm_error",
                "availability:offline",
                "offline"
            ]
        );
        // Backed off beyond the poll period, and growing, up to backoff_max.
        let first = p.next_due() - now;
        assert!(first > 10 * MS, "{first:?}");
        let mut last = first;
        for _ in 0..20 {
            now = p.next_due() + 50 * MS;
            p.next_request();
            p.on_failure(now, SystemTime::now(), Failure::Timeout, &sink);
            let wait = p.next_due() - now;
            assert!(wait >= last && wait <= 1000 * MS, "{wait:?}");
            last = wait;
        }
        assert_eq!(last, 1000 * MS);
        assert!(sink.take().is_empty(), "retries while offline are quiet");
        // It returns.
        let due = p.next_due();
        cycle_ok(&mut p, due, MS, &sink);
        let kinds = sink.kinds();
        assert_eq!(kinds[0], "availability:online");
        assert!(kinds.contains(&"telemetry".to_owned()));
    }

    #[test]
    fn a_failed_cycle_publishes_no_values() {
        let sink = Sink::default();
        let t0 = Instant::now();
        let mut p = DevicePoller::new(settings(), t0);
        p.next_request();
        p.on_failure(t0, SystemTime::now(), Failure::Crc, &sink);
        assert!(sink.take().iter().all(|e| e.stream() != Stream::Telemetry));
    }

    #[test]
    fn a_slow_reply_is_uncertain_and_raises_one_late_event_per_second() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut p = DevicePoller::new(settings(), t0);
        cycle_ok(&mut p, t0, MS, &sink);
        sink.take();
        for i in 1..=50 {
            cycle_ok(&mut p, t0 + i * 10 * MS, 30 * MS, &sink);
        }
        let kinds = sink.kinds();
        assert_eq!(kinds.iter().filter(|k| *k == "late").count(), 1);
        assert_eq!(
            kinds
                .iter()
                .filter(|k| *k == "telemetry(uncertain)")
                .count(),
            50
        );
        // A second later it is still late: one more event.
        cycle_ok(&mut p, t0 + 1100 * MS, 30 * MS, &sink);
        assert_eq!(sink.kinds(), vec!["late", "telemetry(uncertain)"]);
        // On time again: good, and the next lateness is reported at once.
        cycle_ok(&mut p, t0 + 1110 * MS, MS, &sink);
        assert_eq!(sink.kinds(), vec!["telemetry"]);
        cycle_ok(&mut p, t0 + 1120 * MS, 30 * MS, &sink);
        assert_eq!(sink.kinds(), vec!["late", "telemetry(uncertain)"]);
    }

    #[test]
    fn a_fault_code_raises_fault_then_fault_cleared() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut p = DevicePoller::new(settings(), t0);
        cycle_ok(&mut p, t0, MS, &sink);
        sink.take();
        p.next_request();
        p.on_reply(t0, SystemTime::now(), MS, &regs(0x2310), &sink);
        p.next_request();
        p.on_reply(t0, SystemTime::now(), MS, &regs(0), &sink);
        let notices: Vec<EventKind> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Notice(n) => Some(n.kind),
                _ => None,
            })
            .collect();
        assert_eq!(
            notices,
            vec![
                EventKind::Fault {
                    code: 0x2310,
                    register: None
                },
                EventKind::FaultCleared { code: 0x2310 }
            ]
        );
    }

    #[test]
    fn illegal_address_splits_the_read_and_the_split_is_remembered() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut p = DevicePoller::new(settings(), t0);
        assert_eq!(p.plan().blocks.len(), 1);
        p.next_request();
        assert!(p.on_illegal_address(t0, SystemTime::now(), &sink));
        let first = p.next_request().unwrap();
        assert_eq!((first.start, first.count), (0, 2));
        assert!(p.on_reply(t0, SystemTime::now(), MS, &[0x0012, 0xD450], &sink));
        let second = p.next_request().unwrap();
        assert_eq!((second.start, second.count), (7, 2));
        assert!(!p.on_reply(t0, SystemTime::now(), MS, &[0x0027, 0], &sink));
        assert!(sink
            .take()
            .iter()
            .any(|e| matches!(&e.body, EventBody::Telemetry(t) if t.position == Some(1234.0))));
        // The next cycle starts from the split plan.
        assert_eq!(p.plan().blocks.len(), 2);
    }

    #[test]
    fn a_field_the_device_lacks_is_dropped_with_one_event() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut s = settings();
        s.fields = vec![Field::new("position", 0, DataType::I32)].into();
        let mut p = DevicePoller::new(s, t0);
        p.next_request();
        assert!(!p.on_illegal_address(t0, SystemTime::now(), &sink));
        assert!(p.next_request().is_none());
        assert_eq!(
            sink.kinds(),
            vec!["comm_error", "availability:online", "online", "telemetry"]
        );
    }

    #[test]
    fn a_value_outside_its_range_is_uncertain() {
        let t0 = Instant::now();
        let sink = Sink::default();
        let mut s = settings();
        let mut fields = s.fields.to_vec();
        fields[0].max = Some(1000.0);
        s.fields = fields.into();
        let mut p = DevicePoller::new(s, t0);
        cycle_ok(&mut p, t0, MS, &sink);
        let tel = sink
            .take()
            .into_iter()
            .find_map(|e| match e.body {
                EventBody::Telemetry(t) => Some(t),
                _ => None,
            })
            .unwrap();
        assert!(tel.quality.out_of_range);
        assert_eq!(tel.position, Some(1234.0));
    }
}
