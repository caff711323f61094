//! Six simulated axes polled at 10 ms through socat, servogate and a real mosquitto.

use std::collections::HashMap;

use servogate_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_axes_deliver_true_values_at_their_poll_rate_with_seq_growing_by_one() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-6", &[]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-six/#").await;
    let mut gw = Servogate::start(&config(
        "e2e-six",
        &broker.url(),
        &pty.gateway,
        &[1, 2, 3, 4, 5, 6],
        // Lateness has its own test (late_unit.rs); here a reply slowed by a busy CI
        // machine must not count as a wrong sample.
        "late_after = \"1s\"\n",
    ));

    // The birth comes first, retained.
    let status = sub.until(|m| m.topic == "servogate/e2e-six/status").await;
    assert_eq!(status.json["online"], true);
    assert!(status.json["boot_id"]
        .as_str()
        .is_some_and(|b| !b.is_empty()));

    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut first_at: HashMap<String, std::time::Instant> = HashMap::new();
    let mut count: HashMap<String, u64> = HashMap::new();
    let mut meta = 0;
    // Until every axis delivered 200 samples (2 s at 10 ms).
    while count.len() < 6 || count.values().any(|&n| n < 200) {
        let m = sub.next().await;
        let Some((device, stream)) = m.device_stream() else {
            continue;
        };
        match stream {
            "telemetry" => {
                assert_eq!(m.json["quality"], "good", "{}", m.json);
                assert_matches_truth(device, &m.json);
                assert_eq!(m.json["state"], "operation_enabled");
                let seq = m.json["seq"].as_u64().expect("seq");
                if let Some(prev) = last_seq.insert(device.to_owned(), seq) {
                    assert_eq!(seq, prev + 1, "{device}: seq must grow by exactly 1");
                }
                first_at.entry(device.to_owned()).or_insert(m.at);
                *count.entry(device.to_owned()).or_default() += 1;
            }
            "meta" => {
                assert_eq!(m.json["profile"], "sim");
                meta += 1;
            }
            _ => {}
        }
    }
    assert_eq!(meta, 6, "one retained meta per device");
    // Rate: measured, printed, and checked only against gross failure (a stalled device
    // would deliver a fraction); the benchmark measures throughput properly.
    for (device, n) in &count {
        let secs = first_at[device].elapsed().as_secs_f64();
        let rate = *n as f64 / secs;
        println!("{device}: {n} samples in {secs:.2} s = {rate:.1}/s (poll 10 ms = 100/s)");
        assert!(
            rate > 50.0,
            "{device} polled at {rate:.1}/s, configured 100/s"
        );
    }
    // A subscriber that comes later gets status, meta and availability as retained.
    let mut late = Subscriber::start(broker.port, "servogate/e2e-six/#").await;
    let mut retained = std::collections::BTreeSet::new();
    while retained.len() < 13 {
        let m = late.next().await;
        if m.retain {
            retained.insert(m.topic.clone());
        } else {
            assert!(
                m.topic.ends_with("/telemetry") || m.topic.ends_with("/events"),
                "{}",
                m.topic
            );
        }
    }
    assert!(retained.contains("servogate/e2e-six/status"));
    assert!(retained.contains("servogate/e2e-six/devices/axis-6/meta"));
    assert!(retained.contains("servogate/e2e-six/devices/axis-6/availability"));

    assert!(gw.stop().success());
    // A clean shutdown leaves online:false retained.
    let mut after = Subscriber::start(broker.port, "servogate/e2e-six/status").await;
    let status = after.next().await;
    assert!(status.retain);
    assert_eq!(status.json["online"], false);
}
