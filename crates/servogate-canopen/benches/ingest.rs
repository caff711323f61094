//! CAN ingest without IO: how many TPDO frames per second the sans-IO master turns into
//! events on one core (`cargo bench -p servogate-canopen --bench ingest`). A benchmark
//! for BENCHMARKS.md, not a test: it prints its figures and asserts nothing about time.
//!
//! 30 drives, each with servosim's TPDO1-3 (statusword/position/torque,
//! velocity/current/temperature, model time/error code/mode display): every third frame
//! of a drive completes its cycle and becomes one telemetry event, as on the bus.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use servogate_canopen::pdo::TpdoMapping;
use servogate_canopen::{
    Frame, Master, NodeId, NodeSettings, ObjType, ObjectSpec, ObjectTable, TpdoSource,
};
use servogate_core::{Event, EventSink};

struct CountSink(AtomicU64);

impl EventSink for CountSink {
    fn push(&self, event: Event) {
        black_box(&event);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() {
    const NODES: u8 = 30;
    let mut objects = ObjectTable::cia402();
    let mut position = ObjectTable::builtin("position").expect("built-in");
    position.scale = 0.001;
    objects.insert(position);
    let mut temperature = ObjectSpec::new("temperature", 0x2010, 0, ObjType::I16);
    temperature.scale = 0.1;
    objects.insert(temperature);
    objects.insert(ObjectSpec::new("t_ms", 0x2000, 0, ObjType::U32));
    let objects = Arc::new(objects);
    let t0 = Instant::now();
    let nodes = (1..=NODES)
        .map(|id| {
            let node = NodeId::new(id).expect("1..=127");
            let map = |k: u8, raw: &[u32]| {
                TpdoMapping::from_raw(0x80 + 0x100 * u16::from(k) + u16::from(id), raw)
                    .expect("a valid mapping")
            };
            NodeSettings {
                tpdos: TpdoSource::Config(vec![
                    map(1, &[0x6041_0010, 0x6064_0020, 0x6077_0010]),
                    map(2, &[0x606C_0020, 0x6078_0010, 0x2010_0010]),
                    map(3, &[0x2000_0020, 0x603F_0010, 0x6061_0008]),
                ]),
                objects: objects.clone(),
                ..NodeSettings::new(&format!("drive-{id}"), node, Duration::ZERO)
            }
        })
        .collect();
    let mut master = Master::new(nodes, None, t0);
    while master.poll_transmit().is_some() {}
    let frames: Vec<Frame> = (1..=NODES)
        .flat_map(|id| {
            let id = u16::from(id);
            [
                Frame::new(0x180 + id, &[0x37, 0x02, 1, 2, 3, 4, 5, 6]),
                Frame::new(0x280 + id, &[1, 2, 3, 4, 5, 6, 7, 8]),
                Frame::new(0x380 + id, &[1, 2, 3, 4, 0, 0, 8]),
            ]
        })
        .map(|f| f.expect("a valid frame"))
        .collect();
    let sink = CountSink(AtomicU64::new(0));
    let wall = SystemTime::now();
    for round in 0..3 {
        let rounds = 40_000u32;
        let start = Instant::now();
        for r in 0..rounds {
            let now = t0 + Duration::from_micros(u64::from(r));
            for f in &frames {
                master.handle_frame(f, now, wall, &sink);
            }
        }
        let took = start.elapsed();
        let n = u64::from(rounds) * frames.len() as u64;
        println!(
            "run {round}: {n} frames in {took:?}: {:.0} frames/s, {:.0} ns per frame, {} events",
            n as f64 / took.as_secs_f64(),
            took.as_nanos() as f64 / n as f64,
            sink.0.swap(0, Ordering::Relaxed)
        );
    }
}
