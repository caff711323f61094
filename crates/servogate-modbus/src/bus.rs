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

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use servogate_core::{EventSink, Histogram, SeqBook};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_modbus::ExceptionCode;
use tokio_serial::{DataBits, Parity, SerialPortBuilderExt, SerialStream, StopBits};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::line::{LineFault, LineMonitor, RtuLine};
use crate::poll::{DevicePoller, DeviceSettings, Failure, ReadRequest};
use crate::profile::RegisterKind;
use crate::timing::{t35, PreciseTimer};

/// How the port is opened (from the config).
#[derive(Debug, Clone, PartialEq)]
pub struct BusSettings {
    pub name: Arc<str>,
    pub port: PathBuf,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: DataBits,
    pub stop_bits: StopBits,
    /// Inter-frame silence; `None` computes t3.5 from the baud rate. A pty has no baud
    /// rate, so tests and the demo may set zero.
    pub t35: Option<Duration>,
    /// Longest wait between attempts to reopen a failed port.
    pub reopen_max: Duration,
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

    fn count_exception(&self, code: u8) {
        self.exceptions.fetch_add(1, Ordering::Relaxed);
        // A counter map insert cannot leave the map inconsistent: take over a poisoned lock.
        let mut codes = self
            .exception_codes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *codes.entry(code).or_default() += 1;
    }

    fn count(&self, failure: &Failure) {
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

/// The pollers of a bus and, per poller, whether its next request is a probe.
struct Pollers {
    pollers: Vec<DevicePoller>,
    /// Its last request timed out or was cut off, so an answer to it may still be on its
    /// way: the unit is probed (see [`probe_of`]) before it is read again.
    suspect: Vec<bool>,
}

impl Pollers {
    /// Replaces the device list: a device whose settings did not change keeps its poller
    /// (schedule, availability, plan splits, all of it); a changed or new device gets a
    /// new poller that continues its sequences from `book`; a device no longer listed is
    /// dropped.
    fn update(&mut self, list: &[DeviceSettings], book: &SeqBook, now: std::time::Instant) {
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
    sink: Arc<dyn EventSink>,
    stats: Arc<BusStats>,
    book: SeqBook,
    cancel: CancellationToken,
) -> Result<(), BusError> {
    let mut timer = PreciseTimer::new().map_err(|source| BusError::Timer {
        bus: settings.name.clone(),
        source,
    })?;
    let silence = settings.t35.unwrap_or_else(|| t35(settings.baud));
    // After a timeout the silent device may still be sending; wait at least one real
    // t3.5 (even on a pty) before the next request, then its bytes are discarded.
    let guard = silence.max(t35(settings.baud));
    let start = Instant::now();
    let mut set = Pollers {
        pollers: Vec::new(),
        suspect: Vec::new(),
    };
    set.update(&devices.borrow_and_update(), &book, start.into_std());

    let mut line: Option<Line> = None;
    let mut reopen_at = start;
    let mut reopen_wait = Duration::from_millis(100);
    // When the line last fell quiet: the next request waits `silence` after it.
    let mut quiet_since = start;
    let mut extra_guard = Duration::ZERO;
    // After a timeout (or a reply cut off by another unit's bytes), the unit is probed
    // before it is read again (`Pollers::suspect`, `probe_of`). RTU has no transaction
    // id: an answer that comes later than the timeout and lands while the same unit is
    // asked the same read again has the right unit, function and length, and would be
    // taken for the new answer. The probe asks for a different number of registers, so
    // such a straggler has the wrong length for it and is refused (CRC or length), and a
    // read is only sent again once the unit answered a probe in time: a unit that answers
    // in order then has nothing older on its way. A dead unit is probed at its poll rate,
    // so it goes offline after offline_after x (poll + timeout); nothing is held back.

    // Set when a wait ended on a new device list: `changed()` marked it seen already.
    let mut new_list = false;
    loop {
        // A new device list (reload) is applied between transactions, never during one.
        if std::mem::take(&mut new_list) || devices.has_changed().unwrap_or(false) {
            let list = devices.borrow_and_update().clone();
            info!(bus = %settings.name, devices = list.len(), "device list updated");
            set.update(&list, &book, Instant::now().into_std());
        }
        let next = set
            .pollers
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.next_due()))
            .min_by_key(|&(_, due)| due);
        let Some((index, due)) = next else {
            // No devices (all removed by a reload): wait for some, or the stop.
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = devices.changed() => {
                    if changed.is_err() {
                        cancel.cancelled().await;
                        break;
                    }
                    new_list = true;
                    continue;
                }
            }
        };
        let due = Instant::from_std(due);
        if due > Instant::now() {
            // A lost sender (the daemon keeps it for the bus's life) means no more updates.
            let updates = async {
                if devices.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = updates => {
                    new_list = true;
                    continue;
                }
                _ = tokio::time::sleep_until(due) => {}
            }
        } else if cancel.is_cancelled() {
            break;
        }

        if line.is_none() && Instant::now() >= reopen_at {
            match open(&settings) {
                Ok(l) => {
                    info!(bus = %settings.name, port = %settings.port.display(), "port open");
                    line = Some(l);
                    reopen_wait = Duration::from_millis(100);
                    quiet_since = Instant::now();
                }
                Err(e) => {
                    warn!(bus = %settings.name, port = %settings.port.display(),
                          retry_in = ?reopen_wait, "cannot open port: {e}");
                    reopen_at = Instant::now() + reopen_wait;
                    reopen_wait = (reopen_wait * 2).min(settings.reopen_max);
                }
            }
            stats.open_attempted.notify_one();
        }

        let poller = &mut set.pollers[index];
        let Some(l) = line.as_mut() else {
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

        // One poll cycle: every read the device needs, back to back.
        let mut port_failed = false;
        loop {
            let Some(req) = poller.next_request() else {
                poller.skip_cycle(Instant::now().into_std());
                break;
            };
            let quiet_until = quiet_since + silence + extra_guard;
            if quiet_until > Instant::now() {
                // The timer cannot fail once created; if it does, fall back to tokio's.
                if timer.sleep_until(quiet_until).await.is_err() {
                    tokio::time::sleep_until(quiet_until).await;
                }
            }
            extra_guard = Duration::ZERO;
            let timeout = poller.settings().timeout;
            let probing = set.suspect[index];
            let asked = if probing { probe_of(req) } else { req };
            stats.transactions.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let outcome = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                outcome = transact(l, asked, timeout) => outcome,
            };
            let now = Instant::now();
            quiet_since = now;
            let wall = SystemTime::now();
            if probing {
                // Any well-formed answer in time (data or an exception) clears the unit;
                // the probe's data are not used: the cycle's own read follows at once.
                let answered = match &outcome {
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
                    _ => false,
                };
                if answered {
                    stats.reply_time.record(now - sent);
                    set.suspect[index] = false;
                    continue;
                }
            }
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
                    reopen_at = now;
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
                        Failure::Timeout => {
                            extra_guard = guard.saturating_sub(silence);
                            set.suspect[index] = true;
                        }
                        // Cut off by another unit's bytes, or a reply of the wrong shape:
                        // this unit's own answer may still be on its way.
                        Failure::WrongReply => set.suspect[index] = true,
                        _ => {}
                    }
                    let io = failure == Failure::Io;
                    poller.on_failure(now.into_std(), wall, failure, &*sink);
                    if io {
                        warn!(bus = %settings.name, "port failed; reopening");
                        stats.reopens.fetch_add(1, Ordering::Relaxed);
                        port_failed = true;
                        reopen_at = now + reopen_wait;
                    }
                    false
                }
            };
            if !more {
                break;
            }
        }
        if port_failed {
            line = None;
        }
    }
    info!(bus = %settings.name, "bus stopped");
    Ok(())
}

