//! The log against the model file system (crashes that tear and forget what was not
//! synced) and against a real directory.

use std::time::Duration;

use proptest::prelude::*;

use crate::record::MAGIC;
use crate::sim::SimDir;
use crate::*;

fn opts(segment_bytes: u64) -> Options {
    Options {
        segment_bytes,
        ..Options::default()
    }
}

fn body(index: u64, len: usize) -> Vec<u8> {
    let seed = index.to_le_bytes();
    (0..len).map(|i| seed[i % 8] ^ (i as u8)).collect()
}

/// Every entry from `from`, records and gaps.
fn read<D: Dir>(log: &Log<D>, from: u64) -> Vec<Entry> {
    log.reader(from).map(|e| e.unwrap()).collect()
}

fn records<D: Dir>(log: &Log<D>) -> Vec<(u64, Vec<u8>)> {
    read(log, 0)
        .into_iter()
        .map(|e| match e {
            Entry::Record(r) => (r.index, r.body),
            Entry::Gap { from, to } => panic!("a gap {from}..{to}"),
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Commit,
    /// A power cut: each file keeps a fraction (per mille) of its unsynced bytes.
    Crash(u16, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(1usize..120, 1..6).prop_map(Op::Append),
        2 => Just(Op::Commit),
        1 => (0u16..=1000, any::<bool>()).prop_map(|(t, all)| Op::Crash(t, all)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever the crashes, what comes back is a prefix of what was appended, holds
    /// every record committed before the crash, and no record that was not written.
    #[test]
    fn after_any_crash_the_log_is_a_prefix_holding_every_committed_record(
        ops in prop::collection::vec(op(), 1..60),
        segment_bytes in 40u64..600,
    ) {
        let dir = SimDir::default();
        let (mut log, _) = Log::open(dir.clone(), opts(segment_bytes)).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut durable = 0usize;
        for op in ops {
            match op {
                Op::Append(lens) => {
                    let first = model.len() as u64;
                    let bodies: Vec<Vec<u8>> = lens
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| body(first + i as u64, l))
                        .collect();
                    let at = log
                        .append_batch(bodies.iter().map(|b| (7, b.as_slice())))
                        .unwrap();
                    prop_assert_eq!(at, first);
                    model.extend(bodies);
                }
                Op::Commit => {
                    log.commit().unwrap();
                    durable = model.len();
                }
                Op::Crash(per_mille, all_or_torn) => {
                    drop(log);
                    dir.crash(|_, unsynced| {
                        if all_or_torn { unsynced } else { unsynced * per_mille as usize / 1000 }
                    });
                    let (reopened, rec) = Log::open(dir.clone(), opts(segment_bytes)).unwrap();
                    log = reopened;
                    let got = records(&log);
                    prop_assert!(got.len() >= durable, "lost committed records: {} < {durable}", got.len());
                    prop_assert!(got.len() <= model.len());
                    for (i, (index, b)) in got.iter().enumerate() {
                        prop_assert_eq!(*index, i as u64);
                        prop_assert_eq!(b, &model[i]);
                    }
                    prop_assert_eq!(rec.missing, 0);
                    prop_assert_eq!(rec.records, got.len() as u64);
                    model.truncate(got.len());
                    durable = model.len();
                    prop_assert_eq!(log.next_index(), model.len() as u64);
                }
            }
        }
    }
}

#[test]
fn records_come_back_in_order_after_a_reopen_on_a_real_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = FsDir::open(tmp.path()).unwrap();
    let (mut log, rec) = Log::open(dir.clone(), opts(300)).unwrap();
    assert_eq!(
        rec,
        Recovery {
            segments: 1,
            ..Recovery::default()
        }
    );
    for i in 0..50u64 {
        assert_eq!(log.append(1_000 + i, &body(i, 20)).unwrap(), i);
    }
    log.commit().unwrap();
    assert!(log.stats().segments > 1, "{:?}", log.stats());
    drop(log);
    let (log, rec) = Log::open(dir, opts(300)).unwrap();
    assert_eq!((rec.records, rec.cut_bytes, rec.torn), (50, 0, 0));
    let got = records(&log);
    assert_eq!(got.len(), 50);
    assert!(got.iter().all(|(i, b)| *b == body(*i, 20)));
    let Some(Ok(Entry::Record(r))) = log.reader(10).next() else {
        panic!()
    };
    assert_eq!((r.index, r.time_us), (10, 1_010));
}

#[test]
fn a_torn_tail_is_cut_counted_and_the_next_append_follows_the_last_whole_record() {
    let dir = SimDir::default();
    let (mut log, _) = Log::open(dir.clone(), opts(1 << 20)).unwrap();
    log.append(1, &body(0, 50)).unwrap();
    log.commit().unwrap();
    log.append(2, &body(1, 50)).unwrap();
    drop(log);
    // Half of the second record reached the disk.
    dir.crash(|_, unsynced| unsynced / 2);
    let (mut log, rec) = Log::open(dir.clone(), opts(1 << 20)).unwrap();
    assert_eq!((rec.records, rec.torn, rec.cut_bytes), (1, 1, 33));
    assert_eq!(rec.notes.len(), 1, "{:?}", rec.notes);
    assert_eq!(log.append(3, &body(1, 10)).unwrap(), 1);
    log.commit().unwrap();
    assert_eq!(records(&log), [(0, body(0, 50)), (1, body(1, 10))]);
}

#[test]
fn a_corrupt_record_in_an_older_segment_is_cut_and_the_records_lost_are_counted() {
    let dir = SimDir::default();
    let (mut log, _) = Log::open(dir.clone(), opts(200)).unwrap();
    for i in 0..20 {
        log.append(i, &body(i, 30)).unwrap();
    }
    log.commit().unwrap();
    drop(log);
    // A flipped bit in the second record of the first segment (4 records of 46 bytes).
    let name = "00000000000000000000.log";
    dir.edit(name, |d| d[MAGIC.len() + 46 + 20] ^= 0x10);
    let (log, rec) = Log::open(dir.clone(), opts(200)).unwrap();
    assert_eq!((rec.corrupt, rec.missing), (1, 3));
    let entries = read(&log, 0);
    assert!(matches!(&entries[0], Entry::Record(r) if r.index == 0));
    assert_eq!(entries[1], Entry::Gap { from: 1, to: 4 });
    assert!(matches!(&entries[2], Entry::Record(r) if r.index == 4));
    assert_eq!(entries.len(), 2 + 16);
}

#[test]
fn retention_removes_the_oldest_segments_by_size_and_by_age_and_a_reader_sees_the_gap() {
    let dir = SimDir::default();
    let o = Options {
        segment_bytes: 200,
        max_bytes: Some(500),
        max_age: Some(Duration::from_secs(10)),
        ..Options::default()
    };
    let (mut log, _) = Log::open(dir.clone(), o).unwrap();
    // 46-byte records, 4 to a segment: 20 records are 5 segments, 948 bytes.
    for i in 0..20u64 {
        log.append(i * 1_000_000, &body(i, 30)).unwrap();
    }
    let removed = log.retain(20_000_000).unwrap();
    assert_eq!((removed.segments, removed.records), (3, 12));
    assert_eq!(log.first_index(), 12);
    assert!(log.stats().bytes <= 500);
    assert_eq!(read(&log, 0)[0], Entry::Gap { from: 0, to: 12 });
    // Time passes: the segment whose newest record is over 10 s old goes, never the active.
    let removed = log.retain(26_000_000).unwrap();
    assert_eq!(removed.records, 4);
    let removed = log.retain(1_000_000_000).unwrap();
    assert_eq!(removed.records, 0, "the active segment stays");
    assert_eq!(log.stats().removed_records, 16);
}

#[test]
fn a_failed_write_leaves_no_partial_record_and_the_log_goes_on_when_there_is_room() {
    let dir = SimDir::default();
    let (mut log, _) = Log::open(dir.clone(), opts(1 << 20)).unwrap();
    log.append(1, &body(0, 40)).unwrap();
    dir.set_fail_writes(true);
    let e = log.append(2, &body(1, 40)).unwrap_err();
    assert!(e.to_string().contains("no space left"), "{e}");
    dir.set_fail_writes(false);
    assert_eq!(log.append(3, &body(1, 8)).unwrap(), 1);
    log.commit().unwrap();
    drop(log);
    let (log, rec) = Log::open(dir, opts(1 << 20)).unwrap();
    assert_eq!(rec.cut_bytes, 0);
    assert_eq!(records(&log), [(0, body(0, 40)), (1, body(1, 8))]);
}

#[test]
fn a_failed_fsync_makes_the_log_refuse_everything_after_it() {
    let dir = SimDir::default();
    let (mut log, _) = Log::open(dir.clone(), opts(1 << 20)).unwrap();
    log.append(1, b"x").unwrap();
    dir.set_fail_syncs(true);
    assert!(matches!(log.commit(), Err(LogError::Poisoned(_))));
    dir.set_fail_syncs(false);
    assert!(matches!(log.append(2, b"y"), Err(LogError::Poisoned(_))));
    assert!(matches!(log.commit(), Err(LogError::Poisoned(_))));
}

#[test]
fn an_empty_or_oversized_record_is_refused() {
    let (mut log, _) = Log::open(SimDir::default(), opts(1 << 20)).unwrap();
    assert!(matches!(log.append(1, b""), Err(LogError::TooLarge(0))));
    let big = vec![0u8; crate::record::MAX_BODY + 1];
    assert!(matches!(log.append(1, &big), Err(LogError::TooLarge(_))));
    assert_eq!(log.next_index(), 0);
}

#[test]
fn the_offline_reader_reads_what_is_whole_and_changes_nothing() {
    let dir = SimDir::default();
    let (mut log, _) = Log::open(dir.clone(), opts(1 << 20)).unwrap();
    for i in 0..3 {
        log.append(i, &body(i, 10)).unwrap();
    }
    drop(log);
    let name = "00000000000000000000.log";
    dir.edit(name, |d| d.truncate(d.len() - 3));
    let before = dir.len(name).unwrap();
    let got: Vec<Entry> = Reader::offline(dir.clone(), 0)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(got.len(), 2);
    assert_eq!(
        dir.len(name).unwrap(),
        before,
        "the torn tail is still there"
    );
}

#[test]
fn the_cursor_keeps_the_last_whole_slot_when_a_write_of_the_other_is_torn() {
    let dir = SimDir::default();
    let mut c = Cursor::load(dir.clone()).unwrap();
    assert_eq!(c.index(), 0);
    c.store(10, true).unwrap();
    c.store(20, true).unwrap();
    assert_eq!(Cursor::load(dir.clone()).unwrap().index(), 20);
    // Slot 1 (generation 3) torn: the byte after its index flipped.
    c.store(30, true).unwrap();
    dir.edit(crate::cursor::CURSOR_FILE, |d| d[24 + 10] ^= 1);
    assert_eq!(Cursor::load(dir).unwrap().index(), 20);
}

#[test]
fn a_live_reader_reads_up_to_the_end_it_was_given_across_segments() {
    let dir = SimDir::default();
    let (mut log, _) = Log::open(dir.clone(), opts(200)).unwrap();
    for i in 0..10 {
        log.append(i, &body(i, 30)).unwrap();
    }
    let got: Vec<u64> = Reader::live(dir.clone(), 3, 8)
        .unwrap()
        .map(|e| match e.unwrap() {
            Entry::Record(r) => r.index,
            Entry::Gap { from, to } => panic!("gap {from}..{to}"),
        })
        .collect();
    assert_eq!(got, [3, 4, 5, 6, 7]);
    log.retain(0).unwrap();
    let mut o = opts(200);
    o.max_bytes = Some(300);
    drop(log);
    let (mut log, _) = Log::open(dir.clone(), o).unwrap();
    log.retain(0).unwrap();
    let first = Reader::live(dir, 0, 10).unwrap().next().unwrap().unwrap();
    assert_eq!(
        first,
        Entry::Gap {
            from: 0,
            to: log.first_index()
        }
    );
}

#[test]
fn the_segment_to_start_a_time_search_from_is_the_last_that_began_before_it() {
    let dir = SimDir::default();
    let (mut log, _) = Log::open(dir.clone(), opts(200)).unwrap();
    // 4 records a segment: segments begin at 0 (t=0), 4 (t=400), 8 (t=800).
    for i in 0..10u64 {
        log.append(i * 100, &body(i, 30)).unwrap();
    }
    assert_eq!(Reader::index_before_time(&dir, 0).unwrap(), 0);
    assert_eq!(Reader::index_before_time(&dir, 450).unwrap(), 4);
    assert_eq!(Reader::index_before_time(&dir, 799).unwrap(), 4);
    assert_eq!(Reader::index_before_time(&dir, 5_000).unwrap(), 8);
}
