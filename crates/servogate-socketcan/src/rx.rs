//! Batched reads from a CAN_RAW socket: one `recvmmsg` takes up to [`RX_BATCH`] frames,
//! each with the kernel's receive timestamp (`SO_TIMESTAMPNS`) and the socket's drop total
//! (`SO_RXQ_OVFL`).
//!
//! Why: under an emulated CPU (qemu TCG, BENCHMARKS.md) every system call and every clock
//! read is expensive, and one `recvmsg` plus two clock reads per frame was most of the
//! reader's time. Now a batch costs one system call and one clock pair, and a frame's
//! acquisition time is when the kernel received it from the interface, which is also the
//! better answer: it no longer depends on when the reader got to run.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::wire::CAN_MTU;

/// Most frames one `recvmmsg` takes.
pub const RX_BATCH: usize = 64;

/// Room for the control messages of one frame: SCM_TIMESTAMPNS (a `timespec`, 16 bytes)
/// and SO_RXQ_OVFL (a `u32`), each behind a 16-byte `cmsghdr`, 8-byte aligned: 56 bytes.
const CMSG_ROOM: usize = 64;

/// What came with one frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Bytes of the frame (`CAN_MTU` for a classic frame).
    pub len: usize,
    /// When the kernel received it (CLOCK_REALTIME), if it said.
    pub stamp: Option<SystemTime>,
    /// The socket's drop total when the frame was queued, once the kernel has dropped any.
    pub dropped: Option<u32>,
}

/// Buffers for one `recvmmsg`, reused for every call (no allocation per read).
pub struct RxBatch {
    frames: Box<[[u8; CAN_MTU]; RX_BATCH]>,
    /// `u64` for the alignment `cmsghdr` needs.
    cmsgs: Box<[[u64; CMSG_ROOM / 8]; RX_BATCH]>,
    meta: [Meta; RX_BATCH],
    len: usize,
}

impl Default for RxBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RxBatch {
    pub fn new() -> Self {
        Self {
            frames: Box::new([[0; CAN_MTU]; RX_BATCH]),
            cmsgs: Box::new([[0; CMSG_ROOM / 8]; RX_BATCH]),
            meta: [Meta::default(); RX_BATCH],
            len: 0,
        }
    }

    /// Frames of the last read.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Frame `i` of the last read, and what came with it.
    pub fn get(&self, i: usize) -> Option<(&[u8], Meta)> {
        if i >= self.len {
            return None;
        }
        let m = self.meta[i];
        Some((&self.frames[i][..m.len.min(CAN_MTU)], m))
    }

    /// One non-blocking `recvmmsg` of up to [`RX_BATCH`] frames from `fd` (a CAN_RAW
    /// socket). `WouldBlock` when nothing is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.len = 0;
        // The headers point into `self`: built afresh for each call (the kernel also
        // writes msg_controllen back, so it must be reset anyway).
        let mut iovs: [libc::iovec; RX_BATCH] = std::array::from_fn(|_| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        // SAFETY: mmsghdr is plain old data (pointers and integers): all-zero is a valid
        // value, and every field the kernel reads is set below.
        #[allow(unsafe_code)]
        let mut hdrs: [libc::mmsghdr; RX_BATCH] = unsafe { std::mem::zeroed() };
        for ((iov, hdr), (frame, cmsg)) in iovs
            .iter_mut()
            .zip(hdrs.iter_mut())
            .zip(self.frames.iter_mut().zip(self.cmsgs.iter_mut()))
        {
            iov.iov_base = frame.as_mut_ptr().cast();
            iov.iov_len = CAN_MTU;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = cmsg.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = CMSG_ROOM as _;
        }
        // SAFETY: `hdrs` holds RX_BATCH headers, each pointing to one iovec of `iovs`
        // (CAN_MTU bytes of `self.frames`) and to CMSG_ROOM bytes of `self.cmsgs`; all of
        // them live, unaliased, until the call returns, and the kernel writes no further
        // than the lengths given. No name buffer (msg_name null, msg_namelen 0).
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                RX_BATCH as _,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).min(RX_BATCH);
        for (i, hdr) in hdrs.iter().enumerate().take(n) {
            // size_t on glibc, socklen_t (u32) on musl.
            #[allow(clippy::unnecessary_cast)]
            let controllen = (hdr.msg_hdr.msg_controllen as usize).min(CMSG_ROOM);
            let mut bytes = [0u8; CMSG_ROOM];
            for (k, word) in self.cmsgs[i].iter().enumerate() {
                bytes[k * 8..k * 8 + 8].copy_from_slice(&word.to_ne_bytes());
            }
            let (stamp, dropped) = parse_cmsgs(&bytes[..controllen]);
            self.meta[i] = Meta {
                len: hdr.msg_len as usize,
                stamp,
                dropped,
            };
        }
        self.len = n;
        Ok(n)
    }
}

