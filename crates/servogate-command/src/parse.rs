//! Command payloads (DESIGN.md section 7), from bytes to a checked [`Command`].
//!
//! Everything here takes bytes from the broker, so nothing may panic and nothing may
//! grow without bound: the payload is limited in size before it is parsed, serde_json
//! refuses nesting deeper than 128 levels, and every number must be finite. Unknown keys
//! are refused rather than ignored: a misspelt `"postion"` must not become a move to
//! nowhere.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use servogate_core::CommandReason;

use crate::sign::{self, SigningKey};

/// Largest command payload taken (a group command over dozens of axes fits easily).
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// An id is 1-64 characters of `A-Z a-z 0-9 . _ : -`.
pub const MAX_ID_LEN: usize = 64;

/// A command id: the idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(Arc<str>);

impl CommandId {
    /// The id if `s` is a valid one.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=MAX_ID_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        ok.then(|| Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

/// What `move` waits for before it is `done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wait {
    /// The drive acknowledged the set-point (CiA 402 statusword bit 12).
    #[default]
    Ack,
    /// The drive reached the target (statusword bit 10).
    TargetReached,
}

/// What a command asks a drive to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write profile fields (engineering units, in payload order).
    Write {
        values: Vec<(String, f64)>,
    },
    Enable,
    Disable,
    QuickStop,
    Halt,
    FaultReset,
    /// Profile position mode: to `position` (or by it when `relative`).
    Move {
        position: f64,
        velocity: Option<f64>,
        relative: bool,
        wait: Wait,
    },
    /// Profile velocity mode.
    Velocity {
        velocity: f64,
    },
}

impl Action {
    /// Every action's name, as in `allow` and the payload.
    pub const NAMES: [&'static str; 8] = [
        "write",
        "enable",
        "disable",
        "quick_stop",
        "halt",
        "fault_reset",
        "move",
        "velocity",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Write { .. } => "write",
            Self::Enable => "enable",
            Self::Disable => "disable",
            Self::QuickStop => "quick_stop",
            Self::Halt => "halt",
            Self::FaultReset => "fault_reset",
            Self::Move { .. } => "move",
            Self::Velocity { .. } => "velocity",
        }
    }

    /// `quick_stop`, `halt` and `disable` bring an axis to rest: no interlock, rate or
    /// freshness rule ever holds them back; only `allow` can forbid them.
    pub fn is_safety(&self) -> bool {
        matches!(self, Self::QuickStop | Self::Halt | Self::Disable)
    }

    /// The actions that set an axis in motion: only in `operation_enabled`.
    pub fn is_motion(&self) -> bool {
        matches!(self, Self::Move { .. } | Self::Velocity { .. })
    }
}

/// The deadline fields of a payload, before the policy turns them into one deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timing {
    /// `deadline`: absolute.
    pub deadline: Option<SystemTime>,
    /// `ts`: when the client sent it.
    pub sent: Option<SystemTime>,
    /// `ttl_ms`: how long after `ts` it may still start.
    pub ttl: Option<Duration>,
}

/// A command to one device, parsed and well-formed (not yet checked against a policy).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: CommandId,
    pub action: Action,
    pub timing: Timing,
    /// A hash of the canonical body: the same id with another body is `id_reused`.
    pub body_hash: u64,
}

/// A group command: one action, one set of parameters per device.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupCommand {
    pub id: CommandId,
    pub timing: Timing,
    /// (device, its command with the group's id and timing), in payload order.
    pub targets: Vec<(String, Command)>,
    pub body_hash: u64,
}

/// Why a payload is not a command; answered as `rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The id, when the payload carried a valid one.
    pub id: Option<CommandId>,
    /// The action's name when it was a known one.
    pub action: Option<&'static str>,
    pub reason: CommandReason,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(reason: CommandReason, message: impl Into<String>) -> Self {
        Self {
            id: None,
            action: None,
            reason,
            message: message.into(),
        }
    }

    fn with_id(mut self, id: &CommandId) -> Self {
        self.id = Some(id.clone());
        self
    }
}

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(CommandReason::BadRequest, message)
}

