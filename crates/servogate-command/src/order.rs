//! What the daemon hands a bus task, and what comes back.
//!
//! An [`Order`] has passed every check of the policy: the bus executes it unless its
//! deadline passes before its first frame reaches the wire. Exactly one [`Outcome`]
//! comes back per order.

use std::sync::Arc;
use std::time::Instant;

use servogate_core::{CommandReason, CommandStatus};

use crate::parse::{Action, CommandId};

/// A checked command for one device of a bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub device: Arc<str>,
    pub id: CommandId,
    pub action: Action,
    /// Its first frame must be on the wire before this (monotonic clock).
    pub deadline: Instant,
    /// The group command it is part of, when it is one.
    pub group: Option<GroupTag>,
}

/// Marks the orders of one group command that go to one bus: a bus that can start its
/// drives together (CANopen: one SYNC) holds them until all `members` have arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupTag {
    /// Unique per group command for the life of the daemon.
    pub key: u64,
    /// How many orders of the group this bus receives (at least 1).
    pub members: usize,
}

/// How an order ended on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: CommandStatus,
    pub reason: Option<CommandReason>,
    pub message: String,
}

impl Outcome {
    pub fn done() -> Self {
        Self {
            status: CommandStatus::Done,
            reason: None,
            message: String::new(),
        }
    }

    pub fn done_with(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::done()
        }
    }

    fn with(status: CommandStatus, reason: CommandReason, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: Some(reason),
            message: message.into(),
        }
    }

    /// Never sent.
    pub fn rejected(reason: CommandReason, message: impl Into<String>) -> Self {
        Self::with(CommandStatus::Rejected, reason, message)
    }

    /// Its deadline passed before its first frame went out: never sent.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::with(CommandStatus::Expired, CommandReason::Expired, message)
    }

    /// The drive refused it.
    pub fn failed(reason: CommandReason, message: impl Into<String>) -> Self {
        Self::with(CommandStatus::Failed, reason, message)
    }

    /// Sent, never confirmed: not retried.
    pub fn unknown(message: impl Into<String>) -> Self {
        Self::with(CommandStatus::Unknown, CommandReason::Timeout, message)
    }
}
