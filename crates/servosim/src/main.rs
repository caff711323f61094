//! `servosim`: simulated servo drives on a serial port or a CAN interface, for servogate's
//! tests and demos.
//!
//! `servosim modbus-rtu --port PATH --units 1-6` answers every listed unit on PATH, prints
//! `servosim ready port=PATH units=LIST` once it serves, then takes fault-injection
//! commands on stdin (see `servosim::console`). `servosim modbus-tcp --listen ADDR
//! --units 1-6` answers them as Modbus TCP units to any number of clients, and `servosim
//! modbus-rtu-tcp --listen ADDR --units 1-6` as RTU units behind a serial device server
//! (RTU frames over TCP, the latest client only); both print `servosim ready
//! listen=IP:PORT units=LIST` once listening (the port bound, also for port 0) and take
//! the same commands (`crc` excepted on Modbus TCP). `servosim canopen --interface vcan0
//! --nodes 1-4` runs CiA 402 nodes on a SocketCAN interface, prints `servosim ready
//! interface=vcan0 nodes=1-4` once the socket is open, and takes the commands of
//! `servosim::canopen::console`. All run until SIGTERM or SIGINT; the end of stdin does
//! not stop them.
#![forbid(unsafe_code)]

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::num::NonZeroU8;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use servosim::canopen::{self, CanOptions, CanSim, ConsoleRequest, NodeDefaults, TpdoMode};
use servosim::{
    console, serve_rtu, serve_rtu_tcp, serve_tcp, SimOptions, Simulator, Timing, UnitList,
};
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
    /// Answer Modbus TCP requests for several units, to any number of clients.
    ModbusTcp(TcpArgs),
    /// Answer Modbus RTU frames over TCP for several units, as a serial device server
    /// (one client at a time: a new connection drops the older one).
    ModbusRtuTcp(RtuTcpArgs),
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
    #[command(flatten)]
    rtu: RtuSimArgs,
}

#[derive(Debug, clap::Args)]
struct RtuTcpArgs {
    /// Address to listen on, e.g. 127.0.0.1:4001; port 0 picks a free one.
    #[arg(long)]
    listen: SocketAddr,
    #[command(flatten)]
    rtu: RtuSimArgs,
}

/// The simulator of `modbus-rtu` and `modbus-rtu-tcp`: RTU units on a line.
#[derive(Debug, clap::Args)]
struct RtuSimArgs {
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
    /// Fraction (0-1) of replies sent with a corrupted byte, so their CRC fails.
    #[arg(long, value_parser = console::parse_rate, default_value_t = 0.0)]
    crc_noise: f64,
    /// Seed for the CRC-noise RNG, for reproducible runs.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    faults: FaultArgs,
}

#[derive(Debug, clap::Args)]
struct TcpArgs {
    /// Address to listen on, e.g. 127.0.0.1:1502; port 0 picks a free one.
    #[arg(long)]
    listen: SocketAddr,
    /// Unit ids to answer: `1-6`, `1,3,5`, `1-3,7`.
    #[arg(long)]
    units: UnitList,
    /// Drive processing time between request and reply.
    #[arg(long, value_parser = console::parse_duration, default_value = "0s")]
    turnaround: Duration,
    /// Seed of the simulator's RNG. Nothing is random over Modbus TCP (no CRC noise);
    /// taken so that a command line carries over from modbus-rtu.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    faults: FaultArgs,
}

