//! The line commands `servosim` reads on stdin, so a test can inject faults while it runs.
//! Each command gets one answer line starting with `ok` or `error`.

use std::fmt::Write as _;
use std::num::NonZeroU8;
use std::time::Duration;

use crate::Simulator;

/// The commands, for `help` and error messages.
pub const HELP: &str = "dead U | alive U | late U DUR | ontime U | fault U CODE | clear U | reject U CODE | accept U | mute-writes U | unmute-writes U | crc RATE | stats | journal | truth U";

/// Runs one command line; `None` for a blank line (nothing to answer).
pub fn execute(sim: &Simulator, line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (&command, args) = words.split_first()?;
    Some(match run(sim, command, args) {
        Ok(answer) => format!("ok {answer}"),
        Err(why) => format!("error {why}"),
    })
}

/// [`execute`] for `servosim modbus-tcp`: every command but `crc`, refused because a
/// Modbus TCP reply has no CRC to corrupt (TCP delivers the bytes intact or not at all).
pub fn execute_tcp(sim: &Simulator, line: &str) -> Option<String> {
    match line.split_whitespace().next() {
        Some("crc") => Some("error crc: Modbus TCP has no CRC to corrupt".to_string()),
        _ => execute(sim, line),
    }
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
        "reject" => {
            expect_args(2)?;
            let u = unit()?;
            let code = parse_exception_code(args[1])?;
            sim.set_reject(u, Some(code)).map_err(|e| e.to_string())?;
            Ok(format!("reject {u} {code}"))
        }
        "accept" => {
            expect_args(1)?;
            let u = unit()?;
            sim.set_reject(u, None).map_err(|e| e.to_string())?;
            Ok(format!("accept {u}"))
        }
        "mute-writes" | "unmute-writes" => {
            expect_args(1)?;
            let u = unit()?;
            sim.set_mute_writes(u, command == "mute-writes")
                .map_err(|e| e.to_string())?;
            Ok(format!("{command} {u}"))
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
        "journal" => {
            expect_args(0)?;
            let entries: Vec<String> = sim
                .journal()
                .iter()
                .map(|e| format!("{}:{}:{}", e.unit, e.function, e.t_ms))
                .collect();
            Ok(format!("journal {}", entries.join(",")))
        }
        "truth" => {
            expect_args(1)?;
            let u = unit()?;
            let truth = sim
                .truth(u)
                .ok_or_else(|| format!("unit {u} is not simulated"))?;
            let s = truth.sample;
            let d = truth.drive;
            // The set-point of the last profile position move; null before the first.
            let target = match d.commanded.and_then(|c| c.set_point) {
                Some(um) => (f64::from(um) / 1000.0).to_string(),
                None => "null".to_string(),
            };
            Ok(format!(
                "{{\"unit\":{},\"t_ms\":{},\"motion_ms\":{},\"position_mm\":{},\"velocity_mm_s\":{},\
                 \"torque_pct\":{},\"current_a\":{},\"temperature_c\":{},\"statusword\":{},\"error_code\":{},\
                 \"state\":\"{}\",\"mode\":{},\"target_position_mm\":{},\"commanded\":{}}}",
                truth.unit,
                truth.t_ms,
                d.motion_ms,
                s.position_mm,
                s.velocity_mm_s,
                s.torque_pct,
                s.current_a,
                s.temperature_c,
                d.statusword(),
                d.error_code,
                d.state().name(),
                d.written.modes_of_operation,
                target,
                d.commanded.is_some(),
            ))
        }
        "help" => Ok(HELP.to_string()),
        other => Err(format!("unknown command {other:?}; commands: {HELP}")),
    }
}

