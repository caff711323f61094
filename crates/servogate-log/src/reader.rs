//! Reading the log in order from any index: what replay and `servogate log` use.

use std::io;

use crate::dir::Dir;
use crate::log::{parse_segment_name, scan_segment, segment_name, Segment};
use crate::record::{Bad, Record, RecordReader};

/// The first indices of the segment files in `dir`, in order.
fn segment_firsts<D: Dir>(dir: &D) -> io::Result<Vec<u64>> {
    let mut firsts: Vec<u64> = dir
        .list()?
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .collect();
    firsts.sort_unstable();
    Ok(firsts)
}

/// What a reader gives, in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Record(Record),
    /// Records `from..to` that the log does not hold (removed by retention, cut after a
    /// crash, or gone while this reader went on).
    Gap {
        from: u64,
        to: u64,
    },
}

/// An iterator over the records from one index up to an end fixed when it was made.
pub struct Reader<D: Dir> {
    dir: D,
    segments: Vec<Segment>,
    /// The next index to give.
    pos: u64,
    /// The segment being read, and the index of its next record.
    current: Option<(usize, RecordReader<D::Reader>, u64)>,
}

impl<D: Dir> Reader<D> {
    pub(crate) fn new(dir: D, segments: Vec<Segment>, from: u64) -> Self {
        Self {
            dir,
            segments,
            pos: from,
            current: None,
        }
    }

    /// Reads a log directory as it is, without repairing anything (the log may be open
    /// for writing by a running gateway): every whole, checked record from `from`.
    pub fn offline(dir: D, from: u64) -> io::Result<Self> {
        let firsts = segment_firsts(&dir)?;
        let mut segments = Vec::new();
        for first in firsts {
            match scan_segment(&dir, &segment_name(first), first) {
                Ok(scan) => segments.extend(scan.segment),
                Err(crate::LogError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
        Ok(Self::new(dir, segments, from))
    }

    /// A reader of a log another thread is appending to, from `from` up to `end` (the
    /// records written so far, as the writer says): segments come from the directory
    /// listing, without a scan, so making one is cheap.
    pub fn live(dir: D, from: u64, end: u64) -> io::Result<Self> {
        let mut firsts = segment_firsts(&dir)?;
        firsts.retain(|&f| f < end);
        let segments = firsts
            .iter()
            .enumerate()
            .map(|(k, &first)| Segment {
                first,
                count: firsts.get(k + 1).copied().unwrap_or(end) - first,
                bytes: 0,
                last_time_us: 0,
            })
            .collect();
        Ok(Self::new(dir, segments, from))
    }

    /// Lets a [`Reader::live`] reader go on to `end` (the writer wrote more): the
    /// segments are listed again; the position and the segment being read stay.
    pub fn extend_live(&mut self, end: u64) -> io::Result<()> {
        if end <= self.end() {
            return Ok(());
        }
        let fresh = Self::live(self.dir.clone(), self.pos, end)?;
        let current_first = self
            .current
            .as_ref()
            .map(|(k, _, _)| self.segments[*k].first);
        self.segments = fresh.segments;
        if let (Some(first), Some((k, _, _))) = (current_first, self.current.as_mut()) {
            match self.segments.iter().position(|s| s.first == first) {
                Some(i) => *k = i,
                None => self.current = None,
            }
        }
        Ok(())
    }

    /// The index the reader gives next.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The first index of the newest segment whose first record was appended at or
    /// before `time_us` (0 when none was): where a reader looking for `time_us` starts.
    /// Reads one record per segment.
    pub fn index_before_time(dir: &D, time_us: u64) -> io::Result<u64> {
        let firsts = segment_firsts(dir)?;
        let mut best = firsts.first().copied().unwrap_or(0);
        for first in firsts {
            let f = match dir.open_read(&segment_name(first)) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let Ok(mut r) = RecordReader::new(f)? else {
                continue;
            };
            match r.next_record()? {
                Ok(Some((t, _))) if t <= time_us => best = first,
                Ok(Some(_)) => break,
                _ => {}
            }
        }
        Ok(best)
    }

    /// The index after the last record this reader can give.
    pub fn end(&self) -> u64 {
        self.segments.last().map_or(self.pos, Segment::end)
    }

    /// Bytes of records from the current position to the end (for a progress bar).
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn open(&mut self, k: usize) -> io::Result<Result<(), u64>> {
        let seg = &self.segments[k];
        let name = seg.name();
        let f = match self.dir.open_read(&name) {
            Ok(f) => f,
            // Removed by retention since the reader was made.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(seg.end())),
            Err(e) => return Err(e),
        };
        match RecordReader::new(f)? {
            Ok(r) => {
                self.current = Some((k, r, seg.first));
                Ok(Ok(()))
            }
            Err(_) => Ok(Err(seg.end())),
        }
    }

    fn step(&mut self) -> io::Result<Option<Entry>> {
        loop {
            if let Some((k, r, next)) = &mut self.current {
                let seg_end = self.segments[*k].end();
                if *next >= seg_end {
                    self.current = None;
                    continue;
                }
                match r.next_record()? {
                    Ok(Some((time_us, body))) => {
                        let index = *next;
                        *next += 1;
                        if index < self.pos {
                            continue;
                        }
                        self.pos = index + 1;
                        return Ok(Some(Entry::Record(Record {
                            index,
                            time_us,
                            body,
                        })));
                    }
                    // Shorter than it was when the reader was made: cut by a recovery,
                    // or unreadable from here.
                    Ok(None) | Err(Bad::Torn) | Err(Bad::Corrupt(_)) => {
                        let from = self.pos.max(*next);
                        self.current = None;
                        if from < seg_end {
                            self.pos = seg_end;
                            return Ok(Some(Entry::Gap { from, to: seg_end }));
                        }
                        continue;
                    }
                }
            }
            // The segment holding `pos`, or the first after it.
            let Some(k) = self.segments.iter().position(|s| s.end() > self.pos) else {
                return Ok(None);
            };
            let first = self.segments[k].first;
            if first > self.pos {
                let gap = Entry::Gap {
                    from: self.pos,
                    to: first,
                };
                self.pos = first;
                return Ok(Some(gap));
            }
            if let Err(end) = self.open(k)? {
                let gap = Entry::Gap {
                    from: self.pos,
                    to: end,
                };
                self.pos = end;
                return Ok(Some(gap));
            }
        }
    }
}

impl<D: Dir> std::fmt::Debug for Reader<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("pos", &self.pos)
            .field("end", &self.end())
            .field("segments", &self.segments.len())
            .finish_non_exhaustive()
    }
}

impl<D: Dir> Iterator for Reader<D> {
    type Item = io::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step().transpose()
    }
}