/// Opens the payload: size, JSON, an object, and the signature when a key is set.
fn open(bytes: &[u8], key: Option<&SigningKey>) -> Result<Map<String, Value>, Refusal> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(bad(format!(
            "payload of {} bytes exceeds {MAX_PAYLOAD}",
            bytes.len()
        )));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("not JSON: {}", short(&e.to_string()))))?;
    let Value::Object(outer) = value else {
        return Err(bad("a command is a JSON object"));
    };
    let Some(key) = key else {
        return Ok(outer);
    };
    // Signed: {"signed":"<the command JSON as a string>","sig":"<hex HMAC-SHA256>"}.
    let refuse = |m: &str| Refusal::new(CommandReason::BadSignature, m);
    let (Some(Value::String(signed)), Some(Value::String(sig)), 2) =
        (outer.get("signed"), outer.get("sig"), outer.len())
    else {
        return Err(refuse(
            "commands must be signed: {\"signed\":\"<command JSON>\",\"sig\":\"<hex HMAC-SHA256>\"}",
        ));
    };
    if !sign::verify(key, signed.as_bytes(), sig) {
        return Err(refuse("the signature does not match"));
    }
    match serde_json::from_str(signed) {
        Ok(Value::Object(inner)) => Ok(inner),
        Ok(_) => Err(bad("the signed command is not a JSON object")),
        Err(e) => Err(bad(format!(
            "the signed command is not JSON: {}",
            short(&e.to_string())
        ))),
    }
}

/// Error messages from serde_json may quote the input: keep them short.
fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

/// The id of an opened payload.
fn take_id(obj: &Map<String, Value>) -> Result<CommandId, Refusal> {
    match obj.get("id") {
        None => Err(bad("the command has no \"id\"")),
        Some(Value::String(s)) => CommandId::parse(s).ok_or_else(|| {
            bad(format!(
                "\"id\" must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ : -"
            ))
        }),
        Some(_) => Err(bad("\"id\" must be a string")),
    }
}

fn body_hash(obj: &Map<String, Value>) -> u64 {
    use std::hash::{Hash, Hasher};
    // serde_json's Map is ordered by key, so this text is canonical: the same command
    // with its keys in another order or other white space hashes the same.
    let canonical = Value::Object(obj.clone()).to_string();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canonical.hash(&mut h);
    h.finish()
}

/// Parses a command for one device.
pub fn parse_command(bytes: &[u8], key: Option<&SigningKey>) -> Result<Command, Refusal> {
    let obj = open(bytes, key)?;
    let id = take_id(&obj)?;
    let action_name = obj.get("action");
    let known = known_action(action_name);
    let with = |r: Refusal| Refusal {
        action: known,
        ..r.with_id(&id)
    };
    let timing = timing(&obj).map_err(with)?;
    let allowed_keys: &[&str] = &["id", "action", "deadline", "ts", "ttl_ms"];
    let action = action(&obj, allowed_keys).map_err(with)?;
    Ok(Command {
        body_hash: body_hash(&obj),
        id,
        action,
        timing,
    })
}

/// Parses a group command (`{prefix}/cmd`): `targets` maps each device to its parameters.
pub fn parse_group(bytes: &[u8], key: Option<&SigningKey>) -> Result<GroupCommand, Refusal> {
    let obj = open(bytes, key)?;
    let id = take_id(&obj)?;
    let known = known_action(obj.get("action"));
    let with = |r: Refusal| Refusal {
        action: known,
        ..r.with_id(&id)
    };
    let timing = timing(&obj).map_err(with)?;
    for k in obj.keys() {
        if !["id", "action", "deadline", "ts", "ttl_ms", "targets"].contains(&k.as_str()) {
            return Err(with(bad(format!("unknown key {:?}", short(k)))));
        }
    }
    let Some(Value::Object(targets)) = obj.get("targets") else {
        return Err(with(bad(
            "a group command needs \"targets\": {\"device\": {parameters}}",
        )));
    };
    if targets.is_empty() {
        return Err(with(bad("\"targets\" is empty")));
    }
    let mut out = Vec::with_capacity(targets.len());
    for (device, params) in targets {
        let Value::Object(params) = params else {
            return Err(with(bad(format!(
                "target {:?}: parameters must be an object",
                short(device)
            ))));
        };
        let mut one = params.clone();
        if let Some(a) = obj.get("action") {
            one.insert("action".into(), a.clone());
        }
        let action = action(&one, &["action"])
            .map_err(|r| with(bad(format!("target {:?}: {}", short(device), r.message))))?;
        out.push((
            device.clone(),
            Command {
                id: id.clone(),
                action,
                timing,
                body_hash: 0,
            },
        ));
    }
    Ok(GroupCommand {
        body_hash: body_hash(&obj),
        id,
        timing,
        targets: out,
    })
}

/// The id and action name of a payload that failed later checks, for its result; `None`
/// when the payload is not a JSON object with a valid id.
pub fn peek_id(bytes: &[u8], key: Option<&SigningKey>) -> Option<CommandId> {
    open(bytes, key).ok().and_then(|o| take_id(&o).ok())
}

fn known_action(v: Option<&Value>) -> Option<&'static str> {
    let name = v?.as_str()?;
    Action::NAMES.iter().copied().find(|n| *n == name)
}

