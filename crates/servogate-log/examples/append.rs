//! The event log's append rate on this machine (BENCHMARKS.md, "Event log"): telemetry-
//! sized records (200 bytes) appended in batches, one commit (fdatasync) per batch, in
//! a fresh directory; and the same with one commit per record, to show why group commit.
//!
//!     cargo run --release -p servogate-log --example append -- [DIR]
//!
//! DIR defaults to a new directory under the system's temp dir (it is removed after).

use std::time::Instant;

use servogate_log::{FsDir, Log, Options};

fn run(dir: &std::path::Path, records: u64, batch: u64) -> (f64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    let (mut log, _) = Log::open(FsDir::open(dir).unwrap(), Options::default()).unwrap();
    let body: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    let t = Instant::now();
    let mut done = 0;
    while done < records {
        let n = batch.min(records - done);
        log.append_batch((0..n).map(|_| (0, body.as_slice())))
            .unwrap();
        log.commit().unwrap();
        done += n;
    }
    let secs = t.elapsed().as_secs_f64();
    let bytes = log.stats().bytes as f64;
    (records as f64 / secs, bytes / records as f64)
}

fn main() {
    let base = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("servogate-append-{}", std::process::id()))
        });
    for (records, batch) in [(1_000_000, 1_000), (200_000, 100), (2_000, 1)] {
        let (rate, per) = run(&base, records, batch);
        println!(
            "{records} records of 200 bytes, {batch} per fsync: {rate:.0} records/s ({:.3} ms per fsync), {per:.0} bytes on disk per record",
            1e3 * batch as f64 / rate
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}