/// `stats corrupted=N dropped_bytes=N bad_mbap=N served=1:N,2:N ignored=1:N,2:N
/// writes=1:N,2:N applied=1:N,2:N`.
fn format_stats(sim: &Simulator) -> String {
    let stats = sim.stats();
    let mut out = format!(
        "stats corrupted={} dropped_bytes={} bad_mbap={} served=",
        stats.corrupted, stats.dropped_bytes, stats.bad_mbap
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
    out.push_str(" writes=");
    per_unit(&mut out, &|s| s.writes);
    out.push_str(" applied=");
    per_unit(&mut out, &|s| s.applied);
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

/// A Modbus exception code for `reject`, 1-255, hex with `0x` (`0x04`) or decimal.
pub fn parse_exception_code(s: &str) -> Result<NonZeroU8, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed
        .ok()
        .and_then(NonZeroU8::new)
        .ok_or_else(|| format!("{s:?} is not an exception code (1-255, e.g. 4)"))
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
    use crate::rtu::RequestFrame;
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
            "ok stats corrupted=0 dropped_bytes=0 bad_mbap=0 served=1:0,2:0,3:0 ignored=1:0,2:0,3:0 \
             writes=1:0,2:0,3:0 applied=1:0,2:0,3:0"
        );
        let truth = execute(&s, "truth 1").unwrap();
        assert!(truth.starts_with("ok {\"unit\":1,\"t_ms\":"), "{truth}");
        assert!(
            truth.ends_with(
                ",\"state\":\"operation_enabled\",\"mode\":8,\"target_position_mm\":null,\
                 \"commanded\":false}"
            ),
            "{truth}"
        );
    }

    fn write_single(unit: u8, address: u16, value: u16) -> RequestFrame {
        let mut pdu = vec![0x06];
        pdu.extend_from_slice(&address.to_be_bytes());
        pdu.extend_from_slice(&value.to_be_bytes());
        RequestFrame {
            unit,
            wire_len: pdu.len() + 3,
            pdu,
        }
    }

    #[test]
    fn reject_and_mute_writes_parse_and_show_in_the_write_counters() {
        // Given unit 1 rejecting with 04 and unit 2 muted
        let s = sim();
        assert_eq!(execute(&s, "reject 1 4").unwrap(), "ok reject 1 4");
        assert_eq!(execute(&s, "reject 3 0x0B").unwrap(), "ok reject 3 11");
        assert_eq!(execute(&s, "mute-writes 2").unwrap(), "ok mute-writes 2");
        // When each gets a controlword write
        let refused = s.handle(&write_single(1, 0x0012, 6), s.t_ms()).unwrap();
        assert_eq!(refused.bytes[1..3], [0x86, 0x04]);
        assert_eq!(s.handle(&write_single(2, 0x0012, 6), s.t_ms()), None);
        // Then stats count both writes, the muted one applied, none answered normally
        let stats = execute(&s, "stats").unwrap();
        assert!(
            stats.ends_with(
                " served=1:1,2:0,3:0 ignored=1:0,2:0,3:0 writes=1:1,2:1,3:0 applied=1:0,2:1,3:0"
            ),
            "{stats}"
        );
        // And truth shows the muted unit commanded, in ready to switch on
        let truth = execute(&s, "truth 2").unwrap();
        assert!(
            truth.contains("\"state\":\"ready_to_switch_on\"")
                && truth.ends_with("\"commanded\":true}"),
            "{truth}"
        );
        // And accept / unmute-writes undo it
        assert_eq!(execute(&s, "accept 1").unwrap(), "ok accept 1");
        assert_eq!(
            execute(&s, "unmute-writes 2").unwrap(),
            "ok unmute-writes 2"
        );
        assert!(
            s.handle(&write_single(1, 0x0018, 5), s.t_ms())
                .unwrap()
                .bytes[1]
                == 0x06
        );
        assert!(s.handle(&write_single(2, 0x0018, 5), s.t_ms()).is_some());
    }

    #[test]
    fn truth_shows_the_set_point_in_mm_and_the_mode() {
        let s = sim();
        let t = s.t_ms();
        for (address, value) in [(0x0013, 1), (0x0010, 0), (0x0011, 0xD6D8), (0x0012, 0x001F)] {
            assert!(s.handle(&write_single(1, address, value), t).is_some());
        }
        // 0x0000D6D8 = 55000 µm
        let truth = execute(&s, "truth 1").unwrap();
        assert!(
            truth.ends_with(
                ",\"state\":\"operation_enabled\",\"mode\":1,\"target_position_mm\":55,\
                 \"commanded\":true}"
            ),
            "{truth}"
        );
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
            "reject 1",
            "reject 1 0",
            "reject 1 256",
            "reject 9 4",
            "accept",
            "mute-writes x",
            "unmute-writes 9",
        ] {
            let answer = execute(&s, bad).unwrap();
            assert!(answer.starts_with("error "), "{bad:?} -> {answer}");
        }
        assert_eq!(execute(&s, "   "), None);
    }

    #[test]
    fn the_tcp_console_refuses_crc_noise_and_runs_the_rest() {
        let s = sim();
        let answer = execute_tcp(&s, "crc 0.5").unwrap();
        assert!(answer.starts_with("error "), "{answer}");
        assert_eq!(s.crc_noise(), 0.0);
        assert_eq!(execute_tcp(&s, "late 2 200ms").unwrap(), "ok late 2 200ms");
        assert!(execute_tcp(&s, "stats").unwrap().starts_with("ok stats "));
        assert_eq!(execute_tcp(&s, ""), None);
    }
}
