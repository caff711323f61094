//! Modbus RTU framing for the server side, sans-IO: finding request frames in a byte
//! stream, parsing their PDUs, and building replies with their CRC.
//!
//! Over a pty there is no inter-frame silence to delimit frames (bytes arrive at once), so
//! the length of a request comes from its function code, as tokio-modbus's own decoder
//! does; a frame whose CRC fails loses its first byte and decoding retries one byte later.
//! Unlike tokio-modbus's server this never gives up: garbage on the line costs bytes, not
//! the server.

/// Longest RTU frame (Modbus over Serial Line V1.02, section 2.5.1.1: 256 bytes).
pub const MAX_FRAME_LEN: usize = 256;
/// Most registers one read may ask for (Modbus Application Protocol V1.1b3, 6.3: 125).
pub const MAX_READ_QUANTITY: u16 = 125;
/// Most registers one write-multiple may carry (same document, 6.12: 123).
pub const MAX_WRITE_QUANTITY: u16 = 123;

/// 03 (0x03) Read Holding Registers.
pub const READ_HOLDING_REGISTERS: u8 = 0x03;
/// 04 (0x04) Read Input Registers.
pub const READ_INPUT_REGISTERS: u8 = 0x04;
/// 06 (0x06) Write Single Register.
pub const WRITE_SINGLE_REGISTER: u8 = 0x06;
/// 16 (0x10) Write Multiple Registers.
pub const WRITE_MULTIPLE_REGISTERS: u8 = 0x10;

/// CRC-16/MODBUS (Modbus over Serial Line V1.02, section 6.2.2); sent low byte first.
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
pub fn crc_ok(frame: &[u8]) -> bool {
    match frame.len().checked_sub(2) {
        Some(n) => crc16(&frame[..n]).to_le_bytes() == frame[n..],
        None => false,
    }
}

/// `unit`, `pdu` and the CRC: one frame ready for the wire.
pub fn encode_frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(pdu.len() + 3);
    frame.push(unit);
    frame.extend_from_slice(pdu);
    let crc = crc16(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// Modbus exception codes this server answers with (Modbus Application Protocol
/// V1.1b3, section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// 01 (0x01) Illegal Function.
    IllegalFunction = 0x01,
    /// 02 (0x02) Illegal Data Address.
    IllegalDataAddress = 0x02,
    /// 03 (0x03) Illegal Data Value.
    IllegalDataValue = 0x03,
}

/// One request PDU, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    ReadHoldingRegisters {
        address: u16,
        quantity: u16,
    },
    ReadInputRegisters {
        address: u16,
        quantity: u16,
    },
    WriteSingleRegister {
        address: u16,
        value: u16,
    },
    WriteMultipleRegisters {
        address: u16,
        values: Vec<u16>,
    },
    /// A function this server does not implement.
    Unsupported {
        function: u8,
    },
}

impl Request {
    /// Parses a PDU (function code and data). A malformed PDU of a known function is an
    /// Illegal Data Value, as the spec's per-function state diagrams say.
    pub fn parse(pdu: &[u8]) -> Result<Self, Exception> {
        let (&function, data) = pdu.split_first().ok_or(Exception::IllegalFunction)?;
        let word = |i: usize| -> Result<u16, Exception> {
            match data.get(i..i + 2) {
                Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
                None => Err(Exception::IllegalDataValue),
            }
        };
        match function {
            READ_HOLDING_REGISTERS | READ_INPUT_REGISTERS => {
                let (address, quantity) = (word(0)?, word(2)?);
                if !(1..=MAX_READ_QUANTITY).contains(&quantity) {
                    return Err(Exception::IllegalDataValue);
                }
                Ok(if function == READ_HOLDING_REGISTERS {
                    Self::ReadHoldingRegisters { address, quantity }
                } else {
                    Self::ReadInputRegisters { address, quantity }
                })
            }
            WRITE_SINGLE_REGISTER => Ok(Self::WriteSingleRegister {
                address: word(0)?,
                value: word(2)?,
            }),
            WRITE_MULTIPLE_REGISTERS => {
                let (address, quantity) = (word(0)?, word(2)?);
                let byte_count = data.get(4).copied().ok_or(Exception::IllegalDataValue)?;
                if !(1..=MAX_WRITE_QUANTITY).contains(&quantity)
                    || usize::from(byte_count) != 2 * usize::from(quantity)
                    || data.len() != 5 + usize::from(byte_count)
                {
                    return Err(Exception::IllegalDataValue);
                }
                let values = (0..usize::from(quantity))
                    .map(|i| word(5 + 2 * i))
                    .collect::<Result<_, _>>()?;
                Ok(Self::WriteMultipleRegisters { address, values })
            }
            function => Ok(Self::Unsupported { function }),
        }
    }

