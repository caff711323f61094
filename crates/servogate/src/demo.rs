//! `servogate demo`: the whole pipeline on simulated servo axes, in one process.
//!
//! A pty pair is opened in-process: servosim answers on one end, the gateway's bus task
//! polls the other end by its path, exactly as it would poll /dev/ttyUSB0. The gateway
//! publishes to an embedded MQTT broker (rumqttd) unless `--broker` names another one,
//! and the terminal shows what arrives back from the broker, so every value on screen has
//! been through the whole pipeline.
//!
//! The axes also take commands: once every axis is online the demo enables them and then,
//! every [`MOVE_EVERY`], sends each a `move` to the next point of a repeating pattern, as
//! real MQTT commands on `{prefix}/devices/{axis}/cmd` that the gateway's command desk
//! checks against the axis's policy and the bus task executes. The table shows each
//! axis's CiA 402 state and its last command result. The config the demo runs is written
//! to a temporary file, so `servogate cmd --config FILE` can command an axis from another
//! terminal; the demo prints that line and a `mosquitto_pub` one at start.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};
use servosim::{SimOptions, Simulator, UnitList};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

use crate::{app, config};

/// The demo's config: six axes on one bus, as in configs/demo.toml.
const DEMO_CONFIG: &str = include_str!("../../../configs/demo.toml");

/// How often the axes get their next move.
const MOVE_EVERY: Duration = Duration::from_secs(2);
/// The moves' speed (mm/s): a pattern step (at most 31 mm) takes a third of a second.
const MOVE_VELOCITY: f64 = 100.0;
/// The time to live of the demo's commands.
const COMMAND_TTL_MS: u64 = 500;
/// Points of the pattern per cycle; each axis is a phase of it.
const PATTERN_POINTS: u64 = 8;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Publish to this broker (mqtt://host:port) instead of an embedded one.
    #[arg(long)]
    pub broker: Option<String>,
    /// Port of the embedded broker (default 1883, or a free port if 1883 is taken; 0: a
    /// free port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Number of simulated axes (1-247).
    #[arg(long, default_value_t = 6)]
    pub axes: u8,
    /// Stop after this long (e.g. "10s"); default: until Ctrl-C.
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
    /// How the simulated drives are reached: `rtu` (a pty, as RS-485), `tcp` (Modbus TCP
    /// on a loopback port) or `rtu-tcp` (RTU frames over TCP, as a serial device server).
    #[arg(long, value_enum, default_value_t = DemoLink::Rtu)]
    pub link: DemoLink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoLink {
    Rtu,
    Tcp,
    RtuTcp,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.axes == 0 || args.axes > 247 {
        bail!("--axes must be 1-247");
    }
    let sim = Arc::new(Simulator::new(
        UnitList::new(1..=args.axes).map_err(|e| anyhow::anyhow!("{e}"))?,
        SimOptions::default(),
    ));
    // The simulated bus: a pty pair with servosim on the master end, or servosim
    // listening on a loopback port.
    let mut slave = None;
    let (link, path) = match args.link {
        DemoLink::Rtu => {
            let (master, s) = SerialStream::pair().context("cannot open a pty pair")?;
            let path = tokio_serial::SerialPort::name(&s).context("the pty has no name")?;
            tokio::spawn(servosim::serve_rtu(master, sim));
            slave = Some(s);
            (Link::Serial, path)
        }
        DemoLink::Tcp | DemoLink::RtuTcp => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot listen on a loopback port")?;
            let addr = listener.local_addr()?.to_string();
            if args.link == DemoLink::Tcp {
                tokio::spawn(servosim::serve_tcp(listener, sim));
                (Link::Tcp, addr)
            } else {
                tokio::spawn(servosim::serve_rtu_tcp(listener, sim));
                (Link::RtuOverTcp, addr)
            }
        }
    };

    let url = match &args.broker {
        Some(url) => url.clone(),
        None => {
            let addr = start_broker(args.port)?;
            format!("mqtt://{addr}")
        }
    };

    // The config the gateway runs, on disk so that `servogate cmd --config` can use it.
    let text = demo_config(&path, &url, args.axes, link);
    let file = ConfigFile::write(&text)?;
    let cfg = config::parse(&text, &file.0)
        .map_err(|e| anyhow::anyhow!("the built-in demo config is invalid: {e}"))?;
    let prefix = cfg.mqtt.topic_prefix.clone();

    // The header stays on top of every redraw of the table: the broker's address is what
    // a user needs to watch the raw messages, and the two lines that move an axis.
    let mut header = format!(
        "servogate demo: {} simulated axes on {} {path}\nMQTT broker: {url}   topics: {prefix}/#\n",
        args.axes,
        link.protocol(),
    );
    if let Some(port) = url.strip_prefix("mqtt://127.0.0.1:") {
        header.push_str(&format!(
            "watch it:    mosquitto_sub -h 127.0.0.1 -p {port} -v -t '{prefix}/#'\n"
        ));
    }
    header.push_str(&format!(
        "move axis-1: {} cmd --config {} axis-1 move position=40 --ttl {COMMAND_TTL_MS}ms\n",
        own_name(),
        file.0.display()
    ));
    if let Some(hostport) = url.strip_prefix("mqtt://") {
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "1883"));
        // A fresh id and `ts` at every paste (the shell fills them in).
        header.push_str(&format!(
            "        or:  mosquitto_pub -h {host} -p {port} -q 1 -t '{prefix}/devices/axis-1/cmd' \
             -m '{{\"id\":\"me-'$(date +%s%N)'\",\"action\":\"move\",\"position\":-20,\
             \"ts\":\"'$(date -u +%FT%T.%3NZ)'\",\"ttl_ms\":{COMMAND_TTL_MS}}}'\n"
        ));
    }
    println!("{header}");

    let shutdown = CancellationToken::new();
    let table = tokio::spawn(show_live_values(
        url.clone(),
        prefix,
        header,
        args.axes,
        shutdown.clone(),
    ));
    let stop = shutdown.clone();
    let duration = args.duration.map(Duration::from);
    tokio::spawn(async move {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
        stop.cancel();
    });
    let options = app::Options {
        shutdown: Some(shutdown.clone()),
    };
    let result = app::run(cfg, options).await;
    shutdown.cancel();
    let shown = table.await.unwrap_or(0);
    drop(slave.take());
    drop(file);
    result?;
    if shown == 0 {
        bail!("no telemetry came back from the broker");
    }
    Ok(())
}

