//! Command latency under load (BENCHMARKS.md, "Command latency"): a benchmark, not a test.
//!
//! A real mosquitto on a free loopback port, socat's pty pair, servosim with six units
//! (`--timing-faithful --baud 115200` in faithful mode) and servogate polling the six flat
//! out (`poll = "1us"`), each device with a policy that lets `write` set `speed_limit`.
//! The poll rate without commands is measured first (the baseline), then N `write`
//! commands (a fresh id each, `ts` + `ttl_ms`) go to the six devices in turn, K in
//! flight, and every result is collected. It prints p50 / p99 / max of the results'
//! `latency_ms` (the gateway's receipt to the result handed to its ring) and of the
//! client's round trip (publish to result received), the telemetry sample rate with and
//! without commands (from the telemetry `seq` and `ts` of every device at the start and
//! end of each window), the commands' own wire time, and servosim's write counters.
//!
//! ```sh
//! cargo build --release --bins
//! cargo run --release -p servogate-e2e --example cmd_latency -- --mode faithful --commands 10000
//! ```
//!
//! `scripts/bench-commands.sh` builds and runs both modes.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};
use servogate_e2e::*;
use tokio::sync::mpsc;

const ID: &str = "cmdbench";
const UNITS: u8 = 6;
const BAUD: f64 = 115_200.0;
/// t3.5 above 19200 baud (Modbus over serial line 1.02, 2.5.1.1).
const T35_MS: f64 = 1.75;

struct Args {
    faithful: bool,
    commands: usize,
    in_flight: usize,
    baseline: Duration,
    nodelay: bool,
    broker_nagle: bool,
    /// Wait a random 0..=spread_ms before each command, so that commands arrive at
    /// random points of the poll cycle instead of in step with it.
    spread_ms: u64,
}

fn args() -> Args {
    let mut a = Args {
        faithful: true,
        commands: 10_000,
        in_flight: 1,
        baseline: Duration::from_secs(10),
        nodelay: true,
        broker_nagle: false,
        spread_ms: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => {
                a.faithful = match value().as_str() {
                    "faithful" => true,
                    "instant" => false,
                    m => panic!("--mode instant|faithful, not {m}"),
                }
            }
            "--client-nagle" => a.nodelay = false,
            "--spread" => a.spread_ms = value().parse().expect("--spread MS"),
            "--broker-nagle" => a.broker_nagle = true,
            "--commands" => a.commands = value().parse().expect("--commands N"),
            "--in-flight" => a.in_flight = value().parse().expect("--in-flight K"),
            "--baseline" => {
                a.baseline = Duration::from_secs(value().parse().expect("--baseline SECONDS"))
            }
            _ => panic!(
                "usage: cmd_latency --mode instant|faithful [--commands N] [--in-flight K] \
                 [--baseline SECONDS] [--client-nagle] [--broker-nagle] [--spread MS]"
            ),
        }
    }
    assert!(a.in_flight >= 1 && a.commands >= 1);
    a
}

/// The gateway's config: six devices polled flat out, one read of 10 registers each
/// (0x000F-0x0018, which ends with the speed limit), and a policy that allows `write`.
fn gateway_config(broker: &str, port: &std::path::Path, faithful: bool) -> String {
    // A pty has no baud rate: in instant mode the gateway keeps no inter-frame silence
    // either; in faithful mode it keeps the real t3.5 (1.75 ms at 115200 baud).
    let t35 = if faithful { "" } else { "t35 = \"0ms\"\n" };
    let mut s = format!(
        r#"[gateway]
id = "{ID}"
log = "warn"

[mqtt]
url = "{broker}"

[profiles.p]
first       = {{ address = 0x000F, type = "u16" }}
speed_limit = {{ address = 0x0018, type = "u16", unit = "mm/s" }}

[[buses]]
name = "b"
protocol = "modbus-rtu"
port = "{port}"
baud = 115200
timeout = "100ms"
max_gap = 125
{t35}"#,
        port = port.display()
    );
    for u in 1..=UNITS {
        s.push_str(&format!(
            r#"
[[devices]]
name = "axis-{u}"
bus = "b"
unit = {u}
profile = "p"
poll = "1us"
late_after = "1s"
[devices.commands]
allow = ["write"]
writable = ["speed_limit"]
max_rate = 100000
limits.speed_limit = {{ min = 0, max = 250 }}
"#
        ));
    }
    s
}

