//! The SDO server of one node: expedited and segmented upload and download
//! (CiA 301 v4.2, 7.2.4.3). Block transfer is not implemented (its command specifiers
//! answer 0x05040001).
//!
//! Requests come on 0x600 + node, responses go on 0x580 + node; both are always 8 bytes
//! (a request of another length is ignored, as CANopen stacks do). The server holds at most
//! one segmented transfer; a new initiate request replaces it, an abort request from the
//! client ends it without an answer.
//!
//! Its own framing, written from the standard, not shared with the gateway's client, so a
//! framing mistake on either side shows in the tests.

use super::od::{AbortCode, Entry};

/// Command specifiers of requests (ccs, bits 7-5 of byte 0; CiA 301 v4.2, 7.2.4.3.3-16).
mod ccs {
    pub const DOWNLOAD_SEGMENT: u8 = 0;
    pub const INITIATE_DOWNLOAD: u8 = 1;
    pub const INITIATE_UPLOAD: u8 = 2;
    pub const UPLOAD_SEGMENT: u8 = 3;
    pub const ABORT: u8 = 4;
}

/// Response byte 0 of an initiate download (scs 3).
const SCS_INITIATE_DOWNLOAD: u8 = 3 << 5;
/// Response byte 0 base of a download segment (scs 1).
const SCS_DOWNLOAD_SEGMENT: u8 = 1 << 5;
/// Response byte 0 base of an initiate upload (scs 2).
const SCS_INITIATE_UPLOAD: u8 = 2 << 5;
/// Response byte 0 base of an upload segment (scs 0).
const SCS_UPLOAD_SEGMENT: u8 = 0;
/// Byte 0 of an abort transfer (cs 4).
pub const CS_ABORT: u8 = 4 << 5;
/// Initiate: e, expedited transfer.
const EXPEDITED: u8 = 0x02;
/// Initiate: s, size indicated; segment: c, no more segments.
const SIZE_OR_LAST: u8 = 0x01;
/// Segment: t, the toggle bit.
const TOGGLE: u8 = 0x10;
/// Longest segmented download accepted (no object here is longer than 4 bytes, but a
/// string object could be; past this the server runs "out of memory").
pub const MAX_DOWNLOAD: usize = 1024;

/// What the SDO server needs from the node: the dictionary entries and their values.
pub trait Dictionary {
    /// The entry of `index:sub`, or the abort code for a missing object.
    fn entry(&self, index: u16, sub: u8) -> Result<Entry, AbortCode>;
    /// The whole value of a readable object, little-endian.
    fn read(&mut self, entry: &Entry) -> Vec<u8>;
    /// Stores a value of the entry's size into a writable object; the node may still
    /// refuse the value (0x06090030).
    fn write(&mut self, entry: &Entry, data: &[u8]) -> Result<(), AbortCode>;
}

#[derive(Debug, Clone)]
enum Transfer {
    Upload {
        data: Vec<u8>,
        sent: usize,
        toggle: bool,
    },
    Download {
        entry: Entry,
        /// The size the client announced in the initiate request, if it did.
        announced: Option<usize>,
        data: Vec<u8>,
        toggle: bool,
    },
}

/// The SDO server state of one node.
#[derive(Debug, Clone, Default)]
pub struct SdoServer {
    transfer: Option<Transfer>,
    /// Multiplexer (index, sub) of the last initiate request: segment responses and
    /// aborts during a segmented transfer name it.
    mux: (u16, u8),
}

