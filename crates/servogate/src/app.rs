//! `servogate run`: wires the validated config into bus tasks, the ring and the forwarder,
//! and shuts them down in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use servogate_canopen::sync::SyncProducer;
use servogate_canopen::Master;
use servogate_core::EventSink;
use servogate_modbus::bus::{run_bus, BusStats};
use servogate_mqtt::{DeviceMeta, Forwarder, Outbox};
use servogate_socketcan::{run_can_bus, CanStats};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, Config, DeviceAddress};
use crate::systemd;

/// How `run` is embedded: by the daemon (signals stop it) or by the demo (a token does).
#[derive(Debug, Default)]
pub struct Options {
    /// Stop when this is cancelled, in addition to SIGTERM / SIGINT.
    pub shutdown: Option<CancellationToken>,
}

/// A new id for this start: consumers key on (boot_id, device, stream, seq).
fn boot_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

pub async fn run(cfg: Config, options: Options) -> anyhow::Result<()> {
    let boot_id = boot_id();
    let version = env!("CARGO_PKG_VERSION").to_owned();
    info!(gateway = %cfg.gateway.id, %boot_id, version, "servogate starting");

    let outbox = Outbox::new(cfg.buffer.capacity, cfg.buffer.on_full);
    let settings = mqtt_settings(&cfg)?;

    let sink: Arc<dyn EventSink> = outbox.clone();
    let buses_stop = CancellationToken::new();
    let mut buses = Vec::new();
    let mut meta = Vec::new();
    let mut rtu_stats: Vec<Arc<BusStats>> = Vec::new();
    let mut can_stats: Vec<Arc<CanStats>> = Vec::new();

    for d in &cfg.devices {
        let address = match d.address {
            DeviceAddress::Unit(u) => serde_json::json!(u),
            DeviceAddress::Node(n) => serde_json::json!(n),
        };
        meta.push(DeviceMeta {
            name: d.name.clone(),
            bus: d.bus.clone(),
            address,
            profile: d.profile.clone(),
            fields: cfg.units(d),
        });
    }
    // Checked (url, TLS files) before any bus starts: a bad setting stops the start.
    let forwarder = Forwarder::new(settings, boot_id, version, outbox.clone(), meta)
        .context("MQTT settings")?;
    for (bus, devices) in cfg.rtu_buses() {
        info!(bus = %bus.name, port = %bus.port.display(), devices = devices.len(), "starting bus");
        let stats = Arc::new(BusStats::default());
        rtu_stats.push(stats.clone());
        let (sink, stop) = (sink.clone(), buses_stop.clone());
        // Each bus gets an OS thread with a runtime of its own: the reply's wake-up, the
        // t3.5 timer and the next request never queue behind MQTT work or migrate between
        // workers, which on a 115200-baud line is the difference between 93 % and 97 % of
        // the physical limit (BENCHMARKS.md).
        let name = bus.name.clone();
        let task_name = name.clone();
        let finished = spawn_bus_thread(&name, move || async move {
            if let Err(e) = run_bus(bus, devices, sink, stats, stop).await {
                error!(bus = %task_name, "bus task failed: {e}");
            }
        })?;
        buses.push(finished);
    }

    for (bus, sync, nodes) in cfg.can_buses() {
        info!(bus = %bus.name, interface = %bus.interface, devices = nodes.len(), "starting bus");
        let now = std::time::Instant::now();
        let master = Master::new(nodes, sync.map(|p| SyncProducer::new(p, None, now)), now);
        let stats = Arc::new(CanStats::default());
        can_stats.push(stats.clone());
        let (sink, stop) = (sink.clone(), buses_stop.clone());
        let name = bus.name.clone();
        let finished =
            spawn_bus_thread(&name, move || run_can_bus(bus, master, sink, stats, stop))?;
        buses.push(finished);
    }

    let forwarder_stop = CancellationToken::new();
    let forwarder = tokio::spawn(forwarder.run(forwarder_stop.clone()));

    // systemd (Type=notify): ready once every bus has tried to open its port or
    // interface. A bus that failed keeps retrying and its devices go offline; waiting for
    // it would only turn a missing adapter into a start timeout and a restart loop.
    let shutdown = wait_for_shutdown(options.shutdown);
    tokio::pin!(shutdown);
    let all_tried = async {
        for s in &rtu_stats {
            s.open_attempted.notified().await;
        }
        for s in &can_stats {
            s.open_attempted.notified().await;
        }
    };
    let stopped_early = tokio::select! {
        _ = all_tried => false,
        _ = &mut shutdown => true,
    };
    let status = format!(
        "{} buses, {} devices, publishing to {}",
        rtu_stats.len() + can_stats.len(),
        cfg.devices.len(),
        cfg.mqtt.url
    );
    if let Err(e) = systemd::ready().and_then(|()| systemd::status(&status)) {
        warn!(error = %e, "cannot notify systemd");
    }
    info!("{status}");

    // The watchdog is fed from here, the task that also waits for the shutdown signal,
    // and only while every bus thread is alive: a bus that died stops the pings and
    // systemd restarts the daemon.
    let watchdog = systemd::watchdog_interval();
    let mut feed = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    if !stopped_early {
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = feed.tick(), if watchdog.is_some() => {
                    if buses.iter_mut().all(|b| matches!(b.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty))) {
                        if let Err(e) = systemd::watchdog_ping() {
                            warn!(error = %e, "cannot feed the systemd watchdog");
                        }
                    } else {
                        error!("a bus task has ended: no more watchdog pings, systemd restarts the daemon");
                    }
                }
            }
        }
    }
    if let Err(e) = systemd::stopping() {
        warn!(error = %e, "cannot notify systemd");
    }
    info!("stopping: buses first, then the forwarder");
    buses_stop.cancel();
    for b in buses {
        let _ = b.await;
    }
    forwarder_stop.cancel();
    let grace = cfg.mqtt.shutdown_grace + Duration::from_secs(2);
    match tokio::time::timeout(grace, forwarder).await {
        Ok(Ok(Ok(report))) => info!(?report, "forwarder stopped"),
        Ok(Ok(Err(e))) => warn!("forwarder stopped with an error: {e}"),
        Ok(Err(e)) => warn!("forwarder task failed: {e}"),
        Err(_) => warn!("forwarder did not stop within {grace:?}"),
    }
    let stats = outbox.stats();
    info!(
        pushed = stats.pushed,
        dropped = stats.dropped,
        acked = stats.acked,
        left = stats.len,
        "servogate stopped"
    );
    Ok(())
}

