//! The log: segments of records, appended in order, made durable by [`Log::commit`],
//! recovered at [`Log::open`], bounded by [`Log::retain`].
//!
//! Ordering rule that makes a crash leave a prefix: a segment's records and its directory
//! entry are durable before the next segment is created (rotation syncs both), so at any
//! moment only the active segment holds bytes that are not yet durable, and a crash can
//! only shorten it.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use crate::dir::{Dir, LogFile};
use crate::reader::Reader;
use crate::record::{self, Bad, RecordReader, MAGIC, MAX_BODY};

/// When appended records are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// By [`Log::commit`], which the owner calls at most `sync_interval` after an append
    /// (group commit: many records per fsync).
    #[default]
    Batch,
    /// After every append.
    Always,
    /// Never (the kernel writes back when it likes; a crash of the process loses nothing,
    /// a power cut may lose anything not yet written back).
    Never,
}

/// How the log is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// A segment is closed once it would grow past this many bytes.
    pub segment_bytes: u64,
    /// The oldest segments go once the log holds more (the active one never goes).
    pub max_bytes: Option<u64>,
    /// Segments whose newest record is older than this go.
    pub max_age: Option<Duration>,
    pub sync: SyncMode,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_bytes: 8 << 20,
            max_bytes: None,
            max_age: None,
            sync: SyncMode::Batch,
        }
    }
}

/// What [`Log::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments and records kept.
    pub segments: usize,
    pub records: u64,
    /// Bytes cut from torn or corrupt ends of segments (and unreadable segment files).
    pub cut_bytes: u64,
    /// Segments that ended inside a record (a write that did not complete).
    pub torn: u64,
    /// Segments with a corrupt record (a bad length or checksum), cut there.
    pub corrupt: u64,
    /// Record positions the log should hold and does not (between segments).
    pub missing: u64,
    /// One line per repair, for the daemon's log.
    pub notes: Vec<String>,
}

/// Figures of the log (levels and counters since it was opened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Bytes and segments on disk, records held.
    pub bytes: u64,
    pub segments: u64,
    pub records: u64,
    /// Records appended since open.
    pub appended: u64,
    /// fsyncs of segment data and of the directory.
    pub fsyncs: u64,
    /// Records and segments removed by `max_bytes` / `max_age`.
    pub removed_records: u64,
    pub removed_segments: u64,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("a record of {0} bytes is larger than a record may be ({MAX_BODY})")]
    TooLarge(usize),
    #[error("segment {0} overlaps the one before it: the log directory was edited by hand")]
    Overlap(String),
    /// After a failed fsync nothing written since the last good one is known to be on
    /// disk (and a retry would not tell): the log refuses everything from then on.
    #[error("the log is unusable after an earlier failure ({0}); restart to recover it")]
    Poisoned(String),
}

impl LogError {
    fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// One segment file, as the log knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) first: u64,
    pub(crate) count: u64,
    pub(crate) bytes: u64,
    /// Append time of its newest record (0 while empty).
    pub(crate) last_time_us: u64,
}

impl Segment {
    pub(crate) fn name(&self) -> String {
        segment_name(self.first)
    }

    pub(crate) fn end(&self) -> u64 {
        self.first + self.count
    }
}

pub(crate) fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

/// The first index of a segment file name, `None` for any other file.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What [`Log::retain`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
}

/// The event log on one directory.
pub struct Log<D: Dir> {
    dir: D,
    opts: Options,
    /// Oldest first; the last is the active one, open in `active`.
    segments: VecDeque<Segment>,
    active: D::File,
    /// Appended since the last sync of the active segment.
    dirty: bool,
    /// A segment was created or removed since the last directory sync.
    dir_dirty: bool,
    poisoned: Option<String>,
    stats: LogStats,
    buf: Vec<u8>,
}

