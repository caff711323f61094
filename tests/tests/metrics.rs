//! The metrics endpoint, scraped while servogate polls servosim over a pty and publishes
//! to mosquitto: per-bus transactions, errors by kind and latency, per-device
//! availability, the ring and the MQTT connection.

use servogate_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reports_the_bus_the_devices_the_ring_and_the_broker_as_they_are() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let mut sim = Servosim::start(&pty.sim, "1-2", &[]);
    let mut sub = Subscriber::start(broker.port, "servogate/e2e-metrics/#").await;
    let port = free_port();
    let cfg = config(
        "e2e-metrics",
        &broker.url(),
        &pty.gateway,
        &[1, 2],
        "offline_after = 3\n",
    )
    .replace(
        "[buffer]",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[buffer]"),
    );
    let mut gw = Servogate::start(&cfg);
    let mut online = std::collections::HashSet::new();
    while online.len() < 2 {
        let m = sub.next().await;
        if let Some((device, "availability")) = m.device_stream() {
            online.insert(device.to_owned());
        }
    }

    // Both online, telemetry acknowledged by the broker, replies timed.
    let text = scrape_until(port, "both devices online and events acked", |t| {
        sample(
            t,
            r#"servogate_device_online{device="axis-1",bus="rs485-a"}"#,
        ) == Some(1.0)
            && sample(
                t,
                r#"servogate_device_online{device="axis-2",bus="rs485-a"}"#,
            ) == Some(1.0)
            && sample(t, "servogate_ring_acked_events_total").unwrap_or(0.0) > 0.0
    })
    .await;
    assert_eq!(sample(&text, "servogate_mqtt_connected"), Some(1.0));
    assert_eq!(sample(&text, "servogate_mqtt_connects_total"), Some(1.0));
    let bus = |name: &str| {
        sample(
            &text,
            &format!("servogate_modbus_{name}{{bus=\"rs485-a\"}}"),
        )
    };
    let replies = bus("replies_total").unwrap();
    assert!(replies > 0.0);
    // The two counters are read one after the other while the bus polls, the replies
    // first: replies may land between the reads (two did under emulation). The bus
    // counts a reply, then times it, so the timed count lies between the replies
    // counted before the read (less the one being counted) and those counted by a
    // later scrape; a reply left untimed would fall below, one timed twice above.
    let timed = bus("reply_seconds_count").unwrap();
    let replies_later = sample(
        &scrape(port),
        r#"servogate_modbus_replies_total{bus="rs485-a"}"#,
    )
    .unwrap();
    assert!(
        timed >= replies - 1.0 && timed <= replies_later,
        "every reply is timed: {timed} timed, {replies} replies before, {replies_later} after"
    );
    assert!(text.contains(r#"servogate_modbus_reply_seconds_bucket{bus="rs485-a",le="+Inf"}"#));
    assert_eq!(
        sample(&text, "servogate_ring_capacity_events"),
        Some(200_000.0)
    );

    // A dead unit: timeouts counted, the device offline in the metrics as on MQTT.
    sim.cmd("dead 2");
    sub.until(|m| m.device_stream() == Some(("axis-2", "availability")))
        .await;
    let text = scrape_until(port, "axis-2 offline", |t| {
        sample(
            t,
            r#"servogate_device_online{device="axis-2",bus="rs485-a"}"#,
        ) == Some(0.0)
    })
    .await;
    let errors = |kind: &str| {
        sample(
            &text,
            &format!("servogate_modbus_errors_total{{bus=\"rs485-a\",kind=\"{kind}\"}}"),
        )
        .unwrap()
    };
    assert!(errors("timeout") >= 3.0, "{text}");
    assert_eq!(
        sample(
            &text,
            r#"servogate_device_online{device="axis-1",bus="rs485-a"}"#
        ),
        Some(1.0)
    );
    // Every transaction ended as a reply or a counted failure (at most one in flight).
    let sent = sample(
        &text,
        r#"servogate_modbus_transactions_total{bus="rs485-a"}"#,
    )
    .unwrap();
    let ended = sample(&text, r#"servogate_modbus_replies_total{bus="rs485-a"}"#).unwrap()
        + ["timeout", "crc", "exception", "wrong_reply", "io"]
            .iter()
            .map(|k| errors(k))
            .sum::<f64>();
    assert!(
        sent - ended <= 1.0 && sent >= ended,
        "sent {sent}, ended {ended}"
    );
    // Ring accounting holds: pushed = acked + held (nothing dropped at this capacity).
    let ring = |n: &str| sample(&text, &format!("servogate_ring_{n}")).unwrap();
    assert_eq!(ring("dropped_events_total"), 0.0);
    assert!(ring("pushed_events_total") >= ring("acked_events_total"));

    // Anything but GET /metrics is refused, and the endpoint keeps serving.
    let other = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    })
    .await
    .unwrap();
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    assert!(scrape(port).contains("servogate_build_info"));
    assert!(gw.stop().success());
}
