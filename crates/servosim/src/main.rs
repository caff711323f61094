//! `servosim`: simulated servo drives on a serial port or a CAN interface, for servogate's
//! tests and demos.
//!
//! `servosim modbus-rtu --port PATH --units 1-6` answers every listed unit on PATH, prints
//! `servosim ready port=PATH units=LIST` once it serves, then takes fault-injection
//! commands on stdin (see `servosim::console`). `servosim canopen --interface vcan0
//! --nodes 1-4` runs CiA 402 nodes on a SocketCAN interface, prints `servosim ready
//! interface=vcan0 nodes=1-4` once the socket is open, and takes the commands of
//! `servosim::canopen::console`. Both run until SIGTERM or SIGINT; the end of stdin does
//! not stop them.
#![forbid(unsafe_code)]

use std::io::{BufRead, IsTerminal, Write};
use std::num::NonZeroU8;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use servosim::canopen::{self, CanOptions, CanSim, ConsoleRequest, NodeDefaults, TpdoMode};
use servosim::{console, serve_rtu, SimOptions, Simulator, Timing, UnitList};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt, SerialStream};

#[derive(Debug, Parser)]
#[command(
    name = "servosim",
    version,
    about = "Simulated servo drives for servogate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer Modbus RTU requests for several units on one serial port.
    ModbusRtu(RtuArgs),
    /// Run CiA 402 servo drives as CANopen nodes on a SocketCAN interface.
    Canopen(CanArgs),
}

#[derive(Debug, clap::Args)]
struct CanArgs {
    /// SocketCAN interface, e.g. vcan0.
    #[arg(long)]
    interface: String,
    /// Node ids: `1-4`, `1,3,5`, `1-3,7`; 1-127.
    #[arg(long)]
    nodes: UnitList,
    /// Heartbeat producer time (object 0x1017), whole ms; `0` for none.
    #[arg(long, value_parser = parse_ms_or_zero, default_value = "100ms")]
    heartbeat: u16,
    /// How TPDOs are sent: `timer` (every --period) or `sync` (on every SYNC).
    #[arg(long, value_enum, default_value_t = TpdoArg::Timer)]
    tpdo: TpdoArg,
    /// TPDO event timer in `timer` mode, whole ms (1ms-65535ms).
    #[arg(long, value_parser = parse_period, default_value = "10ms")]
    period: u16,
    /// A node that sends nothing at all until `alive N` (no boot-up). Repeatable.
    #[arg(long)]
    silent: Vec<u8>,
    /// Start a node in CiA 402 Fault: `NODE:CODE`, e.g. `2:0x2310`. Repeatable.
    #[arg(long, value_parser = parse_fault)]
    fault: Vec<(u8, u16)>,
    /// Start the drives in Switch on disabled instead of Operation enabled.
    #[arg(long)]
    disabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TpdoArg {
    Timer,
    Sync,
}

/// A duration in whole milliseconds that fits a u16 object (0x1017, 0x1800:05).
fn parse_ms(s: &str) -> Result<u16, String> {
    let d = console::parse_duration(s)?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?}: whole milliseconds only"));
    }
    u16::try_from(d.as_millis()).map_err(|_| format!("{s:?} is above 65535ms"))
}

fn parse_ms_or_zero(s: &str) -> Result<u16, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_ms(s)
}

fn parse_period(s: &str) -> Result<u16, String> {
    match parse_ms(s)? {
        0 => Err(format!("{s:?}: the period must be at least 1ms")),
        ms => Ok(ms),
    }
}

#[derive(Debug, clap::Args)]
struct RtuArgs {
    /// Serial port to serve, e.g. one end of a socat pty pair.
    #[arg(long)]
    port: PathBuf,
    /// Unit ids to answer: `1-6`, `1,3,5`, `1-3,7`.
    #[arg(long)]
    units: UnitList,
    /// Baud rate (for a real port, and the wire time of --timing-faithful).
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Charge each transaction its wire time at --baud (a pty has none of its own).
    #[arg(long)]
    timing_faithful: bool,
    /// Drive processing time between request and reply in timing-faithful mode.
    #[arg(long, value_parser = console::parse_duration, default_value = "0s", requires = "timing_faithful")]
    turnaround: Duration,
    /// Delay one unit's replies: `UNIT:DURATION`, e.g. `3:30ms`. Repeatable.
    #[arg(long, value_parser = parse_late)]
    late: Vec<(u8, Duration)>,
    /// A unit that never answers. Repeatable.
    #[arg(long)]
    dead: Vec<u8>,
    /// Fraction (0-1) of replies sent with a corrupted byte, so their CRC fails.
    #[arg(long, value_parser = console::parse_rate, default_value_t = 0.0)]
    crc_noise: f64,
    /// Start a unit in CiA 402 Fault: `UNIT:CODE`, e.g. `2:0x2310`. Repeatable.
    #[arg(long, value_parser = parse_fault)]
    fault: Vec<(u8, u16)>,
    /// Seed for the CRC-noise RNG, for reproducible runs.
    #[arg(long)]
    seed: Option<u64>,
    /// A unit that answers every write with a Modbus exception and applies nothing:
    /// `UNIT:CODE`, e.g. `2:4` (server device failure). Repeatable.
    #[arg(long, value_parser = parse_reject)]
    reject: Vec<(u8, NonZeroU8)>,
    /// A unit that applies writes but never answers them. Repeatable.
    #[arg(long)]
    mute_writes: Vec<u8>,
}

