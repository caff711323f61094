//! Commands on CANopen drives, sans-IO: each [`Order`] becomes a [`Job`] of expedited SDO
//! downloads and confirmations on the statusword, which the [`crate::Master`] runs on the
//! node's SDO client ahead of its own jobs (DESIGN.md section 7).
//!
//! - `write`: each named object of the drive (the `cia402` profile plus the config's)
//!   written with its type, the value scaled in reverse (`raw = (value - offset) / scale`);
//!   `done` once every download was confirmed.
//! - The CiA 402 actions: controlword (0x6040) downloads, each transition confirmed on the
//!   statusword as it arrives in the node's TPDOs (or, when no TPDO maps 0x6041, read with
//!   an SDO upload every [`AWAIT_INTERVAL`]), within [`TRANSITION_TIMEOUT`] (`failed`,
//!   `wrong_state`). `move` writes mode 1 (0x6060), the target (0x607A) and the profile
//!   velocity (0x6081), then does the set-point handshake on bit 4 / bit 12; `velocity`
//!   writes mode 3 and the target velocity (0x60FF). Positions and velocities are scaled
//!   in reverse of the drive's `position` / `velocity` objects unless the config names
//!   `target_position`, `profile_velocity` or `target_velocity` objects of their own.
//!
//! Rules every job keeps, as the Modbus executor's:
//! - its deadline is checked right before its first frame: a late job is `expired`;
//! - an SDO abort from the drive is `failed` (`sdo_abort`, the code in the message); a
//!   download with no answer in time is `unknown` and never sent again;
//! - one job per node at a time, in arrival order; a safety action (`quick_stop`, `halt`,
//!   `disable`) ends the node's running job and cancels the queued ones.
//!
//! Only a statusword that arrived after a step began counts for that step, so a TPDO
//! sampled before a write never confirms it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use servogate_command::nothing_sent;
use servogate_command::{Action, JobQueue, Order, Outcome, QueuedJob, Wait};
use servogate_core::cia402::{
    controlword, statusword, Goal, MODE_PROFILE_POSITION, MODE_PROFILE_VELOCITY, REACH_TIMEOUT,
    TRANSITION_TIMEOUT,
};
use servogate_core::{CommandReason, DriveState};

use crate::objects::{ObjType, ObjectSpec, ObjectTable};
use crate::pdo::objects as cia402;
use crate::sdo::AbortCode;

/// Between two statusword uploads, when no TPDO carries the statusword.
pub const AWAIT_INTERVAL: Duration = Duration::from_millis(2);

/// 0x6060 modes of operation (i8).
pub const MODES_OF_OPERATION: u16 = 0x6060;
/// 0x607A target position (i32).
pub const TARGET_POSITION: u16 = 0x607A;
/// 0x6081 profile velocity (u32).
pub const PROFILE_VELOCITY: u16 = 0x6081;
/// 0x60FF target velocity (i32).
pub const TARGET_VELOCITY: u16 = 0x60FF;

/// The SDO transfer a job needs next on its node's client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// An expedited download of 1 to 4 bytes.
    Download {
        index: u16,
        sub: u8,
        data: heapless::Vec<u8, 4>,
    },
    /// A statusword upload (0x6041), when no TPDO carries it.
    Upload { index: u16, sub: u8 },
}

/// How a job's transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Downloaded,
    Uploaded(Vec<u8>),
    /// The drive answered with an abort.
    Aborted(AbortCode),
    /// No answer in time (or the gateway gave the transfer up): it may have happened.
    Timeout,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Download `data` to `index:sub` (`what` names it in messages).
    Download {
        what: Arc<str>,
        index: u16,
        sub: u8,
        data: heapless::Vec<u8, 4>,
    },
    /// Wait for a statusword with all `mask` bits set.
    AwaitBits {
        mask: u16,
        what: &'static str,
        within: Duration,
    },
    /// Watch the statusword, write the controlword the state asks for, until the goal.
    Drive {
        goal: Goal,
        /// The state a controlword was last written for: not written again for it.
        wrote_for: Option<DriveState>,
    },
    /// One statusword: done at once if the drive is not operation enabled.
    HaltIfEnabled,
    /// A group move: wait here, set-point loaded, until the master starts every drive
    /// of the group with `word` in their RPDOs and one SYNC.
    Start { word: u16 },
}

