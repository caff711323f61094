//! The task that owns one Modbus TCP connection and polls every device (unit id) behind
//! it: a drive with its own Ethernet port, or several behind a TCP-to-RTU gateway.
//!
//! What differs from the RTU bus ([`crate::bus`]):
//!
//! - Each request carries a transaction id ([`crate::mbap`]); a reply is taken only for
//!   the outstanding request with its id, unit and shape. A reply to no outstanding
//!   request (it came after its request's timeout) is dropped and counted
//!   (`stale_replies`), so no probe is needed before the next read.
//! - Up to `max_in_flight` requests are outstanding at once, at most one per device (a
//!   device's poll cycle and command frames stay in order), so the rate grows with the
//!   devices behind the address until the server is the limit. Commands still go first:
//!   a due job's frame takes the next free slot before any poll read.
//! - No t3.5: TCP frames itself.
//! - The connection is opened again, with a capped and jittered back-off, when it fails,
//!   when the server closes it, when a frame cannot be Modbus TCP, and when a request
//!   times out with not one byte received on the connection since it was sent: a
//!   half-open connection (the server gone without a RST, a frozen path) is noticed at
//!   the first request timeout, not after the kernel's retransmission timeout (about 15
//!   minutes). TCP_USER_TIMEOUT is set as well, so the kernel itself gives up on a
//!   request that is never acknowledged.
//!
//! A device whose requests fail goes offline and backs off exactly as on RTU: the
//! [`DevicePoller`] is shared.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use servogate_core::{EventSink, SeqBook};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{
    finish, take_orders, BusError, BusOrder, BusSettings, BusStats, DeviceList, Orders, Pollers,
    Waiting, CONNECT_TIMEOUT, DEFAULT_TIMEOUT,
};
use crate::command::{Executor, Transaction, TxResult};
use crate::mbap::{self, Reply};
use crate::poll::Failure;
use crate::timing::PreciseTimer;

/// Connects to `address` (`host:port`; a name is resolved now, so a changed DNS entry is
/// followed at the next reconnect) with Nagle off and TCP_USER_TIMEOUT set.
pub(crate) async fn connect(address: &str, within: Duration) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(within, TcpStream::connect(address)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {within:?}"),
            ))
        }
    };
    // A request is a few bytes that must go at once, not wait for the last one's ACK.
    stream.set_nodelay(true)?;
    // Data unacknowledged this long ends the connection (the kernel checks it at its
    // retransmission timer, 200 ms at the least); the default is about 15 minutes.
    socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(stream)
}

/// See [`connect`]: long against a LAN's ACK (well under a millisecond), short against a
/// request timeout's tolerance for a dead link.
const USER_TIMEOUT: Duration = Duration::from_secs(1);

/// The first wait before connecting again after a failed attempt.
const FIRST_WAIT: Duration = Duration::from_millis(100);

/// Capped exponential back-off with jitter: each wait is drawn from [w/2, w], so the
/// gateways of a plant do not all reconnect to a restarted server in the same instant.
struct Backoff {
    wait: Duration,
    max: Duration,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let w = self.wait;
        self.wait = (self.wait * 2).min(self.max);
        let half = w / 2;
        // std's hasher keys are random per process and per RandomState: enough jitter.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        half + Duration::from_nanos(r % (half.as_nanos() as u64 + 1))
    }

    fn reset(&mut self) {
        self.wait = FIRST_WAIT.min(self.max);
    }
}

/// One request sent and not yet answered.
#[derive(Debug)]
struct Pending {
    tid: u16,
    /// Index of the device in the bus's pollers (the list does not change while any
    /// request is outstanding).
    device: usize,
    tx: Transaction,
    /// Set for a command's frame (the job's index in the executor).
    job: Option<usize>,
    sent: Instant,
    deadline: Instant,
}

/// What became of one request.
#[derive(Debug)]
enum Answer {
    Reply(Reply),
    /// A reply with the request's transaction id from another unit.
    WrongUnit,
    Timeout,
    /// The connection ended with the request outstanding.
    Lost,
}

