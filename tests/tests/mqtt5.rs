//! The gateway on MQTT 5 (`[mqtt] version = 5`), end to end with a real mosquitto, a
//! real pty and servosim: request/response with Correlation Data, Message Expiry as a
//! command's deadline, the birth, retained availability and Will, topic aliases, and a
//! publish the broker refuses. Every command test checks what reached the drive.

use serde_json::{json, Value};
use servogate_e2e::*;

const ID: &str = "e2e-v5";

/// Commands carry no deadline of their own here: the MQTT 5 Message Expiry is one, and
/// no `max_age` stands in for a missing one.
const POLICY: &str = r#"
[devices.commands]
allow = ["move", "write"]
writable = ["speed_limit"]
max_rate = 50
require_fresh = false
limits.position = { min = -200.0, max = 300.0, max_step = 50.0 }
limits.velocity = { min = 0.0, max = 200.0 }
limits.speed_limit = { min = 0, max = 250 }
"#;

fn cmd_topic(device: &str) -> String {
    format!("servogate/{ID}/devices/{device}/cmd")
}

/// `writes` and `applied` of `unit`: what reached the drive.
fn writes(sim: &mut Servosim, unit: u8) -> (u64, u64) {
    sim.stats_pair("writes", "applied", unit)
}

struct Rig {
    broker: Mosquitto,
    _pty: PtyPair,
    sim: Servosim,
    gw: Servogate,
    sub: Subscriber,
    req: Requester,
}

/// A v5 gateway with up to `aliases` topic aliases and `tables` (e.g. `[metrics]`) in its
/// config, on a broker started with `broker_extra`; returns once every device has sent
/// telemetry.
async fn rig(broker_extra: &str, tables: &str, aliases: u16) -> Rig {
    let broker = Mosquitto::start_with(broker_extra);
    let pty = PtyPair::start();
    let sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/#")).await;
    let req = Requester::start(broker.port, "app/replies/#").await;
    let config = mqtt5(
        &command_config(ID, &broker.url(), &pty.gateway, POLICY),
        aliases,
    )
    .replacen("[buffer]", &format!("{tables}\n[buffer]"), 1);
    let gw = Servogate::start(&config);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        let m = sub.next().await;
        if let Some((d, "telemetry")) = m.device_stream() {
            assert_matches_truth(d, &m.json);
            seen.insert(d.to_owned());
        }
    }
    Rig {
        broker,
        _pty: pty,
        sim,
        gw,
        sub,
        req,
    }
}

