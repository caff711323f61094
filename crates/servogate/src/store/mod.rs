//! Durable mode (`[buffer] path`, DESIGN.md section 9): every event goes from the ring
//! into the event log on disk before the forwarder publishes it, and the forwarder
//! publishes from the log ([`LogFeed`]), so a backlog waits on disk, not in memory, and a
//! crash or a power cut leaves it there for the next start.
//!
//! ```text
//! bus tasks ──push──> Outbox (ring) ──log thread──> Log (write(2) per batch, fsync per
//!                                       │            sync_interval, retention)
//!                                       └──────> LogFeed (tail in memory) ──> forwarder
//!                                                   acks ──> Cursor (acked-up-to index)
//! ```
//!
//! Why a thread of its own: fsync blocks for milliseconds and must block neither a bus
//! task nor the runtime. A bus never waits for it: the ring between them is bounded and
//! drops (counted) if the disk stalls longer than the ring lasts.
//!
//! Promises: an event is published only after it was written to the log (a SIGKILL after
//! that loses nothing; a power cut loses at most the last `sync_interval`, since it is
//! published before its fsync so that the fsync does not add to the latency). Events of
//! an earlier boot the broker never acknowledged go out first after a start, as they were
//! (their payloads name their boot). The cursor is written at every commit and synced
//! every second: a power cut may make a start publish up to a second of acknowledged
//! events again, never skip one.

mod feed;
pub mod record;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use servogate_core::Event;
use servogate_log::{Cursor, FsDir, Log, LogError, LogStats, Options, Recovery, SyncMode};
use servogate_mqtt::{Outbox, Prepared};
use tracing::{error, info, warn};

pub use feed::{FeedStats, LogFeed};

use crate::config::LogSettings;

/// Events taken from the ring per write.
const BATCH: usize = 1024;
/// How often the cursor is made durable.
const CURSOR_SYNC: Duration = Duration::from_secs(1);
/// How long the thread sleeps when nothing is due (a push wakes it at once).
const IDLE: Duration = Duration::from_millis(100);

/// Figures of the log for the metrics, updated by the log thread.
#[derive(Debug, Default)]
pub struct LogMetrics {
    pub stats: std::sync::Mutex<LogStats>,
    /// fsync durations.
    pub fsync: servogate_core::Histogram,
    pub write_errors: std::sync::atomic::AtomicU64,
    /// False once the log failed and the gateway went on from memory.
    pub healthy: AtomicBool,
    pub recovery: std::sync::Mutex<Recovery>,
    /// Events of earlier boots not acknowledged, published first after this start.
    pub recovered: std::sync::atomic::AtomicU64,
}

/// The running event log: its thread and the forwarder's feed.
pub struct Store {
    pub feed: Arc<LogFeed>,
    pub metrics: Arc<LogMetrics>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Store {
    /// Opens (and recovers) the log at `cfg.path` and starts its thread, which drains
    /// `outbox`. Events get `boot_id` in their payloads and topics under `prefix`.
    pub fn open(
        cfg: &LogSettings,
        outbox: Arc<Outbox>,
        boot_id: &str,
        prefix: &str,
        memory_cap: usize,
    ) -> anyhow::Result<Self> {
        let path = &cfg.path;
        let dir = FsDir::open(path)
            .with_context(|| format!("cannot use {} for the event log", path.display()))?;
        let opts = Options {
            segment_bytes: cfg.segment_bytes,
            max_bytes: Some(cfg.max_bytes),
            max_age: cfg.max_age,
            sync: cfg.sync,
        };
        let started = Instant::now();
        let (log, recovery) = Log::open(dir.clone(), opts)
            .with_context(|| format!("cannot open the event log in {}", path.display()))?;
        for note in &recovery.notes {
            warn!(log = %path.display(), "event log recovery: {note}");
        }
        let cursor = Cursor::load(dir.clone())
            .with_context(|| format!("cannot read the event log's cursor in {}", path.display()))?;
        let first = log.first_index();
        let end = log.next_index();
        let acked = cursor.index().clamp(first, end);
        if cursor.index() < first {
            warn!(
                lost = first - cursor.index(),
                "events the broker never acknowledged were removed by max_bytes / max_age before this start"
            );
        }
        let recovered = end - acked;
        info!(
            log = %path.display(),
            records = recovery.records,
            segments = recovery.segments,
            cut_bytes = recovery.cut_bytes,
            unacknowledged = recovered,
            took_ms = started.elapsed().as_millis() as u64,
            "event log opened"
        );
        let feed = Arc::new(LogFeed::new(dir, acked, end, memory_cap));
        let metrics = Arc::new(LogMetrics::default());
        metrics.healthy.store(true, Relaxed);
        metrics.recovered.store(recovered, Relaxed);
        *metrics.stats.lock().unwrap_or_else(|p| p.into_inner()) = log.stats();
        *metrics.recovery.lock().unwrap_or_else(|p| p.into_inner()) = recovery;
        let stop = Arc::new(AtomicBool::new(false));
        let mut writer = Writer {
            log,
            cursor,
            outbox: outbox.clone(),
            feed: feed.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            boot_id: boot_id.to_owned(),
            prefix: prefix.to_owned(),
            sync: cfg.sync,
            interval: cfg.sync_interval,
            failed: false,
        };
        let thread = std::thread::Builder::new()
            .name("servogate-log".into())
            .spawn(move || writer.run())
            .context("cannot start the event log thread")?;
        outbox.wake_thread_on_push(thread.thread().clone());
        Ok(Self {
            feed,
            metrics,
            stop,
            thread: Some(thread),
        })
    }

    /// Events of earlier boots that go out first.
    pub fn recovered(&self) -> u64 {
        self.metrics.recovered.load(Relaxed)
    }

    /// True while the thread runs (it ends on an fsync failure: the daemon must stop).
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Drains the ring into the log, commits, syncs the cursor and ends the thread.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Relaxed);
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        t.thread().unpark();
        t.join()
            .unwrap_or_else(|_| Err("the event log thread panicked".into()))
    }
}

