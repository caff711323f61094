//! Register maps ("profiles") and value decoding.
//!
//! A profile lists named fields, each at a 0-based protocol register address (the number
//! on the wire, not the 4xxxx "reference" of some manuals), with a data type, word and
//! byte order, and `value = raw x scale + offset`.

use std::sync::Arc;

use thiserror::Error;

/// Which table a field lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegisterKind {
    /// Read with 03 (0x03) Read Holding Registers.
    Holding,
    /// Read with 04 (0x04) Read Input Registers.
    Input,
}

impl RegisterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Holding => "holding",
            Self::Input => "input",
        }
    }
}

/// How the raw registers of a field are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    U16,
    I16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    /// One register, true when non-zero (or when `bit` is set, that bit).
    Bool,
}

impl DataType {
    /// Registers the type occupies.
    pub fn registers(self) -> u16 {
        match self {
            Self::U16 | Self::I16 | Self::Bool => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
            Self::U64 | Self::I64 | Self::F64 => 4,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "u16" => Self::U16,
            "i16" => Self::I16,
            "u32" => Self::U32,
            "i32" => Self::I32,
            "f32" => Self::F32,
            "u64" => Self::U64,
            "i64" => Self::I64,
            "f64" => Self::F64,
            "bool" | "bit" => Self::Bool,
            _ => return None,
        })
    }
}

/// Order of the 16-bit words of a multi-register value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WordOrder {
    /// The first register holds the most significant word (Modbus's own convention).
    #[default]
    HighFirst,
    LowFirst,
}

/// Order of the two bytes inside each register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ByteOrder {
    /// As the protocol sends them: high byte first.
    #[default]
    Big,
    /// Some devices swap the bytes of every register.
    Little,
}

/// One named reading of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: Arc<str>,
    pub address: u16,
    pub kind: RegisterKind,
    pub data_type: DataType,
    pub word_order: WordOrder,
    pub byte_order: ByteOrder,
    /// For `Bool`: the bit (0-15) to test instead of "non-zero".
    pub bit: Option<u8>,
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
    /// Plausible range of the scaled value; outside it, telemetry is `uncertain`.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Field {
    /// A field with defaults (holding, high word first, scale 1), for tests and built-ins.
    pub fn new(name: &str, address: u16, data_type: DataType) -> Self {
        Self {
            name: name.into(),
            address,
            kind: RegisterKind::Holding,
            data_type,
            word_order: WordOrder::default(),
            byte_order: ByteOrder::default(),
            bit: None,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            min: None,
            max: None,
        }
    }

    /// First register past the field.
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.data_type.registers())
    }

    /// Decodes the field from exactly its registers (`regs.len()` = `registers()`).
    pub fn decode(&self, regs: &[u16]) -> Result<f64, DecodeError> {
        let n = usize::from(self.data_type.registers());
        if regs.len() != n {
            return Err(DecodeError::Length {
                field: self.name.clone(),
                expected: n,
                got: regs.len(),
            });
        }
        // Words in register order, then fixed up to most-significant-first.
        let mut words = [0u16; 4];
        for (w, r) in words.iter_mut().zip(regs) {
            *w = match self.byte_order {
                ByteOrder::Big => *r,
                ByteOrder::Little => r.swap_bytes(),
            };
        }
        let words = &mut words[..n];
        if self.word_order == WordOrder::LowFirst {
            words.reverse();
        }
        let raw: u64 = words.iter().fold(0, |acc, w| (acc << 16) | u64::from(*w));
        let value = match self.data_type {
            DataType::U16 => raw as u16 as f64,
            DataType::I16 => raw as u16 as i16 as f64,
            DataType::U32 => raw as u32 as f64,
            DataType::I32 => raw as u32 as i32 as f64,
            DataType::F32 => f64::from(f32::from_bits(raw as u32)),
            DataType::U64 => raw as f64,
            DataType::I64 => raw as i64 as f64,
            DataType::F64 => f64::from_bits(raw),
            DataType::Bool => {
                let on = match self.bit {
                    Some(b) => raw & (1 << b) != 0,
                    None => raw != 0,
                };
                return Ok(if on { 1.0 } else { 0.0 });
            }
        };
        Ok(apply_scale(value, self.scale) + self.offset)
    }

    /// The registers that hold `value` (engineering units): scale, offset, type, word and
    /// byte order applied in reverse of [`Field::decode`]. Integers are rounded to the
    /// nearest step; a value the type cannot hold is an error, never a wrapped number.
    pub fn encode(&self, value: f64) -> Result<heapless::Vec<u16, 4>, EncodeError> {
        let out_of_range = || EncodeError::OutOfRange {
            field: self.name.clone(),
            value,
        };
        if !value.is_finite() || self.scale == 0.0 || !self.scale.is_finite() {
            return Err(out_of_range());
        }
        let raw = (value - self.offset) / self.scale;
        let int = |min: f64, max: f64| -> Result<u64, EncodeError> {
            let r = raw.round();
            if r < min || r > max {
                return Err(out_of_range());
            }
            // In range, so the casts are exact (i64 -> u64 keeps the two's complement).
            Ok(r as i64 as u64)
        };
        let bits: u64 = match self.data_type {
            DataType::U16 => int(0.0, 65_535.0)?,
            DataType::I16 => int(-32_768.0, 32_767.0)? & 0xFFFF,
            DataType::U32 => int(0.0, 4_294_967_295.0)?,
            DataType::I32 => int(-2_147_483_648.0, 2_147_483_647.0)? & 0xFFFF_FFFF,
            // Past 2^53 an f64 no longer holds every integer: refuse rather than round.
            DataType::U64 => int(0.0, 9_007_199_254_740_992.0)?,
            DataType::I64 => int(-9_007_199_254_740_992.0, 9_007_199_254_740_992.0)?,
            DataType::F32 => {
                let f = raw as f32;
                if !f.is_finite() {
                    return Err(out_of_range());
                }
                u64::from(f.to_bits())
            }
            DataType::F64 => raw.to_bits(),
            DataType::Bool => {
                if self.bit.is_some() {
                    // One bit of a shared register needs a read-modify-write.
                    return Err(EncodeError::NotWritable {
                        field: self.name.clone(),
                    });
                }
                u64::from(raw != 0.0)
            }
        };
        let n = usize::from(self.data_type.registers());
        let mut words: heapless::Vec<u16, 4> = (0..n)
            .map(|i| (bits >> (16 * (n - 1 - i))) as u16)
            .collect();
        if self.word_order == WordOrder::LowFirst {
            words.reverse();
        }
        if self.byte_order == ByteOrder::Little {
            for w in words.iter_mut() {
                *w = w.swap_bytes();
            }
        }
        Ok(words)
    }

    /// True when `value` lies inside the declared range (or there is none).
    pub fn in_range(&self, value: f64) -> bool {
        value.is_finite()
            && self.min.is_none_or(|min| value >= min)
            && self.max.is_none_or(|max| value <= max)
    }
}

