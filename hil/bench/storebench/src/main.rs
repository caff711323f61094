//! storebench ENGINE CASE DIR [--crash]
//!
//! ENGINE: sg | redb | redb-small | fjall | fjall-insert | fjall-small | sqlite
//! CASE:   A (1,000,000 records, batches of 1,000) | B (200,000, batches of 100)
//!         C (2,000, one commit each) | D (read back everything in order) | E (reopen)
//! --crash (A/B/C): leave without closing the store (std::process::exit, no destructors),
//!         as a killed process would, so that E measures recovery after a crash.
//! Prints one line of key=value results.

use std::path::Path;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub const BODY: usize = 200;

/// 1,024 different pseudo-random bodies; record i gets body i % 1024 with its first
/// 8 bytes replaced by i (every record differs; the bytes do not compress).
pub struct Bodies(Vec<[u8; BODY]>);

impl Bodies {
    pub fn new() -> Self {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut pool = Vec::with_capacity(1024);
        for _ in 0..1024 {
            let mut b = [0u8; BODY];
            for chunk in b.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            pool.push(b);
        }
        Self(pool)
    }
    pub fn get(&self, i: u64) -> [u8; BODY] {
        let mut b = self.0[(i % 1024) as usize];
        b[..8].copy_from_slice(&i.to_le_bytes());
        b
    }
}

/// What a writer engine does: append a batch of records durably.
pub trait Writer {
    /// Appends records `first..first+n` and makes them durable (one commit).
    fn batch(&mut self, bodies: &Bodies, first: u64, n: u64) -> Res<()>;
    /// Closes cleanly.
    fn close(self: Box<Self>) -> Res<()>;
}

pub fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("VmHWM:") {
            return v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
    }
    0
}

fn threads() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[k].as_secs_f64() * 1e3
}