struct Writer {
    log: Log<FsDir>,
    cursor: Cursor<FsDir>,
    outbox: Arc<Outbox>,
    feed: Arc<LogFeed>,
    metrics: Arc<LogMetrics>,
    stop: Arc<AtomicBool>,
    boot_id: String,
    prefix: String,
    sync: SyncMode,
    interval: Duration,
    /// The log could not be written: events go to the feed's memory only.
    failed: bool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Writer {
    fn run(&mut self) -> Result<(), String> {
        let mut events: Vec<(u64, Event)> = Vec::with_capacity(BATCH);
        let mut bodies: Vec<u8> = Vec::new();
        let mut ends: Vec<usize> = Vec::with_capacity(BATCH);
        let mut first_dirty: Option<Instant> = None;
        let mut cursor_synced = Instant::now();
        loop {
            let stopping = self.stop.load(Relaxed);
            events.clear();
            {
                let mut ring = self.outbox.lock();
                while events.len() < BATCH {
                    match ring.take_next() {
                        Some((id, e)) => events.push((id, e.clone())),
                        None => break,
                    }
                }
            }
            let full = events.len() == BATCH;
            if !events.is_empty() {
                let msgs: Vec<Prepared> = events
                    .iter()
                    .map(|(_, e)| {
                        let mut p = Prepared::of_event(&self.prefix, e);
                        record::add_boot_id(&mut p.payload, &self.boot_id);
                        p
                    })
                    .collect();
                self.write(msgs, &mut bodies, &mut ends)?;
                if !self.failed && self.log.is_dirty() {
                    first_dirty.get_or_insert_with(Instant::now);
                }
                // In the log (or the feed's memory) now: the ring lets them go.
                let mut ring = self.outbox.lock();
                for (id, _) in &events {
                    ring.ack(*id);
                }
            }
            let due = first_dirty.is_some_and(|t| t.elapsed() >= self.interval);
            if !self.failed && (due || (stopping && first_dirty.is_some())) {
                self.commit()?;
                first_dirty = None;
                let sync_cursor = stopping || cursor_synced.elapsed() >= CURSOR_SYNC;
                self.store_cursor(sync_cursor);
                if sync_cursor {
                    cursor_synced = Instant::now();
                }
            } else if !self.failed
                && first_dirty.is_none()
                && cursor_synced.elapsed() >= CURSOR_SYNC
            {
                // Acknowledgements move the cursor while nothing new is written.
                self.store_cursor(true);
                cursor_synced = Instant::now();
            }
            if stopping && events.is_empty() {
                if !self.failed {
                    self.commit()?;
                    self.store_cursor(true);
                }
                return Ok(());
            }
            if full {
                continue;
            }
            let wait = match first_dirty {
                Some(t) => self.interval.saturating_sub(t.elapsed()),
                None => IDLE,
            };
            if !wait.is_zero() && !self.stop.load(Relaxed) {
                std::thread::park_timeout(wait);
            }
        }
    }

    /// Appends `msgs` in one write and hands them to the feed; on a write error the
    /// gateway goes on from memory. `Err` only for what must stop the daemon.
    fn write(
        &mut self,
        msgs: Vec<Prepared>,
        bodies: &mut Vec<u8>,
        ends: &mut Vec<usize>,
    ) -> Result<(), String> {
        if self.failed {
            self.feed.push_memory(msgs);
            return Ok(());
        }
        bodies.clear();
        ends.clear();
        for m in &msgs {
            record::encode(m, bodies);
            ends.push(bodies.len());
        }
        let t = now_us();
        let mut start = 0;
        let records = ends.iter().map(|&end| {
            let r = (t, &bodies[start..end]);
            start = end;
            r
        });
        match self.log.append_batch(records) {
            Ok(first) => {
                self.feed.push_written(first, msgs);
                if self.sync == SyncMode::Always {
                    self.note_stats();
                }
                Ok(())
            }
            Err(e @ LogError::Poisoned(_)) => Err(e.to_string()),
            Err(e) => {
                error!(error = %e, "cannot write the event log: going on from memory (events are \
                       published but not kept on disk) until a restart");
                self.metrics.write_errors.fetch_add(1, Relaxed);
                self.metrics.healthy.store(false, Relaxed);
                self.failed = true;
                self.feed.push_memory(msgs);
                Ok(())
            }
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        match self.log.commit() {
            Ok(Some(took)) => {
                if self.sync != SyncMode::Never {
                    self.metrics.fsync.record(took);
                }
            }
            Ok(None) => {}
            Err(e) => {
                error!(error = %e, "the event log's fsync failed: stopping (systemd restarts the gateway, which recovers the log)");
                return Err(e.to_string());
            }
        }
        match self.log.retain(now_us()) {
            Ok(removed) if removed.segments > 0 => {
                self.feed.removed_below(self.log.first_index());
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot remove old segments of the event log"),
        }
        self.note_stats();
        Ok(())
    }

    fn store_cursor(&mut self, sync: bool) {
        let acked = self.feed.acked();
        if let Err(e) = self.cursor.store(acked, sync) {
            warn!(error = %e, "cannot write the event log's cursor");
        }
    }

    fn note_stats(&self) {
        *self.metrics.stats.lock().unwrap_or_else(|p| p.into_inner()) = self.log.stats();
    }
}
