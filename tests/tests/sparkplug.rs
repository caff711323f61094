//! Sparkplug B 3.0 conformance of the edge node, end to end: a real mosquitto, servosim on
//! a pty, the servogate binary, and a test host (`Host`) that decodes every message with
//! the same protobuf types. Each test is named after the `tck-id-...` statements of the
//! specification it checks; commands are checked at the drive (servosim's counters).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use servogate_e2e::*;
use servogate_sparkplug::{DataType, MessageType as T, Metric, MetricValue, Payload};

const ID: &str = "e2e-spb";
const GROUP: &str = "plant-1";

/// `base` (a test config) publishing `contract`, as edge node `e2e-spb` of `plant-1`.
fn spb(base: String, contract: &str, sparkplug_extra: &str) -> String {
    let c = base.replacen(
        "[mqtt]\n",
        &format!("[mqtt]\ncontract = \"{contract}\"\n"),
        1,
    );
    format!(
        "{c}\n[sparkplug]\ngroup_id = \"{GROUP}\"\nedge_node_id = \"{ID}\"\n{sparkplug_extra}\n"
    )
}

fn node_topic(kind: &str) -> String {
    format!("spBv1.0/{GROUP}/{kind}/{ID}")
}

fn bd_seq(m: &SpbMsg) -> u64 {
    match m.metric("bdSeq").and_then(|x| x.value.clone()) {
        Some(MetricValue::LongValue(v)) => v,
        other => panic!("no bdSeq in {}: {other:?}", m.raw_topic),
    }
}

