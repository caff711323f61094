//! Lowering: the validated config turned into the settings the protocol crates take
//! (`servogate_modbus::bus::run_bus`, `servogate_socketcan::run_can_bus`), and the
//! per-device lookups the daemon needs (register map, units for the `meta` topic).

use std::sync::Arc;
use std::time::Duration;

use servogate_canopen::{NodeId, NodeSettings, TpdoSource};
use servogate_modbus::bus::BusSettings;
use servogate_modbus::poll::DeviceSettings;
use servogate_modbus::profile::Field;
use servogate_socketcan::CanBusSettings;

use super::model::{BusKind, Config, Device};

impl Config {
    /// The register map of a Modbus device (`None` for a CANopen device).
    pub fn fields(&self, device: &Device) -> Option<Arc<[Field]>> {
        self.profiles.get(&device.profile).cloned()
    }

    /// Every Modbus bus (RTU, RTU over TCP, TCP) with the settings of its devices, ready for
    /// `servogate_modbus::bus::run_bus`. A bus with no devices is left out.
    pub fn rtu_buses(&self) -> Vec<(BusSettings, Vec<DeviceSettings>)> {
        let mut out = Vec::new();
        for bus in &self.buses {
            let BusKind::Modbus(rtu) = &bus.kind else {
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
                    link: rtu.link.clone(),
                    baud: rtu.baud,
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
                        start_rpdo: c.start_rpdo,
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
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::config::fixture::GOOD;
    use crate::config::parse;

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
}
