//! The task that owns one RS-485 port and polls every device on it.
//!
//! Modbus RTU is half duplex: one transaction at a time. The task picks the device that is
//! due first, runs its poll cycle (one or more reads), and hands every outcome to that
//! device's [`DevicePoller`]. Rules it enforces (DESIGN.md section 5):
//!
//! - every request has a timeout, and a bad CRC or a reply from the wrong unit ends the
//!   request at once (the [`RtuLine`] raises it; tokio-modbus would wait for the timeout);
//! - the input queue is discarded before each request (in [`RtuLine`]), so a late reply
//!   is never taken for the answer to the next request;
//! - t3.5 of silence separates the end of one reply and the next request, timed with a
//!   [`PreciseTimer`] because tokio's 1 ms timer would eat 15 % of a fast transaction;
//! - a dead device is backed off by its poller and never stalls the others;
//! - an IO error on the port closes it and reopens it, with a capped back-off, while the
//!   devices on it count failures and go offline.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use servogate_command::{CommandId, Order, Outcome as CmdOutcome, QueuedJob};
use servogate_core::CommandReason;
use servogate_core::{EventSink, Histogram, SeqBook};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_modbus::ExceptionCode;
use tokio_serial::{DataBits, Parity, SerialPortBuilderExt, SerialStream, StopBits};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::command::{Executor, Job, Transaction, TxResult};
use crate::line::{LineFault, LineMonitor, RtuLine};
use crate::poll::{DevicePoller, DeviceSettings, Failure, ReadRequest};
use crate::profile::RegisterKind;
use crate::timing::{t35, PreciseTimer};

/// How the bus reaches its devices (from the config).
#[derive(Debug, Clone, PartialEq)]
pub struct BusSettings {
    pub name: Arc<str>,
    pub link: Link,
    /// The RS-485 line's baud rate (a serial port's, or the line behind a serial device
    /// server): t3.5 and the guard after a timeout come from it. Unused on Modbus TCP.
    pub baud: u32,
    /// Inter-frame silence; `None` computes t3.5 from the baud rate. A pty has no baud
    /// rate, so tests and the demo may set zero. Unused on Modbus TCP.
    pub t35: Option<Duration>,
    /// Longest wait between attempts to reopen a failed port or connection.
    pub reopen_max: Duration,
}

/// The medium under a Modbus bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    /// `modbus-rtu`: a serial port.
    Serial {
        port: PathBuf,
        parity: Parity,
        data_bits: DataBits,
        stop_bits: StopBits,
    },
    /// `modbus-rtu-tcp`: RTU frames over a TCP stream to a serial device server; every
    /// rule of the serial line holds (the line is still RS-485 behind the server).
    RtuOverTcp {
        /// `host:port`, resolved at each connect.
        address: String,
    },
    /// `modbus-tcp`: MBAP frames with transaction ids ([`crate::tcp`]).
    Tcp {
        address: String,
        /// Requests outstanding at once on the connection, at least 1.
        max_in_flight: u16,
    },
}

impl Link {
    /// The protocol name of the config file.
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::Serial { .. } => "modbus-rtu",
            Self::RtuOverTcp { .. } => "modbus-rtu-tcp",
            Self::Tcp { .. } => "modbus-tcp",
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Serial { port, .. } => write!(f, "{}", port.display()),
            Self::RtuOverTcp { address } | Self::Tcp { address, .. } => f.write_str(address),
        }
    }
}

/// Counters of one bus, shared with the daemon for logs and metrics.
#[derive(Debug, Default)]
pub struct BusStats {
    pub transactions: AtomicU64,
    pub replies: AtomicU64,
    pub timeouts: AtomicU64,
    pub crc_errors: AtomicU64,
    pub exceptions: AtomicU64,
    pub wrong_replies: AtomicU64,
    pub io_errors: AtomicU64,
    pub late_replies: AtomicU64,
    /// Modbus TCP replies whose transaction id matched no outstanding request (answers
    /// that came after their request's timeout), dropped.
    pub stale_replies: AtomicU64,
    pub reopens: AtomicU64,
    /// Sum of reply times in microseconds (mean = this / replies).
    pub reply_micros: AtomicU64,
    /// Time from request to complete reply, for every reply (exceptions included).
    pub reply_time: Histogram,
    /// Exception replies by exception code (Illegal Data Address, 2, included).
    exception_codes: Mutex<BTreeMap<u8, u64>>,
    /// Notified after every attempt to open the port, success or not: the daemon tells
    /// systemd it is ready once each bus has tried.
    pub open_attempted: tokio::sync::Notify,
}

