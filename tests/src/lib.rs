//! End-to-end test support: real processes, real pty, real broker.
//!
//! - [`Mosquitto`]: a broker of our own on a free loopback port, killable with SIGKILL.
//! - [`Gate`]: a TCP forwarder in front of the broker that the test can close, so that
//!   after a broker restart the test's subscriber is back before the gateway is.
//! - [`PtyPair`]: `socat` linking two ptys, as a user would wire servosim and servogate.
//! - [`Servosim`] / [`Servogate`]: the binaries, started from the target directory.
//! - [`Subscriber`]: an MQTT client collecting every message as JSON.
//!
//! Every wait here waits on a real signal (a line printed, a port accepting, a message
//! arriving), bounded by a deadline that only turns a hang into a failure.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

/// Upper bound on any single wait: turns a hang into a failure.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A binary of this workspace, built by `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    // target/debug/deps/<test> -> target/debug/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A command that starts a binary of this workspace ([`bin`]); under emulation (the arm64
/// run of scripts/test.sh) through the runner scripts/emu-run.sh names in
/// `SERVOGATE_RUNNER`, as cargo runs the test itself.
pub fn program(name: &str) -> Command {
    let path = bin(name);
    match runner() {
        Some(runner) => {
            let mut cmd = Command::new(&runner[0]);
            cmd.args(&runner[1..]).arg(path);
            cmd
        }
        None => Command::new(path),
    }
}

/// True when the binaries run emulated (`SERVOGATE_RUNNER` set: the arm64 run of
/// scripts/test.sh), where everything they do takes several times longer.
pub fn emulated() -> bool {
    runner().is_some()
}

/// The words of `SERVOGATE_RUNNER`, if set.
fn runner() -> Option<Vec<String>> {
    let words: Vec<String> = std::env::var("SERVOGATE_RUNNER")
        .ok()?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    (!words.is_empty()).then_some(words)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_accepting(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < DEADLINE, "nothing accepts on port {port}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn mosquitto_path() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: apt-get install mosquitto (scripts/test.sh does)")
}

/// A mosquitto of the test's own, without persistence: a SIGKILL loses all its state.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Lines added to the generated mosquitto.conf.
    extra: String,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// As [`Mosquitto::start`], with `extra` lines in its config (e.g. the benchmarks'
    /// `set_tcp_nodelay true`).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut m = Self {
            port: free_port(),
            dir,
            child: None,
            extra: extra.to_owned(),
        };
        m.restart();
        m
    }

    /// Starts the broker again on the same port (after [`Mosquitto::kill`]).
    pub fn restart(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        // A high queue limit: mosquitto acknowledges QoS 1 publishes it later drops for a
        // slow subscriber (PITFALLS.md), and that loss would be the broker's, not ours.
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 1000000\nmax_inflight_messages 0\n{}\n",
                self.port, self.extra
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(mosquitto_path())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_accepting(self.port);
    }

    /// SIGKILL: the broker dies at once and forgets every session and retained message.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP forwarder from its own port to the broker's, which the test can close (while
/// closed it accepts and at once drops connections, like a broker that is down) or freeze
/// (a network cut: connections stay open and carry nothing, new ones are accepted and
/// never answered, no RST anywhere).
pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    frozen: tokio::sync::watch::Sender<bool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// Copies `from` to `to`, holding still while `frozen` says so.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Frozen while waiting to read: stop reading (what comes stays unread).
            _ = frozen.wait_for(|f| *f) => continue,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Gate {
    pub async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let (frozen, _) = tokio::sync::watch::channel(false);
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (o, c, f) = (open.clone(), conns.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: connection reset
                }
                let mut fz = f.subscribe();
                let task = tokio::spawn(async move {
                    // A frozen network does not even complete the way to the broker.
                    if fz.wait_for(|x| !*x).await.is_err() {
                        return;
                    }
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(pump(dr, uw, fz.clone()), pump(ur, dw, fz));
                });
                c.lock().unwrap().push(task);
            }
        });
        Self {
            port,
            open,
            frozen,
            conns,
        }
    }

    /// Closes the gate and cuts every connection through it.
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// A network cut: nothing moves either way, nothing is closed.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// The network is back: frozen connections move again.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Two ptys linked by socat: servosim on `sim`, servogate on `gateway`.
pub struct PtyPair {
    pub sim: PathBuf,
    pub gateway: PathBuf,
    _dir: tempfile::TempDir,
    child: Child,
}