/// Per-unit fault injection at start, on any Modbus transport.
#[derive(Debug, clap::Args)]
struct FaultArgs {
    /// Delay one unit's replies: `UNIT:DURATION`, e.g. `3:30ms`. Repeatable.
    #[arg(long, value_parser = parse_late)]
    late: Vec<(u8, Duration)>,
    /// A unit that never answers. Repeatable.
    #[arg(long)]
    dead: Vec<u8>,
    /// Start a unit in CiA 402 Fault: `UNIT:CODE`, e.g. `2:0x2310`. Repeatable.
    #[arg(long, value_parser = parse_fault)]
    fault: Vec<(u8, u16)>,
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
        Command::ModbusRtu(_) | Command::ModbusTcp(_) | Command::ModbusRtuTcp(_) => {
            tokio::runtime::Runtime::new()
        }
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
                Command::ModbusTcp(args) => runtime.block_on(modbus_tcp(args)),
                Command::ModbusRtuTcp(args) => runtime.block_on(modbus_rtu_tcp(args)),
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

impl RtuSimArgs {
    fn options(&self) -> SimOptions {
        SimOptions {
            baud: self.baud,
            timing: if self.timing_faithful {
                Timing::Faithful {
                    turnaround: self.turnaround,
                }
            } else {
                Timing::Instant
            },
            seed: self.seed,
            crc_noise: self.crc_noise,
        }
    }
}

/// The simulator for `units`, with the faults of the command line injected.
fn simulator(
    units: &UnitList,
    options: SimOptions,
    faults: &FaultArgs,
) -> anyhow::Result<Arc<Simulator>> {
    let sim = Arc::new(Simulator::new(units.clone(), options));
    for &unit in &faults.dead {
        sim.set_dead(unit, true).context("--dead")?;
    }
    for &(unit, late) in &faults.late {
        sim.set_late(unit, Some(late)).context("--late")?;
    }
    for &(unit, code) in &faults.fault {
        if code == 0 {
            bail!("--fault {unit}:0: error code 0 means no fault");
        }
        sim.inject_fault(unit, code).context("--fault")?;
    }
    for &(unit, code) in &faults.reject {
        sim.set_reject(unit, Some(code)).context("--reject")?;
    }
    for &unit in &faults.mute_writes {
        sim.set_mute_writes(unit, true).context("--mute-writes")?;
    }
    Ok(sim)
}

async fn modbus_rtu(args: RtuArgs) -> anyhow::Result<()> {
    let units = &args.rtu.units;
    let sim = simulator(units, args.rtu.options(), &args.rtu.faults)?;

    // The first open must work: a wrong path is a usage error, not something to retry.
    let port = open_port(&args.port, args.rtu.baud)?;
    tokio::spawn(serve_forever(
        port,
        args.port.clone(),
        args.rtu.baud,
        Arc::clone(&sim),
    ));

    ready(&format!("port={} units={units}", args.port.display()))?;
    tracing::info!(port = %args.port.display(), %units, "serving");
    run_console(sim, console::execute).await
}

async fn modbus_tcp(args: TcpArgs) -> anyhow::Result<()> {
    let options = SimOptions {
        timing: if args.turnaround.is_zero() {
            Timing::Instant
        } else {
            Timing::Network {
                turnaround: args.turnaround,
            }
        },
        seed: args.seed,
        crc_noise: 0.0,
        ..SimOptions::default()
    };
    let sim = simulator(&args.units, options, &args.faults)?;
    let listener = listen(args.listen).await?;
    let local = listener.local_addr().context("the listening address")?;
    tokio::spawn(serve_tcp(listener, Arc::clone(&sim)));

    ready(&format!("listen={local} units={}", args.units))?;
    tracing::info!(listen = %local, units = %args.units, "serving Modbus TCP");
    run_console(sim, console::execute_tcp).await
}

async fn modbus_rtu_tcp(args: RtuTcpArgs) -> anyhow::Result<()> {
    let units = &args.rtu.units;
    let sim = simulator(units, args.rtu.options(), &args.rtu.faults)?;
    let listener = listen(args.listen).await?;
    let local = listener.local_addr().context("the listening address")?;
    tokio::spawn(serve_rtu_tcp(listener, Arc::clone(&sim)));

    ready(&format!("listen={local} units={units}"))?;
    tracing::info!(listen = %local, %units, "serving Modbus RTU over TCP");
    run_console(sim, console::execute).await
}

async fn listen(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))
}

/// Prints the one `servosim ready ...` line and flushes it.
fn ready(what: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "servosim ready {what}")?;
    out.flush()?;
    Ok(())
}

