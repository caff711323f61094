//! Commands on Modbus drives, sans-IO: each [`Order`] becomes a [`Job`], a short list of
//! transactions the bus task runs ahead of its polls.
//!
//! - `write`: each field's value encoded in reverse of its decoding (scale, offset, type,
//!   word and byte order), 06 Write Single Register for one register, 16 Write Multiple
//!   Registers for more; `done` once every echo came back.
//! - The CiA 402 actions, on drives whose profile maps `controlword` and `statusword`
//!   (and `target_position`, `profile_velocity`, `modes_of_operation`,
//!   `target_velocity` for the moves): each controlword write is confirmed on the
//!   statusword, which is read until the drive is where it was asked to go, or the
//!   transition's time is up (`failed`, `wrong_state`).
//!
//! Rules every job keeps (DESIGN.md section 7):
//! - its deadline is checked right before its first frame: a late job is `expired` and
//!   sends nothing;
//! - a write that got no (valid) echo is `unknown` and never sent again;
//! - one job per device at a time, in arrival order; a safety action (`quick_stop`,
//!   `halt`, `disable`) ends the device's running job and cancels the ones queued behind
//!   it, so no move queued before a stop goes out after it.

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

use crate::poll::ReadRequest;
use crate::profile::{Field, RegisterKind};

/// Between two statusword reads of a job that waits for the drive.
pub const AWAIT_INTERVAL: Duration = Duration::from_millis(2);

/// One frame a job needs on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transaction {
    /// 06 (one register) or 16 (more).
    Write {
        unit: u8,
        start: u16,
        values: heapless::Vec<u16, 4>,
    },
    Read(ReadRequest),
}

impl Transaction {
    /// The unit the frame is addressed to.
    pub fn unit(&self) -> u8 {
        match self {
            Self::Write { unit, .. } => *unit,
            Self::Read(r) => r.unit,
        }
    }
}

/// What became of a job's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxResult {
    /// The write's echo, or the read's registers.
    Ok(Vec<u16>),
    Exception(u8),
    Timeout,
    /// CRC, wrong unit or shape: the frame went out, the answer is unusable.
    Garbled(&'static str),
    /// The port failed (or is not open: then nothing went out).
    Io,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Write `values` at `start` (`what` names it in messages).
    Write {
        what: Arc<str>,
        start: u16,
        values: heapless::Vec<u16, 4>,
    },
    /// Read the statusword until `mask` bits are all set.
    AwaitBits {
        mask: u16,
        what: &'static str,
        within: Duration,
    },
    /// Read the statusword, write the controlword the state asks for, until the goal.
    Drive {
        goal: Goal,
        /// The state a controlword was last written for: not written again for it.
        wrote_for: Option<DriveState>,
    },
    /// Read the statusword once: done at once if the drive is not operation enabled.
    HaltIfEnabled,
}

/// What a statusword read leads to.
enum Next {
    Advance,
    /// Nothing left to do (the note says why).
    Nothing(&'static str),
    End(Outcome),
    Write(u16),
    Wait,
}

/// One command in execution.
#[derive(Debug)]
pub struct Job {
    order: Order,
    unit: u8,
    statusword: Option<Field>,
    controlword: Option<Field>,
    steps: VecDeque<Step>,
    /// A frame of this job went out: from now on it can no longer expire.
    started: bool,
    step_since: Option<Instant>,
    next_due: Instant,
    /// The transaction handed out and not answered yet.
    pending: Option<Transaction>,
    /// The last statusword read failed (for the message when time is up).
    last_read_failed: bool,
    /// Set once a halt found nothing to halt.
    note: Option<&'static str>,
}

fn field<'a>(fields: &'a [Field], name: &str) -> Option<&'a Field> {
    fields.iter().find(|f| &*f.name == name)
}

fn write_step(fields: &[Field], name: &str, value: f64) -> Result<Step, Outcome> {
    let f = field(fields, name).ok_or_else(|| {
        Outcome::rejected(
            CommandReason::UnknownField,
            format!("the profile maps no {name}"),
        )
    })?;
    if f.kind != RegisterKind::Holding {
        return Err(Outcome::rejected(
            CommandReason::NotAllowed,
            format!("{name} is an input register: it cannot be written"),
        ));
    }
    let values = f
        .encode(value)
        .map_err(|e| Outcome::rejected(CommandReason::OutOfRange, e.to_string()))?;
    Ok(Step::Write {
        what: f.name.clone(),
        start: f.address,
        values,
    })
}

fn cw_step(fields: &[Field], word: u16) -> Result<Step, Outcome> {
    write_step(fields, "controlword", f64::from(word))
}

