//! `[buffer]`: the delivery ring's capacity and what it does when full, and the event
//! log on disk behind it (`path` and the keys that go with it).

use std::num::NonZeroUsize;
use std::time::Duration;

use servogate_core::OnFull;
use servogate_log::SyncMode;

use super::model::{Buffer, LogSettings};
use super::raw::{RawBuffer, RawBytes, S};
use super::source::Source;
use super::ConfigError;

const DEFAULT_MAX_BYTES: u64 = 256 << 20;
const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;
const MIN_SEGMENT_BYTES: u64 = 4 << 10;
const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(10);

/// `"256MiB"`, `"1GB"`, `"4096"` or 4096 in bytes; `None` when it is none of those.
fn parse_bytes(v: &RawBytes) -> Option<u64> {
    let text = match v {
        RawBytes::Number(n) => return u64::try_from(*n).ok(),
        RawBytes::Text(t) => t.trim(),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

// `unwrap` in a const is evaluated by the compiler: 100000 is not zero.
const DEFAULT_CAPACITY: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();
const MAX_CAPACITY: usize = 10_000_000;
const DEFAULT_ON_FULL: OnFull = OnFull::DropOldest;

impl Source<'_> {
    /// `[buffer]`.
    pub(super) fn buffer(&self, b: RawBuffer) -> Result<Buffer, ConfigError> {
        let capacity = match &b.capacity {
            Some(c) => match NonZeroUsize::new(*c.get_ref()) {
                Some(n) if n.get() <= MAX_CAPACITY => n,
                _ => return Err(self.at(c, "buffer.capacity", "must be 1 to 10000000 events")),
            },
            None => DEFAULT_CAPACITY,
        };
        let on_full = match &b.on_full {
            None => DEFAULT_ON_FULL,
            Some(v) => match v.get_ref().as_str() {
                "drop_oldest" => OnFull::DropOldest,
                "drop_newest" => OnFull::DropNewest,
                other => {
                    return Err(self.at(
                        v,
                        "buffer.on_full",
                        format!(
                        "unknown policy \"{other}\"; expected \"drop_oldest\" or \"drop_newest\""
                    ),
                    ))
                }
            },
        };
        let log = self.log_settings(&b)?;
        Ok(Buffer {
            capacity,
            on_full,
            log,
        })
    }

    fn bytes(&self, v: &S<RawBytes>, key: &str) -> Result<u64, ConfigError> {
        parse_bytes(v.get_ref()).ok_or_else(|| {
            self.at(
                v,
                key,
                "expected a size in bytes: a number, or a number with B, KiB, MiB, GiB, \
                 KB, MB or GB (\"256MiB\")",
            )
        })
    }

    /// `path` and its companions; the companions without `path` are an error (they
    /// would silently do nothing).
    fn log_settings(&self, b: &RawBuffer) -> Result<Option<LogSettings>, ConfigError> {
        let Some(path) = &b.path else {
            let stray = [
                ("max_bytes", b.max_bytes.as_ref().map(|v| v.span())),
                ("max_age", b.max_age.as_ref().map(|v| v.span())),
                ("sync", b.sync.as_ref().map(|v| v.span())),
                ("sync_interval", b.sync_interval.as_ref().map(|v| v.span())),
                ("segment_bytes", b.segment_bytes.as_ref().map(|v| v.span())),
            ];
            if let Some((k, span)) = stray.into_iter().find_map(|(k, s)| Some((k, s?))) {
                return Err(self.error(
                    span,
                    Some(format!("buffer.{k}")),
                    format!("`{k}` is for the event log on disk: set `path` too"),
                ));
            }
            return Ok(None);
        };
        if path.get_ref().trim().is_empty() {
            return Err(self.at(path, "buffer.path", "must name a directory"));
        }
        let max_bytes = match &b.max_bytes {
            Some(v) => self.bytes(v, "buffer.max_bytes")?,
            None => DEFAULT_MAX_BYTES,
        };
        let segment_bytes = match &b.segment_bytes {
            Some(v) => self.bytes(v, "buffer.segment_bytes")?,
            None => DEFAULT_SEGMENT_BYTES
                .min(max_bytes / 4)
                .max(MIN_SEGMENT_BYTES),
        };
        if segment_bytes < MIN_SEGMENT_BYTES {
            let v = b
                .segment_bytes
                .as_ref()
                .expect("only a given value is this small");
            return Err(self.at(v, "buffer.segment_bytes", "must be at least 4KiB"));
        }
        if max_bytes < 2 * segment_bytes {
            let (v, k) = match (&b.max_bytes, &b.segment_bytes) {
                (Some(v), _) => (v, "buffer.max_bytes"),
                (None, Some(v)) => (v, "buffer.segment_bytes"),
                (None, None) => unreachable!("the defaults fit"),
            };
            return Err(self.at(
                v,
                k,
                format!(
                    "max_bytes ({max_bytes}) must hold at least two segments of \
                     segment_bytes ({segment_bytes})"
                ),
            ));
        }
        let max_age = match &b.max_age {
            Some(_) => Some(self.positive(&b.max_age, "buffer.max_age", Duration::ZERO)?),
            None => None,
        };
        let sync = match &b.sync {
            None => SyncMode::Batch,
            Some(v) => match v.get_ref().as_str() {
                "batch" => SyncMode::Batch,
                "always" => SyncMode::Always,
                "never" => SyncMode::Never,
                other => {
                    return Err(self.at(
                        v,
                        "buffer.sync",
                        format!(
                            "unknown mode \"{other}\"; expected \"batch\", \"always\" or \"never\""
                        ),
                    ))
                }
            },
        };
        let sync_interval = self.positive(
            &b.sync_interval,
            "buffer.sync_interval",
            DEFAULT_SYNC_INTERVAL,
        )?;
        Ok(Some(LogSettings {
            path: path.get_ref().into(),
            max_bytes,
            max_age,
            sync,
            sync_interval,
            segment_bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{err, GOOD};
    use super::super::parse;
    use super::*;
    use std::path::Path;

    #[test]
    fn sizes_take_a_number_or_a_unit() {
        let b = |s: &str| parse_bytes(&RawBytes::Text(s.into()));
        assert_eq!(b("256MiB"), Some(256 << 20));
        assert_eq!(b("1GB"), Some(1_000_000_000));
        assert_eq!(b("4096"), Some(4096));
        assert_eq!(b("12 KiB"), Some(12 << 10));
        assert_eq!(b("1.5GiB"), None);
        assert_eq!(b("MiB"), None);
        assert_eq!(parse_bytes(&RawBytes::Number(-1)), None);
    }

    #[test]
    fn the_log_keys_are_checked_and_need_a_path() {
        let with = |extra: &str| format!("{GOOD}\n[buffer]\n{extra}\n");
        let c = parse(
            &with("path = \"/var/lib/servogate/log\""),
            Path::new("t.toml"),
        )
        .unwrap();
        let log = c.buffer.log.unwrap();
        assert_eq!((log.max_bytes, log.segment_bytes), (256 << 20, 8 << 20));
        assert_eq!(log.sync, SyncMode::Batch);
        let e = err(&with("max_bytes = \"1GiB\""));
        assert!(
            e.contains("buffer.max_bytes: `max_bytes` is for the event log on disk"),
            "{e}"
        );
        let e = err(&with("path = \"/x\"\nsync = \"sometimes\""));
        assert!(e.contains("buffer.sync: unknown mode \"sometimes\""), "{e}");
        let e = err(&with("path = \"/x\"\nmax_bytes = \"lots\""));
        assert!(e.contains("buffer.max_bytes: expected a size"), "{e}");
        let e = err(&with(
            "path = \"/x\"\nmax_bytes = \"64KiB\"\nsegment_bytes = \"64KiB\"",
        ));
        assert!(e.contains("must hold at least two segments"), "{e}");
        let c = parse(
            &with("path = \"/x\"\nmax_bytes = \"64KiB\""),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.buffer.log.unwrap().segment_bytes, 16 << 10);
    }
}
