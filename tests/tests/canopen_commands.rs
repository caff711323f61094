//! Commands to CANopen drives end to end (DESIGN.md section 7): real mosquitto, servosim
//! canopen on vcan0, the servogate binary. Each step checks the result published on MQTT
//! and what reached the drive, with servosim's per-node `downloads` and `applied`.
//!
//! Needs vcan0: where there is none each test says so and returns; `scripts/vm/can-tests.sh`
//! runs them in the qemu VM with `SERVOGATE_REQUIRE_VCAN=1`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use servogate_e2e::*;

const ID: &str = "e2e-cancmd";

/// Every action allowed; commands carry no deadline, so each gets receipt + `max_age`.
const POLICY: &str = r#"
[devices.commands]
allow = ["enable", "disable", "quick_stop", "halt", "fault_reset", "move", "velocity"]
max_age = "3s"
max_rate = 50
limits.position = { min = -1000.0, max = 1000.0 }
limits.velocity = { min = 0.0, max = 500.0 }
"#;

/// Publishes `action` (with `extra` fields) as command `id` to `device`, and waits for
/// its result.
async fn run(
    cmd: &Commander,
    sub: &mut Subscriber,
    device: &str,
    id: &str,
    action: &str,
    extra: Value,
) -> Value {
    let mut v = json!({"id": id, "action": action});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    cmd.send(device, &v.to_string(), false).await;
    command_result(sub, device, Some(id)).await
}

/// `downloads` and `applied` of `node` from servosim's stats line.
fn counters(sim: &mut Servosim, node: u8) -> (u64, u64) {
    sim.stats_pair("downloads", "applied", node)
}

fn truth(sim: &mut Servosim, node: u8) -> Value {
    sim.truth_json(node)
}

fn assert_done(r: &Value) {
    assert_eq!(r["status"], "done", "{r}");
}