struct Conn {
    stream: TcpStream,
    rx: Vec<u8>,
    /// When the last bytes arrived (or the connection opened).
    last_rx: Instant,
    /// A reply came on this connection: it worked, so its end is not the server refusing.
    answered: bool,
}

struct Bus {
    settings: BusSettings,
    address: String,
    max_in_flight: usize,
    stats: Arc<BusStats>,
    sink: Arc<dyn EventSink>,
    set: Pollers,
    /// Per poller: a request of it is outstanding.
    busy: Vec<bool>,
    pending: Vec<Pending>,
    next_tid: u16,
    conn: Option<Conn>,
    reconnect_at: Instant,
    backoff: Backoff,
    exec: Executor,
    waiting: Waiting,
    /// A command's frame is outstanding (one at a time: the executor's indices must
    /// stay put until its result).
    job_in_flight: bool,
    /// The due job's device has a read outstanding: the job waits for it, and the
    /// device gets no further reads before it.
    job_waits_for: Option<usize>,
    frame: Vec<u8>,
}

/// Polls every device of `devices` over one Modbus TCP connection to `address` until
/// `cancel` fires. See the module docs.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    settings: BusSettings,
    address: String,
    max_in_flight: usize,
    mut devices: DeviceList,
    mut orders: Orders,
    sink: Arc<dyn EventSink>,
    stats: Arc<BusStats>,
    book: SeqBook,
    cancel: CancellationToken,
) -> Result<(), BusError> {
    let mut timer = PreciseTimer::new().map_err(|source| BusError::Timer {
        bus: settings.name.clone(),
        source,
    })?;
    let start = Instant::now();
    let mut set = Pollers {
        pollers: Vec::new(),
        suspect: Vec::new(),
    };
    set.update(&devices.borrow_and_update(), &book, start.into_std());
    let mut bus = Bus {
        busy: vec![false; set.pollers.len()],
        set,
        backoff: Backoff {
            wait: FIRST_WAIT.min(settings.reopen_max),
            max: settings.reopen_max,
        },
        settings,
        address,
        max_in_flight,
        stats,
        sink,
        pending: Vec::with_capacity(max_in_flight),
        next_tid: 1,
        conn: None,
        reconnect_at: start,
        exec: Executor::default(),
        waiting: Waiting::default(),
        job_in_flight: false,
        job_waits_for: None,
        frame: Vec::with_capacity(mbap::HEADER_LEN + mbap::MAX_PDU),
    };
    let mut arrived: Option<BusOrder> = None;
    let mut orders_open = true;
    // A new device list waits until nothing is outstanding: requests name their device
    // by index.
    let mut reload = false;
    loop {
        reload |= devices.has_changed().unwrap_or(false);
        if reload && bus.pending.is_empty() {
            reload = false;
            let list = devices.borrow_and_update().clone();
            info!(bus = %bus.settings.name, devices = list.len(), "device list updated");
            bus.set.update(&list, &book, Instant::now().into_std());
            bus.busy = vec![false; bus.set.pollers.len()];
            bus.job_waits_for = None;
        }
        if cancel.is_cancelled() {
            break;
        }
        if !bus.job_in_flight {
            take_orders(
                &mut orders,
                arrived.take(),
                &mut bus.exec,
                &mut bus.waiting,
                &bus.set,
                Instant::now().into_std(),
            );
        }
        bus.expire(Instant::now());
        if bus.conn.is_none() && Instant::now() >= bus.reconnect_at {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                () = bus.connect() => {}
            }
        }
        if !reload {
            bus.send_due(Instant::now());
        }

        let wake = bus.next_wake(reload);
        let updates = async {
            if devices.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            read = read_some(&mut bus.conn) => bus.on_read(read),
            _ = updates, if !reload => reload = true,
            order = orders.recv(), if orders_open && !bus.job_in_flight && arrived.is_none() => {
                orders_open = order.is_some();
                arrived = order;
            }
            woke = timer.wake_at(wake) => {
                // The timer cannot fail once created; if it does, fall back to tokio's.
                if woke.is_err() {
                    tokio::time::sleep_until(wake).await;
                }
            }
        }
    }
    // Outstanding command frames went out: their outcome is unknown.
    let now = Instant::now();
    for p in std::mem::take(&mut bus.pending) {
        if let Some(ji) = p.job {
            if let Some((job, o)) = bus.exec.on_result(ji, now.into_std(), TxResult::Timeout) {
                bus.waiting.finish(&job, o);
            }
        }
    }
    finish(bus.exec, bus.waiting, orders, &bus.settings)
}

