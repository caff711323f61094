//! The event log on disk (DESIGN.md section 9): append-only segment files of records,
//! each with its length and a CRC-32C, made durable in groups (one fsync for many
//! records), recovered at start-up by cutting a torn or corrupt end, bounded by size and
//! age, and read back in order from any index.
//!
//! The records are opaque bytes here; the daemon decides what an event looks like in one.
//! The log does its IO through the [`Dir`] trait, so the tests can run it on a model file
//! system that loses what was not synced when it "crashes".
//!
//! - [`record`]: the on-disk format of a record and a reader of one segment.
//! - [`log`]: [`Log`]: open (recovery), append, commit, retain.
//! - [`reader`]: [`Reader`]: records from an index, gaps said.
//! - [`cursor`]: [`Cursor`]: the index below which the broker acknowledged everything.
//! - [`dir`]: [`Dir`] and [`FsDir`], the real directory.
#![forbid(unsafe_code)]

pub mod cursor;
pub mod dir;
pub mod log;
pub mod reader;
pub mod record;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use cursor::Cursor;
pub use dir::{Dir, FsDir, LogFile};
pub use log::{Log, LogError, LogStats, Options, Recovery, Removed, SyncMode};
pub use reader::{Entry, Reader};
pub use record::Record;