    /// True for requests that change state (and so may be broadcast to unit 0).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Self::WriteSingleRegister { .. } | Self::WriteMultipleRegisters { .. }
        )
    }
}

/// Reply PDU to a read: function, byte count, registers big-endian.
pub fn read_reply_pdu(function: u8, registers: &[u16]) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(2 + 2 * registers.len());
    pdu.push(function);
    // At most 125 registers = 250 bytes, so the count fits a byte.
    pdu.push((2 * registers.len()).min(usize::from(u8::MAX)) as u8);
    for r in registers {
        pdu.extend_from_slice(&r.to_be_bytes());
    }
    pdu
}

/// Exception reply PDU: function with bit 7 set, then the code.
pub fn exception_pdu(function: u8, exception: Exception) -> Vec<u8> {
    exception_code_pdu(function, exception as u8)
}

/// Exception reply PDU with any exception code (fault injection: 04 Server Device
/// Failure, 06 Server Device Busy, or a code no standard names).
pub fn exception_code_pdu(function: u8, code: u8) -> Vec<u8> {
    vec![function | 0x80, code]
}

/// True for the write functions: 06 Write Single Register, 16 Write Multiple Registers.
pub fn is_write_function(function: u8) -> bool {
    matches!(function, WRITE_SINGLE_REGISTER | WRITE_MULTIPLE_REGISTERS)
}

/// One request frame found on the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    /// The unit (slave) id the request is addressed to; 0 = broadcast.
    pub unit: u8,
    /// Function code and data, without unit and CRC.
    pub pdu: Vec<u8>,
    /// Length of the whole frame on the wire (unit + PDU + CRC).
    pub wire_len: usize,
}

/// How long the request at the start of a buffer is.
enum FrameLen {
    /// Whole frame length in bytes (unit + PDU + CRC).
    Known(usize),
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A function code whose request length we do not know.
    Unknown,
}

/// Request frame length by function code (Modbus Application Protocol V1.1b3,
/// section 6; the same table as tokio-modbus's server decoder).
fn request_frame_len(buf: &[u8]) -> FrameLen {
    let Some(&function) = buf.get(1) else {
        return FrameLen::NeedMore;
    };
    let counted = |at: usize, fixed: usize| match buf.get(at) {
        Some(&n) => FrameLen::Known(1 + fixed + usize::from(n) + 2),
        None => FrameLen::NeedMore,
    };
    match function {
        0x01..=0x06 => FrameLen::Known(1 + 5 + 2),
        0x07 | 0x0B | 0x0C | 0x11 => FrameLen::Known(1 + 1 + 2),
        0x0F | 0x10 => counted(6, 6),
        0x16 => FrameLen::Known(1 + 7 + 2),
        0x17 => counted(10, 10),
        0x18 => FrameLen::Known(1 + 3 + 2),
        // 0x2B / 0x0E Read Device Identification.
        0x2B => FrameLen::Known(1 + 4 + 2),
        _ => FrameLen::Unknown,
    }
}

/// True when `buf` starts with a complete frame of a known function with a valid CRC.
fn known_frame_at(buf: &[u8]) -> bool {
    matches!(request_frame_len(buf), FrameLen::Known(len) if len <= buf.len() && crc_ok(&buf[..len]))
}

/// Finds request frames in the bytes read from the line.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    dropped: u64,
}