/// Waits for `device`'s telemetry to satisfy `pred`.
async fn telemetry_until(
    sub: &mut Subscriber,
    device: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let topic = format!("/devices/{device}/telemetry");
    let wait = sub.until(|m| m.topic.ends_with(&topic) && pred(&m.json));
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("{device}: the telemetry never got there"))
        .json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drive_is_disabled_enabled_moved_stopped_and_reset_with_exactly_the_downloads_expected() {
    let Some(can) = vcan() else { return };
    let broker = Mosquitto::start();
    let mut sim = Servosim::start_can(can, "1-2", &["--period", "10ms"]);
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/#")).await;
    let _gw = Servogate::start(&format!(
        "{}{}",
        head(ID, &broker.url()),
        can_config(can, &[1, 2], POLICY)
    ));
    let commander = Commander::start(broker.port, &format!("servogate/{ID}")).await;
    // Both drives are up once their telemetry flows (the heartbeat time was written).
    for d in ["drive-1", "drive-2"] {
        telemetry_until(&mut sub, d, |j| j["state"] == "operation_enabled").await;
    }
    let mut latencies = Vec::new();
    let mut check = |r: &Value| {
        if let Some(l) = r["latency_ms"].as_f64() {
            latencies.push(l);
        }
    };

    // disable: shutdown, one download; enable: switch on, enable operation.
    let before = counters(&mut sim, 1);
    let r = run(&commander, &mut sub, "drive-1", "d-1", "disable", json!({})).await;
    assert_done(&r);
    check(&r);
    assert_eq!(truth(&mut sim, 1)["state"], "ready_to_switch_on");
    let r = run(&commander, &mut sub, "drive-1", "e-1", "enable", json!({})).await;
    assert_done(&r);
    check(&r);
    assert_eq!(truth(&mut sim, 1)["state"], "operation_enabled");
    let after = counters(&mut sim, 1);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (3, 3),
        "{before:?} -> {after:?}"
    );

    // move to 10 mm beyond where the axis is, waiting for target reached: mode, target,
    // profile velocity, bit 4 low, high (acknowledged), low again.
    let at = truth(&mut sim, 1)["position_mm"].as_f64().unwrap();
    let target = (at + 10.0).round();
    let before = counters(&mut sim, 1);
    let started = Instant::now();
    let r = run(
        &commander,
        &mut sub,
        "drive-1",
        "m-1",
        "move",
        json!({"position": target, "velocity": 100.0, "wait": "target_reached"}),
    )
    .await;
    assert_done(&r);
    check(&r);
    // About 10 mm at 100 mm/s: not done before the axis could get there.
    assert!(started.elapsed() >= Duration::from_millis(50));
    let after = counters(&mut sim, 1);
    assert_eq!((after.0 - before.0, after.1 - before.1), (6, 6));
    let t = truth(&mut sim, 1);
    assert_eq!(t["position_mm"].as_f64().unwrap(), target, "{t}");
    // Target reached (bit 10) shows in the TPDO statusword, and the position with it.
    let tel = telemetry_until(&mut sub, "drive-1", |j| {
        j["statusword"].as_u64().is_some_and(|sw| sw & 0x0400 != 0)
    })
    .await;
    assert_eq!(tel["position"].as_f64().unwrap(), target, "{tel}");

    // quick stop: one download, and the drive shows quick_stop_active.
    let before = counters(&mut sim, 1);
    let r = run(
        &commander,
        &mut sub,
        "drive-1",
        "q-1",
        "quick_stop",
        json!({}),
    )
    .await;
    assert_done(&r);
    check(&r);
    assert_eq!(counters(&mut sim, 1).1 - before.1, 1);
    assert_eq!(truth(&mut sim, 1)["state"], "quick_stop_active");

    // A drive fault, then fault_reset: bit 7 low then high, and the fault is gone.
    sim.cmd("fault 1 0x2310");
    telemetry_until(&mut sub, "drive-1", |j| j["state"] == "fault").await;
    let r = run(&commander, &mut sub, "drive-1", "e-2", "enable", json!({})).await;
    assert_eq!(
        (r["status"].as_str(), r["reason"].as_str()),
        (Some("rejected"), Some("wrong_state")),
        "{r}"
    );
    let before = counters(&mut sim, 1);
    let r = run(
        &commander,
        &mut sub,
        "drive-1",
        "f-1",
        "fault_reset",
        json!({}),
    )
    .await;
    assert_done(&r);
    check(&r);
    assert_eq!(counters(&mut sim, 1).1 - before.1, 2);
    let t = truth(&mut sim, 1);
    assert_eq!(
        (t["state"].as_str(), t["error_code"].as_u64()),
        (Some("switch_on_disabled"), Some(0))
    );

    // An SDO abort: failed / sdo_abort with the code, and nothing applied on drive-2.
    sim.cmd("abort 2 0x08000022");
    let before = counters(&mut sim, 2);
    let r = run(
        &commander,
        &mut sub,
        "drive-2",
        "q-2",
        "quick_stop",
        json!({}),
    )
    .await;
    assert_eq!(
        (r["status"].as_str(), r["reason"].as_str()),
        (Some("failed"), Some("sdo_abort")),
        "{r}"
    );
    assert!(r["message"].as_str().unwrap().contains("0x08000022"), "{r}");
    let after = counters(&mut sim, 2);
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 0));
    assert_eq!(truth(&mut sim, 2)["state"], "operation_enabled");
    sim.cmd("noabort 2");

    latencies.sort_by(f64::total_cmp);
    println!("command latency (receipt to result), ms: {latencies:?}");
}

