//! Case A only (1,000,000 records of 200 bytes, batches of 1,000, one durable commit per
//! batch) for the one engine selected by a cargo feature: for the binary-size figure.
use std::time::Instant;

fn body(i: u64) -> [u8; 200] {
    let mut b = [0u8; 200];
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    b
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("usage: only_a DIR")?);
    let t = Instant::now();
    #[cfg(feature = "sg")]
    {
        use servogate_log::{FsDir, Log, Options, SyncMode};
        let (mut log, _) = Log::open(
            FsDir::open(&dir)?,
            Options { segment_bytes: 8 << 20, max_bytes: None, max_age: None, sync: SyncMode::Batch },
        )?;
        for b in 0..1000u64 {
            let bodies: Vec<[u8; 200]> = (b * 1000..(b + 1) * 1000).map(body).collect();
            log.append_batch(bodies.iter().enumerate().map(|(k, x)| (b * 1000 + k as u64, &x[..])))?;
            log.commit()?;
        }
    }
    #[cfg(feature = "redb")]
    {
        use redb::{Database, Durability, TableDefinition};
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
        std::fs::create_dir_all(&dir)?;
        let db = Database::create(dir.join("log.redb"))?;
        for b in 0..1000u64 {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate);
            {
                let mut t = tx.open_table(T)?;
                for i in b * 1000..(b + 1) * 1000 {
                    t.insert(i, &body(i)[..])?;
                }
            }
            tx.commit()?;
        }
    }
    #[cfg(feature = "fjall")]
    {
        use fjall::{Database, KeyspaceCreateOptions, PersistMode};
        let db = Database::builder(&dir).open()?;
        let ks = db.keyspace("log", KeyspaceCreateOptions::default)?;
        for b in 0..1000u64 {
            let mut wb = db.batch().durability(Some(PersistMode::SyncData));
            for i in b * 1000..(b + 1) * 1000 {
                wb.insert(&ks, i.to_be_bytes(), body(i));
            }
            wb.commit()?;
        }
    }
    #[cfg(feature = "sqlite")]
    {
        use rusqlite::{params, Connection};
        std::fs::create_dir_all(&dir)?;
        let mut c = Connection::open(dir.join("log.sqlite"))?;
        c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0))?;
        c.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
        )?;
        for b in 0..1000u64 {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached("INSERT INTO log (id, body) VALUES (?1, ?2)")?;
                for i in b * 1000..(b + 1) * 1000 {
                    st.execute(params![i as i64, &body(i)[..]])?;
                }
            }
            tx.commit()?;
        }
    }
    println!("{:.3} s", t.elapsed().as_secs_f64());
    Ok(())
}
