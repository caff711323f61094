//! The throughput mode (`[mqtt] batch_max`): several samples of one device per message,
//! as a JSON array on the telemetry topic and as one DDATA with a metric per sample, every
//! sample still there, in order, with its own value and time.

use std::collections::HashMap;

use serde_json::Value;
use servogate_e2e::*;
use servogate_sparkplug::{MessageType as T, MetricValue};

const ID: &str = "e2e-batch";

fn batched(url: &str, pty: &std::path::Path, contract: &str) -> String {
    let base = config(ID, url, pty, &[1, 2, 3], "").replacen(
        "[mqtt]\n",
        &format!("[mqtt]\ncontract = \"{contract}\"\nbatch_max = 8\nbatch_wait = \"200ms\"\n"),
        1,
    );
    format!("{base}\n[sparkplug]\ngroup_id = \"plant-1\"\nedge_node_id = \"{ID}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_json_telemetry_is_an_array_of_every_sample_in_seq_order() {
    let broker = Mosquitto::start();
    let pty = PtyPair::start();
    let _sim = Servosim::start(&pty.sim, "1-3", &[]);
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/+/+/telemetry")).await;
    let mut host = Host::start(broker.port).await;
    let mut gw = Servogate::start(&batched(&broker.url(), &pty.gateway, "both"));

    // JSON: arrays of one device's samples, seq without a gap across messages.
    let mut last: HashMap<String, u64> = HashMap::new();
    let (mut messages, mut samples, mut largest) = (0, 0, 0);
    while samples < 300 {
        let m = sub.next().await;
        let (device, _) = m.device_stream().unwrap();
        let Value::Array(batch) = &m.json else {
            panic!("not a batch: {}", m.json)
        };
        assert!(
            !batch.is_empty() && batch.len() <= 8,
            "{} samples",
            batch.len()
        );
        largest = largest.max(batch.len());
        for s in batch {
            assert_matches_truth(device, s);
            let seq = s["seq"].as_u64().unwrap();
            if let Some(prev) = last.insert(device.to_owned(), seq) {
                assert_eq!(seq, prev + 1, "{device}: seq gap");
            }
            samples += 1;
        }
        messages += 1;
    }
    assert!(largest > 1, "samples were batched");
    assert!(
        messages < samples,
        "{messages} messages for {samples} samples"
    );

    // Sparkplug: DDATA carrying several samples, each metric with its sample's time.
    let mut batches = 0;
    while batches < 10 {
        let m = host.next().await;
        if m.kind() != Some(T::DData) {
            continue;
        }
        let t: Vec<u64> = m
            .payload
            .metrics
            .iter()
            .filter(|x| x.name.as_deref() == Some("t_ms"))
            .map(|x| match x.value {
                Some(MetricValue::IntValue(v)) => u64::from(v),
                _ => panic!("t_ms"),
            })
            .collect();
        let positions: Vec<f64> = m
            .payload
            .metrics
            .iter()
            .filter(|x| x.name.as_deref() == Some("position"))
            .map(|x| match x.value {
                Some(MetricValue::DoubleValue(v)) => v,
                _ => panic!("position"),
            })
            .collect();
        assert_eq!(t.len(), positions.len());
        assert!(t.windows(2).all(|w| w[0] < w[1]), "samples in order: {t:?}");
        let unit: u8 = m
            .device()
            .unwrap()
            .trim_start_matches("axis-")
            .parse()
            .unwrap();
        for (t, p) in t.iter().zip(&positions) {
            let want = truth(unit, *t as u32)[0];
            assert!((p - want).abs() < 1e-6);
        }
        batches += usize::from(t.len() > 1);
    }
    assert!(gw.stop().success());
}