/// A `stats` field of servosim for `node`.
fn stat(sim: &mut Servosim, field: &str, node: u8) -> u64 {
    sim.stats_pair(field, field, node).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_move_of_four_drives_starts_them_on_one_sync_and_a_drive_that_cannot_refuses_the_group(
) {
    let Some(can) = vcan() else { return };
    let broker = Mosquitto::start();
    // Drives 1-4 start through RPDO1 (servosim's: the controlword, synchronous); drive-5
    // names an RPDO it does not have.
    let mut sim = Servosim::start_can(can, "1-5", &["--period", "10ms"]);
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/#")).await;
    let config = can_config(can, &[1, 2, 3, 4, 5], &format!("start_rpdo = 1\n{POLICY}"));
    let (head_part, five) = config.split_at(config.find("name = \"drive-5\"").unwrap());
    let config = format!(
        "{head_part}{}",
        five.replace("start_rpdo = 1", "start_rpdo = 2")
    );
    let _gw = Servogate::start(&format!("{}{config}", head(ID, &broker.url())));
    let prefix = format!("servogate/{ID}");
    let commander = Commander::start(broker.port, &prefix).await;
    // Every drive up, and drive-5's RPDO check (at start-up) saying why it cannot start.
    let mut enabled = std::collections::BTreeSet::new();
    let mut why = None;
    while enabled.len() < 5 || why.is_none() {
        let m = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .expect("drives up and drive-5's RPDO refused");
        match m.device_stream() {
            Some((d, "telemetry")) if m.json["state"] == "operation_enabled" => {
                enabled.insert(d.to_owned());
            }
            // The SDO abort itself is a comm_error too; this one says what it means.
            Some(("drive-5", "events"))
                if m.json["kind"] == "comm_error"
                    && m.json["message"]
                        .as_str()
                        .is_some_and(|s| s.contains("group moves cannot start")) =>
            {
                why = m.json["message"].as_str().map(str::to_owned);
            }
            _ => {}
        }
    }
    let why = why.unwrap();
    assert!(why.contains("no RPDO 2"), "{why}");

    // Each axis 5 mm on from where it stands, every target different.
    let mut targets = serde_json::Map::new();
    let mut want = Vec::new();
    for n in 1..=4u8 {
        let at = truth(&mut sim, n)["position_mm"].as_f64().unwrap();
        let target = (at + 5.0 + f64::from(n)).round();
        want.push(target);
        targets.insert(
            format!("drive-{n}"),
            json!({"position": target, "velocity": 200.0, "wait": "target_reached"}),
        );
    }
    let before: Vec<(u64, u64)> = (1..=5).map(|n| counters(&mut sim, n)).collect();
    let syncs_before = sim.stat_total("syncs");
    let g = json!({"id": "g-4", "action": "move", "targets": targets});
    commander.send_group(&g.to_string()).await;
    let res = group_result(&mut sub, &prefix, "g-4").await;
    assert_eq!(res["status"], "done", "{res}");

    // One SYNC started all four, each on its own RPDO after its set-point was loaded.
    let started: Vec<u64> = (1..=4).map(|n| stat(&mut sim, "started", n)).collect();
    assert!(
        started[0] > 0 && started.iter().all(|s| *s == started[0]),
        "{started:?}"
    );
    assert_eq!(sim.stat_total("syncs") - syncs_before, 1, "one SYNC");
    for n in 1..=4u8 {
        let i = usize::from(n - 1);
        assert_eq!(stat(&mut sim, "rpdo", n), 1, "drive-{n}");
        // mode, target, profile velocity, bit 4 low; bit 4 low again after the acknowledge.
        let after = counters(&mut sim, n);
        assert_eq!(
            (after.0 - before[i].0, after.1 - before[i].1),
            (5, 5),
            "drive-{n}"
        );
        let t = truth(&mut sim, n);
        assert_eq!(
            t["position_mm"].as_f64().unwrap(),
            want[i],
            "drive-{n}: {t}"
        );
    }
    assert_eq!(
        counters(&mut sim, 5),
        before[4],
        "drive-5 was not in the group"
    );

    // With drive-5 in it, the group is refused whole: nothing reaches any drive.
    let mut with5 = serde_json::Map::new();
    for n in 1..=5u8 {
        with5.insert(format!("drive-{n}"), json!({"position": 0.0}));
    }
    let before: Vec<(u64, u64)> = (1..=5).map(|n| counters(&mut sim, n)).collect();
    let rpdos: Vec<u64> = (1..=5).map(|n| stat(&mut sim, "rpdo", n)).collect();
    let g = json!({"id": "g-5", "action": "move", "targets": with5});
    commander.send_group(&g.to_string()).await;
    let res = group_result(&mut sub, &prefix, "g-5").await;
    assert_eq!(res["status"], "rejected", "{res}");
    assert_eq!(res["devices"]["drive-5"]["reason"], "not_allowed", "{res}");
    assert_eq!(
        res["devices"]["drive-1"]["reason"], "group_rejected",
        "{res}"
    );
    for n in 1..=5u8 {
        let i = usize::from(n - 1);
        assert_eq!(counters(&mut sim, n), before[i], "drive-{n} got a download");
        assert_eq!(stat(&mut sim, "rpdo", n), rpdos[i], "drive-{n} got an RPDO");
    }
}
