//! The servogate daemon as a library, so the binary stays a thin command line.
//!
//! - [`config`]: the TOML file, validated as a whole before any port opens.
//! - [`app`]: `servogate run`: bus tasks, the ring and the forwarder, and their shutdown.
//! - [`commands`]: the command desk: `cmd` topics -> policy -> bus inboxes -> results.
//! - [`demo`]: `servogate demo`: the pipeline on simulated axes, in one process.
//! - [`flight`]: `servogate log`: the event log read offline, filtered, as JSON lines or CSV.
//! - [`replay`]: replay over MQTT from the event log, on a connection of its own.
//! - [`store`]: durable mode: the event log on disk between the ring and the forwarder.
//! - [`logging`]: tracing, with tokio-modbus's `log` records bridged in.
//! - [`systemd`]: READY / WATCHDOG / STOPPING / STATUS for `Type=notify`.
//!
//! Architecture invariant: only this crate reads files, the environment and signals.

pub mod app;
pub mod cmd;
pub mod commands;
pub mod config;
pub mod demo;
pub mod flight;
pub mod logging;
pub mod metrics;
pub mod replay;
pub mod sparkplug;
pub mod store;
pub mod systemd;

/// The error of a bad command-line argument (exit 64, EX_USAGE), apart from a failure at
/// run time (exit 70): a subcommand returns it inside its `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);