impl Deframer {
    /// Creates an empty deframer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the line.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// True when no bytes wait.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes thrown away so far because no valid frame started with them.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped
    }

    /// The next complete frame with a valid CRC, if the buffer holds one. Bytes that
    /// cannot start a valid frame are dropped one at a time.
    pub fn next_frame(&mut self) -> Option<RequestFrame> {
        loop {
            let len = match request_frame_len(&self.buf) {
                FrameLen::NeedMore => return None,
                FrameLen::Known(len) if len > self.buf.len() => return None,
                FrameLen::Known(len) if crc_ok(&self.buf[..len]) => len,
                FrameLen::Known(_) => {
                    self.drop_first();
                    continue;
                }
                // Unknown function: the shortest prefix with a valid CRC is the frame (a
                // false match is a 1 in 65536 chance per length; fine for a simulator).
                FrameLen::Unknown => match (4..=self.buf.len().min(MAX_FRAME_LEN))
                    .find(|&n| crc_ok(&self.buf[..n]))
                {
                    Some(len) => len,
                    None if self.buf.len() >= MAX_FRAME_LEN => {
                        self.drop_first();
                        continue;
                    }
                    // Perhaps the rest of it has not arrived; but when a complete known
                    // frame already follows, the unknown "function" was garbage.
                    None => match (1..self.buf.len()).find(|&k| known_frame_at(&self.buf[k..])) {
                        Some(k) => {
                            self.drop_first_n(k);
                            continue;
                        }
                        None => return None,
                    },
                },
            };
            let frame: Vec<u8> = self.buf.drain(..len).collect();
            return Some(RequestFrame {
                unit: frame[0],
                pdu: frame[1..len - 2].to_vec(),
                wire_len: len,
            });
        }
    }

    /// The line went quiet with bytes still waiting: they are not the start of a frame
    /// that is still arriving (a sender writes a whole frame at once), so drop bytes
    /// until a frame decodes from what remains or nothing is left.
    pub fn on_silence(&mut self) -> Option<RequestFrame> {
        while !self.buf.is_empty() {
            self.drop_first();
            if let Some(frame) = self.next_frame() {
                return Some(frame);
            }
        }
        None
    }

    fn drop_first(&mut self) {
        self.drop_first_n(1);
    }

    fn drop_first_n(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.buf.drain(..n);
        self.dropped += n as u64;
    }
}

