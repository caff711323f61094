//! The metrics endpoint (`[metrics] listen = "127.0.0.1:9898"`): the Prometheus text
//! format, read fresh from the counters the bus tasks, the ring and the forwarder already
//! keep, at every scrape.
//!
//! Nothing here sits on a hot path: bus tasks bump their own atomics (`BusStats`,
//! `CanStats`, the ring's counters, `MqttStats`) and this module only reads them. The one
//! exception is [`Observed`], the event sink in front of the ring, which looks at each
//! event's kind on its way through and takes a lock only for availability and bus-state
//! changes (rare), to keep per-device availability and per-bus CAN state.
//!
//! Counters of a bus survive its restart by a reload (they are kept by bus name), so a
//! reload never looks like a counter reset to Prometheus.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::commands::{CommandStats, DeviceViews};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use servogate_core::{AvailabilityState, Event, EventBody, EventKind, EventSink, Histogram};
use servogate_modbus::bus::BusStats;
use servogate_mqtt::{MqttStats, Outbox};
use servogate_socketcan::CanStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{LogFeed, LogMetrics};

/// What the daemon's state looks like to Prometheus.
#[derive(Debug)]
pub struct Metrics {
    gateway: String,
    version: String,
    boot_id: String,
    outbox: Arc<Outbox>,
    mqtt: Arc<MqttStats>,
    devices: Arc<Observed>,
    rtu: Mutex<BTreeMap<String, Arc<BusStats>>>,
    can: Mutex<BTreeMap<String, Arc<CanStats>>>,
    /// Buses running now (a bus removed by a reload keeps its counters but is not listed).
    running: Mutex<Vec<String>>,
    /// Per bus: its protocol and what it is attached to (port, address, interface).
    bus_info: Mutex<BTreeMap<String, (&'static str, String)>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    commands: Arc<CommandStats>,
    /// Durable mode: the event log's figures and its feed (set once at start-up), or
    /// `Err(())` when `[buffer] path` is set but the log could not be opened.
    log: std::sync::OnceLock<Result<LogHandles, ()>>,
    /// The Sparkplug edge node, when the contract publishes Sparkplug (set once).
    sparkplug: std::sync::OnceLock<crate::sparkplug::NodeParts>,
}

/// The event log's figures and the forwarder's feed from it.
type LogHandles = (Arc<LogMetrics>, Arc<LogFeed>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder here only inserts or reads: a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    pub fn new(
        gateway: &str,
        version: &str,
        boot_id: &str,
        outbox: Arc<Outbox>,
        mqtt: Arc<MqttStats>,
        devices: Arc<Observed>,
    ) -> Self {
        Self {
            gateway: gateway.to_owned(),
            version: version.to_owned(),
            boot_id: boot_id.to_owned(),
            outbox,
            mqtt,
            devices,
            rtu: Mutex::default(),
            can: Mutex::default(),
            running: Mutex::default(),
            bus_info: Mutex::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            commands: Arc::default(),
            log: std::sync::OnceLock::new(),
            sparkplug: std::sync::OnceLock::new(),
        }
    }

    /// Durable mode: the log's figures go into the exposition (`None`: configured, but
    /// it could not be opened; `servogate_log_healthy` is 0).
    pub fn set_log(&self, log: Option<LogHandles>) {
        let _ = self.log.set(log.ok_or(()));
    }

    /// The Sparkplug edge node's figures from now on.
    pub fn set_sparkplug(&self, parts: crate::sparkplug::NodeParts) {
        let _ = self.sparkplug.set(parts);
    }

    fn encode_sparkplug(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let Some(p) = self.sparkplug.get() else {
            return Ok(());
        };
        let one = |v: u64| [(Labels::new(), v)];
        let m = p.stats.snapshot();
        let n = p.node.figures();
        gauges(
            e,
            "sparkplug_connected",
            "1 while the Sparkplug edge node is connected to the broker.",
            one(u64::from(m.connected)),
        )?;
        gauges(
            e,
            "sparkplug_bd_seq",
            "The bdSeq of the edge node's current (or next) session.",
            one(n.bd_seq),
        )?;
        counters(
            e,
            "sparkplug_births",
            "NBIRTHs sent: one per session, and one per rebirth.",
            one(n.births),
        )?;
        counters(
            e,
            "sparkplug_rebirth_requests",
            "Rebirths asked for by a host (NCMD Node Control/Rebirth), before coalescing.",
            one(n.rebirth_requests),
        )?;
        counters(
            e,
            "sparkplug_messages",
            "DBIRTH, DDATA and DDEATH messages handed to the broker.",
            one(m.publishes),
        )?;
        counters(
            e,
            "sparkplug_connects",
            "Sessions of the edge node the broker accepted.",
            one(m.connects),
        )?;
        counters(
            e,
            "sparkplug_unreadable",
            "NCMD, DCMD and STATE messages ignored: not readable, or for nothing the node has.",
            one(p.unreadable.load(Relaxed)),
        )
    }

    fn encode_log(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let Some(log) = self.log.get() else {
            return Ok(());
        };
        let one = |v: u64| [(Labels::new(), v)];
        let (m, feed) = match log {
            Err(()) => {
                return gauges(
                    e,
                    "log_healthy",
                    "1 while the event log takes every event; 0 when it could not be opened or written (the gateway goes on from memory).",
                    one(0),
                )
            }
            Ok(l) => l,
        };
        gauges(
            e,
            "log_healthy",
            "1 while the event log takes every event; 0 when it could not be opened or written (the gateway goes on from memory).",
            one(u64::from(m.healthy.load(Relaxed))),
        )?;
        let st = *lock(&m.stats);
        let rec = lock(&m.recovery).clone();
        let f = feed.stats();
        gauges(
            e,
            "log_bytes",
            "Bytes of the event log on disk.",
            one(st.bytes),
        )?;
        gauges(
            e,
            "log_segments",
            "Segment files of the event log.",
            one(st.segments),
        )?;
        gauges(
            e,
            "log_records",
            "Events the event log holds.",
            one(st.records),
        )?;
        counters(
            e,
            "log_appended_events",
            "Events written to the event log.",
            one(st.appended),
        )?;
        counters(
            e,
            "log_fsyncs",
            "fsyncs of the event log (segments and directory).",
            one(st.fsyncs),
        )?;
        histograms(
            e,
            "log_fsync_seconds",
            "How long each group commit's fsync took.",
            [(Labels::new(), &m.fsync)],
        )?;
        counters(
            e,
            "log_write_errors",
            "Writes to the event log that failed (the gateway then goes on from memory).",
            one(m.write_errors.load(Relaxed)),
        )?;
        gauges(
            e,
            "log_recovered_events",
            "Events of earlier boots the broker never acknowledged, published first at this start.",
            one(m.recovered.load(Relaxed)),
        )?;
        gauges(
            e,
            "log_cut_bytes",
            "Bytes cut from torn or corrupt segment ends at this start.",
            one(rec.cut_bytes),
        )?;
        gauges(
            e,
            "log_cut_segments",
            "Segments whose end was torn or corrupt at this start.",
            one(rec.torn + rec.corrupt),
        )?;
        gauges(
            e,
            "log_missing_records",
            "Records the log should have held at this start and did not (gaps between segments).",
            one(rec.missing),
        )?;
        counters(
            e,
            "log_removed_events",
            "Events removed by the log's max_bytes / max_age.",
            one(st.removed_records),
        )?;
        counters(
            e,
            "log_lost_events",
            "Events that went before the broker acknowledged them (removed by max_bytes / max_age, or pushed out of memory while the log failed).",
            one(f.lost),
        )?;
        counters(
            e,
            "log_read_back_events",
            "Events read back from disk for the broker (a backlog larger than memory's tail).",
            one(f.read_back),
        )
    }

    /// The counters of Modbus bus `name`: the same ones across restarts of the bus.
    pub fn rtu_stats(&self, name: &str) -> Arc<BusStats> {
        lock(&self.rtu).entry(name.to_owned()).or_default().clone()
    }

    /// The counters of CAN bus `name`: the same ones across restarts of the bus.
    pub fn can_stats(&self, name: &str) -> Arc<CanStats> {
        lock(&self.can).entry(name.to_owned()).or_default().clone()
    }

    /// Bus `name` speaks `protocol` over `link` (`servogate_bus_info`).
    pub fn set_bus_info(&self, name: &str, protocol: &'static str, link: String) {
        lock(&self.bus_info).insert(name.to_owned(), (protocol, link));
    }

    /// The buses running now, by name.
    pub fn set_running(&self, buses: Vec<String>) {
        *lock(&self.running) = buses;
    }

    pub fn reloaded(&self, ok: bool) {
        let counter = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The whole exposition, in the Prometheus text format (version 0.0.4).
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("servogate");
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        // Writing into a String cannot fail, and every collector below only writes.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }

    /// The command path's counters (the desk counts into them).
    pub fn commands(&self) -> Arc<CommandStats> {
        self.commands.clone()
    }

    fn encode_commands(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let rows = self.commands.totals().into_iter().map(|((d, a, s), n)| {
            let labels: Labels = vec![("device", d), ("action", a), ("status", s.to_owned())];
            (labels, n)
        });
        counters(
            e,
            "commands",
            "Command results by device, action and status (repeats of an id not counted).",
            rows,
        )?;
        histograms(
            e,
            "command_latency_seconds",
            "Command receipt to result, every final result.",
            [(Labels::new(), &self.commands.latency)],
        )?;
        let one = |v: u64| [(Labels::new(), v)];
        counters(
            e,
            "commands_unknown_device",
            "Messages on the cmd topic of a device that is not configured (ignored).",
            one(self.commands.unknown_device.load(Relaxed)),
        )?;
        counters(
            e,
            "commands_dropped",
            "Command messages dropped because the desk's intake was full.",
            one(self.commands.dropped.load(Relaxed)),
        )
    }

    fn encode_gateway(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let info = vec![
            ("gateway", self.gateway.clone()),
            ("version", self.version.clone()),
            ("boot_id", self.boot_id.clone()),
        ];
        gauges(
            e,
            "build_info",
            "This gateway's id, version and boot id (always 1).",
            [(info, 1u64)],
        )?;
        let reloads = [
            (
                vec![("result", "ok".to_owned())],
                self.reloads_ok.load(Relaxed),
            ),
            (
                vec![("result", "failed".to_owned())],
                self.reloads_failed.load(Relaxed),
            ),
        ];
        counters(
            e,
            "reloads",
            "Reloads (SIGHUP) applied, and refused for a bad config.",
            reloads,
        )
    }

    fn encode_ring(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let s = self.outbox.stats();
        let one = |v: u64| [(Vec::<(&str, String)>::new(), v)];
        gauges(
            e,
            "ring_capacity_events",
            "Events the delivery ring holds at most.",
            one(self.outbox.capacity() as u64),
        )?;
        gauges(
            e,
            "ring_events",
            "Events in the delivery ring now (fill).",
            one(s.len as u64),
        )?;
        gauges(
            e,
            "ring_unacked_events",
            "Events in the ring not yet acknowledged by the broker.",
            one(s.unacked as u64),
        )?;
        counters(
            e,
            "ring_pushed_events",
            "Events that entered the ring.",
            one(s.pushed),
        )?;
        counters(
            e,
            "ring_dropped_events",
            "Events lost to the ring's overflow policy (gaps in seq).",
            one(s.dropped),
        )?;
        counters(
            e,
            "ring_acked_events",
            "Events the broker acknowledged (then removed from the ring).",
            one(s.acked),
        )?;
        counters(
            e,
            "ring_requeued_events",
            "Events handed to the broker again after a lost connection.",
            one(s.requeued),
        )
    }

    fn encode_mqtt(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let m = self.mqtt.snapshot();
        let one = |v: u64| [(Vec::<(&str, String)>::new(), v)];
        gauges(
            e,
            "mqtt_connected",
            "1 while connected to the MQTT broker.",
            one(u64::from(m.connected)),
        )?;
        counters(
            e,
            "mqtt_connects",
            "Connections the broker accepted (CONNACK): the first and every reconnect.",
            one(m.connects),
        )?;
        counters(
            e,
            "mqtt_reconnects",
            "Connections after the first (connects - 1, at least 0).",
            one(m.connects.saturating_sub(1)),
        )?;
        counters(
            e,
            "mqtt_connection_errors",
            "Failed connection attempts and lost connections.",
            one(m.connection_errors),
        )?;
        counters(
            e,
            "mqtt_publishes",
            "Events handed to the broker (re-publishes included).",
            one(m.publishes),
        )?;
        counters(
            e,
            "mqtt_acks",
            "Events the broker confirmed (PUBACK at QoS 1).",
            one(m.acks),
        )?;
        counters(
            e,
            "mqtt_republished",
            "Events published again after a lost connection.",
            one(m.republished),
        )?;
        counters(
            e,
            "mqtt_control_publishes",
            "Status, meta and availability messages.",
            one(m.control_publishes),
        )?;
        counters(
            e,
            "mqtt_refused",
            "Events that could never be sent (too large, invalid topic, refused by the broker).",
            one(m.refused),
        )?;
        counters(
            e,
            "mqtt_responses",
            "Command results also published on an MQTT 5 Response Topic.",
            one(m.responses),
        )?;
        let refusals = self
            .mqtt
            .broker_refused()
            .into_iter()
            .map(|(reason, n)| (vec![("reason", reason.to_owned())], n));
        counters(
            e,
            "mqtt_broker_refused",
            "Publishes the broker refused with an MQTT 5 reason code, by reason.",
            refusals,
        )
    }

    fn encode_devices(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let devices = self.devices.devices();
        let online = devices.iter().map(|(device, (bus, state))| {
            let labels = vec![("device", device.clone()), ("bus", bus.clone())];
            (labels, u64::from(*state == Some(AvailabilityState::Online)))
        });
        gauges(
            e,
            "device_online",
            "1 while the device is online, 0 while offline or not yet seen.",
            online,
        )
    }

    fn encode_buses(&self, e: &mut DescriptorEncoder, running: &[String]) -> fmt::Result {
        let info = lock(&self.bus_info);
        let rows = info.iter().filter(|(name, _)| running.contains(name)).map(
            |(name, (protocol, link))| {
                let labels = vec![
                    ("bus", name.clone()),
                    ("protocol", (*protocol).to_owned()),
                    ("link", link.clone()),
                ];
                (labels, 1)
            },
        );
        gauges(
            e,
            "bus_info",
            "1 for each running bus: its protocol (modbus-rtu, modbus-rtu-tcp, modbus-tcp, canopen) and its port, address or interface.",
            rows,
        )
    }

    fn encode_rtu(&self, e: &mut DescriptorEncoder, running: &[String]) -> fmt::Result {
        let buses: Vec<(String, Arc<BusStats>)> = lock(&self.rtu)
            .iter()
            .filter(|(name, _)| running.contains(name))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let bus = |name: &String| vec![("bus", name.clone())];
        let per_bus = |f: RtuCounter| buses.iter().map(move |(n, s)| (bus(n), f(s).load(Relaxed)));
        counters(
            e,
            "modbus_transactions",
            "Modbus requests sent.",
            per_bus(|s| &s.transactions),
        )?;
        counters(
            e,
            "modbus_replies",
            "Modbus requests answered with data.",
            per_bus(|s| &s.replies),
        )?;
        let kinds: [(&str, RtuCounter); 6] = [
            ("timeout", |s| &s.timeouts),
            ("crc", |s| &s.crc_errors),
            ("exception", |s| &s.exceptions),
            ("wrong_reply", |s| &s.wrong_replies),
            ("io", |s| &s.io_errors),
            ("late", |s| &s.late_replies),
        ];
        let errors = buses.iter().flat_map(|(n, s)| {
            kinds.iter().map(move |(kind, f)| {
                (
                    vec![("bus", n.clone()), ("kind", (*kind).to_owned())],
                    f(s).load(Relaxed),
                )
            })
        });
        counters(e, "modbus_errors", "Failed or late Modbus transactions by kind (late: a reply slower than the device's late_after).", errors)?;
        let codes = buses.iter().flat_map(|(n, s)| {
            s.exception_codes()
                .into_iter()
                .map(move |(code, v)| (vec![("bus", n.clone()), ("code", code.to_string())], v))
        });
        counters(
            e,
            "modbus_exceptions",
            "Modbus exception replies by exception code.",
            codes,
        )?;
        counters(
            e,
            "modbus_port_reopens",
            "Times the serial port or TCP connection failed and was reopened.",
            per_bus(|s| &s.reopens),
        )?;
        counters(
            e,
            "modbus_stale_replies",
            "Modbus TCP replies whose transaction id matched no outstanding request (they came after their request's timeout), dropped.",
            per_bus(|s| &s.stale_replies),
        )?;
        histograms(
            e,
            "modbus_reply_seconds",
            "Time from a Modbus request to its complete reply (poll latency).",
            buses.iter().map(|(n, s)| (bus(n), &s.reply_time)),
        )
    }

    fn encode_can(&self, e: &mut DescriptorEncoder, running: &[String]) -> fmt::Result {
        let buses: Vec<(String, Arc<CanStats>)> = lock(&self.can)
            .iter()
            .filter(|(name, _)| running.contains(name))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let frames = buses.iter().flat_map(|(n, s)| {
            [("rx", &s.rx_frames), ("tx", &s.tx_frames)].map(|(dir, c)| {
                (
                    vec![("bus", n.clone()), ("direction", dir.to_owned())],
                    c.load(Relaxed),
                )
            })
        });
        counters(e, "can_frames", "CAN frames received and sent.", frames)?;
        let errors = buses.iter().flat_map(|(n, s)| {
            [
                ("rx_overflow", &s.rx_lost),
                ("controller_overflow", &s.controller_overflows),
                ("error_frame", &s.error_frames),
                ("bus_error", &s.bus_errors),
                ("bus_off", &s.bus_off),
                ("error_passive", &s.error_passive),
                ("enobufs", &s.tx_enobufs),
                ("tx_dropped", &s.tx_dropped),
            ]
            .map(|(kind, c)| {
                (
                    vec![("bus", n.clone()), ("kind", kind.to_owned())],
                    c.load(Relaxed),
                )
            })
        });
        counters(
            e,
            "can_errors",
            "CAN errors by kind (rx_overflow: frames the kernel dropped before we read them).",
            errors,
        )?;
        counters(
            e,
            "can_interface_reopens",
            "Times the CAN interface disappeared and was opened again.",
            buses
                .iter()
                .map(|(n, s)| (vec![("bus", n.clone())], s.reopens.load(Relaxed))),
        )?;
        let states = self.devices.bus_states();
        let state = buses.iter().flat_map(|(n, _)| {
            let now = states.get(n).copied().unwrap_or("error_active");
            BUS_STATES.map(|st| {
                (
                    vec![("bus", n.clone()), ("state", st.to_owned())],
                    u64::from(st == now),
                )
            })
        });
        gauges(
            e,
            "can_bus_state",
            "1 for the CAN bus's current state (error_active, error_warning, error_passive, bus_off, down).",
            state,
        )
    }
}

/// The CAN bus states reported (`bus_state` events; "up" is "error_active" again).
const BUS_STATES: [&str; 5] = [
    "error_active",
    "error_warning",
    "error_passive",
    "bus_off",
    "down",
];

impl Collector for Metrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let running = lock(&self.running).clone();
        self.encode_gateway(&mut e)?;
        self.encode_commands(&mut e)?;
        self.encode_ring(&mut e)?;
        self.encode_log(&mut e)?;
        self.encode_mqtt(&mut e)?;
        self.encode_sparkplug(&mut e)?;
        self.encode_devices(&mut e)?;
        self.encode_buses(&mut e, &running)?;
        self.encode_rtu(&mut e, &running)?;
        self.encode_can(&mut e, &running)
    }
}