impl Job {
    /// Plans `order` for a device with `unit` and `fields`; an order the profile cannot
    /// carry is refused here, before anything is sent.
    pub fn plan(order: Order, unit: u8, fields: &[Field], now: Instant) -> Result<Job, Outcome> {
        use controlword::*;
        let statusword = field(fields, "statusword").cloned();
        let needs_statusword = !matches!(order.action, Action::Write { .. });
        if needs_statusword && (statusword.is_none() || field(fields, "controlword").is_none()) {
            return Err(Outcome::rejected(
                CommandReason::NotAllowed,
                format!(
                    "{} needs a profile that maps controlword and statusword",
                    order.action.name()
                ),
            ));
        }
        let mut steps = VecDeque::new();
        match &order.action {
            Action::Write { values } => {
                for (name, v) in values {
                    steps.push_back(write_step(fields, name, *v)?);
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
                // Valid from every state: written at once, no read first.
                steps.push_back(cw_step(fields, QUICK_STOP)?);
                steps.push_back(Step::Drive {
                    goal: Goal::Stopped,
                    wrote_for: Some(DriveState::OperationEnabled),
                });
            }
            Action::Halt => {
                steps.push_back(Step::HaltIfEnabled);
                steps.push_back(cw_step(fields, ENABLE_OPERATION | HALT)?);
            }
            Action::FaultReset => {
                // Bit 7 acts on its rising edge: low first.
                steps.push_back(cw_step(fields, DISABLE_VOLTAGE)?);
                steps.push_back(cw_step(fields, FAULT_RESET)?);
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
                if field(fields, "modes_of_operation").is_some() {
                    steps.push_back(write_step(
                        fields,
                        "modes_of_operation",
                        f64::from(MODE_PROFILE_POSITION),
                    )?);
                }
                steps.push_back(write_step(fields, "target_position", *position)?);
                if let Some(v) = velocity {
                    steps.push_back(write_step(fields, "profile_velocity", *v)?);
                }
                // New set-point acts on the rising edge of bit 4: low, high, wait for
                // the acknowledge, low again (CiA 402-2, set-point handshake).
                steps.push_back(cw_step(fields, ENABLE_OPERATION | rel)?);
                steps.push_back(cw_step(fields, ENABLE_OPERATION | NEW_SET_POINT | rel)?);
                steps.push_back(Step::AwaitBits {
                    mask: statusword::SET_POINT_ACK,
                    what: "set-point acknowledge",
                    within: TRANSITION_TIMEOUT,
                });
                steps.push_back(cw_step(fields, ENABLE_OPERATION | rel)?);
                if *wait == Wait::TargetReached {
                    steps.push_back(Step::AwaitBits {
                        mask: statusword::TARGET_REACHED,
                        what: "target reached",
                        within: REACH_TIMEOUT,
                    });
                }
            }
            Action::Velocity { velocity } => {
                if field(fields, "modes_of_operation").is_some() {
                    steps.push_back(write_step(
                        fields,
                        "modes_of_operation",
                        f64::from(MODE_PROFILE_VELOCITY),
                    )?);
                }
                steps.push_back(write_step(fields, "target_velocity", *velocity)?);
                steps.push_back(cw_step(fields, ENABLE_OPERATION)?);
            }
        }
        Ok(Job {
            order,
            unit,
            statusword,
            controlword: field(fields, "controlword").cloned(),
            steps,
            started: false,
            step_since: None,
            next_due: now,
            pending: None,
            last_read_failed: false,
            note: None,
        })
    }

    pub fn unit(&self) -> u8 {
        self.unit
    }

    /// When the job next needs the line.
    pub fn next_due(&self) -> Instant {
        self.next_due
    }

    /// The next frame, or the job's end: `Err` when it expired before its first frame,
    /// or finished without needing another one.
    pub fn poll_transaction(&mut self, now: Instant) -> Result<Transaction, Outcome> {
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
        let tx = match step {
            Step::Write { start, values, .. } => Transaction::Write {
                unit: self.unit,
                start: *start,
                values: values.clone(),
            },
            Step::AwaitBits { .. } | Step::Drive { .. } | Step::HaltIfEnabled => {
                // `plan` refused every statusword step without a statusword field.
                let Some(sw) = &self.statusword else {
                    return Err(Outcome::rejected(
                        CommandReason::NotAllowed,
                        "the profile maps no statusword",
                    ));
                };
                Transaction::Read(ReadRequest {
                    unit: self.unit,
                    kind: sw.kind,
                    start: sw.address,
                    count: sw.data_type.registers(),
                })
            }
        };
        self.step_since.get_or_insert(now);
        self.pending = Some(tx.clone());
        Ok(tx)
    }

    fn finished(&self) -> Outcome {
        match self.note {
            Some(note) => Outcome::done_with(note),
            None => Outcome::done(),
        }
    }

    /// The result of the transaction last handed out; `Some` when the job is over.
    pub fn on_result(&mut self, now: Instant, result: TxResult) -> Option<Outcome> {
        let tx = self.pending.take()?;
        let is_write = matches!(tx, Transaction::Write { .. });
        if matches!(result, TxResult::Io) && !self.started {
            return Some(Outcome::rejected(
                CommandReason::BusDown,
                "the port is not open: nothing was sent",
            ));
        }
        self.started = true;
        if is_write {
            let what = match self.steps.front() {
                Some(Step::Write { what, .. }) => what.clone(),
                _ => Arc::from("?"),
            };
            return match result {
                TxResult::Ok(_) => {
                    self.advance(now);
                    None
                }
                TxResult::Exception(code) => Some(Outcome::failed(
                    CommandReason::Exception,
                    format!(
                        "the drive answered exception {code:#04x} ({}) to the write of {what}",
                        exception_name(code)
                    ),
                )),
                TxResult::Timeout => Some(Outcome::unknown(format!(
                    "no answer to the write of {what} in time: it may or may not have been applied"
                ))),
                TxResult::Garbled(kind) => Some(Outcome::unknown(format!(
                    "the answer to the write of {what} was unusable ({kind}): it may or may not have been applied"
                ))),
                TxResult::Io => Some(Outcome::unknown(format!(
                    "the port failed during the write of {what}"
                ))),
            };
        }
        // A statusword read.
        let sw = match result {
            TxResult::Ok(regs) => {
                let decoded = self.statusword.as_ref().and_then(|f| f.decode(&regs).ok());
                decoded.map(|v| v.clamp(0.0, f64::from(u16::MAX)) as u16)
            }
            TxResult::Exception(code) => {
                return Some(Outcome::failed(
                    CommandReason::Exception,
                    format!(
                        "the drive answered exception {code:#04x} ({}) to the statusword read",
                        exception_name(code)
                    ),
                ))
            }
            _ => None,
        };
        self.last_read_failed = sw.is_none();
        if let Some(sw) = sw {
            match self.on_statusword(sw) {
                Next::Advance => {
                    self.advance(now);
                    return None;
                }
                Next::Nothing(note) => {
                    self.steps.clear();
                    self.note = Some(note);
                    self.next_due = now;
                    return None;
                }
                Next::End(outcome) => return Some(outcome),
                Next::Write(word) => {
                    let Some(cw) = self.controlword_step(word) else {
                        return Some(Outcome::rejected(
                            CommandReason::NotAllowed,
                            "the profile maps no controlword",
                        ));
                    };
                    // The write goes first; the Drive step stays to confirm it.
                    self.steps.push_front(cw);
                    self.next_due = now;
                    return None;
                }
                Next::Wait => {}
            }
        }
        // Not there yet: read again shortly, unless the step's time is up.
        let (within, what) = match self.steps.front() {
            Some(Step::AwaitBits { within, what, .. }) => (*within, *what),
            Some(Step::Drive { goal, .. }) => (TRANSITION_TIMEOUT, goal.name()),
            _ => (TRANSITION_TIMEOUT, "the statusword"),
        };
        let since = self.step_since.unwrap_or(now);
        if now.duration_since(since) >= within {
            let ms = within.as_secs_f64() * 1e3;
            return Some(if self.last_read_failed {
                Outcome::unknown(format!(
                    "the statusword could not be read for {ms:.0} ms while waiting for {what}"
                ))
            } else {
                Outcome::failed(
                    CommandReason::WrongState,
                    format!("the drive did not reach {what} within {ms:.0} ms"),
                )
            });
        }
        self.next_due = now + AWAIT_INTERVAL;
        None
    }

    /// What a statusword read means for the step in front.
    fn on_statusword(&mut self, sw: u16) -> Next {
        let state = DriveState::from_statusword(sw);
        match self.steps.front_mut() {
            Some(Step::AwaitBits { mask, .. }) if sw & *mask == *mask => Next::Advance,
            Some(Step::HaltIfEnabled) if state == DriveState::OperationEnabled => Next::Advance,
            Some(Step::HaltIfEnabled) => {
                Next::Nothing("the drive was not in operation_enabled: nothing to halt")
            }
            Some(Step::Drive { goal, wrote_for }) => {
                if goal.reached(state) {
                    return Next::Advance;
                }
                match goal.next(state) {
                    Err(why) => Next::End(Outcome::failed(CommandReason::WrongState, why)),
                    Ok(Some(word)) if *wrote_for != Some(state) => {
                        *wrote_for = Some(state);
                        Next::Write(word)
                    }
                    Ok(_) => Next::Wait,
                }
            }
            _ => Next::Wait,
        }
    }

    fn controlword_step(&self, word: u16) -> Option<Step> {
        let f = self.controlword.as_ref()?;
        cw_step(std::slice::from_ref(f), word).ok()
    }

    fn advance(&mut self, now: Instant) {
        self.steps.pop_front();
        self.step_since = None;
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
        self.steps.is_empty() && self.pending.is_none()
    }
    fn finished(&self) -> Outcome {
        Job::finished(self)
    }
}

fn exception_name(code: u8) -> &'static str {
    // Modbus Application Protocol V1.1b3, section 7.
    match code {
        1 => "illegal function",
        2 => "illegal data address",
        3 => "illegal data value",
        4 => "server device failure",
        5 => "acknowledge",
        6 => "server device busy",
        _ => "exception",
    }
}

