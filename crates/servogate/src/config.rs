//! The configuration file (DESIGN.md section 6): parsed, then validated as a whole before
//! anything opens a port.
//!
//! Every error names the file, line, column and key, on one line:
//!
//! ```text
//! configs/bad.toml:14:9: devices[2].bus: no bus named "rs485-b" (buses: rs485-a)
//! ```
//!
//! Parsing goes through `serde` with `deny_unknown_fields` into raw structs whose values
//! keep their byte spans (`toml::Spanned`). The checks serde cannot do (references,
//! ranges, durations, uniqueness) know the key path they check and take the position from
//! the span. toml's own errors (syntax, unknown keys, wrong types) carry a span but not the
//! key path, so for those the path is recovered from the text around the span.
//!
//! [`Config`] is plain data: durations are parsed, defaults filled in, references resolved.
//! [`Config::rtu_buses`] turns it into the settings `servogate_modbus::bus::run_bus` takes.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use servogate_canopen::pdo::{MappingEntry, TpdoMapping};
use servogate_canopen::{
    NodeId, NodeSettings, ObjType, ObjectSpec, ObjectTable, SdoPoll, TpdoSource,
};
use servogate_core::OnFull;
use servogate_modbus::bus::BusSettings;
use servogate_modbus::plan::{ReadPlan, MAX_READ_REGISTERS};
use servogate_modbus::poll::DeviceSettings;
use servogate_modbus::profile::{ByteOrder, DataType, Field, RegisterKind, WordOrder};
use servogate_socketcan::CanBusSettings;
use tokio_serial::{DataBits, Parity, StopBits};
use toml::Spanned;

// ---------------------------------------------------------------------------------------
// Errors.

/// A config error, with where it is. `Display` is the one-line message
/// `FILE:LINE:COL: KEY: MESSAGE` (without `LINE:COL` when the file could not be read, and
/// without `KEY` when the error is not about one key, e.g. a syntax error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(self))]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the error has a place in the file.
    pub line: Option<usize>,
    /// 1-based column (in characters), with `line`.
    pub column: Option<usize>,
    /// The key path, e.g. `devices[2].bus` or `profiles.acme-ax.position.type`.
    pub key: Option<String>,
    pub message: String,
}

fn render(e: &ConfigError) -> String {
    let mut s = e.file.display().to_string();
    if let Some(line) = e.line {
        let _ = write!(s, ":{line}");
        if let Some(col) = e.column {
            let _ = write!(s, ":{col}");
        }
    }
    s.push_str(": ");
    if let Some(key) = &e.key {
        s.push_str(key);
        s.push_str(": ");
    }
    s.push_str(&e.message);
    s
}

// ---------------------------------------------------------------------------------------
// The validated config.

/// A whole, validated config file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (as given to [`load`] / [`parse`]).
    pub file: PathBuf,
    pub gateway: Gateway,
    pub mqtt: MqttConfig,
    pub buffer: Buffer,
    /// Modbus register maps by name, fields in file order. `cia402` is never here: it is
    /// the built-in CANopen profile.
    pub profiles: BTreeMap<String, Arc<[Field]>>,
    /// In file order.
    pub buses: Vec<Bus>,
    /// In file order.
    pub devices: Vec<Device>,
    pub metrics: Option<Metrics>,
}

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    /// Letters, digits, `-` and `_`: it goes into topics.
    pub id: String,
    /// Log filter (tracing `EnvFilter` syntax), default `"info"`; `RUST_LOG` may override.
    pub log: String,
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`, never with credentials in it.
    pub url: String,
    /// True for `mqtts://`; then `ca_file` is set.
    pub tls: bool,
    /// `{prefix}` of every topic: no `+`, `#`, empty level, or leading / trailing `/`.
    pub topic_prefix: String,
    /// QoS of telemetry (0 or 1); everything else goes at QoS 1.
    pub qos: u8,
    pub client_id: String,
    /// Zero turns keep-alive off; otherwise at least 1 s.
    pub keep_alive: Duration,
    pub max_packet_size: usize,
    /// CA certificate(s) for `mqtts://` (required there, refused with `mqtt://`).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key: both or neither, `mqtts://` only.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Read with [`read_credentials`] when the daemon starts.
    pub credentials_file: Option<PathBuf>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub shutdown_grace: Duration,
}

/// `[buffer]`: the delivery ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub capacity: NonZeroUsize,
    pub on_full: OnFull,
}

/// `[metrics]`: where the Prometheus endpoint listens (`GET /metrics`).
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub listen: SocketAddr,
}

/// One `[[buses]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    pub name: String,
    pub kind: BusKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BusKind {
    ModbusRtu(RtuBus),
    /// CiA 402 drives on a SocketCAN interface.
    Canopen(CanBus),
}

impl BusKind {
    /// `"modbus-rtu"` or `"canopen"`, as written in the file.
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::ModbusRtu(_) => "modbus-rtu",
            Self::Canopen(_) => "canopen",
        }
    }
}

/// A Modbus RTU bus: one serial port, owned by one task.
#[derive(Debug, Clone, PartialEq)]
pub struct RtuBus {
    pub port: PathBuf,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: DataBits,
    pub stop_bits: StopBits,
    /// Per-request timeout (a device may override it).
    pub timeout: Duration,
    /// Inter-frame silence override; `None` = 3.5 characters at `baud` (1.75 ms above
    /// 19200 baud).
    pub t35: Option<Duration>,
    /// Largest hole (registers) a merged read may span.
    pub max_gap: u16,
    /// Most registers per read, 1-125.
    pub max_registers: u16,
    /// Longest back-off of an offline device, and of reopening a failed port.
    pub backoff_max: Duration,
}

impl RtuBus {
    /// The effective inter-frame silence.
    pub fn t35(&self) -> Duration {
        self.t35
            .unwrap_or_else(|| servogate_modbus::timing::t35(self.baud))
    }
}

/// A CANopen bus on SocketCAN.
#[derive(Debug, Clone, PartialEq)]
pub struct CanBus {
    pub interface: String,
    /// Period of the SYNC this gateway produces; `None`: no SYNC producer.
    pub sync_period: Option<Duration>,
    /// SO_RCVBUF of the socket in bytes (0: the kernel's default).
    pub rcvbuf: usize,
    /// Time each SDO response may take.
    pub sdo_timeout: Duration,
    /// Longest wait between attempts to open a missing interface.
    pub backoff_max: Duration,
}

/// What a device on a CANopen bus adds to [`Device`].
#[derive(Debug, Clone, PartialEq)]
pub struct CanDevice {
    /// The drive's heartbeat producer time; zero: not watched.
    pub heartbeat: Duration,
    /// Write `heartbeat` into the drive's 0x1017 at start-up.
    pub configure_heartbeat: bool,
    /// `None`: TPDOs 1-4 are read from the drive at start-up.
    pub tpdos: Option<Vec<TpdoMapping>>,
    /// The `cia402` objects with the config's scales and units, and the config's own.
    pub objects: ObjectTable,
    pub polls: Vec<SdoPoll>,
    /// A TPDO cycle later than this is `late`; `None`: not watched.
    pub late_after: Option<Duration>,
}

/// Where a device sits on its bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceAddress {
    /// Modbus unit id, 1-247.
    Unit(u8),
    /// CANopen node id, 1-127.
    Node(u8),
}

impl fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unit(u) => write!(f, "unit {u}"),
            Self::Node(n) => write!(f, "node {n}"),
        }
    }
}

/// One `[[devices]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Unique, letters, digits, `-` and `_`: it goes into topics.
    pub name: String,
    /// The name of a bus in [`Config::buses`].
    pub bus: String,
    pub address: DeviceAddress,
    /// A key of [`Config::profiles`] on a modbus-rtu bus; [`CIA402`] on a canopen bus.
    pub profile: String,
    pub poll: Duration,
    /// A reply slower than this is `late` (default: `poll`).
    pub late_after: Duration,
    /// Overrides the bus's request timeout.
    pub timeout: Option<Duration>,
    /// Consecutive failed polls before the device is `offline`, at least 1.
    pub offline_after: u32,
    /// Set for a device on a canopen bus.
    pub canopen: Option<CanDevice>,
}

impl Device {
    /// The Modbus unit id (`None` for a CANopen device).
    pub fn unit(&self) -> Option<u8> {
        match self.address {
            DeviceAddress::Unit(u) => Some(u),
            DeviceAddress::Node(_) => None,
        }
    }

    /// The CANopen node id (`None` for a Modbus device).
    pub fn node(&self) -> Option<u8> {
        match self.address {
            DeviceAddress::Node(n) => Some(n),
            DeviceAddress::Unit(_) => None,
        }
    }
}

/// The profile name reserved for CiA 402 drives on CANopen.
pub const CIA402: &str = "cia402";

const DEFAULT_URL: &str = "mqtt://127.0.0.1:1883";
const MAX_CAPACITY: usize = 10_000_000;

