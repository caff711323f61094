//! The IO edge: reads request frames from a port and writes the simulator's replies.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use servogate_modbus::timing::PreciseTimer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::rtu::{Deframer, RequestFrame};
use crate::Simulator;

/// How long the line must stay quiet before bytes that do not yet form a frame are
/// treated as garbage. A sender writes each frame in one go, so over a pty a frame never
/// pauses this long in the middle; and it is short against any sensible gateway timeout,
/// so a truncated frame cannot hold up the next request for long.
pub const SILENCE: Duration = Duration::from_millis(5);

/// Serves `sim`'s units on `port` (a serial port, one end of a pty pair, anything that
/// reads and writes bytes) until the port reports end of file (`Ok`) or an error
/// (`Err`). Bytes that form no valid frame never end it.
///
/// Transactions run one at a time, like a half-duplex bus: while a late or
/// timing-faithful reply waits, further requests wait in the port. So a reply later than
/// the gateway's timeout still goes out, and a gateway that does not discard its input
/// before the next request will read it as the next reply, as on a real bus.
pub async fn serve_rtu<S>(port: S, sim: Arc<Simulator>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut port = port;
    // Sub-millisecond reply delays need the timerfd; tokio's timer rounds up to 1 ms.
    let mut timer = PreciseTimer::new()?;
    let mut deframer = Deframer::new();
    let mut counted_drops = 0;
    let mut buf = [0u8; 512];
    // When the bytes that completed the frames now buffered arrived; a pty delivers a
    // whole request at once, so this is when the request arrived.
    let mut arrived = Instant::now();
    loop {
        while let Some(frame) = deframer.next_frame() {
            answer(&mut port, &mut timer, &sim, &frame, arrived).await?;
        }
        if deframer.dropped_bytes() > counted_drops {
            let n = deframer.dropped_bytes() - counted_drops;
            tracing::debug!(
                bytes = n,
                "dropped bytes that started no valid request frame"
            );
            sim.count_dropped_bytes(n);
            counted_drops = deframer.dropped_bytes();
        }
        let read = if deframer.is_empty() {
            port.read(&mut buf).await
        } else {
            // `read` is cancellation-safe: on a timeout no byte has been consumed.
            match tokio::time::timeout(SILENCE, port.read(&mut buf)).await {
                Ok(read) => read,
                Err(_elapsed) => {
                    if let Some(frame) = deframer.on_silence() {
                        answer(&mut port, &mut timer, &sim, &frame, arrived).await?;
                    }
                    continue;
                }
            }
        };
        let n = read?;
        if n == 0 {
            return Ok(());
        }
        arrived = Instant::now();
        deframer.push(&buf[..n]);
    }
}

/// Answers one frame: model time from its arrival, reply after its delay.
async fn answer<S>(
    port: &mut S,
    timer: &mut PreciseTimer,
    sim: &Simulator,
    frame: &RequestFrame,
    arrived: Instant,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let Some(reply) = sim.handle(frame, sim.t_ms_at(arrived)) else {
        return Ok(());
    };
    if !reply.delay.is_zero() {
        // Measured from the arrival, so the time spent building the reply is included.
        timer.sleep_until(arrived + reply.delay).await?;
    }
    port.write_all(&reply.bytes).await?;
    port.flush().await
}
