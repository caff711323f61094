//! A drive as a Sparkplug device: which metrics it has, of which type, with which unit
//! (DESIGN.md section 10). A field's metric name is its name in the profile; a scaled
//! field is a Double (its value keeps its scaled meaning), an unscaled integer register
//! or object keeps its integer type, a bit is a Boolean; `state` (the CiA 402 state) and
//! `quality` are Strings. Unit, scale and offset go into the metric's properties.

use std::sync::Arc;

use servogate_core::{Quality, Telemetry};

use crate::node::{BirthMetric, Value};
use crate::proto::{DataType, PropertySet};

/// What a field's raw value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw {
    /// A float register or object.
    Float,
    /// An integer of `bits` bits.
    Int {
        bits: u8,
        signed: bool,
    },
    Bool,
}

/// One field of a device, as the protocol side describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub name: Arc<str>,
    pub raw: Raw,
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
}

/// The metric names every device has besides its fields.
pub const STATE: &str = "state";
pub const QUALITY: &str = "quality";

impl MetricSpec {
    fn scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }

    /// The Sparkplug type of the field's published value.
    pub fn datatype(&self) -> DataType {
        match self.raw {
            Raw::Bool => DataType::Boolean,
            Raw::Float => DataType::Double,
            Raw::Int { .. } if self.scaled() => DataType::Double,
            Raw::Int { bits, signed } => match (bits, signed) {
                (0..=8, true) => DataType::Int8,
                (9..=16, true) => DataType::Int16,
                (17..=32, true) => DataType::Int32,
                (_, true) => DataType::Int64,
                (0..=8, false) => DataType::UInt8,
                (9..=16, false) => DataType::UInt16,
                (17..=32, false) => DataType::UInt32,
                (_, false) => DataType::UInt64,
            },
        }
    }

    /// A published (scaled) value as this metric's type.
    pub fn value(&self, v: f64) -> Value {
        match self.datatype() {
            DataType::Boolean => Value::Bool(v != 0.0),
            t @ (DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64) => {
                Value::Int(v as i64, t)
            }
            t @ (DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64) => {
                Value::UInt(v as u64, t)
            }
            _ => Value::Double(v),
        }
    }

    fn properties(&self) -> Option<PropertySet> {
        let mut ps = PropertySet::default();
        if let Some(u) = &self.unit {
            ps.push_string("engUnit", u);
        }
        if self.scaled() {
            ps.push_double("scale", self.scale);
            ps.push_double("offset", self.offset);
        }
        (!ps.keys.is_empty()).then_some(ps)
    }
}

fn quality_str(q: &Quality) -> &'static str {
    if q.is_good() {
        "good"
    } else {
        "uncertain"
    }
}

/// The metrics of one sample, by name: every field present, then `state` and `quality`.
/// A field without a spec (not in the profile) goes as a Double. The names are borrowed
/// (no allocation per metric: this runs for every sample).
pub fn sample_values<'a>(specs: &'a [MetricSpec], t: &'a Telemetry) -> Vec<(&'a str, Value)> {
    let spec = |name: &str| specs.iter().find(|s| &*s.name == name);
    let mut out = Vec::with_capacity(t.values.len() + 9);
    let canonical = [
        ("position", t.position),
        ("velocity", t.velocity),
        ("torque", t.torque),
        ("current", t.current),
        ("temperature", t.temperature),
        ("statusword", t.statusword.map(f64::from)),
        ("fault_code", t.fault_code.map(f64::from)),
    ];
    for (name, v) in canonical {
        if let Some(v) = v {
            let value = spec(name).map_or(Value::Double(v), |s| s.value(v));
            out.push((name, value));
        }
    }
    // The profile's other fields come in profile order, as the specs are: look the next
    // one up first.
    let mut at = 0;
    for (name, v) in &t.values {
        let found = specs[at.min(specs.len())..]
            .iter()
            .position(|s| s.name == *name)
            .map(|i| at + i)
            .or_else(|| specs.iter().position(|s| s.name == *name));
        let value = match found {
            Some(i) => {
                at = i + 1;
                specs[i].value(*v)
            }
            None => Value::Double(*v),
        };
        out.push((&**name, value));
    }
    if let Some(state) = t.state {
        out.push((STATE, Value::Str(state.as_str().to_owned())));
    }
    out.push((QUALITY, Value::Str(quality_str(&t.quality).to_owned())));
    out
}

