//! SDO client for one node: expedited and segmented upload and download
//! (CiA 301 v4.2, 7.2.4.3). Block transfer is not implemented.
//!
//! Requests go on 0x600 + node, responses come on 0x580 + node, always 8 bytes. One
//! transfer at a time: the client is idle, or in one upload or download.
//!
//! Usage (sans-IO, as quinn-proto):
//! - [`SdoClient::start_upload`] / [`SdoClient::start_download`] return the first frame to
//!   send; the timeout given there applies to each response from then on.
//! - [`SdoClient::handle_frame`] with every frame from the bus (others are ignored) returns
//!   an [`SdoEvent`]: the next frame to send, the end of the transfer, or an abort.
//! - [`SdoClient::poll_timeout`] says when to call [`SdoClient::handle_timeout`], which
//!   aborts the transfer (abort frame out, code 0x05040000) when the response is late.
//!
//! Bytes from the server never panic: a wrong length, an unknown command, the wrong
//! multiplexer or a toggle error abort the transfer with the matching abort code, and the
//! client returns an abort frame to send.

use std::fmt;
use std::time::{Duration, Instant};

use crate::frame::{cob, Frame, NodeId};

/// Largest upload the client accepts (the server's size, or the bytes received so far);
/// past it the transfer is aborted with "out of memory".
pub const MAX_TRANSFER: usize = 64 * 1024;

// Command specifier bytes (CiA 301 v4.2, 7.2.4.3.3 .. 7.2.4.3.17); bits 7..5 are the ccs/scs.
/// ccs 1: initiate download request.
const CCS_INITIATE_DOWNLOAD: u8 = 1 << 5;
/// ccs 0: download segment request.
const CCS_DOWNLOAD_SEGMENT: u8 = 0;
/// ccs 2: initiate upload request.
const CCS_INITIATE_UPLOAD: u8 = 2 << 5;
/// ccs 3: upload segment request.
const CCS_UPLOAD_SEGMENT: u8 = 3 << 5;
/// cs 4: abort transfer (both directions).
const CS_ABORT: u8 = 4 << 5;
/// scs 0: upload segment response.
const SCS_UPLOAD_SEGMENT: u8 = 0;
/// scs 1: download segment response.
const SCS_DOWNLOAD_SEGMENT: u8 = 1;
/// scs 2: initiate upload response.
const SCS_INITIATE_UPLOAD: u8 = 2;
/// scs 3: initiate download response.
const SCS_INITIATE_DOWNLOAD: u8 = 3;
/// Bit 4 of a segment command: the toggle bit.
const TOGGLE: u8 = 0x10;
/// Bit 1 of an initiate command: expedited.
const EXPEDITED: u8 = 0x02;
/// Bit 0 of an initiate command: size indicated; of a segment command: last segment.
const SIZE_OR_LAST: u8 = 0x01;

/// An SDO abort code (CiA 301 v4.2, table 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AbortCode(pub u32);

impl AbortCode {
    /// Toggle bit not alternated.
    pub const TOGGLE_BIT: Self = Self(0x0503_0000);
    /// SDO protocol timed out.
    pub const TIMEOUT: Self = Self(0x0504_0000);
    /// Client/server command specifier not valid or unknown.
    pub const INVALID_COMMAND: Self = Self(0x0504_0001);
    /// Out of memory.
    pub const OUT_OF_MEMORY: Self = Self(0x0504_0005);
    /// Unsupported access to an object.
    pub const UNSUPPORTED_ACCESS: Self = Self(0x0601_0000);
    /// Attempt to read a write-only object.
    pub const WRITE_ONLY: Self = Self(0x0601_0001);
    /// Attempt to write a read-only object.
    pub const READ_ONLY: Self = Self(0x0601_0002);
    /// Object does not exist in the object dictionary.
    pub const NO_OBJECT: Self = Self(0x0602_0000);
    /// Object cannot be mapped to the PDO.
    pub const NOT_MAPPABLE: Self = Self(0x0604_0041);
    /// Data type does not match, length of service parameter does not match.
    pub const LENGTH_MISMATCH: Self = Self(0x0607_0010);
    /// Data type does not match, length of service parameter too high.
    pub const LENGTH_TOO_HIGH: Self = Self(0x0607_0012);
    /// Data type does not match, length of service parameter too low.
    pub const LENGTH_TOO_LOW: Self = Self(0x0607_0013);
    /// Sub-index does not exist.
    pub const NO_SUB_INDEX: Self = Self(0x0609_0011);
    /// Invalid value for parameter (download only).
    pub const INVALID_VALUE: Self = Self(0x0609_0030);
    /// Value of parameter written too high.
    pub const VALUE_TOO_HIGH: Self = Self(0x0609_0031);
    /// Value of parameter written too low.
    pub const VALUE_TOO_LOW: Self = Self(0x0609_0032);
    /// General error.
    pub const GENERAL: Self = Self(0x0800_0000);
    /// Data cannot be transferred or stored to the application.
    pub const CANNOT_STORE: Self = Self(0x0800_0020);
    /// ... because of the present device state.
    pub const DEVICE_STATE: Self = Self(0x0800_0022);

