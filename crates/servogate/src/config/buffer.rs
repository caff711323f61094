//! `[buffer]`: the delivery ring's capacity and what it does when full.

use std::num::NonZeroUsize;

use servogate_core::OnFull;

use super::model::Buffer;
use super::raw::RawBuffer;
use super::source::Source;
use super::ConfigError;

// `unwrap` in a const is evaluated by the compiler: 100000 is not zero.
const DEFAULT_CAPACITY: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();
const MAX_CAPACITY: usize = 10_000_000;
const DEFAULT_ON_FULL: OnFull = OnFull::DropOldest;

impl Source<'_> {
    /// `[buffer]`.
    pub(super) fn buffer(&self, b: RawBuffer) -> Result<Buffer, ConfigError> {
        let capacity = match &b.capacity {
            Some(c) => match NonZeroUsize::new(*c.get_ref()) {
                Some(n) if n.get() <= MAX_CAPACITY => n,
                _ => return Err(self.at(c, "buffer.capacity", "must be 1 to 10000000 events")),
            },
            None => DEFAULT_CAPACITY,
        };
        let on_full = match &b.on_full {
            None => DEFAULT_ON_FULL,
            Some(v) => match v.get_ref().as_str() {
                "drop_oldest" => OnFull::DropOldest,
                "drop_newest" => OnFull::DropNewest,
                other => {
                    return Err(self.at(
                        v,
                        "buffer.on_full",
                        format!(
                        "unknown policy \"{other}\"; expected \"drop_oldest\" or \"drop_newest\""
                    ),
                    ))
                }
            },
        };
        Ok(Buffer { capacity, on_full })
    }
}
