//! The SocketCAN bus task of servogate: one task owns one CAN interface and drives the
//! bus's [`servogate_canopen::Master`] with the frames it reads and the timers it asks for.
//!
//! The CANopen protocol lives in `servogate-canopen`, with no IO; this crate is the IO: a
//! CAN_RAW socket (opened with the `socketcan` crate, read in batches with `recvmmsg`, each
//! frame with the kernel's receive timestamp and drop counter), tokio readiness and timers, and what a real interface does (error
//! frames, bus-off, ENOBUFS, going down and away).
//!
//! - [`wire`]: `struct can_frame` bytes and error frames, decoded without IO.
//! - [`rx`]: the batched read (`recvmmsg`), its control messages, and the arrival clock.
//! - [`bus`]: [`run_can_bus`], the task, and its [`CanStats`].
//!
//! It does not do CAN FD, 29-bit identifiers (CANopen uses 11-bit ones; such frames are
//! counted and ignored) or bring an interface up: that needs CAP_NET_ADMIN, which the
//! daemon does not have (`ip link set can0 up type can bitrate 500000 restart-ms 100`).
// Three `unsafe` blocks, each with its safety argument beside it: registering the socket
// with tokio, and `recvmmsg` (its zeroed headers and the call).
#![deny(unsafe_code)]

pub mod bus;
pub mod rx;
pub mod wire;

pub use bus::{
    fixed_nodes, no_can_orders, run_can_bus, CanBusSettings, CanOrder, CanOrders, CanStats,
    NodeList,
};
