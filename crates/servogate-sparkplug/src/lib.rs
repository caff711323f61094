//! Sparkplug B 3.0 for servogate (DESIGN.md section 10), sans-IO: what an edge node of
//! servo drives sends and what it must keep track of, without an MQTT client.
//!
//! - [`proto`]: the payload's protobuf messages, written from the specification as prost
//!   types (no protoc, no build script).
//! - [`topic`]: the `spBv1.0/...` namespace, built and parsed; id rules.
//! - [`device`]: a drive as a Sparkplug device: metric types from the profile's fields
//!   (scaled = Double, unscaled integers keep their type), units and scales as
//!   properties, `state` and `quality`.
//! - [`node`]: seq (0-255 across the node's messages), bdSeq (NBIRTH = its Will's NDEATH),
//!   aliases unique across the node, and the NBIRTH / NDEATH / DBIRTH / DDATA / DDEATH
//!   payloads.
//!
//! The daemon's wiring (births on connect, DDATA per sample, DCMD through the command
//! policy, rebirth, primary host STATE) builds on these.
#![forbid(unsafe_code)]

pub mod device;
pub mod node;
pub mod proto;
pub mod topic;

pub use node::{Aliases, BdSeq, BirthMetric, Sequence, Value};
pub use proto::{DataType, Metric, MetricValue, Payload, PropertySet};
pub use topic::{MessageType, Topic};
