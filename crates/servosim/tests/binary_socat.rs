//! The `servosim` binary on one end of a socat pty pair, as the end-to-end tests and the
//! README use it: ready line, stdin commands, surviving the end of stdin, SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use servosim::model::{self, addr, DriveState};
use servosim::words;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::timeout;
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;
use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt};

const SILENT: Duration = Duration::from_millis(150);

/// A scratch directory for the pty links, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("servosim-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts socat and waits until it says the pair is up (it prints "starting data
/// transfer loop" after creating both links).
async fn socat_pair(a: &Path, b: &Path) -> Option<Child> {
    let spawned = Command::new("socat")
        .args(["-d", "-d"])
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            eprintln!("SKIPPED: this test needs socat on PATH ({err}); install socat to run it");
            return None;
        }
    };
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    timeout(STEP, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("starting data transfer loop") {
                return;
            }
        }
        panic!("socat exited before the pty pair was up");
    })
    .await
    .expect("socat up in time");
    // Keep draining socat's stderr so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some(child)
}

async fn read_holding(
    ctx: &mut Context,
    unit: u8,
    address: u16,
    quantity: u16,
) -> Option<Vec<u16>> {
    ctx.set_slave(Slave(unit));
    let regs = timeout(SILENT * 4, ctx.read_holding_registers(address, quantity))
        .await
        .ok()?;
    Some(regs.expect("a valid frame").expect("no exception"))
}

#[tokio::test]
async fn the_binary_serves_takes_commands_and_outlives_its_stdin() {
    let scratch = Scratch::new();
    let (a, b) = (scratch.0.join("A"), scratch.0.join("B"));
    let Some(_socat) = socat_pair(&a, &b).await else {
        return;
    };

    // Given servosim on A with unit 3 dead and unit 2 faulted
    let mut sim = servosim()
        .args(["modbus-rtu", "--port"])
        .arg(&a)
        .args([
            "--units", "1-3", "--dead", "3", "--fault", "2:0x2310", "--seed", "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("servosim starts");
    let mut stdin = sim.stdin.take().unwrap();
    let mut out = BufReader::new(sim.stdout.take().unwrap()).lines();
    assert_eq!(
        next_line(&mut out).await,
        format!("servosim ready port={} units=1-3", a.display())
    );

    // When the gateway reads through B
    let port = tokio_serial::new(b.to_string_lossy(), 115_200)
        .open_native_async()
        .unwrap();
    port.clear(ClearBuffer::All).unwrap();
    let mut ctx = rtu::attach_slave(port, Slave(1));

    // Then unit 1 shows the model, unit 2 its fault, unit 3 nothing
    let regs = read_holding(&mut ctx, 1, 0, 12)
        .await
        .expect("unit 1 answers");
    let t = words::u32_from_low_first([regs[10], regs[11]]);
    assert_eq!(regs, model::registers(1, t, &DriveState::running(t))[..12]);
    let status = read_holding(&mut ctx, 2, addr::STATUSWORD, 2)
        .await
        .expect("unit 2 answers");
    assert_eq!(status, [model::STATUSWORD_FAULT, 0x2310]);
    assert_eq!(read_holding(&mut ctx, 3, 0, 1).await, None);

    // And stdin commands change that, each with one answer line
    stdin
        .write_all(b"alive 3\nclear 2\nbogus\nstats\n")
        .await
        .unwrap();
    assert_eq!(next_line(&mut out).await, "ok alive 3");
    assert_eq!(next_line(&mut out).await, "ok clear 2");
    assert!(next_line(&mut out)
        .await
        .starts_with("error unknown command"));
    let stats = next_line(&mut out).await;
    assert!(stats.starts_with("ok stats corrupted=0 "), "{stats}");
    assert!(
        stats.contains("served=1:1,2:1,3:0") && stats.contains("ignored=1:0,2:0,3:1"),
        "{stats}"
    );
    assert!(read_holding(&mut ctx, 3, 0, 1).await.is_some());

    // Closing stdin does not stop it
    drop(stdin);
    let status = read_holding(&mut ctx, 2, addr::STATUSWORD, 2)
        .await
        .expect("still serving");
    assert_eq!(status, [model::STATUSWORD_OPERATION_ENABLED, 0]);

    // SIGTERM does
    sigterm_ends(sim).await;
}