/// The jobs of one bus, bounded, one running per device.
#[derive(Debug, Default)]
pub struct Executor {
    jobs: JobQueue<Job>,
}

impl Executor {
    /// Jobs held at once; beyond it the bus refuses commands other than stops.
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

    /// The index of the job that should use the line next: the earliest due of each
    /// device's first job (ties in arrival order); safety actions first.
    fn pick(&self) -> Option<usize> {
        let mut best: Option<(usize, (bool, Instant))> = None;
        for (i, j) in self.jobs.iter().enumerate() {
            if !self.jobs.is_running(i) {
                continue;
            }
            let key = (!j.is_safety(), j.next_due());
            if best.is_none_or(|(_, k)| key < k) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| i)
    }

    /// When the line is next needed by a job.
    pub fn next_due(&self) -> Option<Instant> {
        self.pick().map(|i| self.jobs[i].next_due())
    }

    /// The next transaction due at `now`, with the job's index; jobs that ended without
    /// needing one (expired, done) are returned in `ended`.
    pub fn poll(
        &mut self,
        now: Instant,
        ended: &mut Vec<(Job, Outcome)>,
    ) -> Option<(usize, Transaction)> {
        loop {
            let i = self.pick()?;
            if self.jobs[i].next_due() > now {
                return None;
            }
            match self.jobs[i].poll_transaction(now) {
                Ok(tx) => return Some((i, tx)),
                Err(outcome) => ended.push((self.jobs.remove(i), outcome)),
            }
        }
    }

