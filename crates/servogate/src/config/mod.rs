//! The configuration file (DESIGN.md section 6): parsed, then validated as a whole before
//! anything opens a port.
//!
//! Every error names the file, line, column and key, on one line:
//!
//! ```text
//! configs/bad.toml:14:9: devices[2].bus: no bus named "rs485-b" (buses: rs485-a)
//! ```
//!
//! Parsing goes through `serde` with `deny_unknown_fields` into raw structs whose values
//! keep their byte spans (`toml::Spanned`). The checks serde cannot do (references,
//! ranges, durations, uniqueness) know the key path they check and take the position from
//! the span. toml's own errors (syntax, unknown keys, wrong types) carry a span but not the
//! key path, so for those the path is recovered from the text around the span.
//!
//! [`Config`] is plain data: durations are parsed, defaults filled in, references resolved.
//! [`Config::rtu_buses`] turns it into the settings `servogate_modbus::bus::run_bus` takes.
//!
//! The files, by what a reader looks for:
//! - `raw.rs`: the serde structs, as written (spans kept);
//! - `model.rs`: the validated types ([`Config`], [`Device`], [`Bus`], ...);
//! - `source.rs`: positions from spans, durations, and `validate`, which calls each
//!   section in turn;
//! - one file per section, each with its defaults (named constants) and its checks:
//!   `gateway.rs`, `mqtt.rs`, `buffer.rs`, `profiles.rs`, `buses.rs`, `devices.rs`
//!   (with `can_device.rs` for the CANopen part of a device), `metrics.rs`;
//! - `lower.rs`: the protocol crates' settings from a [`Config`];
//! - `summary.rs`: what `servogate check` prints;
//! - `error.rs`: [`ConfigError`], its rendering, and the key paths of toml's own errors.
//!
//! A new section is a new file with an `impl Source<'_>` block holding its check, a field
//! in its raw struct (`raw.rs`) and in its model type, and one call where its parent is
//! validated (`Source::validate` for a top-level table, `Source::device` for a key of
//! `[[devices]]`).

mod buffer;
mod buses;
mod can_device;
mod commands;
mod devices;
mod error;
#[cfg(test)]
mod fixture;
mod gateway;
mod lower;
mod metrics;
mod model;
mod mqtt;
mod profiles;
mod raw;
mod source;
mod sparkplug;
mod summary;

use std::path::Path;

pub use commands::Commands;
pub use error::ConfigError;
pub use model::{
    Buffer, Bus, BusKind, CanBus, CanDevice, Config, Contract, Device, DeviceAddress, Gateway,
    Link, LogSettings, Metrics, ModbusBus, MqttConfig, Sparkplug, CIA402,
};

use error::friendly;
use raw::RawConfig;
use source::Source;

/// Reads and validates `path`. Nothing is opened but the file itself.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        key: None,
        message: format!("cannot read the config file: {e}"),
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
            // Offsets in `lossy` equal those of the bytes up to the first bad byte.
            return Err(Source::new(path, &lossy).error(
                at..at,
                None,
                "the file is not valid UTF-8".to_owned(),
            ));
        }
    };
    parse(&text, path)
}

/// Validates `text`, naming `file` in errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let src = Source::new(file, text);
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = friendly(e.message().trim_end()).replace('\n', " ");
        let span = e.span().unwrap_or(0..0);
        let key = src.key_at(span.start);
        src.error(span, key, message)
    })?;
    src.validate(raw)
}

