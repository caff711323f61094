//! The task that owns one CAN interface and drives the bus's [`Master`].
//!
//! CAN has no backpressure: a frame the socket has no room for is dropped by the kernel,
//! silently unless asked (PITFALLS.md: a reader that paused 1 ms every 10 frames lost 154
//! of 20,000). So the task keeps reading first, in batches, on a thread of its own (the
//! daemon gives each bus one), with a receive buffer sized by the config, and it asks the
//! kernel for `SO_RXQ_OVFL`: every frame lost in the socket buffer is counted, logged and
//! reported to every device of the bus as a `comm_error` (`rx_overflow`).
//!
//! What else can happen to a CAN interface, and what the task does:
//! - error frames (bus-off, error-passive, warning, restarted): counted, and a state change
//!   goes to every device as a `bus_state` event and to the log;
//! - `ENOBUFS` on write (the interface's transmit queue is full, e.g. a flooded or bus-off
//!   bus): the frame is kept and tried again after a short, growing pause, never in a busy
//!   loop; the queue of unsent frames is bounded and what falls off it is counted;
//! - the interface goes down (its flags, read every 250 ms, or `ENETDOWN`): a `bus_state`
//!   `down` event, and `up` when it is up again; the heartbeat consumer meanwhile takes the
//!   silent drives offline;
//! - the interface disappears (`ENODEV`) or cannot be opened: the socket is reopened with
//!   a capped back-off, and the master's timers keep running in between.
//!
//! Commands come through a bounded inbox ([`CanOrders`]) and go to the master at once: a
//! command's first frame is sent in the same turn (CAN has no half-duplex wait). Every
//! order is answered exactly once: by the master's outcome, or `rejected` (`bus_down`)
//! while the interface is down or missing and when the bus stops; jobs running when the
//! link goes down end then (`unknown` if something was sent).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::socket::{send, setsockopt, sockopt, MsgFlags};
use servogate_canopen::{Frame, Master, NodeSettings};
use servogate_command::{CommandId, Order, Outcome as CmdOutcome};
use servogate_core::{CommandReason, EventKind, EventSink};
use socketcan::{CanSocket, Socket, SocketOptions};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::rx::{ArrivalClock, RxBatch, RX_BATCH};
use crate::wire::{self, BusState, Received};

/// How the interface is opened (from the config).
#[derive(Debug, Clone)]
pub struct CanBusSettings {
    pub name: Arc<str>,
    pub interface: String,
    /// SO_RCVBUF in bytes; 0 keeps the kernel's default. Each frame costs the buffer
    /// several hundred bytes of bookkeeping, not 16.
    pub rcvbuf: usize,
    /// Longest wait between attempts to open a missing interface.
    pub reopen_max: Duration,
}

/// Counters of one CAN bus, shared with the daemon for logs and metrics.
#[derive(Debug, Default)]
pub struct CanStats {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Frames the kernel dropped because the socket's receive buffer was full.
    pub rx_lost: AtomicU64,
    /// Frames the CAN controller itself lost (error frame, CRTL overflow).
    pub controller_overflows: AtomicU64,
    pub error_frames: AtomicU64,
    pub bus_errors: AtomicU64,
    pub bus_off: AtomicU64,
    pub error_passive: AtomicU64,
    /// Writes refused with ENOBUFS (retried).
    pub tx_enobufs: AtomicU64,
    /// Frames never sent: the unsent queue was full, or the interface was gone.
    pub tx_dropped: AtomicU64,
    /// Frames of no use here (29-bit ids, remote frames).
    pub ignored: AtomicU64,
    pub reopens: AtomicU64,
    /// Notified after every attempt to open the interface, success or not: the daemon
    /// tells systemd it is ready once each bus has tried.
    pub open_attempted: tokio::sync::Notify,
}