impl PtyPair {
    /// Starts socat and returns once both ptys exist.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let sim = dir.path().join("sim.pty");
        let gateway = dir.path().join("gateway.pty");
        let mut child = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", sim.display()))
            .arg(format!("pty,raw,echo=0,link={}", gateway.display()))
            .stderr(Stdio::piped())
            .spawn()
            .expect("socat is not installed: apt-get install socat (scripts/test.sh does)");
        // socat says when both ptys exist and it starts moving bytes.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("starting data transfer loop") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(DEADLINE).expect("socat did not start");
        Self {
            sim,
            gateway,
            _dir: dir,
            child,
        }
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines a child prints, read on a thread.
fn line_reader(r: impl std::io::Read + Send + 'static) -> std_mpsc::Receiver<String> {
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `servosim modbus-rtu` on a pty, driven through its stdin commands.
/// A `servosim` process (either subcommand), with its stdin console.
pub struct Servosim {
    child: Child,
    stdin: ChildStdin,
    stdout: std_mpsc::Receiver<String>,
    /// Its `servosim ready ...` line.
    ready: String,
}

impl Servosim {
    /// `servosim modbus-rtu` on `port`, answering `units`.
    pub fn start(port: &Path, units: &str, extra: &[&str]) -> Self {
        let port = port.to_str().expect("a UTF-8 pty path");
        Self::spawn(&["modbus-rtu", "--port", port, "--units", units], extra)
    }

    /// `servosim SUBCOMMAND --listen LISTEN` (`modbus-tcp` or `modbus-rtu-tcp`) answering
    /// `units`: for a server that must come back on the same port.
    pub fn start_tcp_on(subcommand: &str, listen: &str, units: &str, extra: &[&str]) -> Self {
        Self::spawn(&[subcommand, "--listen", listen, "--units", units], extra)
    }

    /// `servosim SUBCOMMAND --listen 127.0.0.1:0` answering `units`; returns it and the
    /// port it listens on.
    pub fn start_tcp(subcommand: &str, units: &str, extra: &[&str]) -> (Self, u16) {
        let sim = Self::spawn(
            &[subcommand, "--listen", "127.0.0.1:0", "--units", units],
            extra,
        );
        let port = sim
            .ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
            .map(|addr| addr.port())
            .unwrap_or_else(|| panic!("no listen=IP:PORT in {:?}", sim.ready));
        (sim, port)
    }

    /// Starts `servosim ARGS EXTRA` and waits for its `servosim ready` line.
    fn spawn(args: &[&str], extra: &[&str]) -> Self {
        let mut child = program("servosim")
            .args(args)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start servosim");
        let stdin = child.stdin.take().unwrap();
        let stdout = line_reader(child.stdout.take().unwrap());
        let ready = stdout.recv_timeout(DEADLINE).expect("servosim ready line");
        assert!(ready.starts_with("servosim ready"), "{ready}");
        Self {
            child,
            stdin,
            stdout,
            ready,
        }
    }

    /// Sends one console command and returns its answer (which must start with `ok`).
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("servosim stdin");
        self.stdin.flush().unwrap();
        let answer = self.stdout.recv_timeout(DEADLINE).expect("servosim answer");
        assert!(answer.starts_with("ok"), "servosim `{line}`: {answer}");
        answer
    }
}

impl Servosim {
    /// Two per-unit counters of the `stats` line for `unit`, e.g. `("writes", "applied")`
    /// (Modbus) or `("downloads", "applied")` (CANopen): what reached the drive.
    pub fn stats_pair(&mut self, a: &str, b: &str, unit: u8) -> (u64, u64) {
        let line = self.cmd("stats");
        let field = |name: &str| -> u64 {
            let list = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {line}"));
            list.split(',')
                .find_map(|p| p.strip_prefix(&format!("{unit}:")))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no unit {unit} in {line}"))
        };
        (field(a), field(b))
    }

