//! The forwarder's view of the event log: messages by log index, the recent ones in
//! memory (the tail), older ones read back from disk when a backlog outgrew the tail (a
//! broker outage, events of an earlier boot). An index leaves only once the broker
//! acknowledged it; the acknowledged-up-to index is what the log thread stores in the
//! cursor file.
//!
//! When the log can no longer be written (a full disk, a read-only directory) the feed
//! keeps every new message in memory instead, bounded by the ring's capacity (the oldest
//! goes first, counted): the gateway goes on publishing from memory.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use servogate_core::RingStats;
use servogate_log::{Entry, FsDir, Reader};
use servogate_mqtt::{Feed, Prepared};
use tokio::sync::Notify;
use tracing::{error, warn};

use super::record;

/// Bytes of recent messages kept in memory while the log is healthy (about a second of
/// six axes at 10 ms); older ones are read back from the log when needed, so a backlog
/// costs no memory.
pub const TAIL_BYTES: usize = 256 << 10;

#[derive(Debug)]
struct State {
    /// Messages `tail_first..tail_first + tail.len()`.
    tail: VecDeque<Arc<Prepared>>,
    tail_first: u64,
    tail_bytes: usize,
    /// Index after the last message written (or kept in memory).
    written: u64,
    /// The next index to hand out.
    next: u64,
    /// Every index below was acknowledged (or is gone for good).
    acked: u64,
    /// Acknowledged above `acked`.
    acked_ahead: BTreeSet<u64>,
    /// Handed out, not yet acknowledged.
    handed: BTreeSet<u64>,
    /// Reading from disk.
    reader: Option<Reader<FsDir>>,
    /// Messages kept in memory at most once the log failed.
    memory_cap: usize,
    stats: FeedStats,
}

/// Counters of the feed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// Messages taken in (written to the log, or kept in memory).
    pub pushed: u64,
    pub acked: u64,
    pub requeued: u64,
    /// Messages that went before the broker acknowledged them: removed by the log's
    /// `max_bytes` / `max_age`, or pushed out of memory while the log was failing.
    pub lost: u64,
    /// Records read back from disk.
    pub read_back: u64,
    /// Records of the log that could not be decoded (never published).
    pub undecodable: u64,
}

/// The event log as the forwarder's [`Feed`].
#[derive(Debug)]
pub struct LogFeed {
    dir: FsDir,
    state: Mutex<State>,
    notify: Notify,
}

