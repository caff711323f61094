//! 100,000 generated malformed, oversized and hostile payloads through parsing and the
//! policy: each is answered (a command or a refusal with a reason), none panics, and
//! nothing that is not a well-formed command within every limit ever passes.

use std::time::{Duration, Instant, SystemTime};

use servogate_command::{
    check, parse_command, parse_group, Action, Context, DeviceView, Feedback, Limit, Policy,
    RateLimiter, Rules, SigningKey,
};
use servogate_core::DriveState;

/// Seeded, so a failure is reproducible.
fn pick<'a>(r: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[r.usize(..items.len())]
}

const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "1.5",
    "120.5",
    "250",
    "251",
    "-100.0001",
    "9007199254740993",
    "\"1\"",
    "null",
    "true",
    "[]",
    "{}",
    "0x10",
    "1_000",
];
const IDS: &[&str] = &[
    "\"c-1\"",
    "\"\"",
    "null",
    "1",
    "\"a b\"",
    "\"ä\"",
    "\"c/1\"",
    "\"x:y.z_w-0\"",
    "[]",
];
const ACTIONS: &[&str] = &[
    "\"move\"",
    "\"write\"",
    "\"halt\"",
    "\"quick_stop\"",
    "\"enable\"",
    "\"velocity\"",
    "\"fly\"",
    "\"\"",
    "null",
    "1",
    "\"MOVE\"",
];
const KEYS: &[&str] = &[
    "position",
    "velocity",
    "relative",
    "wait",
    "values",
    "deadline",
    "ts",
    "ttl_ms",
    "postion",
    "id",
    "action",
    "targets",
    "signed",
    "sig",
    "\u{0}",
    "__proto__",
];
const TIMES: &[&str] = &[
    "\"2026-12-06T10:00:00.250Z\"",
    "\"2099-01-01T00:00:00Z\"",
    "\"1969-12-31T23:59:59Z\"",
    "\"2026-12-06T10:00:00+01:00\"",
    "\"yesterday\"",
    "\"\"",
    "0",
    "null",
];

fn value(r: &mut fastrand::Rng, depth: usize) -> String {
    match r.usize(..if depth > 3 { 4 } else { 7 }) {
        0 => pick(r, NUMBERS).to_owned(),
        1 => pick(r, TIMES).to_owned(),
        2 => pick(r, ACTIONS).to_owned(),
        3 => format!("\"{}\"", "x".repeat(r.usize(..200))),
        4 => format!("[{}]", value(r, depth + 1)),
        5 => object(r, depth + 1),
        _ => format!("{{\"speed_limit\":{}}}", pick(r, NUMBERS)),
    }
}

fn object(r: &mut fastrand::Rng, depth: usize) -> String {
    let mut parts = Vec::new();
    if r.usize(..10) > 0 {
        parts.push(format!("\"id\":{}", pick(r, IDS)));
    }
    if r.usize(..10) > 0 {
        parts.push(format!("\"action\":{}", pick(r, ACTIONS)));
    }
    for _ in 0..r.usize(..5) {
        let k = pick(r, KEYS);
        parts.push(format!("{:?}:{}", k, value(r, depth)));
    }
    format!("{{{}}}", parts.join(","))
}

fn payload(r: &mut fastrand::Rng) -> Vec<u8> {
    match r.usize(..12) {
        0 => {
            // Random bytes.
            (0..r.usize(..300)).map(|_| r.u8(..)).collect()
        }
        1 => {
            // Deep nesting.
            let n = 1 + r.usize(..100_000);
            format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()
        }
        2 => {
            // Oversized.
            format!(
                "{{\"id\":\"c-1\",\"action\":\"halt\",\"pad\":\"{}\"}}",
                "a".repeat(20_000)
            )
            .into_bytes()
        }
        3 => {
            // A truncated object.
            let o = object(r, 0);
            let cut = r.usize(..o.len().max(1));
            o.as_bytes()[..cut].to_vec()
        }
        4 => format!(
            "{{\"id\":\"{}\",\"action\":\"halt\"}}",
            "x".repeat(r.usize(..100))
        )
        .into_bytes(),
        _ => object(r, 0).into_bytes(),
    }
}

fn policy() -> Policy {
    Policy {
        allow: Action::NAMES.iter().map(|s| s.to_string()).collect(),
        writable: vec!["speed_limit".into()],
        max_age: Some(Duration::from_millis(500)),
        max_rate: None,
        require_fresh: true,
        stale_after: Duration::from_millis(100),
        limits: [
            (
                "position".to_owned(),
                Limit {
                    min: Some(-100.0),
                    max: Some(500.0),
                    max_step: Some(50.0),
                },
            ),
            (
                "speed_limit".to_owned(),
                Limit {
                    min: Some(0.0),
                    max: Some(250.0),
                    max_step: None,
                },
            ),
        ]
        .into_iter()
        .collect(),
        fields: vec!["position".into(), "speed_limit".into()],
    }
}

#[test]
fn a_hundred_thousand_hostile_payloads_never_panic_and_never_pass_unchecked() {
    let mut r = fastrand::Rng::with_seed(0x5EED_0FC0_FFEE);
    let received = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_551_200); // 2026-12-06T10:00:00Z
    let view = DeviceView {
        online: Some(true),
        feedback: Some(Feedback {
            at: received,
            good: true,
            state: Some(DriveState::OperationEnabled),
            position: Some(100.0),
        }),
    };
    let rules = Rules::default();
    let key = SigningKey::new(b"0123456789abcdef".to_vec());
    let (mut accepted, mut refused) = (0u32, 0u32);
    for i in 0..100_000 {
        let bytes = payload(&mut r);
        // Every fifth through the signed path, every seventh as a group.
        let signing = (i % 5 == 0).then_some(&key);
        if i % 7 == 0 {
            let _ = parse_group(&bytes, signing);
        }
        match parse_command(&bytes, signing) {
            Err(_) => refused += 1,
            Ok(cmd) => {
                let cx = Context {
                    view: &view,
                    rules: &rules,
                    received,
                    now: Instant::now(),
                    expiry: None,
                };
                match check(&cmd, &policy(), &mut RateLimiter::default(), cx) {
                    Err(_) => refused += 1,
                    Ok(deadline) => {
                        accepted += 1;
                        assert!(deadline > received);
                        match &cmd.action {
                            Action::Move {
                                position,
                                relative: false,
                                ..
                            } => {
                                assert!((50.0..=150.0).contains(position), "{cmd:?}")
                            }
                            Action::Write { values } => {
                                assert!(values
                                    .iter()
                                    .all(|(f, v)| f == "speed_limit" && (0.0..=250.0).contains(v)))
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    println!("{accepted} accepted, {refused} refused");
    assert_eq!(accepted + refused, 100_000);
    assert!(refused > 50_000, "the generator mostly makes bad payloads");
    assert!(
        accepted > 0,
        "and some good ones, so the check is not vacuous"
    );
}
