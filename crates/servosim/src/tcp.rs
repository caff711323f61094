//! The simulator behind a TCP listener: Modbus TCP, and RTU over TCP.
//!
//! [`serve_tcp`] speaks Modbus TCP to any number of clients. Each request comes in an
//! MBAP header (transaction id, protocol id 0, length, unit id) and goes to
//! [`Simulator::handle`] as an RTU request would; the PDU of its reply goes back in an
//! MBAP header with the request's transaction and unit ids. A client may pipeline
//! requests: each reply goes out after its own [`crate::Reply::delay`] (a late unit, the
//! turnaround), measured from the request's arrival, and does not hold back the replies to
//! other requests on the same connection. So a late unit's reply comes after a later
//! request's reply to a prompt unit, and the client must match them by transaction id.
//! One unit's replies keep their request order. A request whose header breaks the framing
//! (protocol id not 0, length outside 2-254) closes its connection: nothing after it can
//! be trusted to start a header.
//!
//! [`serve_rtu_tcp`] is a serial device server (a Moxa NPort in TCP server mode): RTU
//! frames with their CRC over TCP, served by [`serve_rtu`] one transaction at a time, to
//! one client at a time. A new connection replaces the one before, so a gateway that
//! reconnects after a half-open connection is served at once.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use servogate_modbus::timing::PreciseTimer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use crate::rtu::RequestFrame;
use crate::{serve_rtu, Simulator};

/// MBAP header length: transaction id, protocol id, length (2 bytes each), unit id.
pub const MBAP_HEADER_LEN: usize = 7;
/// Largest MBAP length field: the unit id and the longest PDU, 253 bytes (Modbus
/// Messaging on TCP/IP Implementation Guide V1.0b, 4.1).
pub const MAX_MBAP_LENGTH: u16 = 254;
/// Replies one connection may have waiting for their time; beyond that it reads no
/// further requests until some have gone out.
pub const MAX_PENDING: usize = 256;
/// Pause after a failed accept (no file descriptor left, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A request header that breaks Modbus TCP framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MbapError {
    /// The protocol id is not 0 (Modbus).
    #[error("protocol id {0} is not 0 (Modbus)")]
    ProtocolId(u16),
    /// The length field (unit id and PDU) is outside 2-254.
    #[error("length {0} is outside 2-{MAX_MBAP_LENGTH}")]
    Length(u16),
}

/// One Modbus TCP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbapRequest {
    /// The client's transaction id, echoed in the reply.
    pub transaction: u16,
    /// Unit id and PDU, as [`Simulator::handle`] takes them. Its `wire_len` is what the
    /// frame would take on a serial line (unit, PDU, CRC).
    pub frame: RequestFrame,
}

