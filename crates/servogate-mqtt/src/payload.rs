//! Topics and JSON payloads of the MQTT contract v1 (DESIGN.md section 3).
//!
//! Pure functions: an event in, bytes out. The JSON is written by hand (string escaping and
//! number formatting by `serde_json`) so the keys come out in the documented order (`seq`,
//! `ts` first) without an intermediate map, and so a non-finite float can never produce
//! invalid JSON: it is written as `null`.

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use servogate_core::{Availability, CommandReport, Event, EventBody, EventKind, Notice, Telemetry};

/// What the daemon knows about a device, for its retained `meta` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMeta {
    /// Device name, as in the topic.
    pub name: String,
    /// Bus name from the config.
    pub bus: String,
    /// Where the device sits on its bus: a Modbus unit number or a CANopen node id.
    pub address: serde_json::Value,
    /// Profile name from the config.
    pub profile: String,
    /// Each field the profile reads, with its unit when the profile names one.
    pub fields: Vec<(String, Option<String>)>,
}

/// The per-device topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic {
    Meta,
    Availability,
    Telemetry,
    Events,
    /// `cmd`: commands in.
    Command,
    /// `cmd/result`: one result per command.
    CommandResult,
}

impl DeviceTopic {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Meta => "meta",
            Self::Availability => "availability",
            Self::Telemetry => "telemetry",
            Self::Events => "events",
            Self::Command => "cmd",
            Self::CommandResult => "cmd/result",
        }
    }
}

/// `{prefix}/status`: birth, Last Will and clean-shutdown message of the gateway.
pub fn status_topic(prefix: &str) -> String {
    format!("{prefix}/status")
}

/// `{prefix}/cmd`: group commands in.
pub fn group_command_topic(prefix: &str) -> String {
    format!("{prefix}/cmd")
}

/// `{prefix}/cmd/result`: group command results.
pub fn group_result_topic(prefix: &str) -> String {
    format!("{prefix}/cmd/result")
}