impl LogFeed {
    /// A feed whose log holds records up to `written`, of which every one below `acked`
    /// was acknowledged (the cursor); the rest go out first.
    pub fn new(dir: FsDir, acked: u64, written: u64, memory_cap: usize) -> Self {
        Self {
            dir,
            state: Mutex::new(State {
                tail: VecDeque::new(),
                tail_first: written,
                tail_bytes: 0,
                written,
                next: acked,
                acked,
                acked_ahead: BTreeSet::new(),
                handed: BTreeSet::new(),
                reader: None,
                memory_cap,
                stats: FeedStats::default(),
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Messages just written to the log at indices `first..`.
    pub fn push_written(&self, first: u64, msgs: Vec<Prepared>) {
        {
            let mut st = self.lock();
            debug_assert_eq!(first, st.written);
            for m in msgs {
                st.push(Arc::new(m));
            }
            while st.tail_bytes > TAIL_BYTES && st.tail.len() > 1 {
                // Still on disk: read back from there if it is needed again.
                st.pop_tail_front();
            }
        }
        self.notify.notify_one();
    }

    /// Messages the log could not take: kept in memory (the oldest unacknowledged ones
    /// go, counted, beyond the cap).
    pub fn push_memory(&self, msgs: Vec<Prepared>) {
        {
            let mut st = self.lock();
            for m in msgs {
                st.push(Arc::new(m));
            }
            while st.tail.len() > st.memory_cap {
                let index = st.tail_first;
                st.pop_tail_front();
                if index >= st.acked && !st.acked_ahead.contains(&index) {
                    st.stats.lost += 1;
                }
                st.forget_below(index + 1);
            }
        }
        self.notify.notify_one();
    }

    /// The log removed every record below `first` (`max_bytes`, `max_age`): those not yet
    /// acknowledged are lost, counted.
    pub fn removed_below(&self, first: u64) {
        let mut st = self.lock();
        if first <= st.acked {
            return;
        }
        let unacked = (st.acked..first)
            .filter(|i| !st.acked_ahead.contains(i))
            .count() as u64;
        if unacked > 0 {
            warn!(
                lost = unacked,
                "the event log's max_bytes / max_age removed events the broker never acknowledged"
            );
        }
        st.stats.lost += unacked;
        st.forget_below(first);
    }

    /// The log's directory.
    pub fn dir(&self) -> &FsDir {
        &self.dir
    }

    /// The index after the last message in the log (or in memory).
    pub fn written(&self) -> u64 {
        self.lock().written
    }

    /// Every index below this one was acknowledged (or is gone).
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    pub fn stats(&self) -> FeedStats {
        self.lock().stats
    }
}

impl State {
    fn push(&mut self, m: Arc<Prepared>) {
        self.tail_bytes += m.payload.len() + m.topic.len();
        self.tail.push_back(m);
        self.written += 1;
        self.stats.pushed += 1;
    }

    fn pop_tail_front(&mut self) {
        if let Some(m) = self.tail.pop_front() {
            self.tail_bytes -= m.payload.len() + m.topic.len();
            self.tail_first += 1;
        }
    }

    /// Indices below `first` are done with (acknowledged or lost).
    fn forget_below(&mut self, first: u64) {
        self.acked = self.acked.max(first);
        self.next = self.next.max(self.acked);
        self.acked_ahead = self.acked_ahead.split_off(&self.acked);
        self.handed = self.handed.split_off(&self.acked);
        while self.acked_ahead.remove(&self.acked) {
            self.acked += 1;
        }
    }

    /// The message at `index`, from memory or from disk. `Err(to)`: `index..to` is not
    /// in the log any more.
    ///
    /// One reader serves a backlog from start to end: it skips forward by reading, goes
    /// on past the end it was made with as the writer writes more, and is made again
    /// only to go back (a lost connection) or after an error.
    fn fetch(&mut self, dir: &FsDir, index: u64) -> Result<Option<Arc<Prepared>>, u64> {
        if index >= self.tail_first {
            return Ok(self.tail.get((index - self.tail_first) as usize).cloned());
        }
        let end = self.tail_first;
        if self.reader.as_ref().is_some_and(|r| r.position() > index) {
            self.reader = None;
        }
        if self.reader.is_none() {
            match Reader::live(dir.clone(), index, end) {
                Ok(r) => self.reader = Some(r),
                Err(e) => {
                    error!(error = %e, "cannot read the event log back");
                    return Ok(None);
                }
            }
        }
        let reader = self.reader.as_mut().expect("set above");
        if let Err(e) = reader.extend_live(end) {
            error!(error = %e, "cannot read the event log back");
            self.reader = None;
            return Ok(None);
        }
        loop {
            match reader.next() {
                Some(Ok(Entry::Record(r))) => {
                    if r.index < index {
                        continue; // acknowledged already: skipped by reading
                    }
                    self.stats.read_back += 1;
                    return match record::decode(&r.body) {
                        Some(p) => Ok(Some(Arc::new(p))),
                        None => {
                            self.stats.undecodable += 1;
                            Err(r.index + 1)
                        }
                    };
                }
                Some(Ok(Entry::Gap { to, .. })) => {
                    if to <= index {
                        continue;
                    }
                    return Err(to);
                }
                Some(Err(e)) => {
                    error!(error = %e, "cannot read the event log back");
                    self.reader = None;
                    return Ok(None);
                }
                None => {
                    self.reader = None;
                    return Ok(None);
                }
            }
        }
    }
}

impl Feed for LogFeed {
    fn take_next(&self, _prefix: &str) -> Option<(u64, Prepared)> {
        let mut st = self.lock();
        loop {
            let i = st.next;
            if i >= st.written {
                return None;
            }
            if st.acked_ahead.contains(&i) || st.handed.contains(&i) {
                st.next += 1;
                continue;
            }
            match st.fetch(&self.dir, i) {
                Ok(Some(m)) => {
                    st.next = i + 1;
                    st.handed.insert(i);
                    return Some((i, (*m).clone()));
                }
                // Nothing to give now (a read error was logged): try again later.
                Ok(None) => return None,
                Err(to) => {
                    // Gone from the log (retention) or unreadable: lost, counted.
                    let lost = (i..to).filter(|k| !st.acked_ahead.contains(k)).count() as u64;
                    st.stats.lost += lost;
                    for k in i..to {
                        st.acked_ahead.insert(k);
                    }
                    let acked = st.acked;
                    st.forget_below(acked);
                    st.next = st.next.max(to);
                }
            }
        }
    }

    fn ack(&self, id: u64) {
        let mut st = self.lock();
        if !st.handed.remove(&id) {
            return;
        }
        st.stats.acked += 1;
        if id >= st.acked {
            st.acked_ahead.insert(id);
            let acked = st.acked;
            st.forget_below(acked);
        }
        // The tail below the acknowledged index is not needed any more.
        while st.tail_first < st.acked && !st.tail.is_empty() {
            st.pop_tail_front();
        }
    }

    fn requeue(&self, id: u64) {
        let mut st = self.lock();
        if st.handed.remove(&id) {
            st.stats.requeued += 1;
            st.next = st.next.min(id);
        }
    }

    fn requeue_all(&self) -> usize {
        let mut st = self.lock();
        let n = st.handed.len();
        st.handed.clear();
        st.stats.requeued += n as u64;
        st.next = st.acked;
        n
    }

    fn unacked(&self) -> usize {
        let st = self.lock();
        (st.written - st.acked) as usize - st.acked_ahead.len()
    }

    fn notify(&self) -> &Notify {
        &self.notify
    }

    fn stats(&self) -> RingStats {
        let st = self.lock();
        let unacked = (st.written - st.acked) as usize - st.acked_ahead.len();
        RingStats {
            pushed: st.stats.pushed,
            dropped: st.stats.lost,
            acked: st.stats.acked,
            requeued: st.stats.requeued,
            len: unacked,
            unacked,
        }
    }
}
