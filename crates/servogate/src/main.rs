//! `servogate`: the edge gateway daemon (DESIGN.md section 6).
//!
//! - `servogate run --config FILE`: the daemon.
//! - `servogate check --config FILE`: validate and print a summary; exit 64 when bad.
//! - `servogate demo`: the whole pipeline on six simulated axes, no hardware, no broker.
//! - `servogate cmd --config FILE DEVICE ACTION ...`: one command, its result.
//! - `servogate log --config FILE [filters]`: the event log, offline (the flight recorder).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use servogate::{app, cmd, config, demo, flight, logging, Usage};

/// Exit status for a bad config or command line (sysexits.h EX_USAGE).
const EX_USAGE: u8 = 64;
/// Exit status of `cmd` when the command's result is not `done`.
const EX_FAILED: u8 = 1;
/// Exit status for a failure at run time (sysexits.h EX_SOFTWARE).
const EX_SOFTWARE: u8 = 70;

#[derive(Debug, Parser)]
#[command(
    name = "servogate",
    version,
    about = "Edge gateway: servo drives on Modbus RTU and CANopen to MQTT, and commands back"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print what it sets up.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the whole pipeline on simulated servo axes, with live values on the terminal.
    Demo(demo::DemoArgs),
    /// Send one command to a device, wait for its result and print it (exit 0 for done).
    Cmd(cmd::CmdArgs),
    /// Read the event log offline (`[buffer] path`): events by device, stream and time,
    /// as JSON lines or CSV.
    Log(flight::LogArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(cfg) => {
                // `servogate check | head` closes the pipe early: that is not an error, and
                // println! would panic on it.
                let _ = writeln!(
                    std::io::stdout(),
                    "{} is valid\n{}",
                    config.display(),
                    cfg.summary()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("servogate: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Run { config } => {
            let cfg = match config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("servogate: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            logging::init(Some(&cfg.gateway.log));
            finish(runtime().and_then(|rt| rt.block_on(app::run(cfg, app::Options::default()))))
        }
        Command::Cmd(args) => {
            let cfg = match config::load(&args.config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("servogate: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            logging::init(Some("warn"));
            match runtime().and_then(|rt| rt.block_on(cmd::run(cfg, args))) {
                Ok(true) => ExitCode::SUCCESS,
                // The result was printed; its status says why.
                Ok(false) => ExitCode::from(EX_FAILED),
                Err(e) => failed(e),
            }
        }
        Command::Log(args) => {
            if let Err(e) = flight::check_args(&args) {
                eprintln!("servogate: {e}");
                return ExitCode::from(EX_USAGE);
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
            match flight::run(&args, &mut out) {
                Ok((printed, read)) => {
                    drop(out);
                    eprintln!("servogate log: {printed} of {read} events");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    drop(out);
                    failed(e)
                }
            }
        }
        Command::Demo(args) => {
            logging::init(Some("warn,rumqttd=off"));
            finish(runtime().and_then(|rt| rt.block_on(demo::run(args))))
        }
    }
}

/// Says why a subcommand failed: 64 for a bad argument ([`Usage`]), 70 otherwise.
fn failed(e: anyhow::Error) -> ExitCode {
    eprintln!("servogate: {e:#}");
    if e.downcast_ref::<Usage>().is_some() {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::from(EX_SOFTWARE)
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread for the daemon's tasks (the forwarders, the command desk, metrics,
    // replay): every bus and the event log have threads of their own, and at a real
    // line's rate the work here is a few microseconds per sample. A second worker only
    // added wake-ups: tokio wakes a sibling to steal on every notify, and in a VM a
    // cross-CPU wake costs more than the sample's own work (BENCHMARKS.md, "CPU per
    // sample at a real line's rate").
    Ok(tokio::runtime::Builder::new_current_thread()
        .thread_name("servogate")
        .enable_all()
        .build()?)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("servogate: {e:#}");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}
