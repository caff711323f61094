//! What `servogate check` prints: one line per section, bus and device, from the
//! validated config (`check` runs the same validation as `run`).

use std::fmt::Write as _;
use std::time::Duration;

use servogate_core::OnFull;
use servogate_modbus::plan::ReadPlan;
use tokio_serial::{DataBits, Parity, StopBits};

use super::model::{BusKind, Config, Link};

impl Config {
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
            "mqtt {} as {} (MQTT {}{}{}), topics {}/..., telemetry qos {}{}{}",
            m.url,
            m.client_id,
            m.version.as_str(),
            if m.topic_aliases > 0 {
                format!(", up to {} topic aliases", m.topic_aliases)
            } else {
                String::new()
            },
            if m.batching.on() {
                format!(
                    ", telemetry in batches of up to {} samples per device, waiting at most {}",
                    m.batching.max,
                    d(m.batching.wait)
                )
            } else {
                String::new()
            },
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
        if let Some(sp) = &self.sparkplug {
            let _ = writeln!(
                s,
                "sparkplug B edge node {g}/{n} ({json}): births on spBv1.0/{g}/NBIRTH/{n}, \
                 each device on spBv1.0/{g}/DDATA/{n}/<device>, commands on DCMD; {aliases}{host}",
                g = sp.group_id,
                n = sp.edge_node_id,
                json = if m.contract.json() {
                    "beside the JSON topics"
                } else {
                    "instead of the JSON topics"
                },
                aliases = if sp.aliases {
                    "metric aliases on"
                } else {
                    "metric names in every message"
                },
                host = sp
                    .primary_host_id
                    .as_ref()
                    .map_or(String::new(), |h| format!(
                        "; waits for primary host {h} (spBv1.0/STATE/{h}) before its birth"
                    )),
            );
        }
        let _ = writeln!(
            s,
            "buffer {} events, {}",
            self.buffer.capacity,
            match self.buffer.on_full {
                OnFull::DropOldest => "drop_oldest",
                OnFull::DropNewest => "drop_newest",
            }
        );
        if let Some(log) = &self.buffer.log {
            let _ = writeln!(
                s,
                "event log {} (at most {} bytes{}, segments of {} bytes, sync {})",
                log.path.display(),
                log.max_bytes,
                log.max_age
                    .map_or(String::new(), |a| format!(", {} old", d(a))),
                log.segment_bytes,
                match log.sync {
                    servogate_log::SyncMode::Batch =>
                        format!("batch every {}", d(log.sync_interval)),
                    servogate_log::SyncMode::Always => "always".to_owned(),
                    servogate_log::SyncMode::Never => "never".to_owned(),
                },
            );
        }
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
                BusKind::Modbus(r) => {
                    let link = match &r.link {
                        Link::Serial {
                            port,
                            parity,
                            data_bits,
                            stop_bits,
                        } => format!(
                            "modbus-rtu {} {} baud {}{}{}",
                            port.display(),
                            r.baud,
                            match data_bits {
                                DataBits::Seven => 7,
                                _ => 8,
                            },
                            match parity {
                                Parity::Even => 'E',
                                Parity::Odd => 'O',
                                Parity::None => 'N',
                            },
                            match stop_bits {
                                StopBits::Two => 2,
                                StopBits::One => 1,
                            },
                        ),
                        Link::RtuOverTcp { address } => {
                            format!("modbus-rtu-tcp {address} (line {} baud)", r.baud)
                        }
                        Link::Tcp {
                            address,
                            max_in_flight,
                        } => format!("modbus-tcp {address}, {max_in_flight} in flight"),
                    };
                    let t35 = match r.link {
                        Link::Tcp { .. } => String::new(),
                        _ => format!(
                            ", t3.5 {}{}",
                            d(r.t35()),
                            if r.t35.is_some() { " (set)" } else { "" }
                        ),
                    };
                    let _ = writeln!(s, "bus {} {link}, timeout {}{t35}", bus.name, d(r.timeout),);
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
                    (BusKind::Modbus(r), Some(fields)) => {
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
                        "  device {} {} profile {} heartbeat {}, tpdos {}, late after {}, {} sdo poll{}{}",
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
                        c.start_rpdo.map_or(String::new(), |n| format!(", group moves start by RPDO {n} + SYNC")),
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
                if let Some(p) = &dev.commands {
                    let _ = writeln!(
                        s,
                        "    commands: allow {}; writable {}; {}{}{}",
                        if p.allow.is_empty() {
                            "nothing".to_owned()
                        } else {
                            p.allow.join(", ")
                        },
                        if p.writable.is_empty() {
                            "nothing".to_owned()
                        } else {
                            p.writable.join(", ")
                        },
                        p.max_age
                            .map_or("no max_age".to_owned(), |a| format!("max_age {}", d(a))),
                        p.max_rate
                            .map(|r| format!(", max_rate {r}/s"))
                            .unwrap_or_default(),
                        if p.require_fresh {
                            format!(", fresh within {}", d(p.stale_after))
                        } else {
                            String::new()
                        },
                    );
                }
            }
            if !any {
                let _ = writeln!(s, "  (no devices)");
            }
        }
        if let Some(metrics) = &self.metrics {
            let _ = writeln!(s, "metrics on {}", metrics.listen);
        }
        let taking = self.devices.iter().filter(|d| d.commands.is_some()).count();
        let _ = writeln!(
            s,
            "commands: {taking} device{} take commands{}, max clock skew {}",
            if taking == 1 { "" } else { "s" },
            if self.commands.key.is_some() {
                ", signed (HMAC-SHA256)"
            } else {
                ""
            },
            d(self.commands.rules.max_clock_skew),
        );
        s.truncate(s.trim_end().len());
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::good;

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
        assert!(s.contains("commands: 0 devices take commands"), "{s}");
    }

    #[test]
    fn the_summary_names_a_tcp_bus_by_protocol_and_address() {
        use crate::config::fixture::GOOD;
        use crate::config::parse;
        let tcp = GOOD
            .replace("protocol = \"modbus-rtu\"", "protocol = \"modbus-tcp\"")
            .replace(
                "port = \"/dev/ttyUSB0\"",
                "address = \"10.0.0.7:502\"\nmax_in_flight = 4",
            )
            .replace("baud = 115200\n", "");
        let s = parse(&tcp, "t.toml".as_ref()).unwrap().summary();
        assert!(
            s.contains("bus rs485-a modbus-tcp 10.0.0.7:502, 4 in flight, timeout 100ms\n"),
            "{s}"
        );
        let rtu_tcp = GOOD
            .replace("protocol = \"modbus-rtu\"", "protocol = \"modbus-rtu-tcp\"")
            .replace("port = \"/dev/ttyUSB0\"", "address = \"nport:4001\"");
        let s = parse(&rtu_tcp, "t.toml".as_ref()).unwrap().summary();
        assert!(
            s.contains("bus rs485-a modbus-rtu-tcp nport:4001 (line 115200 baud), timeout 100ms, t3.5 1ms 750us"),
            "{s}"
        );
    }
}
