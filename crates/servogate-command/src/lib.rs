//! The command path's decisions, sans-IO (DESIGN.md section 7).
//!
//! - [`parse`]: a command payload from the broker into a [`Command`] (or a refusal with
//!   its reason): size, JSON, id, action, parameters, deadline fields, the signature.
//! - [`policy`]: the safety policy of one device, a pure function of the command, what
//!   the gateway last saw of the device and the time.
//! - [`dedup`]: an id is executed at most once per device.
//! - [`sign`]: HMAC-SHA256 of signed commands.
//! - [`queue`]: the command jobs of one bus, one per device, and the stop rule.
//! - [`order`]: a checked command as a bus task receives it, and its outcome.
//!
//! This crate sends nothing and reads no clock: the daemon passes the time in and hands
//! what passes to the bus tasks, whose protocol crates execute it.
#![forbid(unsafe_code)]

pub mod dedup;
pub mod order;
pub mod parse;
pub mod policy;
pub mod queue;
pub mod sign;

pub use dedup::{IdBook, Seen};
pub use order::{GroupTag, Order, Outcome};
pub use parse::{
    parse_command, parse_group, peek_id, Action, Command, CommandId, GroupCommand, Refusal, Timing,
    Wait,
};
pub use policy::{
    check, Context, DeviceView, Feedback, Limit, Policy, RateLimiter, Refused, Rules,
};
pub use queue::{nothing_sent, JobQueue, QueuedJob};
pub use sign::SigningKey;
