//! What the forwarder publishes from: a [`Feed`] of messages in order, each kept until
//! the broker acknowledged it. The in-memory [`crate::Outbox`] is one; the daemon's event
//! log on disk is the other (DESIGN.md section 9).

use std::sync::Arc;

use servogate_core::{Event, EventBody, ReplyTo, RingStats};
use tokio::sync::Notify;

use crate::payload;

/// Which kind of event a message carries: it decides QoS and retain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Telemetry,
    /// Retained, and repeated after a reconnect.
    Availability,
    Notice,
    CommandResult,
    /// A Sparkplug B message: QoS 0, not retained (the specification's rule for every
    /// message of an edge node but its NDEATH).
    Sparkplug,
}

impl Kind {
    pub fn of(body: &EventBody) -> Self {
        match body {
            EventBody::Telemetry(_) => Kind::Telemetry,
            EventBody::Availability(_) => Kind::Availability,
            EventBody::Notice(_) => Kind::Notice,
            EventBody::CommandResult(_) => Kind::CommandResult,
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Kind::Telemetry => 0,
            Kind::Availability => 1,
            Kind::Notice => 2,
            Kind::CommandResult => 3,
            Kind::Sparkplug => 4,
        }
    }

    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Kind::Telemetry,
            1 => Kind::Availability,
            2 => Kind::Notice,
            3 => Kind::CommandResult,
            4 => Kind::Sparkplug,
            _ => return None,
        })
    }
}

/// One message ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub topic: String,
    pub payload: Vec<u8>,
    pub kind: Kind,
    pub device: Arc<str>,
    pub seq: u64,
    /// A command result's MQTT 5 Response Topic (kept in memory only: the result topic
    /// is the durable record).
    pub reply: Option<Arc<ReplyTo>>,
}

impl Prepared {
    /// The message of `event` under `prefix` (the JSON contract).
    pub fn of_event(prefix: &str, event: &Event) -> Self {
        Self {
            topic: payload::event_topic(prefix, event),
            payload: payload::encode_event(event),
            kind: Kind::of(&event.body),
            device: event.device.clone(),
            seq: event.seq,
            reply: match &event.body {
                EventBody::CommandResult(r) => r.reply.clone(),
                _ => None,
            },
        }
    }
}

/// A source of messages for the forwarder, in order, each held until acknowledged.
pub trait Feed: Send + Sync + std::fmt::Debug {
    /// The oldest message not handed out yet (now handed), with its id.
    fn take_next(&self, prefix: &str) -> Option<(u64, Prepared)>;
    /// The broker acknowledged `id` (or it was refused for good): it goes.
    fn ack(&self, id: u64);
    /// `id` was handed but its acknowledgement will not come: it goes out again.
    fn requeue(&self, id: u64);
    /// Every handed message goes out again (a lost connection); how many.
    fn requeue_all(&self) -> usize;
    /// Messages held and not yet acknowledged.
    fn unacked(&self) -> usize;
    /// Messages not handed out yet.
    fn has_unsent(&self) -> bool {
        self.unacked() > 0
    }
    /// Notified when a message arrives.
    fn notify(&self) -> &Notify;
    /// Counters for the forwarder's report.
    fn stats(&self) -> RingStats;
    /// When a batch that is filling is due (`take_next` said nothing although entries
    /// wait): the forwarder asks again then. Taken: a second call says `None`.
    fn wake_at(&self) -> Option<std::time::Instant> {
        None
    }
    /// `true`: from now on nothing waits for a batch to fill (shutting down, handing
    /// over); `false`: batches fill again (a forwarder starts).
    fn flush(&self, _on: bool) {}
}