    /// A bus-wide counter of servosim's `stats` line (`name=N`).
    pub fn stat_total(&mut self, name: &str) -> u64 {
        let line = self.cmd("stats");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    }

    /// The `truth` of `unit` as JSON.
    pub fn truth_json(&mut self, unit: u8) -> Value {
        let line = self.cmd(&format!("truth {unit}"));
        serde_json::from_str(line.trim_start_matches("ok ")).expect("truth JSON")
    }
}

/// A publisher of commands to `{prefix}/devices/{device}/cmd`, reconnecting for ever.
pub struct Commander {
    pub client: AsyncClient,
    prefix: String,
}

impl Commander {
    pub async fn start(port: u16, prefix: &str) -> Self {
        let mut opts = MqttOptions::new(format!("e2e-cmd-{}", free_port()), "127.0.0.1", port);
        // Oversized commands are part of the hostile sets.
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Self {
            client,
            prefix: prefix.to_owned(),
        }
    }

    /// Publishes a group command (QoS 1) on `{prefix}/cmd`.
    pub async fn send_group(&self, payload: &str) {
        let topic = format!("{}/cmd", self.prefix);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .expect("publish");
    }

    /// Publishes `payload` (QoS 1) on `device`'s cmd topic.
    pub async fn send(&self, device: &str, payload: &str, retain: bool) {
        let topic = format!("{}/devices/{device}/cmd", self.prefix);
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
            .await
            .expect("publish");
    }
}

/// The next group result with `id` on `{prefix}/cmd/result`.
pub async fn group_result(sub: &mut Subscriber, prefix: &str, id: &str) -> Value {
    let topic = format!("{prefix}/cmd/result");
    let wait = sub.until(|m| m.topic == topic && m.json["id"] == id);
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no group result for {id}"))
        .json
}

/// The next result on `device`'s `cmd/result` topic whose id is `id` (`None`: `null`).
pub async fn command_result(sub: &mut Subscriber, device: &str, id: Option<&str>) -> Value {
    let want = id.map_or(Value::Null, |i| Value::String(i.to_owned()));
    let topic = format!("/devices/{device}/cmd/result");
    let wait = sub.until(|m| m.topic.ends_with(&topic) && m.json["id"] == want);
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no result for {id:?} on {device}"))
        .json
}

impl Drop for Servosim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` written to `servogate.toml` in a new temporary directory.
fn config_file(config: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("servogate.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

/// A test config (from [`config`]) in durable mode: its events go through the event log
/// at `log`, with `extra` lines in `[buffer]` (e.g. `max_bytes = 1000000`).
pub fn with_event_log(config: &str, log: &Path, extra: &str) -> String {
    config.replace(
        "capacity = 200000",
        &format!("capacity = 200000\npath = \"{}\"\n{extra}", log.display()),
    )
}

/// The rig of the durability tests: six servosim units on a pty, a broker the gateway
/// reaches through a [`Gate`], and a directory for the event log.
pub struct GatedRig {
    pub pty: PtyPair,
    pub sim: Servosim,
    pub broker: Mosquitto,
    pub gate: Gate,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl GatedRig {
    pub async fn start() -> Self {
        let pty = PtyPair::start();
        let sim = Servosim::start(&pty.sim, "1-6", &[]);
        let broker = Mosquitto::start();
        let gate = Gate::start(broker.port).await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        Self {
            pty,
            sim,
            broker,
            gate,
            dir,
            log,
        }
    }

    /// The test config of the six units (devices axis-1..6) through the gate.
    pub fn config(&self, id: &str) -> String {
        config(
            id,
            &self.gate.url(),
            &self.pty.gateway,
            &[1, 2, 3, 4, 5, 6],
            "",
        )
    }
}

/// `servogate run` with a config written from a string.
pub struct Servogate {
    child: Child,
    _dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Servogate {
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// As [`Servogate::start`], with extra environment variables (e.g. systemd's).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let (dir, path) = config_file(config);
        let child = program("servogate")
            .arg("run")
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start servogate");
        Self {
            child,
            _dir: dir,
            config: path,
        }
    }

    /// As [`Servogate::start`] with files limited to `kib` KiB (RLIMIT_FSIZE) and SIGXFSZ
    /// ignored: a write past the limit fails with EFBIG, as on a full disk.
    pub fn start_with_file_limit(config: &str, kib: u64) -> Self {
        let (dir, path) = config_file(config);
        // dash counts ulimit -f in 512-byte blocks; an ignored signal stays ignored
        // across exec.
        let runner = runner().unwrap_or_default().join(" ");
        let script = format!(
            "trap '' XFSZ; ulimit -f {}; exec {runner} \"$0\" run --config \"$1\"",
            kib * 2
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(bin("servogate"))
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::inherit())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file"))
            .spawn()
            .expect("start servogate");
        Self {
            child,
            _dir: dir,
            config: path,
        }
    }

    /// What it wrote to standard error so far, when started with a file there
    /// ([`Servogate::start_with_file_limit`]).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The process id (for /proc/PID/stat).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown at all, as a crash or an OOM kill.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY-free: kill(2) on our own child's pid.
        unsafe_free_sigterm(self.child.id());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "servogate did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Servogate {
    /// Writes `config` over the running config file and sends SIGHUP.
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
        signal(self.child.id(), "-HUP");
    }
}

fn unsafe_free_sigterm(pid: u32) {
    signal(pid, "-TERM");
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

/// `GET /metrics` from a servogate's metrics endpoint on 127.0.0.1:`port`: the body.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The value of the sample `series` (name with its labels, exactly as exposed).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `pred` holds for the exposition (each scrape is a fresh reading of the
/// daemon's counters), or panics after [`DEADLINE`].
pub async fn scrape_until(port: u16, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        // Refused while the endpoint is not listening yet (the daemon is starting).
        let up = tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await
        .unwrap();
        let mut text = String::from("(the endpoint never answered)");
        if up {
            text = tokio::task::spawn_blocking(move || scrape(port))
                .await
                .unwrap();
            if pred(&text) {
                return text;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "metrics never showed {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Servogate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as the subscriber saw it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub retain: bool,
    pub json: Value,
    /// The payload's bytes as they arrived.
    pub payload: Vec<u8>,
    pub at: Instant,
}

impl Msg {
    /// `(device, stream)` of a `{prefix}/devices/{device}/{stream}` topic.
    pub fn device_stream(&self) -> Option<(&str, &str)> {
        let mut parts = self.topic.rsplitn(3, '/');
        let stream = parts.next()?;
        let device = parts.next()?;
        parts
            .next()?
            .ends_with("/devices")
            .then_some((device, stream))
    }
}

/// Subscribes to `{prefix}/#` and keeps reconnecting (and resubscribing) forever.
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<Msg>,
    subscribed: tokio::sync::watch::Receiver<u64>,
}

