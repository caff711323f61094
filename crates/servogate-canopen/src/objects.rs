//! The objects a drive's telemetry is made of: which `index:sub` carries which named value,
//! its data type, scale, offset and unit (the `cia402` profile plus what the config adds).
//!
//! [`ObjectTable::cia402`] holds the CiA 402-2 objects with a canonical telemetry field
//! (position 0x6064, velocity 0x606C, torque 0x6077, current 0x6078, statusword 0x6041,
//! error code 0x603F) and the mode display 0x6061, all at scale 1. The config overrides a
//! built-in object's scale, offset and unit by naming it, and adds manufacturer objects
//! (temperature, DC bus voltage...) by index. A mapped or polled object that the table does
//! not know still reaches `values`, under its `IIII:SS` name, unsigned and unscaled.

use std::sync::Arc;

use crate::pdo::objects as cia402;

/// CANopen basic data types (CiA 301 v4.2, 7.1.6), as far as telemetry needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjType {
    /// 0x0001 BOOLEAN.
    Bool,
    /// 0x0002 INTEGER8.
    I8,
    /// 0x0003 INTEGER16.
    I16,
    /// 0x0004 INTEGER32.
    I32,
    /// 0x0005 UNSIGNED8.
    U8,
    /// 0x0006 UNSIGNED16.
    U16,
    /// 0x0007 UNSIGNED32.
    U32,
    /// 0x0008 REAL32.
    F32,
    /// 0x0015 INTEGER64.
    I64,
    /// 0x001B UNSIGNED64.
    U64,
}

impl ObjType {
    /// The config's spelling: `bool`, `i8` ... `u64`, `f32`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bool" => Self::Bool,
            "i8" => Self::I8,
            "i16" => Self::I16,
            "i32" => Self::I32,
            "i64" => Self::I64,
            "u8" => Self::U8,
            "u16" => Self::U16,
            "u32" => Self::U32,
            "u64" => Self::U64,
            "f32" => Self::F32,
            _ => return None,
        })
    }

    /// Size on the wire (a BOOLEAN takes one byte in SDO, one bit may be mapped in a PDO).
    pub fn bits(self) -> u8 {
        match self {
            Self::Bool | Self::I8 | Self::U8 => 8,
            Self::I16 | Self::U16 => 16,
            Self::I32 | Self::U32 | Self::F32 => 32,
            Self::I64 | Self::U64 => 64,
        }
    }

    fn is_signed(self) -> bool {
        matches!(self, Self::I8 | Self::I16 | Self::I32 | Self::I64)
    }

    /// The value of the low `bits` of `raw` (as a PDO or an SDO upload carries it).
    pub fn decode(self, raw: u64, bits: u8) -> f64 {
        let bits = bits.clamp(1, 64);
        let raw = if bits >= 64 {
            raw
        } else {
            raw & ((1u64 << bits) - 1)
        };
        match self {
            Self::Bool => f64::from(u8::from(raw != 0)),
            Self::F32 => f32::from_bits(raw as u32) as f64,
            t if t.is_signed() => {
                let shift = 64 - u32::from(bits);
                (((raw << shift) as i64) >> shift) as f64
            }
            _ => raw as f64,
        }
    }

    /// Decodes SDO-uploaded bytes (little endian). `None` when there are too few bytes.
    pub fn decode_bytes(self, data: &[u8]) -> Option<f64> {
        let n = usize::from(self.bits() / 8);
        if data.len() < n {
            return None;
        }
        let mut le = [0u8; 8];
        le[..n].copy_from_slice(&data[..n]);
        Some(self.decode(u64::from_le_bytes(le), self.bits()))
    }
}

/// One named object of a drive.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectSpec {
    /// The telemetry field (canonical, e.g. `position`, or a `values` key).
    pub name: Arc<str>,
    pub index: u16,
    pub sub: u8,
    pub ty: ObjType,
    /// value = raw x scale + offset.
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
}

impl ObjectSpec {
    pub fn new(name: &str, index: u16, sub: u8, ty: ObjType) -> Self {
        Self {
            name: Arc::from(name),
            index,
            sub,
            ty,
            scale: 1.0,
            offset: 0.0,
            unit: None,
        }
    }

