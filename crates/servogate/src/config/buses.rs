//! `[[buses]]`: Modbus RTU serial lines and CANopen SocketCAN interfaces, with their
//! defaults. The raw bus is one flat struct (see `raw.rs`), so a key of the other
//! protocol is refused here by name. One task owns each port or interface: two buses
//! on one are refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use servogate_modbus::plan::MAX_READ_REGISTERS;
use tokio_serial::{DataBits, Parity, StopBits};

use super::model::{Bus, BusKind, CanBus, RtuBus};
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
                        DEFAULT_BACKOFF_MAX,
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
                    format!("unknown protocol \"{other}\"; expected \"modbus-rtu\" or \"canopen\""),
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
}
