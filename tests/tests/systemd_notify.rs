//! Under systemd (Type=notify) the daemon says READY=1 once its bus has tried to open its
//! port, feeds the watchdog while it runs, and says STOPPING=1 on SIGTERM: checked on a
//! real datagram socket given as NOTIFY_SOCKET, as systemd gives it.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use servogate_e2e::*;

fn next_datagram(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_is_ready_after_its_port_is_open_feeds_the_watchdog_and_says_it_stops() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();

    let mut sub = Subscriber::start(broker.port, "servogate/e2e-notify/#").await;
    // WATCHDOG_USEC of 400 ms: pings every 200 ms. WATCHDOG_PID is left out (it is
    // optional, and the child's pid is not known before it starts).
    let mut gw = Servogate::start_with_env(
        &config("e2e-notify", &broker.url(), &pty.gateway, &[1], ""),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let first = next_datagram(&sock);
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    // The port was open by then: the device comes online.
    let online = sub
        .until(|m| m.device_stream() == Some(("axis-1", "availability")))
        .await;
    assert_eq!(online.json["state"], "online");

    // Watchdog pings keep coming (at least three within a second and a half).
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{pings} pings"
        );
        if next_datagram(&sock).lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }

    assert!(gw.stop().success());
    let mut stopping = false;
    while !stopping {
        stopping = next_datagram(&sock).lines().any(|l| l == "STOPPING=1");
    }
}
