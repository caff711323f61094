//! The command jobs of one bus, whatever the bus: one job per device at a time, in
//! arrival order, and the stop rule. Each protocol's executor keeps its jobs here and
//! adds what it alone knows (frames, transfers, statuswords).
//!
//! The stop rule: a safety action (`quick_stop`, `halt`, `disable`) ends the device's
//! running job (`failed`, `wrong_state`, or `done` when every frame of it was already
//! confirmed) and cancels its queued ones (`rejected`, nothing sent), so no command queued
//! before a stop goes out after it.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use servogate_core::{CommandReason, CommandStatus};

use crate::order::{Order, Outcome};
use crate::parse::{Action, CommandId};

/// What the queue needs to know of a protocol's job.
pub trait QueuedJob {
    /// The order it carries out.
    fn order(&self) -> &Order;
    fn device(&self) -> &Arc<str> {
        &self.order().device
    }
    fn id(&self) -> &CommandId {
        &self.order().id
    }
    fn action(&self) -> &Action {
        &self.order().action
    }
    /// A frame of it went out.
    fn is_started(&self) -> bool;
    /// Every frame of it went out and was confirmed: only its result is left.
    fn is_confirmed(&self) -> bool;
    /// Its result once confirmed.
    fn finished(&self) -> Outcome;

    fn is_safety(&self) -> bool {
        self.action().is_safety()
    }
}

/// The jobs of one bus, oldest first.
#[derive(Debug)]
pub struct JobQueue<J> {
    jobs: Vec<J>,
}

impl<J> Default for JobQueue<J> {
    fn default() -> Self {
        Self { jobs: Vec::new() }
    }
}

impl<J> Deref for JobQueue<J> {
    type Target = [J];
    fn deref(&self) -> &[J] {
        &self.jobs
    }
}

impl<J> DerefMut for JobQueue<J> {
    fn deref_mut(&mut self) -> &mut [J] {
        &mut self.jobs
    }
}

impl<J: QueuedJob> JobQueue<J> {
    /// Jobs held at once; beyond it a bus refuses commands other than stops.
    pub const CAPACITY: usize = 64;

    pub fn is_full(&self) -> bool {
        self.jobs.len() >= Self::CAPACITY
    }

    /// Adds a job; a stop ends or cancels the device's other jobs, returned with their
    /// outcomes.
    pub fn push(&mut self, job: J) -> Vec<(J, Outcome)> {
        let mut ended = Vec::new();
        if job.is_safety() {
            let device = job.device().clone();
            let action = job.action().name();
            let id = job.id().as_str().to_owned();
            let mut i = 0;
            while i < self.jobs.len() {
                if *self.jobs[i].device() != device || self.jobs[i].is_safety() {
                    i += 1;
                    continue;
                }
                let old = self.jobs.remove(i);
                let outcome = if old.is_confirmed() {
                    old.finished()
                } else if old.is_started() {
                    Outcome::failed(
                        CommandReason::WrongState,
                        format!("interrupted by {action} {id}"),
                    )
                } else {
                    Outcome::rejected(
                        CommandReason::WrongState,
                        format!("cancelled by {action} {id} before it was sent"),
                    )
                };
                ended.push((old, outcome));
            }
        }
        self.jobs.push(job);
        ended
    }

    /// True when job `i` is its device's running job (the first of the device).
    pub fn is_running(&self, i: usize) -> bool {
        self.jobs[..i]
            .iter()
            .all(|o| o.device() != self.jobs[i].device())
    }

    /// The running job of `device`.
    pub fn front(&self, device: &str) -> Option<usize> {
        self.jobs.iter().position(|j| &**j.device() == device)
    }

    pub fn remove(&mut self, i: usize) -> J {
        self.jobs.remove(i)
    }

    /// Ends the jobs `keep` says no to: never started `rejected` (`bus_down`) with
    /// `unsent`, started `unknown` with `unconfirmed`.
    pub fn end_unless(
        &mut self,
        keep: impl Fn(&J) -> bool,
        unsent: &str,
        unconfirmed: &str,
    ) -> Vec<(J, Outcome)> {
        let mut ended = Vec::new();
        let mut i = 0;
        while i < self.jobs.len() {
            if keep(&self.jobs[i]) {
                i += 1;
                continue;
            }
            let j = self.jobs.remove(i);
            let o = if j.is_started() {
                Outcome::unknown(unconfirmed)
            } else {
                Outcome::rejected(CommandReason::BusDown, unsent)
            };
            ended.push((j, o));
        }
        ended
    }

    /// Ends every job (the bus stops).
    pub fn drain(&mut self) -> Vec<(J, Outcome)> {
        self.end_unless(
            |_| false,
            "the bus stopped before it was sent",
            "the bus stopped before the drive confirmed it",
        )
    }
}

/// True for the statuses that mean nothing reached the drive.
pub fn nothing_sent(o: &Outcome) -> bool {
    matches!(o.status, CommandStatus::Rejected | CommandStatus::Expired)
}