impl Step {
    fn is_wait(&self) -> bool {
        !matches!(self, Step::Download { .. })
    }

    fn within(&self) -> (Duration, &'static str) {
        match self {
            Step::AwaitBits { within, what, .. } => (*within, what),
            Step::Drive { goal, .. } => (TRANSITION_TIMEOUT, goal.name()),
            Step::Start { .. } => (TRANSITION_TIMEOUT, "the group's start"),
            _ => (TRANSITION_TIMEOUT, "the statusword"),
        }
    }
}

/// One command in execution on one node.
#[derive(Debug)]
pub struct Job {
    order: Order,
    steps: VecDeque<Step>,
    /// A frame of this job went out: from now on it can no longer expire.
    started: bool,
    /// When the step in front began (a statusword must be newer to count).
    step_since: Instant,
    /// When the job next wants the SDO client (a download, or a statusword upload).
    next_due: Instant,
    /// A transfer of this job is on the wire.
    in_flight: bool,
    /// Set once a halt found nothing to halt.
    note: Option<&'static str>,
}

/// Why a value cannot be written as an object's raw value.
fn encode(spec: &ObjectSpec, value: f64, offset: bool) -> Result<heapless::Vec<u8, 4>, String> {
    let off = if offset { spec.offset } else { 0.0 };
    if spec.scale == 0.0 || !spec.scale.is_finite() {
        return Err(format!("{} has no usable scale", spec.name));
    }
    let raw = (value - off) / spec.scale;
    if !raw.is_finite() {
        return Err(format!("{} {value} is not a finite number", spec.name));
    }
    let range = |min: f64, max: f64| -> Result<i64, String> {
        let r = raw.round();
        if r < min || r > max {
            Err(format!(
                "{} {value} is raw {r} outside {min}..={max} of its {:?} object",
                spec.name, spec.ty
            ))
        } else {
            Ok(r as i64)
        }
    };
    let le = |bytes: &[u8]| heapless::Vec::from_slice(bytes).unwrap_or_default();
    Ok(match spec.ty {
        ObjType::Bool => le(&[u8::from(raw != 0.0)]),
        ObjType::I8 => le(&(range(-128.0, 127.0)? as i8).to_le_bytes()),
        ObjType::U8 => le(&(range(0.0, 255.0)? as u8).to_le_bytes()),
        ObjType::I16 => le(&(range(-32768.0, 32767.0)? as i16).to_le_bytes()),
        ObjType::U16 => le(&(range(0.0, 65535.0)? as u16).to_le_bytes()),
        ObjType::I32 => le(&(range(-2147483648.0, 2147483647.0)? as i32).to_le_bytes()),
        ObjType::U32 => le(&(range(0.0, 4294967295.0)? as u32).to_le_bytes()),
        ObjType::F32 => le(&(raw as f32).to_le_bytes()),
        ObjType::I64 | ObjType::U64 => {
            return Err(format!(
                "{} is a 64-bit object: commands write expedited SDO (at most 4 bytes)",
                spec.name
            ))
        }
    })
}

/// The object a command field is written to: the config's own object of that name, or
/// the CiA 402 object with the scale of the telemetry object it mirrors.
fn target_object(
    objects: &ObjectTable,
    name: &str,
    index: u16,
    ty: ObjType,
    mirrors: &str,
) -> ObjectSpec {
    if let Some(o) = objects.iter().find(|o| &*o.name == name) {
        return o.clone();
    }
    let mut spec = ObjectSpec::new(name, index, 0, ty);
    if let Some(m) = objects.iter().find(|o| &*o.name == mirrors) {
        spec.scale = m.scale;
        spec.offset = m.offset;
    }
    spec
}

fn download(spec: &ObjectSpec, value: f64, offset: bool) -> Result<Step, Outcome> {
    let data =
        encode(spec, value, offset).map_err(|e| Outcome::rejected(CommandReason::OutOfRange, e))?;
    Ok(Step::Download {
        what: spec.name.clone(),
        index: spec.index,
        sub: spec.sub,
        data,
    })
}

