//! The config the unit tests start from (one RTU bus, one device, one profile), and the
//! helpers that parse a variant of it.

use std::path::Path;

use super::{parse, Config};

pub(super) const GOOD: &str = r#"[gateway]
id = "cell-7"

[profiles.ax]
position = { address = 0x0100, type = "i32", scale = 0.001, unit = "mm" }
dc_bus   = { address = 0x0200, type = "u32", word_order = "low_first", kind = "input" }

[[buses]]
name = "rs485-a"
protocol = "modbus-rtu"
port = "/dev/ttyUSB0"
baud = 115200

[[devices]]
name = "axis-1"
bus = "rs485-a"
unit = 1
profile = "ax"
poll = "10ms"
"#;

pub(super) fn good() -> Config {
    parse(GOOD, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn err(text: &str) -> String {
    parse(text, Path::new("t.toml")).unwrap_err().to_string()
}

/// The 1-based line of the first line of `text` containing `needle`.
pub(super) fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}