    /// A readable description of the common codes ("unknown abort code" otherwise).
    pub fn description(self) -> &'static str {
        match self.0 {
            0x0503_0000 => "toggle bit not alternated",
            0x0504_0000 => "SDO protocol timed out",
            0x0504_0001 => "command specifier not valid or unknown",
            0x0504_0002 => "invalid block size",
            0x0504_0003 => "invalid sequence number",
            0x0504_0004 => "CRC error",
            0x0504_0005 => "out of memory",
            0x0601_0000 => "unsupported access to an object",
            0x0601_0001 => "attempt to read a write only object",
            0x0601_0002 => "attempt to write a read only object",
            0x0602_0000 => "object does not exist",
            0x0604_0041 => "object cannot be mapped to the PDO",
            0x0604_0042 => "number and length of objects to be mapped exceed PDO length",
            0x0604_0043 => "general parameter incompatibility",
            0x0604_0047 => "general internal incompatibility in the device",
            0x0606_0000 => "access failed due to a hardware error",
            0x0607_0010 => "data type does not match, length does not match",
            0x0607_0012 => "data type does not match, length too high",
            0x0607_0013 => "data type does not match, length too low",
            0x0609_0011 => "sub-index does not exist",
            0x0609_0030 => "invalid value for parameter",
            0x0609_0031 => "value of parameter written too high",
            0x0609_0032 => "value of parameter written too low",
            0x0609_0036 => "maximum value is less than minimum value",
            0x060A_0023 => "resource not available: SDO connection",
            0x0800_0000 => "general error",
            0x0800_0020 => "data cannot be transferred or stored to the application",
            0x0800_0021 => "data cannot be transferred or stored (local control)",
            0x0800_0022 => "data cannot be transferred or stored (present device state)",
            0x0800_0023 => "object dictionary not present or its generation failed",
            0x0800_0024 => "no data available",
            _ => "unknown abort code",
        }
    }
}

impl fmt::Display for AbortCode {
    /// `0x06020000 (object does not exist)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x} ({})", self.0, self.description())
    }
}

/// Why a transfer could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdoError {
    #[error("an SDO transfer to node {node} is already running ({index:#06x}:{sub})")]
    Busy { node: NodeId, index: u16, sub: u8 },
    #[error("SDO download of {len} bytes is larger than {MAX_TRANSFER} bytes")]
    TooLong { len: usize },
    #[error("node {0} is not configured")]
    UnknownNode(NodeId),
}

/// What a response (or a timeout) means for the transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdoEvent {
    /// Send this frame (the next segment or segment request); the transfer goes on.
    NextFrame(Frame),
    /// The upload finished with these bytes.
    Uploaded(Vec<u8>),
    /// The download finished: the server has the data.
    Downloaded,
    /// The transfer ended with an abort. `by_server`: the server sent it (nothing to
    /// send); otherwise the client aborted (bad response, timeout) and `frame` is the
    /// abort frame to send to the server.
    Aborted {
        index: u16,
        sub: u8,
        code: AbortCode,
        by_server: bool,
        frame: Option<Frame>,
    },
}