/// Runs the stdin console (`execute` answers each line) until SIGTERM or SIGINT.
async fn run_console(
    sim: Arc<Simulator>,
    execute: fn(&Simulator, &str) -> Option<String>,
) -> anyhow::Result<()> {
    // A plain thread, not tokio's blocking pool: a read blocked on stdin must not keep the
    // runtime from shutting down on a signal.
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || console_loop(&sim, execute))
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
fn console_loop(sim: &Simulator, execute: fn(&Simulator, &str) -> Option<String>) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if let Some(answer) = execute(sim, &line) {
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
        let Command::ModbusRtu(RtuArgs { port, rtu: a }) = cli.command else {
            panic!("not modbus-rtu: {:?}", cli.command);
        };
        assert_eq!(port, PathBuf::from("/tmp/A"));
        assert_eq!(a.units.to_string(), "1-3,7");
        assert_eq!(a.turnaround, Duration::from_micros(100));
        assert_eq!(
            a.faults.late,
            vec![(3, Duration::from_millis(30)), (2, Duration::from_secs(1))]
        );
        assert_eq!(
            (a.faults.dead, a.faults.fault, a.seed),
            (vec![7], vec![(2, 0x2310)], Some(9))
        );
        assert!(a.timing_faithful && a.crc_noise == 0.05);
        let code = |c| NonZeroU8::new(c).unwrap();
        assert_eq!(a.faults.reject, vec![(1, code(4)), (3, code(11))]);
        assert_eq!(a.faults.mute_writes, vec![2]);
    }

    #[test]
    fn the_documented_modbus_tcp_command_line_parses() {
        let cli = Cli::try_parse_from([
            "servosim",
            "modbus-tcp",
            "--listen",
            "127.0.0.1:0",
            "--units",
            "1-3",
            "--turnaround",
            "300us",
            "--late",
            "3:200ms",
            "--dead",
            "2",
            "--fault",
            "1:0x2310",
            "--seed",
            "4",
            "--reject",
            "1:4",
            "--mute-writes",
            "3",
        ])
        .unwrap();
        let Command::ModbusTcp(a) = cli.command else {
            panic!("not modbus-tcp: {:?}", cli.command);
        };
        assert_eq!(a.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            (a.units.to_string(), a.turnaround, a.seed),
            ("1-3".into(), Duration::from_micros(300), Some(4))
        );
        assert_eq!(a.faults.late, vec![(3, Duration::from_millis(200))]);
        assert_eq!(
            (a.faults.dead, a.faults.fault, a.faults.mute_writes),
            (vec![2], vec![(1, 0x2310)], vec![3])
        );
        assert_eq!(a.faults.reject, vec![(1, NonZeroU8::new(4).unwrap())]);
    }

    #[test]
    fn the_documented_rtu_over_tcp_command_line_takes_every_rtu_option() {
        let cli = Cli::try_parse_from([
            "servosim",
            "modbus-rtu-tcp",
            "--listen",
            "[::1]:4001",
            "--units",
            "1-2",
            "--baud",
            "19200",
            "--timing-faithful",
            "--turnaround",
            "1ms",
            "--crc-noise",
            "0.1",
            "--seed",
            "5",
            "--late",
            "2:30ms",
            "--dead",
            "1",
        ])
        .unwrap();
        let Command::ModbusRtuTcp(RtuTcpArgs { listen, rtu: a }) = cli.command else {
            panic!("not modbus-rtu-tcp: {:?}", cli.command);
        };
        assert_eq!(listen, "[::1]:4001".parse().unwrap());
        assert_eq!(
            a.options(),
            SimOptions {
                baud: 19_200,
                timing: Timing::Faithful {
                    turnaround: Duration::from_millis(1)
                },
                seed: Some(5),
                crc_noise: 0.1,
            }
        );
        assert_eq!(
            (a.faults.late, a.faults.dead),
            (vec![(2, Duration::from_millis(30))], vec![1])
        );
    }

    #[test]
    fn modbus_tcp_refuses_the_serial_line_options() {
        for extra in [
            &["--crc-noise", "0.1"][..],
            &["--baud", "9600"],
            &["--timing-faithful"],
            &["--port", "/tmp/A"],
            &["--turnaround", "soon"],
        ] {
            let mut argv = vec![
                "servosim",
                "modbus-tcp",
                "--listen",
                "127.0.0.1:0",
                "--units",
                "1",
            ];
            argv.extend_from_slice(extra);
            assert!(Cli::try_parse_from(&argv).is_err(), "{extra:?}");
        }
        for bad_listen in ["localhost", "127.0.0.1", "1502"] {
            let argv = [
                "servosim",
                "modbus-tcp",
                "--listen",
                bad_listen,
                "--units",
                "1",
            ];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad_listen}");
        }
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
