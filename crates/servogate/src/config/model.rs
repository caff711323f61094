//! The validated config (the public types `config` re-exports): plain data, durations
//! parsed, defaults filled in, references between sections resolved. Built by
//! `Source::validate` (`source.rs`) and the section files; turned into the protocol crates'
//! settings by `lower.rs` and into `servogate check`'s text by `summary.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use servogate_canopen::pdo::TpdoMapping;
use servogate_canopen::{ObjectTable, SdoPoll};
use servogate_core::OnFull;
pub use servogate_modbus::bus::Link;
use servogate_modbus::profile::Field;
use std::path::PathBuf;

/// A whole, validated config file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (as given to [`load`](super::load) / [`parse`](super::parse)).
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
    /// `[commands]`: gateway-wide command rules.
    pub commands: super::commands::Commands,
    /// `[sparkplug]`: set when `mqtt.contract` is `sparkplug` or `both`.
    pub sparkplug: Option<Sparkplug>,
}

/// `[sparkplug]`: the gateway as a Sparkplug B edge node (DESIGN.md section 10).
#[derive(Debug, Clone, PartialEq)]
pub struct Sparkplug {
    pub group_id: String,
    /// Default `gateway.id`.
    pub edge_node_id: String,
    /// Wait for this host's STATE `online` before NBIRTH.
    pub primary_host_id: Option<String>,
    /// Metric aliases in births and data (unique across the node).
    pub aliases: bool,
    /// Rebirth requests (NCMD) closer together than this make one rebirth.
    pub rebirth_interval: Duration,
    /// Messages a second of data held while the node was away, at most (live data first).
    pub historical_rate: u32,
}

/// What the gateway publishes (`[mqtt] contract`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Contract {
    /// The JSON topics of DESIGN.md section 3 (the default).
    #[default]
    Json,
    /// Sparkplug B only.
    Sparkplug,
    /// Both, each on a connection of its own.
    Both,
}

impl Contract {
    pub fn json(self) -> bool {
        self != Contract::Sparkplug
    }

    pub fn sparkplug(self) -> bool {
        self != Contract::Json
    }
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
    /// Read with [`read_credentials`](super::read_credentials) when the daemon starts.
    pub credentials_file: Option<PathBuf>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub shutdown_grace: Duration,
    /// MQTT 3.1.1 (`version = 3`, the default) or 5.
    pub version: servogate_mqtt::Version,
    /// MQTT 5 topic aliases the forwarder may use (0: none).
    pub topic_aliases: u16,
    pub contract: Contract,
    /// Telemetry samples of one device per message (1: no batching) and how long the
    /// oldest may wait for its batch to fill.
    pub batching: servogate_mqtt::Batching,
}

/// `[buffer]`: the delivery ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub capacity: NonZeroUsize,
    pub on_full: OnFull,
    /// `path` set: the event log on disk behind the ring (DESIGN.md section 9).
    pub log: Option<LogSettings>,
}

/// `[buffer] path` and what goes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub path: std::path::PathBuf,
    pub max_bytes: u64,
    pub max_age: Option<Duration>,
    pub sync: servogate_log::SyncMode,
    pub sync_interval: Duration,
    pub segment_bytes: u64,
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
    /// Modbus RTU on a serial port or over TCP, or Modbus TCP: one link, one task.
    Modbus(ModbusBus),
    /// CiA 402 drives on a SocketCAN interface.
    Canopen(CanBus),
}

impl BusKind {
    /// `"modbus-rtu"`, `"modbus-rtu-tcp"`, `"modbus-tcp"` or `"canopen"`, as written in
    /// the file.
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::Modbus(m) => m.link.protocol(),
            Self::Canopen(_) => "canopen",
        }
    }
}

/// A Modbus bus: one serial port or one TCP connection, owned by one task.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusBus {
    /// The port and its serial settings, or the address (and `max_in_flight`).
    pub link: Link,
    /// The RS-485 line's baud rate (modbus-rtu and modbus-rtu-tcp).
    pub baud: u32,
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

impl ModbusBus {
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
    /// The RPDO (1..=512) group moves start the drive through.
    pub start_rpdo: Option<u16>,
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
    /// `[devices.commands]`; `None`: the device takes no command.
    pub commands: Option<servogate_command::Policy>,
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
}