/// Takes the first request off the front of `buf`: the request and how many bytes it
/// took, `Ok(None)` while its bytes have not all arrived, an error as soon as the header
/// shows a protocol id or length that breaks the framing. Never panics, whatever `buf`
/// holds.
pub fn parse_request(buf: &[u8]) -> Result<Option<(MbapRequest, usize)>, MbapError> {
    let word = |at: usize| {
        buf.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    if let Some(protocol) = word(2) {
        if protocol != 0 {
            return Err(MbapError::ProtocolId(protocol));
        }
    }
    let Some(length) = word(4) else {
        return Ok(None);
    };
    if !(2..=MAX_MBAP_LENGTH).contains(&length) {
        return Err(MbapError::Length(length));
    }
    let total = MBAP_HEADER_LEN - 1 + usize::from(length);
    let Some(bytes) = buf.get(..total) else {
        return Ok(None);
    };
    let pdu = bytes[MBAP_HEADER_LEN..].to_vec();
    let request = MbapRequest {
        transaction: u16::from_be_bytes([bytes[0], bytes[1]]),
        frame: RequestFrame {
            unit: bytes[MBAP_HEADER_LEN - 1],
            wire_len: pdu.len() + 3,
            pdu,
        },
    };
    Ok(Some((request, total)))
}

/// A reply PDU in its MBAP header.
pub fn encode_reply(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    // A reply PDU is at most 253 bytes; saturate rather than wrap if one were not.
    let length = u16::try_from(pdu.len() + 1).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(MBAP_HEADER_LEN + pdu.len());
    out.extend_from_slice(&transaction.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&length.to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

/// The PDU of an RTU frame: without its unit id and CRC.
fn rtu_pdu(frame: &[u8]) -> Option<&[u8]> {
    frame.get(1..frame.len().checked_sub(2)?)
}

/// A reply waiting for its time.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    at: Instant,
    /// Queueing order: breaks ties of `at`, so equal times go out first come first.
    seq: u64,
    bytes: Vec<u8>,
}

/// The replies of one connection waiting for their time, in the order they go out: by due
/// time, and each unit's in request order (a reply is not due before the unit's previous
/// one, even when the unit's delay shrank in between).
#[derive(Debug)]
struct ReplyQueue {
    heap: BinaryHeap<Reverse<Pending>>,
    /// Due time of each unit's last queued reply.
    last: [Option<Instant>; 256],
    seq: u64,
}

impl ReplyQueue {
    fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
            last: [None; 256],
            seq: 0,
        }
    }

    /// Queues `bytes`, a reply of `unit`, for `at`, or later if the unit's previous reply
    /// is due later.
    fn push(&mut self, unit: u8, at: Instant, bytes: Vec<u8>) {
        let last = &mut self.last[usize::from(unit)];
        let at = last.map_or(at, |last| at.max(last));
        *last = Some(at);
        self.seq += 1;
        self.heap.push(Reverse(Pending {
            at,
            seq: self.seq,
            bytes,
        }));
    }

    fn len(&self) -> usize {
        self.heap.len()
    }

    fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// When the next reply is due.
    fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(p)| p.at)
    }

    /// Appends every reply due at `now` to `out`, in the order they go out.
    fn take_due(&mut self, now: Instant, out: &mut Vec<u8>) {
        while self.next_at().is_some_and(|at| at <= now) {
            if let Some(Reverse(p)) = self.heap.pop() {
                out.extend_from_slice(&p.bytes);
            }
        }
    }
}

/// Serves Modbus TCP on one connection (a `TcpStream`, or anything that reads and writes
/// bytes) until the client closes it (`Ok`, once the replies still waiting have gone
/// out), a request header breaks the framing (`Ok`: the connection is dropped; counted
/// in [`crate::Stats::bad_mbap`]) or the connection fails (`Err`).
///
/// Replies go out as the module doc says: each after its own delay, a unit's in request
/// order. No reply goes out when [`Simulator::handle`] gives none (a dead unit, a muted
/// write, a unit not simulated, unit 0 as broadcast), nor for a reply CRC noise
/// corrupted: Modbus TCP has no CRC, so keep the noise at 0 (`servosim modbus-tcp` does).
pub async fn serve_mbap<S>(stream: S, sim: Arc<Simulator>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = stream;
    // Sub-millisecond turnarounds need the timerfd; tokio's timer rounds up to 1 ms.
    let mut timer = PreciseTimer::new()?;
    let mut queue = ReplyQueue::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut out = Vec::new();
    let mut reading = true;
    loop {
        out.clear();
        queue.take_due(Instant::now(), &mut out);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
        if !reading && queue.is_empty() {
            return Ok(());
        }
        let next = queue.next_at();
        tokio::select! {
            // Both futures are cancellation-safe: a lost race consumes no byte and no expiry.
            woke = timer.wake_at(next.unwrap_or_else(Instant::now)), if next.is_some() => { woke?; }
            read = stream.read(&mut chunk), if reading && queue.len() < MAX_PENDING => {
                let n = read?;
                if n == 0 {
                    if !buf.is_empty() {
                        tracing::debug!(bytes = buf.len(), "connection closed in the middle of a request");
                    }
                    reading = false;
                    continue;
                }
                // A client writes each request at once: these bytes arrived now.
                let arrived = Instant::now();
                buf.extend_from_slice(&chunk[..n]);
                let mut used = 0;
                loop {
                    match parse_request(&buf[used..]) {
                        Ok(Some((request, len))) => {
                            used += len;
                            answer(&sim, &request, arrived, &mut queue);
                        }
                        Ok(None) => break,
                        Err(bad) => {
                            sim.count_bad_mbap();
                            tracing::debug!(error = %bad, "bad MBAP header; closing the connection");
                            return Ok(());
                        }
                    }
                }
                buf.drain(..used);
            }
            else => return Ok(()),
        }
    }
}

