//! A network cut between the gateway and the broker (packets stop, nothing is closed) of
//! 60 s while six units are polled every 10 ms, in durable mode: the backlog waits in the
//! event log on disk, within `max_bytes`, and every event reaches the subscriber after.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use servogate::store::record;
use servogate_e2e::*;
use servogate_log::{Entry, FsDir, Reader};

const ID: &str = "e2e-cut";
const CUT: Duration = Duration::from_secs(60);
const MAX_BYTES: u64 = 64 << 20;

/// Telemetry seqs per device in the log.
fn logged_telemetry(log: &Path) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in Reader::offline(FsDir::existing(log).unwrap(), 0).unwrap() {
        if let Entry::Record(r) = e.unwrap() {
            let p = record::decode(&r.body).unwrap();
            if p.topic.ends_with("/telemetry") {
                out.entry(p.device.to_string()).or_default().push(p.seq);
            }
        }
    }
    out
}

fn log_bytes(log: &Path) -> u64 {
    std::fs::read_dir(log)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_network_cut_under_load_delivers_every_event_and_the_disk_stays_bounded() {
    let rig = GatedRig::start().await;
    let (broker, gate, log) = (&rig.broker, &rig.gate, &rig.log);
    let cfg = rig.config(ID).replace(
        "reconnect_max = \"500ms\"",
        "reconnect_max = \"500ms\"\nkeep_alive = \"2s\"",
    );
    let extra = format!("max_bytes = {MAX_BYTES}\nsegment_bytes = \"1MiB\"");
    let cfg = with_event_log(&cfg, log, &extra);
    let mut sub =
        Subscriber::start(broker.port, &format!("servogate/{ID}/devices/+/telemetry")).await;
    let mut gw = Servogate::start(&cfg);
    let mut got: BTreeMap<String, BTreeMap<u64, ()>> = BTreeMap::new();
    let take = |m: Msg, got: &mut BTreeMap<String, BTreeMap<u64, ()>>| {
        if let Some((d, "telemetry")) = m.device_stream() {
            got.entry(d.to_owned())
                .or_default()
                .insert(m.json["seq"].as_u64().unwrap(), ());
        }
    };
    while got.len() < 6 {
        let m = sub.next().await;
        take(m, &mut got);
    }

    // The cut: nothing moves between the gateway and the broker for 60 s.
    gate.freeze();
    let t0 = Instant::now();
    let mut peak = 0;
    while t0.elapsed() < CUT {
        peak = peak.max(log_bytes(log));
        // Drain what the subscriber got before the cut took hold.
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            take(m, &mut got);
        }
    }
    gate.thaw();
    assert!(
        peak <= MAX_BYTES,
        "the log grew to {peak} bytes, past max_bytes {MAX_BYTES}"
    );

    // Everything logged up to now arrives.
    let want = logged_telemetry(log);
    let total: usize = want.values().map(Vec::len).sum();
    let mut missing: std::collections::BTreeSet<(String, u64)> = want
        .iter()
        .flat_map(|(d, seqs)| seqs.iter().map(move |s| (d.clone(), *s)))
        .filter(|(d, s)| !got.get(d).is_some_and(|g| g.contains_key(s)))
        .collect();
    let start = Instant::now();
    while !missing.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} of {total} logged events never arrived after the cut",
            missing.len()
        );
        let m = sub.next().await;
        if let Some((d, "telemetry")) = m.device_stream() {
            missing.remove(&(d.to_owned(), m.json["seq"].as_u64().unwrap()));
        }
    }
    let took = start.elapsed();
    for (d, seqs) in &want {
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{d}: the log's seqs have a hole"
        );
    }
    assert!(gw.stop().success());
    println!(
        "{} s cut: {total} telemetry events logged and delivered, the backlog in {:.1} s, log peak {:.1} MiB",
        CUT.as_secs(),
        took.as_secs_f64(),
        peak as f64 / (1 << 20) as f64
    );
}
