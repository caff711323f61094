//! Idempotency: a command id is executed at most once per device.
//!
//! [`IdBook`] remembers the last [`IdBook::CAPACITY`] ids of one device with a hash of
//! their body and, once known, their final result. A repeat of a finished id gets the
//! stored result again (`"duplicate":true`); a repeat of an id still in flight waits for
//! it; the same id with another body is `id_reused`. The book is bounded: the oldest id
//! is forgotten first, so a flood of new ids costs memory once, not for ever.

use std::collections::{HashMap, VecDeque};

use servogate_core::CommandReport;

use crate::parse::CommandId;

/// What the book says of an id.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// Never seen (or forgotten): go on, then [`IdBook::start`].
    New,
    /// Seen and finished: publish this again with `duplicate` set.
    Finished(CommandReport),
    /// Seen, still in flight: its result will be published once more for this repeat.
    InFlight,
    /// Seen with another body.
    Reused,
}

#[derive(Debug)]
struct Entry {
    body_hash: u64,
    result: Option<CommandReport>,
    /// Repeats that arrived while it was in flight.
    waiting: u32,
}

/// The ids of one device.
#[derive(Debug, Default)]
pub struct IdBook {
    entries: HashMap<CommandId, Entry>,
    order: VecDeque<CommandId>,
}

impl IdBook {
    /// Ids remembered per device: at 20 commands/s, almost a minute of them.
    pub const CAPACITY: usize = 1024;

    /// Looks `id` up; a repeat in flight is counted so its result goes out once more.
    pub fn seen(&mut self, id: &CommandId, body_hash: u64) -> Seen {
        match self.entries.get_mut(id) {
            None => Seen::New,
            Some(e) if e.body_hash != body_hash => Seen::Reused,
            Some(Entry {
                result: Some(r), ..
            }) => Seen::Finished(r.clone()),
            Some(e) => {
                e.waiting = e.waiting.saturating_add(1);
                Seen::InFlight
            }
        }
    }

    /// Records a new id as in flight.
    pub fn start(&mut self, id: CommandId, body_hash: u64) {
        if self.entries.contains_key(&id) {
            return;
        }
        if self.order.len() >= Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.entries.insert(
            id,
            Entry {
                body_hash,
                result: None,
                waiting: 0,
            },
        );
    }

    /// Stores the final result of `id`; returns how many repeats wait for it.
    pub fn finish(&mut self, id: &CommandId, result: &CommandReport) -> u32 {
        match self.entries.get_mut(id) {
            Some(e) => {
                e.result = Some(result.clone());
                std::mem::take(&mut e.waiting)
            }
            None => 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servogate_core::CommandStatus;
    use std::time::{Duration, SystemTime};

    fn id(s: &str) -> CommandId {
        CommandId::parse(s).unwrap()
    }

    fn done(i: &CommandId) -> CommandReport {
        CommandReport {
            id: Some(i.as_arc().clone()),
            action: Some("halt"),
            status: CommandStatus::Done,
            reason: None,
            message: String::new(),
            received: SystemTime::UNIX_EPOCH,
            latency: Duration::ZERO,
            duplicate: false,
            group: Vec::new(),
            reply: None,
        }
    }

    #[test]
    fn an_id_seen_three_times_runs_once_and_answers_every_time() {
        let mut book = IdBook::default();
        let c = id("c-1");
        assert_eq!(book.seen(&c, 7), Seen::New);
        book.start(c.clone(), 7);
        assert_eq!(book.seen(&c, 7), Seen::InFlight);
        assert_eq!(book.finish(&c, &done(&c)), 1, "one repeat waited");
        assert_eq!(book.seen(&c, 7), Seen::Finished(done(&c)));
    }

    #[test]
    fn the_same_id_with_another_body_is_reused() {
        let mut book = IdBook::default();
        let c = id("c-1");
        book.start(c.clone(), 7);
        assert_eq!(book.seen(&c, 8), Seen::Reused);
    }

    #[test]
    fn the_book_forgets_the_oldest_id_beyond_its_capacity() {
        let mut book = IdBook::default();
        for i in 0..IdBook::CAPACITY + 10 {
            book.start(id(&format!("c-{i}")), 1);
        }
        assert_eq!(book.len(), IdBook::CAPACITY);
        assert_eq!(book.seen(&id("c-0"), 1), Seen::New);
        assert_eq!(book.seen(&id("c-1033"), 1), Seen::InFlight);
    }
}