/// `value x scale`, computed as a division when the scale is the inverse of a whole number
/// (0.1, 0.01, 0.001, ...): 138 x 0.01 is 1.3800000000000001 in binary floating point,
/// 138 / 100 is the 1.38 a consumer expects to read.
fn apply_scale(value: f64, scale: f64) -> f64 {
    let inverse = 1.0 / scale;
    let whole = inverse.round();
    if whole.abs() >= 2.0 && (inverse - whole).abs() < 1e-9 * whole.abs() {
        value / whole
    } else {
        value * scale
    }
}

/// A register map for one device model.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub fields: Vec<Field>,
}

/// Why a value cannot be written to a field.
#[derive(Debug, Error, PartialEq)]
pub enum EncodeError {
    #[error("{field}: {value} does not fit the field's type")]
    OutOfRange { field: Arc<str>, value: f64 },
    #[error("{field}: a single bit cannot be written")]
    NotWritable { field: Arc<str> },
}

#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    #[error("field {field}: expected {expected} registers, got {got}")]
    Length {
        field: Arc<str>,
        expected: usize,
        got: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(t: DataType) -> Field {
        Field::new("x", 0, t)
    }

    #[test]
    fn signed_types_decode_twos_complement() {
        assert_eq!(field(DataType::I16).decode(&[0xFFFE]), Ok(-2.0));
        assert_eq!(field(DataType::I32).decode(&[0xFFFF, 0xFFFE]), Ok(-2.0));
        assert_eq!(
            field(DataType::I64).decode(&[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFD]),
            Ok(-3.0)
        );
    }

    #[test]
    fn low_first_word_order_swaps_the_words() {
        let mut f = field(DataType::U32);
        f.word_order = WordOrder::LowFirst;
        assert_eq!(f.decode(&[0x0002, 0x0001]), Ok(65_538.0));
        f.word_order = WordOrder::HighFirst;
        assert_eq!(f.decode(&[0x0001, 0x0002]), Ok(65_538.0));
    }

    #[test]
    fn little_byte_order_swaps_bytes_inside_each_register() {
        let mut f = field(DataType::U16);
        f.byte_order = ByteOrder::Little;
        assert_eq!(f.decode(&[0x3412]), Ok(f64::from(0x1234u16)));
    }

    #[test]
    fn floats_decode_from_their_ieee_bits() {
        let bits = 1.5f32.to_bits();
        let regs = [(bits >> 16) as u16, bits as u16];
        assert_eq!(field(DataType::F32).decode(&regs), Ok(1.5));
        let bits = (-2.25f64).to_bits();
        let regs = [
            (bits >> 48) as u16,
            (bits >> 32) as u16,
            (bits >> 16) as u16,
            bits as u16,
        ];
        assert_eq!(field(DataType::F64).decode(&regs), Ok(-2.25));
    }

    #[test]
    fn decimal_scales_give_the_nearest_decimal_value() {
        let mut f = Field::new("current", 0, DataType::I16);
        f.scale = 0.01;
        assert_eq!(f.decode(&[138]).unwrap(), 1.38);
        f.scale = 0.1;
        assert_eq!(f.decode(&[262]).unwrap(), 26.2);
        f.scale = 2.5;
        assert_eq!(f.decode(&[4]).unwrap(), 10.0);
    }

    #[test]
    fn scale_and_offset_apply_after_decoding() {
        let mut f = field(DataType::I16);
        f.scale = 0.1;
        f.offset = -40.0;
        let v = f.decode(&[500]).unwrap();
        assert!((v - 10.0).abs() < 1e-9, "{v}");
    }

    #[test]
    fn bool_tests_one_bit_when_asked() {
        let mut f = field(DataType::Bool);
        assert_eq!(f.decode(&[0x0100]), Ok(1.0));
        f.bit = Some(3);
        assert_eq!(f.decode(&[0x0100]), Ok(0.0));
        assert_eq!(f.decode(&[0x0008]), Ok(1.0));
    }

    #[test]
    fn u64_keeps_its_high_words() {
        let v = field(DataType::U64).decode(&[0, 1, 0, 0]).unwrap();
        assert_eq!(v, 4_294_967_296.0);
    }

    #[test]
    fn encoding_is_the_inverse_of_decoding_for_every_type_and_order() {
        let types = [
            (DataType::U16, 1234.0),
            (DataType::I16, -1234.0),
            (DataType::U32, 70_000.0),
            (DataType::I32, -70_000.0),
            (DataType::F32, 1.5),
            (DataType::U64, 5_000_000_000.0),
            (DataType::I64, -5_000_000_000.0),
            (DataType::F64, -2.25),
            (DataType::Bool, 1.0),
        ];
        for (t, v) in types {
            for word_order in [WordOrder::HighFirst, WordOrder::LowFirst] {
                for byte_order in [ByteOrder::Big, ByteOrder::Little] {
                    let mut f = field(t);
                    f.word_order = word_order;
                    f.byte_order = byte_order;
                    let regs = f.encode(v).unwrap();
                    assert_eq!(
                        f.decode(&regs),
                        Ok(v),
                        "{t:?} {word_order:?} {byte_order:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn encoding_applies_scale_and_offset_in_reverse_and_rounds_to_a_step() {
        let mut f = Field::new("target_position", 0, DataType::I32);
        f.scale = 0.001;
        assert_eq!(f.encode(120.5).unwrap().as_slice(), &[0x0001, 0xD6B4]);
        assert_eq!(f.encode(-0.0004).unwrap().as_slice(), &[0, 0]);
        let mut t = Field::new("t", 0, DataType::I16);
        t.scale = 0.1;
        t.offset = -40.0;
        assert_eq!(t.encode(10.0).unwrap().as_slice(), &[500]);
    }

    #[test]
    fn a_value_the_type_cannot_hold_is_refused_not_wrapped() {
        assert!(field(DataType::U16).encode(65_536.0).is_err());
        assert!(field(DataType::U16).encode(-1.0).is_err());
        assert!(field(DataType::I16).encode(32_768.0).is_err());
        assert!(field(DataType::U32).encode(f64::NAN).is_err());
        assert!(field(DataType::F32).encode(1e300).is_err());
        let mut bit = field(DataType::Bool);
        bit.bit = Some(3);
        assert!(bit.encode(1.0).is_err());
    }

    #[test]
    fn a_wrong_register_count_is_an_error_not_a_panic() {
        assert!(field(DataType::U32).decode(&[1]).is_err());
    }
}