/// servosim's counters: (served, writes, applied), each summed over the units.
fn sim_stats(sim: &mut Servosim) -> (u64, u64, u64) {
    let line = sim.cmd("stats");
    let sum = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .split(',')
            .filter_map(|p| p.split_once(':')?.1.parse::<u64>().ok())
            .sum()
    };
    (sum("served"), sum("writes"), sum("applied"))
}

/// Every device's telemetry (seq, acquisition time) at one moment: the first sample of
/// each that arrives on a fresh subscription.
async fn telemetry_marks(port: u16) -> HashMap<String, (u64, SystemTime)> {
    let mut sub = Subscriber::start(port, &format!("servogate/{ID}/devices/+/telemetry")).await;
    let mut marks = HashMap::new();
    while marks.len() < usize::from(UNITS) {
        let m = sub.next().await;
        if let Some((device, "telemetry")) = m.device_stream() {
            let seq = m.json["seq"].as_u64().expect("seq");
            let ts = humantime::parse_rfc3339(m.json["ts"].as_str().expect("ts")).expect("ts");
            marks.entry(device.to_owned()).or_insert((seq, ts));
        }
    }
    marks
}

/// Samples per second over all devices between two sets of marks.
fn sample_rate(
    a: &HashMap<String, (u64, SystemTime)>,
    b: &HashMap<String, (u64, SystemTime)>,
) -> f64 {
    a.iter()
        .map(|(d, (s0, t0))| {
            let (s1, t1) = b[d];
            (s1 - s0) as f64 / t1.duration_since(*t0).unwrap().as_secs_f64()
        })
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{name}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (n = {})",
        percentile(&v, 0.50),
        percentile(&v, 0.99),
        v[v.len() - 1],
        v.len()
    )
}