/// Runs one bus task on an OS thread with a runtime of its own; the receiver fires when
/// the task has ended.
fn spawn_bus_thread<F, Fut>(
    name: &str,
    task: F,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let bus = name.to_owned();
    std::thread::Builder::new()
        .name(format!("bus-{name}"))
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(task()),
                Err(e) => error!(bus = %bus, "cannot start the bus runtime: {e}"),
            }
            let _ = done.send(());
        })
        .context("cannot start a bus thread")?;
    Ok(finished)
}

fn mqtt_settings(cfg: &Config) -> anyhow::Result<servogate_mqtt::MqttSettings> {
    let m = &cfg.mqtt;
    let credentials = match &m.credentials_file {
        Some(path) => {
            let (username, password) =
                config::read_credentials(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            Some(servogate_mqtt::Credentials { username, password })
        }
        None => None,
    };
    let tls = m.ca_file.as_ref().map(|ca| servogate_mqtt::TlsFiles {
        ca: ca.clone(),
        client_cert: m.cert_file.clone(),
        client_key: m.key_file.clone(),
    });
    Ok(servogate_mqtt::MqttSettings {
        url: m.url.clone(),
        client_id: m.client_id.clone(),
        topic_prefix: m.topic_prefix.clone(),
        telemetry_qos: m.qos,
        keep_alive: m.keep_alive,
        max_packet_size: m.max_packet_size,
        tls,
        credentials,
        reconnect_min: m.reconnect_min,
        reconnect_max: m.reconnect_max,
        shutdown_grace: m.shutdown_grace,
    })
}

async fn wait_for_shutdown(token: Option<CancellationToken>) {
    use tokio::signal::unix::{signal, SignalKind};
    let token = token.unwrap_or_default();
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = token.cancelled() => {}
        _ = term => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
    }
}