impl Config {
    pub fn bus(&self, name: &str) -> Option<&Bus> {
        self.buses.iter().find(|b| b.name == name)
    }

    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The devices on bus `name`, in file order.
    pub fn devices_on<'a>(&'a self, bus: &'a str) -> impl Iterator<Item = &'a Device> + 'a {
        self.devices.iter().filter(move |d| d.bus == bus)
    }

    /// The register map of a Modbus device (`None` for a CANopen device).
    pub fn fields(&self, device: &Device) -> Option<Arc<[Field]>> {
        self.profiles.get(&device.profile).cloned()
    }

    /// Every modbus-rtu bus with the settings of its devices, ready for
    /// `servogate_modbus::bus::run_bus`. A bus with no devices is left out.
    pub fn rtu_buses(&self) -> Vec<(BusSettings, Vec<DeviceSettings>)> {
        let mut out = Vec::new();
        for bus in &self.buses {
            let BusKind::ModbusRtu(rtu) = &bus.kind else {
                continue;
            };
            let devices: Vec<DeviceSettings> = self
                .devices_on(&bus.name)
                .filter_map(|d| {
                    Some(DeviceSettings {
                        name: d.name.as_str().into(),
                        unit: d.unit()?,
                        poll: d.poll,
                        late_after: d.late_after,
                        timeout: d.timeout.unwrap_or(rtu.timeout),
                        offline_after: d.offline_after,
                        backoff_max: rtu.backoff_max,
                        fields: self.fields(d)?,
                        max_gap: rtu.max_gap,
                        max_registers: rtu.max_registers,
                    })
                })
                .collect();
            if devices.is_empty() {
                continue;
            }
            out.push((
                BusSettings {
                    name: bus.name.as_str().into(),
                    port: rtu.port.clone(),
                    baud: rtu.baud,
                    parity: rtu.parity,
                    data_bits: rtu.data_bits,
                    stop_bits: rtu.stop_bits,
                    t35: rtu.t35,
                    reopen_max: rtu.backoff_max,
                },
                devices,
            ));
        }
        out
    }

    /// Every canopen bus with its SYNC period and the settings of its drives, ready for
    /// `servogate_socketcan::run_can_bus`. A bus with no devices is left out.
    pub fn can_buses(&self) -> Vec<(CanBusSettings, Option<Duration>, Vec<NodeSettings>)> {
        let mut out = Vec::new();
        for bus in &self.buses {
            let BusKind::Canopen(can) = &bus.kind else {
                continue;
            };
            let nodes: Vec<NodeSettings> = self
                .devices_on(&bus.name)
                .filter_map(|d| {
                    let c = d.canopen.as_ref()?;
                    Some(NodeSettings {
                        name: d.name.as_str().into(),
                        // Validated 1..=127.
                        node: NodeId::new(d.node()?)?,
                        heartbeat: c.heartbeat,
                        configure_heartbeat: c.configure_heartbeat,
                        tpdos: match &c.tpdos {
                            Some(m) => TpdoSource::Config(m.clone()),
                            None => TpdoSource::Read(vec![1, 2, 3, 4]),
                        },
                        objects: Arc::new(c.objects.clone()),
                        polls: c.polls.clone(),
                        late_after: c.late_after,
                        sdo_timeout: can.sdo_timeout,
                    })
                })
                .collect();
            if nodes.is_empty() {
                continue;
            }
            out.push((
                CanBusSettings {
                    name: bus.name.as_str().into(),
                    interface: can.interface.clone(),
                    rcvbuf: can.rcvbuf,
                    reopen_max: can.backoff_max,
                },
                can.sync_period,
                nodes,
            ));
        }
        out
    }

    /// The unit of each field of a device (Modbus profile fields, or CANopen objects), for
    /// its `meta` topic.
    pub fn units(&self, device: &Device) -> Vec<(String, Option<String>)> {
        if let Some(c) = &device.canopen {
            return c
                .objects
                .iter()
                .map(|o| (o.name.to_string(), o.unit.clone()))
                .collect();
        }
        self.fields(device)
            .iter()
            .flat_map(|fields| fields.iter())
            .map(|f| (f.name.to_string(), f.unit.clone()))
            .collect()
    }

    /// What `servogate check` prints: the gateway, the broker (the url never holds
    /// credentials), the ring, the profiles, and each bus with its devices, their poll
    /// periods and reads per poll. Several lines, without a final newline.
    pub fn summary(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let mut s = String::new();
        let _ = writeln!(s, "gateway {} (log {})", self.gateway.id, self.gateway.log);
        let m = &self.mqtt;
        let _ = writeln!(
            s,
            "mqtt {} as {}, topics {}/..., telemetry qos {}{}{}",
            m.url,
            m.client_id,
            m.topic_prefix,
            m.qos,
            if m.cert_file.is_some() {
                ", client certificate"
            } else {
                ""
            },
            if m.credentials_file.is_some() {
                ", credentials from file"
            } else {
                ""
            },
        );
        let _ = writeln!(
            s,
            "buffer {} events, {}",
            self.buffer.capacity,
            match self.buffer.on_full {
                OnFull::DropOldest => "drop_oldest",
                OnFull::DropNewest => "drop_newest",
            }
        );
        for (name, fields) in &self.profiles {
            let names: Vec<&str> = fields.iter().map(|f| &*f.name).collect();
            let _ = writeln!(
                s,
                "profile {name}: {} fields ({})",
                fields.len(),
                names.join(", ")
            );
        }
        for bus in &self.buses {
            match &bus.kind {
                BusKind::ModbusRtu(r) => {
                    let _ = writeln!(
                        s,
                        "bus {} modbus-rtu {} {} baud {}{}{}, timeout {}, t3.5 {}{}",
                        bus.name,
                        r.port.display(),
                        r.baud,
                        match r.data_bits {
                            DataBits::Seven => 7,
                            _ => 8,
                        },
                        match r.parity {
                            Parity::Even => 'E',
                            Parity::Odd => 'O',
                            Parity::None => 'N',
                        },
                        match r.stop_bits {
                            StopBits::Two => 2,
                            StopBits::One => 1,
                        },
                        d(r.timeout),
                        d(r.t35()),
                        if r.t35.is_some() { " (set)" } else { "" },
                    );
                }
                BusKind::Canopen(c) => {
                    let _ = writeln!(
                        s,
                        "bus {} canopen {}{}, sdo timeout {}",
                        bus.name,
                        c.interface,
                        c.sync_period
                            .map(|p| format!(", sync every {}", d(p)))
                            .unwrap_or_default(),
                        d(c.sdo_timeout),
                    );
                }
            }
            let mut any = false;
            for dev in self.devices_on(&bus.name) {
                any = true;
                let reads = match (&bus.kind, self.fields(dev)) {
                    (BusKind::ModbusRtu(r), Some(fields)) => {
                        let n = ReadPlan::new(&fields, r.max_gap, r.max_registers)
                            .blocks
                            .len();
                        format!(", {n} read{} per poll", if n == 1 { "" } else { "s" })
                    }
                    _ => String::new(),
                };
                if let Some(c) = &dev.canopen {
                    let _ = writeln!(
                        s,
                        "  device {} {} profile {} heartbeat {}, tpdos {}, late after {}, {} sdo poll{}",
                        dev.name,
                        dev.address,
                        dev.profile,
                        if c.heartbeat.is_zero() { "not watched".to_owned() } else { d(c.heartbeat) },
                        match &c.tpdos {
                            Some(m) => format!("{} from config", m.len()),
                            None => "read from the drive".to_owned(),
                        },
                        c.late_after.map_or("not watched".to_owned(), d),
                        c.polls.len(),
                        if c.polls.len() == 1 { "" } else { "s" },
                    );
                    continue;
                }
                let _ = writeln!(
                    s,
                    "  device {} {} profile {} poll {} late after {}{reads}",
                    dev.name,
                    dev.address,
                    dev.profile,
                    d(dev.poll),
                    d(dev.late_after),
                );
            }
            if !any {
                let _ = writeln!(s, "  (no devices)");
            }
        }
        if let Some(metrics) = &self.metrics {
            let _ = writeln!(s, "metrics on {}", metrics.listen);
        }
        s.truncate(s.trim_end().len());
        s
    }
}

// ---------------------------------------------------------------------------------------
// Raw, as written.

type S<T> = Spanned<T>;

/// A TOML table in file order (a `BTreeMap` would sort the fields of a profile).
struct Ordered<V>(Vec<(String, V)>);

impl<V> Default for Ordered<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, V>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    buffer: RawBuffer,
    #[serde(default)]
    profiles: Ordered<S<Ordered<S<RawField>>>>,
    #[serde(default)]
    buses: Vec<S<RawBus>>,
    #[serde(default)]
    devices: Vec<S<RawDevice>>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: S<String>,
    log: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: Option<S<String>>,
    topic_prefix: Option<S<String>>,
    qos: Option<S<u8>>,
    client_id: Option<S<String>>,
    keep_alive: Option<S<String>>,
    max_packet_size: Option<S<usize>>,
    ca_file: Option<S<PathBuf>>,
    cert_file: Option<S<PathBuf>>,
    key_file: Option<S<PathBuf>>,
    credentials_file: Option<S<PathBuf>>,
    reconnect_min: Option<S<String>>,
    reconnect_max: Option<S<String>>,
    shutdown_grace: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    capacity: Option<S<usize>>,
    on_full: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    address: S<u32>,
    #[serde(rename = "type")]
    data_type: S<String>,
    kind: Option<S<String>>,
    word_order: Option<S<String>>,
    byte_order: Option<S<String>>,
    bit: Option<S<u8>>,
    scale: Option<S<f64>>,
    offset: Option<S<f64>>,
    unit: Option<S<String>>,
    min: Option<S<f64>>,
    max: Option<S<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    name: S<String>,
    protocol: S<String>,
    // modbus-rtu
    port: Option<S<PathBuf>>,
    baud: Option<S<u32>>,
    parity: Option<S<String>>,
    data_bits: Option<S<u8>>,
    stop_bits: Option<S<u8>>,
    timeout: Option<S<String>>,
    t35: Option<S<String>>,
    max_gap: Option<S<u16>>,
    max_registers: Option<S<u16>>,
    backoff_max: Option<S<String>>,
    // canopen
    interface: Option<S<String>>,
    sync_period: Option<S<String>>,
    rcvbuf: Option<S<u64>>,
    sdo_timeout: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpdo {
    number: Option<S<i64>>,
    cob_id: Option<S<i64>>,
    map: S<Vec<S<i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObject {
    name: S<String>,
    index: Option<S<i64>>,
    sub: Option<S<i64>>,
    #[serde(rename = "type")]
    ty: Option<S<String>>,
    scale: Option<S<f64>>,
    offset: Option<S<f64>>,
    unit: Option<S<String>>,
    every: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: S<String>,
    bus: S<String>,
    unit: Option<S<i64>>,
    node: Option<S<i64>>,
    profile: S<String>,
    poll: Option<S<String>>,
    late_after: Option<S<String>>,
    timeout: Option<S<String>>,
    offline_after: Option<S<u32>>,
    // canopen
    heartbeat: Option<S<String>>,
    configure_heartbeat: Option<S<bool>>,
    tpdos: Option<Vec<S<RawTpdo>>>,
    objects: Option<Vec<S<RawObject>>>,
}

// ---------------------------------------------------------------------------------------
// Loading.

/// Reads and validates `path`. Nothing is opened but the file itself.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        key: None,
        message: format!("cannot read the config file: {e}"),
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
            // Offsets in `lossy` equal those of the bytes up to the first bad byte.
            return Err(Source::new(path, &lossy).error(
                at..at,
                None,
                "the file is not valid UTF-8".to_owned(),
            ));
        }
    };
    parse(&text, path)
}

/// Validates `text`, naming `file` in errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let src = Source::new(file, text);
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = friendly(e.message().trim_end()).replace('\n', " ");
        let span = e.span().unwrap_or(0..0);
        let key = src.key_at(span.start);
        src.error(span, key, message)
    })?;
    src.validate(raw)
}