type Labels = Vec<(&'static str, String)>;

/// Picks one counter of a Modbus bus.
type RtuCounter = fn(&BusStats) -> &AtomicU64;

fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

fn gauges(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn histograms<'h, L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, &'h Histogram)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let s = h.snapshot();
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            s.sum_seconds,
            s.count,
            &s.buckets,
            None,
        )?;
    }
    Ok(())
}

/// The event sink in front of the ring: passes every event on, and keeps each device's
/// availability and each CAN bus's state for the metrics.
#[derive(Debug)]
pub struct Observed {
    inner: Arc<Outbox>,
    state: Mutex<ObservedState>,
    /// What the command policy reads of each device (availability, last telemetry).
    views: Arc<DeviceViews>,
    /// Sees every event too (the Sparkplug edge node).
    tap: std::sync::OnceLock<Tap>,
}

/// A function that sees every event as it is acquired.
pub struct Tap(pub Box<dyn Fn(&Event) + Send + Sync>);

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

#[derive(Debug, Default)]
struct ObservedState {
    /// Device -> (bus, last availability).
    devices: BTreeMap<String, (String, Option<AvailabilityState>)>,
    /// Bus -> last bus_state reported by one of its devices.
    bus_state: HashMap<String, &'static str>,
}

impl Observed {
    pub fn new(inner: Arc<Outbox>) -> Self {
        Self {
            inner,
            state: Mutex::default(),
            views: Arc::default(),
            tap: std::sync::OnceLock::new(),
        }
    }

