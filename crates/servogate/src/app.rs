//! `servogate run`: wires the validated config into bus tasks, the ring and the forwarder,
//! applies a new config on SIGHUP, and shuts everything down in order.
//!
//! Reading order: [`run`] (start-up, the main loop, shutdown), then [`Buses`] (which bus
//! task runs with which settings, and what a reload changes), then [`reload`].
//!
//! A reload (SIGHUP) reads and validates the file first; a bad file changes nothing and
//! is logged. A good one is applied by difference: a bus whose own settings are
//! unchanged keeps its port or socket and gets its new device list (unchanged devices
//! keep polling, or keep their heartbeat watch, untouched); a bus whose own settings
//! changed is stopped and started again; new buses start and removed ones stop. A
//! changed `[mqtt]` restarts the forwarder (the ring keeps every event not yet
//! acknowledged), a changed `[metrics] listen` moves the endpoint, `gateway.log` takes
//! effect at once, and `[buffer]` waits for a restart (the ring is not resized under
//! load). Sequence numbers continue across all of it ([`SeqBook`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use servogate_canopen::sync::SyncProducer;
use servogate_canopen::{Master, NodeSettings};
use servogate_core::{EventSink, SeqBook};
use servogate_modbus::bus::{run_bus, BusSettings};
use servogate_modbus::poll::DeviceSettings;
use servogate_mqtt::{DeviceMeta, Feed, Forwarder, MqttStats, Outbox};
use servogate_socketcan::run_can_bus;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::commands::{self, CommandStats, DeskConfig, DeskDevice, DeviceViews};
use crate::config::{self, Config, DeviceAddress};
use crate::metrics::{self, Metrics, Observed};
use crate::sparkplug::{self, NodeParts};
use crate::store::{LogMetrics, Store};
use crate::{logging, systemd};

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

/// What lives for the whole process, whatever reloads change.
struct Shared {
    boot_id: String,
    version: String,
    outbox: Arc<Outbox>,
    /// What the forwarder publishes from: the ring, or the event log in durable mode.
    feed: Arc<dyn Feed>,
    /// Durable mode: the log's figures, and how many events of earlier boots went first.
    log: Option<(Arc<LogMetrics>, u64)>,
    /// The sink every bus task pushes into: the ring, seen by the metrics on the way.
    observed: Arc<Observed>,
    mqtt_stats: Arc<MqttStats>,
    metrics: Arc<Metrics>,
    /// Device lists for the forwarder's retained meta topics.
    meta: watch::Sender<Vec<DeviceMeta>>,
    /// What the command policy reads of each device.
    views: Arc<DeviceViews>,
    cmd_stats: Arc<CommandStats>,
    /// Commands from the forwarder's event loop to the desk.
    intake: mpsc::Sender<servogate_mqtt::Incoming>,
    /// The desk's devices, policies and bus inboxes (replaced on a reload).
    desk: watch::Sender<DeskConfig>,
    /// The Sparkplug edge node, when the contract publishes Sparkplug.
    node: Option<(NodeParts, watch::Sender<sparkplug::NodeSettings>)>,
}

