//! Command results (DESIGN.md section 7): the one final answer every command gets.
//!
//! A result is an event like any other: numbered on the device's `cmd_result` stream, kept
//! in the ring until the broker acknowledged it. The words here are the contract's: a
//! consumer matches on `status` and `reason`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Where a command ended (or, for `Accepted`, where it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandStatus {
    /// Interim: checked and handed to the bus.
    Accepted,
    /// The drive confirmed it (write echo, SDO download confirmed, set-point acknowledged,
    /// target reached, state reached).
    Done,
    /// Refused before anything was sent.
    Rejected,
    /// Its deadline passed before its first frame reached the wire: never sent.
    Expired,
    /// The drive refused it (exception code, SDO abort, a state transition that did not
    /// happen in time).
    Failed,
    /// Sent, but no confirmation came in time: the outcome is unknown, and the gateway
    /// never retries it.
    Unknown,
}

impl CommandStatus {
    pub const ALL: [CommandStatus; 6] = [
        Self::Accepted,
        Self::Done,
        Self::Rejected,
        Self::Expired,
        Self::Failed,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Done => "done",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
        }
    }

    /// True for every status but the interim `accepted`.
    pub fn is_final(self) -> bool {
        self != Self::Accepted
    }
}

/// Why a command was not `done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandReason {
    BadRequest,
    NotAllowed,
    UnknownField,
    OutOfRange,
    StepTooLarge,
    RateLimited,
    NoDeadline,
    ClockSkew,
    Expired,
    Retained,
    IdReused,
    BadSignature,
    DeviceOffline,
    StaleFeedback,
    WrongState,
    BusDown,
    Timeout,
    Exception,
    SdoAbort,
    GroupRejected,
}

impl CommandReason {
    pub const ALL: [CommandReason; 20] = [
        Self::BadRequest,
        Self::NotAllowed,
        Self::UnknownField,
        Self::OutOfRange,
        Self::StepTooLarge,
        Self::RateLimited,
        Self::NoDeadline,
        Self::ClockSkew,
        Self::Expired,
        Self::Retained,
        Self::IdReused,
        Self::BadSignature,
        Self::DeviceOffline,
        Self::StaleFeedback,
        Self::WrongState,
        Self::BusDown,
        Self::Timeout,
        Self::Exception,
        Self::SdoAbort,
        Self::GroupRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::NotAllowed => "not_allowed",
            Self::UnknownField => "unknown_field",
            Self::OutOfRange => "out_of_range",
            Self::StepTooLarge => "step_too_large",
            Self::RateLimited => "rate_limited",
            Self::NoDeadline => "no_deadline",
            Self::ClockSkew => "clock_skew",
            Self::Expired => "expired",
            Self::Retained => "retained",
            Self::IdReused => "id_reused",
            Self::BadSignature => "bad_signature",
            Self::DeviceOffline => "device_offline",
            Self::StaleFeedback => "stale_feedback",
            Self::WrongState => "wrong_state",
            Self::BusDown => "bus_down",
            Self::Timeout => "timeout",
            Self::Exception => "exception",
            Self::SdoAbort => "sdo_abort",
            Self::GroupRejected => "group_rejected",
        }
    }
}

/// The result of one command, for the device's `cmd/result` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandReport {
    /// The command's id; `None` when the payload had no valid one.
    pub id: Option<Arc<str>>,
    /// The action's name when the payload named a known one.
    pub action: Option<&'static str>,
    pub status: CommandStatus,
    pub reason: Option<CommandReason>,
    /// The reason in words (empty for `done`).
    pub message: String,
    /// When the gateway received the command (UTC wall clock).
    pub received: SystemTime,
    /// Receipt to this result.
    pub latency: Duration,
    /// A repeat of an id already answered: this is the stored result again.
    pub duplicate: bool,
    /// A group command's result lists every device's (empty for a one-device command).
    pub group: Vec<MemberResult>,
    /// Where an MQTT 5 command asked for its answer too (its Response Topic).
    pub reply: Option<Arc<ReplyTo>>,
}

/// An MQTT 5 command's Response Topic and Correlation Data: its result is published there
/// as well, with the same correlation data, so a requester can match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
}

impl CommandReport {
    /// True for the result of a group command (`{prefix}/cmd/result`).
    pub fn is_group(&self) -> bool {
        !self.group.is_empty()
    }
}

/// One device's part of a group command's result.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberResult {
    pub device: Arc<str>,
    pub status: CommandStatus,
    pub reason: Option<CommandReason>,
    pub message: String,
}