impl<D: Dir> Log<D> {
    /// Opens the log in `dir` (an empty directory starts an empty log), cutting torn and
    /// corrupt ends so that only whole, checked records remain.
    pub fn open(dir: D, opts: Options) -> Result<(Self, Recovery), LogError> {
        let mut rec = Recovery::default();
        let mut firsts: Vec<u64> = dir
            .list()
            .map_err(|e| LogError::io("listing the log directory", e))?
            .iter()
            .filter_map(|n| parse_segment_name(n))
            .collect();
        firsts.sort_unstable();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut changed_dir = false;
        for &first in &firsts {
            let name = segment_name(first);
            let len = dir
                .len(&name)
                .map_err(|e| LogError::io(format!("reading {name}"), e))?;
            let scan = scan_segment(&dir, &name, first)?;
            let Some(mut seg) = scan.segment else {
                // Not even a whole magic: created just before a crash, or not ours.
                rec.cut_bytes += len;
                rec.notes.push(format!(
                    "{name}: {} ({len} bytes): removed",
                    scan.bad.map_or("empty".into(), describe)
                ));
                dir.remove(&name)
                    .map_err(|e| LogError::io(format!("removing {name}"), e))?;
                changed_dir = true;
                continue;
            };
            if let Some(bad) = scan.bad {
                match bad {
                    Bad::Torn => rec.torn += 1,
                    Bad::Corrupt(_) => rec.corrupt += 1,
                }
                rec.cut_bytes += len - seg.bytes;
                rec.notes.push(format!(
                    "{name}: {} after record {}: {} bytes cut",
                    describe(bad),
                    seg.end(),
                    len - seg.bytes
                ));
                dir.open_append(&name)
                    .and_then(|mut f| f.truncate(seg.bytes))
                    .map_err(|e| LogError::io(format!("cutting {name}"), e))?;
            } else if len > seg.bytes {
                rec.cut_bytes += len - seg.bytes;
            }
            if let Some(prev) = segments.back() {
                if first < prev.end() {
                    return Err(LogError::Overlap(name));
                }
                if first > prev.end() {
                    rec.missing += first - prev.end();
                    rec.notes.push(format!(
                        "records {}..{} are missing (before {name})",
                        prev.end(),
                        first
                    ));
                }
            }
            seg.first = first;
            segments.push_back(seg);
        }
        if changed_dir {
            dir.sync_dir()
                .map_err(|e| LogError::io("syncing the log directory", e))?;
        }
        let mut stats = LogStats::default();
        let active = match segments.back() {
            Some(last) => dir
                .open_append(&last.name())
                .map_err(|e| LogError::io(format!("opening {}", last.name()), e))?,
            None => {
                let first = 0;
                let mut f = new_segment(&dir, first)?;
                f.sync()
                    .map_err(|e| LogError::io("syncing the first segment", e))?;
                dir.sync_dir()
                    .map_err(|e| LogError::io("syncing the log directory", e))?;
                stats.fsyncs += 2;
                segments.push_back(Segment {
                    first,
                    count: 0,
                    bytes: MAGIC.len() as u64,
                    last_time_us: 0,
                });
                f
            }
        };
        rec.segments = segments.len();
        rec.records = segments.iter().map(|s| s.count).sum();
        let mut log = Self {
            dir,
            opts,
            segments,
            active,
            dirty: false,
            dir_dirty: false,
            poisoned: None,
            stats,
            buf: Vec::new(),
        };
        log.refresh_levels();
        Ok((log, rec))
    }

    /// Appends one record; its index.
    pub fn append(&mut self, time_us: u64, body: &[u8]) -> Result<u64, LogError> {
        let index = self.next_index();
        self.append_batch(std::iter::once((time_us, body)))?;
        Ok(index)
    }