/// Most frames read in one wake-up before the timers get a turn.
const READ_BATCH: usize = 256;
/// Most frames waiting to be sent; the oldest falls off (and is counted).
const MAX_UNSENT: usize = 1024;
/// First and longest pause after ENOBUFS.
const ENOBUFS_MIN: Duration = Duration::from_millis(1);
const ENOBUFS_MAX: Duration = Duration::from_millis(50);
/// First wait before reopening a missing interface.
const REOPEN_MIN: Duration = Duration::from_millis(100);
/// How often the interface's flags are looked at (up / down).
const DOWN_CHECK: Duration = Duration::from_millis(250);
/// At most one `rx_overflow` notice per this, with the frames lost in between.
const LOSS_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Why [`serve`] returned.
enum Outcome {
    Stopped,
    /// The socket is unusable (interface gone): reopen.
    Lost(io::Error),
}

/// The drives of a bus, as the daemon sees them: a reload sends a new list, and the bus
/// task applies it to its master without closing the socket.
pub type NodeList = watch::Receiver<Vec<NodeSettings>>;

/// A drive list that never changes (tests, benchmarks).
pub fn fixed_nodes(nodes: Vec<NodeSettings>) -> NodeList {
    watch::channel(nodes).1
}

/// A command for a drive of the bus, and where its one outcome goes (the CAN twin of
/// `servogate_modbus::bus::BusOrder`).
#[derive(Debug)]
pub struct CanOrder {
    pub order: Order,
    pub reply: oneshot::Sender<CmdOutcome>,
}

/// The bus's command inbox: bounded, filled by the daemon with `try_send`.
pub type CanOrders = mpsc::Receiver<CanOrder>;

/// An inbox that never receives (tests, benchmarks).
pub fn no_can_orders() -> CanOrders {
    mpsc::channel(1).1
}

/// What the daemon steers a running bus with.
struct Control {
    stop: CancellationToken,
    nodes: NodeList,
    orders: CanOrders,
    /// False once the daemon dropped its sender.
    orders_open: bool,
    waiting: Waiting,
}

/// The next order; pending forever once the inbox is closed.
async fn next_order(orders: &mut CanOrders, open: &mut bool) -> CanOrder {
    if *open {
        if let Some(o) = orders.recv().await {
            return o;
        }
        *open = false;
    }
    std::future::pending().await
}

/// Where each order the master holds is answered, by (device, id).
#[derive(Default)]
struct Waiting(HashMap<(Arc<str>, CommandId), oneshot::Sender<CmdOutcome>>);

impl Waiting {
    /// Hands `order` to the master, or answers it at once (`up`: the link can carry it).
    fn take(&mut self, CanOrder { order, reply }: CanOrder, master: &mut Master, up: bool) {
        if !up {
            let _ = reply.send(CmdOutcome::rejected(
                CommandReason::BusDown,
                "the CAN interface is down: nothing was sent",
            ));
            return;
        }
        let key = (order.device.clone(), order.id.clone());
        match master.command(order, std::time::Instant::now()) {
            Ok(()) => {
                self.0.insert(key, reply);
            }
            // The daemon may have stopped waiting (shutdown): nothing to tell then.
            Err(outcome) => {
                let _ = reply.send(outcome);
            }
        }
        self.answer(master);
    }

    /// Answers every order the master has finished.
    fn answer(&mut self, master: &mut Master) {
        while let Some((order, outcome)) = master.poll_outcome() {
            debug!(device = %order.device, id = order.id.as_str(), status = outcome.status.as_str(),
                   "command ended on the bus");
            if let Some(reply) = self.0.remove(&(order.device, order.id)) {
                let _ = reply.send(outcome);
            }
        }
    }
}

impl Control {
    /// The bus stops: every job and every order still in the inbox gets its outcome.
    fn finish(&mut self, master: &mut Master) {
        master.drain_commands();
        self.waiting.answer(master);
        // Orders whose job the master forgot without an outcome (none should be).
        for (_, reply) in self.waiting.0.drain() {
            let _ = reply.send(CmdOutcome::unknown("the bus stopped"));
        }
        self.orders.close();
        while let Ok(o) = self.orders.try_recv() {
            let _ = o.reply.send(CmdOutcome::rejected(
                CommandReason::BusDown,
                "the bus stopped before it was sent",
            ));
        }
    }
}

