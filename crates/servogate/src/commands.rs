//! The command desk: from an MQTT message on a `cmd` topic to a result on `cmd/result`
//! (DESIGN.md section 7).
//!
//! One task ([`run_desk`]) takes what the forwarder's event loop hands it (a bounded
//! channel, filled with `try_send`), and for each message:
//!
//! 1. finds the device (an unknown one is logged and counted, never answered: a flood of
//!    made-up names must not grow the sequence book);
//! 2. refuses it when the device has no policy (`not_allowed`), when it is not a command
//!    (`bad_request`, `bad_signature`) or when the broker retained it (`retained`);
//! 3. answers a known id from the [`IdBook`] (`"duplicate":true`, or `id_reused`);
//! 4. applies the policy ([`servogate_command::check`]) to what the gateway last saw of
//!    the device ([`DeviceViews`]);
//! 5. hands what passes to its bus task's bounded inbox (`try_send`: a full inbox is
//!    `rate_limited`), and publishes the outcome when the bus sends it back.
//!
//! This task is the only one that numbers `cmd_result` events, so a device's results
//! reach the ring in sequence order. Every result is logged (the audit trail: device,
//! id, action, status, reason; never a key) and counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use servogate_command::{
    check, parse_command, Command, CommandId, Context, DeviceView, Feedback, IdBook, Order,
    Outcome, Policy, RateLimiter, Refusal, Rules, Seen, SigningKey,
};
use servogate_core::{
    AvailabilityState, CommandReason, CommandReport, CommandStatus, DeviceEvents, Event, EventBody,
    EventSink, Histogram, SeqBook,
};
use servogate_modbus::bus::BusOrder;
use servogate_mqtt::Incoming;
use servogate_socketcan::CanOrder;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Messages waiting for the desk; beyond it the event loop drops (and counts) them.
pub const INTAKE_CAPACITY: usize = 256;
/// Orders waiting in front of one bus task.
pub const BUS_QUEUE: usize = 32;

/// What the command policy reads of each device: availability and the last telemetry.
#[derive(Debug, Default)]
pub struct DeviceViews {
    views: Mutex<HashMap<Arc<str>, DeviceView>>,
}

impl DeviceViews {
    /// Takes note of an event on its way to the ring.
    pub fn observe(&self, event: &Event) {
        let update = |f: &mut dyn FnMut(&mut DeviceView)| {
            // A panic elsewhere cannot leave a view half-written (plain copies).
            let mut map = self.views.lock().unwrap_or_else(PoisonError::into_inner);
            match map.get_mut(&event.device) {
                Some(v) => f(v),
                None => {
                    let mut v = DeviceView::default();
                    f(&mut v);
                    map.insert(event.device.clone(), v);
                }
            }
        };
        match &event.body {
            EventBody::Availability(a) => {
                update(&mut |v| v.online = Some(a.state == AvailabilityState::Online))
            }
            EventBody::Telemetry(t) => update(&mut |v| {
                let last = v.feedback;
                v.feedback = Some(Feedback {
                    at: event.ts,
                    good: t.quality.is_good(),
                    // A telemetry without them keeps what an earlier one said.
                    state: t.state.or(last.and_then(|l| l.state)),
                    position: t.position.or(last.and_then(|l| l.position)),
                });
            }),
            _ => {}
        }
    }

    pub fn get(&self, device: &str) -> DeviceView {
        let map = self.views.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(device).copied().unwrap_or_default()
    }
}

/// Counters of the command path, for the metrics.
#[derive(Debug, Default)]
pub struct CommandStats {
    /// (device, action, status) -> results.
    totals: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    /// Receipt to result, every final result.
    pub latency: Histogram,
    /// Messages on a command topic of a device that is not configured.
    pub unknown_device: std::sync::atomic::AtomicU64,
    /// Messages the event loop dropped because the desk's channel was full.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl CommandStats {
    fn count(&self, device: &str, action: &str, status: CommandStatus, latency: Duration) {
        let mut t = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        *t.entry((device.to_owned(), action.to_owned(), status.as_str()))
            .or_default() += 1;
        self.latency.record(latency);
    }