    /// Appends records in order with as few writes as segments allow (one, mostly); the
    /// index of the first. On a write error (a full disk) nothing of the batch stays:
    /// the segment is cut back to its last whole record and the error returned.
    pub fn append_batch<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<u64, LogError> {
        self.check()?;
        let first_index = self.next_index();
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut pending = 0u64;
        let mut last_time = 0;
        let mut result = Ok(());
        for (time_us, body) in records {
            if body.is_empty() || body.len() > MAX_BODY {
                result = Err(LogError::TooLarge(body.len()));
                break;
            }
            let need = record::encoded_len(body.len());
            let active = self.segments.back().expect("an active segment");
            if active.count + pending > 0
                && active.bytes + buf.len() as u64 + need > self.opts.segment_bytes
            {
                if let Err(e) = self.write_out(&buf, pending, last_time) {
                    result = Err(e);
                    break;
                }
                buf.clear();
                pending = 0;
                if let Err(e) = self.rotate() {
                    result = Err(e);
                    break;
                }
            }
            record::encode(time_us, body, &mut buf);
            pending += 1;
            last_time = time_us;
        }
        if result.is_ok() && pending > 0 {
            result = self.write_out(&buf, pending, last_time);
        }
        self.buf = buf;
        result?;
        if self.opts.sync == SyncMode::Always {
            self.commit()?;
        }
        Ok(first_index)
    }

