//! Logs through `tracing`, with the `log` records of tokio-modbus bridged in.
//!
//! Under systemd (stderr connected to the journal, which systemd says with
//! `JOURNAL_STREAM`), lines carry no timestamp of their own, since journald stamps each
//! line, and no colours. Elsewhere: a timestamp, and colours only on a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the subscriber. `RUST_LOG` wins over `level` (the config's `gateway.log`).
pub fn init(level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // `try_init` also installs the `log` bridge (tracing-subscriber's tracing-log
    // feature), so tokio-modbus's dropped-frame messages reach us. It fails only if a
    // subscriber is already set, as in tests: keep that one.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    let _ = if journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}