/// The next drive list; pending forever once the daemon's sender is gone.
async fn next_nodes(nodes: &mut NodeList) -> Option<Vec<NodeSettings>> {
    if nodes.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    Some(nodes.borrow_and_update().clone())
}

/// Runs the bus until `stop` is cancelled, then logs its counters. Never returns an error:
/// a missing interface is waited for, reported and retried.
pub async fn run_can_bus(
    settings: CanBusSettings,
    mut master: Master,
    nodes: NodeList,
    orders: CanOrders,
    sink: Arc<dyn EventSink>,
    stats: Arc<CanStats>,
    stop: CancellationToken,
) {
    let name = settings.name.clone();
    let mut control = Control {
        stop,
        nodes,
        orders,
        orders_open: true,
        waiting: Waiting::default(),
    };
    run(settings, &mut master, sink, stats.clone(), &mut control).await;
    control.finish(&mut master);
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    info!(
        bus = %name,
        rx_frames = n(&stats.rx_frames),
        rx_lost = n(&stats.rx_lost),
        tx_frames = n(&stats.tx_frames),
        tx_enobufs = n(&stats.tx_enobufs),
        tx_dropped = n(&stats.tx_dropped),
        error_frames = n(&stats.error_frames),
        ignored = n(&stats.ignored),
        reopens = n(&stats.reopens),
        "CAN bus stopped"
    );
}

async fn run(
    settings: CanBusSettings,
    master: &mut Master,
    sink: Arc<dyn EventSink>,
    stats: Arc<CanStats>,
    control: &mut Control,
) {
    let mut link = Link::new(settings.name.clone());
    let mut backoff = REOPEN_MIN;
    loop {
        let opened = open(&settings);
        stats.open_attempted.notify_one();
        match opened {
            Ok(fd) => {
                backoff = REOPEN_MIN;
                info!(bus = %settings.name, interface = %settings.interface, "CAN interface open");
                link.set_up(master, sink.as_ref());
                match serve(
                    &fd,
                    &settings,
                    master,
                    sink.as_ref(),
                    &stats,
                    control,
                    &mut link,
                )
                .await
                {
                    Outcome::Stopped => return,
                    Outcome::Lost(e) => {
                        warn!(bus = %settings.name, interface = %settings.interface, error = %e,
                              "CAN interface lost; reopening");
                        stats.reopens.fetch_add(1, Ordering::Relaxed);
                        link.set_down(master, sink.as_ref(), &format!("interface lost: {e}"));
                    }
                }
            }
            Err(e) => {
                if !link.down {
                    warn!(bus = %settings.name, interface = %settings.interface, error = %e,
                          "cannot open the CAN interface; retrying with back-off");
                }
                link.set_down(master, sink.as_ref(), &format!("cannot open: {e}"));
            }
        }
        // Wait before the next attempt, with the master's timers running: heartbeats stop
        // coming, and the drives must go offline on time.
        let until = Instant::now() + backoff;
        loop {
            let next = master.poll_timeout().map(Instant::from_std);
            let wake = next.map_or(until, |t| t.min(until));
            // Commands still held end now: nothing can reach the drives without a socket.
            master.drain_commands();
            control.waiting.answer(master);
            tokio::select! {
                _ = control.stop.cancelled() => return,
                Some(nodes) = next_nodes(&mut control.nodes) => master.update_nodes(nodes, std::time::Instant::now()),
                // Cancel-safe: an order not taken stays in the channel.
                order = next_order(&mut control.orders, &mut control.orders_open) => {
                    control.waiting.take(order, master, false);
                }
                _ = sleep_until(wake) => {}
            }
            let now = Instant::now();
            master.handle_timeout(now.into_std(), SystemTime::now(), sink.as_ref());
            control.waiting.answer(master);
            // Nothing can be sent without a socket.
            while let Some(frame) = master.poll_transmit() {
                link.dropped(&frame, &stats);
            }
            if now >= until {
                break;
            }
        }
        backoff = (backoff * 2).min(settings.reopen_max.max(REOPEN_MIN));
    }
}

