//! The forwarder against a real mosquitto: the MQTT contract, delivery across a broker
//! crash, the Last Will, overflow accounting, refused oversize events, and TLS.

mod common;

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{sh, wait_until, Broker, Subscriber, TempDir};
use servogate_core::{
    Availability, AvailabilityState, DeviceEvents, EventBody, EventKind, EventSink, OnFull,
    Quality, Telemetry,
};
use servogate_mqtt::{
    DeviceMeta, Forwarder, ForwarderReport, MqttError, MqttSettings, MqttStats, Outbox, TlsFiles,
    Version,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "servogate/test";
const LIMIT: Duration = Duration::from_secs(20);

fn settings(url: &str, client_id: &str) -> MqttSettings {
    let mut s = MqttSettings::new(url, client_id, PREFIX);
    s.keep_alive = Duration::from_secs(5);
    s.reconnect_min = Duration::from_millis(50);
    s.reconnect_max = Duration::from_millis(400);
    s.shutdown_grace = Duration::from_secs(5);
    s
}

fn meta(name: &str) -> DeviceMeta {
    DeviceMeta {
        name: name.into(),
        bus: "rs485-a".into(),
        address: serde_json::json!(1),
        profile: "acme-ax".into(),
        fields: vec![
            ("position".into(), Some("mm".into())),
            ("statusword".into(), None),
        ],
    }
}

fn topic(device: &str, kind: &str) -> String {
    format!("{PREFIX}/devices/{device}/{kind}")
}

fn telemetry(dev: &mut DeviceEvents, position: f64) -> servogate_core::Event {
    let mut t = Telemetry::default();
    t.set(&Arc::from("position"), position);
    t.set(&Arc::from("statusword"), f64::from(0x0237u16));
    t.set(&Arc::from("dc_bus"), 48.0);
    dev.event(SystemTime::now(), EventBody::Telemetry(t))
}

fn availability(dev: &mut DeviceEvents, state: AvailabilityState) -> servogate_core::Event {
    let body = EventBody::Availability(Availability {
        state,
        since: SystemTime::now(),
        reason: "first reply".into(),
    });
    dev.event(SystemTime::now(), body)
}

struct Running {
    stats: Arc<MqttStats>,
    token: CancellationToken,
    task: JoinHandle<Result<ForwarderReport, MqttError>>,
}

impl Running {
    async fn shutdown(self) -> ForwarderReport {
        self.token.cancel();
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("forwarder stops within its grace")
            .unwrap()
            .unwrap()
    }
}

fn start(
    settings: MqttSettings,
    boot_id: &str,
    outbox: &Arc<Outbox>,
    metas: Vec<DeviceMeta>,
) -> Running {
    let fwd = Forwarder::new(
        settings,
        boot_id.into(),
        "0.1.0-test".into(),
        outbox.clone(),
        metas,
    )
    .expect("valid settings");
    let stats = fwd.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(fwd.run(token.clone()));
    Running { stats, token, task }
}

fn outbox(capacity: usize) -> Arc<Outbox> {
    Outbox::new(NonZeroUsize::new(capacity).unwrap(), OnFull::DropOldest)
}

/// `2026-01-01T00:00:00.123Z`: RFC 3339, UTC, milliseconds.
fn is_rfc3339_millis_utc(v: &serde_json::Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 24 && s.ends_with('Z') && humantime::parse_rfc3339(s).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn birth_meta_and_availability_are_retained_and_telemetry_arrives_in_seq_order() {
    let dir = TempDir::new("contract");
    let broker = Broker::start(dir.path(), "").await;
    let outbox = outbox(1000);
    let mut dev = DeviceEvents::new("axis-1");
    outbox.push(availability(&mut dev, AvailabilityState::Online));
    let fwd = start(
        settings(&broker.url(), "gw-contract"),
        "boot-a",
        &outbox,
        vec![meta("axis-1")],
    );

    // Birth and meta go before the ring and mosquitto acknowledges in order: once the
    // availability is acknowledged, all three are retained.
    wait_until("the availability acknowledged", LIMIT, || {
        outbox.stats().acked == 1
    })
    .await;
    let mut sub =
        Subscriber::connect(broker.port, &format!("{PREFIX}/#"), "sub-contract", true).await;
    let mut retained = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let m = sub.next(LIMIT).await;
        assert!(m.retain, "{} should arrive as retained", m.topic);
        retained.insert(m.topic.clone(), m.json);
    }
    let status = &retained[&format!("{PREFIX}/status")];
    assert_eq!(status["online"], true);
    assert_eq!(status["boot_id"], "boot-a");
    assert_eq!(status["version"], "0.1.0-test");
    assert!(is_rfc3339_millis_utc(&status["ts"]), "{status}");
    assert_eq!(
        retained[&topic("axis-1", "meta")],
        serde_json::json!({"bus":"rs485-a","address":1,"profile":"acme-ax",
            "fields":{"position":{"unit":"mm"},"statusword":{"unit":null}}})
    );
    let avail = &retained[&topic("axis-1", "availability")];
    assert_eq!(
        (avail["seq"].as_u64(), avail["state"].as_str()),
        (Some(1), Some("online"))
    );
    assert!(is_rfc3339_millis_utc(&avail["since"]) && is_rfc3339_millis_utc(&avail["ts"]));

    for i in 0..200 {
        outbox.push(telemetry(&mut dev, f64::from(i)));
    }
    let mut late = Telemetry {
        quality: Quality {
            late: true,
            out_of_range: false,
        },
        ..Telemetry::default()
    };
    late.set(&Arc::from("position"), 1.0);
    outbox.push(dev.event(SystemTime::now(), EventBody::Telemetry(late)));
    outbox.push(dev.notice(
        SystemTime::now(),
        EventKind::Fault {
            code: 0x2310,
            register: Some(2),
        },
        "overcurrent".into(),
    ));

    for seq in 1..=200u64 {
        let m = sub.next_on(&topic("axis-1", "telemetry"), LIMIT).await;
        assert!(!m.retain);
        let j = &m.json;
        assert_eq!(j["seq"].as_u64(), Some(seq), "telemetry in seq order");
        assert_eq!(j["quality"], "good");
        assert_eq!(j["position"].as_f64(), Some((seq - 1) as f64));
        assert_eq!(j["statusword"], 0x0237);
        assert_eq!(j["state"], "operation_enabled");
        assert_eq!(j["values"], serde_json::json!({"dc_bus":48.0}));
        assert!(is_rfc3339_millis_utc(&j["ts"]));
        assert!(j.get("velocity").is_none(), "absent fields are left out");
    }
    let m = sub.next_on(&topic("axis-1", "telemetry"), LIMIT).await;
    assert_eq!(m.json["quality"], "uncertain");
    assert_eq!(m.json["quality_reasons"], serde_json::json!(["late"]));
    let m = sub.next_on(&topic("axis-1", "events"), LIMIT).await;
    assert_eq!(
        (
            m.json["seq"].as_u64(),
            m.json["kind"].as_str(),
            m.json["code"].as_u64(),
            m.json["code_hex"].as_str()
        ),
        (Some(1), Some("fault"), Some(0x2310), Some("0x2310"))
    );

    let report = fwd.shutdown().await;
    assert_eq!(report.left_unacked, 0);
    assert!(report.clean_disconnect, "{report:?}");
    assert_eq!(report.ring.acked, report.ring.pushed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_loses_no_seq_and_the_ring_ends_empty() {
    let dir = TempDir::new("restart");
    // The subscriber's persistent session must survive the SIGKILL so the broker queues
    // what the forwarder re-publishes before the subscriber is back: persistence with a
    // 1 s autosave, and we wait for a save after the SUBACK.
    let persist = format!(
        "persistence true\npersistence_location {}/\nautosave_interval 1\n",
        dir.path().display()
    );
    let mut broker = Broker::start(dir.path(), &persist).await;
    let mut sub =
        Subscriber::connect(broker.port, &topic("+", "telemetry"), "sub-restart", false).await;
    let subscribed = SystemTime::now();
    let db = dir.path().join("mosquitto.db");
    wait_until("a persistence save after the subscription", LIMIT, || {
        std::fs::metadata(&db)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > subscribed)
    })
    .await;

    let outbox = outbox(100_000);
    let fwd = start(
        settings(&broker.url(), "gw-restart"),
        "boot-b",
        &outbox,
        vec![meta("axis-1")],
    );

    const N: u64 = 3000;
    // A steady 1 event/ms the subscriber keeps up with, so that mosquitto never holds an
    // acknowledged message in its own memory for the subscriber: SIGKILL would lose that
    // one, and no publisher can prevent it.
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let mut dev = DeviceEvents::new("axis-1");
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            for i in 0..N {
                tick.tick().await;
                outbox.push(telemetry(&mut dev, i as f64));
            }
        })
    };

    let mut seen = BTreeSet::new();
    let mut received = 0u64;
    while seen.len() < 500 {
        let m = sub.next(LIMIT).await;
        seen.insert(m.json["seq"].as_u64().unwrap());
        received += 1;
    }
    // The broker hangs, then dies: publishes pile up unacknowledged (rumqttc will discard
    // them on the new session), then SIGKILL.
    broker.freeze();
    let stats = fwd.stats.clone();
    wait_until("200 publishes in flight to the hung broker", LIMIT, || {
        let s = stats.snapshot();
        s.publishes - s.acks >= 200
    })
    .await;
    broker.kill().await;
    let killed_at = seen.len();
    // The scenario: the broker is away for 1.5 s while events keep coming.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.restart().await;

    while (seen.len() as u64) < N {
        let Ok(Some(m)) = tokio::time::timeout(LIMIT, sub.rx.recv()).await else {
            let missing: Vec<u64> = (1..=N).filter(|s| !seen.contains(s)).collect();
            panic!(
                "stalled with {} of {N} seqs; missing {}..{} ({} in all); ring {:?}; {:?}",
                seen.len(),
                missing[0],
                missing[missing.len() - 1],
                missing.len(),
                outbox.stats(),
                fwd.stats.snapshot(),
            );
        };
        seen.insert(m.json["seq"].as_u64().unwrap());
        received += 1;
    }
    producer.await.unwrap();
    assert_eq!(seen.first(), Some(&1));
    assert_eq!(seen.last(), Some(&N), "every seq from 1 to N arrived");

    wait_until("every event acknowledged", LIMIT, || {
        outbox.stats().unacked == 0
    })
    .await;
    let stats = fwd.stats.snapshot();
    let report = fwd.shutdown().await;
    eprintln!(
        "seen {killed_at} before the kill; {received} messages for {N} seqs \
         ({} duplicates); {stats:?}; {report:?}",
        received - N
    );
    assert!(stats.connects >= 2, "reconnected: {stats:?}");
    assert!(stats.connection_errors >= 1);
    assert!(
        stats.republished > 0,
        "events were in flight at the kill: {stats:?}"
    );
    assert_eq!(report.left_unacked, 0);
    assert_eq!(report.ring.len, 0, "the ring ends empty");
    assert_eq!(report.ring.acked, N);
    assert_eq!(report.ring.dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_announces_offline_when_the_forwarder_dies() {
    let dir = TempDir::new("will");
    let broker = Broker::start(dir.path(), "").await;
    let status = format!("{PREFIX}/status");
    let mut sub = Subscriber::connect(broker.port, &status, "sub-will", true).await;
    let outbox = outbox(10);
    let fwd = start(
        settings(&broker.url(), "gw-will"),
        "boot-c",
        &outbox,
        vec![],
    );
    let birth = sub.next_on(&status, LIMIT).await;
    assert_eq!(
        (
            birth.json["online"].as_bool(),
            birth.json["boot_id"].as_str()
        ),
        (Some(true), Some("boot-c"))
    );

    // Aborting the task drops the connection without DISCONNECT.
    fwd.task.abort();
    let will = sub.next_on(&status, LIMIT).await;
    assert_eq!(will.json["online"], false);
    assert_eq!(will.json["boot_id"], "boot-c");

    let mut late_comer = Subscriber::connect(broker.port, &status, "sub-will-2", true).await;
    let retained = late_comer.next_on(&status, LIMIT).await;
    assert!(retained.retain);
    assert_eq!(retained.json["online"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_publishes_offline_retained_without_firing_the_will() {
    let dir = TempDir::new("shutdown");
    let broker = Broker::start(dir.path(), "").await;
    let status = format!("{PREFIX}/status");
    let mut sub = Subscriber::connect(broker.port, &status, "sub-shutdown", true).await;
    let outbox = outbox(10);
    let fwd = start(
        settings(&broker.url(), "gw-shutdown"),
        "boot-d",
        &outbox,
        vec![],
    );
    assert_eq!(sub.next_on(&status, LIMIT).await.json["online"], true);

    let report = fwd.shutdown().await;
    assert!(report.clean_disconnect, "{report:?}");
    let bye = sub.next_on(&status, LIMIT).await;
    assert_eq!(
        (bye.json["online"].as_bool(), bye.json["boot_id"].as_str()),
        (Some(false), Some("boot-d"))
    );

    let mut late_comer = Subscriber::connect(broker.port, &status, "sub-shutdown-2", true).await;
    let retained = late_comer.next_on(&status, LIMIT).await;
    assert!(retained.retain && retained.json["online"] == false);
    // The broker saw a DISCONNECT (so it discards the will), not a dropped socket.
    wait_until("mosquitto to log the disconnect", LIMIT, || {
        broker.log().contains("Client gw-shutdown disconnected.")
    })
    .await;
    assert!(
        !broker
            .log()
            .contains("Client gw-shutdown closed its connection"),
        "{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_overflow_shows_as_a_seq_gap_equal_to_the_dropped_count() {
    let dir = TempDir::new("overflow");
    let broker = Broker::start(dir.path(), "").await;
    let outbox = outbox(100);
    let mut dev = DeviceEvents::new("axis-1");
    // The broker is not reached yet: 250 events into a ring of 100.
    for i in 0..250 {
        outbox.push(telemetry(&mut dev, f64::from(i)));
    }
    assert_eq!(outbox.stats().dropped, 150);
    let mut sub = Subscriber::connect(
        broker.port,
        &topic("axis-1", "telemetry"),
        "sub-overflow",
        true,
    )
    .await;
    let fwd = start(
        settings(&broker.url(), "gw-overflow"),
        "boot-e",
        &outbox,
        vec![],
    );

    let first = sub.next(LIMIT).await.json["seq"].as_u64().unwrap();
    let mut last = first;
    for _ in 1..100 {
        let seq = sub.next(LIMIT).await.json["seq"].as_u64().unwrap();
        assert_eq!(seq, last + 1, "no gap after the first");
        last = seq;
    }
    let gap = first - 1;
    assert_eq!(
        gap,
        outbox.stats().dropped,
        "the gap is exactly the dropped count"
    );
    assert_eq!(last, 250);

    // Delivery goes on contiguously after the overflow (once the PUBACKs emptied the ring,
    // so these ten cannot overflow it again).
    wait_until("the ring to empty", LIMIT, || outbox.stats().len == 0).await;
    for i in 0..10 {
        outbox.push(telemetry(&mut dev, f64::from(i)));
    }
    for seq in 251..=260 {
        assert_eq!(sub.next(LIMIT).await.json["seq"].as_u64(), Some(seq));
    }
    let report = fwd.shutdown().await;
    assert_eq!((report.ring.dropped, report.left_unacked), (150, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_event_is_refused_counted_and_does_not_block_the_ring() {
    let dir = TempDir::new("oversize");
    let broker = Broker::start(dir.path(), "").await;
    let outbox = outbox(100);
    let mut sub = Subscriber::connect(
        broker.port,
        &topic("axis-1", "telemetry"),
        "sub-oversize",
        true,
    )
    .await;
    let mut s = settings(&broker.url(), "gw-oversize");
    s.max_packet_size = 1024;
    let fwd = start(s, "boot-f", &outbox, vec![]);

    let mut dev = DeviceEvents::new("axis-1");
    let mut big = Telemetry::default();
    for i in 0..100 {
        big.set(&Arc::from(format!("a_rather_long_value_name_{i}")), 1.0);
    }
    outbox.push(dev.event(SystemTime::now(), EventBody::Telemetry(big)));
    outbox.push(telemetry(&mut dev, 2.0));

    let m = sub.next(LIMIT).await;
    assert_eq!(m.json["seq"], 2, "seq 1 was refused, seq 2 still arrives");
    wait_until("the ring to empty", LIMIT, || outbox.stats().len == 0).await;
    let stats = fwd.stats.snapshot();
    assert_eq!(stats.refused, 1);
    assert_eq!(stats.connects, 1, "the connection was never dropped");
    fwd.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_connects_and_a_wrong_ca_never_does() {
    let dir = TempDir::new("tls");
    let d = dir.path();
    // A CA, a server cert for 127.0.0.1 and a client cert; and an unrelated CA.
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(
        &format!("openssl req -x509 {ec} -keyout ca.key -out ca.crt -subj /CN=test-ca -days 2"),
        d,
    );
    sh(
        &format!(
            "openssl req -x509 {ec} -keyout other.key -out other.crt -subj /CN=other-ca -days 2"
        ),
        d,
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "127.0.0.1"), ("client", "gw-tls")] {
        sh(
            &format!("openssl req {ec} -keyout {name}.key -out {name}.csr -subj /CN={cn}"),
            d,
        );
        sh(
            &format!(
                "openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
             -out {name}.crt -days 2 -extfile {name}.ext"
            ),
            d,
        );
    }
    let tls_port = common::free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/server.crt\n\
         keyfile {p}/server.key\nrequire_certificate true\n",
        p = d.display()
    );
    let broker = Broker::start(d, &extra).await;
    let status = format!("{PREFIX}/status");
    let mut sub = Subscriber::connect(broker.port, &format!("{PREFIX}/#"), "sub-tls", true).await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let files = |ca: &str| TlsFiles {
        ca: d.join(ca),
        client_cert: Some(d.join("client.crt")),
        client_key: Some(d.join("client.key")),
    };

    let mut wrong = settings(&url, "gw-tls-wrong");
    wrong.tls = Some(files("other.crt"));
    let bad = start(wrong, "boot-wrong", &outbox(10), vec![]);
    wait_until("failed TLS handshakes", LIMIT, || {
        bad.stats.snapshot().connection_errors >= 2
    })
    .await;
    assert_eq!(
        bad.stats.snapshot().connects,
        0,
        "a server cert from another CA is refused"
    );
    bad.task.abort();

    // The right CA, on MQTT 3.1.1 and on MQTT 5.
    for (version, boot) in [(Version::V311, "boot-tls"), (Version::V5, "boot-tls5")] {
        let mut good = settings(&url, boot);
        good.tls = Some(files("ca.crt"));
        good.version = version;
        let outbox = outbox(10);
        let fwd = start(good, boot, &outbox, vec![]);
        let birth = loop {
            let m = sub.next_on(&status, LIMIT).await;
            if m.json["boot_id"] == boot {
                break m;
            }
        };
        assert_eq!(birth.json["online"], true, "{version:?}");
        let mut dev = DeviceEvents::new("axis-1");
        outbox.push(telemetry(&mut dev, 1.0));
        assert_eq!(
            sub.next_on(&topic("axis-1", "telemetry"), LIMIT).await.json["seq"],
            1
        );
        let report = fwd.shutdown().await;
        assert!(report.clean_disconnect, "{version:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_telemetry_leaves_the_ring_once_written() {
    let dir = TempDir::new("qos0");
    let broker = Broker::start(dir.path(), "").await;
    let outbox = outbox(1000);
    let mut sub =
        Subscriber::connect(broker.port, &topic("axis-1", "telemetry"), "sub-qos0", true).await;
    let mut s = settings(&broker.url(), "gw-qos0");
    s.telemetry_qos = 0;
    let fwd = start(s, "boot-g", &outbox, vec![]);
    let mut dev = DeviceEvents::new("axis-1");
    for i in 0..500 {
        outbox.push(telemetry(&mut dev, f64::from(i)));
    }
    for seq in 1..=500u64 {
        assert_eq!(sub.next(LIMIT).await.json["seq"].as_u64(), Some(seq));
    }
    wait_until("the ring to empty", LIMIT, || outbox.stats().len == 0).await;
    let report = fwd.shutdown().await;
    assert_eq!((report.ring.acked, report.left_unacked), (500, 0));
    assert!(report.clean_disconnect);
}

#[test]
fn a_missing_tls_file_fails_at_start_naming_the_file() {
    let mut s = settings("mqtts://127.0.0.1:8883", "gw");
    s.tls = Some(TlsFiles {
        ca: "/nonexistent/ca.crt".into(),
        client_cert: None,
        client_key: None,
    });
    let err = Forwarder::new(s, "b".into(), "v".into(), outbox(1), vec![]).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
}
