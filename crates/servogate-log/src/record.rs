//! How one record lies on disk, and reading records back from a byte stream.
//!
//! ```text
//! segment: MAGIC (8 bytes) record*
//! record:  len u32 LE | crc u32 LE | time_us u64 LE | body (len bytes)
//!          crc = CRC-32C of time_us (8 bytes LE) ++ body
//! ```
//!
//! `len` is 1..=[`MAX_BODY`]: a zero length is never written, so a tail of zeros (what a
//! file system may show after a crash that extended the file but not its data) reads as
//! corrupt, not as empty records. The checksum covers the time and the body, so neither a
//! torn write nor a flipped bit comes back as a record.

use std::io::{self, Read};

/// The first bytes of every segment file (format version 1).
pub const MAGIC: [u8; 8] = *b"SGLOG\0\0\x01";
/// Bytes before a record's body.
pub const HEADER: usize = 16;
/// The largest body a record may carry.
pub const MAX_BODY: usize = 1 << 20;

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its position in the log since it was created (0, 1, 2, ...).
    pub index: u64,
    /// Wall clock when it was appended, microseconds since the Unix epoch.
    pub time_us: u64,
    pub body: Vec<u8>,
}

fn crc(time_us: u64, body: &[u8]) -> u32 {
    let c = crc32c::crc32c(&time_us.to_le_bytes());
    crc32c::crc32c_append(c, body)
}

/// Appends the encoding of one record to `out`. `body` must be 1..=[`MAX_BODY`] bytes
/// (the log checks it before).
pub fn encode(time_us: u64, body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(time_us, body).to_le_bytes());
    out.extend_from_slice(&time_us.to_le_bytes());
    out.extend_from_slice(body);
}

/// The bytes a record of `body_len` takes on disk.
pub fn encoded_len(body_len: usize) -> u64 {
    (HEADER + body_len) as u64
}

/// The time and body of one record, as [`RecordReader::next_record`] reads it.
pub type Raw = (u64, Vec<u8>);

/// Why reading stopped before the end of the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// The bytes end inside a record (a write that did not complete).
    Torn,
    /// A record whose length is impossible or whose checksum does not match.
    Corrupt(String),
}

/// Reads the records of one segment in order, after its magic.
pub struct RecordReader<R> {
    inner: R,
    /// Bytes consumed from the start of the segment (after the last good record).
    good_len: u64,
    header: [u8; HEADER],
}

impl<R: Read> RecordReader<R> {
    /// Checks the magic; `Err(Bad)` when the segment does not start with it.
    pub fn new(mut inner: R) -> io::Result<Result<Self, Bad>> {
        let mut magic = [0u8; MAGIC.len()];
        match read_full(&mut inner, &mut magic)? {
            n if n == MAGIC.len() && magic == MAGIC => Ok(Ok(Self {
                inner,
                good_len: MAGIC.len() as u64,
                header: [0; HEADER],
            })),
            n if n < MAGIC.len() && magic[..n] == MAGIC[..n] => Ok(Err(Bad::Torn)),
            _ => Ok(Err(Bad::Corrupt("not a servogate log segment".into()))),
        }
    }

    /// Bytes of the segment up to the end of the last good record.
    pub fn good_len(&self) -> u64 {
        self.good_len
    }

    /// The next record's time and body: `Ok(None)` at a clean end, `Err(Bad)` where the
    /// good records end (nothing after it can be trusted).
    pub fn next_record(&mut self) -> io::Result<Result<Option<Raw>, Bad>> {
        let n = read_full(&mut self.inner, &mut self.header)?;
        if n == 0 {
            return Ok(Ok(None));
        }
        if n < HEADER {
            return Ok(Err(Bad::Torn));
        }
        let h = &self.header;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let sum = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let time_us = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        if len == 0 || len > MAX_BODY {
            return Ok(Err(Bad::Corrupt(format!("record length {len}"))));
        }
        let mut body = vec![0u8; len];
        if read_full(&mut self.inner, &mut body)? < len {
            return Ok(Err(Bad::Torn));
        }
        if crc(time_us, &body) != sum {
            return Ok(Err(Bad::Corrupt("checksum mismatch".into())));
        }
        self.good_len += encoded_len(len);
        Ok(Ok(Some((time_us, body))))
    }
}

/// Reads until `buf` is full or the stream ends; the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for (t, b) in records {
            encode(*t, b, &mut out);
        }
        out
    }

    fn read_all(bytes: &[u8]) -> (Vec<Raw>, Option<Bad>, u64) {
        let mut r = match RecordReader::new(bytes).unwrap() {
            Ok(r) => r,
            Err(bad) => return (Vec::new(), Some(bad), 0),
        };
        let mut out = Vec::new();
        loop {
            match r.next_record().unwrap() {
                Ok(Some(rec)) => out.push(rec),
                Ok(None) => return (out, None, r.good_len()),
                Err(bad) => return (out, Some(bad), r.good_len()),
            }
        }
    }

    #[test]
    fn records_read_back_in_order_with_their_times() {
        let s = segment(&[(1, b"a"), (2, b"bc"), (3, &[0u8; 300])]);
        let (recs, bad, len) = read_all(&s);
        assert_eq!(bad, None);
        assert_eq!(len, s.len() as u64);
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1], (2, b"bc".to_vec()));
    }

    #[test]
    fn a_cut_anywhere_inside_the_last_record_reads_as_torn_after_the_good_ones() {
        let s = segment(&[(1, b"first"), (2, b"second record")]);
        let first_end = MAGIC.len() + HEADER + 5;
        for cut in first_end + 1..s.len() {
            let (recs, bad, len) = read_all(&s[..cut]);
            assert_eq!(recs.len(), 1, "cut at {cut}");
            assert_eq!(bad, Some(Bad::Torn), "cut at {cut}");
            assert_eq!(len, first_end as u64);
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_is_never_returned() {
        let s = segment(&[(1, b"first"), (7, b"second record")]);
        let first_end = MAGIC.len() + HEADER + 5;
        for byte in first_end..s.len() {
            for bit in 0..8 {
                let mut t = s.clone();
                t[byte] ^= 1 << bit;
                let (recs, bad, _) = read_all(&t);
                assert_eq!(recs, [(1, b"first".to_vec())], "byte {byte} bit {bit}");
                assert!(bad.is_some(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn zeros_after_the_last_record_are_corrupt_not_empty_records() {
        let mut s = segment(&[(1, b"x")]);
        s.extend_from_slice(&[0u8; 64]);
        let (recs, bad, _) = read_all(&s);
        assert_eq!(recs.len(), 1);
        assert!(matches!(bad, Some(Bad::Corrupt(_))));
    }

    #[test]
    fn a_file_that_is_not_a_segment_is_refused_and_a_short_magic_is_torn() {
        assert!(matches!(read_all(b"hello world").1, Some(Bad::Corrupt(_))));
        assert_eq!(read_all(&MAGIC[..3]).1, Some(Bad::Torn));
        assert_eq!(read_all(b"").1, Some(Bad::Torn));
    }
}