/// Makes `frame`'s CRC fail without changing its length: XORs one byte after the header
/// (unit, function and, for reads, the byte count, which tell the client how many bytes
/// to wait for) with a non-zero mask. CRC-16 detects every error burst of up to 16 bits
/// (Modbus over Serial Line V1.02, 2.5.1.2), so one changed byte always fails the check.
pub fn corrupt(frame: &mut [u8], rng: &mut fastrand::Rng) {
    let is_read_reply = matches!(
        frame.get(1),
        Some(&READ_HOLDING_REGISTERS | &READ_INPUT_REGISTERS)
    );
    let header = if is_read_reply { 3 } else { 2 };
    if frame.len() <= header {
        return;
    }
    let at = rng.usize(header..frame.len());
    frame[at] ^= rng.u8(1..=u8::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_specification_example() {
        // Modbus over Serial Line V1.02, section 6.2.2: 02 07 -> CRC 0x1241, sent 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        assert_eq!(encode_frame(0x02, &[0x07]), vec![0x02, 0x07, 0x41, 0x12]);
    }

    #[test]
    fn a_read_request_known_answer_decodes() {
        // Read holding registers, unit 1, address 0, quantity 10: 01 03 00 00 00 0A C5 CD
        // (the frame Modbus poll tools show for this request).
        let mut d = Deframer::new();
        d.push(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]);
        let f = d.next_frame().unwrap();
        assert_eq!((f.unit, f.wire_len), (1, 8));
        assert_eq!(
            Request::parse(&f.pdu),
            Ok(Request::ReadHoldingRegisters {
                address: 0,
                quantity: 10
            })
        );
        assert!(d.is_empty());
    }

    #[test]
    fn frames_split_across_reads_and_back_to_back_frames_both_decode() {
        let a = encode_frame(3, &[0x04, 0x00, 0x00, 0x00, 0x02]);
        let b = encode_frame(4, &[0x10, 0x00, 0x10, 0x00, 0x01, 0x02, 0x12, 0x34]);
        let mut d = Deframer::new();
        d.push(&a[..3]);
        assert_eq!(d.next_frame(), None);
        d.push(&a[3..]);
        d.push(&b);
        assert_eq!(d.next_frame().unwrap().unit, 3);
        let fb = d.next_frame().unwrap();
        assert_eq!(fb.unit, 4);
        assert_eq!(
            Request::parse(&fb.pdu),
            Ok(Request::WriteMultipleRegisters {
                address: 0x10,
                values: vec![0x1234]
            })
        );
    }

    #[test]
    fn garbage_before_a_frame_is_dropped_and_the_frame_still_decodes() {
        let good = encode_frame(1, &[0x03, 0x00, 0x00, 0x00, 0x01]);
        let mut d = Deframer::new();
        d.push(&[0x01, 0x03, 0xFF]);
        d.push(&good);
        let f = d.next_frame().unwrap();
        assert_eq!(f.pdu, good[1..good.len() - 2]);
        assert_eq!(d.dropped_bytes(), 3);
    }

    #[test]
    fn a_truncated_frame_is_cleared_by_silence() {
        // A write-multiple header claiming 200 data bytes would make us wait forever.
        let mut d = Deframer::new();
        d.push(&[0x01, 0x10, 0x00, 0x00, 0x00, 0x64, 200]);
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.on_silence(), None);
        assert!(d.is_empty());
        // The silence rule also salvages a good frame stuck behind such a header.
        let good = encode_frame(2, &[0x03, 0x00, 0x00, 0x00, 0x01]);
        d.push(&[0x01, 0x10, 0x00, 0x00, 0x00, 0x64, 200]);
        d.push(&good);
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.on_silence().map(|f| f.unit), Some(2));
    }

    #[test]
    fn an_unknown_function_frame_is_found_by_its_crc() {
        let f = encode_frame(5, &[0x41, 0x01, 0x02, 0x03]);
        let mut d = Deframer::new();
        d.push(&f);
        let got = d.next_frame().unwrap();
        assert_eq!(
            Request::parse(&got.pdu),
            Ok(Request::Unsupported { function: 0x41 })
        );
    }

    #[test]
    fn no_byte_sequence_panics_the_deframer() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut d = Deframer::new();
        for _ in 0..2_000 {
            let chunk: Vec<u8> = (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect();
            d.push(&chunk);
            while let Some(f) = d.next_frame() {
                let _ = Request::parse(&f.pdu);
            }
            if rng.bool() {
                let _ = d.on_silence();
            }
        }
    }

    #[test]
    fn bad_quantities_and_byte_counts_are_illegal_data_values() {
        assert_eq!(
            Request::parse(&[0x03, 0, 0, 0, 0]),
            Err(Exception::IllegalDataValue)
        );
        assert_eq!(
            Request::parse(&[0x03, 0, 0, 0, 126]),
            Err(Exception::IllegalDataValue)
        );
        assert_eq!(
            Request::parse(&[0x03, 0, 0]),
            Err(Exception::IllegalDataValue)
        );
        assert_eq!(
            Request::parse(&[0x10, 0, 0x10, 0, 2, 2, 0, 1]),
            Err(Exception::IllegalDataValue)
        );
    }

    #[test]
    fn a_corrupted_reply_fails_its_crc_but_keeps_its_length_and_header() {
        let mut rng = fastrand::Rng::with_seed(1);
        for pdu in [
            read_reply_pdu(0x03, &[1, 2, 3]),
            exception_pdu(0x03, Exception::IllegalDataAddress),
            vec![0x06, 0, 0x12, 0, 1],
        ] {
            let good = encode_frame(9, &pdu);
            for _ in 0..200 {
                let mut bad = good.clone();
                corrupt(&mut bad, &mut rng);
                assert!(!crc_ok(&bad), "{bad:02X?}");
                assert_eq!(bad.len(), good.len());
                assert_eq!(bad[..2], good[..2]);
                if pdu[0] == 0x03 {
                    assert_eq!(bad[2], good[2], "byte count must survive");
                }
            }
        }
    }
}