impl SdoServer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any transfer in progress (NMT stop or reset).
    pub fn reset(&mut self) {
        self.transfer = None;
    }

    /// True while a segmented transfer is in progress.
    pub fn is_busy(&self) -> bool {
        self.transfer.is_some()
    }

    /// Answers one request frame (data of a frame on 0x600 + node). `None`: no answer
    /// (a frame that is not 8 bytes long, or an abort from the client).
    pub fn handle(&mut self, request: &[u8], dict: &mut impl Dictionary) -> Option<[u8; 8]> {
        let req: [u8; 8] = request.try_into().ok()?;
        let response = match req[0] >> 5 {
            ccs::INITIATE_DOWNLOAD => self.initiate_download(&req, dict),
            ccs::DOWNLOAD_SEGMENT => self.download_segment(&req, dict),
            ccs::INITIATE_UPLOAD => self.initiate_upload(&req, dict),
            ccs::UPLOAD_SEGMENT => self.upload_segment(&req),
            ccs::ABORT => {
                self.transfer = None;
                return None;
            }
            // 5 and 6 are block upload and download (their initiate requests carry the
            // multiplexer, which the abort names), 7 is undefined.
            _ => {
                self.start(&req);
                Err(AbortCode::UNKNOWN_COMMAND)
            }
        };
        Some(response.unwrap_or_else(|code| {
            self.transfer = None;
            abort_frame(self.mux, code)
        }))
    }

    fn start(&mut self, req: &[u8; 8]) -> (u16, u8) {
        // A new initiate request ends whatever transfer was running.
        self.transfer = None;
        self.mux = (u16::from_le_bytes([req[1], req[2]]), req[3]);
        self.mux
    }

    fn initiate_download(
        &mut self,
        req: &[u8; 8],
        dict: &mut impl Dictionary,
    ) -> Result<[u8; 8], AbortCode> {
        let (index, sub) = self.start(req);
        let entry = dict.entry(index, sub)?;
        if !entry.access.is_writable() {
            return Err(AbortCode::READ_ONLY);
        }
        let sized = req[0] & SIZE_OR_LAST != 0;
        if req[0] & EXPEDITED != 0 {
            // n (bits 3-2) bytes of 4..8 hold no data when s is set; without s the
            // length is unspecified and the object's own size is taken.
            let len = if sized {
                4 - usize::from((req[0] >> 2) & 0x03)
            } else {
                entry.len.unwrap_or(4)
            };
            if len > 4 || entry.len.is_some_and(|l| l != len) {
                return Err(AbortCode::LENGTH_MISMATCH);
            }
            dict.write(&entry, &req[4..4 + len])?;
        } else {
            let announced = sized.then(|| u32::from_le_bytes([req[4], req[5], req[6], req[7]]));
            let announced = announced.map(|s| s as usize);
            if let (Some(size), Some(len)) = (announced, entry.len) {
                if size != len {
                    return Err(AbortCode::LENGTH_MISMATCH);
                }
            }
            if announced.is_some_and(|s| s > MAX_DOWNLOAD) {
                return Err(AbortCode::OUT_OF_MEMORY);
            }
            self.transfer = Some(Transfer::Download {
                entry,
                announced,
                data: Vec::new(),
                toggle: false,
            });
        }
        Ok(response(SCS_INITIATE_DOWNLOAD, self.mux, [0; 4]))
    }

    fn download_segment(
        &mut self,
        req: &[u8; 8],
        dict: &mut impl Dictionary,
    ) -> Result<[u8; 8], AbortCode> {
        let Some(Transfer::Download {
            entry,
            announced,
            data,
            toggle,
        }) = self.transfer.as_mut()
        else {
            return Err(AbortCode::UNKNOWN_COMMAND);
        };
        let t = req[0] & TOGGLE != 0;
        if t != *toggle {
            return Err(AbortCode::TOGGLE_BIT);
        }
        // n (bits 3-1) bytes of 1..8 hold no data.
        let n = usize::from((req[0] >> 1) & 0x07);
        data.extend_from_slice(&req[1..8 - n]);
        let limit = entry.len.or(*announced).unwrap_or(MAX_DOWNLOAD);
        if data.len() > limit {
            return Err(if entry.len.is_some() || announced.is_some() {
                AbortCode::LENGTH_MISMATCH
            } else {
                AbortCode::OUT_OF_MEMORY
            });
        }
        let answer = [
            SCS_DOWNLOAD_SEGMENT | (req[0] & TOGGLE),
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        *toggle = !*toggle;
        if req[0] & SIZE_OR_LAST != 0 {
            let (entry, data) = (*entry, std::mem::take(data));
            let expected = entry.len.or(*announced);
            self.transfer = None;
            if expected.is_some_and(|l| l != data.len()) {
                return Err(AbortCode::LENGTH_MISMATCH);
            }
            dict.write(&entry, &data)?;
        }
        Ok(answer)
    }

    fn initiate_upload(
        &mut self,
        req: &[u8; 8],
        dict: &mut impl Dictionary,
    ) -> Result<[u8; 8], AbortCode> {
        let mux = self.start(req);
        let entry = dict.entry(mux.0, mux.1)?;
        if !entry.access.is_readable() {
            return Err(AbortCode::WRITE_ONLY);
        }
        // Read once at the initiate request: every segment comes from the same value.
        let value = dict.read(&entry);
        if (1..=4).contains(&value.len()) {
            // Expedited with size: n = 4 - len unused bytes.
            let n = (4 - value.len()) as u8;
            let mut d = [0u8; 4];
            d[..value.len()].copy_from_slice(&value);
            return Ok(response(
                SCS_INITIATE_UPLOAD | (n << 2) | EXPEDITED | SIZE_OR_LAST,
                mux,
                d,
            ));
        }
        // Segmented with size indicated; values are far below 4 GiB.
        let size = (value.len() as u32).to_le_bytes();
        self.transfer = Some(Transfer::Upload {
            data: value,
            sent: 0,
            toggle: false,
        });
        Ok(response(SCS_INITIATE_UPLOAD | SIZE_OR_LAST, mux, size))
    }

    fn upload_segment(&mut self, req: &[u8; 8]) -> Result<[u8; 8], AbortCode> {
        let Some(Transfer::Upload { data, sent, toggle }) = self.transfer.as_mut() else {
            return Err(AbortCode::UNKNOWN_COMMAND);
        };
        let t = req[0] & TOGGLE != 0;
        if t != *toggle {
            return Err(AbortCode::TOGGLE_BIT);
        }
        let chunk = &data[*sent..(*sent + 7).min(data.len())];
        let last = *sent + chunk.len() == data.len();
        let n = (7 - chunk.len()) as u8;
        let mut answer = [0u8; 8];
        answer[0] = SCS_UPLOAD_SEGMENT | (req[0] & TOGGLE) | (n << 1) | u8::from(last);
        answer[1..1 + chunk.len()].copy_from_slice(chunk);
        *sent += chunk.len();
        *toggle = !*toggle;
        if last {
            self.transfer = None;
        }
        Ok(answer)
    }
}

