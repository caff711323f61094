//! Test fixtures: a real mosquitto on a free loopback port, and a real rumqttc subscriber.
//! (The e2e crate has its own; these are deliberately not shared.)
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "sg-mqtt-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` until it holds; `limit` is only an upper bound on waiting for a real signal.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One mosquitto process with a generated config; can be SIGKILLed and restarted on the
/// same port.
pub struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts mosquitto on a free port; `extra` is appended to the config (more listeners,
    /// persistence).
    pub async fn start(dir: &Path, extra: &str) -> Broker {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} missing: apt-get install -y mosquitto mosquitto-clients"
        );
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        // Running as root, mosquitto would switch to the `mosquitto` user and then fail to
        // read the temp dir; stay root in that case.
        let user = if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            "user root\n"
        } else {
            ""
        };
        // High queue limits: mosquitto acknowledges a QoS 1 publish even when it later drops
        // it for a slow subscriber, and the loss we count must be ours, not the broker's.
        let text = format!(
            "{user}listener {port} 127.0.0.1\nallow_anonymous true\n\
             max_queued_messages 1000000\nmax_inflight_messages 0\n\
             log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n\
             log_type information\n{extra}\n",
            log = dir.join("mosquitto.log").display(),
        );
        let text = if extra.contains("persistence true") {
            text
        } else {
            format!("persistence false\n{text}")
        };
        std::fs::write(&conf, text).unwrap();
        let mut broker = Broker {
            port,
            dir: dir.to_owned(),
            conf,
            child: None,
        };
        broker.spawn().await;
        broker
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        self.wait_accepting().await;
    }

    /// Waits until the listener accepts TCP (poll connect; no fixed sleep).
    async fn wait_accepting(&mut self) {
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mosquitto exited with {status}; log:\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not accept on {} in 10s; log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL: no clean-up, no persistence save, connections reset.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        }
    }

    /// SIGSTOP: the broker hangs with its sockets open; nothing is acknowledged any more.
    pub fn freeze(&self) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("broker running");
        let ok = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -STOP {pid}");
    }

    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

/// A message the subscriber received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub retain: bool,
    pub json: serde_json::Value,
}

/// A real MQTT subscriber that reconnects and re-subscribes by itself.
pub struct Subscriber {
    pub rx: mpsc::UnboundedReceiver<Msg>,
    subacks: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects and returns once the first SUBACK arrived, so nothing published after this
    /// returns can be missed. `clean == false` keeps a session across broker restarts when
    /// the broker persists it.
    pub async fn connect(port: u16, filter: &str, client_id: &str, clean: bool) -> Subscriber {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let (tx, rx) = mpsc::unbounded_channel();
        let (suback_tx, subacks) = watch::channel(0u64);
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // rumqttc does not re-subscribe by itself.
                        client
                            .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        suback_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or_else(|e| {
                            panic!("invalid JSON on {}: {e}: {:?}", p.topic, p.payload)
                        });
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            retain: p.retain,
                            json,
                        });
                    }
                    Ok(_) => {}
                    // Reconnect backoff of the test subscriber.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        let mut sub = Subscriber { rx, subacks, task };
        let _ = tokio::time::timeout(Duration::from_secs(10), sub.subacks.wait_for(|n| *n >= 1))
            .await
            .expect("subscriber got no SUBACK in 10s");
        sub
    }

    /// The next message; `limit` is an upper bound.
    pub async fn next(&mut self, limit: Duration) -> Msg {
        tokio::time::timeout(limit, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no message within {limit:?}"))
            .expect("subscriber task ended")
    }

    /// The next message on `topic`, skipping others.
    pub async fn next_on(&mut self, topic: &str, limit: Duration) -> Msg {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = tokio::time::timeout(left, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing on {topic} within {limit:?}"))
                .expect("subscriber task ended");
            if msg.topic == topic {
                return msg;
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs a command and panics with its output if it fails.
pub fn sh(cmd: &str, dir: &Path) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{cmd} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
