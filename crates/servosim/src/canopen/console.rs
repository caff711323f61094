//! The stdin commands of `servosim canopen`, in the Modbus console's style: one command a
//! line, one answer line starting with `ok` or `error`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::{CanSim, MAX_FLOOD_RATE};
use crate::console::{parse_duration, parse_fault_code};

/// The commands, for `help` and error messages.
pub const HELP: &str = "silent N | alive N | fault N CODE | clear N | abort N CODE | noabort N | reboot N | flood RATE DURATION | stats | truth N | help";

/// Runs one command line at `now`; `None` for a blank line (nothing to answer). Frames a
/// command causes (EMCY, boot-up) go out with the simulator's next poll.
pub fn execute(sim: &mut CanSim, line: &str, now: Instant) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (&command, args) = words.split_first()?;
    Some(match run(sim, command, args, now) {
        Ok(answer) => format!("ok {answer}"),
        Err(why) => format!("error {why}"),
    })
}

fn run(sim: &mut CanSim, command: &str, args: &[&str], now: Instant) -> Result<String, String> {
    let node = || -> Result<u8, String> {
        let arg = args
            .first()
            .ok_or_else(|| format!("{command} needs a node id"))?;
        arg.parse().map_err(|_| format!("{arg:?} is not a node id"))
    };
    let expect_args = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!("{command} takes {n} argument(s); commands: {HELP}"))
        }
    };
    match command {
        "silent" | "alive" => {
            expect_args(1)?;
            let n = node()?;
            sim.set_silent(n, command == "silent", now)
                .map_err(|e| e.to_string())?;
            Ok(format!("{command} {n}"))
        }
        "fault" => {
            expect_args(2)?;
            let n = node()?;
            let code = parse_fault_code(args[1])?;
            sim.inject_fault(n, code, now).map_err(|e| e.to_string())?;
            Ok(format!("fault {n} {code:#06x}"))
        }
        "abort" => {
            expect_args(2)?;
            let n = node()?;
            let code = parse_abort_code(args[1])?;
            sim.set_abort(n, Some(code)).map_err(|e| e.to_string())?;
            Ok(format!("abort {n} {code:#010x}"))
        }
        "noabort" => {
            expect_args(1)?;
            let n = node()?;
            sim.set_abort(n, None).map_err(|e| e.to_string())?;
            Ok(format!("noabort {n}"))
        }
        "clear" => {
            expect_args(1)?;
            let n = node()?;
            sim.clear_fault(n, now).map_err(|e| e.to_string())?;
            Ok(format!("clear {n}"))
        }
        "reboot" => {
            expect_args(1)?;
            let n = node()?;
            sim.reboot(n, now).map_err(|e| e.to_string())?;
            Ok(format!("reboot {n}"))
        }
        "flood" => {
            expect_args(2)?;
            let rate = match args[0].parse::<u32>() {
                Ok(r) if (1..=MAX_FLOOD_RATE).contains(&r) => r,
                _ => {
                    return Err(format!(
                        "{:?} is not a rate in frames/s (1-{MAX_FLOOD_RATE})",
                        args[0]
                    ))
                }
            };
            let duration = parse_duration(args[1])?;
            if duration.is_zero() || duration > Duration::from_secs(3600) {
                return Err(format!(
                    "{:?}: a flood lasts more than 0 and at most 1h",
                    args[1]
                ));
            }
            sim.start_flood(rate, duration, now);
            Ok(format!(
                "flood {rate} {}",
                humantime::format_duration(duration)
            ))
        }
        "stats" => {
            expect_args(0)?;
            Ok(format_stats(sim))
        }
        "truth" => {
            expect_args(1)?;
            let n = node()?;
            let t = sim
                .truth(n, now)
                .ok_or_else(|| format!("node {n} is not simulated"))?;
            let s = t.sample;
            // The Modbus console's `truth` fields ("unit" is the node id), plus the NMT
            // and CiA 402 states.
            Ok(format!(
                "{{\"unit\":{},\"t_ms\":{},\"motion_ms\":{},\"position_mm\":{},\"velocity_mm_s\":{},\
                 \"torque_pct\":{},\"current_a\":{},\"temperature_c\":{},\"statusword\":{},\"error_code\":{},\
                 \"nmt\":\"{}\",\"state\":\"{}\"}}",
                t.node,
                t.t_ms,
                t.motion_ms,
                s.position_mm,
                s.velocity_mm_s,
                s.torque_pct,
                s.current_a,
                s.temperature_c,
                t.statusword,
                t.error_code,
                t.nmt.name(),
                t.state.name(),
            ))
        }
        "help" => Ok(HELP.to_string()),
        other => Err(format!("unknown command {other:?}; commands: {HELP}")),
    }
}

