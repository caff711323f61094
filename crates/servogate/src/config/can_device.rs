//! The CANopen part of a `[[devices]]` entry on a canopen bus: heartbeat, TPDO mappings
//! (`tpdos`), and `objects` (the `cia402` objects with the file's scales and units, the
//! file's own objects, and SDO polls), with their defaults.

use std::time::Duration;

use servogate_canopen::pdo::{MappingEntry, TpdoMapping};
use servogate_canopen::{NodeId, ObjType, ObjectSpec, ObjectTable, SdoPoll};

use super::model::CanDevice;
use super::raw::RawDevice;
use super::source::Source;
use super::ConfigError;

/// The drive's heartbeat producer time (object 0x1017).
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(100);
/// Write the heartbeat time into the drive at start-up.
const DEFAULT_CONFIGURE_HEARTBEAT: bool = true;

impl Source<'_> {
    /// The CANopen part of a device: heartbeat, TPDO mappings, objects and SDO polls.
    pub(super) fn can_device(
        &self,
        d: &RawDevice,
        key: &dyn Fn(&str) -> String,
    ) -> Result<CanDevice, ConfigError> {
        let heartbeat = self.duration(&d.heartbeat, key("heartbeat"), DEFAULT_HEARTBEAT)?;
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
        let start_rpdo = match &d.start_rpdo {
            Some(v) if !(1..=512).contains(v.get_ref()) => {
                return Err(self.at(
                    v,
                    key("start_rpdo"),
                    "must be an RPDO number 1..=512 (RPDO1 is 0x1400/0x1600)",
                ))
            }
            Some(v) => Some(*v.get_ref() as u16),
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
            configure_heartbeat: d
                .configure_heartbeat
                .as_ref()
                .map_or(DEFAULT_CONFIGURE_HEARTBEAT, |v| *v.get_ref()),
            tpdos,
            objects,
            polls,
            late_after,
            start_rpdo,
        })
    }
}
