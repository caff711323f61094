//! `[[devices]]`: each device's name, bus, address (a Modbus unit or a CANopen node,
//! by the bus's protocol), profile and poll timing, with their defaults. The CANopen
//! part of a device (heartbeat, TPDOs, objects) is checked in `can_device.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use servogate_modbus::profile::Field;

use super::model::{Bus, BusKind, Device, DeviceAddress, Link, CIA402};
use super::raw::{RawDevice, S};
use super::source::{topic_safe, Source, TOPIC_SAFE};
use super::ConfigError;

/// Poll period of a Modbus device.
const DEFAULT_POLL: Duration = Duration::from_millis(100);
/// Consecutive failed polls before a Modbus device is `offline`.
const DEFAULT_OFFLINE_AFTER: u32 = 3;

impl Source<'_> {
    /// `[[devices]]`, in file order, against the buses and profiles already checked.
    pub(super) fn devices(
        &self,
        raw: Vec<S<RawDevice>>,
        buses: &[Bus],
        profiles: &BTreeMap<String, Arc<[Field]>>,
    ) -> Result<Vec<Device>, ConfigError> {
        let mut devices: Vec<Device> = Vec::new();
        let mut addresses: BTreeMap<(String, DeviceAddress), String> = BTreeMap::new();
        for (i, d) in raw.into_iter().enumerate() {
            let device = self.device(i, d, buses, profiles, &devices, &mut addresses)?;
            devices.push(device);
        }
        Ok(devices)
    }

    /// One `[[devices]]` entry (`i` its index, `known` the devices before it): name, bus,
    /// address, profile and timing here, the CANopen part in `can_device`.
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
            BusKind::Modbus(_) => {
                if let Some(n) = &d.node {
                    return Err(self.at(
                        n,
                        key("node"),
                        format!(
                            "`node` is for canopen buses; bus \"{}\" is {}, so give `unit`",
                            bus.name,
                            bus.kind.protocol()
                        ),
                    ));
                }
                // Modbus TCP carries a unit id of 0-255 (a drive of its own often wants 255
                // or 0, one behind a gateway its RS-485 id); on a serial line 0 is the
                // broadcast and 248-255 are reserved.
                let (tcp, range) = match &bus.kind {
                    BusKind::Modbus(m) if matches!(m.link, Link::Tcp { .. }) => (true, "0 to 255"),
                    _ => (false, "1 to 247"),
                };
                let Some(u) = &d.unit else {
                    return Err(self.error(
                        table,
                        Some(key("unit")),
                        format!(
                            "a device on a {} bus needs `unit` ({range})",
                            bus.kind.protocol()
                        ),
                    ));
                };
                let ok = if tcp {
                    (0..=255).contains(u.get_ref())
                } else {
                    (1..=247).contains(u.get_ref())
                };
                if !ok {
                    return Err(self.at(
                        u,
                        key("unit"),
                        format!("{} is not a Modbus unit id: must be {range}", u.get_ref()),
                    ));
                }
                if profile == CIA402 {
                    return Err(self.at(
                        &d.profile,
                        key("profile"),
                        "\"cia402\" is the built-in CANopen profile; a Modbus device needs a [profiles.NAME] register map",
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
                            "`unit` is for Modbus buses; bus \"{}\" is canopen, so give `node`",
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
                    return Err(self.at(t, key("timeout"), "`timeout` is for Modbus devices"));
                }
                if let Some(p) = &d.poll {
                    return Err(self.at(
                        p,
                        key("poll"),
                        "a CANopen drive pushes its TPDOs; `poll` is for Modbus devices \
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
            BusKind::Modbus(_) => {
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
                    ("start_rpdo", d.start_rpdo.as_ref().map(|v| v.span())),
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
                            "`{k}` is for devices on canopen buses; bus \"{}\" is {}",
                            bus.name,
                            bus.kind.protocol()
                        ),
                    ));
                }
                None
            }
        };
        let poll = self.positive(&d.poll, key("poll"), DEFAULT_POLL)?;
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
            None => DEFAULT_OFFLINE_AFTER,
        };
        let commands = match d.commands {
            None => None,
            Some(raw) => {
                let target = match &canopen {
                    Some(c) => Some(super::commands::Target::Canopen(&c.objects)),
                    None => profiles
                        .get(&profile)
                        .map(|f| super::commands::Target::Modbus(&f[..])),
                };
                Some(self.command_policy(raw, &key, target, poll)?)
            }
        };
        Ok(Device {
            commands,
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
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::fixture::{err, GOOD};
    use crate::config::{parse, DeviceAddress};

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
    fn start_rpdo_is_an_rpdo_number_of_a_canopen_device() {
        let can = format!(
            "{GOOD}\n[[buses]]\nname = \"can0\"\nprotocol = \"canopen\"\ninterface = \"can0\"\n\n\
             [[devices]]\nname = \"axis-5\"\nbus = \"can0\"\nnode = 5\nprofile = \"cia402\"\nstart_rpdo = 1\n"
        );
        let c = parse(&can, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.devices[1].canopen.as_ref().unwrap().start_rpdo, Some(1));
        let e = err(&can.replace("start_rpdo = 1", "start_rpdo = 513"));
        assert!(
            e.contains("devices[1].start_rpdo: must be an RPDO number 1..=512"),
            "{e}"
        );
        let e = err(&GOOD.replace("unit = 1", "unit = 1\nstart_rpdo = 1"));
        assert!(
            e.contains("devices[0].start_rpdo: `start_rpdo` is for devices on canopen buses"),
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
}
