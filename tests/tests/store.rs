//! Durable mode end to end (DESIGN.md section 9): servosim on a pty, a real mosquitto,
//! the servogate binary with `[buffer] path`, killed with SIGKILL.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use servogate::store::record;
use servogate_e2e::*;
use servogate_log::{Entry, FsDir, Reader};

const ID: &str = "e2e-store";

/// A config of `units` axes on `port` whose events go through the log at `log`.
fn durable(broker: &str, port: &Path, units: &[u8], log: &Path) -> String {
    with_event_log(&config(ID, broker, port, units, ""), log, "")
}

/// Every message in the log, in order: (topic, payload).
fn log_contents(log: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = FsDir::existing(log).expect("the log directory");
    Reader::offline(dir, 0)
        .expect("readable")
        .map(|e| match e.expect("no IO error") {
            Entry::Record(r) => {
                let p = record::decode(&r.body).expect("a record servogate wrote");
                (p.topic, p.payload)
            }
            Entry::Gap { from, to } => panic!("a gap {from}..{to} in a fresh log"),
        })
        .collect()
}

/// Bytes in the log's segments.
fn log_bytes(log: &Path) -> u64 {
    std::fs::read_dir(log)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Waits until the log holds more than `bytes` (the gateway is writing it).
fn wait_for_log(log: &Path, bytes: u64) {
    let start = Instant::now();
    while log_bytes(log) <= bytes {
        assert!(
            start.elapsed() < DEADLINE,
            "the log never grew past {bytes} bytes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_killed_gateway_never_got_acknowledged_go_out_after_the_restart_exactly_as_logged()
{
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-2", &[]);
    let mut broker = Mosquitto::start();
    broker.kill();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let cfg = durable(&broker.url(), &pty.gateway, &[1, 2], &log);

    // With the broker down, the gateway logs what it polls; then it is killed.
    let mut gw = Servogate::start(&cfg);
    wait_for_log(&log, 50_000);
    gw.kill();
    let logged = log_contents(&log);
    assert!(logged.len() > 100, "{} events logged", logged.len());
    let boot1 = serde_json::from_slice::<Value>(&logged[0].1).unwrap()["boot_id"].clone();

    // The broker comes back, and a new start publishes every one of them first.
    broker.restart();
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/#")).await;
    let port = free_port();
    let with_metrics = cfg.replace(
        "[buffer]",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[buffer]"),
    );
    let _gw = Servogate::start(&with_metrics);
    let status = sub
        .until(|m| m.topic.ends_with("/status") && m.json["online"] == true)
        .await;
    assert_eq!(status.json["recovered"], logged.len(), "{}", status.json);
    assert_ne!(status.json["boot_id"], boot1);
    let mut want: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (topic, payload) in &logged {
        // Availability is retained and may be repeated; telemetry and events are not.
        if !topic.ends_with("/availability") {
            want.entry(topic.clone()).or_default().push(payload.clone());
        }
    }
    let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let total: usize = want.values().map(Vec::len).sum();
    let mut seen = 0;
    while seen < total {
        let m = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .expect("recovered events");
        if m.json["boot_id"] != boot1 || m.topic.ends_with("/availability") {
            continue;
        }
        got.entry(m.topic.clone())
            .or_default()
            .push(m.payload.clone());
        seen += 1;
    }
    for (topic, payloads) in &want {
        assert_eq!(
            got.get(topic),
            Some(payloads),
            "{topic}: not every event, or not as logged"
        );
    }
    let text = scrape_until(port, "log_recovered_events", |t| {
        sample(t, "servogate_log_recovered_events").is_some()
    })
    .await;
    assert_eq!(
        sample(&text, "servogate_log_recovered_events"),
        Some(logged.len() as f64)
    );
    assert_eq!(sample(&text, "servogate_log_healthy"), Some(1.0));
    assert_eq!(
        sample(&text, "servogate_log_cut_bytes"),
        Some(0.0),
        "{text}"
    );
}

/// `servogate log` with `args`: (exit code, stdout, stderr).
fn servogate_log(args: &[&str]) -> (i32, String, String) {
    let out = program("servogate")
        .arg("log")
        .args(args)
        .output()
        .expect("run servogate log");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flight_recorder_prints_one_devices_telemetry_in_a_time_window_as_jsonl_and_csv() {
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-2", &[]);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let cfg = durable(&broker.url(), &pty.gateway, &[1, 2], &log);
    let mut gw = Servogate::start(&cfg);
    wait_for_log(&log, 60_000);
    assert!(gw.stop().success());
    let cfg_path = dir.path().join("servogate.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let cfg_arg = cfg_path.to_str().unwrap();

    // Everything of axis-1's telemetry: one boot, seq unbroken, nothing of axis-2.
    let (code, out, err) = servogate_log(&[
        "--config",
        cfg_arg,
        "--device",
        "axis-1",
        "--stream",
        "telemetry",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 20, "{} lines", lines.len());
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(lines
        .iter()
        .all(|l| l["device"] == "axis-1" && l["stream"] == "telemetry"));
    assert!(lines.iter().all(|l| l["boot_id"] == lines[0]["boot_id"]));
    assert!(err.contains(&format!("{} of", lines.len())), "{err}");

    // A window from the 10th event's time to the 20th's: exactly events 10..20, as CSV.
    let since = lines[10]["ts"].as_str().unwrap();
    let until = lines[20]["ts"].as_str().unwrap();
    let (code, out, err) = servogate_log(&[
        "--dir",
        log.to_str().unwrap(),
        "--device",
        "axis-1",
        "--stream",
        "telemetry",
        "--since",
        since,
        "--until",
        until,
        "--format",
        "csv",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[0].starts_with("ts,device,stream,boot_id,seq,"),
        "{}",
        rows[0]
    );
    let csv_seqs: Vec<u64> = rows[1..]
        .iter()
        .map(|r| r.split(',').nth(4).unwrap().parse().unwrap())
        .collect();
    assert_eq!(csv_seqs, seqs[10..20], "{out}");

    // Bad input is a usage error (64) that names what is wrong.
    let (code, _, err) = servogate_log(&["--config", cfg_arg, "--since", "yesterday"]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--since \"yesterday\" is not an RFC 3339 time"),
        "{err}"
    );
    let memory_only = dir.path().join("memory.toml");
    std::fs::write(
        &memory_only,
        config(ID, &broker.url(), &pty.gateway, &[1], ""),
    )
    .unwrap();
    let (code, _, err) = servogate_log(&["--config", memory_only.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("[buffer] path is not set"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_answers_a_seq_range_and_a_time_range_with_the_payloads_a_live_subscriber_got() {
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-2", &[]);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let prefix = format!("servogate/{ID}");
    let mut live =
        Subscriber::start(broker.port, &format!("{prefix}/devices/axis-1/telemetry")).await;
    let _gw = Servogate::start(&durable(&broker.url(), &pty.gateway, &[1, 2], &log));
    let mut got: Vec<Msg> = Vec::new();
    while got.len() < 40 {
        got.push(live.next().await);
    }
    let boot = got[0].json["boot_id"].as_str().unwrap().to_owned();
    let seq = |i: usize| got[i].json["seq"].as_u64().unwrap();

    let mut answers = Subscriber::start(broker.port, &format!("{prefix}/replay/#")).await;
    let asker = Commander::start(broker.port, &prefix).await;
    let ask = |payload: Value| {
        let client = asker.client.clone();
        let topic = format!("{prefix}/replay");
        async move {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_string())
                .await
                .unwrap();
        }
    };
    // Collects one replay's events until its summary.
    async fn answer(sub: &mut Subscriber, base: &str) -> (Vec<Msg>, Value) {
        let mut events = Vec::new();
        loop {
            let m = sub.next().await;
            if m.topic == base {
                return (events, m.json);
            }
            if m.topic.starts_with(&format!("{base}/")) {
                events.push(m);
            }
        }
    }

    // By boot and seq: events 5..=30 of axis-1's telemetry, byte for byte.
    ask(
        json!({"id": "r-1", "device": "axis-1", "stream": "telemetry",
               "boot_id": boot, "from_seq": seq(5), "to_seq": seq(30)}),
    )
    .await;
    let (events, done) = answer(&mut answers, &format!("{prefix}/replay/r-1")).await;
    assert_eq!(done["count"], 26, "{done}");
    assert_eq!(
        (done["first_seq"].as_u64(), done["last_seq"].as_u64()),
        (Some(seq(5)), Some(seq(30)))
    );
    assert_eq!(done["missing"], 0);
    assert_eq!(events.len(), 26);
    for (e, live) in events.iter().zip(&got[5..=30]) {
        assert_eq!(
            e.topic,
            format!("{prefix}/replay/r-1/devices/axis-1/telemetry")
        );
        assert_eq!(
            e.payload, live.payload,
            "replayed bytes differ from the live ones"
        );
    }

    // By time: from event 10's acquisition time to event 20's, 10 events.
    let (from, to) = (got[10].json["ts"].clone(), got[20].json["ts"].clone());
    ask(json!({"id": "r-2", "device": "axis-1", "stream": "telemetry", "from": from, "to": to}))
        .await;
    let (events, done) = answer(&mut answers, &format!("{prefix}/replay/r-2")).await;
    assert_eq!(done["count"], 10, "{done}");
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e.json["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (10..20).map(seq).collect::<Vec<_>>());

    // A bad request is answered on its id with what is wrong.
    ask(json!({"id": "r-3", "from": "yesterday", "to": to})).await;
    let (_, done) = answer(&mut answers, &format!("{prefix}/replay/r-3")).await;
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("not an RFC 3339 time"),
        "{done}"
    );
}

/// Telemetry of `device` keeps coming with seq unbroken: `n` events in a row.
async fn telemetry_flows(sub: &mut Subscriber, device: &str, n: usize) {
    let mut last: Option<u64> = None;
    let mut got = 0;
    while got < n {
        let m = sub.next().await;
        if m.device_stream() != Some((device, "telemetry")) {
            continue;
        }
        let seq = m.json["seq"].as_u64().unwrap();
        if let Some(l) = last {
            assert_eq!(seq, l + 1, "{device}: seq {l} then {seq}");
        }
        last = Some(seq);
        got += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_the_gateway_goes_on_publishing_from_memory() {
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-2", &[]);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let port = free_port();
    let cfg = durable(&broker.url(), &pty.gateway, &[1, 2], &log).replace(
        "[buffer]",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[buffer]"),
    );
    let mut sub =
        Subscriber::start(broker.port, &format!("servogate/{ID}/devices/+/telemetry")).await;
    // Files may not grow past 64 KiB: the first segment fills up, as a disk does.
    let mut gw = Servogate::start_with_file_limit(&cfg, 64);
    let text = scrape_until(port, "log_healthy 0", |t| {
        sample(t, "servogate_log_healthy") == Some(0.0)
    })
    .await;
    assert!(
        sample(&text, "servogate_log_write_errors_total").unwrap() >= 1.0,
        "{text}"
    );
    // Telemetry goes on, unbroken, from memory.
    telemetry_flows(&mut sub, "axis-1", 50).await;
    assert!(gw.stop().success(), "a clean stop after the disk filled");
    let err = gw.stderr_text();
    assert!(
        err.contains("cannot write the event log: going on from memory"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // What it wrote before is whole and readable.
    assert!(!log_contents(&log).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_directory_that_cannot_be_used_is_reported_and_events_still_flow() {
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1", &[]);
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    // A path under a regular file: no directory can be made there (ENOTDIR), whoever
    // runs the test (root ignores permission bits).
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let log = file.join("log");
    let port = free_port();
    let cfg = durable(&broker.url(), &pty.gateway, &[1], &log).replace(
        "[buffer]",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[buffer]"),
    );
    let mut sub =
        Subscriber::start(broker.port, &format!("servogate/{ID}/devices/+/telemetry")).await;
    let mut gw = Servogate::start_with_file_limit(&cfg, 1 << 20);
    telemetry_flows(&mut sub, "axis-1", 30).await;
    let text = scrape_until(port, "log_healthy", |t| {
        sample(t, "servogate_log_healthy").is_some()
    })
    .await;
    assert_eq!(sample(&text, "servogate_log_healthy"), Some(0.0));
    assert!(gw.stop().success());
    let err = gw.stderr_text();
    assert!(err.contains("the event log is not available"), "{err}");
    assert!(err.contains("not-a-dir"), "the error names the path: {err}");
}
