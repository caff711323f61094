//! The safety policy of one device (DESIGN.md section 7), as a pure decision.
//!
//! [`check`] takes the command, the device's policy, what the gateway last saw of the
//! device ([`DeviceView`]) and the time, and says whether the command may go to the bus
//! and by when it must start. It sends nothing. Default deny: a device without a policy
//! takes no command at all (the daemon never calls `check` for it).
//!
//! The rules, in the order they are applied (the first that fails is the reason):
//! 1. `allow` lists the action (`not_allowed`);
//! 2. a deadline: `deadline`, or `ts` + `ttl_ms`, or the MQTT 5 message expiry, or
//!    receipt + `max_age` (`no_deadline`); `ts` no further ahead than `max_clock_skew`
//!    (`clock_skew`); not yet passed (`expired`);
//! 3. `max_rate` (`rate_limited`);
//! 4. the values: a profile field (`unknown_field`) that `writable` lists
//!    (`not_allowed`), inside `limits` (`out_of_range`);
//! 5. `require_fresh`: the device online (`device_offline`) and its last telemetry good
//!    and recent (`stale_feedback`);
//! 6. the CiA 402 state: motion only in `operation_enabled`, `enable` not from a fault
//!    (`wrong_state`);
//! 7. `max_step` from the present position (`step_too_large`; `stale_feedback` when the
//!    position is not known).
//!
//! Architecture invariant: `quick_stop`, `halt` and `disable` pass every rule but
//! `allow`. Without a deadline they take receipt + `max_age`, or
//! [`SAFETY_DEFAULT_AGE`]: an axis must never keep moving because a stop lacked a field.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use servogate_core::{CommandReason, DriveState};

use crate::parse::{Action, Command, Timing};

/// Deadline of a safety action that carries none, when the policy sets no `max_age`.
pub const SAFETY_DEFAULT_AGE: Duration = Duration::from_secs(1);

/// Bounds of one field, in the field's unit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limit {
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Largest distance from the present value (absolute moves) or largest move
    /// (relative ones).
    pub max_step: Option<f64>,
}

impl Limit {
    fn check(&self, field: &str, value: f64) -> Result<(), Refused> {
        if let Some(min) = self.min.filter(|min| value < *min) {
            return Err(refused(
                CommandReason::OutOfRange,
                format!("{field} {value} < min {min}"),
            ));
        }
        if let Some(max) = self.max.filter(|max| value > *max) {
            return Err(refused(
                CommandReason::OutOfRange,
                format!("{field} {value} > max {max}"),
            ));
        }
        Ok(())
    }
}

/// The `[devices.commands]` table of one device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// Actions the device takes (names as in [`Action::NAMES`]).
    pub allow: Vec<String>,
    /// Profile fields `write` may set.
    pub writable: Vec<String>,
    /// Deadline for commands that carry none (receipt + this); absent: `no_deadline`.
    pub max_age: Option<Duration>,
    /// Commands per second; above it `rate_limited` (a burst of one second's worth).
    pub max_rate: Option<f64>,
    /// Non-safety commands only while the device is online with good, recent telemetry.
    pub require_fresh: bool,
    /// Telemetry older than this is stale.
    pub stale_after: Duration,
    /// Field name -> bounds.
    pub limits: BTreeMap<String, Limit>,
    /// Every field of the device's profile (to tell `unknown_field` from `not_allowed`).
    pub fields: Vec<String>,
}

impl Policy {
    pub fn allows(&self, action: &str) -> bool {
        self.allow.iter().any(|a| a == action)
    }
}

/// What the gateway last saw of a device.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceView {
    /// `None` until its first availability event.
    pub online: Option<bool>,
    pub feedback: Option<Feedback>,
}

/// The device's last telemetry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feedback {
    /// Its acquisition time.
    pub at: SystemTime,
    /// Quality `good`.
    pub good: bool,
    pub state: Option<DriveState>,
    pub position: Option<f64>,
}

/// Gateway-wide settings (`[commands]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// How far in the future a `ts` may be.
    pub max_clock_skew: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_clock_skew: Duration::from_secs(1),
        }
    }
}

/// A refusal: the reason and the words for `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: CommandReason,
    pub message: String,
}

