//! What a connection says besides the events of its feed: its Last Will, the messages that
//! open every new session (a birth), what a changed device list makes it say, and its
//! farewell. The JSON contract's is [`JsonSession`] (DESIGN.md section 3); the Sparkplug
//! edge node's lives in the daemon and plugs in the same way, so both contracts share one
//! forwarder (its window, acknowledgements, reconnects and hand-over).

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use rumqttc::QoS;

use crate::payload::{self, DeviceMeta, DeviceTopic};
use crate::wire::Will;

/// A message of the session itself (not of the feed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
}

impl Control {
    /// QoS 1 and retained: the JSON contract's birth, meta and availability.
    pub fn retained(topic: String, payload: Vec<u8>) -> Self {
        Self {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain: true,
        }
    }
}

/// A contract's side of a connection. Called under a lock by the forwarder's two tasks:
/// [`Session::will`] by the event loop task before each connection attempt, the rest by
/// the publisher. Nothing here may block.
pub trait Session: Send {
    /// The Last Will for the next connection attempt (called before every attempt, the
    /// first included).
    fn will(&mut self) -> Will;
    /// A new session was accepted: the messages that open it, in order, go to `out`.
    /// `closing`: the forwarder is shutting down (no birth then).
    fn opening(&mut self, closing: bool, out: &mut VecDeque<Control>);
    /// The device list changed (a reload): what that must say goes to `out`.
    fn devices(&mut self, list: &[DeviceMeta], out: &mut VecDeque<Control>);
    /// A retained feed message of `device` was handed to the broker.
    fn retained(&mut self, _device: &str, _topic: &str, _payload: &[u8]) {}
    /// Asked after the forwarder's nudge was notified: what is due now (a rebirth).
    fn due(&mut self, _out: &mut VecDeque<Control>) {}
    /// The last message of a clean shutdown (the forwarder waits for its acknowledgement).
    fn farewell(&mut self) -> Control;
    /// The farewell goes after the feed drained (at once when handing over) and nothing
    /// goes after it (a Sparkplug NDEATH). Otherwise it goes first and the feed drains
    /// behind it (the JSON contract's `online:false`).
    fn farewell_last(&self) -> bool {
        false
    }
}

/// The JSON contract: a retained `status` (birth, Will, farewell), each device's retained
/// `meta`, and its last `availability` repeated at every new session.
#[derive(Debug)]
pub struct JsonSession {
    status_topic: String,
    prefix: String,
    boot_id: String,
    version: String,
    /// Durable mode: events of earlier boots the log publishes first.
    recovered: Option<u64>,
    /// (meta topic, meta payload) of every device, by device name.
    metas: BTreeMap<String, (String, Vec<u8>)>,
    /// Last availability published per device, repeated (same payload and seq) after a
    /// reconnect so the retained state survives a broker that lost it.
    availability: BTreeMap<String, (String, Vec<u8>)>,
}

impl JsonSession {
    pub fn new(prefix: &str, boot_id: String, version: String, meta: &[DeviceMeta]) -> Self {
        Self {
            status_topic: payload::status_topic(prefix),
            prefix: prefix.to_owned(),
            boot_id,
            version,
            recovered: None,
            metas: metas_by_device(prefix, meta),
            availability: BTreeMap::new(),
        }
    }

    /// The status says `"recovered":n` (durable mode).
    pub fn recovered(&mut self, n: u64) {
        self.recovered = Some(n);
    }

    fn status(&self, online: bool) -> Vec<u8> {
        payload::encode_status_recovered(
            online,
            &self.boot_id,
            &self.version,
            SystemTime::now(),
            self.recovered,
        )
    }
}

impl Session for JsonSession {
    fn will(&mut self) -> Will {
        // The will's timestamp says when it was registered: fresh per attempt.
        Will {
            topic: self.status_topic.clone(),
            payload: self.status(false),
            retain: true,
        }
    }

    /// Birth, every meta and every known availability, retained.
    fn opening(&mut self, closing: bool, out: &mut VecDeque<Control>) {
        if !closing {
            out.push_back(Control::retained(
                self.status_topic.clone(),
                self.status(true),
            ));
        }
        for (topic, payload) in self.metas.values().chain(self.availability.values()) {
            out.push_back(Control::retained(topic.clone(), payload.clone()));
        }
    }

    /// A new or changed device's meta goes out (retained), and a device no longer listed
    /// has its retained meta and availability cleared (an empty retained message), so
    /// subscribers stop seeing it.
    fn devices(&mut self, list: &[DeviceMeta], out: &mut VecDeque<Control>) {
        let fresh = metas_by_device(&self.prefix, list);
        for (name, (topic, _)) in &self.metas {
            if !fresh.contains_key(name) {
                tracing::info!(device = %name, "device removed: clearing its retained topics");
                out.push_back(Control::retained(topic.clone(), Vec::new()));
                let availability =
                    payload::device_topic(&self.prefix, name, DeviceTopic::Availability);
                out.push_back(Control::retained(availability, Vec::new()));
                self.availability.remove(name);
            }
        }
        for (name, meta) in &fresh {
            if self.metas.get(name) != Some(meta) {
                out.push_back(Control::retained(meta.0.clone(), meta.1.clone()));
            }
        }
        self.metas = fresh;
    }

    /// The last availability, repeated at the next session.
    fn retained(&mut self, device: &str, topic: &str, payload: &[u8]) {
        self.availability
            .insert(device.to_owned(), (topic.to_owned(), payload.to_vec()));
    }

    fn farewell(&mut self) -> Control {
        Control::retained(self.status_topic.clone(), self.status(false))
    }
}

/// (meta topic, meta payload) of each device, by device name.
fn metas_by_device(prefix: &str, meta: &[DeviceMeta]) -> BTreeMap<String, (String, Vec<u8>)> {
    meta.iter()
        .map(|m| {
            let topic = payload::device_topic(prefix, &m.name, DeviceTopic::Meta);
            (m.name.clone(), (topic, payload::encode_meta(m)))
        })
        .collect()
}