/// Opens the interface: non-blocking, error frames on, receive buffer sized, drop counter
/// on.
fn open(settings: &CanBusSettings) -> io::Result<AsyncFd<CanSocket>> {
    let sock = CanSocket::open(&settings.interface).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENODEV) {
            io::Error::new(
                e.kind(),
                format!(
                    "no CAN interface {:?} (ENODEV): is it created and is the kernel's CAN \
                     support loaded? (scripts/vcan-setup.sh for vcan)",
                    settings.interface
                ),
            )
        } else {
            e
        }
    })?;
    sock.set_nonblocking(true)?;
    sock.set_error_filter(wire::err::MASK)?;
    if settings.rcvbuf > 0 {
        let n = i32::try_from(settings.rcvbuf).unwrap_or(i32::MAX);
        // SO_RCVBUFFORCE passes net.core.rmem_max but needs CAP_NET_ADMIN; without it the
        // plain option is capped by rmem_max, which the log then shows.
        if sock
            .set_socket_option_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, n)
            .is_err()
        {
            sock.set_socket_option_int(libc::SOL_SOCKET, libc::SO_RCVBUF, n)?;
        }
    }
    setsockopt(&sock, sockopt::RxqOvfl, &1).map_err(io::Error::from)?;
    // Each frame's acquisition time from the kernel (when it came off the interface), so
    // a batch needs no clock read per frame and the time does not depend on when the
    // reader ran. Without it (an old kernel) the read time is used.
    if let Err(e) = setsockopt(&sock, sockopt::ReceiveTimestampns, &true) {
        warn!(interface = %settings.interface, error = %e, "no kernel receive timestamps; frames are stamped when read");
    }
    let granted = nix::sys::socket::getsockopt(&sock, sockopt::RcvBuf).unwrap_or(0);
    debug!(interface = %settings.interface, rcvbuf = granted, "CAN socket options set");
    // SAFETY: `CanSocket` owns its descriptor (an `OwnedFd` inside): it is open, stays
    // open and is the same descriptor for as long as the `AsyncFd` owns the socket, and
    // nothing else closes it.
    #[allow(unsafe_code)]
    unsafe { AsyncFd::register(sock) }.map_err(io::Error::from)
}

/// What the link looks like to the devices: reported once per change.
struct Link {
    bus: Arc<str>,
    down: bool,
    state: BusState,
    /// SO_RXQ_OVFL is the socket's total; this is the last total seen.
    lost_total: u32,
    lost_unreported: u64,
    last_loss_report: Option<Instant>,
    /// Sends refused with ENOBUFS since the last report.
    enobufs_unreported: u64,
    last_enobufs_report: Option<Instant>,
    /// An NMT frame (COB-ID 0) was dropped unsent: the starts go again once the link is
    /// up, or the drives that missed theirs would stay pre-operational.
    nmt_dropped: bool,
}

impl Link {
    fn new(bus: Arc<str>) -> Self {
        Self {
            bus,
            down: false,
            state: BusState::ErrorActive,
            lost_total: 0,
            lost_unreported: 0,
            last_loss_report: None,
            enobufs_unreported: 0,
            last_enobufs_report: None,
            nmt_dropped: false,
        }
    }

    /// A frame given up unsent (the interface down or missing, the queue full).
    fn dropped(&mut self, frame: &Frame, stats: &CanStats) {
        stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
        if frame.id() == 0 {
            self.nmt_dropped = true;
        }
    }

    fn set_down(&mut self, master: &mut Master, sink: &dyn EventSink, why: &str) {
        if !self.down {
            self.down = true;
            warn!(bus = %self.bus, "CAN bus down: {why}");
            master.notify_all(
                SystemTime::now(),
                EventKind::BusState { state: "down" },
                &format!("CAN bus {} down: {why}", self.bus),
                sink,
            );
        }
    }

    fn set_up(&mut self, master: &mut Master, sink: &dyn EventSink) {
        if std::mem::take(&mut self.nmt_dropped) {
            info!(bus = %self.bus, "NMT start commands were lost while the link was down: sending them again");
            master.start_all_again();
        }
        if self.down {
            self.down = false;
            info!(bus = %self.bus, "CAN bus up");
            master.notify_all(
                SystemTime::now(),
                EventKind::BusState { state: "up" },
                &format!("CAN bus {} up", self.bus),
                sink,
            );
        }
    }