fn cw(word: u16) -> Step {
    Step::Download {
        what: Arc::from("controlword"),
        index: cia402::CONTROLWORD,
        sub: 0,
        data: heapless::Vec::from_slice(&word.to_le_bytes()).unwrap_or_default(),
    }
}

fn mode(m: i8) -> Step {
    Step::Download {
        what: Arc::from("modes_of_operation"),
        index: MODES_OF_OPERATION,
        sub: 0,
        data: heapless::Vec::from_slice(&m.to_le_bytes()).unwrap_or_default(),
    }
}

impl Job {
    /// Plans `order` for a drive with `objects`; an order that cannot be carried out is
    /// refused here, before anything is sent.
    pub fn plan(order: Order, objects: &ObjectTable, now: Instant) -> Result<Job, Outcome> {
        use controlword::*;
        let mut steps = VecDeque::new();
        match &order.action {
            Action::Write { values } => {
                for (name, v) in values {
                    let Some(spec) = objects.iter().find(|o| &*o.name == name) else {
                        return Err(Outcome::rejected(
                            CommandReason::UnknownField,
                            format!("the drive has no object named {name}"),
                        ));
                    };
                    steps.push_back(download(spec, *v, true)?);
                }
            }
            Action::Enable => steps.push_back(Step::Drive {
                goal: Goal::Enabled,
                wrote_for: None,
            }),
            Action::Disable => steps.push_back(Step::Drive {
                goal: Goal::Disabled,
                wrote_for: None,
            }),
            Action::QuickStop => {
                // Valid from every state: written at once, no statusword first.
                steps.push_back(cw(QUICK_STOP));
                steps.push_back(Step::Drive {
                    goal: Goal::Stopped,
                    wrote_for: Some(DriveState::OperationEnabled),
                });
            }
            Action::Halt => {
                steps.push_back(Step::HaltIfEnabled);
                steps.push_back(cw(ENABLE_OPERATION | HALT));
            }
            Action::FaultReset => {
                // Bit 7 acts on its rising edge: low first.
                steps.push_back(cw(DISABLE_VOLTAGE));
                steps.push_back(cw(FAULT_RESET));
                steps.push_back(Step::Drive {
                    goal: Goal::NoFault,
                    wrote_for: None,
                });
            }
            Action::Move {
                position,
                velocity,
                relative,
                wait,
            } => {
                let rel = if *relative { RELATIVE } else { 0 };
                steps.push_back(mode(MODE_PROFILE_POSITION));
                let target = target_object(
                    objects,
                    "target_position",
                    TARGET_POSITION,
                    ObjType::I32,
                    "position",
                );
                steps.push_back(download(&target, *position, !*relative)?);
                if let Some(v) = velocity {
                    let pv = target_object(
                        objects,
                        "profile_velocity",
                        PROFILE_VELOCITY,
                        ObjType::U32,
                        "velocity",
                    );
                    // A speed: the velocity's offset does not apply.
                    steps.push_back(download(&pv, *v, false)?);
                }
                // New set-point acts on the rising edge of bit 4: low, high, wait for
                // the acknowledge, low again (CiA 402-2, set-point handshake). In a group
                // the rising edge comes by RPDO, for every drive on one SYNC.
                steps.push_back(cw(ENABLE_OPERATION | rel));
                let word = ENABLE_OPERATION | NEW_SET_POINT | rel;
                if order.group.is_some_and(|g| g.members > 1) {
                    steps.push_back(Step::Start { word });
                } else {
                    steps.push_back(cw(word));
                }
                steps.push_back(Step::AwaitBits {
                    mask: statusword::SET_POINT_ACK,
                    what: "set-point acknowledge",
                    within: TRANSITION_TIMEOUT,
                });
                steps.push_back(cw(ENABLE_OPERATION | rel));
                if *wait == Wait::TargetReached {
                    steps.push_back(Step::AwaitBits {
                        mask: statusword::TARGET_REACHED,
                        what: "target reached",
                        within: REACH_TIMEOUT,
                    });
                }
            }
            Action::Velocity { velocity } => {
                steps.push_back(mode(MODE_PROFILE_VELOCITY));
                let tv = target_object(
                    objects,
                    "target_velocity",
                    TARGET_VELOCITY,
                    ObjType::I32,
                    "velocity",
                );
                steps.push_back(download(&tv, *velocity, true)?);
                steps.push_back(cw(ENABLE_OPERATION));
            }
        }
        Ok(Job {
            order,
            steps,
            started: false,
            step_since: now,
            next_due: now,
            in_flight: false,
            note: None,
        })
    }

