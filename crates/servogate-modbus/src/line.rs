//! The RTU line discipline around a serial port.
//!
//! tokio-modbus's RTU client has no transaction id and trusts whatever bytes come next
//! (PITFALLS.md): a reply that arrives after our timeout would be taken as the reply to the
//! next request. [`RtuLine`] sits between tokio-modbus and the port and enforces, per
//! request:
//!
//! - before the first byte of a request goes out, the kernel's input queue is discarded:
//!   whatever is there belongs to an older request;
//! - it learns from the request it forwards which unit must answer and how long the reply
//!   must be (5 + 2N for a read of N registers, 5 for an exception, 8 for a write);
//! - as the reply arrives it checks the unit id and, once the expected length is in, the
//!   CRC. A wrong unit or a bad CRC is reported at once on the [`LineMonitor`] (tokio-modbus
//!   would silently drop a bad frame and wait for our timeout), and bytes past the end of
//!   the reply are never handed on.
//!
//! The inter-frame silence (t3.5) is the bus task's job: it knows when the line went quiet.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::crc::frame_crc_ok;

/// A port whose unread input can be thrown away.
pub trait DiscardInput {
    fn discard_input(&mut self) -> io::Result<()>;
}

impl DiscardInput for tokio_serial::SerialStream {
    fn discard_input(&mut self) -> io::Result<()> {
        use tokio_serial::SerialPort;
        self.clear(tokio_serial::ClearBuffer::Input)
            .map_err(io::Error::other)
    }
}

