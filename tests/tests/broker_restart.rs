//! The broker dies (SIGKILL, state lost) for 3 s: the ring holds the events, and once the
//! broker is back every device's `seq` continues without a gap, on MQTT 3.1.1 and on
//! MQTT 5 (with topic aliases, which a new connection must establish again).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use servogate_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_for_three_seconds_loses_no_event() {
    broker_killed_for_three_seconds(|c| c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mqtt5_with_topic_aliases_a_broker_killed_for_three_seconds_loses_no_event() {
    broker_killed_for_three_seconds(|c| mqtt5(&c, 8)).await;
}

/// The test, with the gateway's config passed through `adapt`.
async fn broker_killed_for_three_seconds(adapt: impl Fn(String) -> String) {
    let mut broker = Mosquitto::start();
    // The gateway reaches the broker through a gate the test closes while the broker is
    // down and opens once the test's subscriber is back: without it the gateway could
    // republish before the subscriber resubscribed, and the loss would be the test's.
    let gate = Gate::start(broker.port).await;
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-kill/+/+/telemetry").await;
    let mut gw = Servogate::start(&adapt(config(
        "e2e-kill",
        &gate.url(),
        &pty.gateway,
        &[1, 2, 3],
        "",
    )));
    let mut seen: HashMap<String, BTreeSet<u64>> = HashMap::new();
    let mut duplicates = 0u64;
    let mut record = |m: &Msg, seen: &mut HashMap<String, BTreeSet<u64>>| {
        if let Some((device, "telemetry")) = m.device_stream() {
            assert_matches_truth(device, &m.json);
            let seq = m.json["seq"].as_u64().unwrap();
            if !seen.entry(device.to_owned()).or_default().insert(seq) {
                duplicates += 1;
            }
        }
    };
    while seen.len() < 3 || seen.values().any(|s| s.len() < 100) {
        let m = sub.next().await;
        record(&m, &mut seen);
    }

    gate.close();
    broker.kill();
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage under test
    broker.restart();
    sub.wait_subscribed(2).await;
    gate.open();

    // Until every device is 300 samples past the outage.
    let resume: HashMap<String, u64> = seen
        .iter()
        .map(|(d, s)| (d.clone(), s.last().unwrap() + 300))
        .collect();
    while resume
        .iter()
        .any(|(d, &until)| seen[d].last().copied().unwrap_or(0) < until)
    {
        let m = sub.next().await;
        record(&m, &mut seen);
    }
    for (device, seqs) in &seen {
        let first = *seqs.first().unwrap();
        let last = *seqs.last().unwrap();
        let missing: Vec<u64> = (first..=last).filter(|s| !seqs.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "{device}: {} seq missing after the broker restart, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        println!("{device}: seq {first}..={last} complete");
    }
    println!("duplicates (unacknowledged events published again): {duplicates}");
    assert!(gw.stop().success());
}
