//! Durability proven by killing (DESIGN.md section 9): the gateway is SIGKILLed 20 times
//! at random moments while six units are polled every 10 ms, every other time with the
//! broker unreachable. After the last restart, every event any boot wrote to the log
//! reaches a subscriber, and each (boot, device, stream) is an unbroken seq range: none
//! lost, none corrupt.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use servogate::store::record;
use servogate_e2e::*;
use servogate_log::{Entry, FsDir, Reader};

const ID: &str = "e2e-kill";
const KILLS: usize = 20;

type Key = (String, String, String);

/// (boot, device, stream) -> seq -> payload, of every event in the log.
fn logged(log: &Path) -> BTreeMap<Key, BTreeMap<u64, Vec<u8>>> {
    let mut out: BTreeMap<Key, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
    let reader = Reader::offline(FsDir::existing(log).unwrap(), 0).unwrap();
    for e in reader {
        let Entry::Record(r) = e.unwrap() else {
            panic!("a gap in a log no retention touched");
        };
        let p = record::decode(&r.body).expect("a record servogate wrote");
        let json: serde_json::Value = serde_json::from_slice(&p.payload).expect("JSON");
        let boot = json["boot_id"].as_str().expect("boot_id").to_owned();
        let stream = p.topic.rsplit('/').next().unwrap().to_owned();
        out.entry((boot, p.device.to_string(), stream))
            .or_default()
            .insert(p.seq, p.payload);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_under_load_lose_no_written_event_and_corrupt_none() {
    let rig = GatedRig::start().await;
    let (broker, gate, log) = (&rig.broker, &rig.gate, &rig.log);
    let cfg = with_event_log(&rig.config(ID), log, "");
    let mut sub = Subscriber::start(broker.port, &format!("servogate/{ID}/devices/+/+")).await;

    let mut rng = fastrand::Rng::with_seed(0x5e12_0a7e);
    for i in 0..KILLS {
        // Every other life with the broker out of reach: its events wait in the log.
        if i % 2 == 0 {
            gate.open();
        } else {
            gate.close();
        }
        let mut gw = Servogate::start(&cfg);
        std::thread::sleep(Duration::from_millis(rng.u64(150..1200)));
        gw.kill();
    }
    let want = logged(log);
    let boots: BTreeSet<&String> = want.keys().map(|k| &k.0).collect();
    assert_eq!(boots.len(), KILLS, "every life wrote to the log");
    for (key, seqs) in &want {
        let (first, last) = (*seqs.keys().next().unwrap(), *seqs.keys().last().unwrap());
        assert_eq!(
            seqs.len() as u64,
            last - first + 1,
            "{key:?}: the log has a hole between {first} and {last}"
        );
    }
    let total: usize = want.values().map(BTreeMap::len).sum();

    // A last life with the broker reachable delivers everything the others left.
    gate.open();
    let mut gw = Servogate::start(&cfg);
    let mut got: BTreeMap<Key, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
    let mut have = 0;
    let start = Instant::now();
    while have < total {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{have} of {total} logged events arrived"
        );
        let m = sub.next().await;
        let Some((device, stream)) = m.device_stream() else {
            continue;
        };
        if stream == "meta" {
            continue; // retained device description, not an event
        }
        let boot = m.json["boot_id"]
            .as_str()
            .expect("every event names its boot")
            .to_owned();
        let seq = m.json["seq"].as_u64().expect("seq");
        let key = (boot, device.to_owned(), stream.to_owned());
        let Some(logged) = want.get(&key).and_then(|s| s.get(&seq)) else {
            continue; // the last life's own events, or retained availability
        };
        assert_eq!(logged, &m.payload, "{key:?} seq {seq}: not what was logged");
        if got.entry(key).or_default().insert(seq, m.payload).is_none() {
            have += 1;
        }
    }
    assert!(gw.stop().success());
    println!(
        "{KILLS} kills: {} boots, {} streams, {total} events logged and delivered",
        boots.len(),
        want.len()
    );
}
