//! `[profiles.NAME]`: Modbus register maps. Each field becomes a
//! `servogate_modbus::profile::Field` (address, type, register kind, word and byte order,
//! bit, scale and offset, unit, limits); `cia402` is reserved for the built-in CANopen
//! profile.

use std::collections::BTreeMap;
use std::sync::Arc;

use servogate_modbus::profile::{ByteOrder, DataType, Field, RegisterKind, WordOrder};
use toml::Spanned;

use super::model::CIA402;
use super::raw::{Ordered, RawField, S};
use super::source::{dotted, Source};
use super::ConfigError;

impl Source<'_> {
    /// `[profiles.*]`: the Modbus register maps, fields in file order.
    pub(super) fn profiles(
        &self,
        raw: Ordered<S<Ordered<S<RawField>>>>,
    ) -> Result<BTreeMap<String, Arc<[Field]>>, ConfigError> {
        let mut profiles = BTreeMap::new();
        for (pname, fields) in raw.0 {
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
        Ok(profiles)
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
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use servogate_modbus::profile::{DataType, RegisterKind, WordOrder};

    use crate::config::fixture::{err, good, GOOD};
    use crate::config::parse;

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
}
