//! Multi-register values: how a 32- or 64-bit value is split into 16-bit registers.
//!
//! Modbus itself only defines 16-bit registers, sent big-endian (Modbus Application
//! Protocol V1.1b3, section 4.2); the order of the registers of a wider value is the
//! device's choice. The simulator uses both orders on purpose, so configs exercise them:
//! `high_first` puts the most significant word at the lower address, `low_first` the least.

/// i32 as two registers, most significant word first.
pub fn i32_high_first(v: i32) -> [u16; 2] {
    u32_high_first(v as u32)
}

/// The i32 that [`i32_high_first`] encoded.
pub fn i32_from_high_first(w: [u16; 2]) -> i32 {
    u32_from_high_first(w) as i32
}

/// u32 as two registers, most significant word first.
pub fn u32_high_first(v: u32) -> [u16; 2] {
    [(v >> 16) as u16, v as u16]
}

/// The u32 that [`u32_high_first`] encoded.
pub fn u32_from_high_first(w: [u16; 2]) -> u32 {
    (u32::from(w[0]) << 16) | u32::from(w[1])
}

/// u32 as two registers, least significant word first.
pub fn u32_low_first(v: u32) -> [u16; 2] {
    [v as u16, (v >> 16) as u16]
}

/// The u32 that [`u32_low_first`] encoded.
pub fn u32_from_low_first(w: [u16; 2]) -> u32 {
    (u32::from(w[1]) << 16) | u32::from(w[0])
}

/// u64 as four registers, most significant word first.
pub fn u64_high_first(v: u64) -> [u16; 4] {
    [
        (v >> 48) as u16,
        (v >> 32) as u16,
        (v >> 16) as u16,
        v as u16,
    ]
}

/// The u64 that [`u64_high_first`] encoded.
pub fn u64_from_high_first(w: [u16; 4]) -> u64 {
    w.iter().fold(0, |acc, &x| (acc << 16) | u64::from(x))
}

/// IEEE 754 f32 as two registers, most significant word (sign, exponent) first.
pub fn f32_high_first(v: f32) -> [u16; 2] {
    u32_high_first(v.to_bits())
}

/// The f32 that [`f32_high_first`] encoded.
pub fn f32_from_high_first(w: [u16; 2]) -> f32 {
    f32::from_bits(u32_from_high_first(w))
}

/// IEEE 754 f64 as four registers, most significant word first.
pub fn f64_high_first(v: f64) -> [u16; 4] {
    u64_high_first(v.to_bits())
}

/// The f64 that [`f64_high_first`] encoded.
pub fn f64_from_high_first(w: [u16; 4]) -> f64 {
    f64::from_bits(u64_from_high_first(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i32_high_first_puts_the_sign_word_at_the_lower_address() {
        // -2 = 0xFFFF_FFFE.
        assert_eq!(i32_high_first(-2), [0xFFFF, 0xFFFE]);
        assert_eq!(i32_high_first(0x0001_0002), [0x0001, 0x0002]);
        for v in [0, 1, -1, i32::MIN, i32::MAX, 123_456_789, -98_765] {
            assert_eq!(i32_from_high_first(i32_high_first(v)), v);
        }
    }

    #[test]
    fn u32_low_first_puts_the_low_word_at_the_lower_address() {
        assert_eq!(u32_low_first(0x0001_0002), [0x0002, 0x0001]);
        for v in [0, 1, u32::MAX, 65_536, 48_000, 4_000_000_000] {
            assert_eq!(u32_from_low_first(u32_low_first(v)), v);
            assert_eq!(u32_from_high_first(u32_high_first(v)), v);
        }
    }

    #[test]
    fn u64_and_floats_round_trip_high_first() {
        assert_eq!(u64_high_first(0x0001_0002_0003_0004), [1, 2, 3, 4]);
        // 1.0f64 = 0x3FF0_0000_0000_0000; 1.0f32 = 0x3F80_0000 (IEEE 754).
        assert_eq!(f64_high_first(1.0), [0x3FF0, 0, 0, 0]);
        assert_eq!(f32_high_first(1.0), [0x3F80, 0]);
        for v in [0.0, -1.5, 12_345.678_901_234, f64::MAX] {
            assert_eq!(f64_from_high_first(f64_high_first(v)), v);
        }
        for v in [0.0f32, -1.5, 87.25] {
            assert_eq!(f32_from_high_first(f32_high_first(v)), v);
        }
    }
}
