//! servosim: simulated servo drives for servogate, so the whole pipeline runs with no
//! motor attached.
//!
//! Two buses, one model. On Modbus, one [`Simulator`] answers every unit id of its
//! [`UnitList`]: as RTU units on one serial port (a pty, or an in-process
//! [`tokio_serial::SerialStream::pair`]), as Modbus TCP units behind one listener
//! (`servosim modbus-tcp`, any number of clients, pipelined requests answered each in its
//! own time), or as RTU units behind a serial device server (`servosim modbus-rtu-tcp`:
//! RTU frames over TCP, one client at a time). On CANopen, one [`canopen::CanSim`] runs CiA 402
//! drive nodes on one SocketCAN interface (`servosim canopen`). Both take their values from
//! a deterministic physical model ([`model::sample`]) that a test can recompute exactly
//! from the model time the simulator reports (registers 0x000A-0x000B; object 0x2000 in
//! TPDO3). Fault injection covers what a gateway must survive: dead or silent units, late
//! replies, CRC noise, CiA 402 drive faults with EMCY, a flooded CAN bus, Modbus writes
//! refused with an exception or left unanswered; a timing-faithful mode charges each RTU
//! transaction its wire time. The Modbus units execute what they are written (CiA 402
//! state machine, profile position and profile velocity) and count every write that
//! reached them, so the gateway's command path can be tested end to end.
//!
//! Main types and functions:
//! - [`model`]: the pure model, the register map ([`model::addr`]) and its encoding
//!   ([`model::registers`], [`model::input_registers`]); [`words`] splits wide values into
//!   registers in either word order.
//! - [`Simulator`]: units, fault injection, counters, and the sans-IO answer to one request
//!   ([`Simulator::handle`]).
//! - [`drive`]: one Modbus unit's drive (written registers, CiA 402, commanded motion);
//!   [`motion`]: constant-velocity segments; [`cia402`]: the state machine both buses
//!   share.
//! - [`serve_rtu`]: the IO loop over any `AsyncRead + AsyncWrite` port.
//! - [`tcp`]: Modbus TCP framing (MBAP) and the listeners: [`serve_tcp`] (Modbus TCP,
//!   [`serve_mbap`] on each connection) and [`serve_rtu_tcp`] (RTU over TCP).
//! - [`rtu`]: server-side RTU framing (request deframing, CRC, reply PDUs).
//! - [`console`]: the stdin commands of `servosim modbus-rtu`, `modbus-tcp` and
//!   `modbus-rtu-tcp`.
//! - [`canopen`]: `servosim canopen`: the sans-IO CANopen core ([`canopen::CanSim`]: NMT,
//!   heartbeat, SDO server, TPDOs, EMCY, the CiA 402 state machine), its SocketCAN task
//!   ([`canopen::serve_can`]) and its console.
//!
//! It does not do: coils or discrete inputs, acceleration ramps, homing, CANopen SDO
//! block transfer, RPDOs or node guarding, CRC noise on Modbus TCP (no CRC there), or the
//! Modbus TCP server's own unit id (unit 0 is a broadcast, as on RTU, and unanswered).
//! tokio-modbus's servers are not used: in 0.17 the RTU one accepts only a `SerialStream`
//! and hides its codec, while CRC noise and wire-time delays need the reply bytes and the
//! request's arrival time, and the TCP one answers a connection's requests one after the
//! other, where a late unit must not hold back the others; the client side of
//! tokio-modbus is what the tests talk to. Likewise the CANopen side has its own SDO server and framing, not
//! servogate-canopen's, so it checks the gateway rather than mirroring it.
#![forbid(unsafe_code)]

pub mod canopen;
pub mod cia402;
pub mod console;
pub mod drive;
pub mod model;
pub mod motion;
pub mod rtu;
mod serve;
mod sim;
pub mod tcp;
pub mod units;
pub mod words;

pub use serve::{serve_rtu, SILENCE};
pub use sim::{faithful_delay, Reply, SimOptions, Simulator, Stats, Timing, Truth, UnitStats};
pub use tcp::{serve_mbap, serve_rtu_tcp, serve_tcp};
pub use units::UnitList;

/// Errors of the simulator's controls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The unit id is not one this simulator serves.
    #[error("unit {0} is not simulated")]
    UnknownUnit(u8),
    /// The CANopen node id is not one this simulator runs.
    #[error("node {0} is not simulated")]
    UnknownNode(u8),
    /// A unit list that cannot be parsed or holds an invalid id.
    #[error("bad unit list {0}")]
    BadUnitList(String),
}
