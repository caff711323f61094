//! A bad config is refused before anything opens: exit 64 and a message naming the line.

use std::process::Stdio;

use servogate_e2e::*;

/// A valid config whose broker and port are never reached: a bad command line or config
/// must be refused before either is opened.
fn good_config() -> String {
    config(
        "e2e-bad",
        "mqtt://127.0.0.1:1",
        "/nonexistent/pty".as_ref(),
        &[1],
        "",
    )
}

/// `servogate SUBCOMMAND --config FILE AFTER...` with `config` in FILE (named bad.toml),
/// standard output to `stdout`.
fn servogate(
    subcommand: &str,
    config: &str,
    after: &[&str],
    stdout: Stdio,
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    program("servogate")
        .args([subcommand, "--config"])
        .arg(&path)
        .args(after)
        .stdout(stdout)
        .output()
        .unwrap()
}

fn run(subcommand: &str, config: &str) -> (i32, String) {
    let out = servogate(subcommand, config, &[], Stdio::piped());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_device_naming_a_missing_bus_exits_64_naming_file_line_and_key() {
    let good = good_config();
    let bad = good.replace("bus = \"rs485-a\"", "bus = \"rs485-b\"");
    let line = bad.lines().position(|l| l.contains("rs485-b")).unwrap() + 1;
    for cmd in ["check", "run"] {
        let (code, stderr) = run(cmd, &bad);
        assert_eq!(code, 64, "{cmd}: {stderr}");
        assert!(
            stderr.contains(&format!("bad.toml:{line}:")),
            "{cmd}: {stderr}"
        );
        assert!(stderr.contains("bus"), "{stderr}");
    }
}

#[test]
fn an_unknown_key_exits_64_naming_its_line() {
    let good = good_config();
    let bad = good.replace("baud = 115200", "baud = 115200\nbaudrate = 9600");
    let line = bad.lines().position(|l| l.starts_with("baudrate")).unwrap() + 1;
    let (code, stderr) = run("check", &bad);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains(&format!("bad.toml:{line}:")), "{stderr}");
    assert!(stderr.contains("baudrate"), "{stderr}");
}

#[test]
fn a_good_config_checks_clean() {
    let good = good_config();
    let (code, stderr) = run("check", &good);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_command_for_an_unknown_device_or_with_a_bad_parameter_exits_64_before_any_broker() {
    // The broker address is closed: a usage error must be found before connecting.
    for (args, says) in [
        (&["axis-9", "enable"][..], "no device named \"axis-9\""),
        (&["axis-1", "move", "position"][..], "is not name=value"),
    ] {
        let out = servogate("cmd", &good_config(), args, Stdio::piped());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn check_into_a_pipe_nobody_reads_exits_0_without_a_panic() {
    // `servogate check | head -1`: the reader is gone before the summary is written.
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is a descriptor this test just opened and hands over here.
    let write_end = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let out = servogate("check", &good_config(), &[], write_end.into());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
