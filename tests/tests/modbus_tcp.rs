//! Modbus over Ethernet end to end: servosim as a Modbus TCP server and as a serial device
//! server (RTU frames over TCP), servogate, and a real mosquitto.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use servogate_e2e::*;

/// Longest a test waits for a step while other messages keep coming.
const STEP: Duration = Duration::from_secs(60);

/// A request's timeout: an emulated gateway (the arm64 stage) reads replies late.
fn timeout() -> &'static str {
    if emulated() {
        "250ms"
    } else {
        "50ms"
    }
}

/// Bus `name` on 127.0.0.1:`port` with devices `axis-{u}` for `units`, to append to a
/// [`config`] (its profile `sim`).
fn tcp_bus(name: &str, protocol: &str, port: u16, units: &[u8], bus_extra: &str) -> String {
    let line = match protocol {
        "modbus-tcp" => String::new(),
        // The line behind the server: a pty-fast simulator, so no silence to keep.
        _ => "baud = 115200\nt35 = \"0ms\"\n".to_owned(),
    };
    let mut s = format!(
        "\n[[buses]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\naddress = \"127.0.0.1:{port}\"\ntimeout = \"{}\"\n{line}{bus_extra}\n",
        timeout()
    );
    for u in units {
        s.push_str(&format!(
            "\n[[devices]]\nname = \"axis-{u}\"\nbus = \"{name}\"\nunit = {u}\nprofile = \"sim\"\npoll = \"10ms\"\noffline_after = 3\n"
        ));
    }
    s
}

/// A config with only the TCP bus: [`config`]'s serial bus has no devices, so it is not
/// started.
fn tcp_only(id: &str, broker: &str, bus: &str, extra: &str) -> String {
    format!(
        "{extra}\n{}{bus}",
        config(id, broker, Path::new("/dev/null"), &[], "")
    )
}

/// Reads telemetry until every device of `devices` has `n` samples, each checked against
/// the simulator and numbered one after the other. Returns the samples per device.
async fn checked_telemetry(sub: &mut Subscriber, devices: &[&str], n: u32) -> HashMap<String, u32> {
    checked_telemetry_without(sub, devices, n, &[]).await
}

/// [`checked_telemetry`], failing on any value from a device of `never`.
async fn checked_telemetry_without(
    sub: &mut Subscriber,
    devices: &[&str],
    n: u32,
    never: &[&str],
) -> HashMap<String, u32> {
    let mut seq: HashMap<String, u64> = HashMap::new();
    let mut checked: HashMap<String, u32> = HashMap::new();
    let start = Instant::now();
    while devices
        .iter()
        .any(|d| checked.get(*d).copied().unwrap_or(0) < n)
    {
        assert!(start.elapsed() < STEP, "checked so far: {checked:?}");
        let m = sub.next().await;
        if let Some((device, "telemetry")) = m.device_stream() {
            assert!(
                !never.contains(&device),
                "telemetry from {device}: {}",
                m.json
            );
            if !devices.contains(&device) {
                continue;
            }
            let s = m.json["seq"].as_u64().unwrap();
            if let Some(prev) = seq.insert(device.to_owned(), s) {
                assert_eq!(s, prev + 1, "{device}: seq {prev} then {s}");
            }
            assert_matches_truth(device, &m.json);
            *checked.entry(device.to_owned()).or_default() += 1;
        }
    }
    checked
}

/// Waits until `device`'s availability is `state`; returns when it said so.
async fn availability(sub: &mut Subscriber, device: &str, state: &str) -> Instant {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < STEP, "{device} never {state}");
        let m = sub.next().await;
        if m.device_stream() == Some((device, "availability")) && m.json["state"] == state {
            return m.at;
        }
    }
}