/// Reads an MQTT credentials file: `username:password` on one line, or the username and
/// the password on two lines (the password may then contain anything, `:` included).
/// Blank lines are ignored; the username is trimmed, the password kept as written.
/// Errors name the file and never contain the file's content.
pub fn read_credentials(path: &Path) -> Result<(String, String), ConfigError> {
    let fail = |message: &str| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        key: None,
        message: format!("MQTT credentials file: {message}"),
    };
    let bytes = std::fs::read(path).map_err(|e| fail(&format!("cannot read it: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| fail("it is not valid UTF-8"))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let (user, pass) = match lines.as_slice() {
        [one] => one
            .split_once(':')
            .ok_or_else(|| fail("expected `username:password` on one line (no `:` found)"))?,
        [user, pass] => (*user, *pass),
        [] => return Err(fail("it is empty; expected `username:password`")),
        _ => {
            return Err(fail(
                "expected `username:password` on one line, or the username and the password on two lines",
            ))
        }
    };
    let user = user.trim();
    if user.is_empty() {
        return Err(fail("the username is empty"));
    }
    Ok((user.to_owned(), pass.to_owned()))
}

/// The text being validated, for turning spans into positions and key paths.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

fn topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

const TOPIC_SAFE: &str = "use letters, digits, '-' and '_' only (it goes into MQTT topics)";

impl<'a> Source<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        Self { file, text }
    }

    /// 1-based line and column (in characters) of byte `offset`.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |p| p + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    fn error(&self, span: Range<usize>, key: Option<String>, message: String) -> ConfigError {
        let (line, col) = self.position(span.start);
        ConfigError {
            file: self.file.to_owned(),
            line: Some(line),
            column: Some(col),
            key,
            message,
        }
    }

    /// An error about `key`, at `value`.
    fn at<T>(
        &self,
        value: &Spanned<T>,
        key: impl fmt::Display,
        message: impl Into<String>,
    ) -> ConfigError {
        self.error(value.span(), Some(key.to_string()), message.into())
    }

    /// The dotted key path of the item at byte `offset`, for toml's own errors: the
    /// enclosing `[table]` or `[[array]]` header (with the array index) and the key on the
    /// offset's line; inside an inline table, both the outer and the inner key.
    fn key_at(&self, offset: usize) -> Option<String> {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let head = &self.text[..offset];
        let line_begin = head.rfind('\n').map_or(0, |p| p + 1);
        // The table header above the offset's line, and how many [[same]] came before.
        let mut table = String::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut on_header = false;
        for line in self.text[..line_begin].split('\n') {
            if let Some(name) = header(line) {
                table = name;
            }
            if let Some(name) = array_header(line) {
                let n = counts.entry(name.clone()).or_insert(0);
                table = format!("{name}[{n}]");
                *n += 1;
            }
        }
        let line_end = self.text[line_begin..]
            .find('\n')
            .map_or(self.text.len(), |p| line_begin + p);
        let line = &self.text[line_begin..line_end];
        if let Some(name) = array_header(line) {
            let n = counts.get(&name).copied().unwrap_or(0);
            table = format!("{name}[{n}]");
            on_header = true;
        } else if let Some(name) = header(line) {
            table = name;
            on_header = true;
        }
        let mut keys: Vec<String> = Vec::new();
        if !on_header {
            let rel = offset - line_begin;
            let clean = |k: &str| k.trim().trim_matches(['"', '\'']).to_owned();
            if let Some((outer, _)) = line.split_once('=') {
                if !outer.trim_start().starts_with('#') {
                    keys.push(clean(outer));
                }
            }
            let rest = &line[rel.min(line.len())..];
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            let points_at_key =
                !ident.is_empty() && rest[ident.len()..].trim_start().starts_with('=');
            let inner = if points_at_key {
                Some(ident)
            } else {
                line[..rel.min(line.len())]
                    .rsplit_once('=')
                    .and_then(|(before, _)| {
                        before
                            .rsplit([',', '{', ' '])
                            .find(|s| !s.trim().is_empty())
                            .map(clean)
                    })
            };
            if let Some(inner) = inner {
                if keys.first() != Some(&inner) {
                    keys.push(inner);
                }
            }
        }
        let mut path = table;
        for k in keys.into_iter().filter(|k| !k.is_empty()) {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&k);
        }
        (!path.is_empty()).then_some(path)
    }

    fn duration(
        &self,
        value: &Option<S<String>>,
        key: impl fmt::Display,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => self.parse_duration(v, key),
        }
    }

    fn parse_duration(
        &self,
        v: &S<String>,
        key: impl fmt::Display,
    ) -> Result<Duration, ConfigError> {
        humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            self.at(
                v,
                key,
                format!(
                    "\"{}\" is not a duration ({e}); write e.g. \"10ms\" or \"1.5s\"",
                    v.get_ref()
                ),
            )
        })
    }

    /// A duration that must be above zero.
    fn positive(
        &self,
        value: &Option<S<String>>,
        key: impl fmt::Display,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let key = key.to_string();
        let d = self.duration(value, &key, default)?;
        match value {
            Some(v) if d.is_zero() => Err(self.at(v, key, "must be above zero")),
            _ => Ok(d),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        // [gateway]
        let id = raw.gateway.id.get_ref().clone();
        if !topic_safe(&id) {
            return Err(self.at(&raw.gateway.id, "gateway.id", TOPIC_SAFE));
        }
        let log = match &raw.gateway.log {
            Some(l) => {
                check_log_filter(l.get_ref()).map_err(|m| self.at(l, "gateway.log", m))?;
                l.get_ref().trim().to_owned()
            }
            None => "info".to_owned(),
        };
        let gateway = Gateway { id, log };
        let mqtt = self.mqtt(raw.mqtt, &gateway.id)?;
        let buffer = self.buffer(raw.buffer)?;

        // [profiles.*]
        let mut profiles = BTreeMap::new();
        for (pname, fields) in raw.profiles.0 {
            let key = format!("profiles.{}", dotted(&pname));
            if pname == CIA402 {
                return Err(self.at(
                    &fields,
                    key,
                    "\"cia402\" is the built-in CANopen profile; give this register map another name",
                ));
            }
            if fields.get_ref().0.is_empty() {
                return Err(self.at(&fields, key, "a profile needs at least one field"));
            }
            let span = fields.span();
            let mut out = Vec::new();
            for (fname, f) in fields.into_inner().0 {
                out.push(self.field(&key, &fname, f)?);
            }
            if profiles.insert(pname.clone(), Arc::from(out)).is_some() {
                // toml refuses duplicate tables itself; this is belt and braces.
                return Err(self.error(span, Some(key), "defined twice".into()));
            }
        }

        // [[buses]]
        let mut buses: Vec<Bus> = Vec::new();
        let mut ports: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut interfaces: BTreeMap<String, String> = BTreeMap::new();
        for (i, b) in raw.buses.into_iter().enumerate() {
            let bus = self.bus(i, b, &buses, &mut ports, &mut interfaces)?;
            buses.push(bus);
        }

        // [[devices]]
        let mut devices: Vec<Device> = Vec::new();
        let mut addresses: BTreeMap<(String, DeviceAddress), String> = BTreeMap::new();
        for (i, d) in raw.devices.into_iter().enumerate() {
            let device = self.device(i, d, &buses, &profiles, &devices, &mut addresses)?;
            devices.push(device);
        }

        let metrics = match raw.metrics {
            None => None,
            Some(m) => Some(Metrics {
                listen: m.listen.get_ref().trim().parse().map_err(|_| {
                    self.at(
                        &m.listen,
                        "metrics.listen",
                        format!(
                            "\"{}\" is not IP:PORT; write e.g. \"127.0.0.1:9898\" or \"[::1]:9898\"",
                            m.listen.get_ref()
                        ),
                    )
                })?,
            }),
        };

        Ok(Config {
            file: self.file.to_owned(),
            gateway,
            mqtt,
            buffer,
            profiles,
            buses,
            devices,
            metrics,
        })
    }

    fn mqtt(&self, m: RawMqtt, id: &str) -> Result<MqttConfig, ConfigError> {
        let (url, tls) = match &m.url {
            Some(u) => {
                let tls = check_url(u.get_ref()).map_err(|msg| self.at(u, "mqtt.url", msg))?;
                (u.get_ref().trim().to_owned(), tls)
            }
            None => (DEFAULT_URL.to_owned(), false),
        };
        let topic_prefix = match &m.topic_prefix {
            Some(p) => {
                let s = p.get_ref();
                let bad = if s.is_empty() {
                    Some("must not be empty")
                } else if s.contains(['+', '#']) {
                    Some("must not contain the wildcards + or #")
                } else if s.starts_with('/') || s.ends_with('/') {
                    Some("must not start or end with /")
                } else if s.contains("//") {
                    Some("must not contain an empty level (//)")
                } else if s.contains('\0') {
                    Some("must not contain NUL")
                } else {
                    None
                };
                if let Some(bad) = bad {
                    return Err(self.at(p, "mqtt.topic_prefix", bad));
                }
                s.clone()
            }
            None => format!("servogate/{id}"),
        };
        let qos = match &m.qos {
            Some(q) if *q.get_ref() > 1 => {
                return Err(self.at(q, "mqtt.qos", "telemetry QoS must be 0 or 1"))
            }
            Some(q) => *q.get_ref(),
            None => 1,
        };
        let client_id = match &m.client_id {
            Some(c) if c.get_ref().trim().is_empty() => {
                return Err(self.at(c, "mqtt.client_id", "must not be empty"))
            }
            Some(c) => c.get_ref().clone(),
            None => format!("servogate-{id}"),
        };
        let keep_alive =
            self.duration(&m.keep_alive, "mqtt.keep_alive", Duration::from_secs(10))?;
        if let Some(v) = &m.keep_alive {
            if !keep_alive.is_zero() && keep_alive < Duration::from_secs(1) {
                return Err(self.at(
                    v,
                    "mqtt.keep_alive",
                    "must be \"0s\" (off) or at least \"1s\"",
                ));
            }
            if keep_alive > Duration::from_secs(u64::from(u16::MAX)) {
                return Err(self.at(
                    v,
                    "mqtt.keep_alive",
                    "must be at most 65535s (MQTT's limit)",
                ));
            }
        }
        let max_packet_size = match &m.max_packet_size {
            Some(v) if !(1024..=268_435_455).contains(v.get_ref()) => {
                return Err(self.at(v, "mqtt.max_packet_size", "must be 1024 to 268435455 bytes"))
            }
            Some(v) => *v.get_ref(),
            None => 65_536,
        };
        for (name, file) in [
            ("ca_file", &m.ca_file),
            ("cert_file", &m.cert_file),
            ("key_file", &m.key_file),
            ("credentials_file", &m.credentials_file),
        ] {
            if let Some(f) = file {
                let key = format!("mqtt.{name}");
                if f.get_ref().as_os_str().is_empty() {
                    return Err(self.at(f, key, "must not be empty"));
                }
                if !tls && name != "credentials_file" {
                    return Err(self.at(f, key, "TLS files need an mqtts:// url"));
                }
            }
        }
        match (&m.cert_file, &m.key_file) {
            (Some(c), None) => {
                return Err(self.at(
                    c,
                    "mqtt.cert_file",
                    "needs mqtt.key_file too (both or neither)",
                ))
            }
            (None, Some(k)) => {
                return Err(self.at(
                    k,
                    "mqtt.key_file",
                    "needs mqtt.cert_file too (both or neither)",
                ))
            }
            _ => {}
        }
        if let (true, None, Some(u)) = (tls, &m.ca_file, &m.url) {
            return Err(self.at(
                u,
                "mqtt.url",
                "an mqtts:// url needs mqtt.ca_file (the CA that signed the broker's certificate; \
                 /etc/ssl/certs/ca-certificates.crt for a public one)",
            ));
        }
        let reconnect_min = self.positive(
            &m.reconnect_min,
            "mqtt.reconnect_min",
            Duration::from_millis(100),
        )?;
        let reconnect_max = self.positive(
            &m.reconnect_max,
            "mqtt.reconnect_max",
            Duration::from_secs(10),
        )?;
        if reconnect_max < reconnect_min {
            let (v, key) = match (&m.reconnect_max, &m.reconnect_min) {
                (Some(v), _) => (v, "mqtt.reconnect_max"),
                (None, Some(v)) => (v, "mqtt.reconnect_min"),
                (None, None) => unreachable!("the defaults are ordered"),
            };
            return Err(self.at(
                v,
                key,
                format!(
                    "reconnect_max ({}) must not be below reconnect_min ({})",
                    humantime::format_duration(reconnect_max),
                    humantime::format_duration(reconnect_min)
                ),
            ));
        }
        let shutdown_grace = self.duration(
            &m.shutdown_grace,
            "mqtt.shutdown_grace",
            Duration::from_secs(5),
        )?;
        Ok(MqttConfig {
            url,
            tls,
            topic_prefix,
            qos,
            client_id,
            keep_alive,
            max_packet_size,
            ca_file: m.ca_file.map(Spanned::into_inner),
            cert_file: m.cert_file.map(Spanned::into_inner),
            key_file: m.key_file.map(Spanned::into_inner),
            credentials_file: m.credentials_file.map(Spanned::into_inner),
            reconnect_min,
            reconnect_max,
            shutdown_grace,
        })
    }

    fn buffer(&self, b: RawBuffer) -> Result<Buffer, ConfigError> {
        let capacity = match &b.capacity {
            Some(c) => match NonZeroUsize::new(*c.get_ref()) {
                Some(n) if n.get() <= MAX_CAPACITY => n,
                _ => return Err(self.at(c, "buffer.capacity", "must be 1 to 10000000 events")),
            },
            None => NonZeroUsize::new(100_000).expect("non-zero"),
        };
        let on_full = match &b.on_full {
            None => OnFull::DropOldest,
            Some(v) => match v.get_ref().as_str() {
                "drop_oldest" => OnFull::DropOldest,
                "drop_newest" => OnFull::DropNewest,
                other => {
                    return Err(self.at(
                        v,
                        "buffer.on_full",
                        format!(
                        "unknown policy \"{other}\"; expected \"drop_oldest\" or \"drop_newest\""
                    ),
                    ))
                }
            },
        };
        Ok(Buffer { capacity, on_full })
    }

    fn field(&self, profile_key: &str, name: &str, f: S<RawField>) -> Result<Field, ConfigError> {
        let key = format!("{profile_key}.{}", dotted(name));
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(self.at(
                &f,
                key,
                "a field name uses letters, digits, '-' and '_' only",
            ));
        }
        if name == "state" || name == "values" {
            return Err(self.at(
                &f,
                key,
                format!(
                    "\"{name}\" is a telemetry key of its own (state is decoded from statusword); \
                     give this field another name"
                ),
            ));
        }
        let f = f.into_inner();
        let Some(data_type) = DataType::parse(f.data_type.get_ref()) else {
            return Err(self.at(
                &f.data_type,
                format!("{key}.type"),
                format!(
                    "unknown type \"{}\"; expected u16, i16, u32, i32, f32, u64, i64, f64 or bool (bit)",
                    f.data_type.get_ref()
                ),
            ));
        };
        let mut field = Field::new(name, 0, data_type);
        let address = *f.address.get_ref();
        let end = address + u32::from(data_type.registers());
        if end > 65_536 {
            return Err(self.at(
                &f.address,
                format!("{key}.address"),
                format!(
                    "{address:#06x} plus {} register(s) runs past register 0xFFFF (65535)",
                    data_type.registers()
                ),
            ));
        }
        field.address = address as u16;
        if let Some(k) = &f.kind {
            field.kind = match k.get_ref().as_str() {
                "holding" => RegisterKind::Holding,
                "input" => RegisterKind::Input,
                other => {
                    return Err(self.at(
                        k,
                        format!("{key}.kind"),
                        format!("unknown kind \"{other}\"; expected \"holding\" or \"input\""),
                    ))
                }
            };
        }
        if let Some(w) = &f.word_order {
            field.word_order = match w.get_ref().as_str() {
                "high_first" => WordOrder::HighFirst,
                "low_first" => WordOrder::LowFirst,
                other => {
                    return Err(self.at(
                        w,
                        format!("{key}.word_order"),
                        format!(
                        "unknown word order \"{other}\"; expected \"high_first\" or \"low_first\""
                    ),
                    ))
                }
            };
        }
        if let Some(b) = &f.byte_order {
            field.byte_order = match b.get_ref().as_str() {
                "big" => ByteOrder::Big,
                "little" => ByteOrder::Little,
                other => {
                    return Err(self.at(
                        b,
                        format!("{key}.byte_order"),
                        format!("unknown byte order \"{other}\"; expected \"big\" or \"little\""),
                    ))
                }
            };
        }
        if let Some(bit) = &f.bit {
            if data_type != DataType::Bool {
                return Err(self.at(
                    bit,
                    format!("{key}.bit"),
                    "`bit` applies to type = \"bool\" only",
                ));
            }
            if *bit.get_ref() > 15 {
                return Err(self.at(bit, format!("{key}.bit"), "must be 0 to 15"));
            }
            field.bit = Some(*bit.get_ref());
        }
        for (k, v) in [
            ("scale", &f.scale),
            ("offset", &f.offset),
            ("min", &f.min),
            ("max", &f.max),
        ] {
            if let Some(v) = v {
                if !v.get_ref().is_finite() {
                    return Err(self.at(v, format!("{key}.{k}"), "must be a finite number"));
                }
            }
        }
        if let Some(s) = &f.scale {
            if *s.get_ref() == 0.0 {
                return Err(self.at(s, format!("{key}.scale"), "must not be 0"));
            }
            field.scale = *s.get_ref();
        }
        if let Some(o) = &f.offset {
            field.offset = *o.get_ref();
        }
        if data_type == DataType::Bool {
            for (k, v) in [("scale", &f.scale), ("offset", &f.offset)] {
                if let Some(v) = v {
                    return Err(self.at(
                        v,
                        format!("{key}.{k}"),
                        "a bool field is 0 or 1: no scale or offset",
                    ));
                }
            }
        }
        // statusword and fault_code are 16-bit codes, not measurements.
        if name == "statusword" || name == "fault_code" {
            if data_type != DataType::U16 {
                return Err(self.at(
                    &f.data_type,
                    format!("{key}.type"),
                    format!("{name} is a 16-bit code: type must be \"u16\""),
                ));
            }
            for (k, v) in [("scale", &f.scale), ("offset", &f.offset)] {
                if let Some(v) = v {
                    return Err(self.at(
                        v,
                        format!("{key}.{k}"),
                        format!("{name} is a code: no scale or offset"),
                    ));
                }
            }
        }
        if let (Some(min), Some(max)) = (&f.min, &f.max) {
            if min.get_ref() > max.get_ref() {
                return Err(self.at(max, format!("{key}.max"), "must not be below min"));
            }
        }
        if let Some(u) = &f.unit {
            if u.get_ref().trim().is_empty() {
                return Err(self.at(
                    u,
                    format!("{key}.unit"),
                    "leave `unit` out rather than empty",
                ));
            }
        }
        field.unit = f.unit.map(Spanned::into_inner);
        field.min = f.min.map(Spanned::into_inner);
        field.max = f.max.map(Spanned::into_inner);
        Ok(field)
    }

    fn bus(
        &self,
        i: usize,
        raw: S<RawBus>,
        known: &[Bus],
        ports: &mut BTreeMap<PathBuf, String>,
        interfaces: &mut BTreeMap<String, String>,
    ) -> Result<Bus, ConfigError> {
        let key = |k: &str| format!("buses[{i}].{k}");
        let table = raw.span();
        let b = raw.into_inner();
        let name = b.name.get_ref().clone();
        if !topic_safe(&name) {
            return Err(self.at(
                &b.name,
                key("name"),
                "use letters, digits, '-' and '_' only",
            ));
        }
        if known.iter().any(|k| k.name == name) {
            return Err(self.at(
                &b.name,
                key("name"),
                format!("bus name \"{name}\" is used twice"),
            ));
        }
        let misplaced = |keys: &[(&str, bool)], belongs: &str| -> Result<(), ConfigError> {
            for (k, set) in keys {
                if *set {
                    return Err(self.at(
                        &b.protocol,
                        key(k),
                        format!(
                            "`{k}` belongs to {belongs} buses, not {}",
                            b.protocol.get_ref()
                        ),
                    ));
                }
            }
            Ok(())
        };
        let kind = match b.protocol.get_ref().as_str() {
            "modbus-rtu" => {
                misplaced(
                    &[
                        ("interface", b.interface.is_some()),
                        ("sync_period", b.sync_period.is_some()),
                        ("rcvbuf", b.rcvbuf.is_some()),
                        ("sdo_timeout", b.sdo_timeout.is_some()),
                    ],
                    "canopen",
                )?;
                let Some(port) = &b.port else {
                    return Err(self.error(
                        table,
                        Some(key("port")),
                        "a modbus-rtu bus needs `port` (e.g. \"/dev/ttyUSB0\")".into(),
                    ));
                };
                if port.get_ref().as_os_str().is_empty() {
                    return Err(self.at(port, key("port"), "must not be empty"));
                }
                if let Some(other) = ports.insert(port.get_ref().clone(), name.clone()) {
                    return Err(self.at(
                        port,
                        key("port"),
                        format!(
                            "bus \"{other}\" already uses {}; one task owns each port, so put \
                             every device on that port on one bus",
                            port.get_ref().display()
                        ),
                    ));
                }
                let baud = match &b.baud {
                    Some(v) if !(300..=4_000_000).contains(v.get_ref()) => {
                        return Err(self.at(v, key("baud"), "must be 300 to 4000000"))
                    }
                    Some(v) => *v.get_ref(),
                    None => 19_200,
                };
                let parity = match &b.parity {
                    None => Parity::None,
                    Some(v) => match v.get_ref().as_str() {
                        "none" => Parity::None,
                        "even" => Parity::Even,
                        "odd" => Parity::Odd,
                        other => {
                            return Err(self.at(
                                v,
                                key("parity"),
                                format!("unknown parity \"{other}\"; expected \"none\", \"even\" or \"odd\""),
                            ))
                        }
                    },
                };
                let data_bits = match &b.data_bits {
                    None => DataBits::Eight,
                    Some(v) => match v.get_ref() {
                        8 => DataBits::Eight,
                        7 => DataBits::Seven,
                        _ => return Err(self.at(v, key("data_bits"), "must be 7 or 8")),
                    },
                };
                let stop_bits = match &b.stop_bits {
                    None => StopBits::One,
                    Some(v) => match v.get_ref() {
                        1 => StopBits::One,
                        2 => StopBits::Two,
                        _ => return Err(self.at(v, key("stop_bits"), "must be 1 or 2")),
                    },
                };
                let timeout =
                    self.positive(&b.timeout, key("timeout"), Duration::from_millis(100))?;
                let t35 = match &b.t35 {
                    Some(v) => {
                        let t = self.parse_duration(v, key("t35"))?;
                        if t > Duration::from_secs(1) {
                            return Err(self.at(
                                v,
                                key("t35"),
                                "more than 1s of silence between frames cannot be right",
                            ));
                        }
                        Some(t)
                    }
                    None => None,
                };
                let max_registers = match &b.max_registers {
                    Some(v) if *v.get_ref() == 0 || *v.get_ref() > MAX_READ_REGISTERS => {
                        return Err(self.at(
                            v,
                            key("max_registers"),
                            "must be 1 to 125 (Modbus's limit per read)",
                        ))
                    }
                    Some(v) => *v.get_ref(),
                    None => MAX_READ_REGISTERS,
                };
                let max_gap = match &b.max_gap {
                    Some(v) if *v.get_ref() > MAX_READ_REGISTERS => {
                        return Err(self.at(v, key("max_gap"), "must be 0 to 125 registers"))
                    }
                    Some(v) => *v.get_ref(),
                    None => 8,
                };
                BusKind::ModbusRtu(RtuBus {
                    port: port.get_ref().clone(),
                    baud,
                    parity,
                    data_bits,
                    stop_bits,
                    timeout,
                    t35,
                    max_gap,
                    max_registers,
                    backoff_max: self.positive(
                        &b.backoff_max,
                        key("backoff_max"),
                        Duration::from_secs(5),
                    )?,
                })
            }
            "canopen" => {
                misplaced(
                    &[
                        ("port", b.port.is_some()),
                        ("baud", b.baud.is_some()),
                        ("parity", b.parity.is_some()),
                        ("data_bits", b.data_bits.is_some()),
                        ("stop_bits", b.stop_bits.is_some()),
                        ("timeout", b.timeout.is_some()),
                        ("t35", b.t35.is_some()),
                        ("max_gap", b.max_gap.is_some()),
                        ("max_registers", b.max_registers.is_some()),
                    ],
                    "modbus-rtu",
                )?;
                let Some(interface) = &b.interface else {
                    return Err(self.error(
                        table,
                        Some(key("interface")),
                        "a canopen bus needs `interface` (e.g. \"can0\")".into(),
                    ));
                };
                let ifname = interface.get_ref();
                if ifname.is_empty()
                    || ifname.len() > 15
                    || ifname.contains(|c: char| c == '/' || c.is_whitespace() || c == ':')
                {
                    return Err(self.at(
                        interface,
                        key("interface"),
                        "not a network interface name (1-15 characters, no '/', ':' or spaces)",
                    ));
                }
                if let Some(other) = interfaces.insert(ifname.clone(), name.clone()) {
                    return Err(self.at(
                        interface,
                        key("interface"),
                        format!("bus \"{other}\" already uses {ifname}"),
                    ));
                }
                let sync_period = match &b.sync_period {
                    Some(_) => {
                        Some(self.positive(&b.sync_period, key("sync_period"), Duration::ZERO)?)
                    }
                    None => None,
                };
                let rcvbuf = match &b.rcvbuf {
                    Some(v) if *v.get_ref() > 256 * 1024 * 1024 => {
                        return Err(self.at(v, key("rcvbuf"), "must be at most 268435456 bytes"))
                    }
                    Some(v) => *v.get_ref() as usize,
                    // Room for a few thousand frames: a second at 1 Mbit/s line rate, with
                    // the kernel's per-frame overhead (it doubles the value it is given).
                    None => 1024 * 1024,
                };
                BusKind::Canopen(CanBus {
                    interface: ifname.clone(),
                    sync_period,
                    rcvbuf,
                    sdo_timeout: self.positive(
                        &b.sdo_timeout,
                        key("sdo_timeout"),
                        Duration::from_millis(100),
                    )?,
                    backoff_max: self.positive(
                        &b.backoff_max,
                        key("backoff_max"),
                        Duration::from_secs(5),
                    )?,
                })
            }
            other => {
                return Err(self.at(
                    &b.protocol,
                    key("protocol"),
                    format!("unknown protocol \"{other}\"; expected \"modbus-rtu\" or \"canopen\""),
                ))
            }
        };
        Ok(Bus { name, kind })
    }

    fn device(
        &self,
        i: usize,
        raw: S<RawDevice>,
        buses: &[Bus],
        profiles: &BTreeMap<String, Arc<[Field]>>,
        known: &[Device],
        addresses: &mut BTreeMap<(String, DeviceAddress), String>,
    ) -> Result<Device, ConfigError> {
        let key = |k: &str| format!("devices[{i}].{k}");
        let table = raw.span();
        let d = raw.into_inner();
        let name = d.name.get_ref().clone();
        if !topic_safe(&name) {
            return Err(self.at(&d.name, key("name"), TOPIC_SAFE));
        }
        if known.iter().any(|k| k.name == name) {
            return Err(self.at(
                &d.name,
                key("name"),
                format!("device name \"{name}\" is used twice"),
            ));
        }
        let Some(bus) = buses.iter().find(|b| b.name == *d.bus.get_ref()) else {
            let known: Vec<&str> = buses.iter().map(|b| b.name.as_str()).collect();
            return Err(self.at(
                &d.bus,
                key("bus"),
                format!(
                    "no bus named \"{}\" (buses: {})",
                    d.bus.get_ref(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let profile = d.profile.get_ref().clone();
        let address = match &bus.kind {
            BusKind::ModbusRtu(_) => {
                if let Some(n) = &d.node {
                    return Err(self.at(
                        n,
                        key("node"),
                        format!(
                            "`node` is for canopen buses; bus \"{}\" is modbus-rtu, so give `unit`",
                            bus.name
                        ),
                    ));
                }
                let Some(u) = &d.unit else {
                    return Err(self.error(
                        table,
                        Some(key("unit")),
                        "a device on a modbus-rtu bus needs `unit` (1-247)".into(),
                    ));
                };
                if !(1..=247).contains(u.get_ref()) {
                    return Err(self.at(
                        u,
                        key("unit"),
                        format!("{} is not a Modbus unit id: must be 1 to 247", u.get_ref()),
                    ));
                }
                if profile == CIA402 {
                    return Err(self.at(
                        &d.profile,
                        key("profile"),
                        "\"cia402\" is the built-in CANopen profile; a modbus-rtu device needs a [profiles.NAME] register map",
                    ));
                }
                if !profiles.contains_key(&profile) {
                    let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
                    return Err(self.at(
                        &d.profile,
                        key("profile"),
                        format!(
                            "no profile named \"{profile}\" (profiles: {})",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                }
                DeviceAddress::Unit(*u.get_ref() as u8)
            }
            BusKind::Canopen(_) => {
                if let Some(u) = &d.unit {
                    return Err(self.at(
                        u,
                        key("unit"),
                        format!(
                            "`unit` is for modbus-rtu buses; bus \"{}\" is canopen, so give `node`",
                            bus.name
                        ),
                    ));
                }
                let Some(n) = &d.node else {
                    return Err(self.error(
                        table,
                        Some(key("node")),
                        "a device on a canopen bus needs `node` (1-127)".into(),
                    ));
                };
                if !(1..=127).contains(n.get_ref()) {
                    return Err(self.at(
                        n,
                        key("node"),
                        format!("{} is not a CANopen node id: must be 1 to 127", n.get_ref()),
                    ));
                }
                if profile != CIA402 {
                    return Err(self.at(
                        &d.profile,
                        key("profile"),
                        "a device on a canopen bus uses the built-in profile \"cia402\"",
                    ));
                }
                if let Some(t) = &d.timeout {
                    return Err(self.at(t, key("timeout"), "`timeout` is for modbus-rtu devices"));
                }
                if let Some(p) = &d.poll {
                    return Err(self.at(
                        p,
                        key("poll"),
                        "a CANopen drive pushes its TPDOs; `poll` is for modbus-rtu devices \
                         (give objects[].every to read an object over SDO on a schedule)",
                    ));
                }
                if let Some(v) = &d.offline_after {
                    return Err(self.at(
                        v,
                        key("offline_after"),
                        "a CANopen drive goes offline by its heartbeat (1.5 x `heartbeat`)",
                    ));
                }
                DeviceAddress::Node(*n.get_ref() as u8)
            }
        };
        if let Some(other) = addresses.insert((bus.name.clone(), address), name.clone()) {
            let (v, k) = match (&d.unit, &d.node) {
                (Some(u), _) => (u, "unit"),
                (None, Some(n)) => (n, "node"),
                (None, None) => unreachable!("checked above"),
            };
            return Err(self.at(
                v,
                key(k),
                format!(
                    "device \"{other}\" on bus \"{}\" already has {address}",
                    bus.name
                ),
            ));
        }
        let canopen = match &bus.kind {
            BusKind::Canopen(_) => Some(self.can_device(&d, &key)?),
            BusKind::ModbusRtu(_) => {
                let can_only = [
                    ("heartbeat", d.heartbeat.as_ref().map(|v| v.span())),
                    (
                        "configure_heartbeat",
                        d.configure_heartbeat.as_ref().map(|v| v.span()),
                    ),
                    (
                        "tpdos",
                        d.tpdos.as_ref().and_then(|v| v.first()).map(|v| v.span()),
                    ),
                    (
                        "objects",
                        d.objects.as_ref().and_then(|v| v.first()).map(|v| v.span()),
                    ),
                ];
                if let Some((k, span)) = can_only.into_iter().find_map(|(k, s)| Some((k, s?))) {
                    return Err(self.error(
                        span,
                        Some(key(k)),
                        format!(
                            "`{k}` is for devices on canopen buses; bus \"{}\" is modbus-rtu",
                            bus.name
                        ),
                    ));
                }
                None
            }
        };
        let poll = self.positive(&d.poll, key("poll"), Duration::from_millis(100))?;
        let late_after = self.positive(&d.late_after, key("late_after"), poll)?;
        let timeout = match &d.timeout {
            Some(_) => Some(self.positive(&d.timeout, key("timeout"), Duration::ZERO)?),
            None => None,
        };
        let offline_after = match &d.offline_after {
            Some(v) if *v.get_ref() == 0 => {
                return Err(self.at(v, key("offline_after"), "must be at least 1"))
            }
            Some(v) => *v.get_ref(),
            None => 3,
        };
        Ok(Device {
            name,
            bus: bus.name.clone(),
            address,
            profile,
            poll,
            late_after,
            timeout,
            offline_after,
            canopen,
        })
    }

    /// The CANopen part of a device: heartbeat, TPDO mappings, objects and SDO polls.
    fn can_device(
        &self,
        d: &RawDevice,
        key: &dyn Fn(&str) -> String,
    ) -> Result<CanDevice, ConfigError> {
        let heartbeat =
            self.duration(&d.heartbeat, key("heartbeat"), Duration::from_millis(100))?;
        if heartbeat > Duration::from_millis(u64::from(u16::MAX)) {
            let v = d.heartbeat.as_ref().expect("a non-default value");
            return Err(self.at(
                v,
                key("heartbeat"),
                "must be at most 65535ms (object 0x1017 is u16 ms)",
            ));
        }
        let late_after = match &d.late_after {
            Some(_) => Some(self.positive(&d.late_after, key("late_after"), Duration::ZERO)?),
            None => None,
        };
        let tpdos = match &d.tpdos {
            None => None,
            Some(list) => {
                let mut out: Vec<TpdoMapping> = Vec::new();
                for (t, raw) in list.iter().enumerate() {
                    let tkey = |k: &str| key(&format!("tpdos[{t}].{k}"));
                    let r = raw.get_ref();
                    let mut entries = Vec::new();
                    for (e, v) in r.map.get_ref().iter().enumerate() {
                        let entry = u32::try_from(*v.get_ref())
                            .ok()
                            .and_then(MappingEntry::from_u32)
                            .ok_or_else(|| {
                                self.at(
                                    v,
                                    tkey(&format!("map[{e}]")),
                                    "not a mapping entry: write 0xIIIISSLL (index, sub-index, \
                                     length in bits 1-64), e.g. 0x60640020 for 0x6064:00, 32 bits",
                                )
                            })?;
                        entries.push(entry);
                    }
                    let mapping = match (&r.number, &r.cob_id) {
                        (Some(n), None) => {
                            if !(1..=4).contains(n.get_ref()) {
                                return Err(self.at(
                                    n,
                                    tkey("number"),
                                    "must be 1 to 4 (TPDO1-TPDO4 of the predefined connection set)",
                                ));
                            }
                            let node = NodeId::new(
                                *d.node.as_ref().map(|n| n.get_ref()).unwrap_or(&1) as u8,
                            )
                            .unwrap_or(NodeId::new(1).expect("1 is a node id"));
                            TpdoMapping::predefined(node, *n.get_ref() as u8, entries)
                        }
                        (None, Some(c)) => {
                            if !(0x181..=0x57F).contains(c.get_ref()) {
                                return Err(self.at(
                                    c,
                                    tkey("cob_id"),
                                    "must be an 11-bit TPDO COB-ID, 0x181 to 0x57F",
                                ));
                            }
                            TpdoMapping::new(*c.get_ref() as u16, entries)
                        }
                        _ => {
                            return Err(self.error(
                                raw.span(),
                                Some(tkey("number")),
                                "give `number` (1-4) or `cob_id`, one of the two".into(),
                            ))
                        }
                    };
                    let mapping =
                        mapping.map_err(|e| self.at(&r.map, tkey("map"), e.to_string()))?;
                    if out.iter().any(|m| m.cob_id() == mapping.cob_id()) {
                        return Err(self.error(
                            raw.span(),
                            Some(tkey("cob_id")),
                            format!("COB-ID {:#05x} is mapped twice", mapping.cob_id()),
                        ));
                    }
                    out.push(mapping);
                }
                Some(out)
            }
        };
        let mut objects = ObjectTable::cia402();
        let mut polls = Vec::new();
        for (o, raw) in d.objects.iter().flatten().enumerate() {
            let okey = |k: &str| key(&format!("objects[{o}].{k}"));
            let r = raw.get_ref();
            let name = r.name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(self.at(
                    &r.name,
                    okey("name"),
                    "use letters, digits, '-' and '_' only",
                ));
            }
            let builtin = ObjectTable::builtin(name);
            let index = match (&r.index, &builtin) {
                (Some(v), _) => u16::try_from(*v.get_ref())
                    .ok()
                    .filter(|i| *i >= 0x1000)
                    .ok_or_else(|| self.at(v, okey("index"), "must be an object index 0x1000 to 0xFFFF"))?,
                (None, Some(b)) => b.index,
                (None, None) => {
                    return Err(self.error(
                        raw.span(),
                        Some(okey("index")),
                        format!("\"{name}\" is not a cia402 object (statusword, fault_code, mode_display, position, velocity, torque, current): give its `index` and `type`"),
                    ))
                }
            };
            let sub = match &r.sub {
                Some(v) => u8::try_from(*v.get_ref())
                    .map_err(|_| self.at(v, okey("sub"), "must be 0 to 255"))?,
                None => builtin
                    .as_ref()
                    .filter(|b| b.index == index)
                    .map_or(0, |b| b.sub),
            };
            let ty = match (&r.ty, &builtin) {
                (Some(v), _) => ObjType::parse(v.get_ref()).ok_or_else(|| {
                    self.at(v, okey("type"), format!("unknown type \"{}\"; expected bool, i8, i16, i32, i64, u8, u16, u32, u64 or f32", v.get_ref()))
                })?,
                (None, Some(b)) if b.index == index => b.ty,
                (None, _) => {
                    return Err(self.error(raw.span(), Some(okey("type")), "give the object's `type` (e.g. \"i16\")".into()))
                }
            };
            let mut spec = ObjectSpec::new(name, index, sub, ty);
            if let Some(v) = &r.scale {
                if !v.get_ref().is_finite() || *v.get_ref() == 0.0 {
                    return Err(self.at(v, okey("scale"), "must be a finite number other than 0"));
                }
                spec.scale = *v.get_ref();
            }
            if let Some(v) = &r.offset {
                if !v.get_ref().is_finite() {
                    return Err(self.at(v, okey("offset"), "must be a finite number"));
                }
                spec.offset = *v.get_ref();
            }
            spec.unit = r.unit.as_ref().map(|u| u.get_ref().clone());
            if objects.iter().any(|x| {
                x.name == spec.name && ObjectTable::builtin(name).is_none_or(|b| b.index != x.index)
            }) {
                return Err(self.at(
                    &r.name,
                    okey("name"),
                    format!("object \"{name}\" is given twice"),
                ));
            }
            if let Some(every) = &r.every {
                let every = self.positive(&Some(every.clone()), okey("every"), Duration::ZERO)?;
                polls.push(SdoPoll {
                    object: spec.clone(),
                    every,
                });
            }
            objects.insert(spec);
        }
        Ok(CanDevice {
            heartbeat,
            configure_heartbeat: d.configure_heartbeat.as_ref().is_none_or(|v| *v.get_ref()),
            tpdos,
            objects,
            polls,
            late_after,
        })
    }
}

/// toml's messages name Rust types (`expected u32`); say what to write instead.
fn friendly(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, toml) in [
        ("expected u8", "expected an integer 0 to 255"),
        ("expected u16", "expected an integer 0 to 65535"),
        ("expected u32", "expected an integer 0 to 4294967295"),
        ("expected usize", "expected an integer of at least 0"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        (
            "expected a sequence",
            "expected an array of tables (write [[name]] headers)",
        ),
        ("expected a string", "expected a string (in quotes)"),
    ] {
        if let Some(rest) = m.strip_suffix(rust) {
            m = format!("{rest}{toml}");
        }
    }
    m
}

/// `[header]` of a line, if it is one (not `[[array]]`).
fn header(line: &str) -> Option<String> {
    let t = line.trim_start();
    if t.starts_with("[[") {
        return None;
    }
    let rest = t.strip_prefix('[')?;
    let end = rest.find(']')?;
    Some(rest[..end].trim().to_owned())
}

/// `[[array]]` of a line, if it is one.
fn array_header(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("[[")?;
    let end = rest.find("]]")?;
    Some(rest[..end].trim().to_owned())
}

/// A key as it appears in a dotted path: quoted unless bare.
fn dotted(k: &str) -> String {
    if topic_safe(k) {
        k.to_owned()
    } else {
        format!("{k:?}")
    }
}

/// Checks an MQTT url; returns whether it is TLS.
fn check_url(url: &str) -> Result<bool, String> {
    let url = url.trim();
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!(
            "\"{url}\" is not a broker url; expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
        ));
    };
    if rest.contains('@') {
        return Err("credentials do not go in the url; use mqtt.credentials_file".to_owned());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err("a broker url has no path or query: mqtt://HOST[:PORT]".to_owned());
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or("unclosed '[' in an IPv6 address")?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("[{addr}] is not an IPv6 address"));
        }
        match after {
            "" => (addr, None),
            p => (
                addr,
                Some(
                    p.strip_prefix(':')
                        .ok_or("expected ':PORT' after the IPv6 address")?,
                ),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let v6 = rest.starts_with('[');
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || (c == ':' && !v6)) {
        return Err("the url names no host".to_owned());
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("\"{p}\" is not a port (1-65535)")),
        }
    }
    Ok(tls)
}

/// A light check of a log filter: comma-separated `LEVEL` or `TARGET=LEVEL` directives.
/// Span filters (`[...]`) are left to the logger.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if filter.trim().is_empty() {
        return Err("must not be empty; e.g. \"info\" or \"info,servogate_modbus=debug\"".into());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if directive.contains('[') {
            continue;
        }
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        let is_target = !directive.contains('=');
        let ok_level = LEVELS.contains(&level.to_ascii_lowercase().as_str());
        // A bare word that is no level is a target (`servogate` = everything from it).
        if !(ok_level || (is_target && topic_like(level))) {
            return Err(format!(
                "\"{directive}\": the level must be one of trace, debug, info, warn, error, off"
            ));
        }
    }
    Ok(())
}

