//! servosim: simulated servo drives for servogate, so the whole pipeline runs with no
//! motor attached.
//!
//! One [`Simulator`] answers every Modbus RTU unit id of its [`UnitList`] on one serial
//! port (a pty, or an in-process [`tokio_serial::SerialStream::pair`]), with values from
//! a deterministic physical model ([`model::sample`]) that a test can recompute exactly
//! from the model time the simulator reports in registers 0x000A-0x000B. Fault injection
//! covers what a gateway must survive: dead units, late replies, CRC noise and CiA 402
//! drive faults; a timing-faithful mode charges each transaction its wire time.
//!
//! Main types and functions:
//! - [`model`]: the pure model, the register map ([`model::addr`]) and its encoding
//!   ([`model::registers`], [`model::input_registers`]); [`words`] splits wide values into
//!   registers in either word order.
//! - [`Simulator`]: units, fault injection, counters, and the sans-IO answer to one request
//!   ([`Simulator::handle`]).
//! - [`serve_rtu`]: the IO loop over any `AsyncRead + AsyncWrite` port.
//! - [`rtu`]: server-side RTU framing (request deframing, CRC, reply PDUs).
//! - [`console`]: the stdin commands of the `servosim` binary.
//!
//! It does not do: Modbus TCP, coils or discrete inputs, the CiA 402 state machine driven
//! by the controlword (writes are stored, not acted on), or CANopen (a later
//! `servosim canopen`). tokio-modbus's RTU server is not used: in 0.17 it accepts only a
//! `SerialStream` and hides its codec, while CRC noise and wire-time delays need the reply
//! bytes and the request's arrival time; the client side of tokio-modbus is what the
//! tests talk to.
#![forbid(unsafe_code)]

pub mod console;
pub mod model;
pub mod rtu;
mod serve;
mod sim;
pub mod units;
pub mod words;

pub use serve::{serve_rtu, SILENCE};
pub use sim::{faithful_delay, Reply, SimOptions, Simulator, Stats, Timing, Truth, UnitStats};
pub use units::UnitList;

/// Errors of the simulator's controls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The unit id is not one this simulator serves.
    #[error("unit {0} is not simulated")]
    UnknownUnit(u8),
    /// A unit list that cannot be parsed or holds an invalid id.
    #[error("bad unit list {0}")]
    BadUnitList(String),
}