impl BusStats {
    /// Exception replies counted by code, in code order.
    pub fn exception_codes(&self) -> Vec<(u8, u64)> {
        let codes = self
            .exception_codes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        codes.iter().map(|(&c, &n)| (c, n)).collect()
    }

    pub(crate) fn count_exception(&self, code: u8) {
        self.exceptions.fetch_add(1, Ordering::Relaxed);
        // A counter map insert cannot leave the map inconsistent: take over a poisoned lock.
        let mut codes = self
            .exception_codes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *codes.entry(code).or_default() += 1;
    }

    pub(crate) fn count(&self, failure: &Failure) {
        let counter = match failure {
            Failure::Timeout => &self.timeouts,
            Failure::Crc => &self.crc_errors,
            Failure::Exception(code) => return self.count_exception(*code),
            Failure::WrongReply => &self.wrong_replies,
            Failure::Io => &self.io_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why the bus task stopped.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus {bus}: the precise timer is not available: {source}")]
    Timer {
        bus: Arc<str>,
        #[source]
        source: io::Error,
    },
}

/// The outcome of one read.
enum Outcome {
    Reply(Vec<u16>),
    IllegalAddress,
    Failed(Failure),
    /// tokio-modbus could not decode the reply (noise). Its codec may hold half a frame
    /// or have ended its stream, so its client must be rebuilt.
    Garbled,
}

struct Line {
    ctx: Context,
    monitor: Arc<LineMonitor>,
}

/// The devices of a bus, as the daemon sees them: a reload sends a new list, and the bus
/// task applies it without closing its port (see [`run_bus`]).
pub type DeviceList = watch::Receiver<Vec<DeviceSettings>>;

/// A device list that never changes (tests, benchmarks, the demo).
pub fn fixed_devices(devices: Vec<DeviceSettings>) -> DeviceList {
    watch::channel(devices).1
}

/// A command for a device of the bus, and where its one outcome goes.
#[derive(Debug)]
pub struct BusOrder {
    pub order: Order,
    pub reply: oneshot::Sender<CmdOutcome>,
}

/// The bus's command inbox: bounded, filled by the daemon with `try_send`.
pub type Orders = mpsc::Receiver<BusOrder>;

/// An inbox that never receives (tests, benchmarks, a bus without commands).
pub fn no_orders() -> Orders {
    mpsc::channel(1).1
}

/// Where each job's outcome goes, by (device, id).
#[derive(Default)]
pub(crate) struct Waiting(HashMap<(Arc<str>, CommandId), oneshot::Sender<CmdOutcome>>);

impl Waiting {
    pub(crate) fn finish(&mut self, job: &Job, outcome: CmdOutcome) {
        debug!(device = %job.device(), id = job.id().as_str(), status = outcome.status.as_str(),
               "command ended on the bus");
        if let Some(tx) = self.0.remove(&(job.device().clone(), job.id().clone())) {
            // The daemon may have stopped waiting (shutdown): nothing to tell then.
            let _ = tx.send(outcome);
        }
    }

    pub(crate) fn finish_all(&mut self, ended: Vec<(Job, CmdOutcome)>) {
        for (job, outcome) in ended {
            self.finish(&job, outcome);
        }
    }
}

/// Moves orders from the inbox into the executor while it has room: each becomes a job
/// planned against its device's profile, or is answered at once.
pub(crate) fn take_orders(
    orders: &mut Orders,
    mut first: Option<BusOrder>,
    exec: &mut Executor,
    waiting: &mut Waiting,
    set: &Pollers,
    now: std::time::Instant,
) {
    // Every order is taken at once, so the inbox never holds a stop behind others. When
    // the executor is full, a command that is not a stop is refused (nothing sent): the
    // jobs held are bounded, and a stop always gets in.
    while let Some(BusOrder { order, reply }) = first.take().or_else(|| orders.try_recv().ok()) {
        if exec.is_full() && !order.action.is_safety() {
            let _ = reply.send(CmdOutcome::rejected(
                CommandReason::RateLimited,
                format!("the bus holds {} commands already", Executor::CAPACITY),
            ));
            continue;
        }
        let Some(poller) = set
            .pollers
            .iter()
            .find(|p| p.settings().name == order.device)
        else {
            let _ = reply.send(CmdOutcome::rejected(
                CommandReason::BusDown,
                "the device is not on this bus (removed by a reload?)",
            ));
            continue;
        };
        let s = poller.settings();
        let key = (order.device.clone(), order.id.clone());
        match Job::plan(order, s.unit, &s.fields, now) {
            Err(outcome) => {
                let _ = reply.send(outcome);
            }
            Ok(job) => {
                waiting.0.insert(key, reply);
                let ended = exec.push(job);
                waiting.finish_all(ended);
            }
        }
    }
}

/// The line's timing: t3.5 of silence before every request, and a guard after a timeout.
struct Wire {
    timer: PreciseTimer,
    silence: Duration,
    guard: Duration,
    /// When the line last fell quiet.
    quiet_since: Instant,
    extra_guard: Duration,
}

impl Wire {
    /// Waits until the line has been quiet long enough for the next request.
    async fn wait_quiet(&mut self) {
        let quiet_until = self.quiet_since + self.silence + self.extra_guard;
        if quiet_until > Instant::now() {
            // The timer cannot fail once created; if it does, fall back to tokio's.
            if self.timer.sleep_until(quiet_until).await.is_err() {
                tokio::time::sleep_until(quiet_until).await;
            }
        }
        self.extra_guard = Duration::ZERO;
    }

    /// A transaction ended at `now`; after a timeout the silent unit may still send.
    fn ended(&mut self, now: Instant, timed_out: bool) {
        self.quiet_since = now;
        if timed_out {
            self.extra_guard = self.guard.saturating_sub(self.silence);
        }
    }
}

/// The pollers of a bus and, per poller, whether its next request is a probe.
pub(crate) struct Pollers {
    pub(crate) pollers: Vec<DevicePoller>,
    /// Its last request timed out or was cut off, so an answer to it may still be on its
    /// way: the unit is probed (see [`probe_of`]) before it is read again.
    pub(crate) suspect: Vec<bool>,
}

impl Pollers {
    /// Replaces the device list: a device whose settings did not change keeps its poller
    /// (schedule, availability, plan splits, all of it); a changed or new device gets a
    /// new poller that continues its sequences from `book`; a device no longer listed is
    /// dropped.
    pub(crate) fn update(
        &mut self,
        list: &[DeviceSettings],
        book: &SeqBook,
        now: std::time::Instant,
    ) {
        let mut old: Vec<(DevicePoller, bool)> =
            self.pollers.drain(..).zip(self.suspect.drain(..)).collect();
        for settings in list {
            let same = old.iter().position(|(p, _)| p.settings() == settings);
            let (poller, suspect) = match same {
                Some(i) => old.swap_remove(i),
                None => {
                    // The old poller of this device, if any, stops numbering first. A
                    // new poller of a unit the line still suspects keeps the suspicion.
                    let suspect = old
                        .iter()
                        .any(|(p, s)| *s && p.settings().unit == settings.unit);
                    old.retain(|(p, _)| p.settings().name != settings.name);
                    let events = book.events(&settings.name);
                    let p = DevicePoller::with_events(settings.clone(), now, events);
                    (p, suspect)
                }
            };
            self.pollers.push(poller);
            self.suspect.push(suspect);
        }
    }
}

/// Polls every device of `devices` on the port of `settings` until `cancel` fires.
///
/// `devices` may change while the bus runs (a reload): the port stays open, unchanged
/// devices keep polling as before, and a device's sequence numbers come from `book`, so
/// a replaced device continues its sequences.
pub async fn run_bus(
    settings: BusSettings,
    mut devices: DeviceList,
    mut orders: Orders,
    sink: Arc<dyn EventSink>,
    stats: Arc<BusStats>,
    book: SeqBook,
    cancel: CancellationToken,
) -> Result<(), BusError> {
    if let Link::Tcp {
        address,
        max_in_flight,
    } = &settings.link
    {
        let (address, max) = (address.clone(), usize::from(*max_in_flight).max(1));
        let (sink, stats, book, cancel) = (sink, stats, book, cancel);
        return crate::tcp::run(
            settings, address, max, devices, orders, sink, stats, book, cancel,
        )
        .await;
    }
    let timer = PreciseTimer::new().map_err(|source| BusError::Timer {
        bus: settings.name.clone(),
        source,
    })?;
    let silence = settings.t35.unwrap_or_else(|| t35(settings.baud));
    let start = Instant::now();
    let mut wire = Wire {
        timer,
        silence,
        // After a timeout the silent device may still be sending; wait at least one real
        // t3.5 (even on a pty) before the next request, then its bytes are discarded.
        guard: silence.max(t35(settings.baud)),
        quiet_since: start,
        extra_guard: Duration::ZERO,
    };
    let mut set = Pollers {
        pollers: Vec::new(),
        suspect: Vec::new(),
    };
    set.update(&devices.borrow_and_update(), &book, start.into_std());

    let mut port = Port {
        line: None,
        reopen_at: start,
        reopen_wait: Duration::from_millis(100),
    };
    // After a timeout (or a reply cut off by another unit's bytes), the unit is probed
    // before it is read again (`Pollers::suspect`, `probe_of`). RTU has no transaction
    // id: an answer that comes later than the timeout and lands while the same unit is
    // asked the same read again has the right unit, function and length, and would be
    // taken for the new answer. The probe asks for a different number of registers, so
    // such a straggler has the wrong length for it and is refused (CRC or length), and a
    // read is only sent again once the unit answered a probe in time: a unit that answers
    // in order then has nothing older on its way. A dead unit is probed at its poll rate,
    // so it goes offline after offline_after x (poll + timeout); nothing is held back.
    // A command to a suspect unit is preceded by the same probe.
    let mut last_read: HashMap<u8, ReadRequest> = HashMap::new();

    // Commands jump ahead of polling: at the top of every turn, and before every read of
    // a poll cycle (after the silence owed before it), a due job's transaction goes first.
    let mut exec = Executor::default();
    let mut waiting = Waiting::default();
    let mut arrived: Option<BusOrder> = None;
    let mut orders_open = true;

    // Set when a wait ended on a new device list: `changed()` marked it seen already.
    let mut new_list = false;
    // One wait for cancellation for the task's life: a `cancel.cancelled()` made for
    // each select registers with the token and leaves it again, every transaction.
    let mut cancelled = std::pin::pin!(cancel.cancelled());
    loop {
        // A new device list (reload) is applied between transactions, never during one.
        if std::mem::take(&mut new_list) || devices.has_changed().unwrap_or(false) {
            let list = devices.borrow_and_update().clone();
            info!(bus = %settings.name, devices = list.len(), "device list updated");
            set.update(&list, &book, Instant::now().into_std());
        }
        if cancel.is_cancelled() {
            break;
        }
        take_orders(
            &mut orders,
            arrived.take(),
            &mut exec,
            &mut waiting,
            &set,
            Instant::now().into_std(),
        );
        let mut ended = Vec::new();
        let job_tx = exec.poll(Instant::now().into_std(), &mut ended);
        waiting.finish_all(ended);
        if let Some((ji, tx)) = job_tx {
            port.try_open(&settings, &stats, &mut wire).await;
            let Some(l) = port.line.as_mut() else {
                if let Some((job, outcome)) =
                    exec.on_result(ji, Instant::now().into_std(), TxResult::Io)
                {
                    waiting.finish(&job, outcome);
                }
                continue;
            };
            let unit = tx.unit();
            let device = set.pollers.iter().position(|p| p.settings().unit == unit);
            let timeout = device.map_or(DEFAULT_TIMEOUT, |i| set.pollers[i].settings().timeout);
            // A frame to a suspect unit is preceded by a probe, as a poll would be: a
            // straggling reply that lands on a write's echo makes the write `unknown`
            // (seen on a loaded machine). A stop is not held back: it goes out at once,
            // even to a unit that stopped answering, and is `unknown` at worst.
            let probe_first = matches!(tx, Transaction::Read(_)) || !exec.is_safety(ji);
            if let Some(i) = device.filter(|&i| set.suspect[i] && probe_first) {
                // Probe the unit first; the job's own frame waits for the next turn.
                exec.unpoll(ji);
                let probe = last_read.get(&unit).map_or(
                    ReadRequest {
                        unit,
                        kind: RegisterKind::Holding,
                        start: 0,
                        count: 1,
                    },
                    |r| probe_of(*r),
                );
                wire.wait_quiet().await;
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let outcome = tokio::select! {
                    biased;
                    _ = cancelled.as_mut() => break,
                    outcome = transact(l, &mut wire.timer, probe, timeout) => outcome,
                };
                let now = Instant::now();
                last_read.insert(unit, probe);
                let answered = count_probe(&stats, &outcome, now - sent);
                match &outcome {
                    Outcome::Failed(f) => stats.count(f),
                    Outcome::Garbled => stats.count(&Failure::WrongReply),
                    _ => {}
                }
                wire.ended(now, matches!(outcome, Outcome::Failed(Failure::Timeout)));
                if answered {
                    set.suspect[i] = false;
                } else if let Some((job, outcome)) = exec.on_probe_failed(ji, now.into_std()) {
                    waiting.finish(&job, outcome);
                }
                if matches!(outcome, Outcome::Garbled | Outcome::Failed(Failure::Io)) {
                    port.failed(&stats, now);
                }
                continue;
            }
            wire.wait_quiet().await;
            stats.transactions.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let outcome = tokio::select! {
                biased;
                _ = cancelled.as_mut() => {
                    // The frame may be out: its outcome is unknown.
                    let now = Instant::now().into_std();
                    if let Some((job, o)) = exec.on_result(ji, now, TxResult::Timeout) {
                        waiting.finish(&job, o);
                    }
                    break;
                }
                outcome = async {
                    match &tx {
                        Transaction::Write { unit, start, values } => {
                            transact_write(l, &mut wire.timer, *unit, *start, values, timeout).await
                        }
                        Transaction::Read(req) => transact(l, &mut wire.timer, *req, timeout).await,
                    }
                } => outcome,
            };
            let now = Instant::now();
            if let Transaction::Read(req) = &tx {
                last_read.insert(unit, *req);
            }
            let elapsed = now - sent;
            let result = match outcome {
                Outcome::Reply(regs) => {
                    stats.replies.fetch_add(1, Ordering::Relaxed);
                    stats.reply_time.record(elapsed);
                    TxResult::Ok(regs)
                }
                Outcome::IllegalAddress => {
                    stats.reply_time.record(elapsed);
                    let code = u8::from(ExceptionCode::IllegalDataAddress);
                    stats.count_exception(code);
                    TxResult::Exception(code)
                }
                Outcome::Failed(Failure::Exception(code)) => {
                    stats.reply_time.record(elapsed);
                    stats.count_exception(code);
                    TxResult::Exception(code)
                }
                Outcome::Failed(failure) => {
                    stats.count(&failure);
                    if let Some(i) = device {
                        if matches!(
                            failure,
                            Failure::Timeout | Failure::WrongReply | Failure::Crc
                        ) {
                            set.suspect[i] = true;
                        }
                    }
                    match failure {
                        Failure::Timeout => TxResult::Timeout,
                        Failure::Io => {
                            port.failed(&stats, now);
                            TxResult::Io
                        }
                        other => TxResult::Garbled(other.kind()),
                    }
                }
                Outcome::Garbled => {
                    stats.count(&Failure::WrongReply);
                    if let Some(i) = device {
                        set.suspect[i] = true;
                    }
                    port.failed(&stats, now);
                    TxResult::Garbled("wrong_reply")
                }
            };
            wire.ended(now, matches!(result, TxResult::Timeout));
            if let Some((job, outcome)) = exec.on_result(ji, now.into_std(), result) {
                waiting.finish(&job, outcome);
            }
            continue;
        }

        let next = set
            .pollers
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.next_due()))
            .min_by_key(|&(_, due)| due);
        let job_due = exec.next_due().map(Instant::from_std);
        // A lost sender (the daemon keeps it for the bus's life) means no more updates.
        let updates = async {
            if devices.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let Some((index, due)) = next else {
            // No devices (all removed by a reload): wait for some, an order, or the stop.
            tokio::select! {
                _ = cancelled.as_mut() => break,
                _ = updates => {
                    new_list = true;
                    continue;
                }
                order = orders.recv(), if orders_open => {
                    orders_open = order.is_some();
                    arrived = order;
                    continue;
                }
            }
        };
        let due = Instant::from_std(due);
        let wake = job_due.map_or(due, |j| j.min(due));
        if wake > Instant::now() {
            tokio::select! {
                biased;
                _ = cancelled.as_mut() => break,
                _ = updates => {
                    new_list = true;
                    continue;
                }
                order = orders.recv(), if orders_open => {
                    orders_open = order.is_some();
                    arrived = order;
                    continue;
                }
                woke = wire.timer.wake_at(wake) => {
                    // The timer cannot fail once created; if it does, fall back to tokio's.
                    if woke.is_err() {
                        tokio::time::sleep_until(wake).await;
                    }
                }
            }
        }
        if job_due.is_some_and(|j| j <= Instant::now()) {
            continue;
        }

        port.try_open(&settings, &stats, &mut wire).await;
        let poller = &mut set.pollers[index];
        let Some(l) = port.line.as_mut() else {
            // No port: the device's poll fails, so it goes offline and backs off.
            poller.next_request();
            poller.on_failure(
                Instant::now().into_std(),
                SystemTime::now(),
                Failure::Io,
                &*sink,
            );
            continue;
        };

        // One poll cycle: every read the device needs, back to back, unless a command
        // comes due (the cycle then goes on after it).
        let mut port_failed = false;
        loop {
            // The silence owed before the next frame comes first, then the check for a
            // command: one that came during the silence is the next frame (at 115200
            // baud the silence is a quarter of a poll transaction, so a quarter of the
            // commands would otherwise wait for a whole read).
            wire.wait_quiet().await;
            take_orders(
                &mut orders,
                None,
                &mut exec,
                &mut waiting,
                &set,
                Instant::now().into_std(),
            );
            if exec
                .next_due()
                .is_some_and(|d| d <= Instant::now().into_std())
            {
                break;
            }
            let poller = &mut set.pollers[index];
            let Some(req) = poller.next_request() else {
                poller.skip_cycle(Instant::now().into_std());
                break;
            };
            let timeout = poller.settings().timeout;
            let probing = set.suspect[index];
            let asked = if probing { probe_of(req) } else { req };
            stats.transactions.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let outcome = tokio::select! {
                biased;
                _ = cancelled.as_mut() => return finish(exec, waiting, orders, &settings),
                outcome = transact(l, &mut wire.timer, asked, timeout) => outcome,
            };
            let now = Instant::now();
            last_read.insert(req.unit, asked);
            wire.ended(now, matches!(outcome, Outcome::Failed(Failure::Timeout)));
            let wall = SystemTime::now();
            if probing {
                // Any well-formed answer in time (data or an exception) clears the unit;
                // the probe's data are not used: the cycle's own read follows at once.
                if count_probe(&stats, &outcome, now - sent) {
                    set.suspect[index] = false;
                    continue;
                }
            }
            let poller = &mut set.pollers[index];
            let more = match outcome {
                Outcome::Reply(regs) => {
                    let elapsed = now - sent;
                    stats.replies.fetch_add(1, Ordering::Relaxed);
                    stats
                        .reply_micros
                        .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
                    stats.reply_time.record(elapsed);
                    if elapsed > poller.settings().late_after {
                        stats.late_replies.fetch_add(1, Ordering::Relaxed);
                    }
                    poller.on_reply(now.into_std(), wall, elapsed, &regs, &*sink)
                }
                Outcome::IllegalAddress => {
                    stats.reply_time.record(now - sent);
                    stats.count_exception(u8::from(ExceptionCode::IllegalDataAddress));
                    poller.on_illegal_address(now.into_std(), wall, &*sink)
                }
                Outcome::Garbled => {
                    set.suspect[index] = true;
                    // A bad reply to the device; the port itself is fine, but the
                    // client's codec must start afresh: reopen at once, no back-off.
                    stats.count(&Failure::WrongReply);
                    debug!(bus = %settings.name, device = %poller.settings().name,
                           unit = req.unit, "undecodable reply; reopening the port");
                    poller.on_failure(now.into_std(), wall, Failure::WrongReply, &*sink);
                    stats.reopens.fetch_add(1, Ordering::Relaxed);
                    port_failed = true;
                    port.reopen_at = now;
                    false
                }
                Outcome::Failed(failure) => {
                    if let Failure::Exception(_) = failure {
                        stats.reply_time.record(now - sent);
                    }
                    stats.count(&failure);
                    debug!(bus = %settings.name, device = %poller.settings().name,
                           unit = req.unit, "read failed: {}", failure.kind());
                    match failure {
                        // Timed out, or cut off by another unit's bytes, or a reply of
                        // the wrong shape: this unit's own answer may still be on its way.
                        Failure::Timeout | Failure::WrongReply => set.suspect[index] = true,
                        _ => {}
                    }
                    let io = failure == Failure::Io;
                    poller.on_failure(now.into_std(), wall, failure, &*sink);
                    if io {
                        warn!(bus = %settings.name, "port failed; reopening");
                        stats.reopens.fetch_add(1, Ordering::Relaxed);
                        port_failed = true;
                        port.reopen_at = now + port.reopen_wait;
                    }
                    false
                }
            };
            if !more {
                break;
            }
        }
        if port_failed {
            port.line = None;
        }
    }
    finish(exec, waiting, orders, &settings)
}

/// The bus stops: every job and every order still in the inbox gets its outcome.
pub(crate) fn finish(
    mut exec: Executor,
    mut waiting: Waiting,
    mut orders: Orders,
    settings: &BusSettings,
) -> Result<(), BusError> {
    waiting.finish_all(exec.drain());
    orders.close();
    while let Ok(o) = orders.try_recv() {
        let _ = o.reply.send(CmdOutcome::rejected(
            CommandReason::BusDown,
            "the bus stopped before it was sent",
        ));
    }
    info!(bus = %settings.name, "bus stopped");
    Ok(())
}

/// Counts a probe's answer; true when the unit answered in time (data or an exception).
/// A failure is left to the caller to count.
fn count_probe(stats: &BusStats, outcome: &Outcome, elapsed: Duration) -> bool {
    let answered = match outcome {
        Outcome::Reply(_) => {
            stats.replies.fetch_add(1, Ordering::Relaxed);
            true
        }
        Outcome::IllegalAddress => {
            stats.count_exception(u8::from(ExceptionCode::IllegalDataAddress));
            true
        }
        Outcome::Failed(Failure::Exception(code)) => {
            stats.count_exception(*code);
            true
        }
        // A failed probe is counted by the caller, with the rest of its handling.
        Outcome::Failed(_) | Outcome::Garbled => false,
    };
    if answered {
        stats.reply_time.record(elapsed);
    }
    answered
}

/// A command's transaction timeout when its unit has no poller (cannot happen: jobs are
/// planned only for listed devices).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// The serial port, and when to try opening it again.
struct Port {
    line: Option<Line>,
    reopen_at: Instant,
    reopen_wait: Duration,
}

impl Port {
    /// Opens the port if it is closed and its back-off has passed.
    async fn try_open(&mut self, settings: &BusSettings, stats: &BusStats, wire: &mut Wire) {
        if self.line.is_some() || Instant::now() < self.reopen_at {
            return;
        }
        match open(settings).await {
            Ok(l) => {
                info!(bus = %settings.name, port = %settings.link, "port open");
                self.line = Some(l);
                self.reopen_wait = Duration::from_millis(100);
                wire.quiet_since = Instant::now();
            }
            Err(e) => {
                warn!(bus = %settings.name, port = %settings.link,
                      retry_in = ?self.reopen_wait, "cannot open port: {e}");
                self.reopen_at = Instant::now() + self.reopen_wait;
                self.reopen_wait = (self.reopen_wait * 2).min(settings.reopen_max);
            }
        }
        stats.open_attempted.notify_one();
    }