fn response(cs: u8, (index, sub): (u16, u8), data: [u8; 4]) -> [u8; 8] {
    let i = index.to_le_bytes();
    [cs, i[0], i[1], sub, data[0], data[1], data[2], data[3]]
}

/// An abort transfer frame: cs 0x80, the multiplexer, the code little-endian.
pub fn abort_frame(mux: (u16, u8), code: AbortCode) -> [u8; 8] {
    response(CS_ABORT, mux, code.0.to_le_bytes())
}

/// True when `response` is an abort transfer frame.
pub fn is_abort(response: &[u8; 8]) -> bool {
    response[0] == CS_ABORT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canopen::od::{self, Access, Object};

    /// A dictionary of 1008 (a string), 1017 (u16 rw) and 6041 (u16 ro), plus one
    /// write-only object 0x2FFF for the abort the real node never needs.
    struct Dict {
        heartbeat: u16,
        writes: usize,
    }

    impl Dictionary for Dict {
        fn entry(&self, index: u16, sub: u8) -> Result<Entry, AbortCode> {
            if (index, sub) == (0x2FFF, 0) {
                return Ok(Entry {
                    object: Object::TargetPosition,
                    access: Access::WriteOnly,
                    len: Some(4),
                });
            }
            od::lookup(index, sub)
        }

        fn read(&mut self, entry: &Entry) -> Vec<u8> {
            match entry.object {
                Object::DeviceName => od::DEVICE_NAME.as_bytes().to_vec(),
                Object::HeartbeatTime => self.heartbeat.to_le_bytes().to_vec(),
                _ => vec![0x37, 0x02],
            }
        }

        fn write(&mut self, entry: &Entry, data: &[u8]) -> Result<(), AbortCode> {
            self.writes += 1;
            match entry.object {
                Object::HeartbeatTime => {
                    self.heartbeat = u16::from_le_bytes([data[0], data[1]]);
                    Ok(())
                }
                _ => Err(AbortCode::INVALID_VALUE),
            }
        }
    }

    fn dict() -> Dict {
        Dict {
            heartbeat: 100,
            writes: 0,
        }
    }

    fn abort_code(r: [u8; 8]) -> Option<u32> {
        is_abort(&r).then(|| u32::from_le_bytes([r[4], r[5], r[6], r[7]]))
    }

    #[test]
    fn an_expedited_upload_answers_with_the_value_and_its_size() {
        // Given a statusword read (CiA 301 7.2.4.3.6: 0x4B = scs 2, n 2, e, s)
        let mut s = SdoServer::new();
        let r = s.handle(&[0x40, 0x41, 0x60, 0, 0, 0, 0, 0], &mut dict());
        assert_eq!(r, Some([0x4B, 0x41, 0x60, 0x00, 0x37, 0x02, 0, 0]));
        assert!(!s.is_busy());
    }

    #[test]
    fn a_segmented_upload_of_the_device_name_alternates_the_toggle_and_ends_with_c() {
        let mut s = SdoServer::new();
        let mut d = dict();
        // Given the initiate response with the size (22 bytes)
        let r = s
            .handle(&[0x40, 0x08, 0x10, 0, 0, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(r, [0x41, 0x08, 0x10, 0x00, 22, 0, 0, 0]);
        // When the client asks for segments with toggles 0, 1, 0, 1
        let mut got = Vec::new();
        let mut toggle = 0u8;
        loop {
            let r = s
                .handle(&[0x60 | toggle, 0, 0, 0, 0, 0, 0, 0], &mut d)
                .unwrap();
            assert_eq!(r[0] & 0xE0, 0x00, "scs 0");
            assert_eq!(r[0] & 0x10, toggle, "the toggle echoes the request's");
            let n = usize::from((r[0] >> 1) & 0x07);
            got.extend_from_slice(&r[1..8 - n]);
            toggle ^= 0x10;
            if r[0] & 0x01 != 0 {
                break;
            }
        }
        // Then the whole string arrived in 4 segments (7 + 7 + 7 + 1 bytes)
        assert_eq!(got, od::DEVICE_NAME.as_bytes());
        assert!(!s.is_busy());
        // And a further segment request is an unknown command
        let r = s.handle(&[0x60, 0, 0, 0, 0, 0, 0, 0], &mut d).unwrap();
        assert_eq!(abort_code(r), Some(0x0504_0001));
    }

    #[test]
    fn a_repeated_toggle_aborts_the_upload() {
        let mut s = SdoServer::new();
        let mut d = dict();
        s.handle(&[0x40, 0x08, 0x10, 0, 0, 0, 0, 0], &mut d);
        s.handle(&[0x60, 0, 0, 0, 0, 0, 0, 0], &mut d);
        // The second segment request should have toggle 1
        let r = s.handle(&[0x60, 0, 0, 0, 0, 0, 0, 0], &mut d).unwrap();
        assert_eq!(r[..4], [0x80, 0x08, 0x10, 0x00], "the abort names 1008:00");
        assert_eq!(abort_code(r), Some(0x0503_0000));
        assert!(!s.is_busy());
    }

    #[test]
    fn an_expedited_download_writes_and_confirms() {
        let mut s = SdoServer::new();
        let mut d = dict();
        // 0x2B: ccs 1, n 2, e, s: two bytes, 250 ms
        let r = s.handle(&[0x2B, 0x17, 0x10, 0, 0xFA, 0, 0, 0], &mut d);
        assert_eq!(r, Some([0x60, 0x17, 0x10, 0, 0, 0, 0, 0]));
        assert_eq!(d.heartbeat, 250);
        // Without the size bit the object's own size is taken (bytes 6-7 ignored)
        let r = s.handle(&[0x22, 0x17, 0x10, 0, 0x2C, 0x01, 0xEE, 0xEE], &mut d);
        assert_eq!(r, Some([0x60, 0x17, 0x10, 0, 0, 0, 0, 0]));
        assert_eq!(d.heartbeat, 300);
    }

    #[test]
    fn downloads_of_the_wrong_length_or_to_read_only_objects_abort() {
        let mut s = SdoServer::new();
        let mut d = dict();
        // 4 bytes (0x23) into a u16
        let r = s
            .handle(&[0x23, 0x17, 0x10, 0, 1, 2, 3, 4], &mut d)
            .unwrap();
        assert_eq!(abort_code(r), Some(0x0607_0010));
        // 1 byte (0x2F) into a u16
        let r = s
            .handle(&[0x2F, 0x17, 0x10, 0, 1, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(abort_code(r), Some(0x0607_0010));
        // The statusword is read-only
        let r = s
            .handle(&[0x2B, 0x41, 0x60, 0, 1, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(r[..4], [0x80, 0x41, 0x60, 0x00]);
        assert_eq!(abort_code(r), Some(0x0601_0002));
        assert_eq!(d.writes, 0);
    }

    #[test]
    fn a_segmented_download_is_checked_against_the_size_and_then_written() {
        let mut s = SdoServer::new();
        let mut d = dict();
        // Given an initiate with size 2 (0x21: ccs 1, s)
        let r = s
            .handle(&[0x21, 0x17, 0x10, 0, 2, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(r, [0x60, 0x17, 0x10, 0, 0, 0, 0, 0]);
        // When the only segment carries 2 bytes (n = 5, c = 1, t = 0)
        let r = s
            .handle(&[(5 << 1) | 1, 0xE8, 0x03, 0, 0, 0, 0, 0], &mut d)
            .unwrap();
        // Then it is confirmed with toggle 0 and stored
        assert_eq!(r, [0x20, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.heartbeat, 1000);
        // An announced size that is not the object's is refused at once
        let r = s
            .handle(&[0x21, 0x17, 0x10, 0, 5, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(abort_code(r), Some(0x0607_0010));
        // Without a size, too many bytes abort at the segment
        s.handle(&[0x20, 0x17, 0x10, 0, 0, 0, 0, 0], &mut d);
        let r = s.handle(&[0x00, 1, 2, 3, 4, 5, 6, 7], &mut d).unwrap();
        assert_eq!(r[..4], [0x80, 0x17, 0x10, 0x00]);
        assert_eq!(abort_code(r), Some(0x0607_0010));
        assert_eq!(d.heartbeat, 1000);
    }

    #[test]
    fn a_segmented_download_with_a_wrong_toggle_aborts() {
        let mut s = SdoServer::new();
        let mut d = dict();
        s.handle(&[0x20, 0x17, 0x10, 0, 0, 0, 0, 0], &mut d);
        let r = s.handle(&[0x10 | (6 << 1), 0xE8, 0, 0, 0, 0, 0, 0], &mut d);
        assert_eq!(abort_code(r.unwrap()), Some(0x0503_0000));
        assert!(!s.is_busy());
    }

    #[test]
    fn missing_objects_write_only_objects_and_block_transfers_abort() {
        let mut s = SdoServer::new();
        let mut d = dict();
        let r = s
            .handle(&[0x40, 0x34, 0x12, 0, 0, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(r, [0x80, 0x34, 0x12, 0x00, 0x00, 0x00, 0x02, 0x06]);
        let r = s
            .handle(&[0x40, 0x41, 0x60, 7, 0, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(abort_code(r), Some(0x0609_0011));
        let r = s
            .handle(&[0x40, 0xFF, 0x2F, 0, 0, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(abort_code(r), Some(0x0601_0001));
        // ccs 5: block upload
        let r = s
            .handle(&[0xA0, 0x08, 0x10, 0, 0, 0, 0, 0], &mut d)
            .unwrap();
        assert_eq!(abort_code(r), Some(0x0504_0001));
        // ccs 7: undefined
        let r = s.handle(&[0xE0, 0, 0, 0, 0, 0, 0, 0], &mut d).unwrap();
        assert_eq!(abort_code(r), Some(0x0504_0001));
    }

    #[test]
    fn a_client_abort_ends_the_transfer_silently_and_short_frames_are_ignored() {
        let mut s = SdoServer::new();
        let mut d = dict();
        s.handle(&[0x40, 0x08, 0x10, 0, 0, 0, 0, 0], &mut d);
        assert!(s.is_busy());
        assert_eq!(
            s.handle(&[0x80, 0x08, 0x10, 0, 0, 0, 4, 5], &mut d),
            None,
            "no answer to an abort"
        );
        assert!(!s.is_busy());
        assert_eq!(s.handle(&[0x40, 0x08, 0x10, 0], &mut d), None);
        assert_eq!(s.handle(&[], &mut d), None);
    }

    #[test]
    fn any_request_bytes_get_an_answer_or_silence_but_never_a_panic() {
        let mut s = SdoServer::new();
        let mut d = dict();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..50_000 {
            let mut req = [0u8; 8];
            rng.fill(&mut req);
            // Bias towards real objects so that transfers get going.
            if rng.bool() {
                req[1..3].copy_from_slice(&[0x08, 0x10]);
                req[3] = 0;
            }
            let len = if rng.u8(..10) == 0 { rng.usize(..8) } else { 8 };
            let _ = s.handle(&req[..len], &mut d);
        }
    }
}