    /// True when job `index` is a safety action (`quick_stop`, `halt`, `disable`).
    pub fn is_safety(&self, index: usize) -> bool {
        self.jobs.get(index).is_some_and(Job::is_safety)
    }

    /// Job `index` does not get the transaction it was handed (its unit is probed first).
    pub fn unpoll(&mut self, index: usize) {
        if let Some(j) = self.jobs.get_mut(index) {
            j.pending = None;
        }
    }

    /// The probe before job `index`'s transaction went unanswered. A job that sent
    /// nothing yet waits (and expires at its deadline); one that did counts it as a
    /// missed answer.
    pub fn on_probe_failed(&mut self, index: usize, now: Instant) -> Option<(Job, Outcome)> {
        let job = self.jobs.get_mut(index)?;
        if !job.started {
            job.next_due = now + AWAIT_INTERVAL;
            return None;
        }
        let tx = job.poll_transaction(now).ok()?;
        let result = match tx {
            Transaction::Write { .. } => {
                let outcome =
                    Outcome::unknown("the unit stopped answering between the command's frames");
                return Some((self.jobs.remove(index), outcome));
            }
            Transaction::Read(_) => TxResult::Timeout,
        };
        self.on_result(index, now, result)
    }

    /// The result of job `index`'s transaction; the job if it ended.
    pub fn on_result(
        &mut self,
        index: usize,
        now: Instant,
        result: TxResult,
    ) -> Option<(Job, Outcome)> {
        let job = self.jobs.get_mut(index)?;
        let outcome = job.on_result(now, result)?;
        Some((self.jobs.remove(index), outcome))
    }

    /// Ends every job (the bus stops): those never started are `rejected` (`bus_down`),
    /// the others `unknown`.
    pub fn drain(&mut self) -> Vec<(Job, Outcome)> {
        self.jobs.drain()
    }
}

#[cfg(test)]
mod tests;
