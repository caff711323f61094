//! Modbus TCP framing, sans-IO: the MBAP header (Modbus Messaging on TCP/IP
//! Implementation Guide V1.0b, 3.1.3) around a request PDU, and the checks on a reply.
//!
//! ```text
//! transaction id u16 | protocol id u16 (0) | length u16 (unit + PDU) | unit u8 | PDU
//! ```
//!
//! Our own rather than tokio-modbus's TCP client, because that client keeps one request
//! outstanding per connection (`call` takes `&mut self` and awaits its reply) and takes
//! any frame that arrives next as the reply: one with another transaction id is an error
//! (`HeaderMismatch`), after which the real reply is still on its way and the next call
//! reads it. Here a reply is matched to its request by transaction id, a reply to no
//! outstanding request is dropped and counted, and up to `max_in_flight` requests share
//! one connection.

use crate::command::Transaction;
use crate::poll::ReadRequest;
use crate::profile::RegisterKind;

/// MBAP header length: transaction id, protocol id, length, unit id.
pub const HEADER_LEN: usize = 7;
/// Longest PDU (Modbus Application Protocol 1.1b3, 4.1).
pub const MAX_PDU: usize = 253;

/// The function code of a transaction.
fn function(tx: &Transaction) -> u8 {
    match tx {
        Transaction::Read(ReadRequest {
            kind: RegisterKind::Holding,
            ..
        }) => 0x03,
        Transaction::Read(ReadRequest {
            kind: RegisterKind::Input,
            ..
        }) => 0x04,
        Transaction::Write { values, .. } if values.len() == 1 => 0x06,
        Transaction::Write { .. } => 0x10,
    }
}

/// Appends the ADU of `tx` with transaction id `tid` to `out`.
pub fn encode(tx: &Transaction, tid: u16, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&tid.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // protocol id, length (set below)
    out.push(tx.unit());
    out.push(function(tx));
    match tx {
        Transaction::Read(r) => {
            out.extend_from_slice(&r.start.to_be_bytes());
            out.extend_from_slice(&r.count.to_be_bytes());
        }
        Transaction::Write { start, values, .. } => {
            out.extend_from_slice(&start.to_be_bytes());
            if let [one] = values.as_slice() {
                out.extend_from_slice(&one.to_be_bytes());
            } else {
                out.extend_from_slice(&(values.len() as u16).to_be_bytes());
                out.push((values.len() * 2) as u8);
                for v in values {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
    }
    let len = (out.len() - at - 6) as u16;
    out[at + 4..at + 6].copy_from_slice(&len.to_be_bytes());
}

/// One whole ADU found at the front of the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tid: u16,
    pub unit: u8,
    pub pdu: &'a [u8],
    /// Bytes the frame took from the buffer.
    pub len: usize,
}

/// The byte stream cannot be Modbus TCP: no frame boundary can be trusted after this, so
/// the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("protocol id {0} (Modbus is 0)")]
    Protocol(u16),
    #[error("length field {0} (2 to 254 for unit id and PDU)")]
    Length(u16),
}

/// The first whole frame in `buf`, `Ok(None)` when more bytes are needed.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame<'_>>, StreamError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let protocol = u16::from_be_bytes([buf[2], buf[3]]);
    if protocol != 0 {
        return Err(StreamError::Protocol(protocol));
    }
    let length = u16::from_be_bytes([buf[4], buf[5]]);
    if !(2..=(MAX_PDU as u16 + 1)).contains(&length) {
        return Err(StreamError::Length(length));
    }
    let len = 6 + usize::from(length);
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame {
        tid: u16::from_be_bytes([buf[0], buf[1]]),
        unit: buf[6],
        pdu: &buf[HEADER_LEN..len],
        len,
    }))
}

/// What a reply PDU says about its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A read's registers, or a write's echo (the values written).
    Registers(Vec<u16>),
    Exception(u8),
    /// Not a well-formed answer to this request (function, byte count, length or echo).
    Mismatch,
}