impl Rig {
    /// Sends `payload` to `device` with a Response Topic, Correlation Data and an expiry;
    /// returns what came back on the Response Topic.
    async fn ask(
        &mut self,
        device: &str,
        payload: Value,
        reply_to: &str,
        correlation: &[u8],
        expiry_s: Option<u32>,
    ) -> Reply {
        self.req
            .send(
                &cmd_topic(device),
                &payload.to_string(),
                Some(reply_to),
                Some(correlation),
                expiry_s,
            )
            .await;
        let id = payload["id"].clone();
        loop {
            let r = self.req.next().await;
            if r.topic == reply_to && r.json["id"] == id {
                return r;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_command_is_answered_on_its_response_topic_with_its_correlation_data() {
    let mut r = rig("", "", 0).await;
    let write = json!({"id": "v5-1", "action": "write", "values": {"speed_limit": 77}});

    // No deadline in the payload: the 5 s Message Expiry is its deadline.
    let reply = r
        .ask(
            "axis-1",
            write.clone(),
            "app/replies/a",
            b"\x00\xffreq-1",
            Some(5),
        )
        .await;
    assert_eq!(reply.json["status"], "done", "{}", reply.json);
    assert_eq!(reply.correlation.as_deref(), Some(&b"\x00\xffreq-1"[..]));
    // The result topic has it too, the same result.
    let on_topic = command_result(&mut r.sub, "axis-1", Some("v5-1")).await;
    assert_eq!(on_topic["seq"], reply.json["seq"]);
    assert_eq!(
        writes(&mut r.sim, 1),
        (1, 1),
        "the write reached the drive once"
    );

    // Without an expiry the same command has no deadline at all: refused, nothing sent.
    let bare = json!({"id": "v5-2", "action": "write", "values": {"speed_limit": 78}});
    let reply = r.ask("axis-1", bare, "app/replies/b", b"req-2", None).await;
    assert_eq!(
        (reply.json["status"].as_str(), reply.json["reason"].as_str()),
        (Some("rejected"), Some("no_deadline")),
        "{}",
        reply.json
    );
    assert_eq!(reply.correlation.as_deref(), Some(&b"req-2"[..]));

    // A repeat of v5-1 is answered on the repeat's own Response Topic, not run again.
    let again = r
        .ask("axis-1", write, "app/replies/c", b"req-3", Some(5))
        .await;
    assert_eq!(again.json["duplicate"], true, "{}", again.json);
    assert_eq!(again.correlation.as_deref(), Some(&b"req-3"[..]));
    assert_eq!(
        writes(&mut r.sim, 1),
        (1, 1),
        "nothing more reached the drive"
    );

    let text = r.gw.stderr_text();
    assert!(!text.contains("panicked"), "{text}");
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_v5_a_command_published_with_the_retain_flag_is_refused_even_when_it_arrives_live() {
    // MQTT 3.1.1 brokers clear the flag on live delivery; the gateway subscribes with
    // Retain As Published, so on MQTT 5 it sees the flag and refuses the command at once.
    let mut r = rig("", "", 0).await;
    let cmd = Commander::start(r.broker.port, &format!("servogate/{ID}")).await;
    let deadline = humantime::format_rfc3339_millis(
        std::time::SystemTime::now() + std::time::Duration::from_secs(5),
    );
    let retained = json!({"id": "v5-r1", "action": "write", "values": {"speed_limit": 90},
                          "deadline": deadline.to_string()});
    cmd.send("axis-1", &retained.to_string(), true).await;
    let result = command_result(&mut r.sub, "axis-1", Some("v5-r1")).await;
    assert_eq!(
        (result["status"].as_str(), result["reason"].as_str()),
        (Some("rejected"), Some("retained")),
        "{result}"
    );
    // The same command without the flag runs: the refusal was the flag's.
    let live = json!({"id": "v5-r2", "action": "write", "values": {"speed_limit": 90},
                      "deadline": deadline.to_string()});
    cmd.send("axis-1", &live.to_string(), false).await;
    let result = command_result(&mut r.sub, "axis-1", Some("v5-r2")).await;
    assert_eq!(result["status"], "done", "{result}");
    assert_eq!(
        writes(&mut r.sim, 1),
        (1, 1),
        "only the command without the flag reached the drive"
    );
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_command_whose_message_expiry_runs_out_in_the_queue_is_never_executed() {
    let mut r = rig("", "", 0).await;
    // Relative moves: servosim's axes move on their own, and the step an absolute target
    // makes from a position read a moment earlier grows with the delay (under emulation
    // past max_step 50); a relative step is what it says.
    let mv = |id: &str, by: f64| {
        json!({"id": id, "action": "move", "position": by, "relative": true,
               "velocity": 20.0, "wait": "target_reached"})
    };

    // What one 40 mm move at 20 mm/s (2 s) writes to the drive.
    let before = writes(&mut r.sim, 2);
    let out = r
        .ask("axis-2", mv("m-1", 40.0), "app/replies/m", b"m1", Some(30))
        .await;
    assert_eq!(out.json["status"], "done", "{}", out.json);
    let one_move = writes(&mut r.sim, 2).0 - before.0;
    assert!(one_move > 0);

    // The same move back, and right behind it a write whose 1 s expiry runs out while
    // the move holds the drive (one job per device, in order).
    let before = writes(&mut r.sim, 2);
    r.req
        .send(
            &cmd_topic("axis-2"),
            &mv("m-2", -40.0).to_string(),
            Some("app/replies/m"),
            Some(b"m2"),
            Some(30),
        )
        .await;
    let late = json!({"id": "e-1", "action": "write", "values": {"speed_limit": 42}});
    let reply = r.ask("axis-2", late, "app/replies/e", b"e1", Some(1)).await;
    assert_eq!(
        (reply.json["status"].as_str(), reply.json["reason"].as_str()),
        (Some("expired"), Some("expired")),
        "{}",
        reply.json
    );
    let back = command_result(&mut r.sub, "axis-2", Some("m-2")).await;
    assert_eq!(back["status"], "done", "{back}");
    let after = writes(&mut r.sim, 2);
    assert_eq!(
        after.0 - before.0,
        one_move,
        "only the move's writes reached the drive, not the expired write's"
    );
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mqtt5_with_topic_aliases_the_birth_retained_availability_and_will_work() {
    let mut r = rig("", "", 8).await;
    // Values arrive right through aliased topics (the broker resolves them): 50 samples
    // of each device checked against the simulator's truth, seq without a gap.
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    let mut n = 0;
    while n < 150 {
        let m = r.sub.next().await;
        if let Some((d, "telemetry")) = m.device_stream() {
            assert_matches_truth(d, &m.json);
            let seq = m.json["seq"].as_u64().unwrap();
            if let Some(prev) = last.insert(d.to_owned(), seq) {
                assert_eq!(seq, prev + 1, "{d}: seq gap");
            }
            n += 1;
        }
    }

    // A newcomer gets the retained birth and every device's availability.
    let port = r.broker.port;
    let mut late = Subscriber::start(port, &format!("servogate/{ID}/#")).await;
    let status = format!("servogate/{ID}/status");
    let birth = late.until(|m| m.topic == status).await;
    assert!(birth.retain);
    assert_eq!(birth.json["online"], true);
    let mut online = std::collections::HashSet::new();
    while online.len() < 3 {
        let m = late.next().await;
        if let Some((d, "availability")) = m.device_stream() {
            assert!(m.retain, "{d}'s availability is retained");
            online.insert(d.to_owned());
        }
    }

    // SIGKILL: the broker publishes the Will.
    r.gw.kill();
    let will = r
        .sub
        .until(|m| m.topic == status && m.json["online"] == false)
        .await;
    assert!(will.json["boot_id"].is_string());
    let mut again = Subscriber::start(port, &status).await;
    let retained = again.next().await;
    assert_eq!(retained.json["online"], false, "the Will is retained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_refuses_is_counted_by_reason_and_the_gateway_goes_on() {
    // Anonymous clients may use servogate/# and app/#, nothing else.
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite servogate/#\ntopic readwrite app/#\n").unwrap();
    let metrics = free_port();
    let mut r = rig(
        &format!("acl_file {}", acl.display()),
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"),
        0,
    )
    .await;
    let write =
        |id: &str, v: u32| json!({"id": id, "action": "write", "values": {"speed_limit": v}});

    // A Response Topic the gateway may not publish to: the result is on the result topic,
    // the response is refused by the broker (PUBACK 0x87 Not authorized) and counted.
    r.req
        .send(
            &cmd_topic("axis-3"),
            &write("f-1", 60).to_string(),
            Some("forbidden/replies"),
            Some(b"f"),
            Some(5),
        )
        .await;
    let res = command_result(&mut r.sub, "axis-3", Some("f-1")).await;
    assert_eq!(res["status"], "done", "{res}");
    let series = r#"servogate_mqtt_broker_refused_total{reason="not_authorized"}"#;
    let text = scrape_until(metrics, "the refusal counted", |t| {
        sample(t, series) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&text, "servogate_mqtt_responses_total"), Some(1.0));

    // The gateway goes on: the next command is answered where it asks.
    let reply = r
        .ask("axis-3", write("f-2", 61), "app/replies/ok", b"ok", Some(5))
        .await;
    assert_eq!(reply.json["status"], "done", "{}", reply.json);
    assert_eq!(
        writes(&mut r.sim, 3),
        (2, 2),
        "both writes reached the drive"
    );
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_replay_request_is_answered_on_its_response_topic_byte_for_byte() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-3", &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let prefix = format!("servogate/{ID}");
    let mut live =
        Subscriber::start(broker.port, &format!("{prefix}/devices/axis-1/telemetry")).await;
    let mut req = Requester::start(broker.port, "app/replies/#").await;
    let config = with_event_log(
        &mqtt5(&command_config(ID, &broker.url(), &pty.gateway, POLICY), 0),
        &log,
        "",
    );
    let mut gw = Servogate::start(&config);
    let mut got = Vec::new();
    while got.len() < 20 {
        got.push(live.next().await);
    }
    let boot = got[0].json["boot_id"].as_str().unwrap().to_owned();
    let seq = |i: usize| got[i].json["seq"].as_u64().unwrap();

    let ask = json!({"id": "rp-1", "device": "axis-1", "stream": "telemetry",
                     "boot_id": boot, "from_seq": seq(3), "to_seq": seq(12)});
    req.send(
        &format!("{prefix}/replay"),
        &ask.to_string(),
        Some("app/replies/replay"),
        Some(b"rp"),
        None,
    )
    .await;
    let mut events = Vec::new();
    let done = loop {
        let r = req.next().await;
        assert_eq!(r.topic, "app/replies/replay");
        assert_eq!(r.correlation.as_deref(), Some(&b"rp"[..]));
        if r.json["done"] == true {
            break r.json;
        }
        events.push(r);
    };
    assert_eq!(done["count"], 10, "{done}");
    assert_eq!(events.len(), 10);
    let topic = format!("{prefix}/devices/axis-1/telemetry");
    for (e, l) in events.iter().zip(&got[3..=12]) {
        assert_eq!(e.user, vec![("topic".to_owned(), topic.clone())]);
        assert_eq!(
            e.payload, l.payload,
            "replayed bytes differ from the live ones"
        );
    }
    assert!(gw.stop().success());
}
