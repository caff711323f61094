//! servogate's MQTT side (DESIGN.md sections 3 and 4).
//!
//! - [`Outbox`]: the bounded delivery ring shared by the bus tasks and the forwarder; a
//!   push never waits, overflow is counted.
//! - [`payload`]: topics and JSON payloads of the MQTT contract v1 (pure functions).
//! - [`Feed`]: what the forwarder publishes from (the ring, or the daemon's event log),
//!   messages [`Prepared`] with topic, payload and [`Kind`].
//! - [`Forwarder`] / [`run`]: publishes the ring to the broker with rumqttc and removes an
//!   event only once the broker acknowledged it; re-publishes everything unacknowledged
//!   after a new session (rumqttc 0.25 discards it), re-sends the birth, meta and last
//!   availability on every connect, and reconnects with capped jittered backoff.
//! - [`MqttSettings`]: url, TLS files, credentials and limits, validated up front.
#![forbid(unsafe_code)]

pub mod batch;
mod feed;
mod forwarder;
mod outbox;
pub mod payload;
mod session;
mod settings;
pub mod wire;

pub use batch::Batching;
pub use feed::{Feed, Kind, Prepared};
pub use forwarder::{
    run, Forwarder, ForwarderReport, Incoming, Intake, MqttStats, MqttStatsSnapshot, MAX_IN_FLIGHT,
};
pub use outbox::Outbox;
pub use payload::DeviceMeta;
pub use session::{Control, JsonSession, Session};
pub use settings::{
    parse_url, tls_client_config, BrokerUrl, Credentials, MqttError, MqttSettings, TlsFiles,
};
pub use wire::Version;
