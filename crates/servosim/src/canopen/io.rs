//! The IO edge of `servosim canopen`: one tokio task owns the SocketCAN socket and the
//! [`CanSim`], feeds it every frame read, sends what it returns and what falls due, and
//! runs the console's commands between frames (so the core needs no lock).

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use embedded_can::{Frame as _, Id};
use socketcan::tokio::CanSocket;
use socketcan::{CanFrame, SocketOptions, StandardId};
use tokio::sync::{mpsc, oneshot};

use super::{console, CanSim, Frame};

/// Node frames waiting for the socket at most; past it new frames are dropped and counted
/// (a saturated bus must not grow the simulator's memory without bound).
pub const MAX_OUTBOX: usize = 4096;
/// Flood frames waiting at most: a flood is meant to fill the bus, not the simulator.
pub const MAX_FLOOD_QUEUE: usize = 256;
/// At most one ENOBUFS warning per this interval (a saturated bus hits it every frame).
const ENOBUFS_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// First wait after ENOBUFS (the interface's transmit queue is full); doubles up to
/// [`ENOBUFS_BACKOFF_MAX`] while the queue stays full.
const ENOBUFS_BACKOFF_MIN: Duration = Duration::from_micros(500);
const ENOBUFS_BACKOFF_MAX: Duration = Duration::from_millis(20);
/// Wait after a read error other than "nothing there", so a downed interface does not
/// turn the loop into a busy loop.
const READ_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Frames read in one go before the loop looks at its timers again.
const READ_BATCH: usize = 64;
/// Receive buffer asked for: CAN has no backpressure, so a burst the loop cannot take at
/// once must fit in the socket (PITFALLS.md: a paused reader lost frames silently).
const RECEIVE_BUFFER: i32 = 1 << 20;

/// One console line for the IO task, and where its answer goes.
#[derive(Debug)]
pub struct ConsoleRequest {
    pub line: String,
    pub reply: oneshot::Sender<Option<String>>,
}

/// Converts a frame from the socket: `None` for remote, error and 29-bit frames, which no
/// simulated node answers.
fn from_socket(frame: &CanFrame) -> Option<Frame> {
    match frame {
        CanFrame::Data(_) => match frame.id() {
            Id::Standard(id) => Frame::new(id.as_raw(), frame.data()),
            Id::Extended(_) => None,
        },
        CanFrame::Remote(_) | CanFrame::Error(_) => None,
    }
}

fn to_socket(frame: &Frame) -> Option<CanFrame> {
    CanFrame::new(StandardId::new(frame.id())?, frame.data())
}

fn is_enobufs(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ENOBUFS)
}

/// The outgoing side: the frames waiting, and the ENOBUFS back-off.
///
/// Node frames go out before flood frames. On a real bus the flood's COB-ID 0x7F0 loses
/// arbitration to every node's frame, so a flood delays the nodes only through the shared
/// bandwidth (and ENOBUFS), never by making heartbeats and SDO answers queue behind it.
struct Outbox {
    frames: VecDeque<Frame>,
    flood: VecDeque<Frame>,
    /// After ENOBUFS: no write before this instant.
    paused_until: Option<Instant>,
    backoff: Duration,
    /// A write said "would block": wait for the socket to become writable.
    wait_writable: bool,
    /// When ENOBUFS was last logged, and how often it happened since.
    enobufs_logged: Option<Instant>,
    enobufs_since_log: u64,
}

impl Outbox {
    fn new() -> Self {
        Self {
            frames: VecDeque::with_capacity(256),
            flood: VecDeque::with_capacity(MAX_FLOOD_QUEUE),
            paused_until: None,
            backoff: ENOBUFS_BACKOFF_MIN,
            wait_writable: false,
            enobufs_logged: None,
            enobufs_since_log: 0,
        }
    }

