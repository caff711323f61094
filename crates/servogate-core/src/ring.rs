//! The bounded delivery ring (DESIGN.md section 4).
//!
//! Bus tasks push events; the forwarder hands them to the broker in order and removes an
//! event only once the broker acknowledged it. Each entry is in one of three states:
//!
//! ```text
//!  push ──> Unsent ──take_next──> Handed ──ack──> Acked (removed once at the front)
//!             ^                     │
//!             └──────requeue────────┘   (connection lost before the acknowledgement)
//! ```
//!
//! On overflow the ring applies its [`OnFull`] policy. With `drop_oldest` the oldest entry
//! goes, whatever its state, and is counted: the consumer sees the loss as a gap in `seq`,
//! and [`RingStats::dropped`] says exactly how many. Nothing is lost silently.
//!
//! Entries are addressed by an [`Id`] that grows by one per push, so an acknowledgement for
//! an entry that was dropped meanwhile is recognised and ignored.

use std::collections::VecDeque;
use std::num::NonZeroUsize;

/// Position of an entry since the ring was created.
pub type Id = u64;

/// What to do with a push when the ring is full. Neither policy blocks the pusher: a bus
/// task must never wait for the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Remove the oldest entry to make room (the default: fresh telemetry matters most).
    #[default]
    DropOldest,
    /// Refuse the new entry and keep the history.
    DropNewest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Unsent,
    Handed,
    Acked,
}

#[derive(Debug)]
struct Slot<T> {
    item: T,
    state: SlotState,
}

/// Counters that only grow (except `len` and `unacked`, which are levels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Entries accepted.
    pub pushed: u64,
    /// Entries lost to the overflow policy (never acknowledged by the broker).
    pub dropped: u64,
    /// Entries acknowledged by the broker.
    pub acked: u64,
    /// Entries handed to the broker again after a lost connection.
    pub requeued: u64,
    /// Entries currently held.
    pub len: usize,
    /// Entries held and not yet acknowledged.
    pub unacked: usize,
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<T> {
    /// Stored with this id.
    Stored(Id),
    /// Stored with this id; the oldest entry was dropped to make room.
    StoredDroppingOldest(Id, T),
    /// Not stored (`drop_newest`); the item comes back.
    Refused(T),
}

/// The bounded ring. Not thread-safe by itself: the daemon wraps it in a mutex.
#[derive(Debug)]
pub struct Ring<T> {
    slots: VecDeque<Slot<T>>,
    capacity: NonZeroUsize,
    on_full: OnFull,
    /// Id of `slots[0]`.
    front: Id,
    /// No unsent entry has an id below this one.
    cursor: Id,
    /// Acked entries still held behind an unacked one.
    acked_held: usize,
    stats: RingStats,
}

/// Slots reserved when a ring is created.
const INITIAL_SLOTS: usize = 1024;

