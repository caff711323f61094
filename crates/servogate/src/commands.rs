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
    check, parse_command, parse_group, Command, CommandId, Context, DeviceView, Feedback,
    GroupCommand, GroupTag, IdBook, Order, Outcome, Policy, RateLimiter, Refusal, Rules, Seen,
    SigningKey,
};
use servogate_core::{
    AvailabilityState, CommandReason, CommandReport, CommandStatus, DeviceEvents, Event, EventBody,
    EventSink, Histogram, MemberResult, ReplyTo, SeqBook,
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

impl Route {
    /// Room for one order, reserved now (a group reserves every target's before it sends
    /// the first).
    fn try_reserve(&self) -> Result<RoutePermit, ()> {
        match self {
            Route::Rtu(tx) => tx
                .clone()
                .try_reserve_owned()
                .map(RoutePermit::Rtu)
                .map_err(|_| ()),
            Route::Can(tx) => tx
                .clone()
                .try_reserve_owned()
                .map(RoutePermit::Can)
                .map_err(|_| ()),
        }
    }
}

impl Route {
    /// Room for one order, waited for (a stop waits for room rather than being refused;
    /// the bus takes its inbox every turn).
    async fn reserve(self) -> Result<RoutePermit, ()> {
        match self {
            Route::Rtu(tx) => tx
                .reserve_owned()
                .await
                .map(RoutePermit::Rtu)
                .map_err(|_| ()),
            Route::Can(tx) => tx
                .reserve_owned()
                .await
                .map(RoutePermit::Can)
                .map_err(|_| ()),
        }
    }
}

/// Room reserved in a bus inbox.
enum RoutePermit {
    Rtu(mpsc::OwnedPermit<BusOrder>),
    Can(mpsc::OwnedPermit<CanOrder>),
}

impl RoutePermit {
    fn send(self, order: Order, reply: oneshot::Sender<Outcome>) {
        match self {
            RoutePermit::Rtu(p) => {
                p.send(BusOrder { order, reply });
            }
            RoutePermit::Can(p) => {
                p.send(CanOrder { order, reply });
            }
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

/// The topic filters of every device's `cmd` topic and of group commands.
pub fn filters(prefix: &str) -> Vec<String> {
    vec![
        format!("{prefix}/devices/+/cmd"),
        servogate_mqtt::payload::group_command_topic(prefix),
    ]
}

/// Numbers group results: the gateway's own `cmd_result` stream.
const GROUP: &str = "";

/// A command handed to a bus, waiting for its outcome.
struct InFlight {
    device: Arc<str>,
    id: CommandId,
    action: &'static str,
    received: SystemTime,
    at: Instant,
    /// The group command it belongs to (a key of `Desk::groups`).
    group: Option<u64>,
    /// MQTT 5: where the result goes too.
    reply: Option<Arc<ReplyTo>>,
}

/// A group target that passed its checks: device, bus, deadline.
type Target = (Arc<str>, String, SystemTime);

/// A group command whose members are on their buses.
struct GroupState {
    id: CommandId,
    action: &'static str,
    received: SystemTime,
    at: Instant,
    /// Each device's outcome, once known, in payload order.
    members: Vec<(Arc<str>, Option<Outcome>)>,
    reply: Option<Arc<ReplyTo>>,
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
    groups: HashMap<u64, GroupState>,
    next_group: u64,
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
        groups: HashMap::new(),
        next_group: 0,
    };
    let mut pending: JoinSet<(InFlight, Outcome)> = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            // Cancellation-safe: a message not taken stays in the channel.
            Some(msg) = intake.recv() => {
                for (flight, rx) in desk.take(msg) {
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

    /// Handles one message; returns the orders handed to buses.
    fn take(&mut self, msg: Incoming) -> Vec<(InFlight, oneshot::Receiver<Outcome>)> {
        if msg.topic == servogate_mqtt::payload::group_command_topic(&self.cfg.prefix) {
            return self.take_group(msg);
        }
        self.take_one(msg).into_iter().collect()
    }

    /// A command for one device.
    fn take_one(&mut self, msg: Incoming) -> Option<(InFlight, oneshot::Receiver<Outcome>)> {
        let Some(device) = self.device_of(&msg.topic).map(str::to_owned) else {
            warn!(topic = %msg.topic, "message on an unexpected topic ignored");
            return None;
        };
        let Some(entry) = self.cfg.devices.get(&device).cloned() else {
            let n = self
                .stats
                .unknown_device
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            // Counted always, logged at the 1st, 2nd, 4th, 8th...: a flood of made-up
            // names must not flood the journal either.
            if n.is_power_of_two() {
                warn!(device = %device.chars().take(64).collect::<String>(), count = n,
                      "command for a device that is not configured: ignored");
            }
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
                    group: Vec::new(),
                    reply: msg.reply.clone(),
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
                r.reply = msg.reply.clone();
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
            group: None,
            reply: msg.reply.clone(),
        };
        let dispatched = self
            .checked(&device, &policy, &cmd, &msg)
            .and_then(|deadline| self.send(&device, &entry.bus, cmd, deadline, &msg));
        match dispatched {
            Ok(rx) => Some((flight, rx)),
            Err(outcome) => {
                self.finish(flight, outcome);
                None
            }
        }
    }

    /// A group command: checked as a whole (one refusal refuses every target), then
    /// every order handed to its bus, or none.
    fn take_group(&mut self, msg: Incoming) -> Vec<(InFlight, oneshot::Receiver<Outcome>)> {
        let gkey: Arc<str> = Arc::from(GROUP);
        let report = |id: Option<&CommandId>, action, status, reason, message: String, group| {
            CommandReport {
                id: id.map(|i| i.as_arc().clone()),
                action,
                status,
                reason,
                message,
                received: msg.received,
                latency: msg.at.elapsed(),
                duplicate: false,
                group,
                reply: msg.reply.clone(),
            }
        };
        let g: GroupCommand = match parse_group(&msg.payload, self.cfg.key.as_ref()) {
            Ok(g) => g,
            Err(r) => {
                let member = MemberResult {
                    device: Arc::from("-"),
                    status: CommandStatus::Rejected,
                    reason: Some(r.reason),
                    message: String::new(),
                };
                let rep = report(
                    r.id.as_ref(),
                    r.action,
                    CommandStatus::Rejected,
                    Some(r.reason),
                    r.message,
                    vec![member],
                );
                self.publish(&gkey, rep);
                return Vec::new();
            }
        };
        let action = g.targets[0].1.action.name();
        let refuse_all =
            |this: &mut Self, reason: CommandReason, message: &str, members: Vec<MemberResult>| {
                let rep = report(
                    Some(&g.id),
                    Some(action),
                    CommandStatus::Rejected,
                    Some(reason),
                    message.to_owned(),
                    members,
                );
                this.publish(&gkey, rep);
            };
        let everyone = |reason: CommandReason| -> Vec<MemberResult> {
            g.targets
                .iter()
                .map(|(d, _)| MemberResult {
                    device: Arc::from(d.as_str()),
                    status: CommandStatus::Rejected,
                    reason: Some(reason),
                    message: String::new(),
                })
                .collect()
        };
        if msg.retain {
            refuse_all(
                self,
                CommandReason::Retained,
                "a retained command is stale: never executed",
                everyone(CommandReason::Retained),
            );
            return Vec::new();
        }
        match self
            .books
            .entry(gkey.clone())
            .or_default()
            .seen(&g.id, g.body_hash)
        {
            Seen::New => {}
            Seen::InFlight => return Vec::new(),
            Seen::Finished(mut r) => {
                r.duplicate = true;
                r.reply = msg.reply.clone();
                self.publish(&gkey, r);
                return Vec::new();
            }
            Seen::Reused => {
                refuse_all(
                    self,
                    CommandReason::IdReused,
                    "this id was used before with another command",
                    everyone(CommandReason::IdReused),
                );
                return Vec::new();
            }
        }
        self.books
            .entry(gkey.clone())
            .or_default()
            .start(g.id.clone(), g.body_hash);
        // Every target checked first; nothing is sent unless all pass.
        let mut checks: Vec<Result<Target, Outcome>> = Vec::new();
        for (device, cmd) in &g.targets {
            let Some(entry) = self.cfg.devices.get(device).cloned() else {
                checks.push(Err(Outcome::rejected(
                    CommandReason::BadRequest,
                    format!("no device named {device:?}"),
                )));
                continue;
            };
            let Some(policy) = entry.policy else {
                checks.push(Err(Outcome::rejected(
                    CommandReason::NotAllowed,
                    "this device takes no commands",
                )));
                continue;
            };
            let device: Arc<str> = Arc::from(device.as_str());
            checks.push(
                self.checked(&device, &policy, cmd, &msg)
                    .map(|d| (device, entry.bus, d)),
            );
        }
        // Room on every bus for every order, reserved before the first is sent.
        let mut permits = Vec::new();
        if checks.iter().all(Result::is_ok) {
            for c in checks.iter_mut() {
                let Ok((_, bus, _)) = c else { continue };
                let permit = match self.cfg.routes.get(bus.as_str()) {
                    None => Err(Outcome::rejected(
                        CommandReason::BusDown,
                        format!("bus {bus} is not running"),
                    )),
                    Some(route) => route.try_reserve().map_err(|_| {
                        Outcome::rejected(
                            CommandReason::RateLimited,
                            format!("the command queue of bus {bus} is full"),
                        )
                    }),
                };
                match permit {
                    Ok(p) => permits.push(p),
                    Err(o) => *c = Err(o),
                }
            }
        }
        if checks.iter().any(Result::is_err) {
            drop(permits);
            let members = g
                .targets
                .iter()
                .zip(&checks)
                .map(|((d, _), c)| match c {
                    Err(o) => MemberResult {
                        device: Arc::from(d.as_str()),
                        status: o.status,
                        reason: o.reason,
                        message: o.message.clone(),
                    },
                    Ok(_) => MemberResult {
                        device: Arc::from(d.as_str()),
                        status: CommandStatus::Rejected,
                        reason: Some(CommandReason::GroupRejected),
                        message: "another target was refused: nothing was sent".into(),
                    },
                })
                .collect();
            let rep = report(
                Some(&g.id),
                Some(action),
                CommandStatus::Rejected,
                Some(CommandReason::GroupRejected),
                "a target was refused: nothing was sent".into(),
                members,
            );
            self.books
                .entry(gkey.clone())
                .or_default()
                .finish(&g.id, &rep);
            self.publish(&gkey, rep);
            return Vec::new();
        }
        let key = self.next_group;
        self.next_group += 1;
        // Each bus learns how many members it gets, so it can start them together.
        let mut per_bus: HashMap<String, usize> = HashMap::new();
        for (_, bus, _) in checks.iter().flatten() {
            *per_bus.entry(bus.to_string()).or_default() += 1;
        }
        let mut out = Vec::new();
        let mut members = Vec::new();
        for ((permit, c), (_, cmd)) in permits.into_iter().zip(checks).zip(g.targets) {
            let Ok((device, bus, deadline)) = c else {
                continue;
            };
            let tag = GroupTag {
                key,
                members: per_bus.get(bus.as_str()).copied().unwrap_or(1),
            };
            let (reply, rx) = oneshot::channel();
            let left = deadline
                .duration_since(msg.received)
                .unwrap_or(Duration::ZERO);
            let order = Order {
                device: device.clone(),
                id: cmd.id.clone(),
                action: cmd.action,
                deadline: msg.at + left,
                group: Some(tag),
            };
            permit.send(order, reply);
            members.push((device.clone(), None));
            let flight = InFlight {
                device,
                id: cmd.id,
                action,
                received: msg.received,
                at: msg.at,
                group: Some(key),
                reply: None,
            };
            out.push((flight, rx));
        }
        self.groups.insert(
            key,
            GroupState {
                id: g.id,
                action,
                received: msg.received,
                at: msg.at,
                members,
                reply: msg.reply.clone(),
            },
        );
        out
    }

    /// Applies `policy` to `cmd` for `device`; returns its deadline.
    fn checked(
        &mut self,
        device: &Arc<str>,
        policy: &Policy,
        cmd: &Command,
        msg: &Incoming,
    ) -> Result<SystemTime, Outcome> {
        let view = self.views.get(device);
        let cx = Context {
            view: &view,
            rules: &self.cfg.rules,
            received: msg.received,
            now: msg.at,
            expiry: msg.expiry,
        };
        let rate = self.rates.entry(device.clone()).or_default();
        check(cmd, policy, rate, cx).map_err(|r| match r.reason {
            // Past its deadline on arrival: the contract's own status for that.
            CommandReason::Expired => Outcome::expired(r.message),
            reason => Outcome::rejected(reason, r.message),
        })
    }

    /// Hands a checked command to its bus.
    fn send(
        &mut self,
        device: &Arc<str>,
        bus: &str,
        cmd: Command,
        deadline: SystemTime,
        msg: &Incoming,
    ) -> Result<oneshot::Receiver<Outcome>, Outcome> {
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
            group: None,
        };
        if order.action.is_safety() {
            // Only `allow` may hold a stop back: never a full queue. It waits for room,
            // in a task of its own (the desk never waits), until its deadline.
            let route = route.clone();
            let bus = bus.to_owned();
            tokio::spawn(async move {
                let until = tokio::time::Instant::from_std(order.deadline);
                match tokio::time::timeout_at(until, route.reserve()).await {
                    Ok(Ok(permit)) => permit.send(order, reply),
                    Ok(Err(())) => {
                        let _ = reply.send(Outcome::rejected(
                            CommandReason::BusDown,
                            format!("bus {bus} is not running"),
                        ));
                    }
                    Err(_) => {
                        let _ = reply.send(Outcome::expired(format!(
                            "the command queue of bus {bus} stayed full until its deadline"
                        )));
                    }
                }
            });
            return Ok(rx);
        }
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
        if let Some(key) = f.group {
            return self.finish_member(key, &f.device, outcome);
        }
        let report = CommandReport {
            id: Some(f.id.as_arc().clone()),
            action: Some(f.action),
            status: outcome.status,
            reason: outcome.reason,
            message: outcome.message,
            received: f.received,
            latency: f.at.elapsed(),
            duplicate: false,
            group: Vec::new(),
            reply: f.reply,
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
            // The repeats' own Response Topics were not kept (see `IdBook`): their
            // answer is on the result topic.
            again.reply = None;
            self.publish(&f.device, again);
        }
    }

    /// One member of a group ended; the group's result goes out with the last.
    fn finish_member(&mut self, key: u64, device: &Arc<str>, outcome: Outcome) {
        let Some(g) = self.groups.get_mut(&key) else {
            return;
        };
        if let Some(m) = g
            .members
            .iter_mut()
            .find(|(d, o)| d == device && o.is_none())
        {
            m.1 = Some(outcome);
        }
        if g.members.iter().any(|(_, o)| o.is_none()) {
            return;
        }
        let Some(g) = self.groups.remove(&key) else {
            return;
        };
        // `done` only when every device's is; else the most serious of theirs.
        let rank = |s: CommandStatus| match s {
            CommandStatus::Unknown => 4,
            CommandStatus::Failed => 3,
            CommandStatus::Expired => 2,
            CommandStatus::Rejected => 1,
            _ => 0,
        };
        let members: Vec<MemberResult> = g
            .members
            .into_iter()
            .map(|(device, o)| {
                let o = o.unwrap_or_else(|| Outcome::unknown("no outcome"));
                MemberResult {
                    device,
                    status: o.status,
                    reason: o.reason,
                    message: o.message,
                }
            })
            .collect();
        let worst = members.iter().max_by_key(|m| rank(m.status));
        let (status, reason) = match worst {
            Some(m) if m.status != CommandStatus::Done => (m.status, m.reason),
            _ => (CommandStatus::Done, None),
        };
        let report = CommandReport {
            id: Some(g.id.as_arc().clone()),
            action: Some(g.action),
            status,
            reason,
            message: String::new(),
            received: g.received,
            latency: g.at.elapsed(),
            duplicate: false,
            group: members,
            reply: g.reply,
        };
        let gkey: Arc<str> = Arc::from(GROUP);
        self.books
            .entry(gkey.clone())
            .or_default()
            .finish(&g.id, &report);
        self.publish(&gkey, report);
    }

    /// Numbers the result on the device's `cmd_result` stream, logs and counts it.
    fn publish(&mut self, device: &Arc<str>, report: CommandReport) {
        let id = report.id.as_deref().unwrap_or("-");
        let action = report.action.unwrap_or("-");
        let reason = report.reason.map_or("-", |r| r.as_str());
        // A group's result is the gateway's: "*" is no device name (not topic-safe).
        let shown = if report.is_group() { "*" } else { &**device };
        info!(target: "servogate::audit", device = %shown, id, action,
              status = report.status.as_str(), reason, duplicate = report.duplicate,
              latency_ms = report.latency.as_secs_f64() * 1e3, "command result");
        if !report.duplicate {
            self.stats
                .count(shown, action, report.status, report.latency);
        }
        let numberer = self
            .numberers
            .entry(device.clone())
            .or_insert_with(|| self.seq.events(device));
        let event = numberer.event(SystemTime::now(), EventBody::CommandResult(report));
        self.sink.push(event);
    }
}