fn parse_late(s: &str) -> Result<(u8, Duration), String> {
    let (unit, dur) = s
        .split_once(':')
        .ok_or("expected UNIT:DURATION, e.g. 3:30ms")?;
    let unit = unit
        .parse()
        .map_err(|_| format!("{unit:?} is not a unit id"))?;
    Ok((unit, console::parse_duration(dur)?))
}

fn parse_fault(s: &str) -> Result<(u8, u16), String> {
    let (unit, code) = s
        .split_once(':')
        .ok_or("expected UNIT:CODE, e.g. 2:0x2310")?;
    let unit = unit
        .parse()
        .map_err(|_| format!("{unit:?} is not a unit id"))?;
    Ok((unit, console::parse_fault_code(code)?))
}

fn parse_reject(s: &str) -> Result<(u8, NonZeroU8), String> {
    let (unit, code) = s.split_once(':').ok_or("expected UNIT:CODE, e.g. 2:4")?;
    let unit = unit
        .parse()
        .map_err(|_| format!("{unit:?} is not a unit id"))?;
    Ok((unit, console::parse_exception_code(code)?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr: stdout carries the ready line and command answers only.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match cli.command {
        Command::ModbusRtu(_) => tokio::runtime::Runtime::new(),
        // One task owns the socket and the simulator, so worker threads have nothing to
        // do; on one thread its timers and the socket's readiness are handled in one place.
        // (Measured in the TCG test VM: SDO round trips the same with either runtime.)
        Command::Canopen(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let result = runtime
        .context("starting the tokio runtime")
        .and_then(|runtime| {
            let result = match cli.command {
                Command::ModbusRtu(args) => runtime.block_on(modbus_rtu(args)),
                Command::Canopen(args) => runtime.block_on(canopen_nodes(args)),
            };
            // A stop signal means stop now: do not wait for the serving task to wind down. (The
            // console thread, blocked on stdin, does not hold the process either.)
            runtime.shutdown_background();
            result
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line with the whole cause chain; no backtrace for a usage error.
            eprintln!("servosim: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn modbus_rtu(args: RtuArgs) -> anyhow::Result<()> {
    let options = SimOptions {
        baud: args.baud,
        timing: if args.timing_faithful {
            Timing::Faithful {
                turnaround: args.turnaround,
            }
        } else {
            Timing::Instant
        },
        seed: args.seed,
        crc_noise: args.crc_noise,
    };
    let sim = Arc::new(Simulator::new(args.units.clone(), options));
    for &unit in &args.dead {
        sim.set_dead(unit, true).context("--dead")?;
    }
    for &(unit, late) in &args.late {
        sim.set_late(unit, Some(late)).context("--late")?;
    }
    for &(unit, code) in &args.fault {
        if code == 0 {
            bail!("--fault {unit}:0: error code 0 means no fault");
        }
        sim.inject_fault(unit, code).context("--fault")?;
    }
    for &(unit, code) in &args.reject {
        sim.set_reject(unit, Some(code)).context("--reject")?;
    }
    for &unit in &args.mute_writes {
        sim.set_mute_writes(unit, true).context("--mute-writes")?;
    }

    // The first open must work: a wrong path is a usage error, not something to retry.
    let port = open_port(&args.port, args.baud)?;
    tokio::spawn(serve_forever(
        port,
        args.port.clone(),
        args.baud,
        Arc::clone(&sim),
    ));

    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "servosim ready port={} units={}",
            args.port.display(),
            args.units
        )?;
        out.flush()?;
    }
    tracing::info!(port = %args.port.display(), units = %args.units, "serving");

    // A plain thread, not tokio's blocking pool: a read blocked on stdin must not keep the
    // runtime from shutting down on a signal.
    let console_sim = Arc::clone(&sim);
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || console_loop(&console_sim))
        .context("starting the console thread")?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM, stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT, stopping"),
    }
    Ok(())
}

async fn canopen_nodes(args: CanArgs) -> anyhow::Result<()> {
    let mut options = CanOptions::new(args.nodes.clone());
    options.defaults = NodeDefaults {
        heartbeat_ms: args.heartbeat,
        tpdo: match args.tpdo {
            TpdoArg::Timer => TpdoMode::Timer,
            TpdoArg::Sync => TpdoMode::Sync,
        },
        period_ms: args.period,
        start_enabled: !args.disabled,
    };
    options.silent = args.silent.clone();
    for &(node, code) in &args.fault {
        if code == 0 {
            bail!("--fault {node}:0: error code 0 means no fault");
        }
    }
    options.faults = args.fault.clone();
    // Checked before the socket opens, so a bad node list is a usage error; the nodes
    // power on (model time 0, boot-up messages) once the socket is there.
    CanSim::new(&options, std::time::Instant::now()).context("--nodes/--silent/--fault")?;

    let socket = socketcan::tokio::CanSocket::open(&args.interface)
        .with_context(|| format!("opening CAN interface {}", args.interface))?;
    let sim = CanSim::new(&options, std::time::Instant::now())?;
    let (commands, requests) = mpsc::channel(16);
    tokio::spawn(canopen::serve_can(socket, sim, requests));

    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "servosim ready interface={} nodes={}",
            args.interface, args.nodes
        )?;
        out.flush()?;
    }
    tracing::info!(interface = %args.interface, nodes = %args.nodes, "running CANopen nodes");

    // A plain thread, as for Modbus: a read blocked on stdin must not hold the runtime.
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || can_console_loop(&commands))
        .context("starting the console thread")?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM, stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT, stopping"),
    }
    Ok(())
}