impl<T> Ring<T> {
    /// Creates a ring. Storage grows with the backlog (doubling, never past `capacity`)
    /// rather than being reserved up front: a 100,000-event ring that a connected broker
    /// keeps nearly empty then costs kilobytes, not the 20 MB its full size would, and a
    /// push allocates only when the backlog reaches a size it never reached before.
    pub fn new(capacity: NonZeroUsize, on_full: OnFull) -> Self {
        Self {
            slots: VecDeque::with_capacity(capacity.get().min(INITIAL_SLOTS)),
            capacity,
            on_full,
            front: 0,
            cursor: 0,
            acked_held: 0,
            stats: RingStats::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity.get()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn stats(&self) -> RingStats {
        RingStats {
            len: self.slots.len(),
            unacked: self.slots.len() - self.acked_held,
            ..self.stats
        }
    }

    /// Adds an entry, applying the overflow policy when full.
    pub fn push(&mut self, item: T) -> Pushed<T> {
        let mut dropped = None;
        if self.slots.len() == self.capacity.get() {
            match self.on_full {
                OnFull::DropNewest => {
                    self.stats.dropped += 1;
                    return Pushed::Refused(item);
                }
                OnFull::DropOldest => {
                    // The front is never Acked (acked fronts are removed at once), so this
                    // is a real loss.
                    if let Some(slot) = self.pop_front_slot() {
                        self.stats.dropped += 1;
                        dropped = Some(slot.item);
                    }
                }
            }
        }
        let id = self.front + self.slots.len() as Id;
        let (len, allocated) = (self.slots.len(), self.slots.capacity());
        if len == allocated {
            // Grow by doubling, but never past the configured capacity.
            self.slots
                .reserve_exact(len.max(16).min(self.capacity.get() - len));
        }
        self.slots.push_back(Slot {
            item,
            state: SlotState::Unsent,
        });
        self.stats.pushed += 1;
        match dropped {
            Some(old) => Pushed::StoredDroppingOldest(id, old),
            None => Pushed::Stored(id),
        }
    }

    /// The oldest entry not handed to the broker yet; it becomes `Handed`.
    pub fn take_next(&mut self) -> Option<(Id, &T)> {
        self.cursor = self.cursor.max(self.front);
        let end = self.front + self.slots.len() as Id;
        while self.cursor < end {
            let idx = (self.cursor - self.front) as usize;
            if self.slots[idx].state == SlotState::Unsent {
                let id = self.cursor;
                self.cursor += 1;
                let slot = &mut self.slots[idx];
                slot.state = SlotState::Handed;
                return Some((id, &slot.item));
            }
            self.cursor += 1;
        }
        None
    }

    /// The id the next push gets.
    pub fn next_id(&self) -> Id {
        self.front + self.slots.len() as Id
    }

    /// The entry [`take_next`](Self::take_next) would return, left unsent.
    pub fn peek_next(&mut self) -> Option<(Id, &T)> {
        self.cursor = self.cursor.max(self.front);
        let start = (self.cursor - self.front) as usize;
        let found = self
            .slots
            .iter()
            .skip(start)
            .position(|s| s.state == SlotState::Unsent)?;
        let idx = start + found;
        // Every entry before it is handed or acknowledged: the cursor may move up to it.
        self.cursor = self.front + idx as Id;
        Some((self.cursor, &self.slots[idx].item))
    }

    /// Up to `max` more unsent entries after `after`, looking at most `scan` entries
    /// past it, that `take` accepts (it sees each unsent one and returns whether it is
    /// taken); the taken ones become `Handed`. Entries passed over stay unsent, in their
    /// place: a batch of one device's samples leaves the others for the next take.
    pub fn take_after(
        &mut self,
        after: Id,
        scan: usize,
        max: usize,
        mut take: impl FnMut(Id, &T) -> bool,
    ) -> usize {
        let Some(start) = after.checked_sub(self.front).map(|d| d as usize + 1) else {
            return 0;
        };
        let mut taken = 0;
        for (i, slot) in self.slots.iter_mut().enumerate().skip(start).take(scan) {
            if taken == max {
                break;
            }
            if slot.state == SlotState::Unsent && take(self.front + i as Id, &slot.item) {
                slot.state = SlotState::Handed;
                taken += 1;
            }
        }
        taken
    }

    /// Unsent entries among the `scan` after `after` that `pred` accepts (at most `max`).
    pub fn count_after(
        &self,
        after: Id,
        scan: usize,
        max: usize,
        mut pred: impl FnMut(&T) -> bool,
    ) -> usize {
        let Some(start) = after.checked_sub(self.front).map(|d| d as usize + 1) else {
            return 0;
        };
        self.slots
            .iter()
            .skip(start)
            .take(scan)
            .filter(|s| s.state == SlotState::Unsent && pred(&s.item))
            .take(max)
            .count()
    }

    /// True when [`take_next`](Self::take_next) would return an entry.
    pub fn has_unsent(&self) -> bool {
        let start = self.cursor.max(self.front);
        let skip = (start - self.front) as usize;
        self.slots
            .iter()
            .skip(skip)
            .any(|s| s.state == SlotState::Unsent)
    }

    /// The broker acknowledged entry `id`. Returns false if the entry is gone already
    /// (dropped by the overflow policy, or acknowledged before).
    pub fn ack(&mut self, id: Id) -> bool {
        let Some(slot) = self.slot_mut(id) else {
            return false;
        };
        if slot.state == SlotState::Acked {
            return false;
        }
        slot.state = SlotState::Acked;
        self.stats.acked += 1;
        self.acked_held += 1;
        while self.slots.front().map(|s| s.state) == Some(SlotState::Acked) {
            self.pop_front_slot();
        }
        self.give_back();
        true
    }

    /// Slots allocated now (grows with a backlog, shrinks after it drained).
    pub fn allocated(&self) -> usize {
        self.slots.capacity()
    }

    /// A drained backlog gives its storage back: once the ring holds an eighth of what it
    /// has room for, the room shrinks to twice what it holds (never below the initial
    /// size). Amortised: a shrink halves at least, so it happens log(backlog) times.
    fn give_back(&mut self) {
        let (len, room) = (self.slots.len(), self.slots.capacity());
        if room > INITIAL_SLOTS && len <= room / 8 {
            self.slots.shrink_to((len * 2).max(INITIAL_SLOTS));
        }
    }

    /// Entry `id` was handed but its acknowledgement can no longer come (the connection
    /// was lost): it will be handed again. Returns false if it is gone or not handed.
    pub fn requeue(&mut self, id: Id) -> bool {
        let Some(slot) = self.slot_mut(id) else {
            return false;
        };
        if slot.state != SlotState::Handed {
            return false;
        }
        slot.state = SlotState::Unsent;
        self.stats.requeued += 1;
        self.cursor = self.cursor.min(id);
        true
    }

    /// Every handed entry goes back to unsent (used after a new broker session when the
    /// caller no longer knows which acknowledgements can still come).
    pub fn requeue_all(&mut self) -> usize {
        let mut n = 0;
        for slot in self.slots.iter_mut() {
            if slot.state == SlotState::Handed {
                slot.state = SlotState::Unsent;
                n += 1;
            }
        }
        self.stats.requeued += n as u64;
        self.cursor = self.front;
        n
    }

    fn slot_mut(&mut self, id: Id) -> Option<&mut Slot<T>> {
        let idx = id.checked_sub(self.front)?;
        self.slots.get_mut(usize::try_from(idx).ok()?)
    }

    fn pop_front_slot(&mut self) -> Option<Slot<T>> {
        let slot = self.slots.pop_front()?;
        if slot.state == SlotState::Acked {
            self.acked_held -= 1;
        }
        self.front += 1;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_one_kind_after_the_head_and_leaves_the_others_in_order() {
        let mut r = Ring::new(NonZeroUsize::new(16).unwrap(), OnFull::DropOldest);
        for v in [1, 20, 2, 21, 3, 22, 4] {
            r.push(v);
        }
        let (head, &first) = r.peek_next().unwrap();
        assert_eq!((head, first), (0, 1));
        assert_eq!(r.count_after(head, 16, 10, |v| *v < 10), 3);
        assert_eq!(r.take_next().map(|(i, v)| (i, *v)), Some((0, 1)));
        let mut got = Vec::new();
        let n = r.take_after(head, 16, 2, |id, v| {
            let take = *v < 10;
            if take {
                got.push((id, *v));
            }
            take
        });
        assert_eq!(n, 2);
        assert_eq!(got, [(2, 2), (4, 3)]);
        // The others come next, in order, then what the batch left of its kind.
        let rest: Vec<i32> = std::iter::from_fn(|| r.take_next().map(|(_, v)| *v)).collect();
        assert_eq!(rest, [20, 21, 22, 4]);
        // Acknowledged out of order, the ring still empties.
        for id in 0..7 {
            r.ack(id);
        }
        assert!(r.is_empty());
    }
    use proptest::prelude::*;

    #[test]
    fn a_drained_backlog_gives_its_storage_back() {
        let mut r: Ring<u32> = Ring::new(NonZeroUsize::new(1_000_000).unwrap(), OnFull::DropOldest);
        for i in 0..100_000 {
            r.push(i);
        }
        let grown = r.allocated();
        assert!(grown >= 100_000);
        while let Some((id, _)) = r.take_next() {
            r.ack(id);
        }
        assert!(r.is_empty());
        assert!(
            r.allocated() <= INITIAL_SLOTS * 2,
            "{} slots kept",
            r.allocated()
        );
    }

    fn ring(cap: usize, on_full: OnFull) -> Ring<u32> {
        Ring::new(NonZeroUsize::new(cap).unwrap(), on_full)
    }

    #[test]
    fn drop_oldest_counts_every_entry_it_drops() {
        let mut r = ring(2, OnFull::DropOldest);
        r.push(1);
        r.push(2);
        assert_eq!(r.push(3), Pushed::StoredDroppingOldest(2, 1));
        assert_eq!(r.stats().dropped, 1);
        assert_eq!(r.take_next(), Some((1, &2)));
    }

    #[test]
    fn drop_newest_refuses_and_hands_the_item_back() {
        let mut r = ring(1, OnFull::DropNewest);
        r.push(1);
        assert_eq!(r.push(2), Pushed::Refused(2));
        assert_eq!(r.stats().dropped, 1);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn an_entry_leaves_only_after_its_acknowledgement() {
        let mut r = ring(4, OnFull::DropOldest);
        r.push(10);
        r.push(11);
        let (a, _) = r.take_next().unwrap();
        let (b, _) = r.take_next().unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.ack(b));
        assert_eq!(r.len(), 2, "the front is not acked yet");
        assert!(r.ack(a));
        assert!(r.is_empty());
    }

    #[test]
    fn requeued_entries_are_handed_again_in_order() {
        let mut r = ring(4, OnFull::DropOldest);
        for i in 0..3 {
            r.push(i);
        }
        while r.take_next().is_some() {}
        assert!(r.ack(1));
        assert_eq!(r.requeue_all(), 2);
        assert_eq!(r.take_next(), Some((0, &0)));
        assert_eq!(r.take_next(), Some((2, &2)));
        assert_eq!(r.take_next(), None);
    }

    #[test]
    fn an_ack_for_a_dropped_entry_is_ignored() {
        let mut r = ring(1, OnFull::DropOldest);
        r.push(1);
        let (id, _) = r.take_next().unwrap();
        r.push(2);
        assert!(!r.ack(id));
        assert_eq!(r.stats().acked, 0);
        assert_eq!(r.len(), 1);
    }

    // Model test: the ring against a plain VecDeque of (id, item, state) with the obvious
    // semantics, over random operation sequences.
    #[derive(Debug, Clone)]
    enum Op {
        Push(u32),
        Take,
        Ack(u8),
        Requeue(u8),
        RequeueAll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<u32>().prop_map(Op::Push),
            3 => Just(Op::Take),
            2 => any::<u8>().prop_map(Op::Ack),
            1 => any::<u8>().prop_map(Op::Requeue),
            1 => Just(Op::RequeueAll),
        ]
    }

    #[derive(Default)]
    struct Model {
        q: VecDeque<(Id, u32, SlotState)>,
        next_id: Id,
        dropped: u64,
    }

    impl Model {
        fn push(&mut self, cap: usize, on_full: OnFull, v: u32) {
            if self.q.len() == cap {
                self.dropped += 1;
                if on_full == OnFull::DropNewest {
                    return;
                }
                self.q.pop_front();
            }
            self.q.push_back((self.next_id, v, SlotState::Unsent));
            self.next_id += 1;
        }
        fn take(&mut self) -> Option<(Id, u32)> {
            let e = self.q.iter_mut().find(|e| e.2 == SlotState::Unsent)?;
            e.2 = SlotState::Handed;
            Some((e.0, e.1))
        }
        fn ack(&mut self, id: Id) -> bool {
            let Some(e) = self.q.iter_mut().find(|e| e.0 == id) else {
                return false;
            };
            if e.2 == SlotState::Acked {
                return false;
            }
            e.2 = SlotState::Acked;
            while self.q.front().map(|e| e.2) == Some(SlotState::Acked) {
                self.q.pop_front();
            }
            true
        }
        fn requeue(&mut self, id: Id) -> bool {
            match self.q.iter_mut().find(|e| e.0 == id) {
                Some(e) if e.2 == SlotState::Handed => {
                    e.2 = SlotState::Unsent;
                    true
                }
                _ => false,
            }
        }
    }

    proptest! {
        #[test]
        fn ring_behaves_like_its_vecdeque_model(
            cap in 1usize..8,
            drop_newest in any::<bool>(),
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let on_full = if drop_newest { OnFull::DropNewest } else { OnFull::DropOldest };
            let mut r = ring(cap, on_full);
            let mut m = Model::default();
            for op in ops {
                // Ids in Ack/Requeue are picked near the live window so they hit often.
                let pick = |k: u8, m: &Model| m.next_id.saturating_sub(u64::from(k % 10));
                match op {
                    Op::Push(v) => {
                        r.push(v);
                        m.push(cap, on_full, v);
                    }
                    Op::Take => {
                        let got = r.take_next().map(|(id, v)| (id, *v));
                        prop_assert_eq!(got, m.take());
                    }
                    Op::Ack(k) => {
                        let id = pick(k, &m);
                        prop_assert_eq!(r.ack(id), m.ack(id));
                    }
                    Op::Requeue(k) => {
                        let id = pick(k, &m);
                        prop_assert_eq!(r.requeue(id), m.requeue(id));
                    }
                    Op::RequeueAll => {
                        let n = m.q.iter_mut().filter(|e| e.2 == SlotState::Handed)
                            .map(|e| e.2 = SlotState::Unsent).count();
                        prop_assert_eq!(r.requeue_all(), n);
                    }
                }
                prop_assert_eq!(r.len(), m.q.len());
                prop_assert_eq!(r.stats().dropped, m.dropped);
                let unacked = m.q.iter().filter(|e| e.2 != SlotState::Acked).count();
                prop_assert_eq!(r.stats().unacked, unacked);
                prop_assert_eq!(r.has_unsent(), m.q.iter().any(|e| e.2 == SlotState::Unsent));
            }
        }
    }
}
