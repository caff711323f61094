//! One daemon, three kinds of bus: Modbus RTU on a pty, Modbus TCP, and CANopen on vcan.
//!
//! Where the kernel has no vcan0 (this family of machines) the test runs the two Modbus
//! buses and says the CANopen one was left out; `scripts/vm/can-tests.sh` runs it inside
//! the qemu VM with vcan0, all three buses at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use servogate_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtu_bus_a_tcp_bus_and_a_canopen_bus_run_side_by_side_in_one_daemon() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _rtu = Servosim::start(&pty.sim, "1-2", &[]);
    let (_tcp, port) = Servosim::start_tcp("modbus-tcp", "3-4", &[]);
    let can = vcan();
    let _can = can.map(|c| Servosim::start_can(c, "5-6", &["--period", "20ms"]));
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-mixed/#").await;

    let timeout = if emulated() { "250ms" } else { "50ms" };
    let mut text = config("e2e-mixed", &broker.url(), &pty.gateway, &[1, 2], "");
    text.push_str(&format!(
        "\n[[buses]]\nname = \"cell-b\"\nprotocol = \"modbus-tcp\"\naddress = \"127.0.0.1:{port}\"\ntimeout = \"{timeout}\"\nmax_in_flight = 2\n"
    ));
    for u in [3, 4] {
        text.push_str(&format!(
            "\n[[devices]]\nname = \"axis-{u}\"\nbus = \"cell-b\"\nunit = {u}\nprofile = \"sim\"\npoll = \"10ms\"\n"
        ));
    }
    let mut want = vec!["axis-1", "axis-2", "axis-3", "axis-4"];
    if let Some(c) = can {
        text.push_str(&can_config(c, &[5, 6], ""));
        want.extend(["drive-5", "drive-6"]);
    } else {
        println!("no vcan0 here: the CANopen bus is left out (the VM runs all three)");
    }
    let mut gw = Servogate::start(&text);

    // Each device: 30 samples, each its simulator's value, seq one after the other.
    let mut seq: HashMap<String, u64> = HashMap::new();
    let mut n: HashMap<String, u32> = HashMap::new();
    let start = Instant::now();
    while want.iter().any(|d| n.get(*d).copied().unwrap_or(0) < 30) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "samples so far: {n:?}"
        );
        let m = sub.next().await;
        let Some((device, "telemetry")) = m.device_stream() else {
            continue;
        };
        assert!(want.contains(&device), "telemetry from {device}");
        let s = m.json["seq"].as_u64().unwrap();
        if let Some(prev) = seq.insert(device.to_owned(), s) {
            assert_eq!(s, prev + 1, "{device}: seq {prev} then {s}");
        }
        if device.starts_with("drive-") {
            assert_can_matches_truth(device, &m.json);
        } else {
            assert_matches_truth(device, &m.json);
        }
        *n.entry(device.to_owned()).or_default() += 1;
    }
    println!("samples: {n:?}");
    assert!(gw.stop().success());
}