/// Hands one request to the simulator and queues its reply, if any.
fn answer(sim: &Simulator, request: &MbapRequest, arrived: Instant, queue: &mut ReplyQueue) {
    let Some(reply) = sim.handle(&request.frame, sim.t_ms_at(arrived)) else {
        return;
    };
    if reply.corrupted {
        tracing::debug!("reply corrupted by CRC noise not sent: Modbus TCP has no CRC");
        return;
    }
    let Some(pdu) = rtu_pdu(&reply.bytes) else {
        return;
    };
    let unit = request.frame.unit;
    queue.push(
        unit,
        arrived + reply.delay,
        encode_reply(request.transaction, unit, pdu),
    );
}

/// The next connection; a failed accept (a connection reset before we took it, no file
/// descriptor left) is logged and never ends the listener.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Replies are small and a client may wait for each: no Nagle delay.
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
                }
                tracing::debug!(%peer, "connection accepted");
                return (stream, peer);
            }
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

fn log_end(peer: SocketAddr, ended: Result<io::Result<()>, JoinError>) {
    match ended {
        Ok(Ok(())) => tracing::debug!(%peer, "connection closed"),
        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "connection failed"),
        Err(err) if err.is_panic() => {
            tracing::error!(%peer, error = %err, "connection task panicked")
        }
        // Aborted: replaced by a newer connection (RTU over TCP), or shutting down.
        Err(_) => {}
    }
}

/// Serves Modbus TCP ([`serve_mbap`]) on every connection `listener` accepts, any number
/// at once. Never returns; dropping (aborting) its task closes every connection.
pub async fn serve_tcp(listener: TcpListener, sim: Arc<Simulator>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            (stream, peer) = accept(&listener) => {
                let sim = Arc::clone(&sim);
                connections.spawn(async move { (peer, serve_mbap(stream, sim).await) });
            }
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                match ended {
                    Ok((peer, result)) => log_end(peer, Ok(result)),
                    Err(err) if err.is_panic() => tracing::error!(error = %err, "connection task panicked"),
                    Err(_) => {}
                }
            }
        }
    }
}