impl Subscriber {
    /// Connects and returns once the subscription is acknowledged.
    pub async fn start(port: u16, filter: &str) -> Self {
        let mut opts = MqttOptions::new(format!("e2e-{}", free_port()), "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, subscribed) = tokio::sync::watch::channel(0u64);
        let filter = filter.to_owned();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        sub_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        // An empty payload clears a retained topic (a removed device).
                        let json = if p.payload.is_empty() {
                            Value::Null
                        } else if p.topic.ends_with("/cmd") {
                            // Commands in (a test's own, some deliberately not JSON).
                            Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                        } else {
                            serde_json::from_slice(&p.payload)
                                .unwrap_or_else(|e| panic!("{}: payload is not JSON: {e}", p.topic))
                        };
                        let msg = Msg {
                            topic: p.topic,
                            retain: p.retain,
                            json,
                            payload: p.payload.to_vec(),
                            at: Instant::now(),
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        let mut s = Self { rx, subscribed };
        s.wait_subscribed(1).await;
        s
    }

    /// Waits until the broker acknowledged the `n`th subscription (one per connection).
    pub async fn wait_subscribed(&mut self, n: u64) {
        tokio::time::timeout(DEADLINE, self.subscribed.wait_for(|&k| k >= n))
            .await
            .expect("subscription acknowledged")
            .expect("subscriber running");
    }

    pub fn subscriptions(&self) -> u64 {
        *self.subscribed.borrow()
    }

    /// The next message, or a panic after [`DEADLINE`].
    pub async fn next(&mut self) -> Msg {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("a message within the deadline")
            .expect("subscriber running")
    }

    /// Skips messages until one satisfies `pred`.
    pub async fn until(&mut self, mut pred: impl FnMut(&Msg) -> bool) -> Msg {
        loop {
            let m = self.next().await;
            if pred(&m) {
                return m;
            }
        }
    }
}

/// A servogate config for the tests: `units` axes on one pty bus with the servosim
/// register map (including the model clock, so every value can be checked).
pub fn config(id: &str, broker_url: &str, port: &Path, units: &[u8], device_extra: &str) -> String {
    let mut s = format!(
        r#"[gateway]
id = "{id}"

[mqtt]
url = "{broker_url}"
reconnect_min = "50ms"
reconnect_max = "500ms"

[buffer]
capacity = 200000

[profiles.sim]
position    = {{ address = 0x0000, type = "i32", scale = 0.001, unit = "mm" }}
velocity    = {{ address = 0x0002, type = "i32", scale = 0.001, unit = "mm/s" }}
torque      = {{ address = 0x0004, type = "i16", scale = 0.1, unit = "%" }}
current     = {{ address = 0x0005, type = "i16", scale = 0.01, unit = "A" }}
temperature = {{ address = 0x0006, type = "i16", scale = 0.1, unit = "degC" }}
statusword  = {{ address = 0x0007, type = "u16" }}
fault_code  = {{ address = 0x0008, type = "u16" }}
t_ms        = {{ address = 0x000A, type = "u32", word_order = "low_first", unit = "ms" }}

[[buses]]
name = "rs485-a"
protocol = "modbus-rtu"
port = "{port}"
baud = 115200
timeout = "50ms"
t35 = "0ms"
"#,
        port = port.display()
    );
    for u in units {
        s.push_str(&format!(
            "\n[[devices]]\nname = \"axis-{u}\"\nbus = \"rs485-a\"\nunit = {u}\nprofile = \"sim\"\npoll = \"10ms\"\n{device_extra}\n"
        ));
    }
    s
}

/// A [`config`] of three units on one pty whose profile maps the command registers of
/// servosim (controlword, targets, `speed_limit`), with `policy` on every device. Lines of
/// `policy` after a `# tail` line are gateway-wide tables: they go once, at the end.
pub fn command_config(id: &str, broker: &str, port: &Path, policy: &str) -> String {
    let (policy, tail) = policy.split_once("# tail\n").unwrap_or((policy, ""));
    let base = config(id, broker, port, &[1, 2, 3], policy) + "\n" + tail;
    base.replace(
        "[[buses]]",
        r#"target_position    = { address = 0x0010, type = "i32", scale = 0.001, unit = "mm" }
controlword        = { address = 0x0012, type = "u16" }
modes_of_operation = { address = 0x0013, type = "i16" }
profile_velocity   = { address = 0x0014, type = "u32", scale = 0.001, unit = "mm/s" }
target_velocity    = { address = 0x0016, type = "i32", scale = 0.001, unit = "mm/s" }
speed_limit        = { address = 0x0018, type = "u16", unit = "mm/s" }

[[buses]]"#,
    )
}

/// The simulator's registers for `unit` at model time `t_ms`, decoded the way the test
/// profile decodes them: (position, velocity, torque, current, temperature, statusword).
pub fn truth(unit: u8, t_ms: u32) -> [f64; 6] {
    use servosim::model;
    let r = model::registers(unit, t_ms, &model::DriveState::running(t_ms));
    let i32_at = |i: usize| f64::from(((u32::from(r[i]) << 16) | u32::from(r[i + 1])) as i32);
    let i16_at = |i: usize| f64::from(r[i] as i16);
    [
        i32_at(0) / 1000.0,
        i32_at(2) / 1000.0,
        i16_at(4) / 10.0,
        i16_at(5) / 100.0,
        i16_at(6) / 10.0,
        f64::from(r[7]),
    ]
}

/// Checks one telemetry payload of `axis-{unit}` against the simulator's truth.
pub fn assert_matches_truth(device: &str, json: &Value) {
    let unit: u8 = device.trim_start_matches("axis-").parse().expect("axis-N");
    let t_ms = json["values"]["t_ms"].as_f64().expect("t_ms value") as u32;
    let want = truth(unit, t_ms);
    for (i, key) in [
        "position",
        "velocity",
        "torque",
        "current",
        "temperature",
        "statusword",
    ]
    .iter()
    .enumerate()
    {
        let got = json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{device}: no {key} in {json}"));
        assert!(
            (got - want[i]).abs() <= want[i].abs() * 1e-12,
            "{device} at t_ms={t_ms}: {key} = {got}, the simulator had {}",
            want[i]
        );
    }
}

/// The vcan interface the CANopen tests use, when this kernel has it.
///
/// This family of machines runs a kernel without CAN: there the tests print why they are
/// skipped and pass, and `scripts/vm/can-tests.sh` runs them inside a VM that has vcan0,
/// with `SERVOGATE_REQUIRE_VCAN=1`, which turns a missing vcan0 into a failure.
pub fn vcan() -> Option<&'static str> {
    const IFACE: &str = "vcan0";
    if Path::new("/sys/class/net").join(IFACE).exists() {
        return Some(IFACE);
    }
    assert!(
        std::env::var_os("SERVOGATE_REQUIRE_VCAN").is_none(),
        "SERVOGATE_REQUIRE_VCAN is set but there is no {IFACE}"
    );
    println!("skipped: no {IFACE} on this kernel (scripts/vm/can-tests.sh runs this in a VM)");
    None
}

impl Servosim {
    /// `servosim canopen` on `interface`, running `nodes`.
    pub fn start_can(interface: &str, nodes: &str, extra: &[&str]) -> Self {
        Self::spawn(
            &["canopen", "--interface", interface, "--nodes", nodes],
            extra,
        )
    }
}

/// The heartbeat time the CANopen tests configure (servogate writes it into each drive):
/// long enough that an emulated CPU under load (TCG in CI) does not make drives flap
/// offline, short enough to test offline detection.
pub const HEARTBEAT_MS: u64 = 300;

/// The CANopen part of a test config: bus `can-a` on `interface` with drives `nodes`
/// (devices `drive-N`), scaled to servosim's units, its model time mapped in TPDO3.
pub fn can_config(interface: &str, nodes: &[u8], device_extra: &str) -> String {
    let mut s = format!(
        // SDO answers take tens of ms on an emulated CPU under load (TCG in CI).
        "\n[[buses]]\nname = \"can-a\"\nprotocol = \"canopen\"\ninterface = \"{interface}\"\nsdo_timeout = \"1s\"\n"
    );
    for n in nodes {
        s.push_str(&format!(
            r#"
[[devices]]
name = "drive-{n}"
bus = "can-a"
node = {n}
profile = "cia402"
heartbeat = "{HEARTBEAT_MS}ms"
objects = [
  {{ name = "position", scale = 0.001, unit = "mm" }},
  {{ name = "velocity", scale = 0.001, unit = "mm/s" }},
  {{ name = "torque", scale = 0.1, unit = "%" }},
  {{ name = "current", scale = 0.001, unit = "A" }},
  {{ name = "temperature", index = 0x2010, type = "i16", scale = 0.1, unit = "degC" }},
  {{ name = "t_ms", index = 0x2000, type = "u32", unit = "ms" }},
]
{device_extra}
"#
        ));
    }
    s
}

/// A broker-only head for a config with no Modbus bus.
pub fn head(id: &str, broker_url: &str) -> String {
    format!(
        "[gateway]\nid = \"{id}\"\n\n[mqtt]\nurl = \"{broker_url}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\n[buffer]\ncapacity = 200000\n"
    )
}

/// Checks one telemetry payload of `drive-{node}` against the model at the `t_ms` its
/// TPDO3 carried: each value within half a step of the resolution servosim sends it at.
pub fn assert_can_matches_truth(device: &str, json: &Value) {
    use servosim::model;
    let node: u8 = device
        .trim_start_matches("drive-")
        .parse()
        .expect("drive-N");
    let t_ms = json["values"]["t_ms"].as_f64().expect("t_ms value") as u32;
    let s = model::sample(node, t_ms);
    let want = [
        ("position", s.position_mm, 0.001),
        ("velocity", s.velocity_mm_s, 0.001),
        ("torque", s.torque_pct, 0.1),
        ("current", s.current_a, 0.001),
        ("temperature", s.temperature_c, 0.1),
    ];
    for (key, value, step) in want {
        let got = json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{device}: no {key} in {json}"));
        assert!(
            (got - value).abs() <= step / 2.0 + 1e-9,
            "{device} at t_ms={t_ms}: {key} = {got}, the model had {value}"
        );
    }
    assert_eq!(json["state"], "operation_enabled", "{device}: {json}");
}

/// `config` (from [`config`] or [`head`]) speaking MQTT 5 to its broker, with up to
/// `aliases` topic aliases (0: none).
pub fn mqtt5(config: &str, aliases: u16) -> String {
    assert!(config.contains("[mqtt]\n"), "a config with an [mqtt] table");
    config.replacen(
        "[mqtt]\n",
        &format!("[mqtt]\nversion = 5\ntopic_aliases = {aliases}\n"),
        1,
    )
}

/// One message an MQTT 5 [`Requester`] received, with its Correlation Data.
#[derive(Debug, Clone)]
pub struct Reply {
    pub topic: String,
    pub json: Value,
    pub payload: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
    pub user: Vec<(String, String)>,
}

/// An MQTT 5 client as a plant application would use one: it publishes commands with a
/// Response Topic, Correlation Data and a Message Expiry, and receives what comes back on
/// its reply filter.
pub struct Requester {
    client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<Reply>,
}

impl Requester {
    /// Connects and returns once `reply_filter` is subscribed.
    pub async fn start(port: u16, reply_filter: &str) -> Self {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::mqttbytes::QoS as Q5;
        use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};
        let mut opts = Options5::new(format!("e2e-v5-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = Client5::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut subscribed) = tokio::sync::watch::channel(false);
        let filter = reply_filter.to_owned();
        let sub_client = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event5::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub_client.try_subscribe(filter.clone(), Q5::AtLeastOnce);
                    }
                    Ok(Event5::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(true);
                    }
                    Ok(Event5::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let reply = Reply {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            json: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                            payload: p.payload.to_vec(),
                            correlation: props.correlation_data.map(|c| c.to_vec()),
                            user: props.user_properties,
                        };
                        if tx.send(reply).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed.wait_for(|s| *s))
            .await
            .expect("reply filter subscribed")
            .expect("requester running");
        Self { client, rx }
    }