/// `{prefix}/devices/{device}/{meta|availability|telemetry|events}`.
pub fn device_topic(prefix: &str, device: &str, topic: DeviceTopic) -> String {
    // Built with pushes into one allocation of the right size: this runs for every event.
    let parts = [prefix, "/devices/", device, "/", topic.as_str()];
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

/// The topic an event goes to.
pub fn event_topic(prefix: &str, event: &Event) -> String {
    let topic = match event.body {
        EventBody::Telemetry(_) => DeviceTopic::Telemetry,
        EventBody::Availability(_) => DeviceTopic::Availability,
        EventBody::Notice(_) => DeviceTopic::Events,
        // A group command's result is the gateway's, not one device's.
        EventBody::CommandResult(ref r) if r.is_group() => return group_result_topic(prefix),
        EventBody::CommandResult(_) => DeviceTopic::CommandResult,
    };
    device_topic(prefix, &event.device, topic)
}

/// RFC 3339 UTC with milliseconds (`2026-03-01T12:00:00.123Z`).
///
/// humantime panics before 1970 and fails after 9999; a wall clock that is badly wrong must
/// not take the forwarder down, so the time is clamped into that range.
pub fn rfc3339_millis(t: SystemTime) -> String {
    rfc3339_display(t).to_string()
}

/// [`rfc3339_millis`] as a `Display`, to write into a buffer without a `String`.
fn rfc3339_display(t: SystemTime) -> humantime::Rfc3339Timestamp {
    // 9999-12-31T23:59:59.999Z
    let latest = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
    let t = t.clamp(UNIX_EPOCH, latest);
    humantime::format_rfc3339_millis(t)
}

/// The payload of an event from the ring, for [`event_topic`].
pub fn encode_event(event: &Event) -> Vec<u8> {
    match &event.body {
        EventBody::Telemetry(t) => encode_telemetry(event.seq, event.ts, t),
        EventBody::Availability(a) => encode_availability(event.seq, event.ts, a),
        EventBody::Notice(n) => encode_notice(event.seq, event.ts, n),
        EventBody::CommandResult(r) => encode_command_result(event.seq, event.ts, r),
    }
}

/// `{"seq","ts","quality"[,"quality_reasons"],<present canonical fields>,"values":{..}}`.
/// Absent canonical fields are left out: a failed read publishes no made-up values.
pub fn encode_telemetry(seq: u64, ts: SystemTime, t: &Telemetry) -> Vec<u8> {
    let mut o = Obj::new();
    o.u64("seq", seq);
    o.ts("ts", ts);
    if t.quality.is_good() {
        o.str("quality", "good");
    } else {
        o.str("quality", "uncertain");
        o.key("quality_reasons");
        o.buf.push(b'[');
        for (i, reason) in t.quality.reasons().enumerate() {
            if i > 0 {
                o.buf.push(b',');
            }
            o.write_str(reason.as_str());
        }
        o.buf.push(b']');
    }
    let floats = [
        ("position", t.position),
        ("velocity", t.velocity),
        ("torque", t.torque),
        ("current", t.current),
        ("temperature", t.temperature),
    ];
    for (name, value) in floats {
        if let Some(v) = value {
            o.f64(name, v);
        }
    }
    if let Some(sw) = t.statusword {
        o.u64("statusword", u64::from(sw));
    }
    if let Some(state) = t.state {
        o.str("state", state.as_str());
    }
    if let Some(code) = t.fault_code {
        o.u64("fault_code", u64::from(code));
    }
    // Written in place, not as a second object copied in: this runs for every event.
    o.key("values");
    o.buf.push(b'{');
    for (i, (name, v)) in t.values.iter().enumerate() {
        if i > 0 {
            o.buf.push(b',');
        }
        o.write_str(name);
        o.buf.push(b':');
        o.write_f64(*v);
    }
    o.buf.push(b'}');
    o.finish()
}

/// `{"seq","ts","kind","message", <fields of the kind>}`.
pub fn encode_notice(seq: u64, ts: SystemTime, n: &Notice) -> Vec<u8> {
    let mut o = Obj::new();
    o.u64("seq", seq);
    o.ts("ts", ts);
    o.str("kind", n.kind.as_str());
    o.str("message", &n.message);
    match &n.kind {
        EventKind::Fault { code, register } => {
            o.u64("code", u64::from(*code));
            o.str("code_hex", &format!("0x{code:04X}"));
            match register {
                Some(r) => o.u64("register", u64::from(*r)),
                None => o.null("register"),
            }
        }
        EventKind::FaultCleared { code } => {
            o.u64("code", u64::from(*code));
            o.str("code_hex", &format!("0x{code:04X}"));
        }
        EventKind::Late {
            elapsed,
            late_after,
        } => {
            // Whole microseconds: 31.349, not 31.349406000000002.
            o.f64("elapsed_ms", elapsed.as_micros() as f64 / 1e3);
            o.f64("late_after_ms", late_after.as_micros() as f64 / 1e3);
        }
        EventKind::CommError { error } => o.str("error", error),
        EventKind::StateChange { from, to } => {
            match from {
                Some(s) => o.str("from", s.as_str()),
                None => o.null("from"),
            }
            o.str("to", to.as_str());
        }
        EventKind::Availability { state } => o.str("state", state.as_str()),
        EventKind::BusState { state } => o.str("state", state),
    }
    o.finish()
}

/// `{"seq","state","since","reason","ts"}` (retained).
pub fn encode_availability(seq: u64, ts: SystemTime, a: &Availability) -> Vec<u8> {
    let mut o = Obj::new();
    o.u64("seq", seq);
    o.str("state", a.state.as_str());
    o.ts("since", a.since);
    o.str("reason", &a.reason);
    o.ts("ts", ts);
    o.finish()
}

/// `{"id","seq","ts","status","action"[,"reason","message"],"received","latency_ms"
/// [,"duplicate":true]}`: `id` is `null` when the payload had no valid one.
pub fn encode_command_result(seq: u64, ts: SystemTime, r: &CommandReport) -> Vec<u8> {
    let mut o = Obj::new();
    match &r.id {
        Some(id) => o.str("id", id),
        None => o.null("id"),
    }
    o.u64("seq", seq);
    o.ts("ts", ts);
    o.str("status", r.status.as_str());
    match r.action {
        Some(a) => o.str("action", a),
        None => o.null("action"),
    }
    if let Some(reason) = r.reason {
        o.str("reason", reason.as_str());
    }
    if !r.message.is_empty() {
        o.str("message", &r.message);
    }
    o.ts("received", r.received);
    // Whole microseconds: 3.1, not 3.1000000000000001.
    o.f64("latency_ms", r.latency.as_micros() as f64 / 1e3);
    if r.duplicate {
        o.bool("duplicate", true);
    }
    if r.is_group() {
        let mut devices = Obj::new();
        for m in &r.group {
            let mut d = Obj::new();
            d.str("status", m.status.as_str());
            if let Some(reason) = m.reason {
                d.str("reason", reason.as_str());
            }
            if !m.message.is_empty() {
                d.str("message", &m.message);
            }
            devices.raw(&m.device, &d.finish());
        }
        o.raw("devices", &devices.finish());
    }
    o.finish()
}

/// `{"online","boot_id","version","ts"}`: birth (`true`), Last Will and shutdown (`false`).
pub fn encode_status(online: bool, boot_id: &str, version: &str, ts: SystemTime) -> Vec<u8> {
    encode_status_recovered(online, boot_id, version, ts, None)
}

/// As [`encode_status`], with `"recovered":N` when the event log holds `N` events of
/// earlier boots the broker never acknowledged (they go out first after this birth).
pub fn encode_status_recovered(
    online: bool,
    boot_id: &str,
    version: &str,
    ts: SystemTime,
    recovered: Option<u64>,
) -> Vec<u8> {
    let mut o = Obj::new();
    o.bool("online", online);
    o.str("boot_id", boot_id);
    o.str("version", version);
    o.ts("ts", ts);
    if let Some(n) = recovered {
        o.u64("recovered", n);
    }
    o.finish()
}

/// `{"bus","address","profile","fields":{name:{"unit":..}}}` (retained); a field without a
/// unit has `"unit":null`.
pub fn encode_meta(meta: &DeviceMeta) -> Vec<u8> {
    let mut o = Obj::new();
    o.str("bus", &meta.bus);
    o.key("address");
    write_value(&mut o.buf, &meta.address);
    o.str("profile", &meta.profile);
    let mut fields = Obj::new();
    for (name, unit) in &meta.fields {
        let mut f = Obj::new();
        match unit {
            Some(u) => f.str("unit", u),
            None => f.null("unit"),
        }
        fields.raw(name, &f.finish());
    }
    o.raw("fields", &fields.finish());
    o.finish()
}

/// Size on the wire of a PUBLISH packet (MQTT 3.1.1): fixed header, topic, packet id (QoS >
/// 0) and payload. Compared with the broker-side and rumqttc limit before publishing, since
/// one oversize packet makes rumqttc drop the whole connection.
pub fn publish_packet_size(topic_len: usize, payload_len: usize, qos: u8) -> usize {
    let remaining = 2 + topic_len + if qos > 0 { 2 } else { 0 } + payload_len;
    let len_len = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + remaining
}

fn write_value(buf: &mut Vec<u8>, v: &serde_json::Value) {
    // A Value holds only finite numbers, so this cannot fail.
    serde_json::to_writer(&mut *buf, v).expect("serialising a serde_json::Value into a Vec");
}

/// A JSON object writer that keeps key order.
struct Obj {
    buf: Vec<u8>,
    first: bool,
}

impl Obj {
    fn new() -> Self {
        // A servo's telemetry payload is 250-350 bytes: one allocation, no regrowth.
        let mut buf = Vec::with_capacity(384);
        buf.push(b'{');
        Self { buf, first: true }
    }

    fn write_str(&mut self, s: &str) {
        serde_json::to_writer(&mut self.buf, s).expect("serialising a str into a Vec");
    }

    fn key(&mut self, k: &str) {
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.write_str(k);
        self.buf.push(b':');
    }

    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        self.write_str(v);
    }

    fn u64(&mut self, k: &str, v: u64) {
        self.key(k);
        // Writing into a Vec cannot fail.
        let _ = write!(self.buf, "{v}");
    }

    /// An RFC 3339 UTC timestamp with milliseconds, as [`rfc3339_millis`] writes it.
    fn ts(&mut self, k: &str, t: SystemTime) {
        self.key(k);
        // Digits, '-', ':', 'T', '.' and 'Z' only: nothing to escape. Writing into a Vec
        // cannot fail.
        let _ = write!(self.buf, "\"{}\"", rfc3339_display(t));
    }

    /// Non-finite values become `null`: JSON has no NaN or infinity.
    fn f64(&mut self, k: &str, v: f64) {
        self.key(k);
        self.write_f64(v);
    }

    fn write_f64(&mut self, v: f64) {
        if v.is_finite() {
            serde_json::to_writer(&mut self.buf, &v).expect("serialising an f64 into a Vec");
        } else {
            self.buf.extend_from_slice(b"null");
        }
    }

    fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.buf
            .extend_from_slice(if v { b"true" as &[u8] } else { b"false" });
    }

    fn null(&mut self, k: &str) {
        self.key(k);
        self.buf.extend_from_slice(b"null");
    }

    /// `json` must be a complete JSON value written by another `Obj`.
    fn raw(&mut self, k: &str, json: &[u8]) {
        self.key(k);
        self.buf.extend_from_slice(json);
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.push(b'}');
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use servogate_core::{AvailabilityState, DriveState, Quality};
    use std::sync::Arc;

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("valid JSON")
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(
            rfc3339_millis(at(1_767_225_600_123)),
            "2026-01-01T00:00:00.123Z"
        );
    }

    #[test]
    fn a_wall_clock_before_1970_is_clamped_instead_of_panicking() {
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(rfc3339_millis(before), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn good_telemetry_has_seq_ts_quality_present_fields_and_values_in_order() {
        let mut t = Telemetry::default();
        t.set(&Arc::from("position"), 12.5);
        t.set(&Arc::from("statusword"), f64::from(0x0237u16));
        t.set(&Arc::from("dc_bus"), 48.25);
        let bytes = encode_telemetry(7, at(1_767_225_600_000), &t);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert_eq!(
            text,
            r#"{"seq":7,"ts":"2026-01-01T00:00:00.000Z","quality":"good","position":12.5,"statusword":567,"state":"operation_enabled","values":{"dc_bus":48.25}}"#
        );
    }

    #[test]
    fn uncertain_telemetry_lists_its_reasons() {
        let t = Telemetry {
            quality: Quality {
                late: true,
                out_of_range: true,
            },
            ..Telemetry::default()
        };
        let v = json(&encode_telemetry(1, at(0), &t));
        assert_eq!(v["quality"], "uncertain");
        assert_eq!(
            v["quality_reasons"],
            serde_json::json!(["late", "out_of_range"])
        );
        assert_eq!(v["values"], serde_json::json!({}));
        assert!(v.get("position").is_none(), "absent fields are left out");
    }

    #[test]
    fn non_finite_floats_are_written_as_null_and_the_json_stays_valid() {
        let mut t = Telemetry {
            position: Some(f64::NAN),
            velocity: Some(f64::INFINITY),
            ..Telemetry::default()
        };
        t.set(&Arc::from("x"), f64::NEG_INFINITY);
        let v = json(&encode_telemetry(1, at(0), &t));
        assert!(v["position"].is_null());
        assert!(v["velocity"].is_null());
        assert!(v["values"]["x"].is_null());
    }

    #[test]
    fn a_command_result_names_id_status_reason_and_latency() {
        use servogate_core::{CommandReason, CommandStatus};
        let r = CommandReport {
            id: Some(Arc::from("c-0043")),
            action: Some("write"),
            status: CommandStatus::Rejected,
            reason: Some(CommandReason::OutOfRange),
            message: "speed_limit 300 > max 250".into(),
            received: at(1_767_225_600_000),
            latency: Duration::from_micros(3_100),
            duplicate: false,
            group: Vec::new(),
            reply: None,
        };
        let text = String::from_utf8(encode_command_result(18, at(1_767_225_600_003), &r)).unwrap();
        assert_eq!(
            text,
            r#"{"id":"c-0043","seq":18,"ts":"2026-01-01T00:00:00.003Z","status":"rejected","action":"write","reason":"out_of_range","message":"speed_limit 300 > max 250","received":"2026-01-01T00:00:00.000Z","latency_ms":3.1}"#
        );
        let anonymous = CommandReport {
            id: None,
            action: None,
            duplicate: true,
            ..r
        };
        let v = json(&encode_command_result(19, at(0), &anonymous));
        assert!(v["id"].is_null());
        assert_eq!(v["duplicate"], true);
    }

    #[test]
    fn strings_are_escaped() {
        let n = Notice {
            kind: EventKind::CommError { error: "io" },
            message: "quote \" backslash \\ newline \n".into(),
        };
        let v = json(&encode_notice(3, at(0), &n));
        assert_eq!(v["message"], "quote \" backslash \\ newline \n");
    }

    #[test]
    fn a_fault_event_carries_the_code_as_number_and_hex_and_the_register() {
        let n = Notice {
            kind: EventKind::Fault {
                code: 0x2310,
                register: Some(0x03),
            },
            message: "overcurrent".into(),
        };
        let v = json(&encode_notice(4, at(5), &n));
        assert_eq!(
            v,
            serde_json::json!({"seq":4,"ts":"1970-01-01T00:00:00.005Z","kind":"fault",
                "message":"overcurrent","code":8976,"code_hex":"0x2310","register":3})
        );
    }

    #[test]
    fn late_comm_error_and_state_change_events_carry_their_fields() {
        let late = Notice {
            kind: EventKind::Late {
                elapsed: Duration::from_micros(62_500),
                late_after: Duration::from_millis(50),
            },
            message: String::new(),
        };
        let v = json(&encode_notice(1, at(0), &late));
        assert_eq!(v["kind"], "late");
        assert_eq!(v["elapsed_ms"], 62.5);
        assert_eq!(v["late_after_ms"], 50.0);

        let comm = Notice {
            kind: EventKind::CommError { error: "timeout" },
            message: String::new(),
        };
        let v = json(&encode_notice(2, at(0), &comm));
        assert_eq!(
            (v["kind"].as_str(), v["error"].as_str()),
            (Some("comm_error"), Some("timeout"))
        );

        let change = Notice {
            kind: EventKind::StateChange {
                from: None,
                to: DriveState::Fault,
            },
            message: String::new(),
        };
        let v = json(&encode_notice(3, at(0), &change));
        assert_eq!(v["kind"], "state_change");
        assert!(v["from"].is_null());
        assert_eq!(v["to"], "fault");

        let cleared = Notice {
            kind: EventKind::FaultCleared { code: 0xFF00 },
            message: String::new(),
        };
        let v = json(&encode_notice(4, at(0), &cleared));
        assert_eq!(
            (v["kind"].as_str(), v["code_hex"].as_str()),
            (Some("fault_cleared"), Some("0xFF00"))
        );
    }

    #[test]
    fn availability_payload_has_seq_state_since_reason_and_ts() {
        let a = Availability {
            state: AvailabilityState::Offline,
            since: at(1_000),
            reason: "3 consecutive timeouts".into(),
        };
        let text = String::from_utf8(encode_availability(2, at(2_000), &a)).unwrap();
        assert_eq!(
            text,
            r#"{"seq":2,"state":"offline","since":"1970-01-01T00:00:01.000Z","reason":"3 consecutive timeouts","ts":"1970-01-01T00:00:02.000Z"}"#
        );
    }

    #[test]
    fn status_payload_has_online_boot_id_version_and_ts() {
        let v = json(&encode_status(false, "b-1", "0.1.0", at(0)));
        assert_eq!(
            v,
            serde_json::json!({"online":false,"boot_id":"b-1","version":"0.1.0","ts":"1970-01-01T00:00:00.000Z"})
        );
    }

    #[test]
    fn meta_payload_names_bus_address_profile_and_each_fields_unit() {
        let meta = DeviceMeta {
            name: "axis-1".into(),
            bus: "rs485-a".into(),
            address: serde_json::json!(1),
            profile: "acme-ax".into(),
            fields: vec![
                ("position".into(), Some("mm".into())),
                ("statusword".into(), None),
            ],
        };
        let v = json(&encode_meta(&meta));
        assert_eq!(
            v,
            serde_json::json!({"bus":"rs485-a","address":1,"profile":"acme-ax",
                "fields":{"position":{"unit":"mm"},"statusword":{"unit":null}}})
        );
    }

    #[test]
    fn topics_follow_the_contract() {
        let mut dev = servogate_core::DeviceEvents::new("axis-1");
        let e = dev.notice(at(0), EventKind::CommError { error: "crc" }, String::new());
        assert_eq!(
            event_topic("sg/cell-7", &e),
            "sg/cell-7/devices/axis-1/events"
        );
        assert_eq!(status_topic("sg/cell-7"), "sg/cell-7/status");
        assert_eq!(
            device_topic("p", "d", DeviceTopic::Meta),
            "p/devices/d/meta"
        );
    }

    #[test]
    fn packet_size_matches_the_mqtt_encoding() {
        // 1 fixed header byte, 1 length byte, 2+5 topic, 2 packet id, 3 payload.
        assert_eq!(publish_packet_size(5, 3, 1), 1 + 1 + 2 + 5 + 2 + 3);
        // QoS 0 has no packet id; 128 remaining bytes need two length bytes.
        assert_eq!(publish_packet_size(0, 126, 0), 1 + 2 + 128);
    }
}
