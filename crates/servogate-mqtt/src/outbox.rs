//! The delivery ring shared by the bus tasks (producers) and the forwarder (consumer).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use servogate_core::{Event, EventSink, OnFull, Ring, RingStats};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

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
}

impl Outbox {
    /// Creates the outbox; the ring reserves all its storage here, once.
    pub fn new(capacity: NonZeroUsize, on_full: OnFull) -> Arc<Outbox> {
        Arc::new(Outbox {
            ring: Mutex::new(Ring::new(capacity, on_full)),
            notify: Notify::new(),
        })
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
    pub(crate) fn lock(&self) -> MutexGuard<'_, Ring<Event>> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves after the next push (or at once if a push happened since the last wait).
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
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
        tokio::time::timeout(std::time::Duration::from_secs(5), outbox.notified())
            .await
            .expect("the stored permit wakes the waiter");
    }
}