/// Checks `pdu` as the answer to `req` (Modbus Application Protocol 1.1b3, 6.3, 6.4,
/// 6.6, 6.12, 7).
pub fn decode_reply(req: &Transaction, pdu: &[u8]) -> Reply {
    let function = function(req);
    match pdu {
        [f, code] if *f == function | 0x80 => return Reply::Exception(*code),
        [f, ..] if *f == function => {}
        _ => return Reply::Mismatch,
    }
    match req {
        Transaction::Read(r) => {
            let want = usize::from(r.count) * 2;
            if pdu.len() != 2 + want || usize::from(pdu[1]) != want {
                return Reply::Mismatch;
            }
            Reply::Registers(
                pdu[2..]
                    .chunks_exact(2)
                    .map(|w| u16::from_be_bytes([w[0], w[1]]))
                    .collect(),
            )
        }
        Transaction::Write { values, .. } => {
            // The echo is the request's first five bytes: address and value (06) or
            // address and quantity (16).
            let mut sent = Vec::with_capacity(HEADER_LEN + 14);
            encode(req, 0, &mut sent);
            if pdu.len() == 5 && pdu == &sent[HEADER_LEN..HEADER_LEN + 5] {
                Reply::Registers(values.to_vec())
            } else {
                Reply::Mismatch
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(unit: u8, start: u16, count: u16) -> Transaction {
        Transaction::Read(ReadRequest {
            unit,
            kind: RegisterKind::Holding,
            start,
            count,
        })
    }

    fn write(unit: u8, start: u16, values: &[u16]) -> Transaction {
        Transaction::Write {
            unit,
            start,
            values: heapless::Vec::from_slice(values).unwrap(),
        }
    }

    #[test]
    fn a_read_request_encodes_as_the_specification_example() {
        // Messaging Implementation Guide, 3.1.3: read 3 holding registers at 0x006B.
        let mut out = Vec::new();
        encode(&read(0x11, 0x006B, 3), 0x0001, &mut out);
        assert_eq!(out, [0, 1, 0, 0, 0, 6, 0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]);
    }

    #[test]
    fn writes_encode_as_function_6_for_one_register_and_16_for_more() {
        let mut one = Vec::new();
        encode(&write(1, 0x0100, &[0xABCD]), 7, &mut one);
        assert_eq!(one, [0, 7, 0, 0, 0, 6, 1, 0x06, 0x01, 0x00, 0xAB, 0xCD]);
        let mut two = Vec::new();
        encode(&write(1, 0x0100, &[1, 2]), 8, &mut two);
        assert_eq!(
            two,
            [0, 8, 0, 0, 0, 11, 1, 0x10, 0x01, 0x00, 0, 2, 4, 0, 1, 0, 2]
        );
    }

    #[test]
    fn a_frame_split_across_reads_is_found_only_once_whole() {
        let bytes = [0, 9, 0, 0, 0, 7, 3, 0x03, 4, 0, 1, 0, 2, 0xEE];
        for cut in 0..13 {
            assert_eq!(next_frame(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let f = next_frame(&bytes).unwrap().unwrap();
        assert_eq!((f.tid, f.unit, f.pdu, f.len), (9, 3, &bytes[7..13], 13));
    }

    #[test]
    fn a_stream_that_is_not_modbus_tcp_is_refused() {
        assert_eq!(
            next_frame(&[0, 1, 0, 7, 0, 6, 1, 3, 0, 0, 0, 1]),
            Err(StreamError::Protocol(7))
        );
        assert_eq!(
            next_frame(&[0, 1, 0, 0, 0, 1, 1]),
            Err(StreamError::Length(1))
        );
        assert_eq!(
            next_frame(&[0, 1, 0, 0, 1, 0, 1]),
            Err(StreamError::Length(256))
        );
    }

    #[test]
    fn a_read_reply_of_the_wrong_length_or_function_is_a_mismatch() {
        let req = read(1, 0, 2);
        assert_eq!(
            decode_reply(&req, &[3, 4, 0, 1, 0, 2]),
            Reply::Registers(vec![1, 2])
        );
        // The answer to a read of one register (a late reply to a probe, say).
        assert_eq!(decode_reply(&req, &[3, 2, 0, 1]), Reply::Mismatch);
        assert_eq!(decode_reply(&req, &[3, 4, 0, 1, 0]), Reply::Mismatch);
        assert_eq!(decode_reply(&req, &[4, 4, 0, 1, 0, 2]), Reply::Mismatch);
        assert_eq!(decode_reply(&req, &[0x83, 2]), Reply::Exception(2));
        assert_eq!(decode_reply(&req, &[0x84, 2]), Reply::Mismatch);
        assert_eq!(decode_reply(&req, &[]), Reply::Mismatch);
    }

    #[test]
    fn a_write_is_answered_only_by_its_own_echo() {
        let one = write(1, 0x10, &[5]);
        assert_eq!(
            decode_reply(&one, &[6, 0, 0x10, 0, 5]),
            Reply::Registers(vec![5])
        );
        assert_eq!(decode_reply(&one, &[6, 0, 0x10, 0, 6]), Reply::Mismatch);
        let many = write(1, 0x10, &[5, 6]);
        assert_eq!(
            decode_reply(&many, &[0x10, 0, 0x10, 0, 2]),
            Reply::Registers(vec![5, 6])
        );
        assert_eq!(decode_reply(&many, &[0x10, 0, 0x10, 0, 3]), Reply::Mismatch);
        assert_eq!(decode_reply(&many, &[0x90, 4]), Reply::Exception(4));
    }

    proptest! {
        #[test]
        fn no_bytes_panic_the_framing_or_the_reply_check(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(f)) = next_frame(&bytes) {
                prop_assert!(f.len <= bytes.len());
                let _ = decode_reply(&read(f.unit, 0, 3), f.pdu);
                let _ = decode_reply(&write(f.unit, 0, &[1, 2]), f.pdu);
            }
        }

        #[test]
        fn every_request_frames_back_whole(tid: u16, unit: u8, start: u16, count in 1u16..=125) {
            let mut out = Vec::new();
            encode(&read(unit, start, count), tid, &mut out);
            let f = next_frame(&out).unwrap().unwrap();
            prop_assert_eq!((f.tid, f.unit, f.len), (tid, unit, out.len()));
        }
    }
}
