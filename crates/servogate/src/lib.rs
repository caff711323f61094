//! The servogate daemon as a library: config, wiring, demo.

pub mod config;
