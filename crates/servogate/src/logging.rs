//! Logs through `tracing`, with the `log` records of tokio-modbus bridged in.
//!
//! Under systemd (stderr connected to the journal, which systemd says with
//! `JOURNAL_STREAM`), lines carry no timestamp of their own, since journald stamps each
//! line, and no colours. Elsewhere: a timestamp, and colours only on a terminal.
//!
//! The level comes from `RUST_LOG` when it is set, else from the config's `gateway.log`;
//! a reload (SIGHUP) applies a changed `gateway.log` through [`set_level`].

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer as _, Registry};

/// Set once by [`init`] when the filter came from the config (not from `RUST_LOG`).
static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the subscriber. `RUST_LOG` wins over `level` (the config's `gateway.log`).
pub fn init(level: Option<&str>) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_set = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level.unwrap_or("info")).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let lines = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    let lines = if journal {
        lines.without_time().boxed()
    } else {
        lines.boxed()
    };
    // `try_init` also installs the `log` bridge (tracing-subscriber's tracing-log
    // feature), so tokio-modbus's dropped-frame messages reach us. It fails only if a
    // subscriber is already set, as in tests: keep that one.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init();
    if installed.is_ok() && !env_set {
        let _ = RELOAD.set(handle);
    }
}

/// Applies a new log filter (the config's `gateway.log` after a reload). Does nothing
/// when `RUST_LOG` chose the filter, or when no subscriber of ours is installed.
pub fn set_level(filter: &str) -> Result<(), String> {
    let Some(handle) = RELOAD.get() else {
        return Ok(());
    };
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())
}
