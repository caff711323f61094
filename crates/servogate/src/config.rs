//! The configuration file (DESIGN.md section 6): parsed, then validated as a whole before
//! anything opens a port.
//!
//! Every error names the file, line, column and key (`servogate.toml:41:7:
//! devices[2].bus: no bus named "rs485-b"`). Parsing goes through `serde` with
//! `deny_unknown_fields` into raw structs whose values keep their byte spans
//! (`toml::Spanned`); the checks that serde cannot do (references, ranges, durations)
//! turn those spans into positions. toml's own messages say what is wrong but not under
//! which key, so the key path is recovered from the text around the span.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use servogate_core::OnFull;
use servogate_modbus::plan::MAX_READ_REGISTERS;
use servogate_modbus::profile::{ByteOrder, DataType, Field, RegisterKind, WordOrder};
use tokio_serial::{DataBits, Parity, StopBits};
use toml::Spanned;

/// A config error, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place in the file.
    pub position: Option<(usize, usize)>,
    /// The key path, e.g. `devices[2].bus`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// The validated config.

#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: Gateway,
    pub mqtt: Mqtt,
    pub buffer: Buffer,
    /// Modbus register maps by name.
    pub profiles: BTreeMap<String, Arc<[Field]>>,
    pub buses: Vec<Bus>,
    pub devices: Vec<Device>,
    pub metrics: Option<Metrics>,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub id: String,
    pub log: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Mqtt {
    pub url: String,
    pub topic_prefix: String,
    /// QoS of telemetry (0 or 1); everything else goes at QoS 1.
    pub qos: u8,
    pub client_id: String,
    pub keep_alive: Duration,
    pub max_packet_size: usize,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub credentials_file: Option<PathBuf>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct Buffer {
    pub capacity: NonZeroUsize,
    pub on_full: OnFull,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub kind: BusKind,
}

#[derive(Debug, Clone)]
pub enum BusKind {
    ModbusRtu(RtuBus),
    Canopen(CanBus),
}

#[derive(Debug, Clone)]
pub struct RtuBus {
    pub port: PathBuf,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: DataBits,
    pub stop_bits: StopBits,
    /// Per-request timeout (a device may override it).
    pub timeout: Duration,
    /// Inter-frame silence override; `None` = 3.5 characters at `baud`.
    pub t35: Option<Duration>,
    pub max_gap: u16,
    pub max_registers: u16,
    /// Longest back-off of an offline device, and of reopening a failed port.
    pub backoff_max: Duration,
}

#[derive(Debug, Clone)]
pub struct CanBus {
    pub interface: String,
    pub sync_period: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceAddress {
    /// Modbus unit id, 1-247.
    Unit(u8),
    /// CANopen node id, 1-127.
    Node(u8),
}

#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub bus: String,
    pub address: DeviceAddress,
    pub profile: String,
    pub poll: Duration,
    pub late_after: Duration,
    /// Overrides the bus's request timeout.
    pub timeout: Option<Duration>,
    pub offline_after: u32,
}

impl Device {
    /// The Modbus unit id (0 for a CANopen device).
    pub fn unit(&self) -> u8 {
        match self.address {
            DeviceAddress::Unit(u) => u,
            DeviceAddress::Node(_) => 0,
        }
    }
}

/// The profile name reserved for CiA 402 drives on CANopen.
pub const CIA402: &str = "cia402";

impl Config {
    /// What `servogate check` prints.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "gateway {}\nmqtt {} (topics {}/...)\nbuffer {} events, {}\n",
            self.gateway.id,
            self.mqtt.url,
            self.mqtt.topic_prefix,
            self.buffer.capacity,
            match self.buffer.on_full {
                OnFull::DropOldest => "drop_oldest",
                OnFull::DropNewest => "drop_newest",
            }
        );
        for bus in &self.buses {
            match &bus.kind {
                BusKind::ModbusRtu(r) => s.push_str(&format!(
                    "bus {} modbus-rtu {} {} baud, timeout {:?}\n",
                    bus.name,
                    r.port.display(),
                    r.baud,
                    r.timeout
                )),
                BusKind::Canopen(c) => {
                    s.push_str(&format!("bus {} canopen {}\n", bus.name, c.interface))
                }
            }
            for d in self.devices.iter().filter(|d| d.bus == bus.name) {
                let addr = match d.address {
                    DeviceAddress::Unit(u) => format!("unit {u}"),
                    DeviceAddress::Node(n) => format!("node {n}"),
                };
                let fields = self.profiles.get(&d.profile).map_or(0, |f| f.len());
                s.push_str(&format!(
                    "  device {} {addr} profile {} ({fields} fields) poll {:?}\n",
                    d.name, d.profile, d.poll
                ));
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------------------
// Raw, as written.

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    buffer: RawBuffer,
    #[serde(default)]
    profiles: BTreeMap<String, BTreeMap<String, S<RawField>>>,
    #[serde(default)]
    buses: Vec<RawBus>,
    #[serde(default)]
    devices: Vec<RawDevice>,
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
    scale: Option<f64>,
    offset: Option<f64>,
    unit: Option<String>,
    min: Option<f64>,
    max: Option<f64>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: S<String>,
    bus: S<String>,
    unit: Option<S<u32>>,
    node: Option<S<u32>>,
    profile: S<String>,
    poll: Option<S<String>>,
    late_after: Option<S<String>>,
    timeout: Option<S<String>>,
    offline_after: Option<S<u32>>,
}

// ---------------------------------------------------------------------------------------
// Loading.

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        position: None,
        key: None,
        message: format!("cannot read the file: {e}"),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        Source::new(path, "").error_at_offset(
            &String::from_utf8_lossy(&e.into_bytes()),
            at,
            "the file is not UTF-8",
        )
    })?;
    parse(&text, path)
}