    pub fn into_order(self) -> Order {
        self.order
    }

    /// When the job next needs attention: a transfer to start, a statusword upload, or
    /// the end of a wait's time. `None` while a transfer is on the wire.
    pub fn next_due(&self, by_tpdo: bool) -> Option<Instant> {
        if self.in_flight {
            return None;
        }
        match self.steps.front() {
            Some(step @ Step::Start { .. }) => Some(self.step_since + step.within().0),
            Some(step) if step.is_wait() && by_tpdo => Some(self.step_since + step.within().0),
            _ => Some(self.next_due),
        }
    }

    /// The next transfer, `Ok(None)` to wait (for a TPDO, or the next upload), or the
    /// job's end. `by_tpdo`: a TPDO of the node carries the statusword.
    pub fn poll(&mut self, now: Instant, by_tpdo: bool) -> Result<Option<Request>, Outcome> {
        if self.in_flight {
            return Ok(None);
        }
        if !self.started && now > self.order.deadline {
            let late = now - self.order.deadline;
            return Err(Outcome::expired(format!(
                "its deadline passed {:.1} ms before the bus could send it",
                late.as_secs_f64() * 1e3
            )));
        }
        let Some(step) = self.steps.front() else {
            return Err(self.finished());
        };
        if step.is_wait() {
            let (within, what) = step.within();
            if now.duration_since(self.step_since) >= within {
                return Err(Outcome::failed(
                    CommandReason::WrongState,
                    format!(
                        "the drive did not reach {what} within {:.0} ms",
                        within.as_secs_f64() * 1e3
                    ),
                ));
            }
            if by_tpdo || matches!(step, Step::Start { .. }) || now < self.next_due {
                return Ok(None);
            }
            self.in_flight = true;
            return Ok(Some(Request::Upload {
                index: cia402::STATUSWORD,
                sub: 0,
            }));
        }
        if now < self.next_due {
            return Ok(None);
        }
        let Step::Download {
            index, sub, data, ..
        } = step
        else {
            return Ok(None);
        };
        self.in_flight = true;
        Ok(Some(Request::Download {
            index: *index,
            sub: *sub,
            data: data.clone(),
        }))
    }

    /// The controlword that starts the job, while it waits for its group's start.
    fn start_word(&self) -> Option<u16> {
        match self.steps.front() {
            Some(Step::Start { word }) if !self.in_flight => Some(*word),
            _ => None,
        }
    }

    /// The group started at `now`: the set-point acknowledge must come after it.
    fn group_started(&mut self, now: Instant) {
        if matches!(self.steps.front(), Some(Step::Start { .. })) {
            self.started = true;
            self.advance(now);
        }
    }

    /// The first frame of the job went out (or could not: then it stays unstarted).
    fn sent(&mut self) {
        self.started = true;
    }

    fn finished(&self) -> Outcome {
        match self.note {
            Some(note) => Outcome::done_with(note),
            None => Outcome::done(),
        }
    }

    fn what(&self) -> Arc<str> {
        match self.steps.front() {
            Some(Step::Download { what, .. }) => what.clone(),
            _ => Arc::from("statusword"),
        }
    }

    /// The end of the job's transfer; `Some` when the job is over.
    pub fn on_reply(&mut self, now: Instant, reply: Reply) -> Option<Outcome> {
        if !self.in_flight {
            return None;
        }
        self.in_flight = false;
        let is_download = matches!(self.steps.front(), Some(Step::Download { .. }));
        let what = self.what();
        match reply {
            Reply::Downloaded if is_download => {
                self.advance(now);
                None
            }
            Reply::Aborted(code) => Some(Outcome::failed(
                CommandReason::SdoAbort,
                format!("the drive aborted the SDO transfer of {what}: {code}"),
            )),
            Reply::Timeout if is_download => Some(Outcome::unknown(format!(
                "no answer to the SDO download of {what} in time: it may or may not have been applied"
            ))),
            Reply::Timeout => {
                // A statusword read that got no answer: read again, within the step's time.
                self.next_due = now + AWAIT_INTERVAL;
                None
            }
            Reply::Uploaded(data) if !is_download => match data.get(..2) {
                Some(&[lo, hi]) => self.on_statusword(u16::from_le_bytes([lo, hi]), now),
                _ => {
                    self.next_due = now + AWAIT_INTERVAL;
                    None
                }
            },
            // A reply of the wrong kind for the step: the transfer says nothing useful.
            _ => {
                self.next_due = now;
                None
            }
        }
    }

