//! `[[buses]]`: Modbus RTU serial lines and CANopen SocketCAN interfaces, with their
//! defaults. The raw bus is one flat struct (see `raw.rs`), so a key of the other
//! protocol is refused here by name. One task owns each port or interface: two buses
//! on one are refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use servogate_modbus::plan::MAX_READ_REGISTERS;
use tokio_serial::{DataBits, Parity, StopBits};

use super::model::{Bus, BusKind, CanBus, Link, ModbusBus};
use super::raw::{RawBus, S};
use super::source::{topic_safe, Source};
use super::ConfigError;

// modbus-rtu
const DEFAULT_BAUD: u32 = 19_200;
const DEFAULT_PARITY: Parity = Parity::None;
const DEFAULT_DATA_BITS: DataBits = DataBits::Eight;
const DEFAULT_STOP_BITS: StopBits = StopBits::One;
/// Per-request timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Largest hole (registers) a merged read may span.
const DEFAULT_MAX_GAP: u16 = 8;
/// Most registers per read: Modbus's own limit.
const DEFAULT_MAX_REGISTERS: u16 = MAX_READ_REGISTERS;

/// Requests outstanding at once on one Modbus TCP connection: servers commonly queue
/// 4 to 16; more buys nothing with one request per device at a time.
const MAX_IN_FLIGHT: i64 = 32;

// canopen
/// Room for a few thousand frames: a second at 1 Mbit/s line rate, with the kernel's
/// per-frame overhead (it doubles the value it is given).
const DEFAULT_RCVBUF: usize = 1024 * 1024;
const DEFAULT_SDO_TIMEOUT: Duration = Duration::from_millis(100);