    /// The port (or the client on it) must start afresh: reopen at once.
    fn failed(&mut self, stats: &BusStats, now: Instant) {
        stats.reopens.fetch_add(1, Ordering::Relaxed);
        self.line = None;
        self.reopen_at = now;
    }
}

async fn open(settings: &BusSettings) -> io::Result<Line> {
    use tokio_serial::SerialPort;
    let monitor = Arc::new(LineMonitor::default());
    let ctx = match &settings.link {
        Link::Serial {
            port,
            parity,
            data_bits,
            stop_bits,
        } => {
            let port: SerialStream = tokio_serial::new(port.to_string_lossy(), settings.baud)
                .parity(*parity)
                .data_bits(*data_bits)
                .stop_bits(*stop_bits)
                .open_native_async()
                .map_err(io::Error::other)?;
            // Bytes from before we opened (or from before a reopen) belong to nobody.
            port.clear(tokio_serial::ClearBuffer::All)
                .map_err(io::Error::other)?;
            tokio_modbus::client::rtu::attach_slave(RtuLine::new(port, monitor.clone()), Slave(1))
        }
        Link::RtuOverTcp { address } => {
            // A new connection carries nothing old: the server's buffer went with the last.
            let stream = crate::tcp::connect(address, CONNECT_TIMEOUT).await?;
            tokio_modbus::client::rtu::attach_slave(RtuLine::new(stream, monitor.clone()), Slave(1))
        }
        Link::Tcp { .. } => unreachable!("modbus-tcp buses run in crate::tcp"),
    };
    Ok(Line { ctx, monitor })
}

/// How long a TCP connect may take before the attempt counts as failed (and backs off).
/// Not the kernel's: a silent address would hold the bus for two minutes of SYN retries.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The probe sent to a unit suspected of a late answer instead of `req`: a read at the
/// same address of a different number of registers (1, or 2 when `req` reads 1), whose
/// answer has a different length than any straggler of `req`'s (Modbus Application
/// Protocol 1.1b3, 6.3: the byte count is 2 x quantity).
fn probe_of(req: ReadRequest) -> ReadRequest {
    ReadRequest {
        count: if req.count == 1 { 2 } else { 1 },
        ..req
    }
}

/// How a request's wait ended.
enum Ended<T> {
    /// tokio-modbus returned (a reply, an exception, or its own error).
    Done(T),
    /// The line saw a bad CRC, another unit or a reply that does not answer: at once,
    /// where tokio-modbus would wait for the timeout.
    Fault(LineFault),
    TimedOut,
}

/// Drives a request's future until it returns, the line raises a fault, or `timeout`
/// has passed.
///
/// The timeout is the bus's own timerfd, free during a transaction: a tokio timer here
/// also cost a self-wake of the runtime per request (registering a deadline earlier than
/// the driver's next one writes its eventfd) and the timer wheel's work. A fault is
/// raised only inside a poll of `request` (see [`LineMonitor`]), so it is looked at
/// right after each one. A reply and a fault seen in the same poll: the reply counts, as
/// it did with a biased `select!`.
async fn until_ended<T>(
    monitor: &LineMonitor,
    timer: &mut PreciseTimer,
    timeout: Duration,
    request: impl Future<Output = T>,
) -> Ended<T> {
    let deadline = Instant::now() + timeout;
    let mut request = std::pin::pin!(request);
    let mut expiry = std::pin::pin!(timer.wake_at(deadline));
    // The timer cannot fail once created; if it does, tokio's takes over.
    let mut fallback: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = request.as_mut().poll(cx) {
            return Poll::Ready(Ended::Done(r));
        }
        if let Some(fault) = monitor.take() {
            return Poll::Ready(Ended::Fault(fault));
        }
        if let Some(sleep) = fallback.as_mut() {
            return sleep.as_mut().poll(cx).map(|()| Ended::TimedOut);
        }
        match expiry.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(_)) => Poll::Ready(Ended::TimedOut),
            Poll::Ready(Err(_)) => {
                let mut sleep = Box::pin(tokio::time::sleep_until(deadline));
                let polled = sleep.as_mut().poll(cx).map(|()| Ended::TimedOut);
                fallback = Some(sleep);
                polled
            }
        }
    })
    .await
}

