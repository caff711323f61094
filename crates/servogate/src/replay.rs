//! Replay over MQTT (DESIGN.md section 9): a request on `{prefix}/replay` names a device,
//! a stream and a time range (or a boot and a seq range); the events the log holds go out
//! as they were first published, then a `done` summary that says what the log no longer
//! holds.
//!
//! ```text
//! {prefix}/replay                         <- {"id":"r-1","device":"axis-3","stream":"telemetry",
//!                                             "from":"2026-12-06T14:00:00Z","to":"…"}
//! {prefix}/replay/r-1/devices/axis-3/telemetry   -> each event, its payload byte for byte
//! {prefix}/replay/r-1                     -> {"id":"r-1","done":true,"count":N,…}
//! ```
//!
//! Each event's answer topic is the request's topic plus the event's own topic below the
//! prefix, so a request over several devices or streams still says whose each one is
//! (subscribe to `{prefix}/replay/r-1/#`).
//!
//! Replay never delays live events: it has an MQTT connection of its own (client id
//! `{client_id}-replay`), reads the log on a blocking thread, and at most [`MAX_RUNNING`]
//! run at once (a request beyond that is answered `busy`).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::QoS;
use serde_json::{json, Value};
use servogate_core::ReplyTo;
use servogate_log::{Entry, FsDir, Reader};
use servogate_mqtt::wire::{Client, Ev, Props};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::flight::stream_of;
use crate::store::{record, LogFeed};

/// Replays running at once; more are answered `busy`.
pub const MAX_RUNNING: usize = 2;
/// Events one request gets unless it asks for fewer.
pub const DEFAULT_LIMIT: usize = 100_000;
/// Records are appended within moments of acquisition: a time search stops once records
/// were appended this long after `to`.
const APPEND_SLACK: Duration = Duration::from_secs(60);
/// Seq gaps listed in a summary at most (the count is always whole).
const MAX_GAPS_LISTED: usize = 100;

/// What is asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: String,
    pub device: Option<String>,
    pub stream: Option<String>,
    pub range: Range,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Range {
    /// Events acquired in `from..to`.
    Time { from: SystemTime, to: SystemTime },
    /// Events of boot `boot_id` with `from_seq <= seq <= to_seq`.
    Seq {
        boot_id: String,
        from_seq: u64,
        to_seq: u64,
    },
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
}

/// Reads a request; `Err((id, why))` (the id when it had a usable one, to answer to).
pub fn parse(payload: &[u8]) -> Result<Request, (Option<String>, String)> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| (None, format!("not a JSON object: {e}")))?;
    let Some(o) = v.as_object() else {
        return Err((None, "not a JSON object".into()));
    };
    let id = match o.get("id").and_then(Value::as_str) {
        Some(id) if valid_id(id) => id.to_owned(),
        _ => {
            return Err((
                None,
                "`id` must be 1-64 characters of A-Z a-z 0-9 . _ : -".into(),
            ))
        }
    };
    let bad = |why: String| Err((Some(id.clone()), why));
    for k in o.keys() {
        if ![
            "id", "device", "stream", "from", "to", "boot_id", "from_seq", "to_seq", "limit",
        ]
        .contains(&k.as_str())
        {
            return bad(format!("unknown key {k:?}"));
        }
    }
    let text = |k: &str| -> Result<Option<String>, String> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("`{k}` must be a string")),
        }
    };
    let num = |k: &str| -> Result<Option<u64>, String> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("`{k}` must be a whole number")),
        }
    };
    let time = |k: &str| -> Result<Option<SystemTime>, String> {
        text(k)?
            .map(|t| {
                humantime::parse_rfc3339_weak(&t)
                    .map_err(|_| format!("`{k}` {t:?} is not an RFC 3339 time"))
            })
            .transpose()
    };
    let parsed = (|| -> Result<Request, String> {
        let device = text("device")?;
        let stream = text("stream")?;
        if let Some(s) = &stream {
            if !["telemetry", "availability", "events", "cmd_result"].contains(&s.as_str()) {
                return Err(format!(
                    "`stream` {s:?}: expected telemetry, availability, events or cmd_result"
                ));
            }
        }
        let limit = match num("limit")? {
            None => DEFAULT_LIMIT,
            Some(0) => return Err("`limit` must be at least 1".into()),
            Some(n) => n.min(DEFAULT_LIMIT as u64) as usize,
        };
        let (from, to) = (time("from")?, time("to")?);
        let boot_id = text("boot_id")?;
        let range = match (from, to, boot_id) {
            (Some(from), Some(to), None) => {
                if to <= from {
                    return Err("`to` must be after `from`".into());
                }
                Range::Time { from, to }
            }
            (None, None, Some(boot_id)) => Range::Seq {
                boot_id,
                from_seq: num("from_seq")?.unwrap_or(0),
                to_seq: num("to_seq")?.unwrap_or(u64::MAX),
            },
            _ => {
                return Err(
                    "give either `from` and `to`, or `boot_id` (with `from_seq` / `to_seq`)".into(),
                )
            }
        };
        Ok(Request {
            id: id.clone(),
            device,
            stream,
            range,
            limit,
        })
    })();
    parsed.or_else(bad)
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records in the range the log does not hold (removed or cut).
    pub missing: u64,
    /// The acquisition time of the oldest event held, when the range starts before it.
    pub held_from: Option<String>,
    /// Seq ranges absent between events of one device and stream, `[from, to]`.
    pub seq_gaps: Vec<(u64, u64)>,
    pub seq_gap_count: u64,
    /// The limit stopped it.
    pub truncated: bool,
}