fn topic_like(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"[gateway]
id = "cell-7"

[profiles.ax]
position = { address = 0x0100, type = "i32", scale = 0.001, unit = "mm" }
dc_bus   = { address = 0x0200, type = "u32", word_order = "low_first", kind = "input" }

[[buses]]
name = "rs485-a"
protocol = "modbus-rtu"
port = "/dev/ttyUSB0"
baud = 115200

[[devices]]
name = "axis-1"
bus = "rs485-a"
unit = 1
profile = "ax"
poll = "10ms"
"#;

    fn good() -> Config {
        parse(GOOD, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        parse(text, Path::new("t.toml")).unwrap_err().to_string()
    }

    /// The 1-based line of the first line of `text` containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn a_good_config_has_its_defaults_filled_in() {
        let c = good();
        assert_eq!(c.gateway.log, "info");
        assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1883");
        assert!(!c.mqtt.tls);
        assert_eq!(c.mqtt.topic_prefix, "servogate/cell-7");
        assert_eq!(c.mqtt.client_id, "servogate-cell-7");
        assert_eq!(c.mqtt.qos, 1);
        assert_eq!(c.mqtt.keep_alive, Duration::from_secs(10));
        assert_eq!(c.mqtt.max_packet_size, 65_536);
        assert_eq!(c.mqtt.reconnect_min, Duration::from_millis(100));
        assert_eq!(c.mqtt.reconnect_max, Duration::from_secs(10));
        assert_eq!(c.mqtt.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.buffer.capacity.get(), 100_000);
        assert_eq!(c.buffer.on_full, OnFull::DropOldest);
        let d = &c.devices[0];
        assert_eq!(d.address, DeviceAddress::Unit(1));
        assert_eq!(d.late_after, Duration::from_millis(10));
        assert_eq!(d.timeout, None);
        assert_eq!(d.offline_after, 3);
        let BusKind::ModbusRtu(r) = &c.buses[0].kind else {
            panic!("not rtu")
        };
        assert_eq!(r.baud, 115_200);
        assert_eq!(r.parity, Parity::None);
        assert_eq!(r.data_bits, DataBits::Eight);
        assert_eq!(r.stop_bits, StopBits::One);
        assert_eq!(r.timeout, Duration::from_millis(100));
        assert_eq!(r.t35, None);
        assert_eq!(r.t35(), Duration::from_micros(1_750));
        assert_eq!((r.max_gap, r.max_registers), (8, 125));
        assert_eq!(r.backoff_max, Duration::from_secs(5));
        assert!(c.metrics.is_none());
    }

    #[test]
    fn profile_fields_keep_their_file_order() {
        let text = GOOD.replace(
            "dc_bus   =",
            "zeta = { address = 9, type = \"u16\" }\nalpha = { address = 8, type = \"u16\" }\ndc_bus   =",
        );
        let c = parse(&text, Path::new("t.toml")).unwrap();
        let names: Vec<&str> = c.profiles["ax"].iter().map(|f| &*f.name).collect();
        assert_eq!(names, ["position", "zeta", "alpha", "dc_bus"]);
    }

    #[test]
    fn low_first_word_order_and_input_kind_reach_the_field() {
        let c = good();
        let dc = c.profiles["ax"]
            .iter()
            .find(|f| &*f.name == "dc_bus")
            .unwrap();
        assert_eq!(dc.kind, RegisterKind::Input);
        assert_eq!(dc.word_order, WordOrder::LowFirst);
        // 0x0001_0002 sent low word first.
        assert_eq!(dc.decode(&[0x0002, 0x0001]).unwrap(), 65_538.0);
        let pos = &c.profiles["ax"][0];
        assert_eq!((pos.address, pos.data_type), (0x0100, DataType::I32));
        assert_eq!(pos.unit.as_deref(), Some("mm"));
        let v = pos.decode(&[0xFFFF, 0xFC18]).unwrap(); // -1000 x 0.001
        assert!((v + 1.0).abs() < 1e-12, "{v}");
    }

    #[test]
    fn every_data_type_and_order_option_reaches_the_decoder() {
        let text = GOOD.replace(
            "dc_bus   =",
            r#"f = { address = 0x10, type = "f32", byte_order = "little" }
b = { address = 0x12, type = "bit", bit = 3 }
q = { address = 0x13, type = "i64", word_order = "low_first", scale = 2, offset = -1 }
dc_bus   ="#,
        );
        let c = parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        let get = |n: &str| {
            c.profiles["ax"]
                .iter()
                .find(|f| &*f.name == n)
                .unwrap()
                .clone()
        };
        let f = get("f");
        let bits = 1.5f32.to_bits();
        let regs = [
            ((bits >> 16) as u16).swap_bytes(),
            (bits as u16).swap_bytes(),
        ];
        assert_eq!(f.decode(&regs).unwrap(), 1.5);
        let b = get("b");
        assert_eq!((b.data_type, b.bit), (DataType::Bool, Some(3)));
        assert_eq!(b.decode(&[0x0008]).unwrap(), 1.0);
        assert_eq!(b.decode(&[0x0100]).unwrap(), 0.0);
        let q = get("q");
        // -3 as i64, low word first: FFFD FFFF FFFF FFFF.
        assert_eq!(q.decode(&[0xFFFD, 0xFFFF, 0xFFFF, 0xFFFF]).unwrap(), -7.0);
    }

    #[test]
    fn an_unknown_key_names_its_line_and_the_key() {
        let text = GOOD.replace("baud = 115200", "baud = 115200\nbaudrate = 9600");
        let e = err(&text);
        let line = line_of(&text, "baudrate");
        assert!(
            e.starts_with(&format!(
                "t.toml:{line}:1: buses[0].baudrate: unknown field `baudrate`"
            )),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_key_inside_an_inline_table_names_the_inner_key() {
        let text = GOOD.replace("unit = \"mm\"", "unit = \"mm\", scael = 2");
        let e = err(&text);
        assert!(e.starts_with("t.toml:5:"), "{e}");
        assert!(
            e.contains("profiles.ax.position.scael: unknown field `scael`"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_table_names_its_line() {
        let text = format!("{GOOD}\n[mqqt]\nurl = \"mqtt://x\"\n");
        let e = err(&text);
        let line = line_of(&text, "[mqqt]");
        assert!(e.starts_with(&format!("t.toml:{line}:")), "{e}");
        assert!(e.contains("mqqt"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_its_line_and_the_key() {
        let e = err(&GOOD.replace("baud = 115200", "baud = \"fast\""));
        assert!(
            e.starts_with("t.toml:12:8: buses[0].baud: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn a_wrong_type_inside_an_inline_table_names_the_inner_key() {
        let e = err(&GOOD.replace("scale = 0.001", "scale = \"tiny\""));
        assert!(e.starts_with("t.toml:5:"), "{e}");
        assert!(e.contains("profiles.ax.position.scale"), "{e}");
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let e = err(&GOOD.replace("unit = 1", "unit = = 1"));
        assert!(e.starts_with("t.toml:17:"), "{e}");
    }

    #[test]
    fn a_missing_key_names_its_table() {
        let text = GOOD.replace("profile = \"ax\"\n", "");
        let e = err(&text);
        let line = line_of(&text, "[[devices]]");
        assert!(e.contains("missing field `profile`"), "{e}");
        assert!(e.starts_with(&format!("t.toml:{line}:")), "{e}");
        assert!(e.contains("devices[0]"), "{e}");
    }

    #[test]
    fn a_missing_gateway_is_an_error_with_a_position() {
        let e = err("[mqtt]\nqos = 1\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
        assert!(e.contains("gateway"), "{e}");
    }

    #[test]
    fn a_device_naming_a_missing_bus_names_the_line() {
        let e = err(&GOOD.replace("bus = \"rs485-a\"", "bus = \"rs485-b\""));
        assert_eq!(
            e,
            "t.toml:16:7: devices[0].bus: no bus named \"rs485-b\" (buses: rs485-a)"
        );
    }

    #[test]
    fn a_device_naming_a_missing_profile_names_the_line() {
        let e = err(&GOOD.replace("profile = \"ax\"", "profile = \"bx\""));
        assert_eq!(
            e,
            "t.toml:18:11: devices[0].profile: no profile named \"bx\" (profiles: ax)"
        );
    }

    #[test]
    fn the_cia402_profile_is_for_canopen_buses_only() {
        let e = err(&GOOD.replace("profile = \"ax\"", "profile = \"cia402\""));
        assert!(
            e.starts_with("t.toml:18:11: devices[0].profile: \"cia402\" is the built-in CANopen"),
            "{e}"
        );
        let can = format!(
            "{GOOD}\n[[buses]]\nname = \"can0\"\nprotocol = \"canopen\"\ninterface = \"can0\"\n\n\
             [[devices]]\nname = \"axis-5\"\nbus = \"can0\"\nnode = 5\nprofile = \"cia402\"\n"
        );
        let c = parse(&can, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.devices[1].address, DeviceAddress::Node(5));
        assert!(c.fields(&c.devices[1]).is_none());
        let e = err(&can.replace(
            "node = 5\nprofile = \"cia402\"",
            "node = 5\nprofile = \"ax\"",
        ));
        assert!(
            e.contains("devices[1].profile: a device on a canopen bus uses the built-in profile"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}\n[profiles.cia402]\nx = {{ address = 0, type = \"u16\" }}\n"
        ));
        assert!(
            e.contains("profiles.cia402: \"cia402\" is the built-in"),
            "{e}"
        );
    }

    #[test]
    fn a_unit_out_of_range_is_refused() {
        let e = err(&GOOD.replace("unit = 1", "unit = 248"));
        assert!(
            e.starts_with(
                "t.toml:17:8: devices[0].unit: 248 is not a Modbus unit id: must be 1 to 247"
            ),
            "{e}"
        );
        let e = err(&GOOD.replace("unit = 1", "unit = 0"));
        assert!(e.starts_with("t.toml:17:8: devices[0].unit:"), "{e}");
        let e = err(&GOOD.replace("unit = 1", "unit = -1"));
        assert!(e.starts_with("t.toml:17:8: devices[0].unit:"), "{e}");
    }

    #[test]
    fn a_bad_duration_names_the_line() {
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = \"often\""));
        assert!(
            e.starts_with("t.toml:19:8: devices[0].poll: \"often\" is not a duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = \"10\""));
        assert!(
            e.starts_with("t.toml:19:8: devices[0].poll: \"10\" is not a duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = \"0s\""));
        assert_eq!(e, "t.toml:19:8: devices[0].poll: must be above zero");
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = 10"));
        assert!(
            e.starts_with("t.toml:19:8: devices[0].poll: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn a_duplicate_device_name_is_refused() {
        let twice = format!("{GOOD}\n[[devices]]\nname = \"axis-1\"\nbus = \"rs485-a\"\nunit = 2\nprofile = \"ax\"\n");
        let e = err(&twice);
        let lines: Vec<&str> = twice.lines().collect();
        let line = lines.iter().rposition(|l| l.contains("axis-1")).unwrap() + 1;
        assert_eq!(
            e,
            format!("t.toml:{line}:8: devices[1].name: device name \"axis-1\" is used twice")
        );
    }

    #[test]
    fn two_devices_with_one_unit_on_a_bus_are_refused() {
        let twice = format!("{GOOD}\n[[devices]]\nname = \"axis-2\"\nbus = \"rs485-a\"\nunit = 1\nprofile = \"ax\"\n");
        let e = err(&twice);
        assert!(
            e.contains("devices[1].unit: device \"axis-1\" on bus \"rs485-a\" already has unit 1"),
            "{e}"
        );
    }

    #[test]
    fn two_buses_on_one_port_are_refused() {
        let text = format!("{GOOD}\n[[buses]]\nname = \"rs485-b\"\nprotocol = \"modbus-rtu\"\nport = \"/dev/ttyUSB0\"\n");
        assert!(err(&text).contains("buses[1].port: bus \"rs485-a\" already uses /dev/ttyUSB0"));
    }

    #[test]
    fn an_unknown_data_type_is_refused_at_its_key() {
        let e = err(&GOOD.replace("type = \"i32\"", "type = \"int\""));
        assert!(e.starts_with("t.toml:5:"), "{e}");
        assert!(
            e.contains("profiles.ax.position.type: unknown type \"int\""),
            "{e}"
        );
    }

    #[test]
    fn a_field_past_the_last_register_is_refused() {
        let e = err(&GOOD.replace("address = 0x0100", "address = 0xFFFF"));
        assert!(
            e.contains("profiles.ax.position.address: 0xffff plus 2 register(s) runs past"),
            "{e}"
        );
        let ok = GOOD.replace(
            "address = 0x0100, type = \"i32\"",
            "address = 0xFFFE, type = \"i32\"",
        );
        parse(&ok, Path::new("t.toml")).unwrap();
    }

    #[test]
    fn statusword_must_be_a_plain_u16() {
        let text = GOOD.replace(
            "dc_bus   =",
            "statusword = { address = 7, type = \"i32\" }\ndc_bus   =",
        );
        assert!(err(&text).contains("profiles.ax.statusword.type: statusword is a 16-bit code"));
        let text = GOOD.replace(
            "dc_bus   =",
            "fault_code = { address = 7, type = \"u16\", scale = 2 }\ndc_bus   =",
        );
        assert!(err(&text).contains("profiles.ax.fault_code.scale: fault_code is a code"));
    }

    #[test]
    fn bit_is_for_bool_fields_only() {
        let e = err(&GOOD.replace("type = \"i32\",", "type = \"i32\", bit = 2,"));
        assert!(
            e.contains("profiles.ax.position.bit: `bit` applies to type = \"bool\" only"),
            "{e}"
        );
        let text = GOOD.replace(
            "dc_bus   =",
            "b = { address = 7, type = \"bool\", bit = 16 }\ndc_bus   =",
        );
        assert!(err(&text).contains("profiles.ax.b.bit: must be 0 to 15"));
    }

    #[test]
    fn mqtt_settings_are_checked() {
        let with = |mqtt: &str| {
            err(&GOOD.replace("[profiles.ax]", &format!("[mqtt]\n{mqtt}\n\n[profiles.ax]")))
        };
        assert!(with("url = \"http://x\"")
            .starts_with("t.toml:5:7: mqtt.url: \"http://x\" is not a broker url"));
        assert!(
            with("url = \"mqtt://u:p@x\"").contains("mqtt.url: credentials do not go in the url")
        );
        assert!(
            with("url = \"mqtts://x\"").contains("mqtt.url: an mqtts:// url needs mqtt.ca_file")
        );
        assert!(
            with("ca_file = \"ca.pem\"").contains("mqtt.ca_file: TLS files need an mqtts:// url")
        );
        assert!(
            with("url = \"mqtts://x\"\nca_file = \"ca\"\ncert_file = \"c\"")
                .contains("mqtt.cert_file: needs mqtt.key_file too")
        );
        assert!(with("topic_prefix = \"a/+/b\"")
            .contains("mqtt.topic_prefix: must not contain the wildcards"));
        assert!(with("topic_prefix = \"a/b/\"")
            .contains("mqtt.topic_prefix: must not start or end with /"));
        assert!(with("qos = 2").contains("mqtt.qos: telemetry QoS must be 0 or 1"));
        assert!(with("reconnect_min = \"20s\"").contains(
            "mqtt.reconnect_min: reconnect_max (10s) must not be below reconnect_min (20s)"
        ));
        assert!(with("keep_alive = \"500ms\"").contains("mqtt.keep_alive:"));
        let ok = GOOD.replace(
            "[profiles.ax]",
            "[mqtt]\nurl = \"mqtts://[::1]:8883\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\ntopic_prefix = \"plant/line-1\"\nqos = 0\n\n[profiles.ax]",
        );
        let c = parse(&ok, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.mqtt.tls);
        assert_eq!(c.mqtt.topic_prefix, "plant/line-1");
        assert_eq!(c.mqtt.qos, 0);
    }

    #[test]
    fn check_url_accepts_hosts_ports_and_ipv6() {
        assert_eq!(check_url("mqtt://localhost"), Ok(false));
        assert_eq!(check_url("mqtt://10.0.0.1:1884/"), Ok(false));
        assert_eq!(check_url("mqtts://[::1]"), Ok(true));
        assert!(check_url("mqtt://host:0").is_err());
        assert!(check_url("mqtt://host:99999").is_err());
        assert!(check_url("mqtt://:1883").is_err());
        assert!(check_url("mqtt://host/path").is_err());
    }

    #[test]
    fn log_filters_are_checked_lightly() {
        assert!(check_log_filter("info").is_ok());
        assert!(check_log_filter("warn,servogate_modbus=debug").is_ok());
        assert!(check_log_filter("servogate").is_ok());
        assert!(check_log_filter("info,servogate=loud").is_err());
        assert!(check_log_filter("").is_err());
    }

    #[test]
    fn a_modbus_key_on_a_canopen_bus_is_refused() {
        let text = format!("{GOOD}\n[[buses]]\nname = \"can0\"\nprotocol = \"canopen\"\ninterface = \"can0\"\nbaud = 500000\n");
        assert!(
            err(&text).contains("buses[1].baud: `baud` belongs to modbus-rtu buses, not canopen")
        );
    }

    #[test]
    fn bus_options_are_checked() {
        let e = err(&GOOD.replace("baud = 115200", "baud = 115200\nparity = \"mark\""));
        assert!(
            e.contains("buses[0].parity: unknown parity \"mark\""),
            "{e}"
        );
        let e = err(&GOOD.replace("baud = 115200", "baud = 115200\nmax_registers = 126"));
        assert!(
            e.contains("buses[0].max_registers: must be 1 to 125"),
            "{e}"
        );
        let e = err(&GOOD.replace("baud = 115200", "baud = 115200\nstop_bits = 3"));
        assert!(e.contains("buses[0].stop_bits: must be 1 or 2"), "{e}");
        let e = err(&GOOD.replace("protocol = \"modbus-rtu\"", "protocol = \"modbus-tcp\""));
        assert!(
            e.contains("buses[0].protocol: unknown protocol \"modbus-tcp\""),
            "{e}"
        );
        let e = err(&GOOD.replace("port = \"/dev/ttyUSB0\"\n", ""));
        assert!(
            e.contains("buses[0].port: a modbus-rtu bus needs `port`"),
            "{e}"
        );
    }

    #[test]
    fn rtu_buses_carry_the_device_and_bus_settings() {
        let text = GOOD
            .replace(
                "baud = 115200",
                "baud = 115200\ntimeout = \"40ms\"\nt35 = \"0ms\"",
            )
            .replace(
                "poll = \"10ms\"",
                "poll = \"10ms\"\ntimeout = \"30ms\"\nlate_after = \"25ms\"",
            );
        let c = parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        let buses = c.rtu_buses();
        assert_eq!(buses.len(), 1);
        let (bus, devices) = &buses[0];
        assert_eq!(bus.t35, Some(Duration::ZERO));
        assert_eq!(&*bus.name, "rs485-a");
        assert_eq!(devices[0].unit, 1);
        assert_eq!(devices[0].timeout, Duration::from_millis(30));
        assert_eq!(devices[0].late_after, Duration::from_millis(25));
        assert_eq!(devices[0].fields.len(), 2);
    }

    #[test]
    fn the_summary_names_the_gateway_broker_buses_and_devices() {
        let s = good().summary();
        assert!(s.contains("gateway cell-7"), "{s}");
        assert!(s.contains("mqtt mqtt://127.0.0.1:1883"), "{s}");
        assert!(
            s.contains("bus rs485-a modbus-rtu /dev/ttyUSB0 115200 baud 8N1"),
            "{s}"
        );
        assert!(
            s.contains("  device axis-1 unit 1 profile ax poll 10ms"),
            "{s}"
        );
        assert!(s.contains("2 reads per poll"), "{s}");
    }

    #[test]
    fn a_file_that_is_not_utf8_or_missing_is_named() {
        let dir = std::env::temp_dir().join(format!("sg-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("latin1.toml");
        std::fs::write(&f, b"[gateway]\nid = \"caf\xe9\"\n").unwrap();
        let e = load(&f).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}:2:10: the file is not valid UTF-8", f.display())
        );
        let missing = dir.join("nope.toml");
        let e = load(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: cannot read the config file:",
                missing.display()
            )),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_errors_never_contain_the_password() {
        let dir = std::env::temp_dir().join(format!("sg-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cred");
        for bad in [
            ":s3cret-pass\n",
            "s3cret-pass\n",
            "user\ns3cret-pass\nmore-s3cret\n",
            "\n\n",
            " \n:s3cret\n",
        ] {
            std::fs::write(&f, bad).unwrap();
            let e = read_credentials(&f).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains(&f.display().to_string()), "{shown}");
        }
        std::fs::write(&f, b"user:s3cret\xff\n").unwrap();
        let e = read_credentials(&f).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("s3cret"));
        std::fs::write(&f, "user:s3cret:pass\n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("user".into(), "s3cret:pass".into())
        );
        std::fs::write(&f, "user\r\npass word\r\n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("user".into(), "pass word".into())
        );
        let e = read_credentials(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