    pub fn totals(&self) -> Vec<((String, String, &'static str), u64)> {
        let t = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        t.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// One device as the desk sees it.
#[derive(Debug, Clone)]
pub struct DeskDevice {
    pub bus: String,
    /// `None`: the device takes no command.
    pub policy: Option<Policy>,
}

/// What the desk works from; replaced as a whole on a reload.
#[derive(Debug, Clone, Default)]
pub struct DeskConfig {
    /// `{prefix}` of the topics.
    pub prefix: String,
    pub devices: HashMap<String, DeskDevice>,
    /// Bus name -> its command inbox.
    pub routes: HashMap<String, Route>,
    pub rules: Rules,
    pub key: Option<SigningKey>,
}

/// A bus task's command inbox, by protocol (the two bus crates share no tokio types).
#[derive(Debug, Clone)]
pub enum Route {
    Rtu(mpsc::Sender<BusOrder>),
    Can(mpsc::Sender<CanOrder>),
}

impl Route {
    /// Hands `order` to the bus without waiting; on a full or closed inbox the order is
    /// dropped with its reply (the caller answers).
    fn try_send(
        &self,
        order: Order,
        reply: oneshot::Sender<Outcome>,
    ) -> Result<(), mpsc::error::TrySendError<()>> {
        match self {
            Route::Rtu(tx) => tx.try_send(BusOrder { order, reply }).map_err(erase),
            Route::Can(tx) => tx.try_send(CanOrder { order, reply }).map_err(erase),
        }
    }
}

/// The error without the order it hands back (dropping it drops the reply).
fn erase<T>(e: mpsc::error::TrySendError<T>) -> mpsc::error::TrySendError<()> {
    match e {
        mpsc::error::TrySendError::Full(_) => mpsc::error::TrySendError::Full(()),
        mpsc::error::TrySendError::Closed(_) => mpsc::error::TrySendError::Closed(()),
    }
}

/// The topic filter of every device's `cmd` topic.
pub fn filters(prefix: &str) -> Vec<String> {
    vec![format!("{prefix}/devices/+/cmd")]
}

/// A command handed to a bus, waiting for its outcome.
struct InFlight {
    device: Arc<str>,
    id: CommandId,
    action: &'static str,
    received: SystemTime,
    at: Instant,
}

/// The desk's state (everything but the channels).
struct Desk {
    cfg: DeskConfig,
    views: Arc<DeviceViews>,
    sink: Arc<dyn EventSink>,
    seq: SeqBook,
    numberers: HashMap<Arc<str>, DeviceEvents>,
    books: HashMap<Arc<str>, IdBook>,
    rates: HashMap<Arc<str>, RateLimiter>,
    stats: Arc<CommandStats>,
}

/// Runs the desk until `stop` fires.
pub async fn run_desk(
    mut intake: mpsc::Receiver<Incoming>,
    mut config: watch::Receiver<DeskConfig>,
    views: Arc<DeviceViews>,
    sink: Arc<dyn EventSink>,
    seq: SeqBook,
    stats: Arc<CommandStats>,
    stop: CancellationToken,
) {
    let mut desk = Desk {
        cfg: config.borrow_and_update().clone(),
        views,
        sink,
        seq,
        numberers: HashMap::new(),
        books: HashMap::new(),
        rates: HashMap::new(),
        stats,
    };
    let mut pending: JoinSet<(InFlight, Outcome)> = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            // Cancellation-safe: a message not taken stays in the channel.
            Some(msg) = intake.recv() => {
                if let Some((flight, rx)) = desk.take(msg) {
                    pending.spawn(async move {
                        // A bus that stops answers every order; a dropped sender means
                        // its task died, and the frame may have gone out.
                        let outcome = rx.await.unwrap_or_else(|_| {
                            Outcome::unknown("the bus task ended before it answered")
                        });
                        (flight, outcome)
                    });
                }
            }
            Some(done) = pending.join_next() => {
                if let Ok((flight, outcome)) = done {
                    desk.finish(flight, outcome);
                }
            }
            changed = config.changed() => {
                if changed.is_err() {
                    break;
                }
                desk.cfg = config.borrow_and_update().clone();
                info!("command policies updated");
            }
        }
    }
    // Orders still on a bus get their outcome from the bus as it stops; results that
    // come within a moment still reach the ring.
    let grace = tokio::time::sleep(Duration::from_millis(200));
    tokio::pin!(grace);
    while !pending.is_empty() {
        tokio::select! {
            _ = &mut grace => break,
            Some(Ok((flight, outcome))) = pending.join_next() => desk.finish(flight, outcome),
        }
    }
}

impl Desk {
    /// The device named by `{prefix}/devices/{device}/cmd`.
    fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(&self.cfg.prefix)?;
        let rest = rest.strip_prefix("/devices/")?;
        rest.strip_suffix("/cmd").filter(|d| !d.contains('/'))
    }