fn timing(obj: &Map<String, Value>) -> Result<Timing, Refusal> {
    let time = |key: &str| -> Result<Option<SystemTime>, Refusal> {
        match obj.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => humantime::parse_rfc3339(s).map(Some).map_err(|_| {
                bad(format!(
                    "{key:?} must be an RFC 3339 UTC time such as 2026-12-06T10:00:00.250Z"
                ))
            }),
            Some(_) => Err(bad(format!("{key:?} must be a string"))),
        }
    };
    let ttl = match obj.get("ttl_ms") {
        None => None,
        Some(v) => {
            let ms = v
                .as_f64()
                .filter(|ms| ms.is_finite() && *ms >= 0.0 && *ms <= 86_400_000.0)
                .ok_or_else(|| bad("\"ttl_ms\" must be a number of milliseconds, 0 to 1 day"))?;
            Some(Duration::from_secs_f64(ms / 1e3))
        }
    };
    let t = Timing {
        deadline: time("deadline")?,
        sent: time("ts")?,
        ttl,
    };
    if t.ttl.is_some() && t.sent.is_none() {
        // Receipt + ttl would let a command that waited an hour in a broker still run.
        return Err(bad("\"ttl_ms\" counts from \"ts\": send both"));
    }
    Ok(t)
}