pub async fn run(cfg: Config, options: Options) -> anyhow::Result<()> {
    let boot_id = boot_id();
    let version = env!("CARGO_PKG_VERSION").to_owned();
    info!(gateway = %cfg.gateway.id, %boot_id, version, "servogate starting");
    // SIGHUP's default action ends the process: take it over before anything can send
    // it (systemd's ExecReload= may run as soon as READY=1 is out). Until the main loop
    // runs, a SIGHUP waits in the stream.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();

    let outbox = Outbox::new(cfg.buffer.capacity, cfg.buffer.on_full);
    // Durable mode. A log that cannot be opened (a read-only or missing directory, a
    // full disk) is an error in the log and the metrics, and the gateway goes on from
    // memory: it must not stop polling because of a disk.
    let store = match &cfg.buffer.log {
        None => None,
        Some(log) => match Store::open(
            log,
            outbox.clone(),
            &boot_id,
            &cfg.mqtt.topic_prefix,
            cfg.buffer.capacity.get(),
        ) {
            Ok(store) => Some(store),
            Err(e) => {
                error!(
                    error = format!("{e:#}"),
                    "the event log is not available: events are kept in memory only"
                );
                None
            }
        },
    };
    let feed: Arc<dyn Feed> = match &store {
        Some(s) => s.feed.clone(),
        None => outbox.clone(),
    };
    let log = store.as_ref().map(|s| (s.metrics.clone(), s.recovered()));
    let observed = Arc::new(Observed::new(outbox.clone()));
    let mqtt_stats = Arc::new(MqttStats::default());
    let metrics = Arc::new(Metrics::new(
        &cfg.gateway.id,
        &version,
        &boot_id,
        outbox.clone(),
        mqtt_stats.clone(),
        observed.clone(),
    ));
    if cfg.buffer.log.is_some() {
        metrics.set_log(store.as_ref().map(|s| (s.metrics.clone(), s.feed.clone())));
    }
    let (meta, _) = watch::channel(device_metas(&cfg));
    observed.set_devices(device_buses(&cfg));
    let (intake, intake_rx) = mpsc::channel(commands::INTAKE_CAPACITY);
    let (desk, desk_rx) = watch::channel(DeskConfig::default());
    let cmd_stats = metrics.commands();
    let node = match &cfg.sparkplug {
        Some(sp) => {
            let parts = node_parts(&cfg, sp, &version, &boot_id, &outbox, &observed);
            metrics.set_sparkplug(parts.clone());
            Some((parts, watch::channel(node_settings(&cfg)?).0))
        }
        None => None,
    };
    let shared = Shared {
        boot_id,
        version,
        views: observed.views(),
        outbox,
        feed,
        log,
        observed,
        mqtt_stats,
        metrics,
        meta,
        cmd_stats,
        intake,
        desk,
        node,
    };

    // Checked (url, TLS files, credentials, the metrics port) before any bus starts: a
    // bad setting stops the start with nothing opened.
    let forwarder = match cfg.mqtt.contract.json() {
        true => Some(build_forwarder(&cfg, &shared).context("MQTT settings")?),
        false => None,
    };
    let mut endpoint = match &cfg.metrics {
        Some(m) => Some(
            Endpoint::start(m.listen, shared.metrics.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {}", m.listen))?,
        ),
        None => None,
    };

    let mut buses = Buses::new(shared.observed.clone(), shared.metrics.clone());
    buses.apply(&cfg).await?;
    // The command desk: started before the forwarder subscribes to the cmd topics.
    shared.desk.send_replace(desk_config(&cfg, &buses));
    let desk_stop = CancellationToken::new();
    let desk_task = tokio::spawn(commands::run_desk(
        intake_rx,
        desk_rx,
        shared.views.clone(),
        shared.observed.clone(),
        buses.book.clone(),
        shared.cmd_stats.clone(),
        desk_stop.clone(),
    ));
    let mut forwarder = forwarder.map(|f| RunningForwarder::spawn(f, mqtt_fingerprint(&cfg)));
    // The Sparkplug edge node, on a connection of its own.
    let node_stop = CancellationToken::new();
    let node_task = shared.node.as_ref().map(|(parts, settings)| {
        let run = sparkplug::NodeRun {
            parts: parts.clone(),
            boot_id: shared.boot_id.clone(),
            version: shared.version.clone(),
            meta: shared.meta.clone(),
            desk: shared.intake.clone(),
        };
        tokio::spawn(sparkplug::run_node(
            run,
            settings.subscribe(),
            node_stop.clone(),
            cfg.mqtt.shutdown_grace,
        ))
    });
    // Replay from the log, on a connection of its own (it follows [mqtt] of the start).
    let replay_stop = CancellationToken::new();
    let replay_task = match &store {
        Some(s) => Some(tokio::spawn(crate::replay::serve(
            mqtt_settings(&cfg)?,
            s.feed.dir().clone(),
            s.feed.clone(),
            replay_stop.clone(),
        ))),
        None => None,
    };

    // systemd (Type=notify): ready once every bus has tried to open its port or
    // interface. A bus that failed keeps retrying and its devices go offline; waiting for
    // it would only turn a missing adapter into a start timeout and a restart loop.
    let shutdown = wait_for_shutdown(options.shutdown);
    tokio::pin!(shutdown);
    let mut log_check = tokio::time::interval(Duration::from_millis(200));
    // After a backlog drained (in the ring, or the log's feed), freed heap goes back to
    // the system.
    let mut memory_check = tokio::time::interval(Duration::from_secs(5));
    let mut peak_backlog = 0;
    let mut log_failed = false;
    let stopped_early = tokio::select! {
        _ = buses.all_tried_to_open() => false,
        _ = &mut shutdown => true,
    };
    announce_ready(&cfg, &buses);

    // The watchdog is fed from here, the task that also waits for the shutdown signal,
    // and only while every bus thread is alive: a bus that died stops the pings and
    // systemd restarts the daemon.
    let watchdog = systemd::watchdog_interval();
    let mut feed = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut cfg = cfg;
    if !stopped_early {
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = memory_check.tick() => {
                    let backlog = shared.feed.unacked().max(shared.outbox.stats().len);
                    if peak_backlog >= DRAINED_FROM && backlog < DRAINED_FROM / 10 {
                        give_memory_back();
                        peak_backlog = 0;
                    }
                    peak_backlog = peak_backlog.max(backlog);
                }
                _ = log_check.tick(), if store.is_some() => {
                    if store.as_ref().is_some_and(|s| !s.is_alive()) {
                        error!("the event log stopped (an fsync failed): stopping so that systemd restarts the gateway and the log is recovered");
                        log_failed = true;
                        break;
                    }
                }
                // Cancellation-safe: a signal not yet taken stays pending for the next turn.
                Some(()) = async { hangup.as_mut()?.recv().await } => {
                    cfg = reload(cfg, &shared, &mut buses, &mut forwarder, &mut endpoint).await;
                }
                _ = feed.tick(), if watchdog.is_some() => {
                    if buses.all_alive() {
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
    info!("stopping: buses first, then the command desk, then the forwarder");
    buses.stop_all().await;
    // The buses answered every order they held; the desk publishes those results.
    desk_stop.cancel();
    let _ = desk_task.await;
    if store.is_some() {
        // The last events (the desk's results) into the log, so the forwarder sees them.
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while shared.outbox.stats().unacked > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    replay_stop.cancel();
    if let Some(t) = replay_task {
        let _ = t.await;
    }
    node_stop.cancel();
    if let Some(t) = node_task {
        let _ = t.await;
    }
    if let Some(f) = forwarder.as_mut() {
        f.stop(cfg.mqtt.shutdown_grace).await;
    }
    if let Some(store) = store {
        let unacked = shared.feed.unacked();
        match store.stop() {
            Ok(()) if unacked > 0 => info!(
                unacked,
                "event log closed: the next start publishes what the broker did not acknowledge"
            ),
            Ok(()) => info!("event log closed"),
            Err(e) => error!(error = %e, "the event log did not close cleanly"),
        }
    }
    if let Some(e) = endpoint {
        e.stop().await;
    }
    let stats = shared.outbox.stats();
    info!(
        pushed = stats.pushed,
        dropped = stats.dropped,
        acked = stats.acked,
        left = stats.len,
        "servogate stopped"
    );
    if log_failed {
        anyhow::bail!("the event log failed (see above)");
    }
    Ok(())
}

/// A backlog this large that drained makes the daemon give freed memory back.
const DRAINED_FROM: usize = 1_000;

/// Hands the heap pages freed by a drained backlog back to the system: glibc keeps freed
/// memory for reuse, so without this the RSS of a gateway stays at its largest backlog.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_memory_back() {
    // SAFETY: malloc_trim takes no pointer and only releases free pages of glibc's own
    // arenas; it is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_memory_back() {}

fn announce_ready(cfg: &Config, buses: &Buses) {
    let status = format!(
        "{} buses, {} devices, publishing to {}",
        buses.running.len(),
        cfg.devices.len(),
        cfg.mqtt.url
    );
    if let Err(e) = systemd::ready().and_then(|()| systemd::status(&status)) {
        warn!(error = %e, "cannot notify systemd");
    }
    info!("{status}");
}

/// SIGHUP: validates the file again and applies what changed; returns the config now in
/// force (the old one when the new one is bad).
async fn reload(
    current: Config,
    shared: &Shared,
    buses: &mut Buses,
    forwarder: &mut Option<RunningForwarder>,
    endpoint: &mut Option<Endpoint>,
) -> Config {
    info!(file = %current.file.display(), "SIGHUP: reloading the config");
    if let Err(e) = systemd::reloading() {
        warn!(error = %e, "cannot notify systemd");
    }
    let mut new = match config::load(&current.file) {
        Ok(new) => new,
        Err(e) => {
            error!("reload refused, the running config stays in force: {e}");
            shared.metrics.reloaded(false);
            announce_ready(&current, buses);
            return current;
        }
    };
    if new.gateway.log != current.gateway.log {
        match logging::set_level(&new.gateway.log) {
            Ok(()) => info!(log = %new.gateway.log, "log filter changed"),
            Err(e) => warn!("log filter not changed: {e}"),
        }
    }
    if new.buffer != current.buffer {
        warn!(
            capacity = current.buffer.capacity,
            "[buffer] changed: it takes effect at the next restart (the ring holding \
             unacknowledged events is not resized while running)"
        );
    }
    if new.mqtt.contract != current.mqtt.contract
        || new.sparkplug.is_some() != current.sparkplug.is_some()
    {
        warn!(
            contract = ?current.mqtt.contract,
            "mqtt.contract changed: it takes effect at the next restart"
        );
        new.mqtt.contract = current.mqtt.contract;
        new.sparkplug = current.sparkplug.clone();
    }
    // The forwarder first: if the new [mqtt] cannot be used (a TLS file unreadable), the
    // old connection stays and so does the rest of the old config's broker settings.
    let fingerprint = mqtt_fingerprint(&new);
    if let Some(forwarder) = forwarder.as_mut() {
        if fingerprint != forwarder.fingerprint {
            match build_forwarder(&new, shared) {
                Ok(f) => {
                    info!(url = %new.mqtt.url, "[mqtt] changed: reconnecting");
                    forwarder.hand_over().await;
                    *forwarder = RunningForwarder::spawn(f, fingerprint);
                }
                Err(e) => error!("[mqtt] change not applied, the old connection stays: {e:#}"),
            }
        }
    }
    if let Err(e) = buses.apply(&new).await {
        error!("reload: {e:#}");
    }
    shared.observed.set_devices(device_buses(&new));
    if let Some((parts, settings)) = &shared.node {
        // The node's device table first: the device list below makes it say what changed.
        parts.node.set_devices(node_devices(&new));
        match node_settings(&new) {
            Ok(s) => {
                settings.send_if_modified(|old| {
                    let changed = *old != s;
                    *old = s;
                    changed
                });
            }
            Err(e) => error!("Sparkplug settings not applied: {e:#}"),
        }
    }
    shared.meta.send_replace(device_metas(&new));
    // A changed policy applies to the next command.
    shared.desk.send_replace(desk_config(&new, buses));
    let listen = |c: &Config| c.metrics.as_ref().map(|m| m.listen);
    if listen(&new) != listen(&current) {
        if let Some(old) = endpoint.take() {
            old.stop().await;
        }
        if let Some(addr) = listen(&new) {
            match Endpoint::start(addr, shared.metrics.clone()).await {
                Ok(e) => *endpoint = Some(e),
                Err(e) => error!("cannot serve metrics on {addr}: {e}"),
            }
        }
    }
    shared.metrics.reloaded(true);
    info!("config reloaded");
    announce_ready(&new, buses);
    new
}

/// One bus task and what it was started from.
struct RunningBus {
    /// The bus's `[[buses]]` entry as started: a change to it restarts the bus.
    bus: config::Bus,
    /// The channel that hands the task new device lists (a reload).
    devices: DeviceLists,
    /// The bus task's command inbox.
    orders: Option<commands::Route>,
    stop: CancellationToken,
    finished: oneshot::Receiver<()>,
}

/// A bus task's device list channel, by protocol.
enum DeviceLists {
    /// With the port settings the task opened its port with.
    Rtu(BusSettings, watch::Sender<Vec<DeviceSettings>>),
    Can(watch::Sender<Vec<NodeSettings>>),
}

/// The bus tasks, by bus name.
struct Buses {
    running: BTreeMap<String, RunningBus>,
    sink: Arc<Observed>,
    metrics: Arc<Metrics>,
    /// Every device's sequence counters for the life of the process.
    book: SeqBook,
}

impl Buses {
    fn new(sink: Arc<Observed>, metrics: Arc<Metrics>) -> Self {
        Self {
            running: BTreeMap::new(),
            sink,
            metrics,
            book: SeqBook::default(),
        }
    }

    /// Makes the running buses match `cfg`: starts, restarts, updates and stops.
    async fn apply(&mut self, cfg: &Config) -> anyhow::Result<()> {
        let rtu = cfg.rtu_buses();
        let can = cfg.can_buses();
        let wanted: Vec<String> = rtu
            .iter()
            .map(|(b, _)| b.name.to_string())
            .chain(can.iter().map(|(b, _, _)| b.name.to_string()))
            .collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in gone {
            info!(bus = %name, "bus removed from the config: stopping it");
            self.stop(&name).await;
        }
        let entry = |name: &str| -> config::Bus {
            cfg.bus(name)
                .cloned()
                .expect("rtu_buses/can_buses list config buses")
        };
        for (settings, devices) in rtu {
            let name = settings.name.to_string();
            let bus = entry(&name);
            if let Some(r) = self.running.get_mut(&name) {
                match &r.devices {
                    DeviceLists::Rtu(s, list) if *s == settings => {
                        if *list.borrow() != devices {
                            info!(bus = %name, devices = devices.len(), "devices changed: updating the bus in place");
                            list.send_replace(devices);
                        }
                        r.bus = bus;
                        continue;
                    }
                    _ => {
                        info!(bus = %name, "bus settings changed: restarting it");
                        self.stop(&name).await;
                    }
                }
            }
            info!(bus = %name, protocol = settings.link.protocol(), link = %settings.link, devices = devices.len(), "starting bus");
            let stats = self.metrics.rtu_stats(&name);
            self.metrics
                .set_bus_info(&name, settings.link.protocol(), settings.link.to_string());
            let (list, devices) = watch::channel(devices);
            let (orders, inbox) = mpsc::channel(commands::BUS_QUEUE);
            let (sink, book) = (self.sink.clone(), self.book.clone());
            let task_settings = settings.clone();
            let task_name = name.clone();
            self.launch(
                name,
                bus,
                DeviceLists::Rtu(settings, list),
                Some(commands::Route::Rtu(orders)),
                move |stop| async move {
                    let sink: Arc<dyn EventSink> = sink;
                    let run = run_bus(task_settings, devices, inbox, sink, stats, book, stop);
                    if let Err(e) = run.await {
                        error!(bus = %task_name, "bus task failed: {e}");
                    }
                },
            )?;
        }
        for (settings, sync, nodes) in can {
            let name = settings.name.to_string();
            let bus = entry(&name);
            if let Some(r) = self.running.get(&name) {
                match &r.devices {
                    DeviceLists::Can(list) if r.bus == bus => {
                        if *list.borrow() != nodes {
                            info!(bus = %name, devices = nodes.len(), "drives changed: updating the bus in place");
                            list.send_replace(nodes);
                        }
                        continue;
                    }
                    _ => {
                        info!(bus = %name, "bus settings changed: restarting it");
                        self.stop(&name).await;
                    }
                }
            }
            info!(bus = %name, interface = %settings.interface, devices = nodes.len(), "starting bus");
            let now = std::time::Instant::now();
            let producer = sync.map(|p| SyncProducer::new(p, None, now));
            let master = Master::with_seq_book(nodes.clone(), producer, now, &self.book);
            let stats = self.metrics.can_stats(&name);
            self.metrics
                .set_bus_info(&name, "canopen", settings.interface.clone());
            let sink = self.sink.clone();
            let (list, nodes) = watch::channel(nodes);
            let (orders, inbox) = mpsc::channel(commands::BUS_QUEUE);
            let route = Some(commands::Route::Can(orders));
            self.launch(name, bus, DeviceLists::Can(list), route, move |stop| {
                let sink: Arc<dyn EventSink> = sink;
                run_can_bus(settings, master, nodes, inbox, sink, stats, stop)
            })?;
        }
        self.metrics
            .set_running(self.running.keys().cloned().collect());
        Ok(())
    }

    /// Starts `task` (given its stop token) on a bus thread of its own and records it.
    ///
    /// Each bus gets an OS thread with a runtime of its own: the reply's wake-up, the t3.5
    /// timer and the next request never queue behind MQTT work or migrate between
    /// workers, which on a 115200-baud line is the difference between 93 % and 97 % of the
    /// physical limit (BENCHMARKS.md).
    fn launch<F, Fut>(
        &mut self,
        name: String,
        bus: config::Bus,
        devices: DeviceLists,
        orders: Option<commands::Route>,
        task: F,
    ) -> anyhow::Result<()>
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let stop = CancellationToken::new();
        let task_stop = stop.clone();
        let finished = spawn_bus_thread(&name, move || task(task_stop))?;
        let running = RunningBus {
            bus,
            devices,
            orders,
            stop,
            finished,
        };
        self.running.insert(name, running);
        Ok(())
    }

    /// Stops bus `name` and waits for its thread to let go of the port or interface
    /// (a bus started again on the same port must find it free).
    async fn stop(&mut self, name: &str) {
        if let Some(r) = self.running.remove(name) {
            r.stop.cancel();
            let _ = r.finished.await;
        }
    }

    async fn stop_all(&mut self) {
        for r in self.running.values() {
            r.stop.cancel();
        }
        for (_, r) in std::mem::take(&mut self.running) {
            let _ = r.finished.await;
        }
    }

    /// Each running bus's command inbox, by bus name.
    fn routes(&self) -> HashMap<String, commands::Route> {
        self.running
            .iter()
            .filter_map(|(name, r)| Some((name.clone(), r.orders.clone()?)))
            .collect()
    }

    /// Resolves once every running bus has tried to open its port or interface.
    async fn all_tried_to_open(&self) {
        for (name, r) in &self.running {
            match r.devices {
                DeviceLists::Rtu(..) => {
                    self.metrics.rtu_stats(name).open_attempted.notified().await
                }
                DeviceLists::Can(_) => self.metrics.can_stats(name).open_attempted.notified().await,
            }
        }
    }

    /// True while no bus thread has ended.
    fn all_alive(&mut self) -> bool {
        self.running.values_mut().all(|r| {
            matches!(
                r.finished.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            )
        })
    }
}

/// The forwarder task and the broker settings it was built from.
struct RunningForwarder {
    task: JoinHandle<Result<servogate_mqtt::ForwarderReport, servogate_mqtt::MqttError>>,
    stop: CancellationToken,
    handover: CancellationToken,
    fingerprint: MqttFingerprint,
}

impl RunningForwarder {
    fn spawn(forwarder: Forwarder, fingerprint: MqttFingerprint) -> Self {
        let stop = CancellationToken::new();
        let handover = forwarder.handover_token();
        let task = tokio::spawn(forwarder.run(stop.clone()));
        Self {
            task,
            stop,
            handover,
            fingerprint,
        }
    }

    /// Publishes `online:false`, gives the ring up to `grace` to drain, disconnects.
    async fn stop(&mut self, grace: Duration) {
        self.stop.cancel();
        self.wait(grace).await;
    }

    /// Publishes `online:false` and disconnects at once: the next forwarder publishes
    /// what this one leaves unacknowledged.
    async fn hand_over(&mut self) {
        self.handover.cancel();
        self.wait(Duration::ZERO).await;
    }

    async fn wait(&mut self, grace: Duration) {
        let grace = grace + Duration::from_secs(2);
        match tokio::time::timeout(grace, &mut self.task).await {
            // The forwarder logs its own report.
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => warn!("forwarder stopped with an error: {e}"),
            Ok(Err(e)) => warn!("forwarder task failed: {e}"),
            Err(_) => {
                warn!("forwarder did not stop within {grace:?}");
                self.task.abort();
            }
        }
    }
}

/// Everything a forwarder is built from: the `[mqtt]` table and the contents of the files
/// it names (a reload after a certificate or password rotation reconnects).
#[derive(Debug, PartialEq)]
struct MqttFingerprint {
    mqtt: config::MqttConfig,
    files: Vec<Option<Vec<u8>>>,
    /// Whether it subscribes to the command topics (some device takes commands).
    commands: bool,
}

fn mqtt_fingerprint(cfg: &Config) -> MqttFingerprint {
    let m = &cfg.mqtt;
    let files = [&m.ca_file, &m.cert_file, &m.key_file, &m.credentials_file]
        .into_iter()
        .map(|f| f.as_ref().and_then(|path| std::fs::read(path).ok()))
        .collect();
    MqttFingerprint {
        mqtt: m.clone(),
        files,
        commands: takes_commands(cfg),
    }
}

/// True when some device has a command policy: only then are the cmd topics subscribed.
fn takes_commands(cfg: &Config) -> bool {
    cfg.devices.iter().any(|d| d.commands.is_some())
}

fn build_forwarder(cfg: &Config, shared: &Shared) -> anyhow::Result<Forwarder> {
    let forwarder = Forwarder::new(
        mqtt_settings(cfg)?,
        shared.boot_id.clone(),
        shared.version.clone(),
        shared.feed.clone(),
        device_metas(cfg),
    )?;
    // Memory mode: the ring is what the forwarder publishes from (a batch is its samples).
    shared.outbox.set_batching(cfg.mqtt.batching);
    let mut forwarder = forwarder
        .with_stats(shared.mqtt_stats.clone())
        .with_meta_updates(shared.meta.subscribe());
    if let Some((_, recovered)) = &shared.log {
        forwarder = forwarder.with_recovered(*recovered);
    }
    // Commands are subscribed to only when some device takes them.
    if takes_commands(cfg) {
        return Ok(forwarder.with_intake(servogate_mqtt::Intake {
            filters: commands::filters(&cfg.mqtt.topic_prefix),
            tx: shared.intake.clone(),
            dropped: shared.cmd_stats.dropped.clone(),
        }));
    }
    Ok(forwarder)
}

/// The Sparkplug edge node's parts: its node state, and what it publishes from (a ring of
/// its own beside the JSON contract's, or the one ring when it is the only contract).
fn node_parts(
    cfg: &Config,
    sp: &config::Sparkplug,
    version: &str,
    boot_id: &str,
    outbox: &Arc<Outbox>,
    observed: &Observed,
) -> NodeParts {
    let nudge = Arc::new(tokio::sync::Notify::new());
    let own_ring = cfg.mqtt.contract.json();
    let ring = match own_ring {
        true => Outbox::new(cfg.buffer.capacity, cfg.buffer.on_full),
        false => outbox.clone(),
    };
    let node = sparkplug::Node::new(sp, version, boot_id, ring.clone(), nudge.clone());
    node.set_devices(node_devices(cfg));
    let feed = Arc::new(sparkplug::NodeFeed::new(ring.clone(), node.clone()));
    let seen = node.clone();
    observed.set_tap(metrics::Tap(Box::new(move |e| {
        seen.observe(e);
        if own_ring {
            ring.push(e.clone());
        }
    })));
    NodeParts {
        node,
        feed,
        nudge,
        stats: Arc::default(),
        unreadable: Arc::default(),
    }
}

/// Each device as a Sparkplug device: its metrics, and whether it takes commands.
fn node_devices(
    cfg: &Config,
) -> Vec<(Arc<str>, Vec<servogate_sparkplug::device::MetricSpec>, bool)> {
    cfg.devices
        .iter()
        .map(|d| {
            (
                Arc::from(d.name.as_str()),
                sparkplug::device_specs(cfg, d),
                d.commands.is_some(),
            )
        })
        .collect()
}

/// The edge node connection's settings: `[mqtt]` (its own client id beside the JSON
/// contract's connection) and `[sparkplug]`.
fn node_settings(cfg: &Config) -> anyhow::Result<sparkplug::NodeSettings> {
    let sp = cfg.sparkplug.clone().context("no [sparkplug] table")?;
    let mut mqtt = mqtt_settings(cfg)?;
    if cfg.mqtt.contract.json() {
        mqtt.client_id = format!("{}-spb", mqtt.client_id);
    }
    Ok(sparkplug::NodeSettings {
        mqtt,
        sparkplug: sp,
        prefix: cfg.mqtt.topic_prefix.clone(),
        commands: cfg
            .devices
            .iter()
            .filter_map(|d| Some((d.name.clone(), d.commands.as_ref()?.max_age)))
            .collect(),
        batching: cfg.mqtt.batching,
    })
}

/// What each device's retained `meta` topic says.
fn device_metas(cfg: &Config) -> Vec<DeviceMeta> {
    cfg.devices
        .iter()
        .map(|d| DeviceMeta {
            name: d.name.clone(),
            bus: d.bus.clone(),
            address: match d.address {
                DeviceAddress::Unit(u) => serde_json::json!(u),
                DeviceAddress::Node(n) => serde_json::json!(n),
            },
            profile: d.profile.clone(),
            fields: cfg.units(d),
        })
        .collect()
}

/// The desk's view of `cfg`: devices, policies, rules, and the running buses' inboxes.
fn desk_config(cfg: &Config, buses: &Buses) -> DeskConfig {
    DeskConfig {
        prefix: cfg.mqtt.topic_prefix.clone(),
        devices: cfg
            .devices
            .iter()
            .map(|d| {
                let entry = DeskDevice {
                    bus: d.bus.clone(),
                    policy: d.commands.clone(),
                };
                (d.name.clone(), entry)
            })
            .collect(),
        routes: buses.routes(),
        rules: cfg.commands.rules,
        key: cfg.commands.key.clone(),
    }
}

/// (device, bus) of every device, for the metrics.
fn device_buses(cfg: &Config) -> Vec<(String, String)> {
    cfg.devices
        .iter()
        .map(|d| (d.name.clone(), d.bus.clone()))
        .collect()
}

/// The metrics endpoint's task.
struct Endpoint {
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl Endpoint {
    async fn start(listen: std::net::SocketAddr, m: Arc<Metrics>) -> std::io::Result<Self> {
        let listener = metrics::bind(listen).await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(metrics::serve(listener, m, stop.clone()));
        Ok(Self { task, stop })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
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

pub(crate) fn mqtt_settings(cfg: &Config) -> anyhow::Result<servogate_mqtt::MqttSettings> {
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
        version: m.version,
        topic_aliases: m.topic_aliases,
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
