//! `servogate demo`: the README's first command, with nothing but the binary.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use serde_json::Value;
use servogate_e2e::*;

/// What the test saw of one axis on the demo's broker.
#[derive(Default)]
struct Axis {
    /// Target of each move command sent, by id.
    moves: HashMap<String, f64>,
    /// Ids of the moves whose result was `done`.
    done: HashSet<String>,
    /// The target of the last move sent, and whether telemetry showed the axis on it.
    target: Option<f64>,
    reached: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_moves_six_axes_by_commands_and_shows_their_values_and_results() {
    let port = free_port();
    let mut demo = program("servogate")
        .args(["demo", "--duration", "120s", "--port"])
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the demo");
    let (tx, lines) = mpsc::channel();
    let stdout = demo.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    // The header: the broker is up, and the two lines that move an axis by hand.
    let mut header = Vec::new();
    while header.len() < 5 {
        header.push(lines.recv_timeout(DEADLINE).expect("the demo's header"));
    }
    let cmd_line = header
        .iter()
        .find_map(|l| l.strip_prefix("move axis-1: "))
        .unwrap_or_else(|| panic!("no servogate cmd line in {header:#?}"))
        .to_owned();
    assert!(
        header.iter().any(|l| l.contains(&format!(
            "mosquitto_pub -h 127.0.0.1 -p {port} -q 1 -t 'servogate/demo-cell/devices/axis-1/cmd'"
        ))),
        "{header:#?}"
    );

    // Every axis gets moves, each move is done, and the axis stands on its target later.
    let mut sub = Subscriber::start(port, "servogate/demo-cell/#").await;
    let mut axes: HashMap<String, Axis> = HashMap::new();
    let finished = |axes: &HashMap<String, Axis>| {
        axes.len() == 6 && axes.values().all(|a| a.done.len() >= 2 && a.reached >= 2)
    };
    while !finished(&axes) {
        let m = sub.next().await;
        let Some(rest) = m.topic.strip_prefix("servogate/demo-cell/devices/") else {
            continue;
        };
        let Some((device, stream)) = rest.split_once('/') else {
            continue;
        };
        let axis = axes.entry(device.to_owned()).or_default();
        match stream {
            "cmd" => {
                let cmd: Value = serde_json::from_str(m.json.as_str().unwrap()).unwrap();
                assert!(cmd["ts"].is_string() && cmd["ttl_ms"].is_u64(), "{cmd}");
                if cmd["action"] == "move" {
                    let target = cmd["position"].as_f64().unwrap();
                    axis.moves
                        .insert(cmd["id"].as_str().unwrap().to_owned(), target);
                    axis.target = Some(target);
                }
            }
            "cmd/result" => {
                let id = m.json["id"].as_str().unwrap_or_default();
                if axis.moves.contains_key(id) {
                    // A move may meet a sample that came late on a loaded machine: the
                    // policy then refuses it (require_fresh), and nothing else may happen.
                    if m.json["reason"] == "stale_feedback" {
                        continue;
                    }
                    assert_eq!(m.json["status"], "done", "{device}: {}", m.json);
                    assert!(m.json["latency_ms"].as_f64().unwrap() < 1000.0);
                    axis.done.insert(id.to_owned());
                }
            }
            "telemetry" => {
                let on = |t: f64| (m.json["position"].as_f64().unwrap() - t).abs() < 0.0015;
                // Standing on the target of the last move (its command seen before this
                // sample), one count per move.
                if axis.target.is_some_and(on) {
                    axis.target = None;
                    axis.reached += 1;
                }
            }
            _ => {}
        }
    }

    // `servogate cmd` as the demo printed it, against the demo's own config file.
    let mut args = cmd_line.split_whitespace();
    let printed_program = args.next().unwrap();
    assert!(printed_program.ends_with("servogate"), "{cmd_line}");
    let out = tokio::task::spawn_blocking({
        let args: Vec<String> = args.map(str::to_owned).collect();
        move || program("servogate").args(args).output().unwrap()
    })
    .await
    .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd_line}: {printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(
        (&result["status"], &result["action"]),
        (&Value::from("done"), &Value::from("move"))
    );

    // A clean stop; the last table printed: one row per axis, online, enabled, with
    // samples counted and the result of a move.
    let pid = demo.id().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    let status = demo.wait().unwrap();
    let stdout = reader.join().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut demo.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "demo failed: {stderr}\n{stdout}");
    assert_the_last_table_shows_six_moving_axes(&stdout);
}

/// The demo's last table: one row per axis, online, enabled, with samples counted and the
/// result of a move; the summary line above it counts commands done.
fn assert_the_last_table_shows_six_moving_axes(stdout: &str) {
    let table = stdout.rsplit("\ndevice ").next().unwrap();
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("commands: "))
        .unwrap_or_else(|| panic!("no summary line in\n{stdout}"));
    assert!(summary.contains("done; step"), "{summary}");
    for axis in 1..=6 {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("axis-{axis} ")))
            .unwrap_or_else(|| panic!("no row for axis-{axis} in\n{stdout}"));
        assert!(row.contains("online"), "{row}");
        assert!(row.contains("operation_enabled"), "{row}");
        assert!(row.contains(" move "), "{row}");
        let samples: u64 = row.split_whitespace().last().unwrap().parse().unwrap();
        assert!(samples > 10, "axis-{axis}: {samples} samples\n{stdout}");
    }
}

/// `demo --link tcp --port 0`: the drives over Modbus TCP on loopback, the embedded broker
/// on a port the demo picks and prints; the demo ends by itself after `--duration`.
#[test]
fn the_demo_over_modbus_tcp_on_a_broker_port_it_picks_moves_every_axis_and_ends_cleanly() {
    let out = program("servogate")
        .args(["demo", "--link", "tcp", "--port", "0", "--duration"])
        .arg(if emulated() { "40s" } else { "6s" })
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("on modbus-tcp 127.0.0.1:"), "{stdout}");
    let port: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MQTT broker: mqtt://127.0.0.1:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no broker address in\n{stdout}"));
    assert_ne!(port, 0, "the printed port is the one the broker listens on");
    assert!(
        stdout.contains(&format!("mosquitto_sub -h 127.0.0.1 -p {port} ")),
        "{stdout}"
    );
    assert_the_last_table_shows_six_moving_axes(&stdout);
}