    fn set_state(&mut self, state: BusState, master: &mut Master, sink: &dyn EventSink) {
        if state != self.state {
            warn!(bus = %self.bus, from = self.state.as_str(), to = state.as_str(), "CAN controller state");
            master.notify_all(
                SystemTime::now(),
                EventKind::BusState {
                    state: state.as_str(),
                },
                &format!(
                    "CAN bus {}: {} -> {}",
                    self.bus,
                    self.state.as_str(),
                    state.as_str()
                ),
                sink,
            );
            self.state = state;
        }
    }

    /// Records the socket's drop total; returns the frames lost since the last call.
    fn lost(&mut self, total: u32) -> u64 {
        let new = u64::from(total.wrapping_sub(self.lost_total));
        self.lost_total = total;
        self.lost_unreported += new;
        new
    }

    /// At most once a second: the sends the interface refused (ENOBUFS), to the log and to
    /// every device as a `comm_error` (`tx_enobufs`). The frames were kept and retried.
    fn report_enobufs(&mut self, now: Instant, master: &mut Master, sink: &dyn EventSink) {
        if self.enobufs_unreported == 0
            || self
                .last_enobufs_report
                .is_some_and(|t| now < t + LOSS_REPORT_EVERY)
        {
            return;
        }
        let n = std::mem::take(&mut self.enobufs_unreported);
        self.last_enobufs_report = Some(now);
        warn!(bus = %self.bus, refused = n, "CAN transmit queue full (ENOBUFS); frames held and retried");
        master.notify_all(
            SystemTime::now(),
            EventKind::CommError {
                error: "tx_enobufs",
            },
            &format!(
                "the CAN interface refused {n} sends (ENOBUFS: its transmit queue is full; \
                 bus flooded, or bus-off); they are retried"
            ),
            sink,
        );
    }

    fn report_loss(&mut self, now: Instant, master: &mut Master, sink: &dyn EventSink) {
        if self.lost_unreported == 0 {
            return;
        }
        if self
            .last_loss_report
            .is_some_and(|t| now < t + LOSS_REPORT_EVERY)
        {
            return;
        }
        let n = std::mem::take(&mut self.lost_unreported);
        self.last_loss_report = Some(now);
        warn!(bus = %self.bus, lost = n, "CAN frames lost in the socket receive buffer");
        master.notify_all(
            SystemTime::now(),
            EventKind::CommError {
                error: "rx_overflow",
            },
            &format!(
                "{n} CAN frames lost: the gateway's receive buffer overflowed (raise the bus's rcvbuf)"
            ),
            sink,
        );
    }
}

