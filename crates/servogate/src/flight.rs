//! `servogate log`: the flight recorder. Reads the event log directory offline (a running
//! gateway may be writing it; nothing is changed) and prints the events that match, as
//! JSON lines or CSV: "what did axis-3 do between 14:00 and 14:05?".

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use servogate_log::{Entry, FsDir, Reader};
use servogate_mqtt::Prepared;

use crate::store::record;
use crate::Usage;

/// Logs at least this large get a progress bar on a terminal.
const PROGRESS_FROM_BYTES: u64 = 8 << 20;
/// Records are appended within moments of the event's acquisition: records appended
/// further than this outside `--since` / `--until` are skipped without being decoded.
const APPEND_SLACK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

/// Read the event log offline, filtered by device, stream and time.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// The config whose `[buffer] path` is the log.
    #[arg(long, short, required_unless_present = "dir")]
    pub config: Option<PathBuf>,
    /// A log directory (a copy taken after an incident, say) instead of --config.
    #[arg(long, conflicts_with = "config")]
    pub dir: Option<PathBuf>,
    /// Only this device (repeat for several).
    #[arg(long)]
    pub device: Vec<String>,
    /// Only this stream: telemetry, availability, events, cmd_result (repeat for several).
    #[arg(long)]
    pub stream: Vec<String>,
    /// Events acquired at or after this time (RFC 3339, e.g. 2026-12-06T14:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Events acquired before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
}

/// What one event is called on its topic: telemetry, availability, events, cmd_result.
pub fn stream_of(topic: &str) -> &str {
    if topic.ends_with("/cmd/result") {
        return "cmd_result";
    }
    topic.rsplit('/').next().unwrap_or("")
}

fn parse_time(s: &Option<String>, what: &str) -> anyhow::Result<Option<SystemTime>> {
    s.as_deref()
        .map(|t| {
            humantime::parse_rfc3339_weak(t).with_context(|| {
                format!("--{what} {t:?} is not an RFC 3339 time (2026-12-06T14:00:00Z)")
            })
        })
        .transpose()
}

/// The log directory the arguments name.
pub fn log_dir(args: &LogArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.dir {
        return Ok(d.clone());
    }
    let path = args
        .config
        .as_ref()
        .expect("clap requires --config or --dir");
    let cfg = crate::config::load(path).map_err(|e| Usage(e.to_string()))?;
    match cfg.buffer.log {
        Some(l) => Ok(l.path),
        None => Err(Usage(format!(
            "{}: [buffer] path is not set: this gateway keeps no event log",
            path.display()
        ))
        .into()),
    }
}