    /// `tap` sees every event from now on (set once).
    pub fn set_tap(&self, tap: Tap) {
        let _ = self.tap.set(tap);
    }

    /// The live per-device view the command policy reads.
    pub fn views(&self) -> Arc<DeviceViews> {
        self.views.clone()
    }

    /// The devices configured now, with their bus: a device kept keeps its state, a
    /// removed one disappears from the metrics.
    pub fn set_devices(&self, devices: impl IntoIterator<Item = (String, String)>) {
        let mut st = lock(&self.state);
        let old = std::mem::take(&mut st.devices);
        for (device, bus) in devices {
            let known = old
                .get(&device)
                .filter(|(b, _)| *b == bus)
                .and_then(|(_, a)| *a);
            st.devices.insert(device, (bus, known));
        }
    }

    fn devices(&self) -> BTreeMap<String, (String, Option<AvailabilityState>)> {
        lock(&self.state).devices.clone()
    }

    fn bus_states(&self) -> HashMap<String, &'static str> {
        lock(&self.state).bus_state.clone()
    }
}

impl EventSink for Observed {
    fn push(&self, event: Event) {
        self.views.observe(&event);
        match &event.body {
            EventBody::Availability(a) => {
                let mut st = lock(&self.state);
                if let Some((_, state)) = st.devices.get_mut(&*event.device) {
                    *state = Some(a.state);
                }
            }
            EventBody::Notice(n) => {
                if let EventKind::BusState { state } = n.kind {
                    let mut st = lock(&self.state);
                    if let Some((bus, _)) = st.devices.get(&*event.device) {
                        let bus = bus.clone();
                        let state = if state == "up" { "error_active" } else { state };
                        st.bus_state.insert(bus, state);
                    }
                }
            }
            EventBody::Telemetry(_) | EventBody::CommandResult(_) => {}
        }
        if let Some(tap) = self.tap.get() {
            (tap.0)(&event);
        }
        self.inner.push(event);
    }
}

