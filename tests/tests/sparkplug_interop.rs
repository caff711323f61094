//! A third-party Sparkplug B host reads the gateway: pysparkplug (PyPI, pinned in
//! tests/interop/requirements.txt; scripts/test.sh installs it in target/interop-venv)
//! decodes the births and data of the edge node, metric aliases on, and what it read is
//! checked here against the simulator's truth.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;
use servogate_e2e::*;

/// The interpreter of the venv scripts/test.sh made (or `SERVOGATE_INTEROP_PYTHON`).
fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SERVOGATE_INTEROP_PYTHON") {
        return p.into();
    }
    let target = bin("servogate")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let p = target.join("interop-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: scripts/test.sh makes it (python3 -m venv target/interop-venv && \
         target/interop-venv/bin/pip install -r tests/interop/requirements.txt)",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysparkplug_decodes_the_births_and_data_with_aliases_and_the_values_are_the_drives() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-3", &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/pysparkplug_host.py");
    let mut host = Command::new(python())
        .args([script, &broker.port.to_string(), "plant-1", "3", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the pysparkplug host");
    let mut lines = BufReader::new(host.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("a line").expect("utf-8");
    assert_eq!(ready, "ready");

    // torque_raw: the torque register unscaled, an Int16 that goes negative (the case
    // pysparkplug reads only in 16-bit two's complement).
    let base = config("e2e-interop", &broker.url(), &pty.gateway, &[1, 2, 3], "")
        .replacen("[mqtt]\n", "[mqtt]\ncontract = \"sparkplug\"\n", 1)
        .replacen(
            "t_ms        =",
            "torque_raw  = { address = 0x0004, type = \"i16\" }\nt_ms        =",
            1,
        );
    let cfg = format!("{base}\n[sparkplug]\ngroup_id = \"plant-1\"\naliases = true\n");
    let mut gw = Servogate::start(&cfg);

    let report = tokio::task::spawn_blocking(move || {
        let line = lines.next().expect("the report").expect("utf-8");
        (line, host.wait().expect("the host exits"))
    })
    .await
    .unwrap();
    let (line, status) = report;
    let read: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(
        read["failed"],
        Value::Array(vec![]),
        "pysparkplug failed: {line}"
    );
    assert!(status.success(), "{status}: {line}");

    let nbirth = &read["nbirth"];
    assert_eq!(nbirth["seq"], 0);
    assert_eq!(nbirth["metrics"]["bdSeq"], "INT64");
    assert_eq!(nbirth["metrics"]["Node Control/Rebirth"], "BOOLEAN");
    let mut negative = 0;
    for unit in 1..=3u8 {
        let dev = &read["devices"][format!("axis-{unit}")];
        assert_eq!(dev["types"]["position"], "DOUBLE");
        assert_eq!(dev["types"]["statusword"], "UINT16");
        assert_eq!(dev["types"]["t_ms"], "UINT32");
        assert_eq!(dev["types"]["state"], "STRING");
        let data = dev["data"].as_array().unwrap();
        assert!(data.len() >= 20);
        for sample in data {
            // Names came back from the aliases; values are the drive's at that time.
            let t_ms = sample["t_ms"].as_u64().expect("t_ms by name") as u32;
            let want = truth(unit, t_ms);
            let position = sample["position"].as_f64().unwrap();
            assert!((position - want[0]).abs() < 1e-6, "axis-{unit}: {sample}");
            assert_eq!(sample["statusword"].as_f64(), Some(want[5]));
            let raw = sample["torque_raw"].as_i64().expect("torque_raw");
            assert_eq!(
                raw,
                (want[2] * 10.0).round() as i64,
                "axis-{unit}: {sample}"
            );
            negative += usize::from(raw < 0);
        }
        assert_eq!(dev["types"]["torque_raw"], "INT16");
    }
    assert!(negative > 0, "some negative Int16 values were read");
    assert!(gw.stop().success());
}