/// Reads an MQTT credentials file: `username:password` on one line, or the username and
/// the password on two lines (the password may then contain anything, `:` included).
/// Blank lines are ignored; the username is trimmed, the password kept as written.
/// Errors name the file and never contain the file's content.
pub fn read_credentials(path: &Path) -> Result<(String, String), ConfigError> {
    let fail = |message: &str| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        key: None,
        message: format!("MQTT credentials file: {message}"),
    };
    let bytes = std::fs::read(path).map_err(|e| fail(&format!("cannot read it: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| fail("it is not valid UTF-8"))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let (user, pass) = match lines.as_slice() {
        [one] => one
            .split_once(':')
            .ok_or_else(|| fail("expected `username:password` on one line (no `:` found)"))?,
        [user, pass] => (*user, *pass),
        [] => return Err(fail("it is empty; expected `username:password`")),
        _ => {
            return Err(fail(
                "expected `username:password` on one line, or the username and the password on two lines",
            ))
        }
    };
    let user = user.trim();
    if user.is_empty() {
        return Err(fail("the username is empty"));
    }
    Ok((user.to_owned(), pass.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use servogate_core::OnFull;
    use tokio_serial::{DataBits, Parity, StopBits};

    use super::fixture::good;
    use super::{load, read_credentials, BusKind, DeviceAddress, Link};

    #[test]
    fn a_good_config_has_its_defaults_filled_in() {
        let c = good();
        assert_eq!(c.gateway.log, "info");
        assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1883");
        assert!(!c.mqtt.tls);
        assert_eq!(c.mqtt.topic_prefix, "servogate/cell-7");
        assert_eq!(c.mqtt.client_id, "servogate-cell-7");
        assert_eq!(c.mqtt.qos, 1);
        assert_eq!(c.mqtt.keep_alive, Duration::from_secs(10));
        assert_eq!(c.mqtt.max_packet_size, 65_536);
        assert_eq!(c.mqtt.reconnect_min, Duration::from_millis(100));
        assert_eq!(c.mqtt.reconnect_max, Duration::from_secs(10));
        assert_eq!(c.mqtt.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.buffer.capacity.get(), 100_000);
        assert_eq!(c.buffer.on_full, OnFull::DropOldest);
        let d = &c.devices[0];
        assert_eq!(d.address, DeviceAddress::Unit(1));
        assert_eq!(d.late_after, Duration::from_millis(10));
        assert_eq!(d.timeout, None);
        assert_eq!(d.offline_after, 3);
        let BusKind::Modbus(r) = &c.buses[0].kind else {
            panic!("not rtu")
        };
        assert_eq!(r.baud, 115_200);
        assert_eq!(
            r.link,
            Link::Serial {
                port: "/dev/ttyUSB0".into(),
                parity: Parity::None,
                data_bits: DataBits::Eight,
                stop_bits: StopBits::One
            }
        );
        assert_eq!(r.timeout, Duration::from_millis(100));
        assert_eq!(r.t35, None);
        assert_eq!(r.t35(), Duration::from_micros(1_750));
        assert_eq!((r.max_gap, r.max_registers), (8, 125));
        assert_eq!(r.backoff_max, Duration::from_secs(5));
        assert!(c.metrics.is_none());
    }

    #[test]
    fn a_file_that_is_not_utf8_or_missing_is_named() {
        let dir = std::env::temp_dir().join(format!("sg-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("latin1.toml");
        std::fs::write(&f, b"[gateway]\nid = \"caf\xe9\"\n").unwrap();
        let e = load(&f).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}:2:10: the file is not valid UTF-8", f.display())
        );
        let missing = dir.join("nope.toml");
        let e = load(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: cannot read the config file:",
                missing.display()
            )),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_errors_never_contain_the_password() {
        let dir = std::env::temp_dir().join(format!("sg-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cred");
        for bad in [
            ":s3cret-pass\n",
            "s3cret-pass\n",
            "user\ns3cret-pass\nmore-s3cret\n",
            "\n\n",
            " \n:s3cret\n",
        ] {
            std::fs::write(&f, bad).unwrap();
            let e = read_credentials(&f).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains(&f.display().to_string()), "{shown}");
        }
        std::fs::write(&f, b"user:s3cret\xff\n").unwrap();
        let e = read_credentials(&f).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("s3cret"));
        std::fs::write(&f, "user:s3cret:pass\n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("user".into(), "s3cret:pass".into())
        );
        std::fs::write(&f, "user\r\npass word\r\n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("user".into(), "pass word".into())
        );
        let e = read_credentials(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