    /// Publishes `payload` (QoS 1) on `topic` with the given MQTT 5 properties.
    pub async fn send(
        &self,
        topic: &str,
        payload: &str,
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
        expiry_s: Option<u32>,
    ) {
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        use rumqttc::v5::mqttbytes::QoS as Q5;
        let props = PublishProperties {
            response_topic: response_topic.map(str::to_owned),
            correlation_data: correlation.map(bytes::Bytes::copy_from_slice),
            message_expiry_interval: expiry_s,
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, Q5::AtLeastOnce, false, payload.to_owned(), props)
            .await
            .expect("publish");
    }

    /// The next message on the reply filter, or a panic after [`DEADLINE`].
    pub async fn next(&mut self) -> Reply {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("a reply within the deadline")
            .expect("requester running")
    }
}

/// One Sparkplug B message as a host application received it.
#[derive(Debug, Clone)]
pub struct SpbMsg {
    pub topic: servogate_sparkplug::Topic,
    pub raw_topic: String,
    /// The QoS it was delivered with (the host subscribes at QoS 1, so this is the
    /// publisher's QoS when it was 0).
    pub qos: u8,
    pub retain: bool,
    pub payload: servogate_sparkplug::Payload,
    /// A STATE message's JSON (it is not protobuf).
    pub state: Option<Value>,
}

impl SpbMsg {
    /// The message type (`None` for STATE).
    pub fn kind(&self) -> Option<servogate_sparkplug::MessageType> {
        match &self.topic {
            servogate_sparkplug::Topic::Node { kind, .. }
            | servogate_sparkplug::Topic::Device { kind, .. } => Some(*kind),
            servogate_sparkplug::Topic::State { .. } => None,
        }
    }