/// The DBIRTH metrics of a device: every field (with the last sample's value, or null),
/// `state` and `quality`.
pub fn birth_metrics(specs: &[MetricSpec], last: Option<&Telemetry>) -> Vec<BirthMetric> {
    let current: Vec<(&str, Value)> = last.map(|t| sample_values(specs, t)).unwrap_or_default();
    let now = |name: &str| {
        current
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    };
    let mut out: Vec<BirthMetric> = specs
        .iter()
        .map(|s| BirthMetric {
            name: s.name.to_string(),
            datatype: s.datatype(),
            value: now(&s.name),
            properties: s.properties(),
        })
        .collect();
    for name in [STATE, QUALITY] {
        out.push(BirthMetric {
            name: name.to_owned(),
            datatype: DataType::String,
            value: now(name),
            properties: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use servogate_core::DriveState;

    const I16: Raw = Raw::Int {
        bits: 16,
        signed: true,
    };
    const I32: Raw = Raw::Int {
        bits: 32,
        signed: true,
    };
    const U16: Raw = Raw::Int {
        bits: 16,
        signed: false,
    };

    fn spec(name: &str, raw: Raw, scale: f64, unit: Option<&str>) -> MetricSpec {
        MetricSpec {
            name: Arc::from(name),
            raw,
            scale,
            offset: 0.0,
            unit: unit.map(str::to_owned),
        }
    }

    #[test]
    fn a_scaled_field_is_a_double_an_unscaled_register_keeps_its_integer_type() {
        let pos = spec("position", I32, 0.001, Some("mm"));
        assert_eq!(pos.datatype(), DataType::Double);
        assert_eq!(pos.value(12.345), Value::Double(12.345));
        let sw = spec("statusword", U16, 1.0, None);
        assert_eq!(sw.datatype(), DataType::UInt16);
        assert_eq!(
            sw.value(0x0237 as f64),
            Value::UInt(0x0237, DataType::UInt16)
        );
        let t = spec("torque_raw", I16, 1.0, None);
        assert_eq!(t.value(-5.0), Value::Int(-5, DataType::Int16));
        assert_eq!(
            spec("ready", Raw::Bool, 1.0, None).value(1.0),
            Value::Bool(true)
        );
    }

    #[test]
    fn a_birth_has_every_field_with_its_unit_and_scale_and_state_and_quality() {
        let specs = vec![
            spec("position", I32, 0.001, Some("mm")),
            spec("statusword", U16, 1.0, None),
        ];
        let t = Telemetry {
            position: Some(1.5),
            statusword: Some(0x0237),
            state: Some(DriveState::OperationEnabled),
            ..Telemetry::default()
        };
        let b = birth_metrics(&specs, Some(&t));
        let names: Vec<&str> = b.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["position", "statusword", "state", "quality"]);
        let props = b[0].properties.as_ref().unwrap();
        assert!(props.get("engUnit").is_some() && props.get("scale").is_some());
        assert_eq!(b[1].properties, None);
        assert_eq!(b[2].value, Some(Value::Str("operation_enabled".into())));
        assert_eq!(b[3].value, Some(Value::Str("good".into())));
        // Without a sample yet: every value null.
        assert!(birth_metrics(&specs, None)
            .iter()
            .all(|m| m.value.is_none()));
    }

    #[test]
    fn every_metric_of_a_sample_was_in_the_birth() {
        let specs = vec![spec("position", Raw::Float, 1.0, Some("mm"))];
        let t = Telemetry {
            position: Some(1.0),
            values: vec![(Arc::from("dc_bus"), 48.0)],
            ..Telemetry::default()
        };
        let birth: Vec<String> = birth_metrics(&specs, None)
            .into_iter()
            .map(|m| m.name)
            .collect();
        let data: Vec<&str> = sample_values(&specs, &t)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        // dc_bus is not in the profile here: a field the birth does not name is a bug of
        // the caller's specs, and this test shows the check a host makes.
        let unknown: Vec<&&str> = data
            .iter()
            .filter(|n| !birth.iter().any(|b| b == **n))
            .collect();
        assert_eq!(unknown, [&"dc_bus"]);
    }
}