/// One write (06 for one register, 16 for more) with its timeout; the line checks the
/// echo as it arrives and a fault ends the write at once.
async fn transact_write(
    line: &mut Line,
    timer: &mut PreciseTimer,
    unit: u8,
    start: u16,
    values: &[u16],
    timeout: Duration,
) -> Outcome {
    let Line { ctx, monitor } = line;
    ctx.set_slave(Slave(unit));
    monitor.reset();
    let write = async {
        match values {
            [one] => ctx.write_single_register(start, *one).await,
            many => ctx.write_multiple_registers(start, many).await,
        }
    };
    let result = match until_ended(monitor, timer, timeout, write).await {
        Ended::Fault(LineFault::Crc) => return Outcome::Failed(Failure::Crc),
        // The rest was withheld from tokio-modbus; its half frame is cleared with its
        // buffer at the next call.
        Ended::Fault(LineFault::Mismatch | LineFault::WrongUnit { .. }) => {
            return Outcome::Failed(Failure::WrongReply)
        }
        Ended::TimedOut => Err(()),
        Ended::Done(r) => Ok(r),
    };
    match result {
        Err(_) => Outcome::Failed(Failure::Timeout),
        Ok(Ok(Ok(()))) => Outcome::Reply(values.to_vec()),
        Ok(Ok(Err(code))) => Outcome::Failed(Failure::Exception(u8::from(code))),
        Ok(Err(tokio_modbus::Error::Protocol(_))) => Outcome::Failed(Failure::WrongReply),
        Ok(Err(tokio_modbus::Error::Transport(e))) if e.kind() == io::ErrorKind::InvalidData => {
            Outcome::Garbled
        }
        Ok(Err(tokio_modbus::Error::Transport(_))) => Outcome::Failed(Failure::Io),
    }
}