fn open(settings: &BusSettings) -> io::Result<Line> {
    use tokio_serial::SerialPort;
    let port: SerialStream = tokio_serial::new(settings.port.to_string_lossy(), settings.baud)
        .parity(settings.parity)
        .data_bits(settings.data_bits)
        .stop_bits(settings.stop_bits)
        .open_native_async()
        .map_err(io::Error::other)?;
    // Bytes from before we opened (or from before a reopen) belong to nobody.
    port.clear(tokio_serial::ClearBuffer::All)
        .map_err(io::Error::other)?;
    let monitor = Arc::new(LineMonitor::default());
    let ctx =
        tokio_modbus::client::rtu::attach_slave(RtuLine::new(port, monitor.clone()), Slave(1));
    Ok(Line { ctx, monitor })
}

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

/// One read with its timeout; a fault the line sees ends it at once.
async fn transact(line: &mut Line, req: ReadRequest, timeout: Duration) -> Outcome {
    let Line { ctx, monitor } = line;
    ctx.set_slave(Slave(req.unit));
    monitor.reset();
    let read = async {
        match req.kind {
            RegisterKind::Holding => ctx.read_holding_registers(req.start, req.count).await,
            RegisterKind::Input => ctx.read_input_registers(req.start, req.count).await,
        }
    };
    let result = tokio::select! {
        biased;
        fault = monitor.fault() => {
            return Outcome::Failed(match fault {
                LineFault::Crc => Failure::Crc,
                LineFault::WrongUnit { .. } => Failure::WrongReply,
            });
        }
        r = tokio::time::timeout(timeout, read) => r,
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