const SIX: [&str; 6] = ["axis-1", "axis-2", "axis-3", "axis-4", "axis-5", "axis-6"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_drives_over_modbus_tcp_publish_the_simulators_values_with_seq_by_one() {
    for in_flight in [1, 4] {
        let broker = Mosquitto::start();
        let (_sim, port) = Servosim::start_tcp("modbus-tcp", "1-6", &[]);
        let id = format!("e2e-tcp{in_flight}");
        let mut sub = Subscriber::start(broker.port, &format!("servogate/{id}/#")).await;
        let bus = tcp_bus(
            "cell-b",
            "modbus-tcp",
            port,
            &[1, 2, 3, 4, 5, 6],
            &format!("max_in_flight = {in_flight}\n"),
        );
        let mut gw = Servogate::start(&tcp_only(&id, &broker.url(), &bus, ""));
        let n = checked_telemetry(&mut sub, &SIX, 50).await;
        println!("max_in_flight {in_flight}: {n:?}");
        assert!(gw.stop().success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_drives_behind_a_serial_device_server_publish_the_simulators_values_with_seq_by_one() {
    let broker = Mosquitto::start();
    let (_sim, port) = Servosim::start_tcp("modbus-rtu-tcp", "1-6", &[]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-rtutcp/#").await;
    let bus = tcp_bus("nport-1", "modbus-rtu-tcp", port, &[1, 2, 3, 4, 5, 6], "");
    let mut gw = Servogate::start(&tcp_only("e2e-rtutcp", &broker.url(), &bus, ""));
    checked_telemetry(&mut sub, &SIX, 50).await;
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_modbus_tcp_reply_is_dropped_and_never_taken_for_another_request() {
    // Unit 2 answers 40 ms after its request's timeout; units 1 and 3 at once. With
    // several requests in flight the late answer lands on the same connection, among the
    // others' (dropped by transaction id); with one in flight the connection is taken for
    // dead and opened again. Either way axis-2 never publishes a value, and every value of
    // the others is their own.
    let late = if emulated() { "290ms" } else { "90ms" };
    for in_flight in [3, 1] {
        let broker = Mosquitto::start();
        let (mut sim, port) =
            Servosim::start_tcp("modbus-tcp", "1-3", &["--late", &format!("2:{late}")]);
        let metrics = free_port();
        let id = format!("e2e-tcplate{in_flight}");
        let mut sub = Subscriber::start(broker.port, &format!("servogate/{id}/#")).await;
        let bus = tcp_bus(
            "cell-b",
            "modbus-tcp",
            port,
            &[1, 2, 3],
            &format!("max_in_flight = {in_flight}\n"),
        );
        let extra = format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
        let mut gw = Servogate::start(&tcp_only(&id, &broker.url(), &bus, &extra));
        availability(&mut sub, "axis-2", "offline").await;
        checked_telemetry_without(&mut sub, &["axis-1", "axis-3"], 100, &["axis-2"]).await;
        let series = if in_flight > 1 {
            "servogate_modbus_stale_replies_total{bus=\"cell-b\"}"
        } else {
            "servogate_modbus_port_reopens_total{bus=\"cell-b\"}"
        };
        let text = scrape_until(metrics, series, |t| sample(t, series).unwrap_or(0.0) >= 2.0).await;
        println!(
            "max_in_flight {in_flight}: {series} = {:?}",
            sample(&text, series)
        );
        // The simulator did answer unit 2: the answers were there to be mistaken.
        let (served, _) = sim.stats_pair("served", "writes", 2);
        assert!(served >= 2, "unit 2 answered {served} times");
        assert!(gw.stop().success());
    }
}

/// The serial bus of [`config`] with units 4 and 5 on a pty: the bus that must not notice
/// when the TCP bus loses its server.
struct SerialNeighbour {
    _pty: PtyPair,
    _sim: Servosim,
}

impl SerialNeighbour {
    fn start() -> (Self, String) {
        let pty = PtyPair::start();
        let sim = Servosim::start(&pty.sim, "4-5", &[]);
        let gateway = pty.gateway.clone();
        (
            Self {
                _pty: pty,
                _sim: sim,
            },
            gateway.display().to_string(),
        )
    }
}

/// Counts the serial neighbours' samples for one second; no TCP device publishes a value.
async fn neighbours_keep_their_rate(sub: &mut Subscriber) {
    let window = Instant::now();
    let mut n = 0u64;
    while window.elapsed() < Duration::from_secs(1) {
        let m = sub.next().await;
        match m.device_stream() {
            Some(("axis-4" | "axis-5", "telemetry")) => n += 1,
            Some((d, "telemetry")) => panic!("values from {d} while its server is gone"),
            _ => {}
        }
    }
    println!("serial neighbours: {n} samples in 1 s (2 devices at 100/s)");
    let floor = if emulated() { 50 } else { 150 };
    assert!(n > floor, "the serial bus slowed down: {n} samples/s");
}

/// Waits for axis-2 to go offline after `what` happened (now): within offline_after x
/// (poll + timeout) = 3 x 60 ms, plus the slack of a loaded machine (not checked when
/// emulated).
async fn offline_within_the_bound(sub: &mut Subscriber, what: &str) {
    let since = Instant::now();
    let took = availability(sub, "axis-2", "offline").await - since;
    let bound = 3 * (Duration::from_millis(10) + Duration::from_millis(50));
    println!("offline {took:?} after {what} (bound {bound:?})");
    if !emulated() {
        assert!(
            took < bound + Duration::from_millis(150),
            "offline after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_takes_its_drives_offline_in_time_and_they_return_with_it() {
    let broker = Mosquitto::start();
    let (_serial, pty) = SerialNeighbour::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let sim = Servosim::start_tcp_on("modbus-tcp", &listen, "1-3", &[]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-tcpkill/#").await;
    let bus = tcp_bus(
        "cell-b",
        "modbus-tcp",
        port,
        &[1, 2, 3],
        "backoff_max = \"500ms\"\n",
    );
    let text = config("e2e-tcpkill", &broker.url(), Path::new(&pty), &[4, 5], "") + &bus;
    let mut gw = Servogate::start(&text);
    checked_telemetry(
        &mut sub,
        &["axis-1", "axis-2", "axis-3", "axis-4", "axis-5"],
        20,
    )
    .await;

    // SIGKILL: the kernel resets the connection. Refused connections then fail each poll
    // at once, well inside the bound of a silent server.
    drop(sim);
    offline_within_the_bound(&mut sub, "the kill").await;
    neighbours_keep_their_rate(&mut sub).await;

    let _sim = Servosim::start_tcp_on("modbus-tcp", &listen, "1-3", &[]);
    let back = Instant::now();
    let online = availability(&mut sub, "axis-2", "online").await - back;
    println!("online {online:?} after the server came back (backoff_max 500ms)");
    checked_telemetry(&mut sub, &["axis-1", "axis-2", "axis-3"], 20).await;
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_path_without_a_reset_is_noticed_within_the_timeouts_and_heals() {
    let broker = Mosquitto::start();
    let (_serial, pty) = SerialNeighbour::start();
    let (_sim, upstream) = Servosim::start_tcp("modbus-tcp", "1-3", &[]);
    // The gate forwards the TCP stream and can freeze it: nothing moves, nothing closes.
    let gate = Gate::start(upstream).await;
    let metrics = free_port();
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-tcpfrozen/#").await;
    let bus = tcp_bus(
        "cell-b",
        "modbus-tcp",
        gate.port,
        &[1, 2, 3],
        "max_in_flight = 3\nbackoff_max = \"500ms\"\n",
    );
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n{}{bus}",
        config("e2e-tcpfrozen", &broker.url(), Path::new(&pty), &[4, 5], "")
    );
    let mut gw = Servogate::start(&text);
    checked_telemetry(
        &mut sub,
        &["axis-1", "axis-2", "axis-3", "axis-4", "axis-5"],
        20,
    )
    .await;

    gate.freeze();
    offline_within_the_bound(&mut sub, "the freeze").await;
    neighbours_keep_their_rate(&mut sub).await;
    // The silent connection was closed and opened again (not left to the kernel's
    // retransmission timeout).
    let series = "servogate_modbus_port_reopens_total{bus=\"cell-b\"}";
    scrape_until(metrics, series, |t| sample(t, series).unwrap_or(0.0) >= 1.0).await;

    gate.thaw();
    let thawed = Instant::now();
    let online = availability(&mut sub, "axis-2", "online").await - thawed;
    println!("online {online:?} after the thaw");
    checked_telemetry(&mut sub, &["axis-1", "axis-2", "axis-3"], 20).await;
    assert!(gw.stop().success());
}

/// `text` (from [`config`] or [`command_config`], serial port `/dev/null`) with its bus
/// reached over `protocol` at 127.0.0.1:`port` instead.
fn serial_to_tcp(text: &str, protocol: &str, port: u16, bus_extra: &str) -> String {
    let serial =
        "protocol = \"modbus-rtu\"\nport = \"/dev/null\"\nbaud = 115200\ntimeout = \"50ms\"\nt35 = \"0ms\"\n";
    assert!(text.contains(serial), "the serial bus of config()");
    let bus = tcp_bus("unused", protocol, port, &[], bus_extra);
    let link = bus.split_once("protocol").unwrap().1;
    text.replace(serial, &format!("protocol{link}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_over_modbus_tcp_moves_the_drive_and_a_refused_one_writes_nothing() {
    let broker = Mosquitto::start();
    let (mut sim, port) = Servosim::start_tcp("modbus-tcp", "1-3", &[]);
    let id = "e2e-tcpcmd";
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{id}/#")).await;
    let cmd = Commander::start(broker.port, &format!("servogate/{id}")).await;
    let policy = "\n[devices.commands]\nallow = [\"move\", \"quick_stop\"]\nmax_age = \"10s\"\nrequire_fresh = false\nlimits.position = { min = -200.0, max = 300.0, max_step = 50.0 }\nlimits.velocity = { min = 0.0, max = 200.0 }\n";
    let text = command_config(id, &broker.url(), Path::new("/dev/null"), policy);
    let mut gw = Servogate::start(&serial_to_tcp(
        &text,
        "modbus-tcp",
        port,
        "max_in_flight = 3\n",
    ));
    sub.until(|m| m.device_stream() == Some(("axis-1", "telemetry")))
        .await;
    let (before, _) = sim.stats_pair("writes", "applied", 1);
    assert_eq!(
        sim.truth_json(1)["commanded"],
        false,
        "untouched before the move"
    );

    // A relative step: servosim's untouched axes move on their own, so an absolute target
    // computed from a sample read a moment earlier is a step that grows with the delay
    // (it passed max_step 50 once on a loaded CI machine). No deadline in the commands:
    // each gets receipt + the policy's max_age.
    let mv = serde_json::json!({"id": "mv-1", "action": "move", "position": 20.0,
        "relative": true, "velocity": 100.0, "wait": "target_reached"});
    cmd.send("axis-1", &mv.to_string(), false).await;
    let res = command_result(&mut sub, "axis-1", Some("mv-1")).await;
    assert_eq!(res["status"], "done", "{res}");
    // The drive took the move and stands on its set point.
    let truth = sim.truth_json(1);
    let target = truth["target_position_mm"].as_f64().expect("a set point");
    assert!(
        (truth["position_mm"].as_f64().unwrap() - target).abs() < 1e-6,
        "{truth}"
    );
    let (after, applied) = sim.stats_pair("writes", "applied", 1);
    assert!(
        after > before,
        "the move wrote nothing: {before} -> {after}"
    );
    println!(
        "move over modbus-tcp done in {} ms, {} writes",
        res["latency_ms"],
        after - before
    );

    // Out of range: refused by the gateway, nothing reaches the drive.
    let far = serde_json::json!({"id": "mv-2", "action": "move", "position": 900.0,
        "velocity": 100.0});
    cmd.send("axis-1", &far.to_string(), false).await;
    let res = command_result(&mut sub, "axis-1", Some("mv-2")).await;
    assert_eq!(res["status"], "rejected", "{res}");
    assert_eq!(res["reason"], "out_of_range", "{res}");
    assert_eq!(sim.stats_pair("writes", "applied", 1), (after, applied));
    assert!(gw.stop().success());
}