async fn serve(
    fd: &AsyncFd<CanSocket>,
    settings: &CanBusSettings,
    master: &mut Master,
    sink: &dyn EventSink,
    stats: &CanStats,
    control: &mut Control,
    link: &mut Link,
) -> Outcome {
    let mut unsent: VecDeque<Frame> = VecDeque::new();
    let mut retry_at: Option<Instant> = None;
    let mut enobufs_pause = ENOBUFS_MIN;
    let mut rx = RxBatch::new();
    let mut clock = ArrivalClock::new(std::time::Instant::now(), SystemTime::now());
    // A fresh socket's drop counter starts at zero.
    link.lost_total = 0;
    let mut down_check = tokio::time::interval(DOWN_CHECK);
    down_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if link.down {
            // A down link carries nothing: jobs held end (started: unknown).
            master.drain_commands();
        }
        control.waiting.answer(master);
        while let Some(frame) = master.poll_transmit() {
            if unsent.len() >= MAX_UNSENT {
                if let Some(old) = unsent.pop_front() {
                    link.dropped(&old, stats);
                }
            }
            unsent.push_back(frame);
        }
        let mut want_writable = false;
        if retry_at.is_none() {
            while let Some(frame) = unsent.front() {
                match send(
                    fd.get_ref().as_raw_fd(),
                    &wire::encode(frame),
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(_) => {
                        unsent.pop_front();
                        stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        enobufs_pause = ENOBUFS_MIN;
                    }
                    Err(nix::errno::Errno::EAGAIN) => {
                        want_writable = true;
                        break;
                    }
                    Err(nix::errno::Errno::ENOBUFS) => {
                        // The interface's queue is full: no readiness event will say when
                        // it has room, so wait a little, longer each time.
                        stats.tx_enobufs.fetch_add(1, Ordering::Relaxed);
                        link.enobufs_unreported += 1;
                        retry_at = Some(Instant::now() + enobufs_pause);
                        enobufs_pause = (enobufs_pause * 2).min(ENOBUFS_MAX);
                        break;
                    }
                    Err(nix::errno::Errno::ENETDOWN) => {
                        link.set_down(master, sink, "interface down (ENETDOWN on send)");
                        for f in unsent.drain(..) {
                            link.dropped(&f, stats);
                        }
                    }
                    Err(e @ (nix::errno::Errno::ENODEV | nix::errno::Errno::ENXIO)) => {
                        return Outcome::Lost(e.into());
                    }
                    Err(e) => {
                        warn!(bus = %settings.name, error = %e, id = frame.id(), "CAN send failed; frame dropped");
                        unsent.pop_front();
                        stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let timer = master.poll_timeout().map(Instant::from_std);
        tokio::select! {
            biased;
            _ = control.stop.cancelled() => return Outcome::Stopped,
            // Cancel-safe: a list not taken stays marked as changed for the next turn.
            Some(nodes) = next_nodes(&mut control.nodes) => {
                info!(bus = %settings.name, devices = nodes.len(), "drive list updated");
                master.update_nodes(nodes, std::time::Instant::now());
            }
            // Cancel-safe: an order not taken stays in the channel. Ahead of the reads,
            // so a command's first frame goes out on this turn even on a busy bus.
            order = next_order(&mut control.orders, &mut control.orders_open) => {
                control.waiting.take(order, master, !link.down);
            }
            // Cancel-safe: readiness is re-checked on the next turn; nothing is consumed
            // until try_io reads.
            ready = fd.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => return Outcome::Lost(e),
                };
                let mut taken = 0;
                while taken < READ_BATCH {
                    let read = guard.try_io(|inner| rx.recv(inner.get_ref().as_raw_fd()));
                    match read {
                        Err(_would_block) => break,
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            // The error is reported once; wait for the next readiness edge
                            // instead of asking again at once (which would starve the
                            // timers that take the silent drives offline).
                            guard.clear_ready();
                            match e.raw_os_error() {
                                // Reported once per down; when it is read after the
                                // interface came back, it is stale.
                                Some(libc::ENETDOWN) => {
                                    if interface_is_up(&settings.interface) != Some(true) {
                                        link.set_down(master, sink, "interface down (ENETDOWN)");
                                    }
                                }
                                Some(libc::ENODEV) | Some(libc::ENXIO) => return Outcome::Lost(e),
                                _ => warn!(bus = %settings.name, error = %e, "CAN receive failed"),
                            }
                            break;
                        }
                    }
                    // One clock pair per batch; each frame's times come from its kernel
                    // timestamp.
                    clock.refresh(std::time::Instant::now(), SystemTime::now());
                    if link.down && !rx.is_empty() {
                        link.set_up(master, sink);
                    }
                    for i in 0..rx.len() {
                        let Some((bytes, meta)) = rx.get(i) else { break };
                        if let Some(total) = meta.dropped {
                            let lost = link.lost(total);
                            stats.rx_lost.fetch_add(lost, Ordering::Relaxed);
                        }
                        match wire::decode(bytes) {
                            Received::Data(frame) => {
                                stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                                let (now, wall) = clock.arrival(meta.stamp);
                                master.handle_frame(&frame, now, wall, sink);
                            }
                            Received::Error(report) => {
                                stats.error_frames.fetch_add(1, Ordering::Relaxed);
                                if report.bus_error {
                                    stats.bus_errors.fetch_add(1, Ordering::Relaxed);
                                }
                                if report.controller_overflow {
                                    stats.controller_overflows.fetch_add(1, Ordering::Relaxed);
                                }
                                if let Some(state) = report.state {
                                    match state {
                                        BusState::BusOff => stats.bus_off.fetch_add(1, Ordering::Relaxed),
                                        BusState::ErrorPassive => stats.error_passive.fetch_add(1, Ordering::Relaxed),
                                        _ => 0,
                                    };
                                    link.set_state(state, master, sink);
                                }
                            }
                            Received::Ignored => {
                                stats.ignored.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    taken += rx.len();
                    if rx.len() < RX_BATCH {
                        // A short read means the queue ran empty: wait for the next
                        // readiness edge without another read to hear EAGAIN. (tokio
                        // clears only the readiness this guard saw; a frame queued since
                        // raised a newer one, which stays.)
                        guard.clear_ready();
                        break;
                    }
                }
                // A steady stream keeps the socket readable, and the biased select would
                // then never reach the timer branch: run what is due now.
                let now = Instant::from_std(clock.now());
                if timer.is_some_and(|t| t <= now) {
                    clock.observe(now.into_std());
                    master.handle_timeout(now.into_std(), clock.wall_now(), sink);
                }
                link.report_loss(now, master, sink);
            }
            _ = async { sleep_until(timer.unwrap_or_else(Instant::now)).await }, if timer.is_some() => {
                let now = Instant::now().into_std();
                clock.observe(now);
                master.handle_timeout(now, SystemTime::now(), sink);
                link.report_loss(Instant::now(), master, sink);
            }
            ready = fd.writable(), if want_writable => {
                if let Err(e) = ready {
                    return Outcome::Lost(e);
                }
            }
            _ = async { sleep_until(retry_at.unwrap_or_else(Instant::now)).await }, if retry_at.is_some() => {
                retry_at = None;
                link.report_enobufs(Instant::now(), master, sink);
            }
            // The kernel tells a bound CAN_RAW socket that its interface went down only
            // as a socket error (EPOLLERR), which readable() does not wake for; so the
            // interface's flags are looked at too, and they also say when it is back.
            _ = down_check.tick() => {
                match interface_is_up(&settings.interface) {
                    Some(true) => link.set_up(master, sink),
                    Some(false) => link.set_down(master, sink, "interface is down"),
                    None => {}
                }
            }
        }
    }
}

/// IFF_UP from /sys/class/net/IFACE/flags; `None` when it cannot be read.
fn interface_is_up(interface: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/flags")).ok()?;
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()?;
    Some(flags & 0x1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use servogate_canopen::NodeId;
    use servogate_core::Event;

    struct Null;
    impl EventSink for Null {
        fn push(&self, _: Event) {}
    }

    fn drain(m: &mut Master) -> Vec<Frame> {
        std::iter::from_fn(|| m.poll_transmit()).collect()
    }

    #[test]
    fn nmt_starts_dropped_while_the_link_was_down_are_sent_again_when_it_comes_up() {
        // Given a master whose first NMT starts were dropped: no socket yet
        let t0 = std::time::Instant::now();
        let nodes = [1, 2]
            .map(|n| NodeSettings::new(&format!("d{n}"), NodeId::new(n).unwrap(), Duration::ZERO));
        let mut master = Master::new(nodes.to_vec(), None, t0);
        let stats = CanStats::default();
        let mut link = Link::new(Arc::from("can-a"));
        link.set_down(&mut master, &Null, "cannot open");
        for f in drain(&mut master) {
            link.dropped(&f, &stats);
        }
        // When the link comes up
        link.set_up(&mut master, &Null);
        // Then both starts are queued again, once
        let nmt: Vec<Vec<u8>> = drain(&mut master)
            .into_iter()
            .filter(|f| f.id() == 0)
            .map(|f| f.data().to_vec())
            .collect();
        assert_eq!(nmt, [vec![0x01, 1], vec![0x01, 2]]);
        link.set_down(&mut master, &Null, "down");
        link.set_up(&mut master, &Null);
        assert!(drain(&mut master).iter().all(|f| f.id() != 0));
        assert!(stats.tx_dropped.load(Ordering::Relaxed) >= 2);
    }
}