/// The action of `obj`; `common` are the keys every payload may carry besides the action's.
fn action(obj: &Map<String, Value>, common: &[&str]) -> Result<Action, Refusal> {
    let name = match obj.get("action") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(bad("\"action\" must be a string")),
        None => return Err(bad("the command has no \"action\"")),
    };
    let own: &[&str] = match name {
        "write" => &["values"],
        "move" => &["position", "velocity", "relative", "wait"],
        "velocity" => &["velocity"],
        "enable" | "disable" | "quick_stop" | "halt" | "fault_reset" => &[],
        other => {
            return Err(bad(format!(
                "unknown action {:?}; actions: {}",
                short(other),
                Action::NAMES.join(", ")
            )))
        }
    };
    for k in obj.keys() {
        if !common.contains(&k.as_str()) && !own.contains(&k.as_str()) {
            return Err(bad(format!("unknown key {:?} for {name}", short(k))));
        }
    }
    let number = |key: &str| -> Result<Option<f64>, Refusal> {
        match obj.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| bad(format!("{key:?} must be a finite number"))),
        }
    };
    Ok(match name {
        "write" => {
            let Some(Value::Object(values)) = obj.get("values") else {
                return Err(bad("write needs \"values\": {\"field\": number}"));
            };
            if values.is_empty() {
                return Err(bad("\"values\" is empty"));
            }
            let mut out = Vec::with_capacity(values.len());
            for (field, v) in values {
                let x = v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    bad(format!(
                        "value of {:?} must be a finite number",
                        short(field)
                    ))
                })?;
                out.push((field.clone(), x));
            }
            Action::Write { values: out }
        }
        "move" => {
            let position = number("position")?.ok_or_else(|| bad("move needs \"position\""))?;
            let relative = match obj.get("relative") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad("\"relative\" must be true or false")),
            };
            let wait = match obj.get("wait").map(Value::as_str) {
                None | Some(Some("ack")) => Wait::Ack,
                Some(Some("target_reached")) => Wait::TargetReached,
                Some(_) => return Err(bad("\"wait\" must be \"ack\" or \"target_reached\"")),
            };
            Action::Move {
                position,
                velocity: number("velocity")?,
                relative,
                wait,
            }
        }
        "velocity" => Action::Velocity {
            velocity: number("velocity")?.ok_or_else(|| bad("velocity needs \"velocity\""))?,
        },
        "enable" => Action::Enable,
        "disable" => Action::Disable,
        "quick_stop" => Action::QuickStop,
        "halt" => Action::Halt,
        _ => Action::FaultReset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Command, Refusal> {
        parse_command(s.as_bytes(), None)
    }

    fn reason(s: &str) -> CommandReason {
        parse(s).expect_err("refused").reason
    }

    #[test]
    fn a_move_with_every_parameter_parses() {
        let c = parse(
            r#"{"id":"c-0042","action":"move","position":120.5,"velocity":50.0,
                "relative":true,"wait":"target_reached","deadline":"2026-12-06T10:00:00.250Z"}"#,
        )
        .unwrap();
        assert_eq!(c.id.as_str(), "c-0042");
        assert_eq!(
            c.action,
            Action::Move {
                position: 120.5,
                velocity: Some(50.0),
                relative: true,
                wait: Wait::TargetReached
            }
        );
        assert!(c.timing.deadline.is_some());
    }

    #[test]
    fn a_write_keeps_its_values_and_ts_with_ttl_is_a_timing() {
        let c = parse(
            r#"{"id":"c-43","action":"write","values":{"speed_limit":250},"ts":"2026-12-06T10:00:00.000Z","ttl_ms":250}"#,
        )
        .unwrap();
        assert_eq!(
            c.action,
            Action::Write {
                values: vec![("speed_limit".into(), 250.0)]
            }
        );
        assert_eq!(c.timing.ttl, Some(Duration::from_millis(250)));
    }

    #[test]
    fn ids_outside_the_alphabet_or_length_are_bad_requests() {
        for id in ["", "a b", "ä", &"x".repeat(65), "a/b", "a+b"] {
            let payload = serde_json::json!({"id": id, "action": "halt"}).to_string();
            let r = parse(&payload).unwrap_err();
            assert_eq!(r.reason, CommandReason::BadRequest, "{id:?}");
            assert_eq!(r.id, None);
        }
        assert!(CommandId::parse(&"x".repeat(64)).is_some());
        assert!(CommandId::parse("A.z_0:9-").is_some());
    }

    #[test]
    fn malformed_payloads_are_bad_requests_with_the_id_when_there_was_one() {
        assert_eq!(reason("not json"), CommandReason::BadRequest);
        assert_eq!(reason("[1,2]"), CommandReason::BadRequest);
        assert_eq!(reason(r#"{"action":"halt"}"#), CommandReason::BadRequest);
        let r = parse(r#"{"id":"c1","action":"move","postion":1}"#).unwrap_err();
        assert_eq!(
            (r.reason, r.id.unwrap().as_str()),
            (CommandReason::BadRequest, "c1")
        );
        assert_eq!(r.action, Some("move"));
        assert_eq!(
            reason(r#"{"id":"c1","action":"fly"}"#),
            CommandReason::BadRequest
        );
        assert_eq!(
            reason(r#"{"id":"c1","action":"move","position":"1"}"#),
            CommandReason::BadRequest
        );
        assert_eq!(
            reason(r#"{"id":"c1","action":"move","position":1e999}"#),
            CommandReason::BadRequest
        );
        assert_eq!(
            reason(r#"{"id":"c1","action":"halt","ttl_ms":100}"#),
            CommandReason::BadRequest,
            "ttl without ts"
        );
        assert_eq!(
            reason(r#"{"id":"c1","action":"halt","deadline":"2026-12-06T10:00:00+01:00"}"#),
            CommandReason::BadRequest,
            "not UTC"
        );
    }

    #[test]
    fn deep_nesting_and_huge_payloads_are_refused_without_a_panic() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(reason(&deep), CommandReason::BadRequest);
        let huge = format!(
            r#"{{"id":"c1","action":"halt","x":"{}"}}"#,
            "a".repeat(MAX_PAYLOAD)
        );
        assert_eq!(reason(&huge), CommandReason::BadRequest);
    }

    #[test]
    fn the_same_body_in_another_key_order_hashes_the_same() {
        let a = parse(r#"{"id":"c1","action":"move","position":1}"#).unwrap();
        let b = parse(r#"{ "position":1, "action":"move","id":"c1" }"#).unwrap();
        let c = parse(r#"{"id":"c1","action":"move","position":2}"#).unwrap();
        assert_eq!(a.body_hash, b.body_hash);
        assert_ne!(a.body_hash, c.body_hash);
    }

    #[test]
    fn a_group_gives_each_device_its_parameters_and_the_common_action() {
        let g = parse_group(
            br#"{"id":"g-7","action":"move","targets":{"axis-1":{"position":10},"axis-2":{"position":20}},"ttl_ms":300,"ts":"2026-12-06T10:00:00Z"}"#,
            None,
        )
        .unwrap();
        assert_eq!(g.targets.len(), 2);
        assert_eq!(g.targets[1].0, "axis-2");
        assert!(matches!(g.targets[1].1.action, Action::Move { position, .. } if position == 20.0));
        let r = parse_group(
            br#"{"id":"g-8","action":"move","targets":{"axis-1":{"speed":1}}}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(r.reason, CommandReason::BadRequest);
    }

    #[test]
    fn with_a_key_only_a_correctly_signed_payload_opens() {
        let key = SigningKey::new(b"secret".to_vec());
        let inner = r#"{"id":"s1","action":"halt"}"#;
        let sig = sign::sign_hex(&key, inner.as_bytes());
        let good = serde_json::json!({"signed": inner, "sig": sig}).to_string();
        assert_eq!(
            parse_command(good.as_bytes(), Some(&key))
                .unwrap()
                .id
                .as_str(),
            "s1"
        );
        let forged = serde_json::json!({"signed": inner, "sig": "00".repeat(32)}).to_string();
        let r = parse_command(forged.as_bytes(), Some(&key)).unwrap_err();
        assert_eq!(r.reason, CommandReason::BadSignature);
        let plain = parse_command(inner.as_bytes(), Some(&key)).unwrap_err();
        assert_eq!(plain.reason, CommandReason::BadSignature);
    }
}