pub fn run_write(
    engine: &str,
    case: &str,
    mut w: Box<dyn Writer>,
    total: u64,
    batch: u64,
    crash: bool,
    open_ms: f64,
) -> Res<()> {
    let bodies = Bodies::new();
    let mut lat = Vec::with_capacity((total / batch) as usize);
    let t0 = Instant::now();
    let mut i = 0;
    while i < total {
        let n = batch.min(total - i);
        let t = Instant::now();
        w.batch(&bodies, i, n)?;
        lat.push(t.elapsed());
        i += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    let hwm_before_close = vm_hwm_kib();
    let thr = threads();
    let close_ms = if crash {
        f64::NAN
    } else {
        let t = Instant::now();
        w.close()?;
        t.elapsed().as_secs_f64() * 1e3
    };
    lat.sort_unstable();
    let mean_ms = lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / lat.len() as f64 * 1e3;
    println!(
        "engine={engine} case={case} records={total} batch={batch} secs={secs:.3} rec_per_s={:.0} payload_MB_per_s={:.2} commits={} commit_mean_ms={mean_ms:.3} commit_p50_ms={:.3} commit_p99_ms={:.3} commit_max_ms={:.3} open_ms={open_ms:.1} close_ms={close_ms:.1} threads={thr} vm_hwm_kib={hwm_before_close} vm_hwm_end_kib={}",
        total as f64 / secs,
        (total * BODY as u64) as f64 / secs / 1e6,
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        vm_hwm_kib(),
    );
    if crash {
        // As a killed process: nothing is closed, no destructor runs.
        std::process::exit(0);
    }
    Ok(())
}

pub fn report_read(engine: &str, count: u64, bytes: u64, check: u64, secs: f64, open_ms: f64) {
    println!(
        "engine={engine} case=D records={count} bytes={bytes} check={check:x} secs={secs:.3} rec_per_s={:.0} MB_per_s={:.1} open_ms={open_ms:.1} vm_hwm_kib={}",
        count as f64 / secs,
        bytes as f64 / secs / 1e6,
        vm_hwm_kib()
    );
}

pub fn report_reopen(engine: &str, open_ms: f64, last_key: Option<u64>, notes: &str) {
    println!(
        "engine={engine} case=E reopen_ms={open_ms:.1} last_key={last_key:?} {notes} vm_hwm_kib={}",
        vm_hwm_kib()
    );
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

// ---------------------------------------------------------------- servogate-log
#[cfg(feature = "sg")]
mod sg {
    use super::*;
    use servogate_log::{Entry, FsDir, Log, Options, SyncMode};

    fn opts() -> Options {
        Options {
            segment_bytes: 8 << 20,
            max_bytes: None,
            max_age: None,
            sync: SyncMode::Batch,
        }
    }

    pub struct W(Log<FsDir>);
    impl Writer for W {
        fn batch(&mut self, bodies: &Bodies, first: u64, n: u64) -> Res<()> {
            let bs: Vec<[u8; BODY]> = (first..first + n).map(|i| bodies.get(i)).collect();
            self.0
                .append_batch(bs.iter().enumerate().map(|(k, b)| (first + k as u64, &b[..])))?;
            self.0.commit()?;
            Ok(())
        }
        fn close(self: Box<Self>) -> Res<()> {
            drop(self);
            Ok(())
        }
    }

    pub fn open(dir: &Path) -> Res<(Log<FsDir>, servogate_log::Recovery)> {
        Ok(Log::open(FsDir::open(dir)?, opts())?)
    }

    pub fn writer(dir: &Path) -> Res<(Box<dyn Writer>, f64)> {
        let t = Instant::now();
        let (log, _) = open(dir)?;
        Ok((Box::new(W(log)), ms(t)))
    }

    pub fn read(dir: &Path) -> Res<()> {
        let t = Instant::now();
        let (log, _) = open(dir)?;
        let open_ms = ms(t);
        let t = Instant::now();
        let (mut count, mut bytes, mut check) = (0u64, 0u64, 0u64);
        for e in log.reader(0) {
            match e? {
                Entry::Record(r) => {
                    count += 1;
                    bytes += r.body.len() as u64;
                    check ^= u64::from_le_bytes(r.body[..8].try_into().unwrap());
                }
                Entry::Gap { from, to } => return Err(format!("gap {from}..{to}").into()),
            }
        }
        report_read("sg", count, bytes, check, t.elapsed().as_secs_f64(), open_ms);
        Ok(())
    }

    pub fn reopen(dir: &Path) -> Res<()> {
        let t = Instant::now();
        let (log, rec) = open(dir)?;
        let open_ms = ms(t);
        let last = log.next_index().checked_sub(1);
        report_reopen(
            "sg",
            open_ms,
            last,
            &format!(
                "segments={} records={} cut_bytes={} torn={}",
                rec.segments, rec.records, rec.cut_bytes, rec.torn
            ),
        );
        Ok(())
    }
}

// ---------------------------------------------------------------- redb
#[cfg(feature = "redb")]
mod rdb {
    use super::*;
    use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

    pub struct W(Database);
    impl Writer for W {
        fn batch(&mut self, bodies: &Bodies, first: u64, n: u64) -> Res<()> {
            let mut tx = self.0.begin_write()?;
            tx.set_durability(Durability::Immediate);
            {
                let mut t = tx.open_table(T)?;
                for i in first..first + n {
                    t.insert(i, &bodies.get(i)[..])?;
                }
            }
            tx.commit()?;
            Ok(())
        }
        fn close(self: Box<Self>) -> Res<()> {
            drop(self);
            Ok(())
        }
    }

    fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("log.redb")
    }

    /// `small`: a 4 MiB cache instead of the default 1 GiB.
    fn builder(small: bool) -> redb::Builder {
        let mut b = Database::builder();
        if small {
            b.set_cache_size(4 << 20);
        }
        b
    }

    pub fn writer(dir: &Path, small: bool) -> Res<(Box<dyn Writer>, f64)> {
        std::fs::create_dir_all(dir)?;
        let t = Instant::now();
        let db = builder(small).create(path(dir))?;
        Ok((Box::new(W(db)), ms(t)))
    }

    pub fn read(dir: &Path, small: bool, name: &str) -> Res<()> {
        let t = Instant::now();
        let db = builder(small).open(path(dir))?;
        let open_ms = ms(t);
        let t = Instant::now();
        let tx = db.begin_read()?;
        let table = tx.open_table(T)?;
        let (mut count, mut bytes, mut check) = (0u64, 0u64, 0u64);
        for e in table.iter()? {
            let (_k, v) = e?;
            let v = v.value();
            count += 1;
            bytes += v.len() as u64;
            check ^= u64::from_le_bytes(v[..8].try_into().unwrap());
        }
        report_read(name, count, bytes, check, t.elapsed().as_secs_f64(), open_ms);
        Ok(())
    }

    pub fn reopen(dir: &Path, small: bool, name: &str) -> Res<()> {
        let t = Instant::now();
        let repaired = std::rc::Rc::new(std::cell::Cell::new(false));
        let r2 = repaired.clone();
        let db = builder(small)
            .set_repair_callback(move |_s| r2.set(true))
            .open(path(dir))?;
        let tx = db.begin_read()?;
        let table = tx.open_table(T)?;
        let open_ms = ms(t);
        let last = table.last()?.map(|(k, _)| k.value());
        report_reopen(
            name,
            open_ms,
            last,
            &format!("repaired={} len={}", repaired.get(), table.len()?),
        );
        Ok(())
    }
}

// ---------------------------------------------------------------- fjall
#[cfg(feature = "fjall")]
mod fj {
    use super::*;
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub struct W {
        db: Database,
        ks: Keyspace,
        /// true: the WriteBatch API (one journal write per batch), false: insert per record.
        use_batch: bool,
    }
    impl Writer for W {
        fn batch(&mut self, bodies: &Bodies, first: u64, n: u64) -> Res<()> {
            if self.use_batch {
                let mut b = self.db.batch().durability(Some(PersistMode::SyncData));
                for i in first..first + n {
                    b.insert(&self.ks, i.to_be_bytes(), bodies.get(i));
                }
                b.commit()?;
            } else {
                for i in first..first + n {
                    self.ks.insert(i.to_be_bytes(), bodies.get(i))?;
                }
                self.db.persist(PersistMode::SyncData)?;
            }
            Ok(())
        }
        fn close(self: Box<Self>) -> Res<()> {
            drop(self);
            Ok(())
        }
    }

    /// `small`: 2 MiB block cache (default 32 MiB), 4 MiB memtable (default 64 MiB).
    pub fn open(dir: &Path, small: bool) -> Res<(Database, Keyspace)> {
        let mut b = Database::builder(dir);
        if small {
            b = b.cache_size(2 << 20);
        }
        let db = b.open()?;
        let ks = if small {
            db.keyspace("log", || KeyspaceCreateOptions::default().max_memtable_size(4 << 20))?
        } else {
            db.keyspace("log", KeyspaceCreateOptions::default)?
        };
        Ok((db, ks))
    }

    pub fn writer(dir: &Path, use_batch: bool, small: bool) -> Res<(Box<dyn Writer>, f64)> {
        let t = Instant::now();
        let (db, ks) = open(dir, small)?;
        Ok((Box::new(W { db, ks, use_batch }), ms(t)))
    }

    pub fn read(dir: &Path, name: &str, small: bool) -> Res<()> {
        let t = Instant::now();
        let (_db, ks) = open(dir, small)?;
        let open_ms = ms(t);
        let t = Instant::now();
        let (mut count, mut bytes, mut check) = (0u64, 0u64, 0u64);
        for g in ks.iter() {
            let (_k, v) = g.into_inner()?;
            count += 1;
            bytes += v.len() as u64;
            check ^= u64::from_le_bytes(v[..8].try_into().unwrap());
        }
        report_read(name, count, bytes, check, t.elapsed().as_secs_f64(), open_ms);
        Ok(())
    }

    pub fn reopen(dir: &Path, name: &str, small: bool) -> Res<()> {
        let t = Instant::now();
        let (db, ks) = open(dir, small)?;
        let open_ms = ms(t);
        let last = ks
            .last_key_value()
            .map(|g| g.key())
            .transpose()?
            .map(|k| u64::from_be_bytes(k[..8].try_into().unwrap()));
        report_reopen(
            name,
            open_ms,
            last,
            &format!("journals={}", db.journal_count()),
        );
        Ok(())
    }
}

// ---------------------------------------------------------------- SQLite
#[cfg(feature = "sqlite")]
mod sq {
    use super::*;
    use rusqlite::{params, Connection};

    fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("log.sqlite")
    }

    pub fn open(dir: &Path) -> Res<Connection> {
        std::fs::create_dir_all(dir)?;
        let c = Connection::open(path(dir))?;
        let mode: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        assert_eq!(mode, "wal");
        c.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
        )?;
        Ok(c)
    }

    pub struct W(Connection);
    impl Writer for W {
        fn batch(&mut self, bodies: &Bodies, first: u64, n: u64) -> Res<()> {
            let tx = self.0.transaction()?;
            {
                let mut st = tx.prepare_cached("INSERT INTO log (id, body) VALUES (?1, ?2)")?;
                for i in first..first + n {
                    st.execute(params![i as i64, &bodies.get(i)[..]])?;
                }
            }
            tx.commit()?;
            Ok(())
        }
        fn close(self: Box<Self>) -> Res<()> {
            self.0.close().map_err(|(_, e)| e)?;
            Ok(())
        }
    }

    pub fn writer(dir: &Path) -> Res<(Box<dyn Writer>, f64)> {
        let t = Instant::now();
        let c = open(dir)?;
        Ok((Box::new(W(c)), ms(t)))
    }

    pub fn read(dir: &Path) -> Res<()> {
        let t = Instant::now();
        let c = open(dir)?;
        let open_ms = ms(t);
        let t = Instant::now();
        let (mut count, mut bytes, mut check) = (0u64, 0u64, 0u64);
        let mut st = c.prepare("SELECT id, body FROM log ORDER BY id")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let v = r.get_ref(1)?.as_blob()?;
            count += 1;
            bytes += v.len() as u64;
            check ^= u64::from_le_bytes(v[..8].try_into().unwrap());
        }
        report_read("sqlite", count, bytes, check, t.elapsed().as_secs_f64(), open_ms);
        Ok(())
    }

    pub fn reopen(dir: &Path) -> Res<()> {
        let wal = std::fs::metadata(dir.join("log.sqlite-wal")).map(|m| m.len()).unwrap_or(0);
        let t = Instant::now();
        let c = open(dir)?;
        // Opening is lazy: the first read of the schema/WAL index does the recovery.
        let last: Option<i64> = c.query_row("SELECT max(id) FROM log", [], |r| r.get(0))?;
        let open_ms = ms(t);
        report_reopen(
            "sqlite",
            open_ms,
            last.map(|v| v as u64),
            &format!("wal_bytes_before={wal}"),
        );
        Ok(())
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: storebench ENGINE CASE DIR [--crash]");
        std::process::exit(2);
    }
    let (engine, case, dir) = (args[1].as_str(), args[2].as_str(), Path::new(&args[3]));
    let crash = args.iter().any(|a| a == "--crash");
    let (total, batch) = match case {
        "A" => (1_000_000, 1_000),
        "B" => (200_000, 100),
        "C" => (2_000, 1),
        "D" | "E" => (0, 0),
        _ => return Err(format!("unknown case {case}").into()),
    };
    if total > 0 {
        let (w, open_ms): (Box<dyn Writer>, f64) = match engine {
            #[cfg(feature = "sg")]
            "sg" => sg::writer(dir)?,
            #[cfg(feature = "redb")]
            "redb" => rdb::writer(dir, false)?,
            #[cfg(feature = "redb")]
            "redb-small" => rdb::writer(dir, true)?,
            #[cfg(feature = "fjall")]
            "fjall" => fj::writer(dir, true, false)?,
            #[cfg(feature = "fjall")]
            "fjall-insert" => fj::writer(dir, false, false)?,
            #[cfg(feature = "fjall")]
            "fjall-small" => fj::writer(dir, true, true)?,
            #[cfg(feature = "sqlite")]
            "sqlite" => sq::writer(dir)?,
            _ => return Err(format!("unknown engine {engine}").into()),
        };
        return run_write(engine, case, w, total, batch, crash, open_ms);
    }
    match (engine, case) {
        #[cfg(feature = "sg")]
        ("sg", "D") => sg::read(dir),
        #[cfg(feature = "sg")]
        ("sg", "E") => sg::reopen(dir),
        #[cfg(feature = "redb")]
        ("redb" | "redb-small", "D") => rdb::read(dir, engine.ends_with("small"), engine),
        #[cfg(feature = "redb")]
        ("redb" | "redb-small", "E") => rdb::reopen(dir, engine.ends_with("small"), engine),
        #[cfg(feature = "fjall")]
        ("fjall" | "fjall-insert" | "fjall-small", "D") => {
            fj::read(dir, engine, engine.ends_with("small"))
        }
        #[cfg(feature = "fjall")]
        ("fjall" | "fjall-insert" | "fjall-small", "E") => {
            fj::reopen(dir, engine, engine.ends_with("small"))
        }
        #[cfg(feature = "sqlite")]
        ("sqlite", "D") => sq::read(dir),
        #[cfg(feature = "sqlite")]
        ("sqlite", "E") => sq::reopen(dir),
        _ => Err(format!("unknown engine {engine}").into()),
    }
}
