//! Bytes from the bus never cause a panic: random frames into every `handle_*`.
//!
//! A deterministic xorshift PRNG (fixed seed) so a failure reproduces; ids are biased
//! toward the COB-IDs the handlers listen on, so the frames reach the decoders.

use std::time::{Duration, Instant};

use servogate_canopen::emcy::EmcyConsumer;
use servogate_canopen::heartbeat::HeartbeatConsumer;
use servogate_canopen::nmt::NodeTable;
use servogate_canopen::pdo::{MappingEntry, MappingReader, TpdoDecoder, TpdoMapping};
use servogate_canopen::sdo::{SdoClient, SdoEvent};
use servogate_canopen::sync::SyncProducer;
use servogate_canopen::{Frame, NodeId};
use servogate_canopen::{
    Master, NodeSettings, ObjType, ObjectSpec, ObjectTable, SdoPoll, TpdoSource,
};
use servogate_core::{Event, EventSink};

struct CountSink(std::sync::atomic::AtomicU64);

impl EventSink for CountSink {
    fn push(&self, _event: Event) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        // xorshift64 (Marsaglia 2003).
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_frame(rng: &mut XorShift) -> Frame {
    let node = 1 + rng.below(3) as u16;
    let id = match rng.below(8) {
        0 => 0x080 + node,
        1 => 0x180 + node,
        2 => 0x280 + node,
        3 | 4 => 0x580 + node,
        5 => 0x700 + node,
        6 => 0x000,
        _ => rng.below(0x800) as u16,
    };
    let len = rng.below(9) as usize;
    let mut data = [0u8; 8];
    for b in &mut data[..len] {
        // Bias the SDO command byte toward valid specifiers now and then.
        *b = rng.next() as u8;
    }
    Frame::new(id, &data[..len]).expect("id < 0x800 and len <= 8")
}

/// An 8-byte SDO response to node 1 that names the running transfer's object, so the
/// random command bytes reach the segment states too.
fn plausible_sdo_response(rng: &mut XorShift, current: Option<(u16, u8)>) -> Frame {
    let (index, sub) = current.unwrap_or((0x1008, 0));
    let [i0, i1] = index.to_le_bytes();
    let cmd = [0x00, 0x10, 0x01, 0x11, 0x20, 0x30, 0x41, 0x43, 0x4B, 0x60][rng.below(10) as usize]
        | (rng.below(4) as u8) << 1;
    let size = rng.below(24) as u8;
    Frame::new(0x581, &[cmd, i0, i1, sub, size, 0, 0, rng.next() as u8]).expect("valid")
}

#[test]
fn random_frames_never_panic_any_handler() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let t0 = Instant::now();
    let n1 = NodeId::new(1).unwrap();
    let mut table = NodeTable::new([n1, NodeId::new(2).unwrap()]);
    table.start_all();
    let mut hb = HeartbeatConsumer::new();
    hb.add(n1, Duration::from_millis(100), t0);
    let mut emcy = EmcyConsumer::new();
    let mut sdo = SdoClient::new(n1);
    let mappings = vec![
        TpdoMapping::from_raw(0x181, &[0x6041_0010, 0x6064_0020, 0x6077_0010]).unwrap(),
        TpdoMapping::new(
            0x281,
            vec![
                MappingEntry {
                    index: 0x606C,
                    sub: 0,
                    bits: 32,
                },
                MappingEntry {
                    index: 0x6061,
                    sub: 0,
                    bits: 8,
                },
                MappingEntry {
                    index: 0x2000,
                    sub: 3,
                    bits: 3,
                },
                MappingEntry {
                    index: 0x6064,
                    sub: 0,
                    bits: 0,
                },
            ],
        )
        .unwrap(),
    ];
    let mut pdo = TpdoDecoder::new(mappings.clone(), std::sync::Arc::new(ObjectTable::cia402()));
    let mut master = Master::new(
        (1..=3)
            .map(|id| NodeSettings {
                // Node 3 reads its mapping, so random SDO responses reach the reader.
                tpdos: if id == 3 {
                    TpdoSource::Read(vec![1, 2])
                } else {
                    TpdoSource::Config(mappings.clone())
                },
                configure_heartbeat: id == 2,
                polls: vec![SdoPoll {
                    object: ObjectSpec::new("dc_bus", 0x2011, 0, ObjType::U32),
                    every: Duration::from_millis(3),
                }],
                late_after: Some(Duration::from_millis(4)),
                ..NodeSettings::new(
                    &format!("axis-{id}"),
                    NodeId::new(id).unwrap(),
                    Duration::from_millis(50),
                )
            })
            .collect(),
        Some(SyncProducer::new(Duration::from_millis(5), Some(10), t0)),
        t0,
    );
    let sink = CountSink(Default::default());
    let wall = std::time::SystemTime::UNIX_EPOCH;
    let mut reader = MappingReader::new(&[1, 2, 3, 4]).unwrap();

    let mut now = t0;
    let mut completed = 0u32;
    let mut finished_ok = 0u32;
    for i in 0..200_000u32 {
        now += Duration::from_micros(rng.below(2_000));
        if sdo.is_idle() {
            let _ = match i % 3 {
                0 => sdo.start_upload(0x1008, 0, Duration::from_millis(50), now),
                1 => sdo.start_download(0x2000, 1, &[7; 11], Duration::from_millis(50), now),
                _ => sdo.start_download(0x6040, 0, &[0x0F, 0], Duration::from_millis(50), now),
            };
        }
        let frame = if rng.below(3) == 0 {
            plausible_sdo_response(&mut rng, sdo.current())
        } else {
            random_frame(&mut rng)
        };
        let _ = table.handle_frame(&frame);
        while table.poll_transmit().is_some() {}
        let _ = hb.handle_frame(&frame, now);
        let _ = hb.poll_timeout();
        let _ = hb.handle_timeout(now);
        let _ = emcy.handle_frame(&frame);
        if let Some(ev) = sdo.handle_frame(&frame, now) {
            match ev {
                SdoEvent::NextFrame(_) => {}
                SdoEvent::Uploaded(_) | SdoEvent::Downloaded => {
                    completed += 1;
                    finished_ok += 1;
                }
                SdoEvent::Aborted { .. } => completed += 1,
            }
        }
        let _ = sdo.poll_timeout();
        let _ = sdo.handle_timeout(now);
        let _ = pdo.handle_frame(&frame);

        if master.is_sdo_idle(n1) {
            let _ = master.sdo_upload(n1, 0x1008, 0, Duration::from_millis(20), now);
        }
        let _ = master.handle_frame(&frame, now, wall, &sink);
        let _ = master.handle_timeout(now, wall, &sink);
        while master.poll_transmit().is_some() {}
        let _ = master.poll_timeout();

        if reader.next_object().is_none() {
            reader = MappingReader::new(&[1, 2, 3, 4]).unwrap();
        }
        let _ = reader.on_uploaded(frame.data());
    }
    assert!(sink.0.into_inner() > 1000, "the master produced events");
    // The random frames did reach the SDO state machine.
    assert!(completed > 1000, "only {completed} transfers ended");
    assert!(finished_ok > 100, "only {finished_ok} transfers succeeded");
}
