//! Modbus RTU for servogate.
//!
//! - [`profile`]: register maps and value decoding (all data types, word/byte order,
//!   scale and offset).
//! - [`plan`]: merging a device's fields into as few reads as possible, with
//!   split-and-remember on Illegal Data Address.
//! - [`poll`]: the sans-IO state of one polled device: schedule, back-off, availability,
//!   lateness, and the events each outcome produces.
//! - [`line`]: the RTU line discipline around the serial port (discard stale input before
//!   each request, check each reply's unit, length and CRC as it arrives).
//! - [`command`]: commands as jobs of writes and statusword reads, sans-IO.
//! - [`bus`]: the one task that owns a serial port and schedules every device on it.
//!
//! Everything but `line`, `bus` and `timing` is plain logic with time passed in.
//! This crate does not publish anything: events go to an [`servogate_core::EventSink`].
#![deny(unsafe_code)] // one audited exception: timing::PreciseTimer::new

pub mod bus;
pub mod command;
pub mod crc;
pub mod line;
pub mod mbap;
pub mod plan;
pub mod poll;
pub mod profile;
pub mod tcp;
pub mod timing;