impl Summary {
    pub fn to_json(&self, id: &str) -> Vec<u8> {
        let mut v = json!({
            "id": id, "done": true, "count": self.count,
            "first_seq": self.first_seq, "last_seq": self.last_seq,
            "missing": self.missing,
        });
        if let Some(h) = &self.held_from {
            v["held_from"] = json!(h);
        }
        if self.seq_gap_count > 0 {
            v["seq_gaps"] = json!(self.seq_gaps);
            v["seq_gap_count"] = json!(self.seq_gap_count);
        }
        if self.truncated {
            v["truncated"] = json!(true);
        }
        v.to_string().into_bytes()
    }
}

#[derive(serde::Deserialize)]
struct Head {
    #[serde(default)]
    boot_id: String,
    seq: u64,
    ts: String,
}

/// Reads the log in `dir` up to `end` for `req`, calling `send(topic below the prefix,
/// payload)` for each event in order; `send` returning false stops it (the answer
/// channel closed).
pub fn scan(
    dir: &FsDir,
    end: u64,
    prefix: &str,
    req: &Request,
    mut send: impl FnMut(String, Vec<u8>) -> bool,
) -> io::Result<Summary> {
    let us = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    let start = match &req.range {
        Range::Time { from, .. } => Reader::index_before_time(
            dir,
            us(*from).saturating_sub(APPEND_SLACK.as_micros() as u64),
        )?,
        Range::Seq { .. } => 0,
    };
    let stop_after = match &req.range {
        Range::Time { to, .. } => us(*to) + APPEND_SLACK.as_micros() as u64,
        Range::Seq { .. } => u64::MAX,
    };
    let mut sum = Summary::default();
    let mut first_record = true;
    // Last seq seen per (device, stream), for gaps.
    let mut last: std::collections::HashMap<(String, String), u64> = Default::default();
    for entry in Reader::live(dir.clone(), start, end)? {
        let r = match entry? {
            Entry::Record(r) => r,
            Entry::Gap { from, to } => {
                sum.missing += to - from;
                continue;
            }
        };
        if r.time_us > stop_after {
            break;
        }
        let Some(p) = record::decode(&r.body) else {
            continue;
        };
        let stream = stream_of(&p.topic);
        if req.device.as_deref().is_some_and(|d| d != &*p.device)
            || req.stream.as_deref().is_some_and(|s| s != stream)
        {
            continue;
        }
        let Ok(head) = serde_json::from_slice::<Head>(&p.payload) else {
            continue;
        };
        if first_record {
            first_record = false;
            if let Range::Time { from, .. } = &req.range {
                if humantime::parse_rfc3339_weak(&head.ts).is_ok_and(|t| t > *from) && start == 0 {
                    sum.held_from = Some(head.ts.clone());
                }
            }
        }
        let wanted = match &req.range {
            Range::Time { from, to } => {
                humantime::parse_rfc3339_weak(&head.ts).is_ok_and(|t| t >= *from && t < *to)
            }
            Range::Seq {
                boot_id,
                from_seq,
                to_seq,
            } => head.boot_id == *boot_id && head.seq >= *from_seq && head.seq <= *to_seq,
        };
        if !wanted {
            continue;
        }
        if sum.count as usize >= req.limit {
            sum.truncated = true;
            break;
        }
        let key = (p.device.to_string(), stream.to_owned());
        if let Some(prev) = last.insert(key, head.seq) {
            if head.seq > prev + 1 {
                sum.seq_gap_count += 1;
                if sum.seq_gaps.len() < MAX_GAPS_LISTED {
                    sum.seq_gaps.push((prev + 1, head.seq - 1));
                }
            }
        }
        sum.first_seq.get_or_insert(head.seq);
        sum.last_seq = Some(head.seq);
        sum.count += 1;
        let below = p
            .topic
            .strip_prefix(prefix)
            .and_then(|t| t.strip_prefix('/'))
            .unwrap_or(&p.topic)
            .to_owned();
        if !send(below, p.payload) {
            break;
        }
    }
    if let Range::Seq { from_seq, .. } = &req.range {
        if let Some(first) = sum.first_seq {
            if first > *from_seq && *from_seq > 0 {
                sum.seq_gap_count += 1;
                sum.seq_gaps.insert(0, (*from_seq, first - 1));
            }
        }
    }
    Ok(sum)
}