    /// Handles one message; returns the order handed to a bus, if any.
    fn take(&mut self, msg: Incoming) -> Option<(InFlight, oneshot::Receiver<Outcome>)> {
        let Some(device) = self.device_of(&msg.topic).map(str::to_owned) else {
            warn!(topic = %msg.topic, "message on an unexpected topic ignored");
            return None;
        };
        let Some(entry) = self.cfg.devices.get(&device).cloned() else {
            self.stats
                .unknown_device
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(device = %device.chars().take(64).collect::<String>(),
                  "command for a device that is not configured: ignored");
            return None;
        };
        let device: Arc<str> = Arc::from(device);
        let refuse = |this: &mut Self, r: Refusal| {
            this.publish(
                &device,
                CommandReport {
                    id: r.id.map(|i| i.as_arc().clone()),
                    action: r.action,
                    status: CommandStatus::Rejected,
                    reason: Some(r.reason),
                    message: r.message,
                    received: msg.received,
                    latency: msg.at.elapsed(),
                    duplicate: false,
                },
            );
        };
        let cmd = match parse_command(&msg.payload, self.cfg.key.as_ref()) {
            Ok(cmd) => cmd,
            Err(r) => {
                refuse(self, r);
                return None;
            }
        };
        let reject = |reason: CommandReason, message: &str| Refusal {
            id: Some(cmd.id.clone()),
            action: Some(cmd.action.name()),
            reason,
            message: message.to_owned(),
        };
        if msg.retain {
            refuse(
                self,
                reject(
                    CommandReason::Retained,
                    "a retained command is stale: never executed",
                ),
            );
            return None;
        }
        let Some(policy) = entry.policy else {
            refuse(
                self,
                reject(
                    CommandReason::NotAllowed,
                    "this device takes no commands (no [devices.commands] policy)",
                ),
            );
            return None;
        };
        match self
            .books
            .entry(device.clone())
            .or_default()
            .seen(&cmd.id, cmd.body_hash)
        {
            Seen::New => {}
            Seen::InFlight => return None,
            Seen::Finished(mut r) => {
                r.duplicate = true;
                self.publish(&device, r);
                return None;
            }
            Seen::Reused => {
                refuse(
                    self,
                    reject(
                        CommandReason::IdReused,
                        "this id was used before with another command",
                    ),
                );
                return None;
            }
        }
        self.books
            .entry(device.clone())
            .or_default()
            .start(cmd.id.clone(), cmd.body_hash);
        let flight = InFlight {
            device: device.clone(),
            id: cmd.id.clone(),
            action: cmd.action.name(),
            received: msg.received,
            at: msg.at,
        };
        match self.dispatch(&device, &entry.bus, &policy, cmd, &msg) {
            Ok(rx) => Some((flight, rx)),
            Err(outcome) => {
                self.finish(flight, outcome);
                None
            }
        }
    }

    /// Applies the policy and hands the order to its bus.
    fn dispatch(
        &mut self,
        device: &Arc<str>,
        bus: &str,
        policy: &Policy,
        cmd: Command,
        msg: &Incoming,
    ) -> Result<oneshot::Receiver<Outcome>, Outcome> {
        let view = self.views.get(device);
        let cx = Context {
            view: &view,
            rules: &self.cfg.rules,
            received: msg.received,
            now: msg.at,
            expiry: None,
        };
        let rate = self.rates.entry(device.clone()).or_default();
        let deadline = check(&cmd, policy, rate, cx).map_err(|r| match r.reason {
            // Past its deadline on arrival: the contract's own status for that.
            CommandReason::Expired => Outcome::expired(r.message),
            reason => Outcome::rejected(reason, r.message),
        })?;
        let left = deadline
            .duration_since(msg.received)
            .unwrap_or(Duration::ZERO);
        let Some(route) = self.cfg.routes.get(bus) else {
            return Err(Outcome::rejected(
                CommandReason::BusDown,
                format!("bus {bus} is not running"),
            ));
        };
        let (reply, rx) = oneshot::channel();
        let order = Order {
            device: device.clone(),
            id: cmd.id,
            action: cmd.action,
            deadline: msg.at + left,
        };
        match route.try_send(order, reply) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Outcome::rejected(
                CommandReason::RateLimited,
                format!("the command queue of bus {bus} is full"),
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Outcome::rejected(
                CommandReason::BusDown,
                format!("bus {bus} is not running"),
            )),
        }
    }

    /// A command's final outcome: stored for repeats, published, and once more for each
    /// repeat that came while it was in flight.
    fn finish(&mut self, f: InFlight, outcome: Outcome) {
        let report = CommandReport {
            id: Some(f.id.as_arc().clone()),
            action: Some(f.action),
            status: outcome.status,
            reason: outcome.reason,
            message: outcome.message,
            received: f.received,
            latency: f.at.elapsed(),
            duplicate: false,
        };
        let waiting = self
            .books
            .entry(f.device.clone())
            .or_default()
            .finish(&f.id, &report);
        self.publish(&f.device, report.clone());
        for _ in 0..waiting {
            let mut again = report.clone();
            again.duplicate = true;
            self.publish(&f.device, again);
        }
    }

    /// Numbers the result on the device's `cmd_result` stream, logs and counts it.
    fn publish(&mut self, device: &Arc<str>, report: CommandReport) {
        let id = report.id.as_deref().unwrap_or("-");
        let action = report.action.unwrap_or("-");
        let reason = report.reason.map_or("-", |r| r.as_str());
        info!(target: "servogate::audit", device = %device, id, action,
              status = report.status.as_str(), reason, duplicate = report.duplicate,
              latency_ms = report.latency.as_secs_f64() * 1e3, "command result");
        if !report.duplicate {
            self.stats
                .count(device, action, report.status, report.latency);
        }
        let numberer = self
            .numberers
            .entry(device.clone())
            .or_insert_with(|| self.seq.events(device));
        let event = numberer.event(SystemTime::now(), EventBody::CommandResult(report));
        self.sink.push(event);
    }
}
