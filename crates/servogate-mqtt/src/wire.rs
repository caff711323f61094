//! MQTT 3.1.1 and MQTT 5 behind one face, so the forwarder's delivery logic is written
//! once (DESIGN.md section 4 holds on both versions).
//!
//! rumqttc 0.25 has two separate stacks (`rumqttc` and `rumqttc::v5`) with the same shape:
//! an `AsyncClient` feeding a request channel and an `EventLoop` the caller polls. Their
//! packets differ (v5 has properties and reason codes), so [`Conn::poll`] turns each event
//! into the few [`Ev`]s the forwarder acts on, and [`Client`] hands requests to either.
//! Everything else of a v5 packet is dropped here, on purpose.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::{v5 as p5, QoS as QoS5};
use rumqttc::{Outgoing, QoS};
use servogate_core::ReplyTo;

use crate::forwarder::Incoming;

/// The MQTT version the gateway speaks to its broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4), the default.
    #[default]
    V311,
    /// MQTT 5.
    V5,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// What the forwarder acts on, from either version's event loop.
#[derive(Debug)]
pub enum Ev {
    /// The broker accepted the connection. `alias_max`: the Topic Alias Maximum it
    /// granted (0 on 3.1.1).
    ConnAck {
        session_present: bool,
        alias_max: u16,
    },
    /// A publish went on the wire with this packet id (0: QoS 0).
    OutPublish(u16),
    /// rumqttc held a publish back on a packet id collision.
    AwaitAck(u16),
    /// A PUBACK; `refused` names the MQTT 5 reason code when the broker refused the
    /// message (it is then not delivered to anyone).
    PubAck {
        pkid: u16,
        refused: Option<&'static str>,
    },
    /// A message on one of our subscriptions.
    Publish(Incoming),
    /// A message on one of our subscriptions that cannot be a command (its topic is not
    /// UTF-8): counted by the caller.
    Unreadable,
    /// DISCONNECT was written.
    OutDisconnect,
    Other,
}

/// A failed poll: the connection is gone (or could not be made).
#[derive(Debug)]
pub struct PollError {
    pub message: String,
    /// The client side is gone: no request can ever come again.
    pub requests_done: bool,
}

/// The Last Will: always QoS 1.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// MQTT 5 properties of one outgoing publish (ignored on 3.1.1).
#[derive(Debug, Clone, Default)]
pub struct Props {
    pub alias: Option<u16>,
    pub correlation: Option<Vec<u8>>,
    /// User Properties, in order.
    pub user: Vec<(String, String)>,
}