/// How the demo's bus reaches servosim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Serial,
    Tcp,
    RtuOverTcp,
}

impl Link {
    fn protocol(self) -> &'static str {
        match self {
            Self::Serial => "modbus-rtu",
            Self::Tcp => "modbus-tcp",
            Self::RtuOverTcp => "modbus-rtu-tcp",
        }
    }
}

/// The demo config's text for `axes` axes at `at` (the in-process pty, or servosim's
/// address) and the chosen broker: configs/demo.toml with its broker URL and port
/// replaced, and its first device (with its command policy) repeated for each axis.
fn demo_config(at: &str, url: &str, axes: u8, link: Link) -> String {
    let bus = match link {
        Link::Serial => format!("port = {at:?}"),
        Link::Tcp => format!("address = {at:?}"),
        Link::RtuOverTcp => format!("address = {at:?}"),
    };
    let mut text = DEMO_CONFIG
        .replace("url = \"mqtt://127.0.0.1:1883\"", &format!("url = {url:?}"))
        .replace("port = \"/tmp/servogate-demo.pty\"", &bus)
        .replace(
            "protocol = \"modbus-rtu\"",
            &format!("protocol = {:?}", link.protocol()),
        );
    if link == Link::Tcp {
        // No line under Modbus TCP: no baud rate, no inter-frame silence.
        text = text
            .replace("baud = 115200\n", "")
            .replace("t35 = \"0ms\"\n", "");
    }
    let Some(first) = text.find("[[devices]]") else {
        return text;
    };
    let (head, devices) = text.split_at(first);
    // The first device's block: up to the next `[[devices]]`.
    let block = devices[1..]
        .find("[[devices]]")
        .map_or(devices, |end| &devices[..end + 1]);
    let mut out = head.to_owned();
    for unit in 1..=axes {
        out.push_str(
            &block
                .replace("name = \"axis-1\"", &format!("name = \"axis-{unit}\""))
                .replace("unit = 1\n", &format!("unit = {unit}\n")),
        );
    }
    out
}