/// Reads what the connection has; never returns without one.
async fn read_some(conn: &mut Option<Conn>) -> io::Result<usize> {
    match conn {
        Some(c) => {
            c.rx.reserve(512);
            c.stream.read_buf(&mut c.rx).await
        }
        None => std::future::pending().await,
    }
}

impl Bus {
    async fn connect(&mut self) {
        let within = CONNECT_TIMEOUT.max(self.timeout_max());
        self.stats.open_attempted.notify_one();
        match connect(&self.address, within).await {
            Ok(stream) => {
                info!(bus = %self.settings.name, address = %self.address, "connected");
                self.conn = Some(Conn {
                    stream,
                    rx: Vec::with_capacity(1024),
                    last_rx: Instant::now(),
                    answered: false,
                });
            }
            Err(e) => {
                let wait = self.backoff.next();
                warn!(bus = %self.settings.name, address = %self.address,
                      retry_in = ?wait, "cannot connect: {e}");
                self.reconnect_at = Instant::now() + wait;
            }
        }
        self.stats.open_attempted.notify_one();
    }

    fn timeout_max(&self) -> Duration {
        let t = self.set.pollers.iter().map(|p| p.settings().timeout).max();
        t.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// Closes the connection; every outstanding request is lost with it.
    fn close(&mut self, why: &str) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        warn!(bus = %self.settings.name, address = %self.address, "connection closed: {why}");
        self.stats.reopens.fetch_add(1, Ordering::Relaxed);
        if conn.answered {
            // It worked until now: try again at once, the back-off starts afresh.
            self.backoff.reset();
            self.reconnect_at = Instant::now();
        } else {
            self.reconnect_at = Instant::now() + self.backoff.next();
        }
        let now = Instant::now();
        for p in std::mem::take(&mut self.pending) {
            self.answered(p, Answer::Lost, now);
        }
    }

    /// Requests past their deadline time out; a timeout on a connection that has been
    /// silent since the request went out means the connection is gone.
    fn expire(&mut self, now: Instant) {
        let mut silent = false;
        while let Some(i) = self.pending.iter().position(|p| p.deadline <= now) {
            let p = self.pending.swap_remove(i);
            if self.conn.as_ref().is_some_and(|c| c.last_rx <= p.sent) {
                silent = true;
            }
            self.answered(p, Answer::Timeout, now);
        }
        if silent {
            self.close("a request timed out with nothing received since it was sent");
        }
    }

    /// Sends every frame that is due and has a slot: a command's first, then poll reads
    /// in the order their devices are due.
    fn send_due(&mut self, now: Instant) {
        let now_std = now.into_std();
        if !self.job_in_flight && self.pending.len() < self.max_in_flight {
            // Whether the due job (if it still is one) waits for its device is decided
            // afresh: a job that expired must not hold its device back.
            self.job_waits_for = None;
            let mut ended = Vec::new();
            let job = self.exec.poll(now_std, &mut ended);
            self.waiting.finish_all(ended);
            if let Some((ji, tx)) = job {
                let unit = tx.unit();
                let device = self
                    .set
                    .pollers
                    .iter()
                    .position(|p| p.settings().unit == unit);
                match device {
                    Some(d) if self.busy[d] => {
                        // Its device's read is outstanding: the job goes right after it.
                        self.exec.unpoll(ji);
                        self.job_waits_for = Some(d);
                    }
                    _ if self.conn.is_none() => {
                        if let Some((job, o)) = self.exec.on_result(ji, now_std, TxResult::Io) {
                            self.waiting.finish(&job, o);
                        }
                    }
                    _ => {
                        let d = device.unwrap_or(usize::MAX);
                        self.send(d, tx, Some(ji), now);
                    }
                }
            }
        }
        while self.pending.len() < self.max_in_flight {
            let due = self
                .set
                .pollers
                .iter()
                .enumerate()
                .filter(|&(i, p)| {
                    !self.busy[i] && self.job_waits_for != Some(i) && p.next_due() <= now_std
                })
                .min_by_key(|(_, p)| p.next_due())
                .map(|(i, _)| i);
            let Some(i) = due else { break };
            let wall = SystemTime::now();
            let poller = &mut self.set.pollers[i];
            let Some(req) = poller.next_request() else {
                poller.skip_cycle(now_std);
                continue;
            };
            if self.conn.is_none() {
                // No connection: the device's poll fails, so it goes offline and backs off.
                poller.on_failure(now_std, wall, Failure::Io, &*self.sink);
                continue;
            }
            self.send(i, Transaction::Read(req), None, now);
        }
    }