/// One read with its timeout; a fault the line sees ends it at once.
async fn transact(
    line: &mut Line,
    timer: &mut PreciseTimer,
    req: ReadRequest,
    timeout: Duration,
) -> Outcome {
    let Line { ctx, monitor } = line;
    ctx.set_slave(Slave(req.unit));
    monitor.reset();
    let read = async {
        match req.kind {
            RegisterKind::Holding => ctx.read_holding_registers(req.start, req.count).await,
            RegisterKind::Input => ctx.read_input_registers(req.start, req.count).await,
        }
    };
    let result = match until_ended(monitor, timer, timeout, read).await {
        Ended::Fault(LineFault::Crc) => return Outcome::Failed(Failure::Crc),
        Ended::Fault(LineFault::WrongUnit { .. } | LineFault::Mismatch) => {
            return Outcome::Failed(Failure::WrongReply)
        }
        Ended::TimedOut => Err(()),
        Ended::Done(r) => Ok(r),
    };
    match result {
        Err(_) => Outcome::Failed(Failure::Timeout),
        Ok(Ok(Ok(regs))) => Outcome::Reply(regs),
        Ok(Ok(Err(ExceptionCode::IllegalDataAddress))) => Outcome::IllegalAddress,
        Ok(Ok(Err(code))) => Outcome::Failed(Failure::Exception(u8::from(code))),
        Ok(Err(tokio_modbus::Error::Protocol(_))) => Outcome::Failed(Failure::WrongReply),
        // The codec's verdict on a garbled frame (noise), not a port failure: the read
        // failed as a bad reply, and the client is rebuilt on the same open port.
        Ok(Err(tokio_modbus::Error::Transport(e))) if e.kind() == io::ErrorKind::InvalidData => {
            debug!("undecodable reply: {e}");
            Outcome::Garbled
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => {
            debug!("transport error: {e}");
            Outcome::Failed(Failure::Io)
        }
    }
}