/// The receive timestamp and the drop total in a control buffer (linux/socket.h
/// `struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; }`, data 8-byte
/// aligned). Anything else, or a truncated entry, is skipped. Never panics.
fn parse_cmsgs(buf: &[u8]) -> (Option<SystemTime>, Option<u32>) {
    const HDR: usize = 16;
    let mut stamp = None;
    let mut dropped = None;
    let mut at = 0usize;
    while at + HDR <= buf.len() {
        let word = |o: usize| -> [u8; 8] {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[o..o + 8]);
            b
        };
        let len = u64::from_ne_bytes(word(at)) as usize;
        let level = i32::from_ne_bytes([buf[at + 8], buf[at + 9], buf[at + 10], buf[at + 11]]);
        let kind = i32::from_ne_bytes([buf[at + 12], buf[at + 13], buf[at + 14], buf[at + 15]]);
        if len < HDR || at + len > buf.len() {
            break;
        }
        let data = &buf[at + HDR..at + len];
        if level == libc::SOL_SOCKET {
            if kind == libc::SCM_TIMESTAMPNS && data.len() >= 16 {
                let mut s = [0u8; 8];
                s.copy_from_slice(&data[..8]);
                let mut ns = [0u8; 8];
                ns.copy_from_slice(&data[8..16]);
                let secs = i64::from_ne_bytes(s);
                let nanos = i64::from_ne_bytes(ns);
                if secs >= 0 && (0..1_000_000_000).contains(&nanos) {
                    stamp = UNIX_EPOCH.checked_add(Duration::new(secs as u64, nanos as u32));
                }
            } else if kind == libc::SO_RXQ_OVFL && data.len() >= 4 {
                dropped = Some(u32::from_ne_bytes([data[0], data[1], data[2], data[3]]));
            }
        }
        // Next entry: aligned to 8.
        at += (len + 7) & !7;
    }
    (stamp, dropped)
}

/// Turns kernel receive timestamps into the two clocks the master wants: the wall time
/// (the event's acquisition timestamp, as the kernel gave it) and a monotonic instant
/// (for heartbeat, SDO and lateness timing), derived from one clock pair read per batch.
///
/// The instant is `now - age`, where `age = wall_now - stamp`, bounded to `[0, MAX_AGE]`
/// (a wall clock stepped since the frame arrived cannot push it far), and never earlier
/// than the last instant handed out: the master sees its time go forwards only.
#[derive(Debug, Clone, Copy)]
pub struct ArrivalClock {
    mono_now: std::time::Instant,
    wall_now: SystemTime,
    last: Option<std::time::Instant>,
}

/// Longest age believed from a timestamp.
const MAX_AGE: Duration = Duration::from_secs(1);

impl ArrivalClock {
    pub fn new(mono_now: std::time::Instant, wall_now: SystemTime) -> Self {
        Self {
            mono_now,
            wall_now,
            last: None,
        }
    }

    /// A fresh clock pair for the next batch; the monotonic floor is kept.
    pub fn refresh(&mut self, mono_now: std::time::Instant, wall_now: SystemTime) {
        self.mono_now = mono_now;
        self.wall_now = wall_now;
    }

    /// (instant, wall time) of a frame with kernel timestamp `stamp` (`None`: the batch's
    /// read time).
    pub fn arrival(&mut self, stamp: Option<SystemTime>) -> (std::time::Instant, SystemTime) {
        let (mono, wall) = match stamp {
            Some(wall) => {
                let age = self
                    .wall_now
                    .duration_since(wall)
                    .unwrap_or(Duration::ZERO)
                    .min(MAX_AGE);
                let mono = self.mono_now.checked_sub(age).unwrap_or(self.mono_now);
                (mono, wall)
            }
            None => (self.mono_now, self.wall_now),
        };
        let mono = match self.last {
            Some(last) if last > mono => last,
            _ => mono,
        };
        self.last = Some(mono);
        (mono, wall)
    }