/// A serial device server's stream: what the kernel holds now is read and dropped.
/// Bytes still on their way (in the server, or on the wire) are not; the bus's guard
/// after a timeout and its probe deal with those, as on a serial line.
impl DiscardInput for tokio::net::TcpStream {
    fn discard_input(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 256];
        loop {
            match self.try_read(&mut sink) {
                // The server closed the connection: the request cannot be answered.
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// What the line saw wrong with a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFault {
    /// The reply's CRC did not match.
    Crc,
    /// The reply came from another unit than the one asked.
    WrongUnit { expected: u8, got: u8 },
    /// The reply does not answer the request: a write's echo names another address,
    /// value or quantity, or a read's byte count is not twice the registers asked for.
    /// The rest of it is withheld: tokio-modbus asserts on both in debug builds and
    /// would return the wrong data in release builds.
    Mismatch,
}

/// Shared between the [`RtuLine`] (inside tokio-modbus) and the bus task.
///
/// A fault is raised only while the reply is read, that is inside a poll of the request's
/// future by the bus task itself: the task looks at [`LineMonitor::take`] after each poll
/// of that future, and no waker is needed (a `Notify` registered and dropped per
/// transaction was 5 % of the bus's instructions per sample).
#[derive(Debug, Default)]
pub struct LineMonitor {
    fault: Mutex<Option<LineFault>>,
    /// Bytes thrown away: stale input before a request, or past the end of a reply.
    pub discarded_bytes: AtomicU64,
    pub crc_errors: AtomicU64,
}

impl LineMonitor {
    /// Clears a fault left from an earlier request.
    pub fn reset(&self) {
        self.take();
    }

    /// The fault the line saw in the current reply, if any; taking it clears it.
    pub fn take(&self) -> Option<LineFault> {
        // The lock is never held across an await or a panic point.
        self.fault.lock().map(|mut f| f.take()).unwrap_or(None)
    }

    fn raise(&self, fault: LineFault) {
        if let Ok(mut f) = self.fault.lock() {
            *f = Some(fault);
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Nothing sent yet.
    Idle,
    /// Forwarding a request; its first bytes are kept to learn the expected reply.
    Writing,
    /// Receiving the reply to the request in `request`.
    Reading,
}

/// The port wrapper handed to tokio-modbus.
pub struct RtuLine<S> {
    inner: S,
    phase: Phase,
    /// Head of the current request (unit, function, address, quantity).
    request: heapless::Vec<u8, 8>,
    /// Reply bytes received so far for the current request (never more than expected).
    reply_len: usize,
    reply_head: [u8; 2],
    /// The reply as it arrives, for the CRC check (a read reply is at most 255 bytes).
    reply: Vec<u8>,
    /// The reply does not answer the request: nothing more of it is handed on.
    withhold: bool,
    /// What the port reads into before it is handed on: initialised once, so the port's
    /// read never zeroes the caller's buffer. tokio-serial initialises the whole unfilled
    /// part of the buffer it is given before every read, and tokio-modbus gives it 8 KiB:
    /// that memset was 14 % of the gateway's instructions per sample at a real line rate.
    scratch: Box<[u8; SCRATCH]>,
    monitor: Arc<LineMonitor>,
}

/// The most one read takes from the port: an RTU frame is at most 256 bytes.
const SCRATCH: usize = 256;

impl<S> RtuLine<S> {
    pub fn new(inner: S, monitor: Arc<LineMonitor>) -> Self {
        Self {
            inner,
            phase: Phase::Idle,
            request: heapless::Vec::new(),
            reply_len: 0,
            reply_head: [0; 2],
            reply: Vec::with_capacity(256),
            withhold: false,
            scratch: Box::new([0; SCRATCH]),
            monitor,
        }
    }

    /// Expected reply length for the current request, once the function code is known.
    fn expected_len(&self) -> Option<usize> {
        let req = self.request.as_slice();
        let function = *req.get(1)?;
        if self.reply_len >= 2 && self.reply_head[1] == function | 0x80 {
            return Some(5); // unit, function | 0x80, exception code, CRC
        }
        match function {
            // unit, function, byte count, 2N data, CRC
            0x03 | 0x04 => {
                let n = u16::from_be_bytes([*req.get(4)?, *req.get(5)?]);
                Some(5 + 2 * usize::from(n))
            }
            // Echo of the request: unit, function, address, value/quantity, CRC
            0x05 | 0x06 | 0x0F | 0x10 => Some(8),
            _ => None,
        }
    }
}

impl<S: AsyncRead + DiscardInput + Unpin> AsyncRead for RtuLine<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.phase, Phase::Reading) {
            this.phase = Phase::Reading;
            this.reply_len = 0;
            this.reply.clear();
            this.withhold = false;
        }
        loop {
            let before = buf.filled().len();
            let room = buf.remaining().min(SCRATCH);
            let mut scratch = ReadBuf::new(&mut this.scratch[..room]);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut scratch))?;
            if scratch.filled().is_empty() {
                return Poll::Ready(Ok(())); // end of file
            }
            buf.put_slice(scratch.filled());
            let kept = this.filter(buf, before);
            if kept > before || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Everything read was discarded: read again rather than signal end of file.
        }
    }
}

