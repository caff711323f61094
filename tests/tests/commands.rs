//! Commands end to end (DESIGN.md section 7): real mosquitto, servosim on a pty, the
//! servogate binary. Every test checks what reached the drive with servosim's write
//! counters, not only the result that was published.

use std::time::{Duration, SystemTime};

use rumqttc::QoS;
use serde_json::{json, Value};
use servogate_e2e::*;

const ID: &str = "e2e-cmd";

/// The servosim map with the command registers, and a policy on every device.
fn cmd_config(broker: &str, port: &std::path::Path, policy: &str) -> String {
    command_config(ID, broker, port, policy)
}

const POLICY: &str = r#"
[devices.commands]
allow = ["enable", "disable", "quick_stop", "halt", "fault_reset", "move", "write"]
writable = ["speed_limit"]
max_rate = 50
require_fresh = false
limits.position = { min = -200.0, max = 300.0, max_step = 50.0 }
limits.velocity = { min = 0.0, max = 200.0 }
limits.speed_limit = { min = 0, max = 250 }
"#;

fn now() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(t: SystemTime) -> String {
    // The same format as the gateway's (RFC 3339, UTC, milliseconds).
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A command with `ts` now and a 2 s time to live.
fn cmd(id: &str, action: &str, extra: Value) -> String {
    let mut v = json!({"id": id, "action": action, "ts": now(), "ttl_ms": 2000});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v.to_string()
}

/// The next result for `id` on `device`'s result topic.
async fn result(sub: &mut Subscriber, device: &str, id: Option<&str>) -> Value {
    command_result(sub, device, id).await
}

/// `writes` and `applied` of `unit` from servosim's stats line.
fn writes(sim: &mut Servosim, unit: u8) -> (u64, u64) {
    sim.stats_pair("writes", "applied", unit)
}

impl Rig {
    /// Sends `cmd(id, action, extra)` to `device` and returns its result.
    async fn ask(&mut self, device: &str, id: &str, action: &str, extra: Value) -> Value {
        self.cmd.send(device, &cmd(id, action, extra), false).await;
        result(&mut self.sub, device, Some(id)).await
    }
}

struct Rig {
    broker: Mosquitto,
    /// The config the gateway runs with.
    config: String,
    _pty: PtyPair,
    sim: Servosim,
    gw: Servogate,
    sub: Subscriber,
    cmd: Commander,
}

async fn rig(policy: &str) -> Rig {
    rig_with_retained(policy, &[]).await
}

/// A rig whose broker holds `retained` (device, payload) commands before the gateway
/// subscribes: the broker then delivers them with the retain flag set.
async fn rig_with_retained(policy: &str, retained: &[(&str, String)]) -> Rig {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/#")).await;
    let cmd = Commander::start(broker.port, &format!("servogate/{ID}")).await;
    for (device, payload) in retained {
        cmd.send(device, payload, true).await;
        // Wait for the broker to have it: our own subscriber sees it come by.
        let topic = format!("/devices/{device}/cmd");
        let seen = sub.until(|m| m.topic.ends_with(&topic));
        tokio::time::timeout(DEADLINE, seen)
            .await
            .expect("the retained command stored");
    }
    let config = cmd_config(&broker.url(), &pty.gateway, policy);
    rig_from(broker, pty, sim, sub, cmd, config, retained.is_empty()).await
}

async fn rig_from(
    broker: Mosquitto,
    pty: PtyPair,
    sim: Servosim,
    mut sub: Subscriber,
    cmd: Commander,
    config: String,
    wait_telemetry: bool,
) -> Rig {
    let gw = Servogate::start(&config);
    // Every device online with telemetry before the first command (unless results of
    // the retained ones come first: then the test reads those before anything else).
    let mut seen = std::collections::HashSet::new();
    while wait_telemetry && seen.len() < 3 {
        let m = sub.next().await;
        if let Some((d, "telemetry")) = m.device_stream() {
            seen.insert(d.to_owned());
        }
    }
    Rig {
        broker,
        config,
        _pty: pty,
        sim,
        gw,
        sub,
        cmd,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axis_is_enabled_moved_to_its_target_and_quick_stopped() {
    let mut r = rig(POLICY).await;
    // An untouched servosim unit runs enabled: disable it, so enable walks the states.
    let dis = r.ask("axis-1", "dis-1", "disable", json!({})).await;
    assert_eq!(dis["status"], "done", "{dis}");
    let en = r.ask("axis-1", "en-1", "enable", json!({})).await;
    assert_eq!(en["status"], "done", "{en}");
    assert!(en["seq"].as_u64().unwrap() >= 1);

    // Wait for telemetry that shows the enabled drive, then move 20 mm from there.
    let enabled = r.sub.until(|m| {
        m.device_stream() == Some(("axis-1", "telemetry")) && m.json["statusword"] == 0x0637
    });
    let tel = tokio::time::timeout(DEADLINE, enabled)
        .await
        .expect("enabled telemetry");
    let target = tel.json["position"].as_f64().unwrap() + 20.0;
    let mv = cmd(
        "mv-1",
        "move",
        json!({"position": target, "velocity": 100.0, "wait": "target_reached"}),
    );
    r.cmd.send("axis-1", &mv, false).await;
    let res = result(&mut r.sub, "axis-1", Some("mv-1")).await;
    assert_eq!(res["status"], "done", "{res}");
    println!("move done in {} ms", res["latency_ms"]);
    // The drive stands on the target, and telemetry says so.
    let truth: Value =
        serde_json::from_str(r.sim.cmd("truth 1").trim_start_matches("ok ")).unwrap();
    assert!(
        (truth["position_mm"].as_f64().unwrap() - target).abs() < 1e-6,
        "{truth}"
    );
    let at = r
        .sub
        .until(|m| m.device_stream() == Some(("axis-1", "telemetry")))
        .await;
    assert!(
        (at.json["position"].as_f64().unwrap() - target).abs() < 0.0015,
        "{}",
        at.json
    );

    let qs = r.ask("axis-1", "qs-1", "quick_stop", json!({})).await;
    assert_eq!(qs["status"], "done", "{qs}");
    let truth: Value =
        serde_json::from_str(r.sim.cmd("truth 1").trim_start_matches("ok ")).unwrap();
    assert_eq!(truth["state"], "quick_stop_active");
    let (w, applied) = writes(&mut r.sim, 1);
    assert_eq!(w, applied, "every write reached the drive and was taken");
    assert_eq!(
        w,
        1 + 2 + 6 + 1,
        "disable 1, enable 2, move 6, quick stop 1"
    );
    // The other units received nothing.
    assert_eq!(writes(&mut r.sim, 2), (0, 0));
    r.gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_answered_with_its_reason_and_nothing_reaches_the_drive() {
    let policy = POLICY.replace("max_rate = 50", "max_rate = 5");
    // A command retained on the broker is stale: never executed, even when well-formed.
    let stale = cmd("r-ret", "move", json!({"position": 1.0}));
    let mut r = rig_with_retained(&policy, &[("axis-2", stale)]).await;
    let res = result(&mut r.sub, "axis-2", Some("r-ret")).await;
    assert_eq!(res["reason"], "retained", "{res}");
    let past = rfc3339(SystemTime::now() - Duration::from_secs(5));
    let future = rfc3339(SystemTime::now() + Duration::from_secs(30));
    let cases: Vec<(&str, String, &str, bool)> = vec![
        ("bad", "not json".into(), "bad_request", false),
        (
            "no-id",
            json!({"action": "halt"}).to_string(),
            "bad_request",
            false,
        ),
        (
            "r-field",
            cmd("r-field", "write", json!({"values": {"torque_limit": 1}})),
            "unknown_field",
            false,
        ),
        (
            "r-na",
            cmd("r-na", "write", json!({"values": {"statusword": 1}})),
            "not_allowed",
            false,
        ),
        (
            "r-range",
            cmd("r-range", "write", json!({"values": {"speed_limit": 300}})),
            "out_of_range",
            false,
        ),
        (
            "r-step",
            cmd(
                "r-step",
                "move",
                json!({"position": 250.0, "relative": true}),
            ),
            "step_too_large",
            false,
        ),
        (
            "r-none",
            json!({"id": "r-none", "action": "move", "position": 1.0}).to_string(),
            "no_deadline",
            false,
        ),
        (
            "r-skew",
            json!({"id": "r-skew", "action": "move", "position": 1.0, "ts": future, "ttl_ms": 100})
                .to_string(),
            "clock_skew",
            false,
        ),
        (
            "r-exp",
            json!({"id": "r-exp", "action": "move", "position": 1.0, "deadline": past}).to_string(),
            "expired",
            false,
        ),
    ];
    for (id, payload, reason, retain) in &cases {
        r.cmd.send("axis-2", payload, *retain).await;
        let want = (*id != "bad" && *id != "no-id").then_some(*id);
        let res = result(&mut r.sub, "axis-2", want).await;
        assert_eq!(
            res["status"],
            if *reason == "expired" {
                "expired"
            } else {
                "rejected"
            },
            "{id}: {res}"
        );
        assert_eq!(res["reason"], *reason, "{id}: {res}");
    }
    // id_reused: the same id with another body.
    r.cmd
        .send("axis-2", &cmd("r-ret", "halt", json!({})), false)
        .await;
    // (r-ret was retained, so never recorded: this one is new and a halt is done)
    let res = result(&mut r.sub, "axis-2", Some("r-ret")).await;
    assert_eq!(res["status"], "done", "{res}");
    let res = r.ask("axis-2", "r-ret", "disable", json!({})).await;
    assert_eq!(res["reason"], "id_reused", "{res}");
    // wrong_state: a move needs operation_enabled; axis-3 is disabled first.
    r.cmd
        .send("axis-3", &cmd("ws-0", "disable", json!({})), false)
        .await;
    assert_eq!(
        result(&mut r.sub, "axis-3", Some("ws-0")).await["status"],
        "done"
    );
    let (w3, _) = writes(&mut r.sim, 3);
    r.sub
        .until(|m| {
            m.device_stream() == Some(("axis-3", "telemetry"))
                && m.json["state"] != "operation_enabled"
        })
        .await;
    r.cmd
        .send(
            "axis-3",
            &cmd("ws-1", "move", json!({"position": 1.0})),
            false,
        )
        .await;
    assert_eq!(
        result(&mut r.sub, "axis-3", Some("ws-1")).await["reason"],
        "wrong_state"
    );
    assert_eq!(
        writes(&mut r.sim, 3).0,
        w3,
        "the refused move wrote nothing"
    );

    // The refusals on axis-2 wrote nothing: only the halt's statusword read went out
    // (a halt of a drive at rest writes nothing either, but axis-2 is enabled: one write).
    let (w2, _) = writes(&mut r.sim, 2);
    assert!(w2 <= 2, "halt 1 + disable 0 (id_reused): {w2}");

    // rate_limited: max_rate 5/s, so a burst of 8 moves is cut.
    let mut limited = 0;
    for i in 0..8 {
        let id = format!("rl-{i}");
        r.cmd
            .send(
                "axis-1",
                &cmd(&id, "write", json!({"values": {"speed_limit": 100 + i}})),
                false,
            )
            .await;
        if result(&mut r.sub, "axis-1", Some(&id)).await["reason"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited >= 2, "{limited} of 8 rate limited");
    assert_eq!(
        writes(&mut r.sim, 1).0,
        8 - limited,
        "only the accepted writes reached the drive"
    );
    r.gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_three_times_writes_once_and_answers_three_times() {
    let mut r = rig(POLICY).await;
    let payload = cmd("dup-1", "write", json!({"values": {"speed_limit": 150}}));
    for _ in 0..3 {
        r.cmd.send("axis-1", &payload, false).await;
    }
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(result(&mut r.sub, "axis-1", Some("dup-1")).await);
    }
    assert!(results.iter().all(|r| r["status"] == "done"), "{results:?}");
    let dups = results.iter().filter(|r| r["duplicate"] == true).count();
    assert_eq!(dups, 2, "{results:?}");
    let seqs: Vec<u64> = results.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(writes(&mut r.sim, 1), (1, 1), "one write on the wire");
    r.gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drive_refusal_is_failed_a_lost_echo_is_unknown_and_polling_goes_on() {
    let mut r = rig(POLICY).await;
    r.sim.cmd("reject 1 4");
    let res = r
        .ask(
            "axis-1",
            "ex-1",
            "write",
            json!({"values": {"speed_limit": 120}}),
        )
        .await;
    assert_eq!(
        (res["status"].as_str(), res["reason"].as_str()),
        (Some("failed"), Some("exception")),
        "{res}"
    );
    assert_eq!(writes(&mut r.sim, 1), (1, 0), "received, not applied");
    r.sim.cmd("accept 1");

    r.sim.cmd("mute-writes 1");
    let res = r
        .ask(
            "axis-1",
            "to-1",
            "write",
            json!({"values": {"speed_limit": 130}}),
        )
        .await;
    assert_eq!(
        (res["status"].as_str(), res["reason"].as_str()),
        (Some("unknown"), Some("timeout")),
        "{res}"
    );
    assert_eq!(writes(&mut r.sim, 1), (2, 1), "applied once, never retried");
    // Polling goes on: fresh telemetry of axis-1 after the unknown write.
    let before = r
        .sub
        .until(|m| m.device_stream() == Some(("axis-1", "telemetry")))
        .await;
    let after = r
        .sub
        .until(|m| m.device_stream() == Some(("axis-1", "telemetry")))
        .await;
    assert!(after.json["seq"].as_u64() > before.json["seq"].as_u64());
    r.gw.stop();
}

async fn until_device(
    sub: &mut Subscriber,
    device: &str,
    stream: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let wait = sub.until(|m| m.device_stream() == Some((device, stream)) && pred(&m.json));
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {stream} of {device} as expected"))
        .json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_stale_feedback_and_a_bus_down_are_refused_before_any_frame() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let sim = Servosim::start(&pty.sim, "1-3", &[]);
    let sub = Subscriber::start(broker.port, &format!("servogate/{ID}/#")).await;
    let commander = Commander::start(broker.port, &format!("servogate/{ID}")).await;
    // A second bus whose port does not exist, with a device whose policy does not ask for
    // fresh feedback: its commands reach the bus task, which cannot send them.
    let config = format!(
        "{}\n[[buses]]\nname = \"rs485-b\"\nprotocol = \"modbus-rtu\"\nport = \"/nonexistent/ttyX\"\nbaud = 115200\n\n\
         [[devices]]\nname = \"axis-9\"\nbus = \"rs485-b\"\nunit = 9\nprofile = \"sim\"\npoll = \"10ms\"\n\n\
         [devices.commands]\nallow = [\"write\"]\nwritable = [\"speed_limit\"]\nmax_age = \"500ms\"\n",
        cmd_config(
            &broker.url(),
            &pty.gateway,
            // Fresh feedback required here only: a loaded machine's late reply would
            // refuse the other tests' commands.
            &POLICY.replace("require_fresh = false", "require_fresh = true")
        )
    );
    let mut r = rig_from(broker, pty, sim, sub, commander, config, true).await;

    r.sim.cmd("dead 2");
    until_device(&mut r.sub, "axis-2", "availability", |j| {
        j["state"] == "offline"
    })
    .await;
    let res = r
        .ask(
            "axis-2",
            "off-1",
            "write",
            json!({"values": {"speed_limit": 100}}),
        )
        .await;
    assert_eq!(res["reason"], "device_offline", "{res}");
    // A stop still goes to an offline drive: only allow can forbid it.
    let res = r.ask("axis-2", "off-2", "quick_stop", json!({})).await;
    assert_eq!(res["status"], "unknown", "sent to a dead unit: {res}");
    r.sim.cmd("alive 2");

    // Late replies make telemetry uncertain: motion and writes wait for good feedback.
    r.sim.cmd("late 3 20ms");
    until_device(&mut r.sub, "axis-3", "telemetry", |j| {
        j["quality"] == "uncertain"
    })
    .await;
    let res = r
        .ask(
            "axis-3",
            "st-1",
            "write",
            json!({"values": {"speed_limit": 100}}),
        )
        .await;
    assert_eq!(res["reason"], "stale_feedback", "{res}");
    r.sim.cmd("ontime 3");

    let res = r
        .ask(
            "axis-9",
            "bd-1",
            "write",
            json!({"values": {"speed_limit": 100}}),
        )
        .await;
    assert_eq!(
        (res["status"].as_str(), res["reason"].as_str()),
        (Some("rejected"), Some("bus_down")),
        "{res}"
    );

    // Unit 2 received the quick stop (it was dead: received, not applied) and nothing else.
    assert_eq!(writes(&mut r.sim, 2), (1, 0));
    assert_eq!(writes(&mut r.sim, 3), (0, 0));
    r.gw.stop();
}

/// `servogate cmd --config CONFIG ARGS`, as a user types it.
async fn servogate_cmd(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        program("servogate")
            .args(["cmd", "--config"])
            .arg(&config)
            .args(&args)
            .output()
            .expect("servogate cmd")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_only_signed_commands_run_and_servogate_cmd_signs_them() {
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("cmd.key");
    std::fs::write(&key, "an-example-key-of-32-bytes-long!\n").unwrap();
    let policy = format!(
        "{POLICY}# tail\n[commands]\nhmac_key_file = \"{}\"\n",
        key.display()
    );
    let mut r = rig(&policy).await;
    // Unsigned, and signed with another key: refused, nothing written.
    r.cmd
        .send(
            "axis-1",
            &cmd("s-1", "write", json!({"values": {"speed_limit": 100}})),
            false,
        )
        .await;
    let res = result(&mut r.sub, "axis-1", None).await;
    assert_eq!(res["reason"], "bad_signature", "{res}");
    let inner = cmd("s-2", "write", json!({"values": {"speed_limit": 100}}));
    let forged = json!({"signed": inner, "sig": "ab".repeat(32)}).to_string();
    r.cmd.send("axis-1", &forged, false).await;
    let res = result(&mut r.sub, "axis-1", None).await;
    assert_eq!(res["reason"], "bad_signature", "{res}");
    assert_eq!(writes(&mut r.sim, 1), (0, 0));

    // servogate cmd signs with the config's key: done, exit 0, one write.
    let out = servogate_cmd(
        &r.gw.config,
        &["axis-1", "write", "speed_limit=111", "--ttl", "2s"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_str(stdout.trim()).expect("the result as JSON");
    assert_eq!(printed["status"], "done");
    assert_eq!(writes(&mut r.sim, 1), (1, 1));
    // And a refused one exits 1 with the result printed.
    let out = servogate_cmd(&r.gw.config, &["axis-1", "write", "speed_limit=999"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("out_of_range"));
    assert_eq!(writes(&mut r.sim, 1), (1, 1));
    r.gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_while_the_gateway_was_down_are_never_executed() {
    let mut r = rig(POLICY).await;
    r.gw.stop();
    // Published while nobody takes them (the gateway's session is clean: the broker keeps
    // nothing for it), and the same commands delivered late, as a queue would.
    let late: Vec<String> = (0..5)
        .map(|i| {
            cmd(
                &format!("q-{i}"),
                "write",
                json!({"values": {"speed_limit": 50 + i}}),
            )
        })
        .collect();
    for p in &late {
        r.cmd.send("axis-1", p, false).await;
    }
    // Their 2 s time to live passes before the gateway is back.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    r.gw = Servogate::start(&r.config);
    // The first gateway's farewell, then the new one's birth (it has subscribed by then:
    // its SUBSCRIBE goes out before its first publish), then its telemetry.
    let status = format!("servogate/{ID}/status");
    for online in [false, true] {
        let wait = r
            .sub
            .until(|m| m.topic == status && m.json["online"] == online);
        tokio::time::timeout(DEADLINE, wait).await.expect("status");
    }
    until_device(&mut r.sub, "axis-1", "telemetry", |_| true).await;
    for p in &late {
        r.cmd.send("axis-1", p, false).await;
    }
    for i in 0..5 {
        let res = result(&mut r.sub, "axis-1", Some(&format!("q-{i}"))).await;
        assert_eq!(
            (res["status"].as_str(), res["reason"].as_str()),
            (Some("expired"), Some("expired")),
            "{res}"
        );
    }
    assert_eq!(writes(&mut r.sim, 1), (0, 0), "0 expired commands executed");
    r.gw.stop();
    drop(r.broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_policy_applies_to_the_next_command() {
    let port = free_port();
    let policy = format!("{POLICY}# tail\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut r = rig(&policy).await;
    r.cmd
        .send(
            "axis-1",
            &cmd("rl-a", "write", json!({"values": {"speed_limit": 240}})),
            false,
        )
        .await;
    assert_eq!(
        result(&mut r.sub, "axis-1", Some("rl-a")).await["status"],
        "done"
    );
    let tighter = r.config.replace(
        "limits.speed_limit = { min = 0, max = 250 }",
        "limits.speed_limit = { min = 0, max = 200 }",
    );
    assert_ne!(tighter, r.config);
    r.gw.reload(&tighter);
    scrape_until(port, "the reload", |t| {
        sample(t, r#"servogate_reloads_total{result="ok"}"#) == Some(1.0)
    })
    .await;
    let res = r
        .ask(
            "axis-1",
            "rl-b",
            "write",
            json!({"values": {"speed_limit": 240}}),
        )
        .await;
    assert_eq!(res["reason"], "out_of_range", "{res}");
    assert_eq!(writes(&mut r.sim, 1), (1, 1));
    // The metrics count both, by device, action and status.
    let text = scrape_until(port, "the command counters", |t| {
        sample(
            t,
            r#"servogate_commands_total{device="axis-1",action="write",status="rejected"}"#,
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(
            &text,
            r#"servogate_commands_total{device="axis-1",action="write",status="done"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "servogate_command_latency_seconds_count"),
        Some(2.0)
    );
    r.gw.stop();
}

/// Seeded, so a failure is reproducible.
fn pick<'a>(r: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[r.usize(..items.len())]
}

/// One hostile payload: bad JSON, wrong types, non-finite numbers, huge ids, unknown
/// fields, deep nesting, oversized (past the 16 KiB a command may have), random bytes.
fn hostile(r: &mut fastrand::Rng) -> Vec<u8> {
    let num = [
        "0", "-1", "1e308", "1e999", "NaN", "Infinity", "120.5", "\"1\"", "null", "[]",
    ];
    let ids = [
        "\"c-1\"",
        "\"\"",
        "null",
        "1",
        "\"a b\"",
        "\"ä\"",
        "\"c/1\"",
        "\"x.y:z-0\"",
    ];
    let actions = [
        "\"move\"",
        "\"write\"",
        "\"halt\"",
        "\"quick_stop\"",
        "\"fly\"",
        "null",
        "7",
    ];
    let keys = [
        "position", "velocity", "values", "deadline", "ts", "ttl_ms", "postion", "targets",
        "signed",
    ];
    match r.usize(..10) {
        0 => (0..r.usize(..200)).map(|_| r.u8(..)).collect(),
        1 => {
            let n = 1 + r.usize(..5000);
            format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()
        }
        2 => format!(
            r#"{{"id":"c-2","action":"halt","pad":"{}"}}"#,
            "a".repeat(20_000)
        )
        .into_bytes(),
        3 => format!(
            r#"{{"id":"{}","action":"move","position":1}}"#,
            "x".repeat(65 + r.usize(..500))
        )
        .into_bytes(),
        _ => {
            let mut parts = vec![
                format!("\"id\":{}", pick(r, &ids)),
                format!("\"action\":{}", pick(r, &actions)),
            ];
            for _ in 0..r.usize(..4) {
                parts.push(format!("\"{}\":{}", pick(r, &keys), pick(r, &num)));
            }
            if r.usize(..3) == 0 {
                parts.push(format!(
                    "\"values\":{{\"{}\":{}}}",
                    pick(r, &["speed_limit", "nope", "statusword"]),
                    pick(r, &num)
                ));
            }
            let text = format!("{{{}}}", parts.join(","));
            let cut = if r.usize(..8) == 0 {
                r.usize(..text.len())
            } else {
                text.len()
            };
            text.as_bytes()[..cut].to_vec()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_hostile_payloads_get_answers_and_never_a_frame_on_the_bus() {
    const TOTAL: usize = 100_000;
    let port = free_port();
    // Every action refused by the policy: whatever the generator makes well-formed by
    // chance must not move a drive either.
    let policy = format!(
        "\n[devices.commands]\nallow = []\n# tail\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    let mut r = rig(&policy).await;
    let mut rng = fastrand::Rng::with_seed(0x0DD_BA11_5EED);
    let (mut results, mut unknown, mut sent) = (0usize, 0usize, 0usize);
    while sent < TOTAL {
        // In chunks, each answered before the next, so the intake (256) never overflows
        // and every payload reaches the parser.
        let chunk = 200.min(TOTAL - sent);
        for _ in 0..chunk {
            let device = match rng.usize(..20) {
                0 => {
                    unknown += 1;
                    format!("ghost-{}", rng.usize(..1_000_000))
                }
                _ => format!("axis-{}", 1 + rng.usize(..3)),
            };
            let payload = hostile(&mut rng);
            let topic = format!("servogate/{ID}/devices/{device}/cmd");
            r.cmd
                .client
                .publish(topic, QoS::AtMostOnce, false, payload)
                .await
                .expect("publish");
        }
        sent += chunk;
        let answered = async {
            while results < sent - unknown {
                let m = r.sub.next().await;
                if m.topic.ends_with("/cmd/result") {
                    results += 1;
                }
            }
        };
        tokio::time::timeout(DEADLINE, answered)
            .await
            .unwrap_or_else(|_| panic!("payloads up to {sent} not all answered"));
    }
    let text = scrape_until(port, "the counters", |_| true).await;
    let dropped = sample(&text, "servogate_commands_dropped_total").unwrap();
    let ghosts = sample(&text, "servogate_commands_unknown_device_total").unwrap();
    println!("{results} results, {ghosts} unknown devices, {dropped} dropped of {sent}");
    assert_eq!(dropped, 0.0);
    assert_eq!(ghosts as usize, unknown);
    assert_eq!(
        results + unknown,
        TOTAL,
        "every payload answered or counted"
    );
    for unit in 1..=3 {
        assert_eq!(
            writes(&mut r.sim, unit),
            (0, 0),
            "unit {unit}: nothing reached the drive"
        );
    }
    // The gateway is alive and still polling.
    until_device(&mut r.sub, "axis-1", "telemetry", |_| true).await;
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_move_runs_on_every_axis_or_on_none() {
    let mut r = rig(POLICY).await;
    // 10 mm from where each axis is when the move starts. Relative steps: servosim's
    // untouched axes move on their own (up to 175 mm/s), so an absolute target computed
    // from a position read a moment earlier is a step that grows with the delay.
    let mut targets = serde_json::Map::new();
    for unit in 1..=3u8 {
        targets.insert(
            format!("axis-{unit}"),
            json!({"position": 10.0, "relative": true}),
        );
    }
    // One target out of its limits: nobody moves.
    let mut bad = targets.clone();
    bad.insert("axis-2".into(), json!({"position": 400.0}));
    let g = json!({"id": "g-bad", "action": "move", "targets": bad, "ts": now(), "ttl_ms": 2000});
    r.cmd
        .client
        .publish(
            format!("servogate/{ID}/cmd"),
            QoS::AtLeastOnce,
            false,
            g.to_string(),
        )
        .await
        .unwrap();
    let res = group_result(&mut r.sub, &format!("servogate/{ID}"), "g-bad").await;
    assert_eq!(
        (res["status"].as_str(), res["reason"].as_str()),
        (Some("rejected"), Some("group_rejected")),
        "{res}"
    );
    assert_eq!(res["devices"]["axis-2"]["reason"], "out_of_range", "{res}");
    assert_eq!(
        res["devices"]["axis-1"]["reason"], "group_rejected",
        "{res}"
    );
    for unit in 1..=3 {
        assert_eq!(writes(&mut r.sim, unit), (0, 0));
    }

    let g = json!({"id": "g-1", "action": "move", "wait": "target_reached", "targets": targets.clone(), "ts": now(), "ttl_ms": 2000});
    // `wait` is a per-target parameter: put it in each.
    let mut with_wait = targets.clone();
    for v in with_wait.values_mut() {
        v["wait"] = json!("target_reached");
        v["velocity"] = json!(100.0);
    }
    let g = {
        let mut g = g;
        g["targets"] = Value::Object(with_wait);
        g.as_object_mut().unwrap().remove("wait");
        g
    };
    r.cmd
        .client
        .publish(
            format!("servogate/{ID}/cmd"),
            QoS::AtLeastOnce,
            false,
            g.to_string(),
        )
        .await
        .unwrap();
    let res = group_result(&mut r.sub, &format!("servogate/{ID}"), "g-1").await;
    assert_eq!(res["status"], "done", "{res}");
    for unit in 1..=3u8 {
        assert_eq!(
            res["devices"][format!("axis-{unit}")]["status"],
            "done",
            "{res}"
        );
        let truth: Value = serde_json::from_str(
            r.sim
                .cmd(&format!("truth {unit}"))
                .trim_start_matches("ok "),
        )
        .unwrap();
        // The drive took the move and stands on its set point.
        let want = truth["target_position_mm"].as_f64().expect("a set point");
        assert!(
            (truth["position_mm"].as_f64().unwrap() - want).abs() < 1e-6,
            "{truth}"
        );
    }
    // The same group again: its stored result, nothing sent twice.
    let before: Vec<(u64, u64)> = (1..=3).map(|u| writes(&mut r.sim, u)).collect();
    r.cmd
        .client
        .publish(
            format!("servogate/{ID}/cmd"),
            QoS::AtLeastOnce,
            false,
            g.to_string(),
        )
        .await
        .unwrap();
    let again = group_result(&mut r.sub, &format!("servogate/{ID}"), "g-1").await;
    assert_eq!(again["duplicate"], true, "{again}");
    let after: Vec<(u64, u64)> = (1..=3).map(|u| writes(&mut r.sim, u)).collect();
    assert_eq!(before, after);
    r.gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_during_flat_out_polling_goes_out_ahead_of_the_polls() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    // Six units charging real wire time: each poll reads 120 registers (about 25 ms at
    // 115200 baud), so a round of six polls takes about 150 ms.
    let mut sim = Servosim::start(&pty.sim, "1-6", &["--timing-faithful"]);
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/#")).await;
    let units = [1, 2, 3, 4, 5, 6];
    let config = config(ID, &broker.url(), &pty.gateway, &units, POLICY)
        .replace(
            "[[buses]]",
            "pad = { address = 0x0077, type = \"u16\" }\nspeed_limit = { address = 0x0018, type = \"u16\" }\n\n[[buses]]",
        )
        .replace("t35 = \"0ms\"", "t35 = \"0ms\"\nmax_gap = 125")
        .replace("poll = \"10ms\"", "poll = \"1ms\"")
        .replace("allow = [\"enable\", \"disable\", \"quick_stop\", \"halt\", \"fault_reset\", \"move\", \"write\"]", "allow = [\"write\"]")
        .replace("limits.position = { min = -200.0, max = 300.0, max_step = 50.0 }\n", "")
        .replace("limits.velocity = { min = 0.0, max = 200.0 }\n", "");
    let mut gw = Servogate::start(&config);
    let cmd_client = Commander::start(broker.port, &format!("servogate/{ID}")).await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 6 {
        let m = sub.next().await;
        if let Some((d, "telemetry")) = m.device_stream() {
            seen.insert(d.to_owned());
        }
    }
    // The simulator's model clock against the wall clock (both read here, within a
    // millisecond or two), to place the gateway's receipt of each command on the line.
    // Of ten readings, the one whose round trip to servosim was shortest.
    let wall = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let mut best = (i64::MAX, 0i64);
    for _ in 0..10 {
        let before = wall();
        let truth: Value =
            serde_json::from_str(sim.cmd("truth 1").trim_start_matches("ok ")).unwrap();
        let after = wall();
        let t_ms = truth["t_ms"].as_i64().unwrap();
        if after - before < best.0 {
            best = (after - before, (before + after) / 2 - t_ms);
        }
    }
    let offset = best.1;
    println!("clock offset {offset} ms, read within {} ms", best.0);
    // One write first, not measured: under qemu-user the first command's path through
    // the gateway is translated as it runs (about 70 ms more, measured: two or three
    // polls go out meanwhile), which says nothing of the order on the line.
    let warm = cmd("warm-up", "write", json!({"values": {"speed_limit": 99}}));
    cmd_client.send("axis-3", &warm, false).await;
    assert_eq!(
        result(&mut sub, "axis-3", Some("warm-up")).await["status"],
        "done"
    );
    let mut worst = 0;
    for i in 0..5 {
        let id = format!("ahead-{i}");
        let payload = cmd(&id, "write", json!({"values": {"speed_limit": 100 + i}}));
        cmd_client.send("axis-3", &payload, false).await;
        let res = result(&mut sub, "axis-3", Some(&id)).await;
        assert_eq!(res["status"], "done", "{res}");
        let received = parse_ms(res["received"].as_str().unwrap()) - offset;
        // The polls that reached the line after the gateway took the command, up to its
        // write.
        let journal = sim.cmd("journal");
        let entries: Vec<(i64, i64, i64)> = journal
            .trim_start_matches("ok journal ")
            .split(',')
            .map(|e| {
                let mut p = e.split(':').map(|n| n.parse::<i64>().unwrap());
                (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
            })
            .filter(|e| e.2 >= received)
            .collect();
        let write_at = entries
            .iter()
            .position(|e| e.0 == 3 && e.1 == 6)
            .expect("the write in the journal");
        let polls_before = entries[..write_at].iter().filter(|e| e.1 == 3).count();
        println!(
            "command {i}: {polls_before} poll(s) after its receipt before its write, latency {} ms",
            res["latency_ms"]
        );
        worst = worst.max(polls_before);
    }
    // The poll in flight when it arrived ends first (measured: it reaches the line in the
    // same millisecond as the receipt, so it counts here); one more is allowed for a
    // loaded machine's scheduling between the receipt and the bus. Waiting its turn as a
    // device due would put up to five polls of the round of six before it.
    assert!(worst <= 2, "a command waited behind {worst} polls");
    assert_eq!(writes(&mut sim, 3), (6, 6), "the warm-up and the five");
    gw.stop();
}

/// Milliseconds since 1970 of an RFC 3339 UTC time as the gateway writes it
/// (`2026-12-06T10:00:00.250Z`).
fn parse_ms(t: &str) -> i64 {
    let n = |a: usize, b: usize| t[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + n(11, 13)) * 60 + n(14, 16)) * 60_000 + n(17, 19) * 1000 + n(20, 23)
}

#[test]
fn parse_ms_reads_what_rfc3339_writes() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_551_200_250);
    assert_eq!(parse_ms(&rfc3339(t)), 1_796_551_200_250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_larger_than_the_packet_limit_costs_a_reconnect_and_loses_no_event() {
    let port = free_port();
    let policy = format!("{POLICY}# tail\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut r = rig(&policy).await;
    // 200 KiB: past the gateway's max_packet_size (64 KiB by default).
    let huge = format!(
        r#"{{"id":"big","action":"halt","pad":"{}"}}"#,
        "a".repeat(200 * 1024)
    );
    r.cmd.send("axis-1", &huge, false).await;
    // rumqttc refuses the packet and drops the connection; the gateway reconnects and
    // the ring publishes again whatever was not acknowledged.
    let text = scrape_until(port, "a reconnect", |t| {
        sample(t, "servogate_mqtt_connects_total").is_some_and(|n| n >= 2.0)
    })
    .await;
    println!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("servogate_mqtt"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Telemetry goes on with every seq, and a normal command works again.
    let mut last = None;
    for _ in 0..50 {
        let t = until_device(&mut r.sub, "axis-2", "telemetry", |_| true).await;
        let seq = t["seq"].as_u64().unwrap();
        if let Some(l) = last {
            assert!(seq == l + 1 || seq <= l, "gap: {l} -> {seq}");
        }
        last = Some(seq.max(last.unwrap_or(0)));
    }
    r.cmd
        .send(
            "axis-1",
            &cmd("after-big", "write", json!({"values": {"speed_limit": 90}})),
            false,
        )
        .await;
    assert_eq!(
        result(&mut r.sub, "axis-1", Some("after-big")).await["status"],
        "done"
    );
    assert_eq!(
        writes(&mut r.sim, 1),
        (1, 1),
        "the oversized one reached nothing"
    );
    r.gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_gives_the_first_device_a_policy_subscribes_to_commands() {
    let port = free_port();
    let metrics = format!("# tail\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut r = rig(&metrics).await;
    // The same file with a policy on every device.
    let with_policy = r
        .config
        .replace("poll = \"10ms\"\n", &format!("poll = \"10ms\"\n{POLICY}"));
    assert_ne!(with_policy, r.config);
    r.gw.reload(&with_policy);
    scrape_until(port, "the reload", |t| {
        sample(t, r#"servogate_reloads_total{result="ok"}"#) == Some(1.0)
    })
    .await;
    // The forwarder reconnected with the cmd topics: its birth comes again.
    let status = format!("servogate/{ID}/status");
    for online in [false, true] {
        let wait = r
            .sub
            .until(|m| m.topic == status && m.json["online"] == online);
        tokio::time::timeout(DEADLINE, wait).await.expect("status");
    }
    let res = r
        .ask(
            "axis-1",
            "first",
            "write",
            json!({"values": {"speed_limit": 90}}),
        )
        .await;
    assert_eq!(res["status"], "done", "{res}");
    assert_eq!(writes(&mut r.sim, 1), (1, 1));
    r.gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_behind_a_flood_of_commands_is_never_refused() {
    let mut r = rig(&POLICY.replace("max_rate = 50\n", "")).await;
    for i in 0..300 {
        let payload = cmd(
            &format!("f-{i}"),
            "write",
            json!({"values": {"speed_limit": i % 250}}),
        );
        r.cmd.send("axis-1", &payload, false).await;
    }
    r.cmd
        .send("axis-1", &cmd("stop", "quick_stop", json!({})), false)
        .await;
    let (mut done, mut limited) = (0u64, 0u64);
    let mut stop = None;
    while stop.is_none() || done + limited < 300 {
        let m = tokio::time::timeout(
            DEADLINE,
            r.sub.until(|m| m.topic.ends_with("/axis-1/cmd/result")),
        )
        .await
        .expect("results");
        match (m.json["id"].as_str(), m.json["status"].as_str()) {
            (Some("stop"), _) => stop = Some(m.json.clone()),
            (_, Some("done")) => done += 1,
            // Refused for a full queue, or cancelled by the stop before they were sent.
            (_, Some("rejected")) => {
                let reason = m.json["reason"].as_str().unwrap_or("");
                assert!(
                    ["rate_limited", "wrong_state"].contains(&reason),
                    "{}",
                    m.json
                );
                limited += 1;
            }
            other => panic!("{other:?}: {}", m.json),
        }
    }
    let stop = stop.unwrap();
    println!("{done} writes done, {limited} refused or cancelled; the stop: {stop}");
    assert_eq!(stop["status"], "done", "{stop}");
    // Every write the gateway called done reached the drive, the refused ones did not,
    // and the stop's controlword write is the one more.
    assert_eq!(writes(&mut r.sim, 1), (done + 1, done + 1));
    r.gw.stop();
}
