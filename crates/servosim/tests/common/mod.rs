//! Helpers shared by servosim's integration tests (each test file is its own crate and
//! uses a part of them).
#![allow(dead_code)]

use std::time::Duration;

use servosim::model::addr;
use servosim::words;
use tokio::io::{BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;

/// Bound on one reply to an in-process simulator.
pub const REPLY: Duration = Duration::from_secs(2);
/// Bound on each step of a test of the binary (a process start under emulation is slow).
pub const STEP: Duration = Duration::from_secs(5);

/// The servosim binary; under emulation (the arm64 run of scripts/test.sh) through the
/// runner scripts/emu-run.sh names in `SERVOGATE_RUNNER`, as cargo runs the test itself.
pub fn servosim() -> Command {
    let bin = env!("CARGO_BIN_EXE_servosim");
    let runner = std::env::var("SERVOGATE_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

/// The binary's next line of output, within [`STEP`].
pub async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    timeout(STEP, lines.next_line())
        .await
        .expect("servosim answered in time")
        .unwrap()
        .expect("servosim still running")
}

/// A read of holding registers that must be answered within [`REPLY`] with a valid frame.
pub async fn read_holding(
    ctx: &mut Context,
    address: u16,
    quantity: u16,
) -> Result<Vec<u16>, ExceptionCode> {
    timeout(REPLY, ctx.read_holding_registers(address, quantity))
        .await
        .expect("reply within the timeout")
        .expect("a valid frame")
}

/// Model time of a snapshot that includes registers 0x000A-0x000B.
pub fn model_time(regs: &[u16]) -> u32 {
    let at = usize::from(addr::MODEL_TIME);
    words::u32_from_low_first([regs[at], regs[at + 1]])
}

/// SIGTERM ends the binary, within [`STEP`] and with status 0.
pub async fn sigterm_ends(mut child: Child) {
    let pid = child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let exit = timeout(STEP, child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