/// The demo's config on disk for as long as the demo runs.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn write(text: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("servogate-demo-{}.toml", std::process::id()));
        std::fs::write(&path, text)
            .with_context(|| format!("cannot write the demo config to {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How a user runs this binary: `servogate` when that is what the PATH finds, else its
/// full path (`target/release/servogate` after `cargo run`).
fn own_name() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "servogate".into();
    };
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("servogate") == exe));
    if on_path {
        "servogate".into()
    } else {
        exe.display().to_string()
    }
}

/// Starts rumqttd on 127.0.0.1 (in its own threads) and returns its address.
fn start_broker(port: Option<u16>) -> anyhow::Result<SocketAddr> {
    let addr = match port {
        // rumqttd binds in its own thread and does not say where: port 0 is resolved
        // here, to a port that was free a moment ago.
        Some(0) => TcpListener::bind("127.0.0.1:0")?.local_addr()?,
        Some(p) => SocketAddr::from(([127, 0, 0, 1], p)),
        None => {
            let preferred = SocketAddr::from(([127, 0, 0, 1], 1883));
            match TcpListener::bind(preferred) {
                Ok(l) => l.local_addr()?,
                Err(_) => TcpListener::bind("127.0.0.1:0")?.local_addr()?,
            }
        }
    };
    let toml = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 1000
max_segment_size = 10485760
max_segment_count = 10

[v4.1]
name = "demo"
listen = "{addr}"
next_connection_delay_ms = 1
  [v4.1.connections]
  connection_timeout_ms = 60000
  max_payload_size = 65536
  max_inflight_count = 1000
  dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&toml).context("embedded broker config")?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("servogate demo: embedded broker stopped: {e}");
            }
        })?;
    // Wait until it accepts connections (it binds in its own thread).
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the embedded broker did not start on {addr}")
}

#[derive(Default)]
struct Row {
    availability: String,
    telemetry: Option<Value>,
    samples: u64,
    /// The target of the last move sent to this axis.
    target: Option<f64>,
    /// The last command result that came back for this axis.
    result: Option<Value>,
}

/// Where the demo's command sequence is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Waiting for every axis to be online with telemetry.
    Online,
    /// `enable` sent to every axis; waiting for their results.
    Enabling,
    /// Moving: the next step of the pattern every [`MOVE_EVERY`].
    Moving,
}

/// The demo's commands: enable every axis, then move them all in step.
struct Sequence {
    axes: u8,
    prefix: String,
    phase: Phase,
    step: u64,
    sent: u64,
    done: u64,
}

impl Sequence {
    /// Axis `unit`'s target at `step`: one sine of 40 mm around 40 mm every
    /// [`PATTERN_POINTS`] steps, each axis a phase behind the one before, so the six
    /// axes make a travelling wave. Within every simulated stroke's reach (the policy's
    /// limits: -100..200 mm, at most 200 mm from where the axis stands).
    fn target(&self, unit: u8, step: u64) -> f64 {
        let phase = (step % PATTERN_POINTS) as f64 / PATTERN_POINTS as f64
            + f64::from(unit - 1) / f64::from(self.axes);
        let mm = 40.0 + 40.0 * (std::f64::consts::TAU * phase).sin();
        (mm * 10.0).round() / 10.0
    }

    fn send(&mut self, client: &AsyncClient, unit: u8, command: Value) {
        let topic = format!("{}/devices/axis-{unit}/cmd", self.prefix);
        // The client's request queue holds a whole step (16 > 6 axes); a command that
        // does not fit is left out, and its axis waits for the next step.
        if client
            .try_publish(topic, QoS::AtLeastOnce, false, command.to_string())
            .is_ok()
        {
            self.sent += 1;
        }
    }

    /// Sends `enable` to every axis.
    fn enable(&mut self, client: &AsyncClient) {
        for unit in 1..=self.axes {
            let cmd = json!({"id": "demo-enable", "action": "enable",
                             "ts": now(), "ttl_ms": COMMAND_TTL_MS});
            self.send(client, unit, cmd);
        }
        self.phase = Phase::Enabling;
    }

    /// Sends every axis its move of the next step; notes the targets in `rows`.
    fn next_move(&mut self, client: &AsyncClient, rows: &mut BTreeMap<String, Row>) {
        let step = self.step;
        self.step += 1;
        for unit in 1..=self.axes {
            let target = self.target(unit, step);
            let cmd = json!({"id": format!("demo-move-{step}"), "action": "move",
                             "position": target, "velocity": MOVE_VELOCITY,
                             "ts": now(), "ttl_ms": COMMAND_TTL_MS});
            self.send(client, unit, cmd);
            rows.entry(format!("axis-{unit}")).or_default().target = Some(target);
        }
    }
}