    /// The device of a device message.
    pub fn device(&self) -> Option<&str> {
        match &self.topic {
            servogate_sparkplug::Topic::Device { device, .. } => Some(device),
            _ => None,
        }
    }

    /// The metric named `name` (by name; aliases are resolved by [`Host`]).
    pub fn metric(&self, name: &str) -> Option<&servogate_sparkplug::Metric> {
        self.payload
            .metrics
            .iter()
            .find(|m| m.name.as_deref() == Some(name))
    }
}

/// A Sparkplug host application for the tests: subscribes to `spBv1.0/#`, decodes every
/// payload with the same protobuf types, and can publish NCMD / DCMD / STATE.
pub struct Host {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<SpbMsg>,
}

impl Host {
    /// Connects and returns once `spBv1.0/#` is subscribed.
    pub async fn start(port: u16) -> Self {
        use prost::Message as _;
        let mut opts = MqttOptions::new(format!("e2e-host-{}", free_port()), "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut subscribed) = tokio::sync::watch::channel(false);
        let sub_client = client.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = sub_client.try_subscribe("spBv1.0/#", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = sub_tx.send(true);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let topic = servogate_sparkplug::Topic::parse(&p.topic)
                            .unwrap_or_else(|| panic!("not a Sparkplug topic: {}", p.topic));
                        let (payload, state) = match topic {
                            servogate_sparkplug::Topic::State { .. } => (
                                servogate_sparkplug::Payload::default(),
                                serde_json::from_slice(&p.payload).ok(),
                            ),
                            _ => (
                                servogate_sparkplug::Payload::decode(p.payload.as_ref())
                                    .unwrap_or_else(|e| {
                                        panic!("{}: not a Sparkplug payload: {e}", p.topic)
                                    }),
                                None,
                            ),
                        };
                        let msg = SpbMsg {
                            topic,
                            raw_topic: p.topic,
                            qos: p.qos as u8,
                            retain: p.retain,
                            payload,
                            state,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed.wait_for(|s| *s))
            .await
            .expect("spBv1.0/# subscribed")
            .expect("host running");
        Self { client, rx }
    }

    /// The next message, or a panic after [`DEADLINE`].
    pub async fn next(&mut self) -> SpbMsg {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("a Sparkplug message within the deadline")
            .expect("host running")
    }

    /// Skips messages until one satisfies `pred`.
    pub async fn until(&mut self, mut pred: impl FnMut(&SpbMsg) -> bool) -> SpbMsg {
        loop {
            let m = self.next().await;
            if pred(&m) {
                return m;
            }
        }
    }

    /// Publishes a Sparkplug payload (QoS 0, as a host does for commands).
    pub async fn publish(&self, topic: &str, payload: &servogate_sparkplug::Payload) {
        use prost::Message as _;
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.encode_to_vec())
            .await
            .expect("publish");
    }

    /// Publishes this host's STATE (retained, QoS 1, JSON as Sparkplug 3.0 has it).
    pub async fn state(&self, host_id: &str, online: bool) {
        let body = serde_json::json!({"online": online, "timestamp": 0}).to_string();
        self.client
            .publish(
                format!("spBv1.0/STATE/{host_id}"),
                QoS::AtLeastOnce,
                true,
                body,
            )
            .await
            .expect("publish STATE");
    }
}