    fn extend(&mut self, sim: &mut CanSim, frames: Vec<Frame>) {
        let mut dropped = 0;
        for frame in frames {
            let (queue, max) = if frame.id() == super::cob::FLOOD {
                (&mut self.flood, MAX_FLOOD_QUEUE)
            } else {
                (&mut self.frames, MAX_OUTBOX)
            };
            if queue.len() < max {
                queue.push_back(frame);
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            sim.count_dropped(dropped);
            tracing::debug!(dropped, "outgoing queue full");
        }
    }

    fn front(&self) -> Option<&Frame> {
        self.frames.front().or_else(|| self.flood.front())
    }

    fn pop_front(&mut self) {
        if self.frames.pop_front().is_none() {
            self.flood.pop_front();
        }
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.flood.is_empty()
    }

    /// Writes what the socket takes now, without waiting.
    fn flush(&mut self, socket: &CanSocket, sim: &mut CanSim, now: Instant) {
        if self.paused_until.is_some_and(|t| now < t) || self.wait_writable {
            return;
        }
        self.paused_until = None;
        while let Some(frame) = self.front() {
            tracing::trace!(?frame, "tx");
            let result = match to_socket(frame) {
                Some(f) => socket.try_write_frame(f),
                // Cannot happen for the simulator's own frames (ids are 11-bit).
                None => Ok(()),
            };
            if !self.after_write(result, sim, now) {
                break;
            }
        }
    }

    /// Books the result of writing the front frame; false when writing must stop for now.
    fn after_write(&mut self, result: io::Result<()>, sim: &mut CanSim, now: Instant) -> bool {
        match result {
            Ok(()) => {
                self.pop_front();
                sim.count_sent();
                self.backoff = ENOBUFS_BACKOFF_MIN;
                true
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                self.wait_writable = true;
                false
            }
            Err(err) if is_enobufs(&err) => {
                // The frame stays at the front and goes out after the pause.
                sim.count_enobufs();
                self.enobufs_since_log += 1;
                if self
                    .enobufs_logged
                    .is_none_or(|t| now.saturating_duration_since(t) >= ENOBUFS_LOG_INTERVAL)
                {
                    tracing::warn!(
                        times = self.enobufs_since_log,
                        backoff = ?self.backoff,
                        "CAN transmit queue full (ENOBUFS); backing off"
                    );
                    self.enobufs_logged = Some(now);
                    self.enobufs_since_log = 0;
                }
                self.paused_until = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(ENOBUFS_BACKOFF_MAX);
                false
            }
            Err(err) => {
                // Another error (interface down, ...): this frame is lost, the next is tried.
                tracing::warn!(error = %err, "CAN write failed; frame dropped");
                self.pop_front();
                sim.count_dropped(1);
                true
            }
        }
    }
}

/// Runs the simulator on `socket` until the process stops: reads frames, answers them,
/// sends heartbeats, TPDOs and flood frames when due, and executes console `commands`.
/// Never ends on a bus error; the end of `commands` (stdin closed) does not end it either.
pub async fn serve_can(
    socket: CanSocket,
    mut sim: CanSim,
    mut commands: mpsc::Receiver<ConsoleRequest>,
) {
    if let Err(err) =
        socket.set_socket_option_int(libc::SOL_SOCKET, libc::SO_RCVBUF, RECEIVE_BUFFER)
    {
        tracing::warn!(error = %err, "cannot enlarge the CAN receive buffer");
    }
    let mut out = Outbox::new();
    let mut commands_open = true;
    let mut read_paused_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let due = sim.poll(now);
        out.extend(&mut sim, due);
        out.flush(&socket, &mut sim, now);

        let wake = [sim.poll_timeout(), out.paused_until, read_paused_until]
            .into_iter()
            .flatten()
            .min()
            // Nothing scheduled (every node silent, no heartbeat): wake now and then anyway.
            .unwrap_or(now + Duration::from_secs(1));
        let reading = read_paused_until.is_none_or(|t| now >= t);
        if reading {
            read_paused_until = None;
        }
        let front = out.front().and_then(to_socket);

        tokio::select! {
            // Cancellation: `read_frame` takes a frame off the socket only when it
            // completes, so losing the race to another branch loses no frame.
            read = socket.read_frame(), if reading => match read {
                Ok(frame) => {
                    handle(&mut sim, &mut out, &frame);
                    // Take what else is already queued before looking at the timers.
                    for _ in 1..READ_BATCH {
                        match socket.try_read_frame() {
                            Ok(frame) => handle(&mut sim, &mut out, &frame),
                            Err(_) => break,
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "CAN read failed; retrying");
                    read_paused_until = Some(Instant::now() + READ_ERROR_BACKOFF);
                }
            },
            // Cancellation: the write either completed (then it is booked) or never
            // happened; the frame stays in the outbox until it is booked.
            written = socket.write_frame(front.unwrap_or_default()), if out.wait_writable && front.is_some() => {
                out.wait_writable = false;
                out.after_write(written, &mut sim, Instant::now());
            }
            // Cancellation: `recv` loses no message when another branch wins.
            request = commands.recv(), if commands_open => match request {
                Some(ConsoleRequest { line, reply }) => {
                    let answer = console::execute(&mut sim, &line, Instant::now());
                    // The console thread may be gone; the command has run anyway.
                    let _ = reply.send(answer);
                }
                None => {
                    tracing::debug!("console closed; still serving");
                    commands_open = false;
                }
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
        }
        if out.wait_writable && out.is_empty() {
            out.wait_writable = false;
        }
    }
}

/// One frame read from the socket: answers go to the outbox at once.
fn handle(sim: &mut CanSim, out: &mut Outbox, frame: &CanFrame) {
    match from_socket(frame) {
        Some(frame) => {
            tracing::trace!(?frame, "rx");
            // The arrival time: the frame was just read.
            let answers = sim.handle_frame(&frame, Instant::now());
            out.extend(sim, answers);
        }
        None => sim.count_rx_other(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_convert_to_the_socket_and_back() {
        let f = Frame::new(0x181, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let s = to_socket(&f).unwrap();
        assert_eq!(from_socket(&s), Some(f));
        let empty = Frame::new(0x080, &[]).unwrap();
        assert_eq!(from_socket(&to_socket(&empty).unwrap()), Some(empty));
    }

    #[test]
    fn remote_and_extended_frames_are_not_for_the_nodes() {
        let rtr = CanFrame::new_remote(StandardId::new(0x701).unwrap(), 1).unwrap();
        assert_eq!(from_socket(&rtr), None);
        let ext = CanFrame::new(socketcan::ExtendedId::new(0x601).unwrap(), &[0x40]).unwrap();
        assert_eq!(from_socket(&ext), None);
    }

    #[test]
    fn enobufs_keeps_the_frame_and_backs_off_with_a_cap() {
        let t0 = Instant::now();
        let mut sim =
            CanSim::new(&super::super::CanOptions::new("1".parse().unwrap()), t0).unwrap();
        let mut out = Outbox::new();
        out.frames.push_back(Frame::new(0x181, &[1]).unwrap());
        let enobufs = || Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        let mut pauses = Vec::new();
        for _ in 0..8 {
            assert!(!out.after_write(enobufs(), &mut sim, t0));
            pauses.push(out.paused_until.unwrap() - t0);
        }
        assert_eq!(out.frames.len(), 1, "the frame is kept");
        assert_eq!(pauses[0], ENOBUFS_BACKOFF_MIN);
        assert_eq!(pauses[1], ENOBUFS_BACKOFF_MIN * 2);
        assert_eq!(*pauses.last().unwrap(), ENOBUFS_BACKOFF_MAX);
        assert_eq!(sim.stats().enobufs, 8);
        // Another error drops the frame and goes on
        assert!(out.after_write(
            Err(io::Error::from_raw_os_error(libc::ENETDOWN)),
            &mut sim,
            t0
        ));
        assert!(out.frames.is_empty());
        assert_eq!(sim.stats().dropped, 1);
    }

    fn sim() -> CanSim {
        CanSim::new(
            &super::super::CanOptions::new("1".parse().unwrap()),
            Instant::now(),
        )
        .unwrap()
    }

    #[test]
    fn a_full_outbox_drops_and_counts_the_excess() {
        let mut sim = sim();
        let mut out = Outbox::new();
        let heartbeat = Frame::new(0x701, &[0x05]).unwrap();
        out.extend(&mut sim, vec![heartbeat; MAX_OUTBOX + 10]);
        assert_eq!(out.frames.len(), MAX_OUTBOX);
        assert_eq!(sim.stats().dropped, 10);
        let flood = Frame::new(0x7F0, &[0; 8]).unwrap();
        out.extend(&mut sim, vec![flood; MAX_FLOOD_QUEUE + 5]);
        assert_eq!(out.flood.len(), MAX_FLOOD_QUEUE);
        assert_eq!(sim.stats().dropped, 15);
    }

    #[test]
    fn node_frames_overtake_queued_flood_frames() {
        let mut sim = sim();
        let mut out = Outbox::new();
        let flood = Frame::new(0x7F0, &[0; 8]).unwrap();
        let sdo = Frame::new(0x581, &[0x60, 0x17, 0x10, 0, 0, 0, 0, 0]).unwrap();
        out.extend(&mut sim, vec![flood, flood]);
        out.extend(&mut sim, vec![sdo]);
        let mut order = Vec::new();
        while let Some(f) = out.front() {
            order.push(f.id());
            out.pop_front();
        }
        assert_eq!(order, [0x581, 0x7F0, 0x7F0]);
        assert!(out.is_empty());
    }
}