    /// A statusword of the node that arrived at `at`; `Some` when the job is over.
    pub fn on_statusword(&mut self, sw: u16, at: Instant) -> Option<Outcome> {
        if at < self.step_since {
            return None;
        }
        let state = DriveState::from_statusword(sw);
        let next = match self.steps.front_mut() {
            Some(Step::AwaitBits { mask, .. }) if sw & *mask == *mask => Next::Advance,
            Some(Step::HaltIfEnabled) if state == DriveState::OperationEnabled => Next::Advance,
            Some(Step::HaltIfEnabled) => {
                Next::Nothing("the drive was not in operation_enabled: nothing to halt")
            }
            Some(Step::Drive { goal, wrote_for }) => {
                if goal.reached(state) {
                    Next::Advance
                } else {
                    match goal.next(state) {
                        Err(why) => Next::End(Outcome::failed(CommandReason::WrongState, why)),
                        Ok(Some(word)) if *wrote_for != Some(state) => {
                            *wrote_for = Some(state);
                            Next::Write(word)
                        }
                        Ok(_) => Next::Wait,
                    }
                }
            }
            _ => Next::Wait,
        };
        match next {
            Next::Advance => self.advance(at),
            Next::Nothing(note) => {
                self.steps.clear();
                self.note = Some(note);
                self.next_due = at;
            }
            Next::End(outcome) => return Some(outcome),
            Next::Write(word) => {
                // The write goes first; the Drive step stays to confirm it (its time runs
                // on from when it began).
                self.steps.push_front(cw(word));
                self.next_due = at;
            }
            Next::Wait => self.next_due = at + AWAIT_INTERVAL,
        }
        None
    }

    fn advance(&mut self, now: Instant) {
        self.steps.pop_front();
        self.step_since = now;
        self.next_due = now;
    }
}

impl QueuedJob for Job {
    fn order(&self) -> &Order {
        &self.order
    }
    fn is_started(&self) -> bool {
        self.started
    }
    fn is_confirmed(&self) -> bool {
        self.steps.is_empty() && !self.in_flight
    }
    fn finished(&self) -> Outcome {
        Job::finished(self)
    }
}

/// What a statusword leads to.
enum Next {
    Advance,
    /// Nothing left to do (the note says why).
    Nothing(&'static str),
    End(Outcome),
    Write(u16),
    Wait,
}

/// The command jobs of one bus, bounded, one running per node (device).
#[derive(Debug, Default)]
pub struct Executor {
    jobs: JobQueue<Job>,
}

impl Executor {
    /// Jobs held at once; the bus's inbox holds the rest.
    pub const CAPACITY: usize = JobQueue::<Job>::CAPACITY;

