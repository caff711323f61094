//! Telling systemd how the daemon is doing: the sd_notify(3) protocol, over the sd-notify
//! crate.
//!
//! systemd/servogate.service is `Type=notify` with `WatchdogSec=`: systemd considers the
//! service started only when it receives `READY=1`, kills and restarts it when `WATCHDOG=1`
//! stops arriving, and shows the last `STATUS=` line in `systemctl status`.
//!
//! Every function is a no-op returning `Ok(())` / `None` when the process was not started
//! by systemd (no `NOTIFY_SOCKET`), so `servogate run` behaves the same in a terminal, in a
//! test and under systemd. An `Err` means systemd asked for notifications and sending one
//! failed: worth a warning, never a reason to stop polling.
//!
//! What this module does not do: decide *when* to notify. The daemon sends `ready()` once
//! the config is valid and the buses are open, `watchdog_ping()` from its main loop every
//! `watchdog_interval()`, and `stopping()` when shutdown begins, and `reloading()` then `ready()` around a reload.

use std::io;
use std::time::Duration;

use sd_notify::NotifyState;

/// `READY=1`: start-up is finished (config valid, buses open). With `Type=notify`,
/// `systemctl start` returns and units ordered after servogate start only now.
pub fn ready() -> io::Result<()> {
    notify(&[NotifyState::Ready])
}

/// `RELOADING=1` with `MONOTONIC_USEC`: a reload (SIGHUP) has begun; [`ready`] ends it.
/// systemd shows "reloading" meanwhile, and `systemctl reload` waits for the `READY=1`
/// (systemd 253 and later; older ones ignore it).
pub fn reloading() -> io::Result<()> {
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
    let usec = i128::from(now.tv_sec()) * 1_000_000 + i128::from(now.tv_nsec()) / 1_000;
    notify(&[NotifyState::Reloading, NotifyState::MonotonicUsec(usec)])
}

/// `STOPPING=1`: shutdown has begun, so systemd shows "deactivating" and does not take the
/// exit that follows for a crash.
pub fn stopping() -> io::Result<()> {
    notify(&[NotifyState::Stopping])
}

/// `STATUS=...`: one line for `systemctl status` ("polling 6 devices on 1 bus"). A newline
/// would end the assignment early (the protocol is one `KEY=value` per line), so line
/// breaks become spaces.
pub fn status(text: &str) -> io::Result<()> {
    let one_line = one_line(text);
    notify(&[NotifyState::Status(&one_line)])
}

/// `WATCHDOG=1`: "still alive". Send it at least every [`watchdog_interval`], from the
/// loop whose progress it vouches for (a ping from a thread of its own would keep a
/// stalled daemon alive).
pub fn watchdog_ping() -> io::Result<()> {
    notify(&[NotifyState::Watchdog])
}

/// How often to call [`watchdog_ping`]: half of the unit's `WatchdogSec=`, as
/// sd_watchdog_enabled(3) recommends, so one late tick does not get the daemon killed.
/// `None` when systemd runs no watchdog for this process (`WatchdogSec=` unset or 0, not
/// under systemd, or `WATCHDOG_PID` naming another process, such as a parent that
/// started us).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the two variables' values, for `own_pid`: the rules of
/// sd_watchdog_enabled(3). `WATCHDOG_USEC` is the timeout in microseconds (0 or unparsable:
/// no watchdog); `WATCHDOG_PID`, when set, must be this process.
fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

fn notify(states: &[NotifyState<'_>]) -> io::Result<()> {
    // unset_env = false: NOTIFY_SOCKET must stay for the next notification (the watchdog
    // pings for as long as the daemon runs).
    sd_notify::notify(false, states)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;

    /// NOTIFY_SOCKET is process-wide, and tests run on parallel threads: the tests that
    /// set it take turns.
    static ENV: Mutex<()> = Mutex::new(());

    /// A datagram socket standing in for systemd's /run/systemd/notify, set as
    /// NOTIFY_SOCKET while it lives.
    struct FakeManager {
        socket: UnixDatagram,
        dir: PathBuf,
        _env: std::sync::MutexGuard<'static, ()>,
    }

    impl FakeManager {
        fn new(name: &str) -> Self {
            let env = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let dir = std::env::temp_dir().join(format!(
                "servogate-notify-{name}-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            // A lost datagram must fail the test, not hang it.
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            std::env::set_var("NOTIFY_SOCKET", &path);
            FakeManager {
                socket,
                dir,
                _env: env,
            }
        }

        fn received(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).expect("a notification");
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }
    }

    impl Drop for FakeManager {
        fn drop(&mut self) {
            std::env::remove_var("NOTIFY_SOCKET");
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn ready_sends_ready_1_to_the_notify_socket() {
        let manager = FakeManager::new("ready");
        ready().unwrap();
        assert_eq!(manager.received(), "READY=1\n");
    }

    #[test]
    fn stopping_sends_stopping_1() {
        let manager = FakeManager::new("stopping");
        stopping().unwrap();
        assert_eq!(manager.received(), "STOPPING=1\n");
    }

    #[test]
    fn watchdog_ping_sends_watchdog_1() {
        let manager = FakeManager::new("watchdog");
        watchdog_ping().unwrap();
        assert_eq!(manager.received(), "WATCHDOG=1\n");
    }

    #[test]
    fn status_sends_one_line_even_when_the_text_has_line_breaks() {
        let manager = FakeManager::new("status");
        status("polling 6 devices\non 1 bus").unwrap();
        assert_eq!(manager.received(), "STATUS=polling 6 devices on 1 bus\n");
    }

    #[test]
    fn every_notification_is_a_no_op_when_not_started_by_systemd() {
        let _env = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::env::remove_var("NOTIFY_SOCKET");
        ready().unwrap();
        stopping().unwrap();
        status("idle").unwrap();
        watchdog_ping().unwrap();
    }

    #[test]
    fn a_notify_socket_nobody_listens_on_is_an_error_to_report() {
        let _env = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let path = std::env::temp_dir().join(format!(
            "servogate-notify-none-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::env::set_var("NOTIFY_SOCKET", &path);
        let sent = ready();
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(sent.is_err(), "{sent:?}");
    }

    #[test]
    fn the_watchdog_interval_is_half_of_watchdog_usec() {
        assert_eq!(
            watchdog_interval_from(Some("20000000"), Some("42"), 42),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn a_watchdog_without_watchdog_pid_applies_to_this_process() {
        assert_eq!(
            watchdog_interval_from(Some("3000000"), None, 42),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn a_watchdog_meant_for_another_process_is_not_ours() {
        assert_eq!(
            watchdog_interval_from(Some("20000000"), Some("41"), 42),
            None
        );
        assert_eq!(
            watchdog_interval_from(Some("20000000"), Some("x"), 42),
            None
        );
    }

    #[test]
    fn a_missing_zero_or_garbled_watchdog_usec_means_no_watchdog() {
        assert_eq!(watchdog_interval_from(None, Some("42"), 42), None);
        assert_eq!(watchdog_interval_from(Some("0"), Some("42"), 42), None);
        assert_eq!(watchdog_interval_from(Some("20s"), Some("42"), 42), None);
    }

    #[test]
    fn watchdog_interval_reads_this_processs_environment() {
        let _env = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        std::env::set_var("WATCHDOG_USEC", "4000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(2)));
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        assert_eq!(watchdog_interval(), None);
    }
}