#[derive(Debug, Clone)]
enum Transfer {
    /// Waiting for the initiate upload response, then for upload segments.
    Upload {
        initiated: bool,
        toggle: bool,
        size: Option<usize>,
        data: Vec<u8>,
    },
    /// Waiting for the initiate download response, then for segment responses.
    Download {
        initiated: bool,
        toggle: bool,
        data: Vec<u8>,
        /// Bytes already sent in segments (the last sent segment included).
        sent: usize,
        expedited: bool,
    },
}

#[derive(Debug, Clone)]
struct Active {
    index: u16,
    sub: u8,
    timeout: Duration,
    deadline: Option<Instant>,
    transfer: Transfer,
}

/// The SDO client of one server node.
#[derive(Debug, Clone)]
pub struct SdoClient {
    node: NodeId,
    active: Option<Active>,
}

impl SdoClient {
    pub fn new(node: NodeId) -> Self {
        Self { node, active: None }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn is_idle(&self) -> bool {
        self.active.is_none()
    }

    /// The object of the running transfer.
    pub fn current(&self) -> Option<(u16, u8)> {
        self.active.as_ref().map(|a| (a.index, a.sub))
    }

    /// Starts reading `index:sub`. Each response must come within `timeout`.
    pub fn start_upload(
        &mut self,
        index: u16,
        sub: u8,
        timeout: Duration,
        now: Instant,
    ) -> Result<Frame, SdoError> {
        self.check_idle()?;
        self.active = Some(Active {
            index,
            sub,
            timeout,
            deadline: now.checked_add(timeout),
            transfer: Transfer::Upload {
                initiated: false,
                toggle: false,
                size: None,
                data: Vec::new(),
            },
        });
        Ok(self.request(CCS_INITIATE_UPLOAD, index, sub, [0; 4]))
    }

    /// Starts writing `data` to `index:sub`: expedited up to 4 bytes, segmented above
    /// (an empty `data` is a segmented transfer of size 0). Each response must come within
    /// `timeout`.
    pub fn start_download(
        &mut self,
        index: u16,
        sub: u8,
        data: &[u8],
        timeout: Duration,
        now: Instant,
    ) -> Result<Frame, SdoError> {
        self.check_idle()?;
        if data.len() > MAX_TRANSFER {
            return Err(SdoError::TooLong { len: data.len() });
        }
        let expedited = (1..=4).contains(&data.len());
        let frame = if expedited {
            // n = number of bytes in 4..8 that hold no data; e = 1, s = 1.
            let n = (4 - data.len()) as u8;
            let mut payload = [0u8; 4];
            payload[..data.len()].copy_from_slice(data);
            self.request(
                CCS_INITIATE_DOWNLOAD | (n << 2) | EXPEDITED | SIZE_OR_LAST,
                index,
                sub,
                payload,
            )
        } else {
            // Segmented: s = 1, size in bytes 4..8. data.len() <= MAX_TRANSFER fits u32.
            let size = (data.len() as u32).to_le_bytes();
            self.request(CCS_INITIATE_DOWNLOAD | SIZE_OR_LAST, index, sub, size)
        };
        self.active = Some(Active {
            index,
            sub,
            timeout,
            deadline: now.checked_add(timeout),
            transfer: Transfer::Download {
                initiated: false,
                toggle: false,
                data: data.to_vec(),
                sent: 0,
                expedited,
            },
        });
        Ok(frame)
    }

    /// Aborts the running transfer on the client's initiative (for example at shutdown).
    /// Returns the abort frame to send, or `None` when idle.
    pub fn abort(&mut self, code: AbortCode) -> Option<Frame> {
        let a = self.active.take()?;
        Some(self.abort_frame(a.index, a.sub, code))
    }

    /// When the response to the last frame sent is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.active.as_ref()?.deadline
    }