    pub fn is_full(&self) -> bool {
        self.jobs.is_full()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Adds a planned job; a stop ends or cancels the device's others ([`JobQueue`]).
    pub fn push(&mut self, job: Job) -> Vec<(Job, Outcome)> {
        self.jobs.push(job)
    }

    /// The running job of `device` (its first in arrival order).
    fn front(&self, device: &str) -> Option<usize> {
        self.jobs.front(device)
    }

    /// True when `device` has a job.
    pub fn has_job(&self, device: &str) -> bool {
        self.front(device).is_some()
    }

    /// When the running job of `device` next needs attention.
    pub fn next_due(&self, device: &str, by_tpdo: bool) -> Option<Instant> {
        self.front(device)
            .and_then(|i| self.jobs[i].next_due(by_tpdo))
    }

    /// The next transfer of `device`'s running job at `now`; jobs that ended without one
    /// (expired, done, timed out) go to `ended`, and the next job of the device is asked.
    pub fn poll(
        &mut self,
        device: &str,
        now: Instant,
        by_tpdo: bool,
        ended: &mut Vec<(Job, Outcome)>,
    ) -> Option<Request> {
        loop {
            let i = self.front(device)?;
            match self.jobs[i].poll(now, by_tpdo) {
                Ok(request) => return request,
                Err(outcome) => ended.push((self.jobs.remove(i), outcome)),
            }
        }
    }

    /// The transfer handed out by `poll` is on its way: the job has started.
    pub fn sent(&mut self, device: &str) {
        if let Some(i) = self.front(device) {
            self.jobs[i].sent();
        }
    }

    /// The transfer handed out could not start (the SDO client refused it): the job
    /// waits and tries again shortly.
    pub fn not_sent(&mut self, device: &str, now: Instant) {
        if let Some(i) = self.front(device) {
            let j = &mut self.jobs[i];
            j.in_flight = false;
            j.next_due = now + AWAIT_INTERVAL;
        }
    }

    /// True while `device`'s running job has a transfer on the wire.
    pub fn in_flight(&self, device: &str) -> bool {
        self.front(device).is_some_and(|i| self.jobs[i].in_flight)
    }

    /// The end of `device`'s transfer; the job if it ended.
    pub fn on_reply(&mut self, device: &str, now: Instant, reply: Reply) -> Option<(Job, Outcome)> {
        let i = self.front(device)?;
        let outcome = self.jobs[i].on_reply(now, reply)?;
        Some((self.jobs.remove(i), outcome))
    }

    /// A statusword of `device` from a TPDO at `at`; the job if it ended.
    pub fn on_statusword(&mut self, device: &str, sw: u16, at: Instant) -> Option<(Job, Outcome)> {
        let i = self.front(device)?;
        let outcome = self.jobs[i].on_statusword(sw, at)?;
        Some((self.jobs.remove(i), outcome))
    }

    /// Where `device`'s part of group `key` is: `None` when it has no job of that group
    /// (it ended), `Some(None)` while it loads, `Some(Some(word))` when it waits for the
    /// start with that controlword.
    pub fn group_stage(&self, device: &str, key: u64) -> Option<Option<u16>> {
        let i = self
            .jobs
            .iter()
            .position(|j| &**j.device() == device && j.order.group.is_some_and(|g| g.key == key))?;
        let running = self.front(device) == Some(i);
        Some(if running {
            self.jobs[i].start_word()
        } else {
            None
        })
    }

    /// Group `key` was started at `now`: its jobs go on to the acknowledge.
    pub fn group_started(&mut self, key: u64, now: Instant) {
        for j in self.jobs.iter_mut() {
            if j.order.group.is_some_and(|g| g.key == key) {
                j.group_started(now);
            }
        }
    }

    /// Ends every job of group `key` (one of its drives cannot start): never started
    /// `rejected`, loaded `failed`, both `group_rejected` with `why`.
    pub fn end_group(&mut self, key: u64, why: &str) -> Vec<(Job, Outcome)> {
        let mut ended = Vec::new();
        while let Some(i) = self
            .jobs
            .iter()
            .position(|j| j.order.group.is_some_and(|g| g.key == key))
        {
            let job = self.jobs.remove(i);
            let outcome = if job.started {
                Outcome::failed(
                    CommandReason::GroupRejected,
                    format!("{why}: this drive's set-point was loaded but not started"),
                )
            } else {
                Outcome::rejected(
                    CommandReason::GroupRejected,
                    format!("{why}: nothing was sent"),
                )
            };
            ended.push((job, outcome));
        }
        ended
    }

    /// Room for `n` more jobs.
    pub fn has_room(&self, n: usize) -> bool {
        self.jobs.len() + n <= Self::CAPACITY
    }

    /// Ends every job of devices `keep` says no to (a reload removed them): never started
    /// is `rejected` (`bus_down`), started is `unknown`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Vec<(Job, Outcome)> {
        self.jobs.end_unless(
            |j| keep(j.device()),
            "the drive was removed from the bus",
            "the drive was removed from the bus before it confirmed",
        )
    }

    /// Ends every job (the bus stops): those never started are `rejected` (`bus_down`),
    /// the others `unknown`.
    pub fn drain(&mut self) -> Vec<(Job, Outcome)> {
        self.jobs.drain()
    }
}

#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod tests;