fn string(m: &Metric) -> Option<&str> {
    match &m.value {
        Some(MetricValue::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Rig {
    broker: Mosquitto,
    _pty: PtyPair,
    sim: Servosim,
    gw: Servogate,
    host: Host,
}

/// Three servosim units, a host on the broker, the gateway started with `config(url, pty)`.
async fn rig(config: impl FnOnce(&str, &std::path::Path) -> String) -> Rig {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let sim = Servosim::start(&pty.sim, "1-3", &[]);
    let host = Host::start(broker.port).await;
    let gw = Servogate::start(&config(&broker.url(), &pty.gateway));
    Rig {
        broker,
        _pty: pty,
        sim,
        gw,
        host,
    }
}

fn plain(url: &str, pty: &std::path::Path) -> String {
    spb(config(ID, url, pty, &[1, 2, 3], ""), "sparkplug", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tck_topic_namespace_nbirth_dbirth_ddata_qos0_seq_wraps_and_every_ddata_metric_was_born() {
    let mut r = rig(plain).await;
    // tck-id-topic-structure-namespace-a, tck-id-topics-nbirth-topic: the NBIRTH first.
    let nbirth = r.host.next().await;
    assert_eq!(nbirth.raw_topic, node_topic("NBIRTH"));
    // tck-id-topics-nbirth-mqtt: QoS 0, not retained.
    assert_eq!((nbirth.qos, nbirth.retain), (0, false));
    // tck-id-payloads-nbirth-seq: seq 0.
    assert_eq!(nbirth.payload.seq, Some(0));
    // tck-id-payloads-nbirth-bdseq: a bdSeq metric, Int64.
    let bd = nbirth.metric("bdSeq").expect("bdSeq");
    assert_eq!(bd.datatype, Some(DataType::Int64 as u32));
    // tck-id-payloads-nbirth-rebirth-req: Node Control/Rebirth, Boolean, false.
    let rebirth = nbirth
        .metric("Node Control/Rebirth")
        .expect("rebirth metric");
    assert_eq!(rebirth.value, Some(MetricValue::BooleanValue(false)));
    assert!(nbirth.payload.timestamp.is_some());
    assert!(nbirth.metric("Node Info/Version").is_some());

    // Then a DBIRTH per device, and DDATA: seq +1 (mod 256) on every message of the
    // node (tck-id-payloads-sequence-num-incrementing), past a wrap.
    let mut expect: u64 = 1;
    let mut born: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut data = 0;
    let mut wrapped = false;
    while data < 400 {
        let m = r.host.next().await;
        assert_eq!(m.payload.seq, Some(expect % 256), "{}", m.raw_topic);
        if expect.is_multiple_of(256) {
            wrapped = true;
        }
        expect += 1;
        assert_eq!((m.qos, m.retain), (0, false), "{}", m.raw_topic);
        let device = m.device().expect("a device message").to_owned();
        match m.kind() {
            Some(T::DBirth) => {
                // tck-id-payloads-dbirth-...: every metric with a name and a datatype; a
                // scaled field is a Double with its unit and scale as properties.
                let pos = m.metric("position").expect("position");
                assert_eq!(pos.datatype, Some(DataType::Double as u32));
                let props = pos.properties.as_ref().expect("properties");
                let unit = props.get("engUnit").expect("engUnit");
                assert_eq!(
                    unit.value,
                    Some(servogate_sparkplug::proto::PropertyValueKind::StringValue(
                        "mm".into()
                    ))
                );
                let t = m.metric("t_ms").expect("t_ms");
                assert_eq!(t.datatype, Some(DataType::UInt32 as u32), "unscaled u32");
                let names = m.payload.metrics.iter().filter_map(|x| x.name.clone());
                born.insert(device, names.collect());
            }
            Some(T::DData) => {
                let names = born.get(&device).expect("DDATA after its device's DBIRTH");
                for x in &m.payload.metrics {
                    let n = x.name.as_deref().expect("named (no aliases)");
                    assert!(names.contains(n), "{device}: {n} was not in the DBIRTH");
                }
                // The values are the drive's: position at the sample's model time.
                let unit: u8 = device.trim_start_matches("axis-").parse().unwrap();
                let t_ms = match m.metric("t_ms").and_then(|x| x.value.clone()) {
                    Some(MetricValue::IntValue(v)) => v,
                    other => panic!("t_ms: {other:?}"),
                };
                let want = truth(unit, t_ms)[0];
                match m.metric("position").and_then(|x| x.value.clone()) {
                    Some(MetricValue::DoubleValue(v)) => {
                        assert!((v - want).abs() < 1e-6, "{device}: {v} != {want}")
                    }
                    other => panic!("position: {other:?}"),
                }
                data += 1;
            }
            other => panic!("unexpected {other:?} on {}", m.raw_topic),
        }
    }
    assert_eq!(born.len(), 3);
    assert!(wrapped, "seq went past 255 back to 0");
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tck_ndeath_is_the_will_with_the_nbirth_bdseq_and_the_broker_sends_it_when_the_gateway_dies(
) {
    let mut r = rig(plain).await;
    let nbirth = r.host.until(|m| m.kind() == Some(T::NBirth)).await;
    r.host.until(|m| m.kind() == Some(T::DData)).await;
    // SIGKILL: no goodbye from the gateway; the broker publishes the Will.
    r.gw.kill();
    let ndeath = r.host.until(|m| m.kind() == Some(T::NDeath)).await;
    assert_eq!(ndeath.raw_topic, node_topic("NDEATH"));
    // tck-id-payloads-ndeath-bdseq / tck-id-payloads-nbirth-bdseq-repeat: the same bdSeq.
    assert_eq!(bd_seq(&ndeath), bd_seq(&nbirth));
    // tck-id-topics-ndeath-payload / -mqtt: no seq, QoS 1, not retained.
    assert_eq!(ndeath.payload.seq, None);
    assert_eq!((ndeath.qos, ndeath.retain), (1, false));

    // A new gateway: a new bdSeq? A new process starts again from 0 (the number says which
    // connection of one run a death belongs to); its NBIRTH and Will agree again.
    let cfg = plain(&r.broker.url(), &r._pty.gateway);
    let mut gw = Servogate::start(&cfg);
    let again = r.host.until(|m| m.kind() == Some(T::NBirth)).await;
    assert_eq!(again.payload.seq, Some(0));
    // A clean stop says NDEATH itself, with its bdSeq.
    assert!(gw.stop().success());
    let bye = r.host.until(|m| m.kind() == Some(T::NDeath)).await;
    assert_eq!(bd_seq(&bye), bd_seq(&again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tck_a_connection_loss_makes_ndeath_then_nbirth_with_a_new_bdseq_and_held_data_goes_out_historical_behind_live_data(
) {
    let broker = Mosquitto::start();
    let gate = Gate::start(broker.port).await;
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut host = Host::start(broker.port).await;
    // Held data at 200 messages a second: a 500 ms backlog takes longer than that to go.
    let cfg = spb(
        config(ID, &gate.url(), &pty.gateway, &[1, 2, 3], ""),
        "sparkplug",
        "historical_rate = 200",
    );
    let mut gw = Servogate::start(&cfg);
    let first = host.until(|m| m.kind() == Some(T::NBirth)).await;
    host.until(|m| m.kind() == Some(T::DData)).await;

    // The gateway's connection is cut for a moment: the broker sends its Will.
    gate.close();
    let cut = Instant::now();
    let death = host.until(|m| m.kind() == Some(T::NDeath)).await;
    assert_eq!(bd_seq(&death), bd_seq(&first));
    // Samples keep being acquired meanwhile (polling never stops).
    while cut.elapsed() < Duration::from_millis(500) {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.open();
    // tck-id-payloads-nbirth-bdseq-increment: a new bdSeq with every CONNECT (attempts
    // made while the path was cut count too).
    let second = host.until(|m| m.kind() == Some(T::NBirth)).await;
    let step = (bd_seq(&second) + 256 - bd_seq(&first)) % 256;
    assert!(
        (1..=20).contains(&step),
        "bdSeq {} after {}",
        bd_seq(&second),
        bd_seq(&first)
    );
    assert_eq!(second.payload.seq, Some(0));
    let born_ms = second.payload.timestamp.unwrap();
    // Births, then live data first and what was held while away behind it, paced: the
    // held samples flagged historical, in order, all acquired before the birth.
    let (mut historical, mut live, mut births) = (0, 0, 0);
    let mut last_hist_ts = 0;
    let (mut first_live, mut last_hist) = (None, 0);
    let mut index = 0;
    while live < 300 {
        let m = host.next().await;
        index += 1;
        match m.kind() {
            Some(T::DBirth) => {
                assert_eq!(historical + live, 0, "births come first");
                births += 1;
            }
            Some(T::DData) => {
                let hist = m.payload.metrics[0].is_historical == Some(true);
                let ts = m.payload.metrics[0].timestamp.unwrap();
                if hist {
                    assert!(
                        ts < born_ms,
                        "a historical sample was acquired before the birth"
                    );
                    assert!(ts >= last_hist_ts, "historical data in order");
                    last_hist_ts = ts;
                    historical += 1;
                    last_hist = index;
                } else {
                    first_live.get_or_insert(index);
                    live += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(births, 3);
    assert!(
        first_live.is_some_and(|f| f < last_hist),
        "live data flowed while the backlog went out (first live at {first_live:?}, last held at {last_hist})"
    );
    assert!(
        historical > 10,
        "{historical} historical samples after a 500 ms cut"
    );
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tck_rebirth_ncmd_keeps_bdseq_restarts_seq_at_0_and_a_storm_of_requests_makes_one_rebirth()
{
    let metrics = free_port();
    let mut r = rig(|url, pty| {
        let base = config(ID, url, pty, &[1, 2, 3], "").replacen(
            "[buffer]",
            &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n[buffer]"),
            1,
        );
        spb(base, "sparkplug", "rebirth_interval = \"500ms\"")
    })
    .await;
    let first = r.host.until(|m| m.kind() == Some(T::NBirth)).await;
    r.host.until(|m| m.kind() == Some(T::DData)).await;
    let rebirth = Payload {
        timestamp: Some(now_ms()),
        metrics: vec![Metric {
            name: Some("Node Control/Rebirth".into()),
            datatype: Some(DataType::Boolean as u32),
            value: Some(MetricValue::BooleanValue(true)),
            ..Metric::default()
        }],
        ..Payload::default()
    };
    // A storm: twenty requests at once.
    for _ in 0..20 {
        r.host.publish(&node_topic("NCMD"), &rebirth).await;
    }
    let sent = Instant::now();
    // tck-id-operational-behavior-edge-node-birth-sequence-...: NBIRTH, same bdSeq, seq 0,
    // on the same connection (no NDEATH), then every device born again.
    let nbirth = r
        .host
        .until(|m| {
            assert_ne!(m.kind(), Some(T::NDeath), "a rebirth needs no reconnect");
            m.kind() == Some(T::NBirth)
        })
        .await;
    assert_eq!(bd_seq(&nbirth), bd_seq(&first));
    assert_eq!(nbirth.payload.seq, Some(0));
    let mut reborn = BTreeSet::new();
    while reborn.len() < 3 {
        let m = r.host.next().await;
        if m.kind() == Some(T::DBirth) {
            reborn.insert(m.device().unwrap().to_owned());
        }
    }
    // The storm coalesced: no second NBIRTH for two rebirth intervals after it.
    let mut births = 0;
    while sent.elapsed() < Duration::from_millis(1500) {
        let m = r.host.next().await;
        births += usize::from(m.kind() == Some(T::NBirth));
    }
    assert_eq!(births, 0, "twenty requests made more than one rebirth");
    // The metrics say so too: twenty requests, two NBIRTHs (the session's and the rebirth).
    let text = scrape_until(metrics, "the requests counted", |t| {
        sample(t, "servogate_sparkplug_rebirth_requests_total") == Some(20.0)
    })
    .await;
    assert_eq!(sample(&text, "servogate_sparkplug_births_total"), Some(2.0));
    assert_eq!(sample(&text, "servogate_sparkplug_connected"), Some(1.0));
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tck_ddeath_when_a_device_goes_offline_and_dbirth_when_it_comes_back() {
    let mut r = rig(plain).await;
    r.host.until(|m| m.kind() == Some(T::DData)).await;
    r.sim.cmd("dead 2");
    // tck-id-topics-ddeath-...: DDEATH of axis-2, QoS 0, with a seq of the node's.
    let death = r
        .host
        .until(|m| m.kind() == Some(T::DDeath) && m.device() == Some("axis-2"))
        .await;
    assert!(death.payload.seq.is_some());
    assert_eq!((death.qos, death.retain), (0, false));
    r.sim.cmd("alive 2");
    let birth = r
        .host
        .until(|m| m.kind() == Some(T::DBirth) && m.device() == Some("axis-2"))
        .await;
    assert!(birth.metric("position").is_some());
    // And its data again.
    r.host
        .until(|m| m.kind() == Some(T::DData) && m.device() == Some("axis-2"))
        .await;
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tck_aliases_are_unique_across_the_node_and_data_goes_by_alias_only() {
    let mut r = rig(|url, pty| {
        spb(
            config(ID, url, pty, &[1, 2, 3], ""),
            "sparkplug",
            "aliases = true",
        )
    })
    .await;
    let nbirth = r.host.until(|m| m.kind() == Some(T::NBirth)).await;
    let mut aliases: HashMap<u64, String> = HashMap::new();
    let mut by_device: HashMap<String, BTreeSet<u64>> = HashMap::new();
    for m in &nbirth.payload.metrics {
        if let Some(a) = m.alias {
            assert!(aliases.insert(a, m.name.clone().unwrap()).is_none());
        }
    }
    let mut data = 0;
    while data < 30 {
        let m = r.host.next().await;
        let device = m.device().unwrap().to_owned();
        match m.kind() {
            Some(T::DBirth) => {
                for x in &m.payload.metrics {
                    // tck-id-payloads-alias-uniqueness: unique across the whole node.
                    let a = x.alias.expect("every birth metric has an alias");
                    let name = format!("{device}/{}", x.name.clone().unwrap());
                    assert!(aliases.insert(a, name).is_none(), "alias {a} used twice");
                    by_device.entry(device.clone()).or_default().insert(a);
                }
            }
            Some(T::DData) => {
                for x in &m.payload.metrics {
                    // tck-id-payloads-alias-data-cmd-requirement: alias only.
                    assert_eq!(x.name, None);
                    let a = x.alias.expect("alias");
                    assert!(
                        by_device[&device].contains(&a),
                        "{device}: alias {a} not born"
                    );
                }
                data += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tck_the_node_waits_for_its_primary_host_online_and_dies_and_comes_back_when_it_goes_offline(
) {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut host = Host::start(broker.port).await;
    // The host is online (retained STATE) before the gateway starts.
    host.state("scada", true).await;
    host.until(|m| m.kind().is_none()).await;
    let cfg = spb(
        config(ID, &broker.url(), &pty.gateway, &[1, 2, 3], ""),
        "sparkplug",
        "primary_host_id = \"scada\"",
    );
    let mut gw = Servogate::start(&cfg);
    let first = host.until(|m| m.kind() == Some(T::NBirth)).await;
    host.until(|m| m.kind() == Some(T::DData)).await;

    // tck-id-operational-behavior-primary-application-state-with-multiple-servers-...:
    // the host goes offline: the node says NDEATH and starts a new session.
    host.state("scada", false).await;
    let death = host.until(|m| m.kind() == Some(T::NDeath)).await;
    assert_eq!(bd_seq(&death), bd_seq(&first));
    // Its births wait for the host: none until the host says online again.
    let quiet = Instant::now();
    let wait = host.until(|m| m.kind().is_some_and(|k| k != T::NDeath));
    let early = tokio::time::timeout(Duration::from_millis(700), wait).await;
    assert!(
        early.is_err(),
        "nothing but deaths while the host is offline: {early:?}"
    );
    host.state("scada", true).await;
    let again = host.until(|m| m.kind() == Some(T::NBirth)).await;
    assert!(quiet.elapsed() >= Duration::from_millis(700));
    assert_eq!(bd_seq(&again), (bd_seq(&first) + 1) % 256);
    assert!(gw.stop().success());
}

const POLICY: &str = r#"
[devices.commands]
allow = ["write"]
writable = ["speed_limit"]
max_age = "2s"
require_fresh = false
limits.speed_limit = { min = 0, max = 250 }
"#;

fn dcmd(name: &str, datatype: DataType, value: MetricValue) -> Payload {
    Payload {
        timestamp: Some(now_ms()),
        metrics: vec![Metric {
            name: Some(name.into()),
            timestamp: Some(now_ms()),
            datatype: Some(datatype as u32),
            value: Some(value),
            ..Metric::default()
        }],
        ..Payload::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dcmd_write_goes_through_the_policy_its_outcome_shows_in_ddata_and_on_the_json_result_topic(
) {
    let mut r = rig(|url, pty| spb(command_config(ID, url, pty, POLICY), "both", "")).await;
    let mut json = Subscriber::start(r.broker.port, &format!("servogate/{ID}/#")).await;
    let dbirth = r
        .host
        .until(|m| m.kind() == Some(T::DBirth) && m.device() == Some("axis-1"))
        .await;
    assert!(
        dbirth.metric("Command/Status").is_some(),
        "a device that takes commands"
    );
    let topic = format!("spBv1.0/{GROUP}/DCMD/{ID}/axis-1");

    // A permitted write: it reaches the drive, and the next DDATA says done.
    r.host
        .publish(
            &topic,
            &dcmd("speed_limit", DataType::UInt16, MetricValue::IntValue(120)),
        )
        .await;
    let status = |m: &SpbMsg| {
        m.metric("Command/Status")
            .and_then(string)
            .map(str::to_owned)
    };
    let done = r
        .host
        .until(|m| m.device() == Some("axis-1") && status(m).is_some())
        .await;
    assert_eq!(status(&done).as_deref(), Some("done"));
    let id = done
        .metric("Command/Id")
        .and_then(string)
        .unwrap()
        .to_owned();
    assert!(id.starts_with("dcmd-"), "{id}");
    let on_json = command_result(&mut json, "axis-1", Some(&id)).await;
    assert_eq!(on_json["status"], "done");
    assert_eq!(r.sim.stats_pair("writes", "applied", 1), (1, 1));

    // Out of the policy's limits: refused, nothing reaches the drive.
    r.host
        .publish(
            &topic,
            &dcmd("speed_limit", DataType::UInt16, MetricValue::IntValue(300)),
        )
        .await;
    let refused = r
        .host
        .until(|m| m.device() == Some("axis-1") && status(m).as_deref() == Some("rejected"))
        .await;
    assert_eq!(
        refused.metric("Command/Reason").and_then(string),
        Some("out_of_range")
    );
    // A metric the policy does not let `write` set: refused too.
    r.host
        .publish(
            &topic,
            &dcmd("position", DataType::Double, MetricValue::DoubleValue(5.0)),
        )
        .await;
    let refused = r
        .host
        .until(|m| m.device() == Some("axis-1") && status(m).as_deref() == Some("rejected"))
        .await;
    assert!(refused.metric("Command/Reason").and_then(string).is_some());
    assert_eq!(
        r.sim.stats_pair("writes", "applied", 1),
        (1, 1),
        "refused DCMDs never reach the drive"
    );
    assert!(r.gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_device_kills_it_and_a_changed_sparkplug_table_makes_a_new_session()
{
    let mut r = rig(plain).await;
    let first = r.host.until(|m| m.kind() == Some(T::NBirth)).await;
    r.host.until(|m| m.kind() == Some(T::DData)).await;
    let url = r.broker.url();
    // axis-3 goes: DDEATH on the running session (no NDEATH, no new NBIRTH).
    r.gw.reload(&spb(
        config(ID, &url, &r._pty.gateway, &[1, 2], ""),
        "sparkplug",
        "",
    ));
    let death = r
        .host
        .until(|m| {
            assert!(
                !matches!(m.kind(), Some(T::NDeath | T::NBirth)),
                "a device list change keeps the session"
            );
            m.kind() == Some(T::DDeath)
        })
        .await;
    assert_eq!(death.device(), Some("axis-3"));
    // Its data stops; the others' goes on.
    let mut others = 0;
    while others < 20 {
        let m = r.host.next().await;
        assert_ne!(m.device(), Some("axis-3"), "{}", m.raw_topic);
        others += usize::from(m.kind() == Some(T::DData));
    }
    // [sparkplug] changes (aliases on): NDEATH, then a new session with a new bdSeq.
    r.gw.reload(&spb(
        config(ID, &url, &r._pty.gateway, &[1, 2], ""),
        "sparkplug",
        "aliases = true",
    ));
    let ndeath = r.host.until(|m| m.kind() == Some(T::NDeath)).await;
    assert_eq!(bd_seq(&ndeath), bd_seq(&first));
    let again = r.host.until(|m| m.kind() == Some(T::NBirth)).await;
    assert_eq!(bd_seq(&again), bd_seq(&first) + 1);
    let dbirth = r.host.until(|m| m.kind() == Some(T::DBirth)).await;
    assert!(dbirth.payload.metrics.iter().all(|m| m.alias.is_some()));
    assert!(r.gw.stop().success());
}
