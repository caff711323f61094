//! One slow motor is visible at once: `late` events and `uncertain` telemetry for it,
//! `good` for the others.

use std::collections::HashMap;

use servogate_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_unit_raises_late_events_and_uncertain_telemetry_while_the_others_stay_good() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let mut sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-late/#").await;
    let mut gw = Servogate::start(&config(
        "e2e-late",
        &broker.url(),
        &pty.gateway,
        &[1, 2, 3],
        "late_after = \"25ms\"\ntimeout = \"200ms\"\n",
    ));
    sub.until(|m| m.device_stream() == Some(("axis-3", "telemetry")))
        .await;
    sim.cmd("late 3 40ms");
    let late = sub
        .until(|m| m.device_stream() == Some(("axis-3", "events")) && m.json["kind"] == "late")
        .await;
    assert!(
        late.json["elapsed_ms"].as_f64().unwrap() >= 40.0,
        "{}",
        late.json
    );
    // From now on axis-3 is uncertain (late) and the others good, with true values.
    let mut seen: HashMap<String, u64> = HashMap::new();
    while seen.len() < 3 || seen.values().any(|&n| n < 20) {
        let m = sub.next().await;
        if let Some((device, "telemetry")) = m.device_stream() {
            assert_matches_truth(device, &m.json);
            if device == "axis-3" {
                assert_eq!(m.json["quality"], "uncertain", "{}", m.json);
                assert_eq!(m.json["quality_reasons"][0], "late");
            } else {
                assert_eq!(m.json["quality"], "good", "{device}: {}", m.json);
            }
            *seen.entry(device.to_owned()).or_default() += 1;
        }
    }
    assert!(gw.stop().success());
}