    fn write_out(&mut self, bytes: &[u8], count: u64, last_time_us: u64) -> Result<(), LogError> {
        if count == 0 {
            return Ok(());
        }
        let seg = self.segments.back_mut().expect("an active segment");
        if let Err(e) = self.active.append(bytes) {
            // Part of it may be in the file: cut back to the last whole record, so the
            // next append does not follow garbage. If even that fails, stop.
            let name = seg.name();
            if let Err(cut) = self.active.truncate(seg.bytes) {
                let why = format!("cutting {name} after a failed write: {cut}");
                self.poisoned = Some(why.clone());
                return Err(LogError::Poisoned(why));
            }
            return Err(LogError::io(format!("writing {name}"), e));
        }
        seg.count += count;
        seg.bytes += bytes.len() as u64;
        seg.last_time_us = seg.last_time_us.max(last_time_us);
        self.dirty = true;
        self.stats.appended += count;
        self.stats.records += count;
        self.stats.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Closes the active segment (its data and its directory entry made durable first)
    /// and starts the next.
    fn rotate(&mut self) -> Result<(), LogError> {
        self.sync_active()?;
        if self.dir_dirty {
            self.sync_directory()?;
        }
        let first = self.next_index();
        let f = new_segment(&self.dir, first)?;
        self.active = f;
        self.segments.push_back(Segment {
            first,
            count: 0,
            bytes: MAGIC.len() as u64,
            last_time_us: 0,
        });
        self.dirty = true;
        self.dir_dirty = true;
        self.refresh_levels();
        Ok(())
    }

    /// Makes every record appended so far durable: one fsync of the active segment (and
    /// one of the directory after a segment came or went). How long it took, when it did
    /// anything. A failure poisons the log.
    pub fn commit(&mut self) -> Result<Option<Duration>, LogError> {
        self.check()?;
        if !self.dirty && !self.dir_dirty {
            return Ok(None);
        }
        let t = Instant::now();
        if self.opts.sync != SyncMode::Never {
            self.sync_active()?;
            if self.dir_dirty {
                self.sync_directory()?;
            }
        } else {
            self.dirty = false;
            self.dir_dirty = false;
        }
        Ok(Some(t.elapsed()))
    }

    fn sync_active(&mut self) -> Result<(), LogError> {
        if !self.dirty {
            return Ok(());
        }
        if let Err(e) = self.active.sync() {
            let why = format!(
                "fsync of {}: {e}",
                self.segments.back().map_or(String::new(), Segment::name)
            );
            self.poisoned = Some(why.clone());
            return Err(LogError::Poisoned(why));
        }
        self.stats.fsyncs += 1;
        self.dirty = false;
        Ok(())
    }

    fn sync_directory(&mut self) -> Result<(), LogError> {
        if let Err(e) = self.dir.sync_dir() {
            let why = format!("fsync of the log directory: {e}");
            self.poisoned = Some(why.clone());
            return Err(LogError::Poisoned(why));
        }
        self.stats.fsyncs += 1;
        self.dir_dirty = false;
        Ok(())
    }

    /// True when records were appended since the last commit.
    pub fn is_dirty(&self) -> bool {
        self.dirty || self.dir_dirty
    }

    /// Removes the oldest closed segments beyond `max_bytes`, and those whose newest
    /// record is older than `max_age` at `now_us`. The active segment always stays.
    pub fn retain(&mut self, now_us: u64) -> Result<Removed, LogError> {
        self.check()?;
        let mut removed = Removed::default();
        let max_age_us = self.opts.max_age.map(|a| a.as_micros() as u64);
        while self.segments.len() > 1 {
            let total: u64 = self.segments.iter().map(|s| s.bytes).sum();
            let oldest = &self.segments[0];
            let too_big = self.opts.max_bytes.is_some_and(|m| total > m);
            let too_old =
                max_age_us.is_some_and(|a| oldest.last_time_us.saturating_add(a) < now_us);
            if !too_big && !too_old {
                break;
            }
            let name = oldest.name();
            self.dir
                .remove(&name)
                .map_err(|e| LogError::io(format!("removing {name}"), e))?;
            let gone = self.segments.pop_front().expect("checked above");
            removed.segments += 1;
            removed.records += gone.count;
            removed.bytes += gone.bytes;
            self.dir_dirty = true;
        }
        self.stats.removed_records += removed.records;
        self.stats.removed_segments += removed.segments;
        self.refresh_levels();
        Ok(removed)
    }

    /// The index the next record gets.
    pub fn next_index(&self) -> u64 {
        self.segments.back().map_or(0, Segment::end)
    }

    /// The index of the oldest record held.
    pub fn first_index(&self) -> u64 {
        self.segments.front().map_or(0, |s| s.first)
    }

    pub fn stats(&self) -> LogStats {
        self.stats
    }

    /// A reader of the records from `from` up to those appended so far (it does not see
    /// later ones). Records already gone come out as a gap first.
    pub fn reader(&self, from: u64) -> Reader<D> {
        Reader::new(
            self.dir.clone(),
            self.segments.iter().cloned().collect(),
            from,
        )
    }

    fn check(&self) -> Result<(), LogError> {
        match &self.poisoned {
            Some(why) => Err(LogError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    fn refresh_levels(&mut self) {
        self.stats.segments = self.segments.len() as u64;
        self.stats.bytes = self.segments.iter().map(|s| s.bytes).sum();
        self.stats.records = self.segments.iter().map(|s| s.count).sum();
    }
}

fn describe(bad: Bad) -> String {
    match bad {
        Bad::Torn => "torn (a write that did not complete)".into(),
        Bad::Corrupt(why) => format!("corrupt ({why})"),
    }
}

/// A new segment file starting at record `first`, its magic written (not yet durable).
fn new_segment<D: Dir>(dir: &D, first: u64) -> Result<D::File, LogError> {
    let name = segment_name(first);
    let mut f = dir
        .create(&name)
        .map_err(|e| LogError::io(format!("creating {name}"), e))?;
    f.append(&MAGIC)
        .map_err(|e| LogError::io(format!("writing {name}"), e))?;
    Ok(f)
}

/// What one segment holds.
pub(crate) struct Scan {
    /// `None` when the file does not even hold a whole magic.
    pub(crate) segment: Option<Segment>,
    pub(crate) bad: Option<Bad>,
}

pub(crate) fn scan_segment<D: Dir>(dir: &D, name: &str, first: u64) -> Result<Scan, LogError> {
    let io_err = |e| LogError::io(format!("reading {name}"), e);
    let f = dir.open_read(name).map_err(io_err)?;
    let mut r = match RecordReader::new(f).map_err(io_err)? {
        Ok(r) => r,
        Err(bad) => {
            return Ok(Scan {
                segment: None,
                bad: Some(bad),
            })
        }
    };
    let mut seg = Segment {
        first,
        count: 0,
        bytes: 0,
        last_time_us: 0,
    };
    let bad = loop {
        match r.next_record().map_err(io_err)? {
            Ok(Some((t, _))) => {
                seg.count += 1;
                seg.last_time_us = seg.last_time_us.max(t);
            }
            Ok(None) => break None,
            Err(bad) => break Some(bad),
        }
    };
    seg.bytes = r.good_len();
    Ok(Scan {
        segment: Some(seg),
        bad,
    })
}