/// An SDO abort code: `0x06090030` (hex with 0x) or decimal, 32 bits.
fn parse_abort_code(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not an SDO abort code (e.g. 0x06090030)"))
}

/// `stats rx=N tx=N enobufs=N sdo=N aborts=N tpdo=1:N,2:N downloads=1:N,2:N
/// applied=1:N,2:N syncs=N rpdo=1:N,2:N started=1:S,2:S` (`started`: the SYNC number at
/// which the node last took a set-point sent by RPDO, 0 for never).
fn format_stats(sim: &CanSim) -> String {
    let s = sim.stats();
    let mut out = format!(
        "stats rx={} tx={} enobufs={} sdo={} aborts={} tpdo=",
        s.rx, s.tx, s.enobufs, s.sdo, s.aborts
    );
    let per_node = |out: &mut String, map: &std::collections::BTreeMap<u8, u64>| {
        for (i, (node, n)) in map.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            // Writing to a String cannot fail.
            let _ = write!(out, "{sep}{node}:{n}");
        }
    };
    per_node(&mut out, &s.tpdo);
    out.push_str(" downloads=");
    per_node(&mut out, &s.downloads);
    out.push_str(" applied=");
    per_node(&mut out, &s.applied);
    let _ = write!(out, " syncs={} rpdo=", s.syncs);
    per_node(&mut out, &s.rpdo);
    out.push_str(" started=");
    per_node(&mut out, &s.started);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canopen::{CanOptions, Cia402State, Frame};

    fn sim() -> (CanSim, Instant) {
        let t0 = Instant::now();
        (
            CanSim::new(&CanOptions::new("1-3".parse().unwrap()), t0).unwrap(),
            t0,
        )
    }

    #[test]
    fn each_command_answers_ok_and_changes_the_simulator() {
        let (mut s, t0) = sim();
        s.poll(t0);
        assert_eq!(execute(&mut s, "silent 3", t0).unwrap(), "ok silent 3");
        assert!(s.truth(3, t0).unwrap().silent);
        assert_eq!(execute(&mut s, "alive 3", t0).unwrap(), "ok alive 3");
        assert!(!s.truth(3, t0).unwrap().silent);
        assert_eq!(
            execute(&mut s, "fault 2 0x2310", t0).unwrap(),
            "ok fault 2 0x2310"
        );
        assert_eq!(s.truth(2, t0).unwrap().state, Cia402State::Fault);
        assert_eq!(
            s.poll(t0),
            [Frame::new(0x082, &[0x10, 0x23, 1, 0, 0, 0, 0, 0]).unwrap()]
        );
        assert_eq!(execute(&mut s, "clear 2", t0).unwrap(), "ok clear 2");
        assert_eq!(
            execute(&mut s, "fault 1 8977", t0).unwrap(),
            "ok fault 1 0x2311"
        );
        assert_eq!(execute(&mut s, "reboot 1", t0).unwrap(), "ok reboot 1");
        assert_eq!(
            execute(&mut s, "flood 5000 2s", t0).unwrap(),
            "ok flood 5000 2s"
        );
        assert!(s.is_flooding());
        assert_eq!(
            execute(&mut s, "stats", t0).unwrap(),
            "ok stats rx=0 tx=0 enobufs=0 sdo=0 aborts=0 tpdo=1:0,2:0,3:0 \
             downloads=1:0,2:0,3:0 applied=1:0,2:0,3:0 syncs=0 rpdo=1:0,2:0,3:0 \
             started=1:0,2:0,3:0"
        );
        let truth = execute(&mut s, "truth 1", t0).unwrap();
        assert!(truth.starts_with("ok {\"unit\":1,\"t_ms\":0,"), "{truth}");
        assert!(
            truth.ends_with(",\"nmt\":\"pre_operational\",\"state\":\"operation_enabled\"}"),
            "{truth}"
        );
        assert!(execute(&mut s, "help", t0)
            .unwrap()
            .starts_with("ok silent N"));
    }

    #[test]
    fn bad_commands_answer_error_and_blank_lines_nothing() {
        let (mut s, t0) = sim();
        for bad in [
            "silent 9",
            "silent x",
            "silent",
            "fault 1 0xZZ",
            "fault 1",
            "clear 4",
            "reboot",
            "flood 0 1s",
            "flood 5000 soon",
            "flood 5000 0s",
            "flood 2000000 1s",
            "truth 7",
            "stats now",
            "jump",
        ] {
            let answer = execute(&mut s, bad, t0).unwrap();
            assert!(answer.starts_with("error "), "{bad:?} -> {answer}");
        }
        assert_eq!(execute(&mut s, "  ", t0), None);
    }
}