impl Props {
    /// Bytes these properties add to a v5 PUBLISH, with the property length itself.
    pub fn wire_len(&self) -> usize {
        let props = self.alias.map_or(0, |_| 3)
            + self.correlation.as_ref().map_or(0, |c| 3 + c.len())
            + self
                .user
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>();
        props + varint_len(props)
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn qos5(q: QoS) -> QoS5 {
    match q {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn props5(props: Props) -> p5::PublishProperties {
    p5::PublishProperties {
        topic_alias: props.alias,
        correlation_data: props.correlation.map(Bytes::from),
        user_properties: props.user,
        ..Default::default()
    }
}

/// The request side of a connection.
#[derive(Clone, Debug)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl Client {
    /// Queues a publish without waiting; the error says why it was not taken.
    pub fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        props: Props,
    ) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, qos, retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let properties = props5(props);
                c.try_publish_with_properties(topic, qos5(qos), retain, payload, properties)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Queues a publish, waiting while the request channel is full (for senders that
    /// must be paced by the connection, such as a replay).
    pub async fn publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        props: Props,
    ) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .publish(topic, qos, retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let properties = props5(props);
                c.publish_with_properties(topic, qos5(qos), retain, payload, properties)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Subscribes at QoS 1. On MQTT 5 with Retain As Published, so a command published
    /// with the retain flag keeps it even when it reaches us live, and is refused as
    /// retained; MQTT 3.1.1 brokers clear the flag on live delivery (only a message from
    /// the retained store, at a new subscription, carries it there).
    pub fn try_subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe(filter, QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let mut f = p5::Filter::new(filter, QoS5::AtLeastOnce);
                f.preserve_retain = true;
                c.try_subscribe_many([f]).map_err(|e| e.to_string())
            }
        }
    }

    pub fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

/// The event loop side of a connection.
/// Both boxed: the event loops are large (about 1 KiB) and of different sizes, and a
/// `Conn` lives once per connection.
pub enum Conn {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

impl Conn {
    /// Turns Nagle off (see the forwarder: a PUBACK would otherwise wait ~40 ms).
    pub fn set_nodelay(&mut self) {
        match self {
            Conn::V4(el) => {
                let mut network = el.network_options();
                network.set_tcp_nodelay(true);
                el.set_network_options(network);
            }
            Conn::V5(el) => {
                let mut network = el.options.network_options();
                network.set_tcp_nodelay(true);
                el.options.set_network_options(network);
            }
        }
    }

    /// The next event; cancellation-safe as rumqttc's own `poll`.
    pub async fn poll(&mut self) -> Result<Ev, PollError> {
        match self {
            Conn::V4(el) => match el.poll().await {
                Ok(event) => Ok(ev4(event)),
                Err(e) => Err(PollError {
                    requests_done: matches!(e, rumqttc::ConnectionError::RequestsDone),
                    message: e.to_string(),
                }),
            },
            Conn::V5(el) => match el.poll().await {
                Ok(event) => Ok(ev5(event)),
                Err(e) => Err(PollError {
                    requests_done: matches!(e, v5::ConnectionError::RequestsDone),
                    message: e.to_string(),
                }),
            },
        }
    }

    /// Forgets requests rumqttc kept from an earlier session (they must not be sent: the
    /// forwarder publishes them again from its feed).
    pub fn clear_pending(&mut self) {
        match self {
            Conn::V4(el) => el.pending.clear(),
            Conn::V5(el) => el.pending.clear(),
        }
    }

    /// After a failed poll: returns the events rumqttc had read but not yet yielded
    /// (PUBACKs of the same batch are genuine), then drops everything of the lost
    /// connection, the request channel included, and starts from a fresh state.
    pub fn reset(&mut self) -> Vec<Ev> {
        match self {
            Conn::V4(el) => {
                let stale = el.state.events.drain(..).map(ev4).collect();
                el.clean();
                el.pending.clear();
                let o = &el.mqtt_options;
                el.state = rumqttc::MqttState::new(o.inflight(), o.manual_acks());
                stale
            }
            Conn::V5(el) => {
                let stale = el.state.events.drain(..).map(ev5).collect();
                el.clean();
                el.pending.clear();
                let o = &el.options;
                let limit = o.get_outgoing_inflight_upper_limit().unwrap_or(u16::MAX);
                el.state = v5::MqttState::new(limit, o.manual_acks());
                stale
            }
        }
    }

    /// The Will for the next connection attempt.
    pub fn set_will(&mut self, will: Will) {
        match self {
            Conn::V4(el) => {
                el.mqtt_options.set_last_will(will4(will));
            }
            Conn::V5(el) => {
                el.options.set_last_will(will5(will));
            }
        }
    }
}

pub fn will4(w: Will) -> rumqttc::LastWill {
    rumqttc::LastWill::new(w.topic, w.payload, QoS::AtLeastOnce, w.retain)
}

pub fn will5(w: Will) -> p5::LastWill {
    p5::LastWill::new(w.topic, w.payload, QoS5::AtLeastOnce, w.retain, None)
}

fn ev4(event: rumqttc::Event) -> Ev {
    use rumqttc::{Event, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => Ev::ConnAck {
            session_present: ack.session_present,
            alias_max: 0,
        },
        Event::Incoming(Packet::PubAck(ack)) => Ev::PubAck {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Incoming {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
            received: SystemTime::now(),
            at: std::time::Instant::now(),
            reply: None,
            expiry: None,
        }),
        Event::Outgoing(o) => out(o),
        _ => Ev::Other,
    }
}

fn ev5(event: v5::Event) -> Ev {
    use v5::Event;
    match event {
        Event::Incoming(p5::Packet::ConnAck(ack)) => Ev::ConnAck {
            session_present: ack.session_present,
            alias_max: ack.properties.and_then(|p| p.topic_alias_max).unwrap_or(0),
        },
        Event::Incoming(p5::Packet::PubAck(ack)) => Ev::PubAck {
            pkid: ack.pkid,
            refused: refusal(ack.reason),
        },
        Event::Incoming(p5::Packet::Publish(p)) => incoming5(p),
        Event::Outgoing(o) => out(o),
        _ => Ev::Other,
    }
}

fn out(o: Outgoing) -> Ev {
    match o {
        Outgoing::Publish(pkid) => Ev::OutPublish(pkid),
        Outgoing::AwaitAck(pkid) => Ev::AwaitAck(pkid),
        Outgoing::Disconnect => Ev::OutDisconnect,
        _ => Ev::Other,
    }
}

/// The reason a v5 PUBACK refused a message; `None` when it was accepted.
fn refusal(reason: p5::PubAckReason) -> Option<&'static str> {
    use p5::PubAckReason as R;
    Some(match reason {
        R::Success | R::NoMatchingSubscribers => return None,
        R::UnspecifiedError => "unspecified_error",
        R::ImplementationSpecificError => "implementation_specific_error",
        R::NotAuthorized => "not_authorized",
        R::TopicNameInvalid => "topic_name_invalid",
        R::PacketIdentifierInUse => "packet_identifier_in_use",
        R::QuotaExceeded => "quota_exceeded",
        R::PayloadFormatInvalid => "payload_format_invalid",
    })
}

/// An incoming v5 publish: its Response Topic, Correlation Data and the Message Expiry
/// left (the broker has already taken off the time it held the message).
fn incoming5(p: p5::Publish) -> Ev {
    let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
        return Ev::Unreadable;
    };
    let (reply, expiry) = match p.properties {
        Some(props) => {
            let reply = props
                .response_topic
                .filter(|t| response_topic_ok(t))
                .map(|topic| {
                    Arc::new(ReplyTo {
                        topic,
                        correlation: props.correlation_data.map(|c| c.to_vec()),
                    })
                });
            let expiry = props
                .message_expiry_interval
                .map(|s| Duration::from_secs(u64::from(s)));
            (reply, expiry)
        }
        None => (None, None),
    };
    Ev::Publish(Incoming {
        topic,
        payload: p.payload,
        retain: p.retain,
        received: SystemTime::now(),
        at: std::time::Instant::now(),
        reply,
        expiry,
    })
}

/// A Response Topic we can publish to: a topic name (no wildcards), not empty, no NUL.
/// A bad one is ignored (the result still goes to the result topic).
fn response_topic_ok(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#', '\0']) && t.len() <= usize::from(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v5_command_keeps_its_response_topic_correlation_and_expiry() {
        let props = p5::PublishProperties {
            message_expiry_interval: Some(3),
            response_topic: Some("app/replies/7".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01req")),
            ..Default::default()
        };
        let p = p5::Publish::new("gw/devices/a/cmd", QoS5::AtLeastOnce, "{}", Some(props));
        let Ev::Publish(i) = incoming5(p) else {
            panic!("not a publish")
        };
        let reply = i.reply.expect("reply");
        assert_eq!(reply.topic, "app/replies/7");
        assert_eq!(reply.correlation.as_deref(), Some(&b"\x00\x01req"[..]));
        assert_eq!(i.expiry, Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_wildcard_response_topic_is_ignored_and_a_non_utf8_topic_is_unreadable() {
        let props = p5::PublishProperties {
            response_topic: Some("app/#".into()),
            ..Default::default()
        };
        let p = p5::Publish::new("gw/devices/a/cmd", QoS5::AtLeastOnce, "{}", Some(props));
        let Ev::Publish(i) = incoming5(p) else {
            panic!("not a publish")
        };
        assert!(i.reply.is_none());
        let mut p = p5::Publish::new("x", QoS5::AtLeastOnce, "{}", None);
        p.topic = Bytes::from_static(b"\xff\xfe");
        assert!(matches!(incoming5(p), Ev::Unreadable));
    }

    #[test]
    fn refusing_reason_codes_are_named_and_success_codes_are_not_refusals() {
        use p5::PubAckReason as R;
        assert_eq!(refusal(R::Success), None);
        assert_eq!(refusal(R::NoMatchingSubscribers), None);
        assert_eq!(refusal(R::NotAuthorized), Some("not_authorized"));
        assert_eq!(refusal(R::QuotaExceeded), Some("quota_exceeded"));
    }

    #[test]
    fn property_bytes_count_alias_correlation_and_their_length_prefix() {
        assert_eq!(Props::default().wire_len(), 1);
        let p = Props {
            alias: Some(4),
            correlation: Some(vec![0; 10]),
            user: vec![("topic".into(), "a/b".into())],
        };
        assert_eq!(p.wire_len(), 1 + 3 + 13 + 5 + 5 + 3);
    }
}
