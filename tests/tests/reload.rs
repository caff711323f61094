//! SIGHUP: a bad config changes nothing; a good one restarts only what changed, and every
//! device's sequences go on without a gap or a repeat.

use std::collections::HashMap;

use servogate_e2e::*;

fn with_metrics(cfg: String, port: u16) -> String {
    cfg.replace(
        "[buffer]",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[buffer]"),
    )
}

/// Checks that each device's telemetry seq grows by exactly 1 from message to message.
#[derive(Default)]
struct SeqCheck {
    last: HashMap<String, u64>,
}

impl SeqCheck {
    fn see(&mut self, m: &Msg) {
        if let Some((device, "telemetry")) = m.device_stream() {
            let seq = m.json["seq"].as_u64().unwrap();
            if let Some(prev) = self.last.insert(device.to_owned(), seq) {
                assert_eq!(seq, prev + 1, "{device}: seq {prev} then {seq}");
            }
        }
    }
}

/// The retained messages a new subscriber receives, by "device/stream". They come right
/// after the subscription, before the live ones, so 20 live telemetry messages end them.
async fn retained_topics(port: u16) -> HashMap<String, serde_json::Value> {
    let mut sub = Subscriber::start(port, "servogate/e2e-reload/#").await;
    let mut retained = HashMap::new();
    let mut live = 0;
    while live < 20 {
        let m = sub.next().await;
        match (m.retain, m.device_stream()) {
            (true, Some((device, stream))) => {
                retained.insert(format!("{device}/{stream}"), m.json.clone());
            }
            (false, Some((_, "telemetry"))) => live += 1,
            _ => {}
        }
    }
    retained
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_restarts_only_what_changed_and_a_bad_one_changes_nothing() {
    // The waits below end on messages that keep coming even when the awaited one never
    // does: one deadline for the whole scenario turns such a miss into a failure.
    tokio::time::timeout(4 * DEADLINE, scenario())
        .await
        .expect("the reload scenario finished within its deadline");
}

async fn scenario() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-reload/#").await;
    let port = free_port();
    let first = with_metrics(
        config("e2e-reload", &broker.url(), &pty.gateway, &[1, 2], ""),
        port,
    );
    let gw = Servogate::start(&first);
    let mut seqs = SeqCheck::default();
    let mut online = std::collections::HashSet::new();
    while online.len() < 2 {
        let m = sub.next().await;
        seqs.see(&m);
        if let Some((device, "availability")) = m.device_stream() {
            online.insert(device.to_owned());
        }
    }
    // Some telemetry of both before the reload.
    while seqs.last.len() < 2 {
        seqs.see(&sub.next().await);
    }

    // 1. A bad file: refused, counted, and polling goes on untouched.
    gw.reload("[gateway]\nid = 7\n");
    scrape_until(port, "the refused reload", |t| {
        sample(t, r#"servogate_reloads_total{result="failed"}"#) == Some(1.0)
    })
    .await;
    let before = seqs.last.clone();
    while seqs.last.values().zip(before.values()).any(|(a, b)| a <= b) {
        seqs.see(&sub.next().await);
    }

    // 2. A good one: axis-1 as it was, axis-2 polled at another rate, axis-3 added.
    let mut second = config("e2e-reload", &broker.url(), &pty.gateway, &[1], "");
    second.push_str(
        "\n[[devices]]\nname = \"axis-2\"\nbus = \"rs485-a\"\nunit = 2\nprofile = \"sim\"\npoll = \"20ms\"\n",
    );
    second.push_str(
        "\n[[devices]]\nname = \"axis-3\"\nbus = \"rs485-a\"\nunit = 3\nprofile = \"sim\"\npoll = \"10ms\"\n",
    );
    gw.reload(&with_metrics(second, port));
    let mut meta3 = false;
    let mut online3 = false;
    let mut availability = Vec::new();
    while !(meta3 && online3 && seqs.last.contains_key("axis-3")) {
        let m = sub.next().await;
        seqs.see(&m);
        match m.device_stream() {
            Some(("axis-3", "meta")) => {
                assert_eq!(m.json["address"], 3);
                meta3 = true;
            }
            Some((device, "availability")) => {
                availability.push((device.to_owned(), m.json["seq"].as_u64().unwrap()));
                online3 |= device == "axis-3" && m.json["state"] == "online";
            }
            _ => {}
        }
    }
    // More telemetry of all three after the reload, still without a gap.
    let mark = seqs.last.clone();
    while ["axis-1", "axis-2", "axis-3"]
        .iter()
        .any(|d| seqs.last[*d] < mark[*d] + 5)
    {
        seqs.see(&sub.next().await);
    }
    let text = scrape(port);
    assert_eq!(
        sample(&text, r#"servogate_reloads_total{result="ok"}"#),
        Some(1.0)
    );
    // The port stayed open through both reloads: never reopened, never failed.
    assert_eq!(
        sample(
            &text,
            r#"servogate_modbus_port_reopens_total{bus="rs485-a"}"#
        ),
        Some(0.0)
    );
    assert!(
        !availability.iter().any(|(d, _)| d == "axis-1"),
        "axis-1 was untouched, its availability unchanged: {availability:?}"
    );
    // axis-2 got a new poller: its availability went out again, continuing its seq.
    assert!(
        availability.contains(&("axis-2".to_owned(), 2)),
        "{availability:?}"
    );

    // 3. axis-3 removed again: its retained topics are cleared.
    let third = with_metrics(
        config("e2e-reload", &broker.url(), &pty.gateway, &[1, 2], ""),
        port,
    );
    gw.reload(&third);
    let mut cleared = std::collections::HashSet::new();
    while cleared.len() < 2 {
        let m = sub.next().await;
        seqs.see(&m);
        if let Some(("axis-3", stream @ ("meta" | "availability"))) = m.device_stream() {
            if m.json.is_null() {
                cleared.insert(stream.to_owned());
            }
        }
    }
    let text = scrape_until(port, "the second good reload", |t| {
        sample(t, r#"servogate_reloads_total{result="ok"}"#) == Some(2.0)
    })
    .await;
    assert!(
        !text.contains("axis-3"),
        "a removed device leaves the metrics"
    );
    // A new subscriber gets the retained topics of axis-1 and axis-2, none of axis-3;
    // axis-1's availability is still the first one it ever published.
    let retained = retained_topics(broker.port).await;
    assert!(retained.contains_key("axis-2/meta"), "{retained:?}");
    assert!(
        !retained.keys().any(|k| k.starts_with("axis-3/")),
        "{retained:?}"
    );
    assert_eq!(retained["axis-1/availability"]["seq"], 1, "{retained:?}");
    let mut gw = gw;
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_another_broker_in_mqtt5_moves_every_stream_there_without_a_gap() {
    tokio::time::timeout(4 * DEADLINE, move_broker())
        .await
        .expect("the broker move finished within its deadline");
}

async fn move_broker() {
    let (a, b) = (Mosquitto::start(), Mosquitto::start());
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1", &[]);
    let mut sub_a = Subscriber::start(a.port, "servogate/e2e-move/#").await;
    let mut sub_b = Subscriber::start(b.port, "servogate/e2e-move/#").await;
    let mut gw = Servogate::start(&config("e2e-move", &a.url(), &pty.gateway, &[1], ""));
    // Telemetry seqs from both brokers: together they must cover 1..=last without a hole.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 20 {
        let m = sub_a.next().await;
        if m.device_stream() == Some(("axis-1", "telemetry")) {
            seen.insert(m.json["seq"].as_u64().unwrap());
        }
    }

    // To B, and from MQTT 3.1.1 to MQTT 5 with topic aliases in the same reload.
    gw.reload(&mqtt5(
        &config("e2e-move", &b.url(), &pty.gateway, &[1], ""),
        4,
    ));
    let (mut birth, mut meta, mut on_b) = (false, false, 0);
    while !(birth && meta && on_b >= 20) {
        let m = sub_b.next().await;
        match m.device_stream() {
            Some(("axis-1", "telemetry")) => {
                seen.insert(m.json["seq"].as_u64().unwrap());
                on_b += 1;
            }
            Some(("axis-1", "meta")) => meta = true,
            None if m.topic.ends_with("/status") => {
                assert_eq!(m.json["online"], true, "{}", m.json);
                birth = true;
            }
            _ => {}
        }
    }
    // What reached A before the move (it may have acknowledged some after our count).
    while let Ok(Some(m)) = tokio::time::timeout(std::time::Duration::from_millis(200), async {
        Some(sub_a.next().await)
    })
    .await
    {
        if m.device_stream() == Some(("axis-1", "telemetry")) {
            seen.insert(m.json["seq"].as_u64().unwrap());
        }
    }
    let first = *seen.first().unwrap();
    let last = *seen.last().unwrap();
    assert_eq!(first, 1);
    assert_eq!(
        seen.len() as u64,
        last,
        "seqs 1..={last} not all delivered across the move"
    );
    assert!(gw.stop().success());
}
