//! CRC noise on the line: no wrong value is ever published, and the errors are counted.

use std::collections::HashMap;

use servogate_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crc_noise_at_five_percent_never_publishes_a_wrong_value_and_is_counted() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let mut sim = Servosim::start(&pty.sim, "1-3", &["--crc-noise", "0.05", "--seed", "7"]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-crc/#").await;
    // Every error must come from a corrupted reply, so no reply may time out only because
    // the gateway was slow to read it: emulated, 50 ms is not always enough.
    let timeout = if emulated() { "250ms" } else { "50ms" };
    let mut gw = Servogate::start(&config(
        "e2e-crc",
        &broker.url(),
        &pty.gateway,
        &[1, 2, 3],
        &format!("offline_after = 50\ntimeout = \"{timeout}\"\n"),
    ));
    let mut samples: HashMap<String, u64> = HashMap::new();
    let mut errors = 0u64;
    while samples.values().sum::<u64>() < 1500 {
        let m = sub.next().await;
        match m.device_stream() {
            Some((device, "telemetry")) => {
                assert_matches_truth(device, &m.json);
                *samples.entry(device.to_owned()).or_default() += 1;
            }
            Some((_, "events")) if m.json["kind"] == "comm_error" => {
                let kind = m.json["error"].as_str().unwrap();
                assert!(
                    ["crc", "wrong_reply", "timeout"].contains(&kind),
                    "{}",
                    m.json
                );
                errors += 1;
            }
            _ => {}
        }
    }
    let stats = sim.cmd("stats");
    let corrupted: u64 = stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("corrupted="))
        .and_then(|v| v.parse().ok())
        .expect("corrupted=N");
    println!("{samples:?} samples, {errors} comm_error events, servosim corrupted {corrupted}");
    assert!(corrupted > 0);
    assert!(errors > 0, "corrupted replies were not reported");
    assert!(
        errors <= corrupted,
        "more errors ({errors}) than corrupted replies ({corrupted})"
    );
    assert!(gw.stop().success());
}
