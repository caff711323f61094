//! Where the broker's acknowledgements reached: the index below which every record was
//! acknowledged, kept in a small file beside the segments so a restart publishes only
//! what the broker never confirmed.
//!
//! Two 24-byte slots written in turn (`gen u64 | index u64 | crc u32 | 0u32`); the valid
//! slot with the higher generation wins, so a torn write of one slot leaves the other.
//! The file is written at every commit and synced only now and then: a cursor that is
//! behind only makes a restart publish some acknowledged events again (at least once,
//! and a consumer keyed on boot_id, device, stream and seq sees them as repeats).

use std::io::{self, Read};

use crate::dir::Dir;

/// The cursor's file name in the log directory.
pub const CURSOR_FILE: &str = "acked";
const SLOT: usize = 24;

/// The acknowledged-up-to index of a log.
pub struct Cursor<D: Dir> {
    dir: D,
    gen: u64,
    index: u64,
}

fn encode(gen: u64, index: u64) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[..8].copy_from_slice(&gen.to_le_bytes());
    b[8..16].copy_from_slice(&index.to_le_bytes());
    let crc = crc32c::crc32c(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u64, u64)> {
    let b: &[u8; SLOT] = b.try_into().ok()?;
    let crc = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    if crc != crc32c::crc32c(&b[..16]) {
        return None;
    }
    let gen = u64::from_le_bytes(b[..8].try_into().ok()?);
    let index = u64::from_le_bytes(b[8..16].try_into().ok()?);
    (gen > 0).then_some((gen, index))
}

impl<D: Dir> Cursor<D> {
    /// The cursor of `dir`: 0 when there is none yet (or neither slot is readable).
    pub fn load(dir: D) -> io::Result<Self> {
        let mut bytes = Vec::new();
        match dir.open_read(CURSOR_FILE) {
            Ok(mut r) => {
                r.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let best = [0, 1]
            .iter()
            .filter_map(|k| bytes.get(k * SLOT..(k + 1) * SLOT).and_then(decode))
            .max();
        let (gen, index) = best.unwrap_or((0, 0));
        Ok(Self { dir, gen, index })
    }

    /// Every record below this index was acknowledged.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Records `index`; `sync`: durably now.
    pub fn store(&mut self, index: u64, sync: bool) -> io::Result<()> {
        if index == self.index && !sync {
            return Ok(());
        }
        let gen = self.gen + 1;
        let slot = gen % 2;
        self.dir
            .write_at(CURSOR_FILE, slot * SLOT as u64, &encode(gen, index), sync)?;
        self.gen = gen;
        self.index = index;
        Ok(())
    }
}