/// The gateway's CPU time so far (user + system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A wait with microsecond resolution (tokio's timer has whole milliseconds): a sleep
/// to 200 us before the end, then a spin.
fn spin_sleep(d: Duration) {
    let end = Instant::now() + d;
    if d > Duration::from_micros(200) {
        std::thread::sleep(d - Duration::from_micros(200));
    }
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

fn time(v: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(v.as_str()?).ok()
}

/// `b - a` in milliseconds (negative when b is earlier).
fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

/// One result as the client saw it.
struct Got {
    id: String,
    status: String,
    latency_ms: f64,
    at: Instant,
    /// Wall clock: when the client had it, and the result's `received` and `ts`.
    wall: SystemTime,
    received: Option<SystemTime>,
    ts: Option<SystemTime>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let mode = if a.faithful { "faithful" } else { "instant" };
    // Without Nagle's algorithm on the broker's sockets: with it (mosquitto's default) a
    // result that follows the broker's PUBACK to the same client within the client's
    // delayed-ACK time (40 ms on Linux) waits for that ACK (BENCHMARKS.md).
    let broker = Mosquitto::start_with(if a.broker_nagle {
        ""
    } else {
        "set_tcp_nodelay true"
    });
    let pty = PtyPair::start();
    let extra: &[&str] = if a.faithful {
        &["--timing-faithful", "--baud", "115200"]
    } else {
        &[]
    };
    let mut sim = Servosim::start(&pty.sim, &format!("1-{UNITS}"), extra);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bench.toml");
    std::fs::write(
        &cfg,
        gateway_config(&broker.url(), &pty.gateway, a.faithful),
    )
    .unwrap();
    // Spawned here rather than with `Servogate::start`, which logs at info: 10,000 audit
    // lines on stderr would be part of what is measured.
    let mut gw = Command::new(bin("servogate"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start servogate");

    // The client: results in through one subscription, commands out.
    let mut opts = MqttOptions::new(
        format!("cmdbench-{}", free_port()),
        "127.0.0.1",
        broker.port,
    );
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    // The client's socket without Nagle's algorithm (rumqttc keeps it on by default):
    // with it, a command sent right after the client's PUBACK of the previous result
    // waits for the broker's delayed ACK (about 40 ms). `--client-nagle` keeps it.
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(a.nodelay);
    eventloop.set_network_options(net);
    let (tx, mut results) = mpsc::unbounded_channel::<Got>();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let filter = format!("servogate/{ID}/devices/+/cmd/result");
    tokio::spawn({
        let client = client.clone();
        async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let (at, wall) = (Instant::now(), SystemTime::now());
                        let v: Value = serde_json::from_slice(&p.payload).expect("a JSON result");
                        let got = Got {
                            id: v["id"].as_str().unwrap_or_default().to_owned(),
                            status: v["status"].as_str().unwrap_or_default().to_owned(),
                            latency_ms: v["latency_ms"].as_f64().unwrap_or(f64::NAN),
                            at,
                            wall,
                            received: time(&v["received"]),
                            ts: time(&v["ts"]),
                        };
                        if tx.send(got).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // The broker goes away at the end; before that, a missing result
                    // shows as the main loop's timeout.
                    Err(_) => return,
                }
            }
        }
    });
    tokio::time::timeout(DEADLINE, subscribed)
        .await
        .expect("subscribed")
        .unwrap();

    // Warm-up: every device online and publishing.
    let _ = telemetry_marks(broker.port).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Baseline: the poll rate without commands.
    let b0 = telemetry_marks(broker.port).await;
    let (served0, _, _) = sim_stats(&mut sim);
    let (cpu0, wall0) = (cpu_time(gw.id()), Instant::now());
    tokio::time::sleep(a.baseline).await;
    let b1 = telemetry_marks(broker.port).await;
    let (served1, writes1, applied1) = sim_stats(&mut sim);
    let (cpu1, wall1) = (cpu_time(gw.id()), Instant::now());
    let base_rate = sample_rate(&b0, &b1);
    let base_tx = (served1 - served0) as f64 / (wall1 - wall0).as_secs_f64();
    assert_eq!((writes1, applied1), (0, 0), "no write before the commands");

    // The commands: N writes of speed_limit, K in flight, the six devices in turn.
    let c0 = telemetry_marks(broker.port).await;
    let (cpu2, wall2) = (cpu_time(gw.id()), Instant::now());
    let mut sent: HashMap<String, (Instant, SystemTime)> = HashMap::new();
    // Where a round trip goes, on the wall clock (the gateway's times have whole ms):
    // publish -> the gateway's receipt, and the result's `ts` -> the client has it.
    let (mut uplink, mut downlink) = (Vec::new(), Vec::new());
    let mut round_trips = Vec::with_capacity(a.commands);
    let mut latencies = Vec::with_capacity(a.commands);
    let mut not_done: HashMap<String, usize> = HashMap::new();
    let mut next = 0usize;
    let mut received = 0usize;
    while received < a.commands {
        while next < a.commands && sent.len() < a.in_flight {
            if a.spread_ms > 0 {
                // One at a time, the next command would follow the last result at once,
                // always at the same point of the bus's cycle (just after a write).
                let us = fastrand::u64(0..=a.spread_ms * 1000);
                spin_sleep(Duration::from_micros(us));
            }
            let id = format!("b-{next}");
            let unit = next % usize::from(UNITS) + 1;
            let cmd = json!({
                "id": id, "action": "write", "values": {"speed_limit": 100 + next % 151},
                "ts": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                "ttl_ms": 1000,
            });
            let topic = format!("servogate/{ID}/devices/axis-{unit}/cmd");
            sent.insert(id, (Instant::now(), SystemTime::now()));
            client
                .publish(topic, QoS::AtLeastOnce, false, cmd.to_string())
                .await
                .expect("publish");
            next += 1;
        }
        let got = tokio::time::timeout(DEADLINE, results.recv())
            .await
            .expect("a result within the deadline")
            .expect("client running");
        let Some((at, wall)) = sent.remove(&got.id) else {
            continue; // not ours (cannot happen: ids are fresh)
        };
        received += 1;
        if let (Some(r), Some(ts)) = (got.received, got.ts) {
            uplink.push(ms_between(wall, r));
            downlink.push(ms_between(ts, got.wall));
        }
        round_trips.push((got.at - at).as_secs_f64() * 1e3);
        latencies.push(got.latency_ms);
        if got.status != "done" {
            *not_done.entry(got.status).or_default() += 1;
        }
    }
    let (cpu3, wall3) = (cpu_time(gw.id()), Instant::now());
    let c1 = telemetry_marks(broker.port).await;
    let (served3, writes3, applied3) = sim_stats(&mut sim);
    let cmd_secs = (wall3 - wall2).as_secs_f64();
    let cmd_rate = sample_rate(&c0, &c1);
    let cmd_tx = (served3 - served1) as f64 / (wall3 - wall1).as_secs_f64();

    // The commands' own wire time: an 06 write is 8 bytes out and an 8-byte echo back,
    // 11 bits a character, plus servosim's t3.5 before the echo and the gateway's after.
    let write_wire_ms = 16.0 * 11.0 / BAUD * 1e3 + 2.0 * T35_MS;
    let read_wire_ms = (8.0 + 5.0 + 20.0) * 11.0 / BAUD * 1e3 + 2.0 * T35_MS;
    let commands_per_s = a.commands as f64 / cmd_secs;
    let busy = commands_per_s * write_wire_ms / 1e3;

    println!(
        "mode={mode} units={UNITS} commands={} in_flight={}",
        a.commands, a.in_flight
    );
    println!(
        "{}",
        summary("latency_ms (gateway: receipt -> result)", latencies)
    );
    println!(
        "{}",
        summary(
            "round trip (client: publish -> result received)",
            round_trips
        )
    );
    println!(
        "{}",
        summary("  of which publish -> gateway receipt (ms clock)", uplink)
    );
    println!(
        "{}",
        summary(
            "  of which result ts -> client receipt (ms clock)",
            downlink
        )
    );
    println!(
        "commands: {:.1} s, {commands_per_s:.1}/s; results not done: {not_done:?}",
        cmd_secs
    );
    println!(
        "telemetry samples/s: baseline {base_rate:.1} over {:.1} s, with commands {cmd_rate:.1} \
         ({:+.2} %)",
        (wall1 - wall0).as_secs_f64(),
        (cmd_rate / base_rate - 1.0) * 100.0
    );
    println!(
        "servosim replies/s (reads + writes): baseline {base_tx:.1}, with commands {cmd_tx:.1}"
    );
    println!(
        "gateway CPU: baseline {:.1} % of a core, with commands {:.1} %",
        (cpu1 - cpu0).as_secs_f64() / (wall1 - wall0).as_secs_f64() * 100.0,
        (cpu3 - cpu2).as_secs_f64() / cmd_secs * 100.0
    );
    if a.faithful {
        println!(
            "wire time: a write {write_wire_ms:.3} ms, a read of 10 registers {read_wire_ms:.3} ms \
             (each with its two t3.5); commands kept the bus busy {:.1} % of the time, so \
             the expected poll rate is {:.1}/s ({:+.2} %)",
            busy * 100.0,
            base_rate * (1.0 - busy),
            -busy * 100.0
        );
    }
    println!(
        "servosim: writes {writes3}, applied {applied3} (expected {})",
        a.commands
    );
    let ok = writes3 == a.commands as u64 && applied3 == a.commands as u64 && not_done.is_empty();
    let _ = gw.kill();
    let _ = gw.wait();
    if !ok {
        eprintln!("cmd_latency: FAILED: not every command was done exactly once");
        std::process::exit(1);
    }
}