/// Serves RTU frames over TCP ([`serve_rtu`]) on the latest connection `listener`
/// accepted: a new connection drops the one before (after accepting it), as a serial
/// device server that takes one client does. Never returns; dropping (aborting) its task
/// closes the connection.
pub async fn serve_rtu_tcp(listener: TcpListener, sim: Arc<Simulator>) {
    let mut current = JoinSet::new();
    let mut current_peer = None;
    loop {
        tokio::select! {
            (stream, peer) = accept(&listener) => {
                if let Some(old) = current_peer.take() {
                    // Wait until the old task is gone, so its socket is closed and its
                    // last reply written (or not) before the new client is served.
                    current.abort_all();
                    while current.join_next().await.is_some() {}
                    tracing::info!(%peer, old = %old, "new client; dropped the older connection");
                }
                let sim = Arc::clone(&sim);
                current.spawn(serve_rtu(stream, sim));
                current_peer = Some(peer);
            }
            Some(ended) = current.join_next(), if !current.is_empty() => {
                if let Some(peer) = current_peer.take() {
                    log_end(peer, ended);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(transaction: u16, protocol: u16, length: u16, rest: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&transaction.to_be_bytes());
        v.extend_from_slice(&protocol.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn a_read_request_known_answer_parses_and_its_reply_encodes() {
        // Transaction 0x0001, protocol 0, length 6, unit 0x11, read holding 0x006B x3
        // (the request of the Modbus TCP implementation guide's examples).
        let bytes = [
            0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x11, 0x03, 0x00, 0x6B, 0x00, 0x03,
        ];
        let (req, used) = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(used, 12);
        assert_eq!((req.transaction, req.frame.unit), (1, 0x11));
        assert_eq!(req.frame.pdu, [0x03, 0x00, 0x6B, 0x00, 0x03]);
        assert_eq!(req.frame.wire_len, 8, "as an RTU frame");
        assert_eq!(
            encode_reply(0xBEEF, 0x11, &[0x03, 0x02, 0x12, 0x34]),
            [0xBE, 0xEF, 0x00, 0x00, 0x00, 0x05, 0x11, 0x03, 0x02, 0x12, 0x34]
        );
    }

    #[test]
    fn a_partial_request_needs_more_and_back_to_back_requests_split() {
        let a = request(7, 0, 6, &[1, 0x03, 0, 0, 0, 2]);
        let b = request(8, 0, 2, &[2, 0x41]);
        let mut both = a.clone();
        both.extend_from_slice(&b);
        for cut in 0..a.len() {
            assert_eq!(parse_request(&a[..cut]), Ok(None), "{cut} bytes");
        }
        let (first, used) = parse_request(&both).unwrap().unwrap();
        assert_eq!((first.transaction, used), (7, a.len()));
        let (second, used) = parse_request(&both[used..]).unwrap().unwrap();
        assert_eq!(
            (second.transaction, second.frame.pdu, used),
            (8, vec![0x41], 8)
        );
    }

    #[test]
    fn a_bad_protocol_id_or_length_is_refused_as_soon_as_the_header_shows_it() {
        assert_eq!(parse_request(&[0, 1, 0, 7]), Err(MbapError::ProtocolId(7)));
        assert_eq!(
            parse_request(&[0, 1, 0, 0, 0, 1]),
            Err(MbapError::Length(1))
        );
        assert_eq!(
            parse_request(&[0, 1, 0, 0, 0xFF, 0xFF]),
            Err(MbapError::Length(0xFFFF))
        );
        assert_eq!(
            parse_request(&[0, 1, 0, 0, 0, 255]),
            Err(MbapError::Length(255))
        );
        assert_eq!(parse_request(&[0, 1, 0, 0, 0, 254]), Ok(None));
    }

    #[test]
    fn no_byte_sequence_panics_the_parser() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let mut bytes: Vec<u8> = (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect();
            if rng.bool() && bytes.len() >= 6 {
                // Often a valid protocol id and length, so the body paths run too.
                bytes[2] = 0;
                bytes[3] = 0;
                bytes[4] = 0;
            }
            if let Ok(Some((req, used))) = parse_request(&bytes) {
                assert!(used <= bytes.len() && req.frame.pdu.len() + 7 == used);
            }
        }
    }

    #[test]
    fn the_pdu_of_an_rtu_frame_drops_unit_and_crc() {
        let frame = crate::rtu::encode_frame(3, &[0x83, 0x02]);
        assert_eq!(rtu_pdu(&frame), Some(&[0x83, 0x02][..]));
        assert_eq!(rtu_pdu(&[1]), None);
        assert_eq!(rtu_pdu(&[]), None);
        assert_eq!(rtu_pdu(&[1, 2, 3]), Some(&[][..]));
    }

    #[test]
    fn replies_go_out_by_due_time_and_each_units_in_request_order() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = ReplyQueue::new();
        // Unit 3 late (200 ms), then unit 1 prompt, then unit 3 on time again: its second
        // reply must not overtake its first.
        q.push(3, ms(200), vec![b'a']);
        q.push(1, ms(0), vec![b'b']);
        q.push(3, ms(1), vec![b'c']);
        q.push(2, ms(1), vec![b'd']);
        let mut out = Vec::new();
        q.take_due(ms(0), &mut out);
        assert_eq!(out, b"b");
        q.take_due(ms(1), &mut out);
        assert_eq!(out, b"bd");
        assert_eq!(q.next_at(), Some(ms(200)));
        q.take_due(ms(200), &mut out);
        assert_eq!(out, b"bdac");
        assert!(q.is_empty());
    }
}