    /// Aborts the transfer with "SDO protocol timed out" if its response is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<SdoEvent> {
        let due = self.active.as_ref()?.deadline.is_some_and(|d| d <= now);
        if !due {
            return None;
        }
        Some(self.client_abort(AbortCode::TIMEOUT))
    }

    /// Feeds a frame from the bus. Frames that are not SDO responses of this node, and
    /// responses when no transfer runs (for example a late one after a timeout), give
    /// `None`.
    pub fn handle_frame(&mut self, frame: &Frame, now: Instant) -> Option<SdoEvent> {
        if frame.id() != self.node.cob_id(cob::SDO_TX) {
            return None;
        }
        let active = self.active.as_mut()?;
        let Ok(d) = <[u8; 8]>::try_from(frame.data()) else {
            return Some(self.client_abort(AbortCode::GENERAL));
        };
        let (index, sub) = (active.index, active.sub);
        let scs = d[0] >> 5;
        let mux_matches = u16::from_le_bytes([d[1], d[2]]) == index && d[3] == sub;
        if d[0] == CS_ABORT {
            self.active = None;
            return Some(SdoEvent::Aborted {
                index,
                sub,
                code: AbortCode(u32::from_le_bytes([d[4], d[5], d[6], d[7]])),
                by_server: true,
                frame: None,
            });
        }
        let outcome = match &mut active.transfer {
            Transfer::Upload {
                initiated: initiated @ false,
                toggle,
                size,
                data,
            } => {
                if scs != SCS_INITIATE_UPLOAD {
                    Err(AbortCode::INVALID_COMMAND)
                } else if !mux_matches {
                    Err(AbortCode::GENERAL)
                } else if d[0] & EXPEDITED != 0 {
                    // Expedited: n (bits 3..2) bytes of 4..8 are empty when s is set.
                    let len = if d[0] & SIZE_OR_LAST != 0 {
                        4 - usize::from((d[0] >> 2) & 0x03)
                    } else {
                        4
                    };
                    Ok(Step::Uploaded(d[4..4 + len].to_vec()))
                } else {
                    let announced = (d[0] & SIZE_OR_LAST != 0)
                        .then(|| u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize);
                    if announced.is_some_and(|s| s > MAX_TRANSFER) {
                        Err(AbortCode::OUT_OF_MEMORY)
                    } else {
                        *initiated = true;
                        *size = announced;
                        data.clear();
                        *toggle = false;
                        Ok(Step::Send(CCS_UPLOAD_SEGMENT, [0; 7]))
                    }
                }
            }
            Transfer::Upload {
                toggle, size, data, ..
            } => {
                if scs != SCS_UPLOAD_SEGMENT {
                    Err(AbortCode::INVALID_COMMAND)
                } else if (d[0] & TOGGLE != 0) != *toggle {
                    Err(AbortCode::TOGGLE_BIT)
                } else {
                    // n (bits 3..1) bytes of 1..8 hold no data.
                    let len = 7 - usize::from((d[0] >> 1) & 0x07);
                    data.extend_from_slice(&d[1..1 + len]);
                    let last = d[0] & SIZE_OR_LAST != 0;
                    if data.len() > size.unwrap_or(MAX_TRANSFER) {
                        Err(if size.is_some() {
                            AbortCode::LENGTH_TOO_HIGH
                        } else {
                            AbortCode::OUT_OF_MEMORY
                        })
                    } else if last {
                        if size.is_some_and(|s| s != data.len()) {
                            Err(AbortCode::LENGTH_TOO_LOW)
                        } else {
                            Ok(Step::Uploaded(std::mem::take(data)))
                        }
                    } else {
                        *toggle = !*toggle;
                        let t = if *toggle { TOGGLE } else { 0 };
                        Ok(Step::Send(CCS_UPLOAD_SEGMENT | t, [0; 7]))
                    }
                }
            }
            Transfer::Download {
                initiated,
                toggle,
                data,
                sent,
                expedited,
            } => {
                let expected_scs = if *initiated {
                    SCS_DOWNLOAD_SEGMENT
                } else {
                    SCS_INITIATE_DOWNLOAD
                };
                if scs != expected_scs {
                    Err(AbortCode::INVALID_COMMAND)
                } else if !*initiated && !mux_matches {
                    Err(AbortCode::GENERAL)
                } else if *initiated && (d[0] & TOGGLE != 0) != *toggle {
                    Err(AbortCode::TOGGLE_BIT)
                } else if *expedited || (*initiated && *sent >= data.len()) {
                    Ok(Step::Downloaded)
                } else {
                    if *initiated {
                        *toggle = !*toggle;
                    }
                    *initiated = true;
                    Ok(next_segment(data, sent, *toggle))
                }
            }
        };
        match outcome {
            Ok(Step::Send(cmd, payload)) => {
                active.deadline = now.checked_add(active.timeout);
                let mut bytes = [0u8; 8];
                bytes[0] = cmd;
                bytes[1..].copy_from_slice(&payload);
                Some(SdoEvent::NextFrame(Frame::known(
                    self.node.cob_id(cob::SDO_RX),
                    &bytes,
                )))
            }
            Ok(Step::Uploaded(data)) => {
                self.active = None;
                Some(SdoEvent::Uploaded(data))
            }
            Ok(Step::Downloaded) => {
                self.active = None;
                Some(SdoEvent::Downloaded)
            }
            Err(code) => Some(self.client_abort(code)),
        }
    }

    fn check_idle(&self) -> Result<(), SdoError> {
        match &self.active {
            Some(a) => Err(SdoError::Busy {
                node: self.node,
                index: a.index,
                sub: a.sub,
            }),
            None => Ok(()),
        }
    }

    fn request(&self, cmd: u8, index: u16, sub: u8, payload: [u8; 4]) -> Frame {
        let [i0, i1] = index.to_le_bytes();
        let [p0, p1, p2, p3] = payload;
        Frame::known(
            self.node.cob_id(cob::SDO_RX),
            &[cmd, i0, i1, sub, p0, p1, p2, p3],
        )
    }

    fn abort_frame(&self, index: u16, sub: u8, code: AbortCode) -> Frame {
        self.request(CS_ABORT, index, sub, code.0.to_le_bytes())
    }

    /// Ends the running transfer with an abort of ours.
    fn client_abort(&mut self, code: AbortCode) -> SdoEvent {
        let (index, sub) = self.current().unwrap_or((0, 0));
        self.active = None;
        SdoEvent::Aborted {
            index,
            sub,
            code,
            by_server: false,
            frame: Some(self.abort_frame(index, sub, code)),
        }
    }
}

