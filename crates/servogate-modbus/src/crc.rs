//! CRC-16/MODBUS (Modbus over Serial Line V1.02, section 6.2.2).

/// CRC of `bytes`, in the order it goes on the wire: low byte first.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            let lsb = crc & 1;
            crc >>= 1;
            if lsb != 0 {
                crc ^= 0xA001;
            }
        }
    }
    crc
}

/// True when the last two bytes of `frame` are the CRC of the rest.
pub fn frame_crc_ok(frame: &[u8]) -> bool {
    let Some(split) = frame.len().checked_sub(2) else {
        return false;
    };
    let (body, tail) = frame.split_at(split);
    crc16(body) == u16::from_le_bytes([tail[0], tail[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_specification_example() {
        // Modbus over Serial Line V1.02, section 6.2.2 example: 02 07 -> CRC 0x1241,
        // sent as 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
    }

    #[test]
    fn crc_of_a_read_request_known_answer() {
        // 01 03 00 00 00 0A -> C5 CD (also the tokio-modbus codec test vector).
        assert!(frame_crc_ok(&[
            0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD
        ]));
        assert!(!frame_crc_ok(&[
            0x01, 0x03, 0x00, 0x00, 0x00, 0x0B, 0xC5, 0xCD
        ]));
        assert!(!frame_crc_ok(&[0x01]));
    }
}