fn refused(reason: CommandReason, message: impl Into<String>) -> Refused {
    Refused {
        reason,
        message: message.into(),
    }
}

/// Commands per second of one device: a token bucket holding one second's worth.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimiter {
    /// Takes one token if there is one; the bucket refills at `rate` per second.
    pub fn try_take(&mut self, now: Instant, rate: f64) -> bool {
        let burst = rate.max(1.0);
        self.tokens = match self.last {
            None => burst,
            Some(last) => {
                let elapsed = now.saturating_duration_since(last).as_secs_f64();
                (self.tokens + elapsed * rate).min(burst)
            }
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The deadline of a command received at `received` (wall clock). `expiry` is the
/// remaining MQTT 5 message expiry interval, when the command came with one.
pub fn deadline(
    action: &Action,
    timing: &Timing,
    received: SystemTime,
    expiry: Option<Duration>,
    max_age: Option<Duration>,
    rules: &Rules,
) -> Result<SystemTime, Refused> {
    if let Some(sent) = timing.sent {
        if let Ok(ahead) = sent.duration_since(received) {
            if ahead > rules.max_clock_skew {
                return Err(refused(
                    CommandReason::ClockSkew,
                    format!(
                        "ts is {:.3} s ahead of the gateway's clock (max_clock_skew {:.3} s)",
                        ahead.as_secs_f64(),
                        rules.max_clock_skew.as_secs_f64()
                    ),
                ));
            }
        }
    }
    let from_payload = match (timing.deadline, timing.sent, timing.ttl) {
        (Some(d), _, _) => Some(d),
        (None, Some(sent), Some(ttl)) => sent.checked_add(ttl),
        _ => None,
    };
    let deadline = from_payload
        .or_else(|| expiry.and_then(|e| received.checked_add(e)))
        .or_else(|| max_age.and_then(|a| received.checked_add(a)))
        .or_else(|| action.is_safety().then(|| received + SAFETY_DEFAULT_AGE));
    let Some(deadline) = deadline else {
        return Err(refused(
            CommandReason::NoDeadline,
            "no deadline: send \"deadline\", or \"ts\" with \"ttl_ms\" (the device sets no max_age)",
        ));
    };
    if deadline <= received {
        let late = received.duration_since(deadline).unwrap_or_default();
        return Err(refused(
            CommandReason::Expired,
            format!(
                "the deadline passed {:.3} s before receipt",
                late.as_secs_f64()
            ),
        ));
    }
    Ok(deadline)
}

/// What [`check`] needs besides the command and the policy.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub view: &'a DeviceView,
    pub rules: &'a Rules,
    /// Receipt, wall clock.
    pub received: SystemTime,
    /// Receipt, monotonic (for the rate).
    pub now: Instant,
    /// MQTT 5 message expiry left, if any.
    pub expiry: Option<Duration>,
}

/// Decides whether `cmd` may go to the bus; returns its deadline.
pub fn check(
    cmd: &Command,
    policy: &Policy,
    rate: &mut RateLimiter,
    cx: Context<'_>,
) -> Result<SystemTime, Refused> {
    let action = &cmd.action;
    let name = action.name();
    if !policy.allows(name) {
        return Err(refused(
            CommandReason::NotAllowed,
            format!("{name} is not in this device's allow list"),
        ));
    }
    let deadline = deadline(
        action,
        &cmd.timing,
        cx.received,
        cx.expiry,
        policy.max_age,
        cx.rules,
    )?;
    if action.is_safety() {
        return Ok(deadline);
    }
    if let Some(max) = policy.max_rate {
        if !rate.try_take(cx.now, max) {
            return Err(refused(
                CommandReason::RateLimited,
                format!("more than {max} commands/s"),
            ));
        }
    }
    values(action, policy)?;
    if policy.require_fresh {
        fresh(cx.view, policy, cx.received)?;
    }
    state(action, cx.view)?;
    step(action, policy, cx.view)?;
    Ok(deadline)
}

/// Rule 4: fields and their limits.
fn values(action: &Action, policy: &Policy) -> Result<(), Refused> {
    let limit = |field: &str, value: f64| match policy.limits.get(field) {
        Some(l) => l.check(field, value),
        None => Ok(()),
    };
    match action {
        Action::Write { values } => {
            for (field, value) in values {
                if !policy.fields.iter().any(|f| f == field) {
                    return Err(refused(
                        CommandReason::UnknownField,
                        format!("{field} is not a field of this device's profile"),
                    ));
                }
                if !policy.writable.iter().any(|f| f == field) {
                    return Err(refused(
                        CommandReason::NotAllowed,
                        format!("{field} is not writable (see writable)"),
                    ));
                }
                limit(field, *value)?;
            }
            Ok(())
        }
        Action::Move {
            position,
            velocity,
            relative,
            ..
        } => {
            if !relative {
                limit("position", *position)?;
            }
            match velocity {
                Some(v) => limit("velocity", *v),
                None => Ok(()),
            }
        }
        Action::Velocity { velocity } => limit("velocity", *velocity),
        _ => Ok(()),
    }
}

/// Rule 5: online, good and recent telemetry.
fn fresh(view: &DeviceView, policy: &Policy, received: SystemTime) -> Result<(), Refused> {
    if view.online != Some(true) {
        return Err(refused(
            CommandReason::DeviceOffline,
            "the device is offline (or has not answered yet)",
        ));
    }
    let Some(fb) = view.feedback else {
        return Err(refused(
            CommandReason::StaleFeedback,
            "no telemetry from the device yet",
        ));
    };
    if !fb.good {
        return Err(refused(
            CommandReason::StaleFeedback,
            "the last telemetry is not good (late or out of range)",
        ));
    }
    let age = received.duration_since(fb.at).unwrap_or_default();
    if age > policy.stale_after {
        return Err(refused(
            CommandReason::StaleFeedback,
            format!(
                "the last telemetry is {:.0} ms old (stale_after {:.0} ms)",
                age.as_secs_f64() * 1e3,
                policy.stale_after.as_secs_f64() * 1e3
            ),
        ));
    }
    Ok(())
}

/// Rule 6: CiA 402 state interlocks.
fn state(action: &Action, view: &DeviceView) -> Result<(), Refused> {
    let state = view.feedback.and_then(|f| f.state);
    if action.is_motion() {
        return match state {
            Some(DriveState::OperationEnabled) => Ok(()),
            Some(s) => Err(refused(
                CommandReason::WrongState,
                format!(
                    "{} needs operation_enabled, the drive is {}",
                    action.name(),
                    s.as_str()
                ),
            )),
            None => Err(refused(
                CommandReason::WrongState,
                "the drive's state is not known (no statusword read yet)",
            )),
        };
    }
    if matches!(action, Action::Enable) {
        if let Some(s) = state.filter(|s| s.is_fault()) {
            return Err(refused(
                CommandReason::WrongState,
                format!("enable from {}: send fault_reset first", s.as_str()),
            ));
        }
    }
    Ok(())
}

/// Rule 7: `max_step` of a move.
fn step(action: &Action, policy: &Policy, view: &DeviceView) -> Result<(), Refused> {
    let Action::Move {
        position, relative, ..
    } = action
    else {
        return Ok(());
    };
    let limit = policy.limits.get("position");
    let present = view.feedback.and_then(|f| f.position);
    if *relative {
        // The target is present + position: its bounds need the present position too.
        let bounded = limit.is_some_and(|l| l.min.is_some() || l.max.is_some());
        if bounded {
            let Some(p) = present else {
                return Err(refused(
                    CommandReason::StaleFeedback,
                    "a relative move needs the present position (none read yet)",
                ));
            };
            limit.map_or(Ok(()), |l| l.check("position", p + position))?;
        }
    }
    let Some(max_step) = limit.and_then(|l| l.max_step) else {
        return Ok(());
    };
    let distance = if *relative {
        position.abs()
    } else {
        let Some(p) = present else {
            return Err(refused(
                CommandReason::StaleFeedback,
                "max_step needs the present position (none read yet)",
            ));
        };
        (position - p).abs()
    };
    if distance > max_step {
        return Err(refused(
            CommandReason::StepTooLarge,
            format!("a step of {distance} > max_step {max_step}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