impl<S> RtuLine<S> {
    /// True when `byte`, the next of the reply, shows that the reply does not answer the
    /// request: a write's echo must repeat the address and the value (06) or quantity
    /// (16); a read's byte count must be twice the registers asked for. A straggler of
    /// another length (a probe's late answer during the next read) would otherwise be a
    /// complete frame with a good CRC to tokio-modbus, long before the line's CRC check
    /// at the expected length.
    fn mismatch(&self, byte: u8) -> bool {
        let req = self.request.as_slice();
        let (Some(&function), i) = (req.get(1), self.reply_len) else {
            return false;
        };
        // An exception reply (function | 0x80) has its own fixed length.
        let normal = i < 2 || self.reply_head[1] == function;
        if !normal {
            return false;
        }
        match function {
            0x06 | 0x10 => (2..6).contains(&i) && req.get(i).is_some_and(|&b| b != byte),
            0x03 | 0x04 if i == 2 => match (req.get(4), req.get(5)) {
                (Some(&hi), Some(&lo)) => {
                    let n = usize::from(u16::from_be_bytes([hi, lo]));
                    usize::from(byte) != 2 * n
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Checks the bytes from `before` on, keeps those that belong to the reply and
    /// returns the new filled length.
    fn filter(&mut self, buf: &mut ReadBuf<'_>, before: usize) -> usize {
        let mut kept = before;
        for i in before..buf.filled().len() {
            let byte = buf.filled()[i];
            if let Some(expected) = self.expected_len() {
                if self.reply_len >= expected {
                    // Past the end of the reply: noise or the start of someone else's
                    // frame. Never hand it on.
                    self.monitor.discarded_bytes.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            if self.withhold {
                self.monitor.discarded_bytes.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.reply_len < 2 {
                self.reply_head[self.reply_len] = byte;
            }
            if self.mismatch(byte) {
                self.withhold = true;
                self.monitor.discarded_bytes.fetch_add(1, Ordering::Relaxed);
                self.monitor.raise(LineFault::Mismatch);
                continue;
            }
            if self.reply_len == 0 {
                if let Some(&unit) = self.request.as_slice().first() {
                    if unit != byte && unit != 0 {
                        self.monitor.raise(LineFault::WrongUnit {
                            expected: unit,
                            got: byte,
                        });
                    }
                }
            }
            self.reply_len += 1;
            self.reply.push(byte);
            buf.filled_mut()[kept] = byte;
            kept += 1;
            if Some(self.reply_len) == self.expected_len() && !frame_crc_ok(&self.reply) {
                self.monitor.crc_errors.fetch_add(1, Ordering::Relaxed);
                self.monitor.raise(LineFault::Crc);
            }
        }
        buf.set_filled(kept);
        kept
    }
}

impl<S: AsyncWrite + DiscardInput + Unpin> AsyncWrite for RtuLine<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !matches!(this.phase, Phase::Writing) {
            // A new request begins: whatever waits in the input queue is stale.
            this.inner.discard_input()?;
            this.monitor.reset();
            this.request.clear();
            this.phase = Phase::Writing;
        }
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        // Only the head (unit, function, address, quantity) matters; the rest is ignored.
        let room = this.request.capacity() - this.request.len();
        let _ = this.request.extend_from_slice(&data[..n.min(room)]);
        Poll::Ready(Ok(n))
    }

    /// Does not wait for the request to leave the wire. tokio-serial's flush is a
    /// blocking `tcdrain`: on a real UART it puts the bus thread to sleep for the
    /// request's wire time (0.76 ms for 8 bytes at 115200 baud, 9 ms at 9600) and wakes
    /// it again, one more wake-up per transaction for nothing: the kernel sends what was
    /// written either way, the reply's timeout already covers the request's wire time, and
    /// an RS-485 transceiver's direction is the driver's job (`TIOCSRS485`), not ours. A
    /// TCP stream's flush does nothing.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    struct Port(DuplexStream, usize);
    impl DiscardInput for Port {
        fn discard_input(&mut self) -> io::Result<()> {
            self.1 += 1;
            Ok(())
        }
    }
    impl AsyncRead for Port {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for Port {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, b)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    fn with_crc(body: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(&crate::crc::crc16(body).to_le_bytes());
        v
    }

    /// `request` through the line, answered with `reply`: what the line handed on, its
    /// monitor, and how often it discarded its input.
    async fn exchange_with(request: &[u8], reply: &[u8]) -> (Vec<u8>, Arc<LineMonitor>, usize) {
        let (a, mut b) = duplex(1024);
        let monitor = Arc::new(LineMonitor::default());
        let mut line = RtuLine::new(Port(a, 0), monitor.clone());
        line.write_all(request).await.unwrap();
        let mut req = [0u8; 8];
        b.read_exact(&mut req).await.unwrap();
        // When the peer answers
        b.write_all(reply).await.unwrap();
        drop(b);
        let mut got = Vec::new();
        let _ = line.read_to_end(&mut got).await;
        let discards = line.inner.1;
        (got, monitor, discards)
    }

    /// Given a read request for 2 registers of unit 1, answered with `reply`.
    async fn exchange(reply: &[u8]) -> (Vec<u8>, Arc<LineMonitor>, usize) {
        exchange_with(&with_crc(&[1, 3, 0, 0, 0, 2]), reply).await
    }

    #[tokio::test]
    async fn a_good_reply_passes_and_input_was_discarded_before_the_request() {
        let reply = with_crc(&[1, 3, 4, 0, 1, 0, 2]);
        let (got, monitor, discards) = exchange(&reply).await;
        assert_eq!(got, reply);
        assert_eq!(discards, 1);
        assert_eq!(monitor.take(), None);
    }

    #[tokio::test]
    async fn bytes_past_the_expected_reply_are_never_handed_on() {
        let mut reply = with_crc(&[1, 3, 4, 0, 1, 0, 2]);
        let good = reply.clone();
        reply.extend_from_slice(&[0xAA, 0xBB, 0xCC]);
        let (got, monitor, _) = exchange(&reply).await;
        assert_eq!(got, good);
        assert_eq!(monitor.discarded_bytes.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_bad_crc_is_raised_at_once() {
        let mut reply = with_crc(&[1, 3, 4, 0, 1, 0, 2]);
        reply[4] ^= 0x10;
        let (_, monitor, _) = exchange(&reply).await;
        assert_eq!(monitor.take(), Some(LineFault::Crc));
        assert_eq!(monitor.crc_errors.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_reply_from_another_unit_is_raised() {
        let reply = with_crc(&[2, 3, 4, 0, 1, 0, 2]);
        let (_, monitor, _) = exchange(&reply).await;
        assert_eq!(
            monitor.take(),
            Some(LineFault::WrongUnit {
                expected: 1,
                got: 2
            })
        );
    }

    /// A write of 0x000F to register 0x0012 of unit 1, answered with `reply`.
    async fn write_exchange(reply: &[u8]) -> (Vec<u8>, Arc<LineMonitor>) {
        let (got, monitor, _) = exchange_with(&with_crc(&[1, 6, 0, 0x12, 0, 0x0F]), reply).await;
        (got, monitor)
    }

    #[tokio::test]
    async fn a_write_echo_naming_another_value_is_raised_and_withheld() {
        // Given a write of 0x000F, when the echo says 0x0007
        let (got, monitor) = write_exchange(&with_crc(&[1, 6, 0, 0x12, 0, 0x07])).await;
        // Then the fault is raised and the echo never reaches tokio-modbus whole
        assert_eq!(monitor.take(), Some(LineFault::Mismatch));
        assert_eq!(got, vec![1, 6, 0, 0x12, 0]);
    }

    #[tokio::test]
    async fn a_read_reply_with_another_byte_count_is_raised_and_withheld() {
        // Given a read of 2 registers, when a late answer to a read of 1 arrives
        let (got, monitor, _) = exchange(&with_crc(&[1, 3, 2, 0, 7])).await;
        // Then it is refused at its byte count and tokio-modbus never sees a whole frame
        assert_eq!(monitor.take(), Some(LineFault::Mismatch));
        assert_eq!(got, vec![1, 3]);
    }

    #[tokio::test]
    async fn a_matching_write_echo_passes() {
        let echo = with_crc(&[1, 6, 0, 0x12, 0, 0x0F]);
        let (got, monitor) = write_exchange(&echo).await;
        assert_eq!(got, echo);
        assert_eq!(monitor.take(), None);
    }

    #[tokio::test]
    async fn an_exception_reply_is_five_bytes_long() {
        let mut reply = with_crc(&[1, 0x83, 2]);
        let good = reply.clone();
        reply.push(0x55);
        let (got, monitor, _) = exchange(&reply).await;
        assert_eq!(got, good);
        assert_eq!(monitor.take(), None);
    }
}
