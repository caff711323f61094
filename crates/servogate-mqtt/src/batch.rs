//! Batching of telemetry (the throughput mode, `[mqtt] batch_max`): several samples of one
//! device in one message, so the cost per message (encoding, the broker, the network) is
//! paid once per batch instead of once per sample. A batch takes only what is queued; the
//! oldest sample waits at most `wait` for the batch to fill, so batching adds at most that
//! much latency. Other events (availability, notices, results) always go alone.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use servogate_core::ring::Id;
use servogate_core::{Event, EventBody, Ring};

/// How many entries past the head a batch looks at for its device's samples (bounds the
/// work of one take on a long backlog).
pub const SCAN: usize = 4096;

/// Several samples of one device per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Samples per message at most (1: no batching).
    pub max: usize,
    /// How long the oldest sample of a batch may wait for it to fill.
    pub wait: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max: 1,
            wait: Duration::from_millis(20),
        }
    }
}

impl Batching {
    pub fn on(&self) -> bool {
        self.max > 1
    }
}

/// The ids of the batches handed and not yet acknowledged, by their first id.
#[derive(Debug, Default)]
pub struct Batches(Mutex<HashMap<Id, Vec<Id>>>);

impl Batches {
    fn lock(&self) -> MutexGuard<'_, HashMap<Id, Vec<Id>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers a batch of several ids.
    pub fn insert(&self, ids: Vec<Id>) {
        if ids.len() > 1 {
            self.lock().insert(ids[0], ids);
        }
    }

    /// Every id `id` stands for (itself unless it begins a batch).
    fn take(&self, id: Id) -> Vec<Id> {
        let mut m = self.lock();
        if m.is_empty() {
            return vec![id];
        }
        m.remove(&id).unwrap_or_else(|| vec![id])
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The broker acknowledged `id`: every entry it stands for goes from `ring`.
    pub fn ack(&self, ring: &mut Ring<Event>, id: Id) {
        for id in self.take(id) {
            ring.ack(id);
        }
    }

    /// `id` goes out again: every entry it stands for is unsent again in `ring`.
    pub fn requeue(&self, ring: &mut Ring<Event>, id: Id) {
        for id in self.take(id) {
            ring.requeue(id);
        }
    }
}

/// A feed's batching state: whether it flushes (no batch waits) and when a waiting batch
/// is due ([`crate::Feed::wake_at`]).
#[derive(Debug, Default)]
pub struct Linger {
    flushing: std::sync::atomic::AtomicBool,
    wake: Mutex<Option<Instant>>,
}

impl Linger {
    pub fn flushing(&self) -> bool {
        self.flushing.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_flushing(&self, on: bool) {
        self.flushing
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A batch waits until `at`.
    pub fn wait_until(&self, at: Instant) {
        *self.wake.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    /// When the waiting batch is due (taken: asked once).
    pub fn wake_at(&self) -> Option<Instant> {
        self.wake
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// What the ring gives for the next message.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// Nothing queued.
    Empty,
    /// A batch is filling: ask again at this instant (or at the next push).
    WaitUntil(Instant),
    /// These entries, in order (one unless a batch); each was shown to the visitor.
    Taken(Vec<Id>),
}

fn telemetry(e: &Event) -> bool {
    matches!(e.body, EventBody::Telemetry(_))
}

/// Takes the next entry of `ring`, and with `batching` on, up to `max - 1` more samples of
/// the same device queued behind it; `visit` sees each taken event in order. `flush`: do
/// not wait for a batch to fill (shutting down).
pub fn take(
    ring: &mut Ring<Event>,
    batching: Batching,
    flush: bool,
    now: SystemTime,
    mut visit: impl FnMut(Id, &Event),
) -> Take {
    let Some((head, e)) = ring.peek_next() else {
        return Take::Empty;
    };
    if !batching.on() || !telemetry(e) {
        let (id, e) = ring.take_next().expect("peeked");
        visit(id, e);
        return Take::Taken(vec![id]);
    }
    let (device, ts) = (e.device.clone(), e.ts);
    let same = |x: &Event| telemetry(x) && x.device == device;
    if !flush {
        let queued = 1 + ring.count_after(head, SCAN, batching.max - 1, same);
        let age = now.duration_since(ts).unwrap_or_default();
        if queued < batching.max && age < batching.wait {
            return Take::WaitUntil(Instant::now() + (batching.wait - age));
        }
    }
    let (id, e) = ring.take_next().expect("peeked");
    visit(id, e);
    let mut ids = vec![id];
    ring.take_after(head, SCAN, batching.max - 1, |id, x| {
        let take = same(x);
        if take {
            visit(id, x);
            ids.push(id);
        }
        take
    });
    Take::Taken(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use servogate_core::{DeviceEvents, OnFull, Telemetry};
    use std::num::NonZeroUsize;

    fn ring_of(devices: &[&str], n: usize, at: SystemTime) -> Ring<Event> {
        let mut r = Ring::new(NonZeroUsize::new(1024).unwrap(), OnFull::DropOldest);
        let mut evs: Vec<DeviceEvents> = devices.iter().map(|d| DeviceEvents::new(*d)).collect();
        for _ in 0..n {
            for d in evs.iter_mut() {
                r.push(d.event(at, EventBody::Telemetry(Telemetry::default())));
            }
        }
        r
    }

    #[test]
    fn a_full_batch_goes_at_once_with_one_devices_samples_in_order() {
        let now = SystemTime::now();
        let mut r = ring_of(&["a", "b"], 5, now);
        let b = Batching {
            max: 4,
            wait: Duration::from_secs(1),
        };
        let mut seen = Vec::new();
        let t = take(&mut r, b, false, now, |_, e| {
            seen.push((e.device.to_string(), e.seq))
        });
        assert!(matches!(t, Take::Taken(ref ids) if ids.len() == 4));
        assert_eq!(
            seen,
            [
                ("a".into(), 1),
                ("a".into(), 2),
                ("a".into(), 3),
                ("a".into(), 4)
            ]
        );
        // b's first batch comes next, then a's last sample waits for its batch to fill.
        seen.clear();
        take(&mut r, b, false, now, |_, e| {
            seen.push((e.device.to_string(), e.seq))
        });
        assert_eq!(seen[0], ("b".into(), 1));
        take(&mut r, b, false, now, |_, _| {});
        assert!(matches!(
            take(&mut r, b, false, now, |_, _| {}),
            Take::WaitUntil(_)
        ));
        // Flushing takes what there is.
        seen.clear();
        take(&mut r, b, true, now, |_, e| {
            seen.push((e.device.to_string(), e.seq))
        });
        assert_eq!(seen, [("a".into(), 5)]);
    }

    #[test]
    fn a_sample_older_than_the_wait_goes_without_a_full_batch() {
        let then = SystemTime::now() - Duration::from_millis(50);
        let mut r = ring_of(&["a"], 2, then);
        let b = Batching {
            max: 10,
            wait: Duration::from_millis(20),
        };
        let t = take(&mut r, b, false, SystemTime::now(), |_, _| {});
        assert!(matches!(t, Take::Taken(ref ids) if ids.len() == 2));
        assert_eq!(
            take(&mut r, b, false, SystemTime::now(), |_, _| {}),
            Take::Empty
        );
    }
}
