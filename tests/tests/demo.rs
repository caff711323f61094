//! `servogate demo`: the README's first command, with nothing but the binary.

use std::process::Command;

use servogate_e2e::*;

#[test]
fn the_demo_shows_live_values_of_six_axes_that_came_back_through_its_broker() {
    let port = free_port();
    let out = Command::new(bin("servogate"))
        .args(["demo", "--duration", "4s", "--port"])
        .arg(port.to_string())
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The last table printed: one row per axis, online, with samples counted.
    let table = stdout.rsplit("device").next().unwrap();
    for axis in 1..=6 {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("axis-{axis} ")))
            .unwrap_or_else(|| panic!("no row for axis-{axis} in\n{stdout}"));
        assert!(row.contains("online"), "{row}");
        assert!(row.contains("operation_enabled"), "{row}");
        let samples: u64 = row.split_whitespace().last().unwrap().parse().unwrap();
        assert!(
            samples > 10,
            "axis-{axis}: {samples} samples in 4 s\n{stdout}"
        );
    }
}