    fn send(&mut self, device: usize, tx: Transaction, job: Option<usize>, now: Instant) {
        let timeout = self
            .set
            .pollers
            .get(device)
            .map_or(DEFAULT_TIMEOUT, |p| p.settings().timeout);
        // Ids wrap after 65,536 requests (under a second flat out): never hand out one
        // that an outstanding request still holds.
        let mut tid = self.next_tid;
        while self.pending.iter().any(|p| p.tid == tid) {
            tid = tid.wrapping_add(1);
        }
        self.next_tid = tid.wrapping_add(1);
        self.frame.clear();
        mbap::encode(&tx, tid, &mut self.frame);
        self.stats.transactions.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = self.busy.get_mut(device) {
            *b = true;
        }
        self.job_in_flight |= job.is_some();
        self.pending.push(Pending {
            tid,
            device,
            tx,
            job,
            sent: now,
            deadline: now + timeout,
        });
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        // A request is far smaller than the socket's send buffer: one that does not fit
        // at once means the server has read nothing for a long time.
        match conn.stream.try_write(&self.frame) {
            Ok(n) if n == self.frame.len() => {}
            Ok(_) => self.close("the send buffer is full (the server reads nothing)"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.close("the send buffer is full (the server reads nothing)")
            }
            Err(e) => {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                self.close(&format!("write failed: {e}"));
            }
        }
    }