    /// The engineering value of a raw PDO field of `bits`.
    pub fn value(&self, raw: u64, bits: u8) -> f64 {
        self.ty.decode(raw, bits) * self.scale + self.offset
    }
}

/// The objects of one drive, looked up by `index:sub`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectTable {
    objects: Vec<ObjectSpec>,
}

impl ObjectTable {
    /// The built-in `cia402` profile (CiA 402-2 object numbers, scale 1).
    pub fn cia402() -> Self {
        let o = |name, index, ty| ObjectSpec::new(name, index, 0, ty);
        Self {
            objects: vec![
                o("statusword", cia402::STATUSWORD, ObjType::U16),
                o("fault_code", cia402::ERROR_CODE, ObjType::U16),
                o("mode_display", cia402::MODE_DISPLAY, ObjType::I8),
                o("position", cia402::POSITION, ObjType::I32),
                o("velocity", cia402::VELOCITY, ObjType::I32),
                o("torque", cia402::TORQUE, ObjType::I16),
                o("current", cia402::CURRENT, ObjType::I16),
            ],
        }
    }

    /// The built-in object called `name`, if there is one.
    pub fn builtin(name: &str) -> Option<ObjectSpec> {
        Self::cia402()
            .objects
            .into_iter()
            .find(|o| &*o.name == name)
    }

    /// Adds `spec`, replacing an object of the same name or the same `index:sub`.
    pub fn insert(&mut self, spec: ObjectSpec) {
        self.objects
            .retain(|o| o.name != spec.name && (o.index, o.sub) != (spec.index, spec.sub));
        self.objects.push(spec);
    }

    pub fn get(&self, index: u16, sub: u8) -> Option<&ObjectSpec> {
        self.objects
            .iter()
            .find(|o| o.index == index && o.sub == sub)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ObjectSpec> {
        self.objects.iter()
    }
}

/// The `values` name of an object the table does not know: `IIII:SS` in hex.
pub fn hex_name(index: u16, sub: u8) -> Arc<str> {
    Arc::from(format!("{index:04X}:{sub:02X}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_types_sign_extend_from_their_mapped_width() {
        assert_eq!(ObjType::I16.decode(0xFFE7, 16), -25.0);
        assert_eq!(ObjType::I32.decode(0xFFFF_FC18, 32), -1000.0);
        assert_eq!(ObjType::I8.decode(0xFD, 8), -3.0);
        // A PDO may map fewer bits than the type has: the sign bit is the top mapped bit.
        assert_eq!(ObjType::I16.decode(0xF, 4), -1.0);
        assert_eq!(ObjType::U16.decode(0xFFFF, 16), 65535.0);
    }

    #[test]
    fn reals_and_booleans_decode_by_their_own_rules() {
        assert_eq!(ObjType::F32.decode(u64::from(1.5f32.to_bits()), 32), 1.5);
        assert_eq!(ObjType::Bool.decode(0x02, 8), 1.0);
        assert_eq!(ObjType::Bool.decode(0, 1), 0.0);
    }

    #[test]
    fn sdo_bytes_decode_little_endian_and_short_data_is_refused() {
        assert_eq!(
            ObjType::U32.decode_bytes(&[0x80, 0xBB, 0, 0]),
            Some(48_000.0)
        );
        assert_eq!(ObjType::I16.decode_bytes(&[0x18, 0xFC]), Some(-1000.0));
        assert_eq!(ObjType::U32.decode_bytes(&[1, 2]), None);
    }

    #[test]
    fn config_overrides_a_builtin_by_name_and_adds_objects_by_index() {
        let mut t = ObjectTable::cia402();
        let mut position = ObjectTable::builtin("position").unwrap();
        position.scale = 0.001;
        position.unit = Some("mm".into());
        t.insert(position);
        let mut temp = ObjectSpec::new("temperature", 0x2010, 0, ObjType::I16);
        temp.scale = 0.1;
        t.insert(temp);
        let p = t.get(0x6064, 0).unwrap();
        assert_eq!(p.value(0xFFFF_FC18, 32), -1.0);
        assert_eq!(t.get(0x2010, 0).unwrap().value(253, 16), 25.3);
        assert_eq!(t.iter().filter(|o| &*o.name == "position").count(), 1);
        assert!(t.get(0x2011, 0).is_none());
    }
}