/// Hands stdin lines to the CAN task (which owns the simulator) and prints its answers,
/// until stdin ends; the nodes keep running after that.
fn can_console_loop(commands: &mpsc::Sender<ConsoleRequest>) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (reply, answer) = oneshot::channel();
        if commands
            .blocking_send(ConsoleRequest { line, reply })
            .is_err()
        {
            break;
        }
        // The task answers every request; an error means it is gone (shutting down).
        let Ok(Some(answer)) = answer.blocking_recv() else {
            continue;
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout only loses answers nobody reads; keep serving.
        let _ = writeln!(out, "{answer}").and_then(|()| out.flush());
    }
    tracing::debug!("stdin closed; still running");
}

fn open_port(path: &Path, baud: u32) -> anyhow::Result<SerialStream> {
    let port = tokio_serial::new(path.to_string_lossy(), baud)
        .open_native_async()
        .with_context(|| format!("opening {}", path.display()))?;
    // Bytes queued before we opened belong to nobody's current request.
    port.clear(ClearBuffer::All)
        .with_context(|| format!("clearing {}", path.display()))?;
    Ok(port)
}

/// Serves until the process stops: when the port fails or closes, reopens it with a
/// capped backoff (socat may be restarting the pty).
async fn serve_forever(port: SerialStream, path: PathBuf, baud: u32, sim: Arc<Simulator>) {
    const BACKOFF_MIN: Duration = Duration::from_millis(50);
    const BACKOFF_MAX: Duration = Duration::from_secs(2);
    let mut port = Some(port);
    let mut backoff = BACKOFF_MIN;
    loop {
        if let Some(p) = port.take() {
            match serve_rtu(p, Arc::clone(&sim)).await {
                Ok(()) => tracing::warn!(port = %path.display(), "port closed; reopening"),
                Err(err) => {
                    tracing::warn!(port = %path.display(), error = %err, "port failed; reopening")
                }
            }
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        match open_port(&path, baud) {
            Ok(p) => port = Some(p),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?backoff, "cannot reopen port");
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Answers stdin commands until stdin ends; the simulator keeps serving after that.
fn console_loop(sim: &Simulator) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(answer) = console::execute(sim, &line) {
            let mut out = std::io::stdout().lock();
            // A closed stdout only loses answers nobody reads; keep serving.
            let _ = writeln!(out, "{answer}").and_then(|()| out.flush());
        }
    }
    tracing::debug!("stdin closed; still serving");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_command_line_parses() {
        let cli = Cli::try_parse_from([
            "servosim",
            "modbus-rtu",
            "--port",
            "/tmp/A",
            "--units",
            "1-3,7",
            "--timing-faithful",
            "--turnaround",
            "100us",
            "--late",
            "3:30ms",
            "--late",
            "2:1s",
            "--dead",
            "7",
            "--crc-noise",
            "0.05",
            "--fault",
            "2:0x2310",
            "--seed",
            "9",
            "--reject",
            "1:4",
            "--reject",
            "3:0x0B",
            "--mute-writes",
            "2",
        ])
        .unwrap();
        let Command::ModbusRtu(a) = cli.command else {
            panic!("not modbus-rtu: {:?}", cli.command);
        };
        assert_eq!(a.units.to_string(), "1-3,7");
        assert_eq!(a.turnaround, Duration::from_micros(100));
        assert_eq!(
            a.late,
            vec![(3, Duration::from_millis(30)), (2, Duration::from_secs(1))]
        );
        assert_eq!(
            (a.dead, a.fault, a.seed),
            (vec![7], vec![(2, 0x2310)], Some(9))
        );
        assert!(a.timing_faithful && a.crc_noise == 0.05);
        let code = |c| NonZeroU8::new(c).unwrap();
        assert_eq!(a.reject, vec![(1, code(4)), (3, code(11))]);
        assert_eq!(a.mute_writes, vec![2]);
    }

    #[test]
    fn the_documented_canopen_command_line_parses_with_its_defaults() {
        let cli = Cli::try_parse_from([
            "servosim",
            "canopen",
            "--interface",
            "vcan0",
            "--nodes",
            "1-4",
        ])
        .unwrap();
        let Command::Canopen(a) = cli.command else {
            panic!("not canopen: {:?}", cli.command);
        };
        assert_eq!(
            (a.interface.as_str(), a.nodes.to_string()),
            ("vcan0", "1-4".into())
        );
        assert_eq!((a.heartbeat, a.tpdo, a.period), (100, TpdoArg::Timer, 10));
        assert!(a.silent.is_empty() && a.fault.is_empty() && !a.disabled);

        let cli = Cli::try_parse_from([
            "servosim",
            "canopen",
            "--interface",
            "can1",
            "--nodes",
            "1,3,5",
            "--heartbeat",
            "0",
            "--tpdo",
            "sync",
            "--period",
            "20ms",
            "--silent",
            "3",
            "--silent",
            "5",
            "--fault",
            "1:0x2310",
            "--disabled",
        ])
        .unwrap();
        let Command::Canopen(a) = cli.command else {
            panic!("not canopen: {:?}", cli.command);
        };
        assert_eq!((a.heartbeat, a.tpdo, a.period), (0, TpdoArg::Sync, 20));
        assert_eq!(
            (a.silent, a.fault, a.disabled),
            (vec![3, 5], vec![(1, 0x2310)], true)
        );
    }

    #[test]
    fn bad_canopen_arguments_are_refused() {
        for extra in [
            &["--heartbeat", "1.5ms"][..],
            &["--heartbeat", "70s"],
            &["--period", "0"],
            &["--period", "0ms"],
            &["--tpdo", "rtr"],
            &["--fault", "2"],
        ] {
            let mut argv = vec![
                "servosim",
                "canopen",
                "--interface",
                "vcan0",
                "--nodes",
                "1-4",
            ];
            argv.extend_from_slice(extra);
            assert!(Cli::try_parse_from(&argv).is_err(), "{extra:?}");
        }
        assert!(Cli::try_parse_from(["servosim", "canopen", "--nodes", "1"]).is_err());
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            &["servosim", "modbus-rtu", "--port", "A", "--units", "0-3"][..],
            &[
                "servosim",
                "modbus-rtu",
                "--port",
                "A",
                "--units",
                "1",
                "--late",
                "1",
            ],
            &[
                "servosim",
                "modbus-rtu",
                "--port",
                "A",
                "--units",
                "1",
                "--crc-noise",
                "1.5",
            ],
            &[
                "servosim",
                "modbus-rtu",
                "--port",
                "A",
                "--units",
                "1",
                "--turnaround",
                "1ms",
            ],
            &[
                "servosim",
                "modbus-rtu",
                "--port",
                "A",
                "--units",
                "1",
                "--reject",
                "1:0",
            ],
            &[
                "servosim",
                "modbus-rtu",
                "--port",
                "A",
                "--units",
                "1",
                "--reject",
                "1",
            ],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