/// Most scrapes served at once; more connections wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// A client must send its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Binds the endpoint (an error here is a start-up error: the port is taken or not ours).
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

/// Serves `GET /metrics` on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics endpoint listening (GET /metrics)");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &metrics).await {
                debug!(%peer, error = %e, "metrics request failed");
            }
            drop(permit);
        });
    }
}

/// Reads one request head and answers it; the connection is then closed.
async fn answer(mut stream: TcpStream, metrics: &Arc<Metrics>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let mut response = String::with_capacity(body.len() + 128);
    let _ = write!(
        response,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use servogate_core::{Availability, DeviceEvents, OnFull};
    use std::num::NonZeroUsize;
    use std::time::SystemTime;

    fn metrics() -> (Arc<Metrics>, Arc<Observed>) {
        let outbox = Outbox::new(NonZeroUsize::new(10).unwrap(), OnFull::DropOldest);
        let observed = Arc::new(Observed::new(outbox.clone()));
        let m = Metrics::new(
            "cell-7",
            "0.1.0",
            "b00t",
            outbox,
            Arc::default(),
            observed.clone(),
        );
        (Arc::new(m), observed)
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn a_scrape_shows_bus_counters_latency_and_device_availability() {
        let (m, observed) = metrics();
        let stats = m.rtu_stats("rs485-a");
        stats.transactions.fetch_add(7, Relaxed);
        stats.timeouts.fetch_add(2, Relaxed);
        stats.reply_time.record(Duration::from_micros(4_000));
        m.set_running(vec!["rs485-a".into()]);
        observed.set_devices([("axis-1".to_owned(), "rs485-a".to_owned())]);
        let mut dev = DeviceEvents::new("axis-1");
        let online = Availability {
            state: AvailabilityState::Online,
            since: SystemTime::UNIX_EPOCH,
            reason: String::new(),
        };
        observed.push(dev.event(SystemTime::UNIX_EPOCH, EventBody::Availability(online)));

        let text = m.render();
        assert_eq!(
            line(&text, "servogate_modbus_transactions_total{"),
            Some("servogate_modbus_transactions_total{bus=\"rs485-a\"} 7")
        );
        assert!(
            text.contains("servogate_modbus_errors_total{bus=\"rs485-a\",kind=\"timeout\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("servogate_modbus_reply_seconds_bucket{bus=\"rs485-a\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("servogate_modbus_reply_seconds_bucket{bus=\"rs485-a\",le=\"0.003\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("servogate_device_online{device=\"axis-1\",bus=\"rs485-a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("servogate_ring_pushed_events_total 1"),
            "{text}"
        );
        assert!(text.contains("servogate_mqtt_connected 0"), "{text}");
    }

    #[test]
    fn a_bus_removed_by_a_reload_leaves_the_scrape_and_keeps_its_counters_for_a_return() {
        let (m, _) = metrics();
        m.rtu_stats("rs485-a").transactions.fetch_add(3, Relaxed);
        m.set_running(vec![]);
        assert!(!m.render().contains("rs485-a"));
        m.set_running(vec!["rs485-a".into()]);
        assert!(m.rtu_stats("rs485-a").transactions.load(Relaxed) == 3);
        assert!(m
            .render()
            .contains("servogate_modbus_transactions_total{bus=\"rs485-a\"} 3"));
    }
}
