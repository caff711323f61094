//! Durable mode end to end (DESIGN.md section 9): servosim on a pty, a real mosquitto,
//! the servogate binary with `[buffer] path`, killed with SIGKILL.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use servogate::store::record;
use servogate_e2e::*;
use servogate_log::{Entry, FsDir, Reader};

const ID: &str = "e2e-store";

/// A config of `units` axes on `port` whose events go through the log at `log`.
fn durable(broker: &str, port: &Path, units: &[u8], log: &Path) -> String {
    config(ID, broker, port, units, "").replace(
        "capacity = 200000",
        &format!("capacity = 200000\npath = \"{}\"", log.display()),
    )
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
