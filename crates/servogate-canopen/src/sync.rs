//! The SYNC producer (CiA 301 v4.2, 7.2.5): COB-ID 0x080, no data, or one counter byte
//! 1..=overflow when the synchronous counter overflow value (0x1019, 2..=240) is set.
//!
//! Drives with TPDOs of transmission type 1..=240 answer each (n-th) SYNC; the producer is
//! optional (a drive may send on its own timer instead).

use std::time::{Duration, Instant};

use crate::frame::{cob, Frame};

/// The SYNC frame, with the counter byte when given.
pub fn sync_frame(counter: Option<u8>) -> Frame {
    match counter {
        Some(c) => Frame::known(cob::SYNC, &[c]),
        None => Frame::known(cob::SYNC, &[]),
    }
}

/// Sends SYNC every `period`.
#[derive(Debug, Clone)]
pub struct SyncProducer {
    period: Duration,
    /// Counter overflow value 2..=240, or `None` for SYNC without a counter.
    overflow: Option<u8>,
    counter: u8,
    next: Option<Instant>,
}

impl SyncProducer {
    /// A producer whose first SYNC is due at `now`. A zero `period` produces nothing.
    /// `overflow` outside 2..=240 (CiA 301) means no counter.
    pub fn new(period: Duration, overflow: Option<u8>, now: Instant) -> Self {
        Self {
            period,
            overflow: overflow.filter(|o| (2..=240).contains(o)),
            counter: 1,
            next: (!period.is_zero()).then_some(now),
        }
    }

    /// When the next SYNC is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next
    }

    /// A SYNC now, out of turn (a group start), with the next counter value; the next
    /// periodic SYNC comes one period after it.
    pub fn fire(&mut self, now: Instant) -> Frame {
        self.next = now
            .checked_add(self.period)
            .filter(|_| !self.period.is_zero());
        let counter = self.overflow.map(|overflow| {
            let c = self.counter;
            self.counter = if c >= overflow { 1 } else { c + 1 };
            c
        });
        sync_frame(counter)
    }

    /// The SYNC to send if one is due at `now`. After a stall the schedule moves on from
    /// `now` rather than sending a burst of missed SYNCs.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Frame> {
        let due = self.next?;
        if now < due {
            return None;
        }
        let mut next = due.checked_add(self.period);
        if next.is_some_and(|n| n <= now) {
            next = now.checked_add(self.period);
        }
        self.next = next;
        let counter = self.overflow.map(|overflow| {
            let c = self.counter;
            self.counter = if c >= overflow { 1 } else { c + 1 };
            c
        });
        Some(sync_frame(counter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn sync_is_0x080_with_no_data_or_a_counter() {
        assert_eq!(sync_frame(None), Frame::new(0x080, &[]).unwrap());
        assert_eq!(sync_frame(Some(7)), Frame::new(0x080, &[7]).unwrap());
    }

    #[test]
    fn the_producer_sends_one_sync_per_period() {
        let t0 = Instant::now();
        let mut p = SyncProducer::new(10 * MS, None, t0);
        assert_eq!(p.handle_timeout(t0), Some(sync_frame(None)));
        assert_eq!(p.poll_timeout(), Some(t0 + 10 * MS));
        assert_eq!(p.handle_timeout(t0 + 9 * MS), None);
        assert!(p.handle_timeout(t0 + 10 * MS).is_some());
        assert_eq!(p.poll_timeout(), Some(t0 + 20 * MS));
    }

    #[test]
    fn the_counter_runs_from_one_to_the_overflow_value_and_wraps() {
        let t0 = Instant::now();
        let mut p = SyncProducer::new(MS, Some(3), t0);
        let counters: Vec<u8> = (0..5u32)
            .filter_map(|i| p.handle_timeout(t0 + i * MS))
            .map(|f| f.data()[0])
            .collect();
        assert_eq!(counters, vec![1, 2, 3, 1, 2]);
    }

    #[test]
    fn a_stalled_producer_does_not_burst() {
        let t0 = Instant::now();
        let mut p = SyncProducer::new(10 * MS, None, t0);
        p.handle_timeout(t0);
        assert!(p.handle_timeout(t0 + 100 * MS).is_some());
        assert_eq!(p.handle_timeout(t0 + 101 * MS), None);
        assert_eq!(p.poll_timeout(), Some(t0 + 110 * MS));
    }

    #[test]
    fn a_sync_fired_out_of_turn_takes_the_next_counter_and_restarts_the_period() {
        let t0 = Instant::now();
        let mut p = SyncProducer::new(10 * MS, Some(4), t0);
        assert_eq!(p.handle_timeout(t0).map(|f| f.data()[0]), Some(1));
        assert_eq!(p.fire(t0 + 3 * MS).data(), &[2]);
        assert_eq!(p.poll_timeout(), Some(t0 + 13 * MS));
        assert_eq!(p.handle_timeout(t0 + 10 * MS), None);
        assert_eq!(p.handle_timeout(t0 + 13 * MS).map(|f| f.data()[0]), Some(3));
    }

    #[test]
    fn a_zero_period_produces_nothing() {
        let t0 = Instant::now();
        let mut p = SyncProducer::new(Duration::ZERO, None, t0);
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(p.handle_timeout(t0), None);
    }
}