/// Serves replay requests until `shutdown`, on a connection of its own.
pub async fn serve(
    settings: servogate_mqtt::MqttSettings,
    dir: FsDir,
    feed: Arc<LogFeed>,
    shutdown: CancellationToken,
) {
    let prefix = settings.topic_prefix.clone();
    let request_topic = format!("{prefix}/replay");
    let (client, mut conn) = match settings.session(&format!("{}-replay", settings.client_id), 64) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "replay is off: no MQTT client");
            return;
        }
    };
    let running = Arc::new(AtomicUsize::new(0));
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = conn.poll() => e,
        };
        match event {
            Ok(Ev::ConnAck { .. }) => {
                if let Err(e) = client.try_subscribe(request_topic.clone()) {
                    warn!(error = %e, "cannot subscribe to the replay topic");
                }
            }
            Ok(Ev::Publish(p)) if p.topic == request_topic => {
                if p.retain {
                    debug!("a retained replay request is old: ignored");
                    continue;
                }
                let to = Answer::to(&prefix, p.reply.clone());
                let req = match parse(&p.payload) {
                    Ok(r) => r,
                    Err((Some(id), why)) => {
                        answer_error(&client, &to, &id, &why);
                        continue;
                    }
                    Err((None, why)) => {
                        warn!("replay request refused: {why}");
                        continue;
                    }
                };
                if running.fetch_add(1, SeqCst) >= MAX_RUNNING {
                    running.fetch_sub(1, SeqCst);
                    let why = format!("busy: {MAX_RUNNING} replays are running; ask again later");
                    answer_error(&client, &to, &req.id, &why);
                    continue;
                }
                let guard = Running(running.clone());
                tokio::spawn(replay(
                    client.clone(),
                    dir.clone(),
                    feed.written(),
                    prefix.clone(),
                    to,
                    req,
                    guard,
                ));
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e.message, "replay connection: trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(settings.reconnect_max.min(Duration::from_secs(1))) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

/// Where a request's answer goes: `{prefix}/replay/{id}` (each event below it), or the
/// MQTT 5 Response Topic the request named (every message on it, with the request's
/// Correlation Data, each event's own topic in the User Property `topic`).
#[derive(Debug, Clone)]
enum Answer {
    Prefix(String),
    Response(Arc<ReplyTo>),
}

impl Answer {
    fn to(prefix: &str, reply: Option<Arc<ReplyTo>>) -> Self {
        match reply {
            Some(r) => Answer::Response(r),
            None => Answer::Prefix(prefix.to_owned()),
        }
    }

    /// Topic and properties of the summary of request `id`.
    fn summary(&self, id: &str) -> (String, Props) {
        match self {
            Answer::Prefix(prefix) => (format!("{prefix}/replay/{id}"), Props::default()),
            Answer::Response(r) => (r.topic.clone(), self.props(Vec::new())),
        }
    }

    /// Topic and properties of one event whose topic below the prefix is `below`.
    fn event(&self, prefix: &str, id: &str, below: &str) -> (String, Props) {
        match self {
            Answer::Prefix(_) => (format!("{prefix}/replay/{id}/{below}"), Props::default()),
            Answer::Response(r) => (
                r.topic.clone(),
                self.props(vec![("topic".to_owned(), format!("{prefix}/{below}"))]),
            ),
        }
    }

    fn props(&self, user: Vec<(String, String)>) -> Props {
        let correlation = match self {
            Answer::Response(r) => r.correlation.clone(),
            Answer::Prefix(_) => None,
        };
        Props {
            alias: None,
            correlation,
            user,
        }
    }
}

/// Counts a running replay down when it ends, however it ends.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

fn answer_error(client: &Client, to: &Answer, id: &str, why: &str) {
    warn!(id, "replay request refused: {why}");
    let body = json!({"id": id, "done": true, "error": why}).to_string();
    let (topic, props) = to.summary(id);
    let _ = client.try_publish(topic, QoS::AtLeastOnce, false, body.into_bytes(), props);
}

async fn replay(
    client: Client,
    dir: FsDir,
    end: u64,
    prefix: String,
    to: Answer,
    req: Request,
    _running: Running,
) {
    let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>)>(256);
    let reader = {
        let (prefix, req) = (prefix.clone(), req.clone());
        tokio::task::spawn_blocking(move || {
            scan(&dir, end, &prefix, &req, |topic, payload| {
                tx.blocking_send((topic, payload)).is_ok()
            })
        })
    };
    while let Some((below, payload)) = rx.recv().await {
        let (topic, props) = to.event(&prefix, &req.id, &below);
        if client
            .publish(topic, QoS::AtLeastOnce, false, payload, props)
            .await
            .is_err()
        {
            return;
        }
    }
    let summary = match reader.await {
        Ok(Ok(s)) => s.to_json(&req.id),
        Ok(Err(e)) => json!({"id": req.id, "done": true, "error": format!("reading the log: {e}")})
            .to_string()
            .into_bytes(),
        Err(_) => return,
    };
    info!(id = req.id, "replay answered");
    let (topic, props) = to.summary(&req.id);
    let _ = client
        .publish(topic, QoS::AtLeastOnce, false, summary, props)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_needs_an_id_and_one_kind_of_range() {
        let r = parse(br#"{"id":"r-1","device":"axis-3","stream":"telemetry","from":"2026-12-06T14:00:00Z","to":"2026-12-06T14:05:00Z"}"#).unwrap();
        assert!(matches!(r.range, Range::Time { .. }));
        assert_eq!(r.limit, DEFAULT_LIMIT);
        let r = parse(br#"{"id":"r-2","boot_id":"ab","from_seq":10,"limit":5}"#).unwrap();
        assert_eq!(
            r.range,
            Range::Seq {
                boot_id: "ab".into(),
                from_seq: 10,
                to_seq: u64::MAX
            }
        );
        assert_eq!(r.limit, 5);
        let cases: [(&[u8], Option<&str>, &str); 7] = [
            (b"[]", None, "not a JSON object"),
            (br#"{"id":"a/b"}"#, None, "`id` must be"),
            (br#"{"id":"r"}"#, Some("r"), "give either"),
            (
                br#"{"id":"r","from":"x","to":"y"}"#,
                Some("r"),
                "not an RFC 3339 time",
            ),
            (
                br#"{"id":"r","boot_id":"b","stream":"logs"}"#,
                Some("r"),
                "`stream` \"logs\"",
            ),
            (
                br#"{"id":"r","boot_id":"b","colour":1}"#,
                Some("r"),
                "unknown key",
            ),
            (
                br#"{"id":"r","from":"2026-12-06T14:00:00Z","to":"2026-12-06T13:00:00Z"}"#,
                Some("r"),
                "after `from`",
            ),
        ];
        for (payload, id, why) in cases {
            let (got_id, got) = parse(payload).unwrap_err();
            assert_eq!(got_id.as_deref(), id, "{got}");
            assert!(got.contains(why), "{got} should say {why}");
        }
    }
}