// both
/// modbus-rtu: longest back-off of an offline device and of reopening the port;
/// canopen: longest wait between attempts to open a missing interface.
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Source<'_> {
    /// `[[buses]]`, in file order.
    pub(super) fn buses(&self, raw: Vec<S<RawBus>>) -> Result<Vec<Bus>, ConfigError> {
        let mut buses: Vec<Bus> = Vec::new();
        let mut ports: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut interfaces: BTreeMap<String, String> = BTreeMap::new();
        for (i, b) in raw.into_iter().enumerate() {
            let bus = self.bus(i, b, &buses, &mut ports, &mut interfaces)?;
            buses.push(bus);
        }
        Ok(buses)
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
        let protocol = b.protocol.get_ref().as_str();
        let kind = match protocol {
            "modbus-rtu" | "modbus-rtu-tcp" | "modbus-tcp" => {
                misplaced(
                    &[
                        ("interface", b.interface.is_some()),
                        ("sync_period", b.sync_period.is_some()),
                        ("rcvbuf", b.rcvbuf.is_some()),
                        ("sdo_timeout", b.sdo_timeout.is_some()),
                    ],
                    "canopen",
                )?;
                let serial = protocol == "modbus-rtu";
                if serial {
                    misplaced(
                        &[
                            ("address", b.address.is_some()),
                            ("max_in_flight", b.max_in_flight.is_some()),
                        ],
                        "modbus-tcp and modbus-rtu-tcp",
                    )?;
                } else {
                    // The serial settings of a device server's line are the server's.
                    misplaced(
                        &[
                            ("port", b.port.is_some()),
                            ("parity", b.parity.is_some()),
                            ("data_bits", b.data_bits.is_some()),
                            ("stop_bits", b.stop_bits.is_some()),
                        ],
                        "modbus-rtu",
                    )?;
                }
                if protocol == "modbus-tcp" {
                    misplaced(
                        &[("baud", b.baud.is_some()), ("t35", b.t35.is_some())],
                        "modbus-rtu and modbus-rtu-tcp",
                    )?;
                } else if let Some(m) = &b.max_in_flight {
                    return Err(self.at(
                        m,
                        key("max_in_flight"),
                        "RTU has one request on the line at a time; `max_in_flight` is for modbus-tcp",
                    ));
                }
                let port = if serial {
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
                    Some(port.get_ref().clone())
                } else {
                    None
                };
                let address = if serial {
                    None
                } else {
                    let Some(address) = &b.address else {
                        return Err(self.error(
                            table,
                            Some(key("address")),
                            format!("a {protocol} bus needs `address` (e.g. \"192.168.10.20:502\")"),
                        ));
                    };
                    let a = address.get_ref();
                    let port_ok = a
                        .rsplit_once(':')
                        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
                    if !port_ok || a.contains(char::is_whitespace) {
                        return Err(self.at(
                            address,
                            key("address"),
                            format!("\"{a}\" is not host:port (e.g. \"192.168.10.20:502\" or \"nport-1.cell-b:4001\")"),
                        ));
                    }
                    // One task owns each connection: two buses to one server would
                    // interleave on its line (RTU) or split its in-flight budget (TCP).
                    if let Some(other) = ports.insert(PathBuf::from(format!("tcp:{a}")), name.clone()) {
                        return Err(self.at(
                            address,
                            key("address"),
                            format!(
                                "bus \"{other}\" already connects to {a}; put every device behind \
                                 that address on one bus (give each its `unit`)"
                            ),
                        ));
                    }
                    Some(a.clone())
                };
                let baud = match &b.baud {
                    Some(v) if !(300..=4_000_000).contains(v.get_ref()) => {
                        return Err(self.at(v, key("baud"), "must be 300 to 4000000"))
                    }
                    Some(v) => *v.get_ref(),
                    None => DEFAULT_BAUD,
                };
                let parity = match &b.parity {
                    None => DEFAULT_PARITY,
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
                    None => DEFAULT_DATA_BITS,
                    Some(v) => match v.get_ref() {
                        8 => DataBits::Eight,
                        7 => DataBits::Seven,
                        _ => return Err(self.at(v, key("data_bits"), "must be 7 or 8")),
                    },
                };
                let stop_bits = match &b.stop_bits {
                    None => DEFAULT_STOP_BITS,
                    Some(v) => match v.get_ref() {
                        1 => StopBits::One,
                        2 => StopBits::Two,
                        _ => return Err(self.at(v, key("stop_bits"), "must be 1 or 2")),
                    },
                };
                let timeout = self.positive(&b.timeout, key("timeout"), DEFAULT_TIMEOUT)?;
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
                    None => DEFAULT_MAX_REGISTERS,
                };
                let max_gap = match &b.max_gap {
                    Some(v) if *v.get_ref() > MAX_READ_REGISTERS => {
                        return Err(self.at(v, key("max_gap"), "must be 0 to 125 registers"))
                    }
                    Some(v) => *v.get_ref(),
                    None => DEFAULT_MAX_GAP,
                };
                let link = match (port, address) {
                    (Some(port), _) => Link::Serial {
                        port,
                        parity,
                        data_bits,
                        stop_bits,
                    },
                    (None, Some(address)) if protocol == "modbus-rtu-tcp" => {
                        Link::RtuOverTcp { address }
                    }
                    (None, address) => Link::Tcp {
                        address: address.unwrap_or_default(),
                        max_in_flight: match &b.max_in_flight {
                            Some(v) if !(1..=MAX_IN_FLIGHT).contains(v.get_ref()) => {
                                return Err(self.at(
                                    v,
                                    key("max_in_flight"),
                                    format!("must be 1 to {MAX_IN_FLIGHT}"),
                                ))
                            }
                            Some(v) => *v.get_ref() as u16,
                            None => 1,
                        },
                    },
                };
                BusKind::Modbus(ModbusBus {
                    link,
                    baud,
                    timeout,
                    t35,
                    max_gap,
                    max_registers,
                    backoff_max: self.positive(
                        &b.backoff_max,
                        key("backoff_max"),
                        DEFAULT_BACKOFF_MAX,
                    )?,
                })
            }
            "canopen" => {
                misplaced(
                    &[
                        ("port", b.port.is_some()),
                        ("address", b.address.is_some()),
                        ("max_in_flight", b.max_in_flight.is_some()),
                        ("baud", b.baud.is_some()),
                        ("parity", b.parity.is_some()),
                        ("data_bits", b.data_bits.is_some()),
                        ("stop_bits", b.stop_bits.is_some()),
                        ("timeout", b.timeout.is_some()),
                        ("t35", b.t35.is_some()),
                        ("max_gap", b.max_gap.is_some()),
                        ("max_registers", b.max_registers.is_some()),
                    ],
                    "Modbus",
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
                    None => DEFAULT_RCVBUF,
                };
                BusKind::Canopen(CanBus {
                    interface: ifname.clone(),
                    sync_period,
                    rcvbuf,
                    sdo_timeout: self.positive(
                        &b.sdo_timeout,
                        key("sdo_timeout"),
                        DEFAULT_SDO_TIMEOUT,
                    )?,
                    backoff_max: self.positive(
                        &b.backoff_max,
                        key("backoff_max"),
                        DEFAULT_BACKOFF_MAX,
                    )?,
                })
            }
            other => {
                return Err(self.at(
                    &b.protocol,
                    key("protocol"),
                    format!("unknown protocol \"{other}\"; expected \"modbus-rtu\", \"modbus-rtu-tcp\", \"modbus-tcp\" or \"canopen\""),
                ))
            }
        };
        Ok(Bus { name, kind })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::{err, GOOD};

    #[test]
    fn two_buses_on_one_port_are_refused() {
        let text = format!("{GOOD}\n[[buses]]\nname = \"rs485-b\"\nprotocol = \"modbus-rtu\"\nport = \"/dev/ttyUSB0\"\n");
        assert!(err(&text).contains("buses[1].port: bus \"rs485-a\" already uses /dev/ttyUSB0"));
    }

    #[test]
    fn a_modbus_key_on_a_canopen_bus_is_refused() {
        let text = format!("{GOOD}\n[[buses]]\nname = \"can0\"\nprotocol = \"canopen\"\ninterface = \"can0\"\nbaud = 500000\n");
        assert!(err(&text).contains("buses[1].baud: `baud` belongs to Modbus buses, not canopen"));
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
        let e = err(&GOOD.replace("protocol = \"modbus-rtu\"", "protocol = \"modbus-ascii\""));
        assert!(
            e.contains("buses[0].protocol: unknown protocol \"modbus-ascii\""),
            "{e}"
        );
        let e = err(&GOOD.replace("port = \"/dev/ttyUSB0\"\n", ""));
        assert!(
            e.contains("buses[0].port: a modbus-rtu bus needs `port`"),
            "{e}"
        );
    }

    /// GOOD's serial bus turned into one over TCP: `port` and its serial settings out,
    /// `extra` in.
    fn over_tcp(protocol: &str, extra: &str) -> String {
        let mut lines: Vec<String> = Vec::new();
        for l in GOOD.lines() {
            match l {
                l if l.starts_with("protocol = \"modbus-rtu\"") => {
                    lines.push(format!("protocol = \"{protocol}\"\n{extra}"))
                }
                l if l.starts_with("port =") || l.starts_with("parity") => {}
                l if protocol == "modbus-tcp"
                    && (l.starts_with("baud") || l.starts_with("t35")) => {}
                l => lines.push(l.to_owned()),
            }
        }
        lines.join("\n")
    }

    #[test]
    fn modbus_tcp_and_rtu_over_tcp_buses_take_an_address() {
        use crate::config::{parse, BusKind, Link};
        let cfg = parse(
            &over_tcp(
                "modbus-tcp",
                "address = \"10.0.0.7:502\"\nmax_in_flight = 8",
            ),
            "t.toml".as_ref(),
        )
        .unwrap();
        let BusKind::Modbus(m) = &cfg.buses[0].kind else {
            panic!("not modbus")
        };
        assert_eq!(
            m.link,
            Link::Tcp {
                address: "10.0.0.7:502".into(),
                max_in_flight: 8
            }
        );
        let cfg = parse(
            &over_tcp("modbus-rtu-tcp", "address = \"nport-1.cell-b:4001\""),
            "t.toml".as_ref(),
        )
        .unwrap();
        let BusKind::Modbus(m) = &cfg.buses[0].kind else {
            panic!("not modbus")
        };
        assert_eq!(
            m.link,
            Link::RtuOverTcp {
                address: "nport-1.cell-b:4001".into()
            }
        );
        assert_eq!(m.baud, 115_200, "the line behind the server");
        let tcp = over_tcp("modbus-tcp", "address = \"10.0.0.7:502\"");
        let cfg = parse(&tcp, "t.toml".as_ref()).unwrap();
        let BusKind::Modbus(m) = &cfg.buses[0].kind else {
            panic!("not modbus")
        };
        assert!(
            matches!(
                m.link,
                Link::Tcp {
                    max_in_flight: 1,
                    ..
                }
            ),
            "default 1"
        );
    }

    #[test]
    fn tcp_bus_mistakes_name_their_key() {
        let cases = [
            (over_tcp("modbus-tcp", ""), "buses[0].address: a modbus-tcp bus needs `address`"),
            (
                over_tcp("modbus-tcp", "address = \"10.0.0.7\""),
                "buses[0].address: \"10.0.0.7\" is not host:port",
            ),
            (
                over_tcp("modbus-tcp", "address = \"10.0.0.7:502\"\nmax_in_flight = 0"),
                "buses[0].max_in_flight: must be 1 to 32",
            ),
            (
                over_tcp("modbus-tcp", "address = \"10.0.0.7:502\"\nbaud = 9600"),
                "buses[0].baud: `baud` belongs to modbus-rtu and modbus-rtu-tcp buses, not modbus-tcp",
            ),
            (
                over_tcp("modbus-rtu-tcp", "address = \"10.0.0.7:4001\"\nmax_in_flight = 2"),
                "buses[0].max_in_flight: RTU has one request on the line at a time",
            ),
            (
                over_tcp("modbus-rtu-tcp", "address = \"10.0.0.7:4001\"\nparity = \"even\""),
                "buses[0].parity: `parity` belongs to modbus-rtu buses, not modbus-rtu-tcp",
            ),
            (
                GOOD.replace("port = \"/dev/ttyUSB0\"", "port = \"/dev/ttyUSB0\"\naddress = \"a:1\""),
                "buses[0].address: `address` belongs to modbus-tcp and modbus-rtu-tcp buses, not modbus-rtu",
            ),
            (
                format!(
                    "{}\n[[buses]]\nname = \"b\"\nprotocol = \"modbus-tcp\"\naddress = \"10.0.0.7:502\"\n",
                    over_tcp("modbus-tcp", "address = \"10.0.0.7:502\"")
                ),
                "buses[1].address: bus \"rs485-a\" already connects to 10.0.0.7:502",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "want {want:?}, got {e}");
        }
    }
}
