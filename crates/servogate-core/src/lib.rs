//! The heart of servogate that knows nothing of buses or brokers.
//!
//! - [`event`]: typed events (telemetry, availability, events, command results) with a
//!   per-(device, stream) sequence number, the acquisition time and a quality.
//! - [`cia402`]: CiA 402 statusword decoding into the drive state.
//! - [`command`]: command results (status, reason), the answer every command gets.
//! - [`histogram`]: a lock-free latency histogram that bus tasks fill and the metrics
//!   endpoint reads.
//! - [`ring`]: the bounded delivery ring: `drop_oldest` on overflow with an exact drop
//!   count, and an entry leaves only once the broker acknowledged it.
//!
//! This crate does no IO, spawns nothing and never reads the clock: time is passed in.
#![forbid(unsafe_code)]

pub mod cia402;
pub mod command;
pub mod event;
pub mod histogram;
pub mod ring;

pub use cia402::DriveState;
pub use command::{CommandReason, CommandReport, CommandStatus, MemberResult, ReplyTo};
pub use event::{
    Availability, AvailabilityState, DeviceEvents, Event, EventBody, EventKind, EventSink, Notice,
    Quality, QualityReason, SeqBook, SeqCounters, Stream, Telemetry,
};
pub use histogram::{Histogram, HistogramSnapshot};
pub use ring::{OnFull, Ring, RingStats};
