//! The line commands `servosim` reads on stdin, so a test can inject faults while it runs.
//! Each command gets one answer line starting with `ok` or `error`.

use std::fmt::Write as _;
use std::time::Duration;

use crate::Simulator;

/// The commands, for `help` and error messages.
pub const HELP: &str = "dead U | alive U | late U DUR | ontime U | fault U CODE | clear U | crc RATE | stats | truth U";

/// Runs one command line; `None` for a blank line (nothing to answer).
pub fn execute(sim: &Simulator, line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (&command, args) = words.split_first()?;
    Some(match run(sim, command, args) {
        Ok(answer) => format!("ok {answer}"),
        Err(why) => format!("error {why}"),
    })
}

fn run(sim: &Simulator, command: &str, args: &[&str]) -> Result<String, String> {
    let unit = || -> Result<u8, String> {
        let arg = args
            .first()
            .ok_or_else(|| format!("{command} needs a unit"))?;
        arg.parse().map_err(|_| format!("{arg:?} is not a unit id"))
    };
    let expect_args = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!("{command} takes {n} argument(s); commands: {HELP}"))
        }
    };
    match command {
        "dead" | "alive" => {
            expect_args(1)?;
            let u = unit()?;
            sim.set_dead(u, command == "dead")
                .map_err(|e| e.to_string())?;
            Ok(format!("{command} {u}"))
        }
        "late" => {
            expect_args(2)?;
            let u = unit()?;
            let late = parse_duration(args[1])?;
            sim.set_late(u, Some(late)).map_err(|e| e.to_string())?;
            Ok(format!("late {u} {}", humantime::format_duration(late)))
        }
        "ontime" => {
            expect_args(1)?;
            let u = unit()?;
            sim.set_late(u, None).map_err(|e| e.to_string())?;
            Ok(format!("ontime {u}"))
        }
        "fault" => {
            expect_args(2)?;
            let u = unit()?;
            let code = parse_fault_code(args[1])?;
            sim.inject_fault(u, code).map_err(|e| e.to_string())?;
            Ok(format!("fault {u} {code:#06x}"))
        }
        "clear" => {
            expect_args(1)?;
            let u = unit()?;
            sim.clear_fault(u).map_err(|e| e.to_string())?;
            Ok(format!("clear {u}"))
        }
        "crc" => {
            expect_args(1)?;
            let rate = parse_rate(args[0])?;
            sim.set_crc_noise(rate);
            Ok(format!("crc {rate}"))
        }
        "stats" => {
            expect_args(0)?;
            Ok(format_stats(sim))
        }
        "truth" => {
            expect_args(1)?;
            let u = unit()?;
            let truth = sim
                .truth(u)
                .ok_or_else(|| format!("unit {u} is not simulated"))?;
            let s = truth.sample;
            Ok(format!(
                "{{\"unit\":{},\"t_ms\":{},\"motion_ms\":{},\"position_mm\":{},\"velocity_mm_s\":{},\
                 \"torque_pct\":{},\"current_a\":{},\"temperature_c\":{},\"statusword\":{},\"error_code\":{}}}",
                truth.unit,
                truth.t_ms,
                truth.drive.motion_ms,
                s.position_mm,
                s.velocity_mm_s,
                s.torque_pct,
                s.current_a,
                s.temperature_c,
                truth.drive.statusword(),
                truth.drive.error_code,
            ))
        }
        "help" => Ok(HELP.to_string()),
        other => Err(format!("unknown command {other:?}; commands: {HELP}")),
    }
}

/// `stats corrupted=N dropped_bytes=N served=1:N,2:N ignored=1:N,2:N`.
fn format_stats(sim: &Simulator) -> String {
    let stats = sim.stats();
    let mut out = format!(
        "stats corrupted={} dropped_bytes={} served=",
        stats.corrupted, stats.dropped_bytes
    );
    let per_unit = |out: &mut String, f: &dyn Fn(&crate::UnitStats) -> u64| {
        for (i, (unit, s)) in stats.units.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            // Writing to a String cannot fail.
            let _ = write!(out, "{sep}{unit}:{}", f(s));
        }
    };
    per_unit(&mut out, &|s| s.served);
    out.push_str(" ignored=");
    per_unit(&mut out, &|s| s.ignored);
    out
}

/// A duration with units, like `30ms` or `1.5s` (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 30ms"))
}

/// A CiA 402 error code, hex with `0x` (`0x2310`) or decimal.
pub fn parse_fault_code(s: &str) -> Result<u16, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not an error code (0x0000-0xFFFF)"))
}

/// A fraction from 0.0 to 1.0.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimOptions;

    fn sim() -> Simulator {
        Simulator::new("1-3".parse().unwrap(), SimOptions::default())
    }

    #[test]
    fn each_command_answers_ok_and_changes_the_simulator() {
        let s = sim();
        assert_eq!(execute(&s, "dead 2").unwrap(), "ok dead 2");
        assert_eq!(execute(&s, "late 1 30ms").unwrap(), "ok late 1 30ms");
        assert_eq!(execute(&s, "fault 3 0x2310").unwrap(), "ok fault 3 0x2310");
        assert_eq!(s.drive_state(3, s.t_ms()).unwrap().error_code, 0x2310);
        assert_eq!(execute(&s, "clear 3").unwrap(), "ok clear 3");
        assert!(!s.drive_state(3, s.t_ms()).unwrap().is_faulted());
        assert_eq!(execute(&s, "crc 0.05").unwrap(), "ok crc 0.05");
        assert_eq!(s.crc_noise(), 0.05);
        assert_eq!(execute(&s, "ontime 1").unwrap(), "ok ontime 1");
        assert_eq!(execute(&s, "alive 2").unwrap(), "ok alive 2");
        assert_eq!(
            execute(&s, "stats").unwrap(),
            "ok stats corrupted=0 dropped_bytes=0 served=1:0,2:0,3:0 ignored=1:0,2:0,3:0"
        );
        let truth = execute(&s, "truth 1").unwrap();
        assert!(truth.starts_with("ok {\"unit\":1,\"t_ms\":"), "{truth}");
    }

    #[test]
    fn bad_commands_answer_error_and_blank_lines_nothing() {
        let s = sim();
        for bad in [
            "dead 9",
            "dead x",
            "late 1 soon",
            "fault 1 0xZZ",
            "crc 2",
            "jump",
            "dead",
            "stats now",
        ] {
            let answer = execute(&s, bad).unwrap();
            assert!(answer.starts_with("error "), "{bad:?} -> {answer}");
        }
        assert_eq!(execute(&s, "   "), None);
    }
}