    /// The earliest instant something is due: a deadline, a device, a job, a reconnect.
    fn next_wake(&self, reload: bool) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(1);
        for p in &self.pending {
            wake = wake.min(p.deadline);
        }
        let room = self.pending.len() < self.max_in_flight && !reload;
        if room {
            for (i, p) in self.set.pollers.iter().enumerate() {
                if !self.busy[i] && self.job_waits_for != Some(i) {
                    wake = wake.min(Instant::from_std(p.next_due()));
                }
            }
            if !self.job_in_flight {
                if let Some(j) = self.exec.next_due() {
                    wake = wake.min(Instant::from_std(j));
                }
            }
        }
        if self.conn.is_none() {
            wake = wake.min(self.reconnect_at);
        }
        wake
    }

    fn on_read(&mut self, read: io::Result<usize>) {
        let now = Instant::now();
        match read {
            Ok(0) => return self.close("the server closed it"),
            Err(e) => {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                return self.close(&format!("read failed: {e}"));
            }
            Ok(_) => {}
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        conn.last_rx = now;
        let mut rx = std::mem::take(&mut conn.rx);
        let mut used = 0;
        loop {
            match mbap::next_frame(&rx[used..]) {
                Ok(None) => break,
                Ok(Some(f)) => {
                    used += f.len;
                    let Some(i) = self.pending.iter().position(|p| p.tid == f.tid) else {
                        self.stats.stale_replies.fetch_add(1, Ordering::Relaxed);
                        debug!(bus = %self.settings.name, tid = f.tid, unit = f.unit,
                               "reply to no outstanding request (late): dropped");
                        continue;
                    };
                    let p = self.pending.swap_remove(i);
                    let answer = if f.unit == p.tx.unit() {
                        Answer::Reply(mbap::decode_reply(&p.tx, f.pdu))
                    } else {
                        Answer::WrongUnit
                    };
                    if let Some(c) = self.conn.as_mut() {
                        c.answered = true;
                    }
                    self.answered(p, answer, now);
                }
                Err(e) => {
                    self.stats.wrong_replies.fetch_add(1, Ordering::Relaxed);
                    return self.close(&format!("not Modbus TCP: {e}"));
                }
            }
        }
        rx.drain(..used);
        if let Some(c) = self.conn.as_mut() {
            c.rx = rx;
        }
    }

    /// Hands a request's fate to its job or its device.
    fn answered(&mut self, p: Pending, answer: Answer, now: Instant) {
        let elapsed = now - p.sent;
        if let Some(b) = self.busy.get_mut(p.device) {
            *b = false;
        }
        let stats = &*self.stats;
        match &answer {
            Answer::Reply(Reply::Registers(_)) => {
                stats.replies.fetch_add(1, Ordering::Relaxed);
                stats
                    .reply_micros
                    .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
                stats.reply_time.record(elapsed);
            }
            Answer::Reply(Reply::Exception(code)) => {
                stats.reply_time.record(elapsed);
                stats.count_exception(*code);
            }
            Answer::Reply(Reply::Mismatch) | Answer::WrongUnit => stats.count(&Failure::WrongReply),
            Answer::Timeout => stats.count(&Failure::Timeout),
            Answer::Lost => {}
        }
        if let Some(ji) = p.job {
            self.job_in_flight = false;
            let result = match answer {
                Answer::Reply(Reply::Registers(regs)) => TxResult::Ok(regs),
                Answer::Reply(Reply::Exception(code)) => TxResult::Exception(code),
                Answer::Reply(Reply::Mismatch) | Answer::WrongUnit => {
                    TxResult::Garbled("wrong_reply")
                }
                // The frame went out: whether it reached the drive is unknown.
                Answer::Timeout | Answer::Lost => TxResult::Timeout,
            };
            if let Some((job, o)) = self.exec.on_result(ji, now.into_std(), result) {
                self.waiting.finish(&job, o);
            }
            return;
        }
        let Some(poller) = self.set.pollers.get_mut(p.device) else {
            return;
        };
        let (now_std, wall, sink) = (now.into_std(), SystemTime::now(), &*self.sink);
        match answer {
            Answer::Reply(Reply::Registers(regs)) => {
                if elapsed > poller.settings().late_after {
                    stats.late_replies.fetch_add(1, Ordering::Relaxed);
                }
                poller.on_reply(now_std, wall, elapsed, &regs, sink);
            }
            Answer::Reply(Reply::Exception(2)) => {
                poller.on_illegal_address(now_std, wall, sink);
            }
            Answer::Reply(Reply::Exception(code)) => {
                poller.on_failure(now_std, wall, Failure::Exception(code), sink);
            }
            Answer::Reply(Reply::Mismatch) | Answer::WrongUnit => {
                poller.on_failure(now_std, wall, Failure::WrongReply, sink);
            }
            Answer::Timeout => {
                debug!(bus = %self.settings.name, device = %poller.settings().name, "read timed out");
                poller.on_failure(now_std, wall, Failure::Timeout, sink);
            }
            Answer::Lost => {
                poller.on_failure(now_std, wall, Failure::Io, sink);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_doubles_to_its_cap_with_each_wait_in_its_upper_half() {
        let mut b = Backoff {
            wait: FIRST_WAIT,
            max: Duration::from_secs(1),
        };
        let mut nominal = FIRST_WAIT;
        for _ in 0..8 {
            let w = b.next();
            assert!(w >= nominal / 2 && w <= nominal, "{w:?} for {nominal:?}");
            nominal = (nominal * 2).min(Duration::from_secs(1));
        }
        assert_eq!(b.wait, Duration::from_secs(1));
        b.reset();
        assert_eq!(b.wait, FIRST_WAIT);
    }

    #[test]
    fn the_jitter_spreads_the_waits() {
        let waits: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| {
                Backoff {
                    wait: Duration::from_secs(1),
                    max: Duration::from_secs(1),
                }
                .next()
            })
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }
}
