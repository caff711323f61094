//! A sans-IO CANopen master core (CiA 301 communication, CiA 402 drive objects).
//!
//! This crate does no IO: it opens no socket, spawns nothing and never reads a clock.
//! Frames come in as [`Frame`] values with the current [`std::time::Instant`]; what must go
//! out is returned as frames; `poll_timeout` says when to call `handle_timeout` next. The
//! bus task owns the SocketCAN socket and the timers (quinn-proto's shape).
//!
//! - [`frame`]: the [`Frame`] type (11-bit id, up to 8 data bytes), [`NodeId`] and the
//!   CiA 301 predefined connection set (COB-IDs).
//! - [`nmt`]: NMT commands, boot-up detection and a [`nmt::NodeTable`] that (re)starts the
//!   configured nodes.
//! - [`heartbeat`]: the heartbeat consumer (`offline` after 1.5 x producer time).
//! - [`emcy`]: EMCY decoding into fault / fault-cleared transitions per node.
//! - [`sdo`]: the SDO client of one node (expedited and segmented upload and download,
//!   abort codes, timeouts).
//! - [`objects`]: the named, typed, scaled objects of a drive (the `cia402` profile plus
//!   what the config adds).
//! - [`pdo`]: TPDO mappings (from config or the 0x1A00.. objects) and decoding of each
//!   transmission cycle into one [`servogate_core::Telemetry`].
//! - [`sync`]: the SYNC frame and an optional SYNC producer.
//! - [`rpdo`]: the check of the RPDO a group start goes through (the controlword alone,
//!   synchronous).
//! - [`command`]: commands (`servogate_command::Order`) as jobs of SDO downloads confirmed
//!   on the statusword; the master runs them ahead of its own SDO jobs.
//! - [`master`]: all of the above for one bus, producing typed events into a
//!   [`servogate_core::EventSink`].
#![forbid(unsafe_code)]

pub mod command;
pub mod emcy;
pub mod frame;
pub mod heartbeat;
pub mod master;
pub mod nmt;
pub mod objects;
pub mod pdo;
pub mod rpdo;
pub mod sdo;
pub mod sync;

pub use frame::{CobKind, Frame, NodeId};
pub use master::{Master, MasterStats, NodeSettings, SdoPoll, SdoResult, TpdoSource};
pub use objects::{ObjType, ObjectSpec, ObjectTable};