fn now() -> String {
    servogate_mqtt::payload::rfc3339_millis(SystemTime::now())
}

/// Subscribes to the gateway's topics, sends the command sequence and redraws a table
/// twice a second. Returns the number of telemetry messages received.
async fn show_live_values(
    url: String,
    prefix: String,
    header: String,
    axes: u8,
    shutdown: CancellationToken,
) -> u64 {
    let Some(hostport) = url.strip_prefix("mqtt://") else {
        eprintln!("live view needs an mqtt:// broker; values still go to {url}");
        shutdown.cancelled().await;
        return 1;
    };
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "1883"));
    let port = port.parse().unwrap_or(1883);
    let mut opts = MqttOptions::new(
        format!("servogate-demo-view-{}", std::process::id()),
        host,
        port,
    );
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut seq = Sequence {
        axes,
        prefix: prefix.clone(),
        phase: Phase::Online,
        step: 0,
        sent: 0,
        done: 0,
    };
    let mut total = 0u64;
    let tty = std::io::stdout().is_terminal();
    let mut redraw = tokio::time::interval(Duration::from_millis(500));
    let mut moves = tokio::time::interval(MOVE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = redraw.tick() => {
                // Off a terminal, print the table only once there is something in it.
                if tty || !rows.is_empty() {
                    draw(&rows, tty, &header, &seq);
                }
            }
            _ = moves.tick() => {
                if seq.phase == Phase::Moving {
                    seq.next_move(&client, &mut rows);
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = client.try_subscribe(format!("{prefix}/devices/+/telemetry"), QoS::AtMostOnce);
                    let _ = client.try_subscribe(format!("{prefix}/devices/+/availability"), QoS::AtMostOnce);
                    let _ = client.try_subscribe(format!("{prefix}/devices/+/cmd/result"), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let Some(rest) = p.topic.strip_prefix(&prefix).and_then(|r| r.strip_prefix("/devices/")) else { continue };
                    let Some((device, stream)) = rest.split_once('/') else { continue };
                    let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
                    let row = rows.entry(device.to_owned()).or_default();
                    match stream {
                        "telemetry" => {
                            row.samples += 1;
                            total += 1;
                            row.telemetry = Some(v);
                        }
                        "availability" => {
                            row.availability = v["state"].as_str().unwrap_or("?").to_owned();
                        }
                        "cmd/result" => {
                            if v["status"] == "done" {
                                seq.done += 1;
                            }
                            row.result = Some(v);
                        }
                        _ => {}
                    }
                    match seq.phase {
                        Phase::Online if all_axes(&rows, axes, |r| {
                            r.availability == "online" && r.telemetry.is_some()
                        }) => seq.enable(&client),
                        Phase::Enabling if all_axes(&rows, axes, |r| {
                            r.result.as_ref().is_some_and(|v| v["action"] == "enable")
                        }) => {
                            seq.phase = Phase::Moving;
                            seq.next_move(&client, &mut rows);
                            moves.reset();
                        }
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    if tty || !rows.is_empty() {
        draw(&rows, tty, &header, &seq);
    }
    total
}

/// Whether axis-1 to axis-`axes` all have a row for which `pred` holds.
fn all_axes(rows: &BTreeMap<String, Row>, axes: u8, pred: impl Fn(&Row) -> bool) -> bool {
    (1..=axes).all(|u| rows.get(&format!("axis-{u}")).is_some_and(&pred))
}

/// A command result in a few words: `move done 2.1ms`, `move rejected step_too_large`.
fn result_summary(v: &Value) -> String {
    let action = v["action"].as_str().unwrap_or("?");
    let status = v["status"].as_str().unwrap_or("?");
    match (v["reason"].as_str(), v["latency_ms"].as_f64()) {
        (Some(reason), _) => format!("{action} {status} {reason}"),
        (None, Some(ms)) => format!("{action} {status} {ms:.1}ms"),
        (None, None) => format!("{action} {status}"),
    }
}

fn draw(rows: &BTreeMap<String, Row>, tty: bool, header: &str, seq: &Sequence) {
    let mut out = String::new();
    if tty {
        out.push_str("\x1b[H\x1b[J"); // home, clear screen
        out.push_str(header);
        out.push('\n');
    }
    let commands = match seq.phase {
        Phase::Online => "waiting for every axis to be online".to_owned(),
        Phase::Enabling => "enabling the axes".to_owned(),
        Phase::Moving => format!(
            "step {} of the move pattern, one every {}s",
            seq.step,
            MOVE_EVERY.as_secs()
        ),
    };
    out.push_str(&format!(
        "commands: {} sent, {} done; {commands}\n",
        seq.sent, seq.done
    ));
    out.push_str(&format!(
        "{:<8} {:<8} {:>7} {:>10} {:>9} {:>10} {:>8} {:>7} {:>7} {:<18} {:<30} {:>8}\n",
        "device",
        "avail",
        "seq",
        "pos mm",
        "target",
        "vel mm/s",
        "torque %",
        "cur A",
        "temp C",
        "state",
        "last command",
        "samples"
    ));
    for (name, row) in rows {
        let t = row.telemetry.as_ref();
        let num = |k: &str| {
            t.and_then(|t| t[k].as_f64())
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
        };
        out.push_str(&format!(
            "{:<8} {:<8} {:>7} {:>10} {:>9} {:>10} {:>8} {:>7} {:>7} {:<18} {:<30} {:>8}\n",
            name,
            row.availability,
            t.and_then(|t| t["seq"].as_u64()).unwrap_or(0),
            num("position"),
            row.target
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
            num("velocity"),
            num("torque"),
            num("current"),
            num("temperature"),
            t.and_then(|t| t["state"].as_str()).unwrap_or("-"),
            row.result
                .as_ref()
                .map_or_else(|| "-".to_owned(), result_summary),
            row.samples
        ));
    }
    if !tty {
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_has_one_commandable_axis_per_unit_on_the_given_port_and_broker() {
        let text = demo_config("/dev/pts/9", "mqtt://127.0.0.1:1999", 3, Link::Serial);
        let cfg = config::parse(&text, "demo.toml".as_ref()).unwrap();
        assert_eq!(cfg.mqtt.url, "mqtt://127.0.0.1:1999");
        let config::BusKind::Modbus(rtu) = &cfg.buses[0].kind else {
            panic!("not modbus-rtu")
        };
        let config::Link::Serial { port, .. } = &rtu.link else {
            panic!("not a serial port")
        };
        assert_eq!(port, std::path::Path::new("/dev/pts/9"));
        let names: Vec<&str> = cfg.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["axis-1", "axis-2", "axis-3"]);
        for (i, d) in cfg.devices.iter().enumerate() {
            assert_eq!(d.address, config::DeviceAddress::Unit(i as u8 + 1));
            assert!(d.commands.is_some(), "{} takes commands", d.name);
        }
    }

    #[test]
    fn the_demo_config_over_tcp_names_the_address_and_the_protocol() {
        for (link, want) in [
            (
                Link::Tcp,
                config::Link::Tcp {
                    address: "127.0.0.1:5020".into(),
                    max_in_flight: 1,
                },
            ),
            (
                Link::RtuOverTcp,
                config::Link::RtuOverTcp {
                    address: "127.0.0.1:5020".into(),
                },
            ),
        ] {
            let text = demo_config("127.0.0.1:5020", "mqtt://127.0.0.1:1999", 2, link);
            let cfg = config::parse(&text, "demo.toml".as_ref()).unwrap_or_else(|e| panic!("{e}"));
            let config::BusKind::Modbus(m) = &cfg.buses[0].kind else {
                panic!("not modbus")
            };
            assert_eq!(m.link, want);
            assert_eq!(cfg.devices.len(), 2);
        }
    }

    #[test]
    fn every_target_of_the_pattern_is_within_the_policy_limits() {
        let seq = Sequence {
            axes: 6,
            prefix: String::new(),
            phase: Phase::Online,
            step: 0,
            sent: 0,
            done: 0,
        };
        for unit in 1..=6 {
            for step in 0..PATTERN_POINTS {
                let t = seq.target(unit, step);
                assert!((0.0..=80.0).contains(&t), "axis-{unit} step {step}: {t}");
                // Consecutive points are close: a step takes under a third of MOVE_EVERY.
                let d = (seq.target(unit, step + 1) - t).abs();
                assert!(d / MOVE_VELOCITY < MOVE_EVERY.as_secs_f64() / 3.0, "{d}");
            }
        }
    }
}