/// Prints the matching events to `out`; returns (events printed, events read).
pub fn run(args: &LogArgs, out: &mut dyn Write) -> anyhow::Result<(u64, u64)> {
    let since = parse_time(&args.since, "since").map_err(|e| Usage(format!("{e:#}")))?;
    let until = parse_time(&args.until, "until").map_err(|e| Usage(format!("{e:#}")))?;
    let path = log_dir(args)?;
    let dir =
        FsDir::existing(&path).with_context(|| format!("no event log at {}", path.display()))?;
    let reader =
        Reader::offline(dir, 0).with_context(|| format!("cannot read {}", path.display()))?;
    let total = reader.total_bytes();
    let bar = (io::stderr().is_terminal() && total >= PROGRESS_FROM_BYTES).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let us = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    let skip_before = since.map(|t| us(t).saturating_sub(APPEND_SLACK.as_micros() as u64));
    let stop_after = until.map(|t| us(t) + APPEND_SLACK.as_micros() as u64);
    if args.format == Format::Csv {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    let (mut printed, mut read) = (0u64, 0u64);
    for entry in reader {
        let entry = entry.with_context(|| format!("reading {}", path.display()))?;
        let r = match entry {
            Entry::Record(r) => r,
            Entry::Gap { from, to } => {
                eprintln!("servogate log: records {from}..{to} are not in the log (removed by max_bytes / max_age, or cut after a crash)");
                continue;
            }
        };
        read += 1;
        if let Some(bar) = &bar {
            bar.inc(16 + r.body.len() as u64);
        }
        if skip_before.is_some_and(|t| r.time_us < t) {
            continue;
        }
        if stop_after.is_some_and(|t| r.time_us > t) {
            break;
        }
        let Some(p) = record::decode(&r.body) else {
            eprintln!(
                "servogate log: record {} is not an event this version reads",
                r.index
            );
            continue;
        };
        let stream = stream_of(&p.topic);
        if !args.device.is_empty() && !args.device.iter().any(|d| *d == *p.device) {
            continue;
        }
        if !args.stream.is_empty() && !args.stream.iter().any(|s| s == stream) {
            continue;
        }
        let json: Option<serde_json::Value> =
            if since.is_some() || until.is_some() || args.format == Format::Csv {
                serde_json::from_slice(&p.payload).ok()
            } else {
                None
            };
        if since.is_some() || until.is_some() {
            let ts = json
                .as_ref()
                .and_then(|j| j["ts"].as_str())
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
            let Some(ts) = ts else { continue };
            if since.is_some_and(|s| ts < s) || until.is_some_and(|u| ts >= u) {
                continue;
            }
        }
        let written = match args.format {
            Format::Jsonl => write_jsonl(out, &p, stream),
            Format::Csv => write_csv(out, &p, stream, json.as_ref()),
        };
        match written {
            Ok(()) => printed += 1,
            // `servogate log ... | head`: the reader went away, which is fine.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e).context("writing the output"),
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match out.flush() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok((printed, read))
}

/// `{"device":..,"stream":..,<the payload's members>}`.
fn write_jsonl(out: &mut dyn Write, p: &Prepared, stream: &str) -> io::Result<()> {
    let head = serde_json::json!({"device": &*p.device, "stream": stream}).to_string();
    out.write_all(&head.as_bytes()[..head.len() - 1])?;
    match p.payload.strip_prefix(b"{") {
        Some(b"}") | None => out.write_all(b"}")?,
        Some(rest) => {
            out.write_all(b",")?;
            out.write_all(rest)?;
        }
    }
    out.write_all(b"\n")
}

const CSV_COLUMNS: [&str; 19] = [
    "ts",
    "device",
    "stream",
    "boot_id",
    "seq",
    "quality",
    "state",
    "position",
    "velocity",
    "torque",
    "current",
    "temperature",
    "kind",
    "status",
    "id",
    "action",
    "reason",
    "message",
    "values",
];

fn write_csv(
    out: &mut dyn Write,
    p: &Prepared,
    stream: &str,
    json: Option<&serde_json::Value>,
) -> io::Result<()> {
    let null = serde_json::Value::Null;
    let j = json.unwrap_or(&null);
    let field = |k: &str| -> String {
        match (k, j.get(k)) {
            ("device", _) => p.device.to_string(),
            ("stream", _) => stream.to_owned(),
            (_, None) | (_, Some(serde_json::Value::Null)) => String::new(),
            (_, Some(serde_json::Value::String(s))) => s.clone(),
            (_, Some(v)) => v.to_string(),
        }
    };
    let line: Vec<String> = CSV_COLUMNS.iter().map(|k| csv_cell(&field(k))).collect();
    writeln!(out, "{}", line.join(","))
}

/// RFC 4180: quoted when it holds a comma, a quote or a line break.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Checks the arguments that need no log (for the exit code: 64 before any IO).
pub fn check_args(args: &LogArgs) -> Result<(), Usage> {
    for (s, what) in [(&args.since, "since"), (&args.until, "until")] {
        parse_time(s, what).map_err(|e| Usage(format!("{e:#}")))?;
    }
    for s in &args.stream {
        if !["telemetry", "availability", "events", "cmd_result"].contains(&s.as_str()) {
            return Err(Usage(format!(
                "--stream {s:?}: expected telemetry, availability, events or cmd_result"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_the_last_topic_level_and_cmd_result() {
        assert_eq!(stream_of("p/devices/a/telemetry"), "telemetry");
        assert_eq!(stream_of("p/devices/a/cmd/result"), "cmd_result");
        assert_eq!(stream_of("p/cmd/result"), "cmd_result");
    }

    #[test]
    fn csv_cells_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_cell("a"), "a");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn a_jsonl_line_is_the_payload_with_device_and_stream_first() {
        let p = Prepared {
            topic: "p/devices/axis-3/telemetry".into(),
            payload: br#"{"boot_id":"b","seq":4}"#.to_vec(),
            kind: servogate_mqtt::Kind::Telemetry,
            device: "axis-3".into(),
            seq: 4,
            reply: None,
        };
        let mut out = Vec::new();
        write_jsonl(&mut out, &p, "telemetry").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"device\":\"axis-3\",\"stream\":\"telemetry\",\"boot_id\":\"b\",\"seq\":4}\n"
        );
    }
}
