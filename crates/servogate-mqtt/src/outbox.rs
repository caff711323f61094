//! The delivery ring shared by the bus tasks (producers) and the forwarder (consumer).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Instant, SystemTime};

use servogate_core::{Event, EventSink, OnFull, Ring, RingStats};
use tokio::sync::Notify;

use crate::batch::{self, Batches, Batching, Linger, Take};
use crate::feed::{Feed, Prepared};
use crate::payload;

/// The bounded ring of events waiting for the broker, behind a short `std` mutex.
///
/// Why a `std` mutex and not a tokio one: bus tasks push from tight polling loops and must
/// never await on the network side; every critical section here is a few field updates, so
/// a blocking lock is cheaper than an async one and can be taken from sync code. Nobody
/// holds it across an `.await`.
///
/// Why a [`Notify`]: `notify_one` stores a permit when the forwarder is not waiting, so a
/// push between the forwarder's "ring is empty" check and its wait is never lost.
#[derive(Debug)]
pub struct Outbox {
    ring: Mutex<Ring<Event>>,
    notify: Notify,
    /// A thread to unpark at every push, when one drains the ring (the event log).
    thread: OnceLock<std::thread::Thread>,
    /// The throughput mode: several samples of a device per message.
    batching: Mutex<Batching>,
    /// Every id of a batch by its first (what the forwarder acknowledges).
    batches: Batches,
    linger: Linger,
}

impl Outbox {
    /// Creates the outbox; the ring reserves all its storage here, once.
    pub fn new(capacity: NonZeroUsize, on_full: OnFull) -> Arc<Outbox> {
        Arc::new(Outbox {
            ring: Mutex::new(Ring::new(capacity, on_full)),
            notify: Notify::new(),
            thread: OnceLock::new(),
            batching: Mutex::default(),
            batches: Batches::default(),
            linger: Linger::default(),
        })
    }

    /// Telemetry goes in batches of up to `b.max` samples of one device (a JSON array of
    /// the samples' objects on the device's telemetry topic).
    pub fn set_batching(&self, b: Batching) {
        *self.batching.lock().unwrap_or_else(PoisonError::into_inner) = b;
    }

    /// Counters of the ring: pushed, dropped (each one a gap in `seq`), acked, requeued, and
    /// the current levels.
    pub fn stats(&self) -> RingStats {
        self.lock().stats()
    }

    pub fn capacity(&self) -> usize {
        self.lock().capacity()
    }

    /// Locks the ring. A panic in another holder must not stop delivery: every ring method
    /// leaves the ring consistent before anything that could panic, so a poisoned lock is
    /// taken over rather than propagated.
    pub fn lock(&self) -> MutexGuard<'_, Ring<Event>> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Also wakes `thread` (unpark) at every push: the event log's writer thread.
    pub fn wake_thread_on_push(&self, thread: std::thread::Thread) {
        let _ = self.thread.set(thread);
    }
}

impl Feed for Outbox {
    fn take_next(&self, prefix: &str) -> Option<(u64, Prepared)> {
        let b = *self.batching.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ring = self.lock();
        if !b.on() {
            return ring
                .take_next()
                .map(|(id, event)| (id, Prepared::of_event(prefix, event)));
        }
        let mut built: Option<Prepared> = None;
        let mut several = false;
        let flush = self.linger.flushing();
        let taken = batch::take(&mut ring, b, flush, SystemTime::now(), |_, e| {
            match built.as_mut() {
                None => built = Some(Prepared::of_event(prefix, e)),
                Some(p) => {
                    if !several {
                        p.payload.insert(0, b'[');
                        several = true;
                    }
                    p.payload.push(b',');
                    p.payload.extend_from_slice(&payload::encode_event(e));
                }
            }
        });
        match taken {
            Take::Empty => None,
            Take::WaitUntil(at) => {
                self.linger.wait_until(at);
                None
            }
            Take::Taken(ids) => {
                let mut p = built?;
                if several {
                    p.payload.push(b']');
                }
                let first = ids[0];
                self.batches.insert(ids);
                Some((first, p))
            }
        }
    }

    fn ack(&self, id: u64) {
        self.batches.ack(&mut self.lock(), id);
    }

    fn requeue(&self, id: u64) {
        self.batches.requeue(&mut self.lock(), id);
    }

    fn requeue_all(&self) -> usize {
        self.batches.clear();
        self.lock().requeue_all()
    }

    fn wake_at(&self) -> Option<Instant> {
        self.linger.wake_at()
    }

    fn flush(&self, on: bool) {
        self.linger.set_flushing(on);
    }

    fn unacked(&self) -> usize {
        self.stats().unacked
    }

    fn notify(&self) -> &Notify {
        &self.notify
    }

    fn stats(&self) -> RingStats {
        Outbox::stats(self)
    }
}

impl EventSink for Outbox {
    /// Stores the event, applying the overflow policy; never waits for room or the network.
    fn push(&self, event: Event) {
        let displaced = {
            let mut ring = self.lock();
            ring.push(event)
        };
        // A dropped event (counted by the ring) is freed here, outside the lock.
        drop(displaced);
        self.notify.notify_one();
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servogate_core::{DeviceEvents, EventBody, Telemetry};
    use std::time::SystemTime;

    fn telemetry(dev: &mut DeviceEvents) -> Event {
        dev.event(
            SystemTime::UNIX_EPOCH,
            EventBody::Telemetry(Telemetry::default()),
        )
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_and_counts_it() {
        let outbox = Outbox::new(NonZeroUsize::new(2).unwrap(), OnFull::DropOldest);
        let mut dev = DeviceEvents::new("axis-1");
        for _ in 0..5 {
            outbox.push(telemetry(&mut dev));
        }
        let stats = outbox.stats();
        assert_eq!((stats.pushed, stats.dropped, stats.len), (5, 3, 2));
        let mut ring = outbox.lock();
        assert_eq!(ring.take_next().map(|(_, e)| e.seq), Some(4));
    }

    #[tokio::test]
    async fn a_push_before_the_wait_still_wakes_the_forwarder() {
        let outbox = Outbox::new(NonZeroUsize::new(4).unwrap(), OnFull::DropOldest);
        let mut dev = DeviceEvents::new("axis-1");
        outbox.push(telemetry(&mut dev));
        // The permit stored by notify_one makes this resolve at once.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            outbox.notify().notified(),
        )
        .await
        .expect("the stored permit wakes the waiter");
    }
}