enum Step {
    Send(u8, [u8; 7]),
    Uploaded(Vec<u8>),
    Downloaded,
}

/// The next download segment: up to 7 bytes, c set on the last.
fn next_segment(data: &[u8], sent: &mut usize, toggle: bool) -> Step {
    let start = (*sent).min(data.len());
    let chunk = &data[start..data.len().min(start + 7)];
    *sent = start + chunk.len();
    let mut cmd = CCS_DOWNLOAD_SEGMENT | ((7 - chunk.len() as u8) << 1);
    if toggle {
        cmd |= TOGGLE;
    }
    if *sent >= data.len() {
        cmd |= SIZE_OR_LAST;
    }
    let mut payload = [0u8; 7];
    payload[..chunk.len()].copy_from_slice(chunk);
    Step::Send(cmd, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(100);

    fn client() -> SdoClient {
        SdoClient::new(NodeId::new(5).unwrap())
    }

    fn rx(data: [u8; 8]) -> Frame {
        Frame::new(0x585, &data).unwrap()
    }

    fn tx(data: [u8; 8]) -> Frame {
        Frame::new(0x605, &data).unwrap()
    }

    fn next(ev: Option<SdoEvent>) -> Frame {
        match ev {
            Some(SdoEvent::NextFrame(f)) => f,
            other => panic!("expected NextFrame, got {other:?}"),
        }
    }

    #[test]
    fn expedited_upload_returns_the_bytes_the_size_bits_announce() {
        // Given a read of 0x6041:00 (statusword)
        let t0 = Instant::now();
        let mut c = client();
        let req = c.start_upload(0x6041, 0, T, t0).unwrap();
        assert_eq!(req, tx([0x40, 0x41, 0x60, 0x00, 0, 0, 0, 0]));
        // When the server answers expedited, 2 bytes (n = 2): 0x4B
        let ev = c.handle_frame(&rx([0x4B, 0x41, 0x60, 0x00, 0x37, 0x02, 0, 0]), t0);
        // Then the upload is done with those 2 bytes
        assert_eq!(ev, Some(SdoEvent::Uploaded(vec![0x37, 0x02])));
        assert!(c.is_idle());
    }

    #[test]
    fn segmented_upload_collects_segments_with_alternating_toggle() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x1008, 0, T, t0).unwrap();
        // Initiate response: segmented, size indicated, 10 bytes.
        let seg0 = next(c.handle_frame(&rx([0x41, 0x08, 0x10, 0x00, 10, 0, 0, 0]), t0));
        assert_eq!(seg0, tx([0x60, 0, 0, 0, 0, 0, 0, 0]));
        // First segment: toggle 0, 7 bytes, not last.
        let seg1 = next(c.handle_frame(&rx([0x00, b's', b'e', b'r', b'v', b'o', b'd', b'r']), t0));
        assert_eq!(seg1, tx([0x70, 0, 0, 0, 0, 0, 0, 0]));
        // Second segment: toggle 1, 3 bytes (n = 4), last.
        let ev = c.handle_frame(&rx([0x19, b'i', b'v', b'e', 0, 0, 0, 0]), t0);
        assert_eq!(ev, Some(SdoEvent::Uploaded(b"servodrive".to_vec())));
    }

    #[test]
    fn a_toggle_error_aborts_the_upload_with_0x05030000() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x1008, 0, T, t0).unwrap();
        next(c.handle_frame(&rx([0x41, 0x08, 0x10, 0x00, 14, 0, 0, 0]), t0));
        next(c.handle_frame(&rx([0x00, 1, 2, 3, 4, 5, 6, 7]), t0));
        // The server repeats toggle 0.
        let ev = c.handle_frame(&rx([0x00, 1, 2, 3, 4, 5, 6, 7]), t0);
        assert_eq!(
            ev,
            Some(SdoEvent::Aborted {
                index: 0x1008,
                sub: 0,
                code: AbortCode::TOGGLE_BIT,
                by_server: false,
                frame: Some(tx([0x80, 0x08, 0x10, 0x00, 0x00, 0x00, 0x03, 0x05])),
            })
        );
        assert!(c.is_idle());
    }

    #[test]
    fn expedited_download_of_two_bytes_sets_n_e_and_s() {
        // CiA 301: 0x2B = ccs 1, n = 2, e = 1, s = 1.
        let t0 = Instant::now();
        let mut c = client();
        let req = c.start_download(0x6040, 0, &[0x0F, 0x00], T, t0).unwrap();
        assert_eq!(req, tx([0x2B, 0x40, 0x60, 0x00, 0x0F, 0x00, 0, 0]));
        let ev = c.handle_frame(&rx([0x60, 0x40, 0x60, 0x00, 0, 0, 0, 0]), t0);
        assert_eq!(ev, Some(SdoEvent::Downloaded));
    }

    #[test]
    fn segmented_download_sends_seven_byte_segments_and_marks_the_last() {
        let t0 = Instant::now();
        let mut c = client();
        let data: Vec<u8> = (1..=9).collect();
        let req = c.start_download(0x2000, 1, &data, T, t0).unwrap();
        assert_eq!(req, tx([0x21, 0x00, 0x20, 0x01, 9, 0, 0, 0]));
        let s1 = next(c.handle_frame(&rx([0x60, 0x00, 0x20, 0x01, 0, 0, 0, 0]), t0));
        assert_eq!(s1, tx([0x00, 1, 2, 3, 4, 5, 6, 7]));
        let s2 = next(c.handle_frame(&rx([0x20, 0, 0, 0, 0, 0, 0, 0]), t0));
        // toggle 1, n = 5, c = 1: 0x10 | 0x0A | 0x01
        assert_eq!(s2, tx([0x1B, 8, 9, 0, 0, 0, 0, 0]));
        let done = c.handle_frame(&rx([0x30, 0, 0, 0, 0, 0, 0, 0]), t0);
        assert_eq!(done, Some(SdoEvent::Downloaded));
    }

    #[test]
    fn a_server_abort_ends_the_transfer_with_a_readable_code() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x2FFF, 0, T, t0).unwrap();
        let ev = c.handle_frame(&rx([0x80, 0xFF, 0x2F, 0x00, 0x00, 0x00, 0x02, 0x06]), t0);
        let Some(SdoEvent::Aborted {
            code,
            by_server: true,
            frame: None,
            ..
        }) = ev
        else {
            panic!("expected a server abort, got {ev:?}");
        };
        assert_eq!(code, AbortCode::NO_OBJECT);
        assert_eq!(code.to_string(), "0x06020000 (object does not exist)");
        assert_eq!(
            AbortCode::NO_SUB_INDEX.description(),
            "sub-index does not exist"
        );
        assert_eq!(AbortCode(0x1234_5678).description(), "unknown abort code");
        assert!(c.is_idle());
    }

    #[test]
    fn a_missing_response_times_out_with_an_abort_frame() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x6064, 0, T, t0).unwrap();
        assert_eq!(c.poll_timeout(), Some(t0 + T));
        assert_eq!(c.handle_timeout(t0 + T / 2), None);
        let ev = c.handle_timeout(t0 + T).unwrap();
        assert_eq!(
            ev,
            SdoEvent::Aborted {
                index: 0x6064,
                sub: 0,
                code: AbortCode::TIMEOUT,
                by_server: false,
                frame: Some(tx([0x80, 0x64, 0x60, 0x00, 0x00, 0x00, 0x04, 0x05])),
            }
        );
        assert_eq!(c.poll_timeout(), None);
        // A late response after the timeout is ignored.
        assert_eq!(
            c.handle_frame(&rx([0x4B, 0x64, 0x60, 0, 1, 2, 0, 0]), t0 + 2 * T),
            None
        );
    }

    #[test]
    fn each_segment_response_rearms_the_timeout() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x1008, 0, T, t0).unwrap();
        let t1 = t0 + T / 2;
        next(c.handle_frame(&rx([0x41, 0x08, 0x10, 0x00, 10, 0, 0, 0]), t1));
        assert_eq!(c.poll_timeout(), Some(t1 + T));
    }

    #[test]
    fn a_response_for_another_object_or_a_wrong_command_aborts() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x6041, 0, T, t0).unwrap();
        let ev = c.handle_frame(&rx([0x4B, 0x42, 0x60, 0x00, 0, 0, 0, 0]), t0);
        assert!(matches!(
            ev,
            Some(SdoEvent::Aborted {
                code: AbortCode::GENERAL,
                by_server: false,
                ..
            })
        ));
        c.start_upload(0x6041, 0, T, t0).unwrap();
        // An initiate download response to an upload.
        let ev = c.handle_frame(&rx([0x60, 0x41, 0x60, 0x00, 0, 0, 0, 0]), t0);
        assert!(matches!(
            ev,
            Some(SdoEvent::Aborted {
                code: AbortCode::INVALID_COMMAND,
                ..
            })
        ));
    }

    #[test]
    fn a_short_response_aborts_without_a_panic() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x6041, 0, T, t0).unwrap();
        let ev = c.handle_frame(&Frame::new(0x585, &[0x4B]).unwrap(), t0);
        assert!(matches!(
            ev,
            Some(SdoEvent::Aborted {
                by_server: false,
                ..
            })
        ));
    }

    #[test]
    fn a_second_request_while_busy_is_refused() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x6041, 0, T, t0).unwrap();
        assert!(matches!(
            c.start_download(0x6040, 0, &[1], T, t0),
            Err(SdoError::Busy { index: 0x6041, .. })
        ));
    }

    #[test]
    fn more_segment_bytes_than_announced_abort_the_upload() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x1008, 0, T, t0).unwrap();
        next(c.handle_frame(&rx([0x41, 0x08, 0x10, 0x00, 3, 0, 0, 0]), t0));
        let ev = c.handle_frame(&rx([0x01, 1, 2, 3, 4, 5, 6, 7]), t0);
        assert!(matches!(
            ev,
            Some(SdoEvent::Aborted {
                code: AbortCode::LENGTH_TOO_HIGH,
                ..
            })
        ));
    }

    #[test]
    fn frames_of_other_nodes_are_ignored() {
        let t0 = Instant::now();
        let mut c = client();
        c.start_upload(0x6041, 0, T, t0).unwrap();
        let other = Frame::new(0x586, &[0x4B, 0x41, 0x60, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(c.handle_frame(&other, t0), None);
        assert!(!c.is_idle());
    }
}