    /// Records an instant handed to the master elsewhere (its timers): no arrival after it
    /// is placed before it.
    pub fn observe(&mut self, instant: std::time::Instant) {
        if self.last.is_none_or(|last| instant > last) {
            self.last = Some(instant);
        }
    }

    /// The wall time of the batch's clock pair.
    pub fn wall_now(&self) -> SystemTime {
        self.wall_now
    }

    /// The monotonic instant of the batch's clock pair (not before any arrival handed out).
    pub fn now(&self) -> std::time::Instant {
        match self.last {
            Some(last) if last > self.mono_now => last,
            _ => self.mono_now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let len = 16 + data.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u64).to_ne_bytes());
        b.extend_from_slice(&level.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(data);
        while b.len() % 8 != 0 {
            b.push(0);
        }
        b
    }

    fn timespec(secs: i64, nanos: i64) -> Vec<u8> {
        let mut d = secs.to_ne_bytes().to_vec();
        d.extend_from_slice(&nanos.to_ne_bytes());
        d
    }

    #[test]
    fn the_timestamp_and_the_drop_total_are_read_from_the_control_buffer() {
        let mut buf = cmsg(
            libc::SOL_SOCKET,
            libc::SCM_TIMESTAMPNS,
            &timespec(1_767_225_600, 123_456_789),
        );
        buf.extend(cmsg(
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            &7u32.to_ne_bytes(),
        ));
        let (stamp, dropped) = parse_cmsgs(&buf);
        assert_eq!(
            stamp,
            Some(UNIX_EPOCH + Duration::new(1_767_225_600, 123_456_789))
        );
        assert_eq!(dropped, Some(7));
    }

    #[test]
    fn an_empty_truncated_or_foreign_control_buffer_gives_nothing_and_never_panics() {
        assert_eq!(parse_cmsgs(&[]), (None, None));
        let full = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(5, 6));
        for cut in 0..full.len() {
            let _ = parse_cmsgs(&full[..cut]);
        }
        let other = cmsg(libc::SOL_IP, libc::SCM_TIMESTAMPNS, &timespec(5, 6));
        assert_eq!(parse_cmsgs(&other), (None, None));
        let bad_nanos = cmsg(
            libc::SOL_SOCKET,
            libc::SCM_TIMESTAMPNS,
            &timespec(5, 2_000_000_000),
        );
        assert_eq!(parse_cmsgs(&bad_nanos), (None, None));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = [0u8; 40];
            for (k, chunk) in b.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&x.rotate_left(k as u32 * 11).to_ne_bytes()[..chunk.len()]);
            }
            b[0] = (x % 48) as u8;
            b[1..8].fill(0);
            let _ = parse_cmsgs(&b);
        }
    }

    #[test]
    fn a_frame_stamped_earlier_gets_an_instant_as_much_earlier() {
        let mono = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut clock = ArrivalClock::new(mono, wall);
        let stamp = wall - Duration::from_millis(3);
        let (m, w) = clock.arrival(Some(stamp));
        assert_eq!(w, stamp);
        assert_eq!(mono - m, Duration::from_millis(3));
    }

    #[test]
    fn the_instant_never_goes_backwards_and_a_stepped_wall_clock_is_bounded() {
        let mono = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut clock = ArrivalClock::new(mono, wall);
        let (a, _) = clock.arrival(Some(wall - Duration::from_millis(1)));
        let (b, _) = clock.arrival(Some(wall - Duration::from_millis(5)));
        assert_eq!(
            a, b,
            "an older stamp after a newer one keeps the time where it was"
        );
        // A stamp from the future (the wall clock stepped back): the batch's instant.
        let mut clock = ArrivalClock::new(mono, wall);
        assert_eq!(clock.arrival(Some(wall + Duration::from_secs(60))).0, mono);
        // A stamp an hour old (the wall clock stepped forward): at most MAX_AGE.
        let mut clock = ArrivalClock::new(mono, wall);
        let (m, _) = clock.arrival(Some(wall - Duration::from_secs(3600)));
        assert!(mono - m <= MAX_AGE);
        // No stamp: the batch's clock pair.
        let mut clock = ArrivalClock::new(mono, wall);
        assert_eq!(clock.arrival(None), (mono, wall));
    }
}
