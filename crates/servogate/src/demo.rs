//! `servogate demo`: the whole pipeline on simulated servo axes, in one process.
//!
//! A pty pair is opened in-process: servosim answers on one end, the gateway's bus task
//! polls the other end by its path, exactly as it would poll /dev/ttyUSB0. The gateway
//! publishes to an embedded MQTT broker (rumqttd) unless `--broker` names another one,
//! and the terminal shows what arrives back from the broker, so every value on screen has
//! been through the whole pipeline.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;
use servosim::{SimOptions, Simulator, UnitList};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

use crate::{app, config};

/// The demo's config: six axes on one bus, as in configs/demo.toml.
const DEMO_CONFIG: &str = include_str!("../../../configs/demo.toml");

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Publish to this broker (mqtt://host:port) instead of an embedded one.
    #[arg(long)]
    pub broker: Option<String>,
    /// Port of the embedded broker (default 1883, or a free port if 1883 is taken).
    #[arg(long)]
    pub port: Option<u16>,
    /// Number of simulated axes (1-247).
    #[arg(long, default_value_t = 6)]
    pub axes: u8,
    /// Stop after this long (e.g. "10s"); default: until Ctrl-C.
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.axes == 0 || args.axes > 247 {
        bail!("--axes must be 1-247");
    }
    // The simulated bus: a pty pair, servosim on the master end.
    let (master, slave) = SerialStream::pair().context("cannot open a pty pair")?;
    let path = tokio_serial::SerialPort::name(&slave).context("the pty has no name")?;
    let sim = Arc::new(Simulator::new(
        UnitList::new(1..=args.axes).map_err(|e| anyhow::anyhow!("{e}"))?,
        SimOptions::default(),
    ));
    tokio::spawn(servosim::serve_rtu(master, sim));

    let url = match &args.broker {
        Some(url) => url.clone(),
        None => {
            let addr = start_broker(args.port)?;
            format!("mqtt://{addr}")
        }
    };

    let mut cfg = config::parse(DEMO_CONFIG, "configs/demo.toml".as_ref())
        .map_err(|e| anyhow::anyhow!("the built-in demo config is invalid: {e}"))?;
    demo_overrides(&mut cfg, &path, &url, args.axes);
    let prefix = cfg.mqtt.topic_prefix.clone();

    // The header stays on top of every redraw of the table: the broker's address is what
    // a user needs to watch the raw messages.
    let mut header = format!(
        "servogate demo: {} simulated axes on {path}\nMQTT broker: {url}   topics: {prefix}/#\n",
        args.axes
    );
    if let Some(port) = url.strip_prefix("mqtt://127.0.0.1:") {
        header.push_str(&format!(
            "watch it:    mosquitto_sub -h 127.0.0.1 -p {port} -v -t '{prefix}/#'\n"
        ));
    }
    println!("{header}");

    let shutdown = CancellationToken::new();
    let table = tokio::spawn(show_live_values(
        url.clone(),
        prefix,
        header,
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
    drop(slave);
    result?;
    if shown == 0 {
        bail!("no telemetry came back from the broker");
    }
    Ok(())
}

/// Points the demo config at the in-process pty and the chosen broker.
fn demo_overrides(cfg: &mut config::Config, port: &str, url: &str, axes: u8) {
    cfg.mqtt.url = url.to_owned();
    for bus in &mut cfg.buses {
        if let config::BusKind::ModbusRtu(rtu) = &mut bus.kind {
            rtu.port = port.into();
            // A pty has no baud rate: no inter-frame silence to keep.
            rtu.t35 = Some(Duration::ZERO);
        }
    }
    let template = cfg.devices.first().cloned();
    if let Some(template) = template {
        cfg.devices = (1..=axes)
            .map(|unit| {
                let mut d = template.clone();
                d.name = format!("axis-{unit}");
                d.address = config::DeviceAddress::Unit(unit);
                d
            })
            .collect();
    }
}

/// Starts rumqttd on 127.0.0.1 (in its own threads) and returns its address.
fn start_broker(port: Option<u16>) -> anyhow::Result<SocketAddr> {
    let addr = match port {
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
}

/// Subscribes to the gateway's topics and redraws a table twice a second.
/// Returns the number of telemetry messages received.
async fn show_live_values(
    url: String,
    prefix: String,
    header: String,
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
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut total = 0u64;
    let tty = std::io::stdout().is_terminal();
    let mut redraw = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = redraw.tick() => {
                // Off a terminal, print the table only once there is something in it.
                if tty || !rows.is_empty() {
                    draw(&rows, tty, &header);
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    let _ = client.try_subscribe(format!("{prefix}/devices/+/telemetry"), QoS::AtMostOnce);
                    let _ = client.try_subscribe(format!("{prefix}/devices/+/availability"), QoS::AtMostOnce);
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let mut parts = p.topic.rsplitn(3, '/');
                    let (Some(stream), Some(device)) = (parts.next(), parts.next()) else { continue };
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
                        _ => {}
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    if tty {
        draw(&rows, tty, &header);
    }
    total
}

fn draw(rows: &BTreeMap<String, Row>, tty: bool, header: &str) {
    let mut out = String::new();
    if tty {
        out.push_str("\x1b[H\x1b[J"); // home, clear screen
        out.push_str(header);
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<8} {:<8} {:>7} {:>10} {:>10} {:>8} {:>7} {:>7} {:<18} {:>8}\n",
        "device",
        "avail",
        "seq",
        "pos mm",
        "vel mm/s",
        "torque %",
        "cur A",
        "temp C",
        "state",
        "samples"
    ));
    for (name, row) in rows {
        let t = row.telemetry.as_ref();
        let num = |k: &str| {
            t.and_then(|t| t[k].as_f64())
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
        };
        out.push_str(&format!(
            "{:<8} {:<8} {:>7} {:>10} {:>10} {:>8} {:>7} {:>7} {:<18} {:>8}\n",
            name,
            row.availability,
            t.and_then(|t| t["seq"].as_u64()).unwrap_or(0),
            num("position"),
            num("velocity"),
            num("torque"),
            num("current"),
            num("temperature"),
            t.and_then(|t| t["state"].as_str()).unwrap_or("-"),
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
