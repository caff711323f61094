//! `Source`, the text being validated: byte spans into line and column, errors about a
//! key at a value (`at`), the checks several sections share (durations, topic-safe
//! names, dotted key paths), and `validate`, which runs every section's checks
//! (`gateway.rs`, `mqtt.rs`, `buffer.rs`, `profiles.rs`, `buses.rs`, `devices.rs`,
//! `metrics.rs`) and assembles the [`Config`].

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::model::Config;
use super::raw::{RawConfig, S};
use super::ConfigError;

/// The text being validated, for turning spans into positions and key paths.
pub(super) struct Source<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
}

/// Letters, digits, `-` and `_`, at least one: safe inside an MQTT topic level.
pub(super) fn topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub(super) const TOPIC_SAFE: &str =
    "use letters, digits, '-' and '_' only (it goes into MQTT topics)";

impl<'a> Source<'a> {
    pub(super) fn new(file: &'a Path, text: &'a str) -> Self {
        Self { file, text }
    }

    /// 1-based line and column (in characters) of byte `offset`.
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |p| p + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    pub(super) fn error(
        &self,
        span: Range<usize>,
        key: Option<String>,
        message: String,
    ) -> ConfigError {
        let (line, col) = self.position(span.start);
        ConfigError {
            file: self.file.to_owned(),
            line: Some(line),
            column: Some(col),
            key,
            message,
        }
    }

    /// An error about `key`, at `value`.
    pub(super) fn at<T>(
        &self,
        value: &Spanned<T>,
        key: impl fmt::Display,
        message: impl Into<String>,
    ) -> ConfigError {
        self.error(value.span(), Some(key.to_string()), message.into())
    }

    pub(super) fn duration(
        &self,
        value: &Option<S<String>>,
        key: impl fmt::Display,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => self.parse_duration(v, key),
        }
    }

    pub(super) fn parse_duration(
        &self,
        v: &S<String>,
        key: impl fmt::Display,
    ) -> Result<Duration, ConfigError> {
        humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            self.at(
                v,
                key,
                format!(
                    "\"{}\" is not a duration ({e}); write e.g. \"10ms\" or \"1.5s\"",
                    v.get_ref()
                ),
            )
        })
    }

    /// A duration that must be above zero.
    pub(super) fn positive(
        &self,
        value: &Option<S<String>>,
        key: impl fmt::Display,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let key = key.to_string();
        let d = self.duration(value, &key, default)?;
        match value {
            Some(v) if d.is_zero() => Err(self.at(v, key, "must be above zero")),
            _ => Ok(d),
        }
    }

    /// Validates the whole file, one section after another in this fixed order (the first
    /// error found is the one reported; later sections may refer to earlier ones). Each
    /// section's checks live in its own file.
    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let gateway = self.gateway(&raw.gateway)?;
        // Kept for its position: a missing [sparkplug] is reported at the contract.
        let contract_at = raw.mqtt.contract.clone();
        let batch_at = raw.mqtt.batch_max.clone();
        let mqtt = self.mqtt(raw.mqtt, &gateway.id)?;
        let buffer = self.buffer(raw.buffer)?;
        let profiles = self.profiles(raw.profiles)?;
        let buses = self.buses(raw.buses)?;
        let devices = self.devices(raw.devices, &buses, &profiles)?;
        let commands = self.commands(raw.commands)?;
        let metrics = match raw.metrics {
            None => None,
            Some(m) => Some(self.metrics(m)?),
        };
        if let (super::Contract::Sparkplug, Some(_), Some(at)) =
            (mqtt.contract, &buffer.log, &contract_at)
        {
            return Err(self.at(
                at,
                "mqtt.contract",
                "the event log on disk ([buffer] path) keeps the JSON contract's messages: \
                 use \"both\", or no path (Sparkplug's store and forward is in memory)",
            ));
        }
        if let (true, true, Some(_), Some(at)) = (
            mqtt.batching.on(),
            mqtt.contract.json(),
            &buffer.log,
            &batch_at,
        ) {
            return Err(self.at(
                at,
                "mqtt.batch_max",
                "the JSON contract is batched in memory mode only: the event log ([buffer] \
                 path) keeps and publishes each sample on its own",
            ));
        }
        let sparkplug = self.sparkplug(raw.sparkplug, contract_at, &mqtt, &gateway.id)?;
        Ok(Config {
            file: self.file.to_owned(),
            gateway,
            mqtt,
            buffer,
            profiles,
            buses,
            devices,
            metrics,
            commands,
            sparkplug,
        })
    }
}

/// A key as it appears in a dotted path: quoted unless bare.
pub(super) fn dotted(k: &str) -> String {
    if topic_safe(k) {
        k.to_owned()
    } else {
        format!("{k:?}")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::{err, GOOD};

    #[test]
    fn a_bad_duration_names_the_line() {
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = \"often\""));
        assert!(
            e.starts_with("t.toml:19:8: devices[0].poll: \"often\" is not a duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = \"10\""));
        assert!(
            e.starts_with("t.toml:19:8: devices[0].poll: \"10\" is not a duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = \"0s\""));
        assert_eq!(e, "t.toml:19:8: devices[0].poll: must be above zero");
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = 10"));
        assert!(
            e.starts_with("t.toml:19:8: devices[0].poll: invalid type"),
            "{e}"
        );
    }
}