/// Validates `text`, naming `file` in errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let src = Source::new(file, text);
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end().to_owned();
        match e.span() {
            Some(span) => src.error(span, &message),
            None => src.plain(&message),
        }
    })?;
    src.validate(raw)
}

/// Reads an MQTT credentials file: `username:password` on one line, or the username and
/// the password on two lines. Errors never contain the password.
pub fn read_credentials(path: &Path) -> Result<(String, String), ConfigError> {
    let fail = |message: String| ConfigError {
        file: path.to_owned(),
        position: None,
        key: Some("mqtt.credentials_file".into()),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let (user, pass) = match lines.as_slice() {
        [one] => one
            .split_once(':')
            .ok_or_else(|| fail("expected `username:password` on one line".into()))?,
        [user, pass] => (*user, *pass),
        _ => return Err(fail("expected `username:password`, or two lines".into())),
    };
    if user.trim().is_empty() {
        return Err(fail("the username is empty".into()));
    }
    Ok((
        user.trim().to_owned(),
        pass.trim_end_matches(['\r', '\n']).to_owned(),
    ))
}

/// The text being validated, for turning spans into positions and key paths.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl<'a> Source<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        Self { file, text }
    }

    fn plain(&self, message: &str) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            position: None,
            key: None,
            message: message.to_owned(),
        }
    }

    fn error_at_offset(&self, text: &str, at: usize, message: &str) -> ConfigError {
        let before = &text.as_bytes()[..at.min(text.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        ConfigError {
            file: self.file.to_owned(),
            position: Some((line, col)),
            key: None,
            message: message.to_owned(),
        }
    }

    /// An error at `span`, with the key path found from the text.
    fn error(&self, span: Range<usize>, message: &str) -> ConfigError {
        let mut e = self.error_at_offset(self.text, span.start, message);
        e.key = self.key_at(span.start);
        e
    }

    fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(value.span(), &message.into())
    }

    /// The dotted key path of the item at byte `offset`: the enclosing `[table]` or
    /// `[[array]]` header (with the array index) and the key before the nearest `=`.
    fn key_at(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        let head = &self.text[..offset];
        // The table header above the offset, and how many [[same]] came before it.
        let mut table = String::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for line in head.split('\n') {
            let t = line.trim();
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
                let name = name.trim().to_owned();
                let n = counts.entry(name.clone()).or_insert(0);
                table = format!("{name}[{n}]");
                *n += 1;
            } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
                table = name.trim().to_owned();
            }
        }
        // The key: on the offset's line, the key the offset points at, or the last
        // `key =` left of it; inside an inline table, both the outer and the inner key.
        let line_begin = head.rfind('\n').map_or(0, |p| p + 1);
        let line = &self.text[line_begin..];
        let line = &line[..line.find('\n').unwrap_or(line.len())];
        let rel = offset - line_begin;
        let clean = |k: &str| k.trim().trim_matches(['"', '\'']).to_owned();
        let mut keys: Vec<String> = Vec::new();
        if !line.trim_start().starts_with('[') {
            if let Some((outer, _)) = line.split_once('=') {
                keys.push(clean(outer));
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
        for k in keys {
            if k.is_empty() {
                continue;
            }
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
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
                self.at(
                    v,
                    format!(
                        "`{}` is not a duration ({e}); write e.g. \"10ms\" or \"1.5s\"",
                        v.get_ref()
                    ),
                )
            }),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        // [gateway]
        let id = raw.gateway.id.get_ref().clone();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.at(
                &raw.gateway.id,
                "use letters, digits, '-' and '_' only (it goes into MQTT topics)",
            ));
        }
        let log = raw.gateway.log.map(|l| l.into_inner());

        // [mqtt]
        let m = raw.mqtt;
        let url = match &m.url {
            Some(u) => {
                let s = u.get_ref();
                let rest = s
                    .strip_prefix("mqtt://")
                    .or_else(|| s.strip_prefix("mqtts://"));
                let ok = rest.is_some_and(|r| {
                    let (host, port) = r.rsplit_once(':').unwrap_or((r, "1883"));
                    !host.is_empty() && !r.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    return Err(self.at(u, "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"));
                }
                s.clone()
            }
            None => "mqtt://127.0.0.1:1883".to_owned(),
        };
        let tls = url.starts_with("mqtts://");
        let topic_prefix = match &m.topic_prefix {
            Some(p) => {
                let s = p.get_ref();
                if s.is_empty() || s.contains(['+', '#']) || s.ends_with('/') || s.starts_with('/')
                {
                    return Err(self.at(
                        p,
                        "a topic prefix must not be empty, contain + or #, or start or end with /",
                    ));
                }
                s.clone()
            }
            None => format!("servogate/{id}"),
        };
        let qos = match &m.qos {
            Some(q) if *q.get_ref() > 1 => return Err(self.at(q, "telemetry QoS must be 0 or 1")),
            Some(q) => *q.get_ref(),
            None => 1,
        };
        let max_packet_size = match &m.max_packet_size {
            Some(v) if *v.get_ref() < 1024 || *v.get_ref() > 268_435_455 => {
                return Err(self.at(v, "must be 1024 to 268435455 bytes"))
            }
            Some(v) => *v.get_ref(),
            None => 65_536,
        };
        for (name, file) in [
            ("ca_file", &m.ca_file),
            ("cert_file", &m.cert_file),
            ("key_file", &m.key_file),
        ] {
            if let (Some(f), false) = (file, tls) {
                return Err(self.at(f, format!("{name} needs an mqtts:// url")));
            }
        }
        match (&m.cert_file, &m.key_file) {
            (Some(c), None) => return Err(self.at(c, "cert_file needs key_file too")),
            (None, Some(k)) => return Err(self.at(k, "key_file needs cert_file too")),
            _ => {}
        }
        if let (true, None) = (tls, &m.ca_file) {
            if let Some(u) = &m.url {
                return Err(self.at(u, "an mqtts:// url needs mqtt.ca_file (the CA that signed the broker's certificate)"));
            }
        }
        let reconnect_min = self.duration(&m.reconnect_min, Duration::from_millis(100))?;
        let reconnect_max = self.duration(&m.reconnect_max, Duration::from_secs(10))?;
        if reconnect_max < reconnect_min {
            if let Some(v) = &m.reconnect_max {
                return Err(self.at(v, "must not be below reconnect_min"));
            }
        }
        let keep_alive = self.duration(&m.keep_alive, Duration::from_secs(10))?;
        if keep_alive < Duration::from_secs(1) {
            if let Some(v) = &m.keep_alive {
                return Err(self.at(v, "must be at least 1s"));
            }
        }
        let mqtt = Mqtt {
            client_id: m
                .client_id
                .map_or_else(|| format!("servogate-{id}"), |c| c.into_inner()),
            url,
            topic_prefix,
            qos,
            keep_alive,
            max_packet_size,
            ca_file: m.ca_file.map(|f| f.into_inner()),
            cert_file: m.cert_file.map(|f| f.into_inner()),
            key_file: m.key_file.map(|f| f.into_inner()),
            credentials_file: m.credentials_file.map(|f| f.into_inner()),
            reconnect_min,
            reconnect_max,
            shutdown_grace: self.duration(&m.shutdown_grace, Duration::from_secs(5))?,
        };

        // [buffer]
        let capacity = match &raw.buffer.capacity {
            Some(c) => match NonZeroUsize::new(*c.get_ref()) {
                Some(n) if n.get() <= 10_000_000 => n,
                _ => return Err(self.at(c, "must be 1 to 10000000 events")),
            },
            None => NonZeroUsize::new(100_000).expect("non-zero"),
        };
        let on_full = match &raw.buffer.on_full {
            None => OnFull::DropOldest,
            Some(v) => match v.get_ref().as_str() {
                "drop_oldest" => OnFull::DropOldest,
                "drop_newest" => OnFull::DropNewest,
                _ => return Err(self.at(v, "expected \"drop_oldest\" or \"drop_newest\"")),
            },
        };

        // [profiles.*]
        let mut profiles = BTreeMap::new();
        for (pname, fields) in raw.profiles {
            if pname == CIA402 {
                let span = fields.values().next().map(|f| f.span());
                let msg = "`cia402` is the built-in CANopen profile; choose another name";
                return Err(match span {
                    Some(s) => self.error(s, msg),
                    None => self.plain(msg),
                });
            }
            let mut out = Vec::new();
            for (fname, f) in fields {
                out.push(self.field(&fname, f)?);
            }
            profiles.insert(pname, Arc::from(out));
        }

        // [[buses]]
        let mut buses = Vec::new();
        let mut bus_names = BTreeSet::new();
        for b in raw.buses {
            let name = b.name.get_ref().clone();
            if name.is_empty() || !bus_names.insert(name.clone()) {
                return Err(self.at(&b.name, format!("bus name `{name}` is empty or used twice")));
            }
            let kind = match b.protocol.get_ref().as_str() {
                "modbus-rtu" => {
                    for (key, set) in [
                        ("interface", b.interface.is_some()),
                        ("sync_period", b.sync_period.is_some()),
                    ] {
                        if set {
                            return Err(self.at(
                                &b.protocol,
                                format!("`{key}` belongs to canopen buses, not modbus-rtu"),
                            ));
                        }
                    }
                    let Some(port) = b.port else {
                        return Err(self.at(
                            &b.name,
                            "a modbus-rtu bus needs `port` (e.g. \"/dev/ttyUSB0\")",
                        ));
                    };
                    let baud = match &b.baud {
                        Some(v) if !(300..=4_000_000).contains(v.get_ref()) => {
                            return Err(self.at(v, "baud must be 300 to 4000000"))
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
                            _ => return Err(self.at(v, "expected \"none\", \"even\" or \"odd\"")),
                        },
                    };
                    let data_bits = match b.data_bits.as_ref().map(|v| (*v.get_ref(), v)) {
                        None | Some((8, _)) => DataBits::Eight,
                        Some((7, _)) => DataBits::Seven,
                        Some((_, v)) => return Err(self.at(v, "data_bits must be 7 or 8")),
                    };
                    let stop_bits = match b.stop_bits.as_ref().map(|v| (*v.get_ref(), v)) {
                        None | Some((1, _)) => StopBits::One,
                        Some((2, _)) => StopBits::Two,
                        Some((_, v)) => return Err(self.at(v, "stop_bits must be 1 or 2")),
                    };
                    let timeout = self.duration(&b.timeout, Duration::from_millis(100))?;
                    if timeout.is_zero() {
                        return Err(self.at(
                            b.timeout.as_ref().expect("set"),
                            "a zero timeout would fail every request",
                        ));
                    }
                    let t35 = match &b.t35 {
                        Some(_) => Some(self.duration(&b.t35, Duration::ZERO)?),
                        None => None,
                    };
                    let max_registers = match &b.max_registers {
                        Some(v) if *v.get_ref() == 0 || *v.get_ref() > MAX_READ_REGISTERS => {
                            return Err(self.at(v, "max_registers must be 1 to 125"))
                        }
                        Some(v) => *v.get_ref(),
                        None => MAX_READ_REGISTERS,
                    };
                    BusKind::ModbusRtu(RtuBus {
                        port: port.into_inner(),
                        baud,
                        parity,
                        data_bits,
                        stop_bits,
                        timeout,
                        t35,
                        max_gap: b.max_gap.map_or(8, |v| v.into_inner()),
                        max_registers,
                        backoff_max: self.duration(&b.backoff_max, Duration::from_secs(5))?,
                    })
                }
                "canopen" => {
                    let rtu_keys = [
                        ("port", b.port.is_some()),
                        ("baud", b.baud.is_some()),
                        ("parity", b.parity.is_some()),
                        ("data_bits", b.data_bits.is_some()),
                        ("stop_bits", b.stop_bits.is_some()),
                        ("t35", b.t35.is_some()),
                        ("max_gap", b.max_gap.is_some()),
                        ("max_registers", b.max_registers.is_some()),
                    ];
                    for (key, set) in rtu_keys {
                        if set {
                            return Err(self.at(
                                &b.protocol,
                                format!("`{key}` belongs to modbus-rtu buses, not canopen"),
                            ));
                        }
                    }
                    let Some(interface) = b.interface else {
                        return Err(
                            self.at(&b.name, "a canopen bus needs `interface` (e.g. \"can0\")")
                        );
                    };
                    let sync_period = match &b.sync_period {
                        Some(_) => Some(self.duration(&b.sync_period, Duration::ZERO)?),
                        None => None,
                    };
                    BusKind::Canopen(CanBus {
                        interface: interface.into_inner(),
                        sync_period,
                    })
                }
                other => {
                    return Err(self.at(
                        &b.protocol,
                        format!(
                            "unknown protocol `{other}`; expected \"modbus-rtu\" or \"canopen\""
                        ),
                    ))
                }
            };
            buses.push(Bus { name, kind });
        }

        // [[devices]]
        let mut devices = Vec::new();
        let mut device_names = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for d in raw.devices {
            let name = d.name.get_ref().clone();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(self.at(
                    &d.name,
                    "use letters, digits, '-' and '_' only (it goes into MQTT topics)",
                ));
            }
            if !device_names.insert(name.clone()) {
                return Err(self.at(&d.name, format!("device name `{name}` is used twice")));
            }
            let Some(bus) = buses.iter().find(|b| b.name == *d.bus.get_ref()) else {
                let known: Vec<&str> = buses.iter().map(|b| b.name.as_str()).collect();
                return Err(self.at(
                    &d.bus,
                    format!(
                        "no bus named \"{}\" (buses: {})",
                        d.bus.get_ref(),
                        known.join(", ")
                    ),
                ));
            };
            let profile = d.profile.get_ref().clone();
            let address = match &bus.kind {
                BusKind::ModbusRtu(_) => {
                    if let Some(n) = &d.node {
                        return Err(self.at(
                            n,
                            "`node` is for canopen buses; a modbus-rtu device has `unit`",
                        ));
                    }
                    let Some(u) = &d.unit else {
                        return Err(self.at(&d.name, "a modbus-rtu device needs `unit` (1-247)"));
                    };
                    if !(1..=247).contains(u.get_ref()) {
                        return Err(self.at(u, "unit must be 1 to 247"));
                    }
                    if !profiles.contains_key(&profile) {
                        let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
                        return Err(self.at(
                            &d.profile,
                            format!(
                                "no profile named \"{profile}\" (profiles: {})",
                                known.join(", ")
                            ),
                        ));
                    }
                    DeviceAddress::Unit(*u.get_ref() as u8)
                }
                BusKind::Canopen(_) => {
                    if let Some(u) = &d.unit {
                        return Err(self.at(
                            u,
                            "`unit` is for modbus-rtu buses; a canopen device has `node`",
                        ));
                    }
                    let Some(n) = &d.node else {
                        return Err(self.at(&d.name, "a canopen device needs `node` (1-127)"));
                    };
                    if !(1..=127).contains(n.get_ref()) {
                        return Err(self.at(n, "node must be 1 to 127"));
                    }
                    if profile != CIA402 {
                        return Err(self.at(
                            &d.profile,
                            "canopen devices use the built-in profile \"cia402\"",
                        ));
                    }
                    DeviceAddress::Node(*n.get_ref() as u8)
                }
            };
            if !addresses.insert((bus.name.clone(), address)) {
                let span = d
                    .unit
                    .as_ref()
                    .or(d.node.as_ref())
                    .map(|s| s.span())
                    .unwrap_or(d.name.span());
                return Err(self.error(
                    span,
                    &format!("another device on bus {} has this address", bus.name),
                ));
            }
            let poll = self.duration(&d.poll, Duration::from_millis(100))?;
            if poll.is_zero() {
                return Err(self.at(d.poll.as_ref().expect("set"), "poll must be above zero"));
            }
            let late_after = self.duration(&d.late_after, poll)?;
            let timeout = match &d.timeout {
                Some(_) => Some(self.duration(&d.timeout, Duration::ZERO)?),
                None => None,
            };
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(self.at(
                    d.timeout.as_ref().expect("set"),
                    "a zero timeout would fail every request",
                ));
            }
            let offline_after = match &d.offline_after {
                Some(v) if *v.get_ref() == 0 => return Err(self.at(v, "must be at least 1")),
                Some(v) => *v.get_ref(),
                None => 3,
            };
            devices.push(Device {
                name,
                bus: bus.name.clone(),
                address,
                profile,
                poll,
                late_after,
                timeout,
                offline_after,
            });
        }

        let metrics =
            match raw.metrics {
                None => None,
                Some(m) => Some(Metrics {
                    listen: m.listen.get_ref().parse().map_err(|_| {
                        self.at(&m.listen, "expected IP:PORT, e.g. \"127.0.0.1:9898\"")
                    })?,
                }),
            };

        Ok(Config {
            gateway: Gateway { id, log },
            mqtt,
            buffer: Buffer { capacity, on_full },
            profiles,
            buses,
            devices,
            metrics,
        })
    }

    fn field(&self, name: &str, f: S<RawField>) -> Result<Field, ConfigError> {
        let span = f.span();
        let f = f.into_inner();
        let Some(data_type) = DataType::parse(f.data_type.get_ref()) else {
            return Err(self.at(
                &f.data_type,
                format!(
                    "unknown type `{}`; expected u16, i16, u32, i32, f32, u64, i64, f64 or bool",
                    f.data_type.get_ref()
                ),
            ));
        };
        let mut field = Field::new(name, 0, data_type);
        let address = *f.address.get_ref();
        if address + u32::from(data_type.registers()) > 65_536 {
            return Err(self.at(&f.address, "the field runs past register 65535"));
        }
        field.address = address as u16;
        if let Some(k) = &f.kind {
            field.kind = match k.get_ref().as_str() {
                "holding" => RegisterKind::Holding,
                "input" => RegisterKind::Input,
                _ => return Err(self.at(k, "expected \"holding\" or \"input\"")),
            };
        }
        if let Some(w) = &f.word_order {
            field.word_order = match w.get_ref().as_str() {
                "high_first" => WordOrder::HighFirst,
                "low_first" => WordOrder::LowFirst,
                _ => return Err(self.at(w, "expected \"high_first\" or \"low_first\"")),
            };
        }
        if let Some(b) = &f.byte_order {
            field.byte_order = match b.get_ref().as_str() {
                "big" => ByteOrder::Big,
                "little" => ByteOrder::Little,
                _ => return Err(self.at(b, "expected \"big\" or \"little\"")),
            };
        }
        if let Some(bit) = &f.bit {
            if data_type != DataType::Bool {
                return Err(self.at(bit, "`bit` applies to type = \"bool\" only"));
            }
            if *bit.get_ref() > 15 {
                return Err(self.at(bit, "bit must be 0 to 15"));
            }
            field.bit = Some(*bit.get_ref());
        }
        for (key, v) in [
            ("scale", f.scale),
            ("offset", f.offset),
            ("min", f.min),
            ("max", f.max),
        ] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(self.error(span.clone(), &format!("{key} must be a finite number")));
            }
        }
        field.scale = f.scale.unwrap_or(1.0);
        field.offset = f.offset.unwrap_or(0.0);
        if field.scale == 0.0 {
            return Err(self.error(span, "scale must not be 0"));
        }
        field.unit = f.unit;
        field.min = f.min;
        field.max = f.max;
        Ok(field)
    }
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

    fn err(text: &str) -> String {
        parse(text, Path::new("t.toml")).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_has_its_defaults_filled_in() {
        let c = parse(GOOD, Path::new("t.toml")).unwrap();
        assert_eq!(c.mqtt.topic_prefix, "servogate/cell-7");
        assert_eq!(c.mqtt.qos, 1);
        assert_eq!(c.devices[0].late_after, Duration::from_millis(10));
        assert_eq!(c.devices[0].address, DeviceAddress::Unit(1));
        let BusKind::ModbusRtu(r) = &c.buses[0].kind else {
            panic!()
        };
        assert_eq!(r.timeout, Duration::from_millis(100));
        assert_eq!(r.t35, None);
    }

    #[test]
    fn low_first_word_order_reaches_the_decoder() {
        let c = parse(GOOD, Path::new("t.toml")).unwrap();
        let dc = c.profiles["ax"]
            .iter()
            .find(|f| &*f.name == "dc_bus")
            .unwrap();
        assert_eq!(dc.kind, RegisterKind::Input);
        // 0x0001_0002 written low word first.
        assert_eq!(dc.decode(&[0x0002, 0x0001]).unwrap(), 65538.0);
    }

    #[test]
    fn an_unknown_key_names_its_line_and_the_key() {
        let e = err(&GOOD.replace("baud = 115200", "baud = 115200\nbaudrate = 9600"));
        assert!(
            e.starts_with("t.toml:13:1: buses[0].baudrate: unknown field `baudrate`"),
            "{e}"
        );
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
        assert!(
            e.starts_with("t.toml:18:11: devices[0].profile: no profile named \"bx\""),
            "{e}"
        );
    }

    #[test]
    fn a_unit_out_of_range_is_refused() {
        let e = err(&GOOD.replace("unit = 1", "unit = 248"));
        assert!(
            e.starts_with("t.toml:17:8: devices[0].unit: unit must be 1 to 247"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_duration_names_the_line() {
        let e = err(&GOOD.replace("poll = \"10ms\"", "poll = \"often\""));
        assert!(
            e.starts_with("t.toml:19:8: devices[0].poll: `often` is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn a_duplicate_device_name_is_refused() {
        let twice = format!("{GOOD}\n[[devices]]\nname = \"axis-1\"\nbus = \"rs485-a\"\nunit = 2\nprofile = \"ax\"\n");
        let e = err(&twice);
        assert!(
            e.contains("devices[1].name: device name `axis-1` is used twice"),
            "{e}"
        );
    }

    #[test]
    fn two_devices_with_one_unit_on_a_bus_are_refused() {
        let twice = format!("{GOOD}\n[[devices]]\nname = \"axis-2\"\nbus = \"rs485-a\"\nunit = 1\nprofile = \"ax\"\n");
        assert!(err(&twice).contains("devices[1].unit: another device"));
    }

    #[test]
    fn an_unknown_data_type_is_refused_at_its_key() {
        let e = err(&GOOD.replace("type = \"i32\"", "type = \"int\""));
        assert!(
            e.contains("profiles.ax.position.type: unknown type `int`"),
            "{e}"
        );
    }

    #[test]
    fn credentials_errors_never_contain_the_password() {
        let dir = std::env::temp_dir().join(format!("sg-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cred");
        std::fs::write(&f, ":s3cret-pass\n").unwrap();
        let e = read_credentials(&f).unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::write(&f, "user:s3cret:pass\n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("user".into(), "s3cret:pass".into())
        );
        std::fs::write(&f, "user\npass word\n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("user".into(), "pass word".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
