//! A candump trace of one drive (hand-written in `candump -l` format, node 3 on vcan0):
//! boot-up, heartbeats, TPDO1 (statusword + position), an over-current EMCY and its reset,
//! then silence. Replayed through the [`Master`] with the log's own timestamps.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use std::sync::Arc;

use servogate_canopen::pdo::TpdoMapping;
use servogate_canopen::{Frame, Master, NodeId, NodeSettings};
use servogate_canopen::{ObjectTable, TpdoSource};
use servogate_core::{AvailabilityState, DriveState, Event, EventBody, EventKind, EventSink};

#[derive(Default)]
struct VecSink(Mutex<Vec<Event>>);

impl EventSink for VecSink {
    fn push(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

fn describe(e: &Event) -> String {
    match &e.body {
        EventBody::Telemetry(t) => format!(
            "telemetry {} {} {:?}",
            e.seq,
            t.state.map_or("-", DriveState::as_str),
            t.position
        ),
        EventBody::Availability(a) => format!("availability {}", a.state.as_str()),
        EventBody::Notice(n) => match &n.kind {
            EventKind::Fault { code, .. } => format!("fault {code:#06x}"),
            EventKind::FaultCleared { code } => format!("fault_cleared {code:#06x}"),
            EventKind::StateChange { to, .. } => format!("state_change {}", to.as_str()),
            other => other.as_str().to_owned(),
        },
        EventBody::CommandResult(r) => format!("cmd_result {}", r.status.as_str()),
    }
}

#[test]
fn a_drive_trace_becomes_the_expected_event_sequence() {
    // Given a master for node 3 with a 100 ms heartbeat and TPDO1 = statusword, position
    let log = include_str!("fixtures/node3_boot_fault.log");
    let t0 = Instant::now();
    let node = NodeId::new(3).unwrap();
    let mut master = Master::new(
        vec![NodeSettings {
            tpdos: TpdoSource::Config(vec![TpdoMapping::from_raw(
                0x183,
                &[0x6041_0010, 0x6064_0020],
            )
            .unwrap()]),
            objects: Arc::new(milli_position()),
            ..NodeSettings::new("axis-3", node, Duration::from_millis(100))
        }],
        None,
        t0,
    );
    let mut sent: Vec<Frame> = std::iter::from_fn(|| master.poll_transmit()).collect();
    let sink = VecSink::default();

    // When the trace is replayed
    let mut last = t0;
    for line in log.lines() {
        let ts: f64 = line[1..line.find(')').unwrap()].parse().unwrap();
        let now = t0 + Duration::from_secs_f64(ts - 1_700_000_000.0);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(ts);
        let frame = Frame::from_candump(line).expect("a valid trace line");
        master.handle_timeout(now, wall, &sink);
        master.handle_frame(&frame, now, wall, &sink);
        sent.extend(std::iter::from_fn(|| master.poll_transmit()));
        last = now;
    }
    // and the drive then stays silent past 1.5 x its producer time
    let end = last + Duration::from_millis(250);
    master.handle_timeout(end, SystemTime::UNIX_EPOCH, &sink);

    // Then the node was started at start-up and again after its boot-up message
    let start = Frame::new(0x000, &[0x01, 0x03]).unwrap();
    assert_eq!(sent, vec![start.clone(), start]);
    // and the events tell the drive's story in order
    let events: Vec<String> = sink.0.lock().unwrap().iter().map(describe).collect();
    assert_eq!(
        events,
        vec![
            "availability online",
            "online",
            "state_change operation_enabled",
            "telemetry 1 operation_enabled Some(-1.0)",
            "telemetry 2 operation_enabled Some(1.0)",
            "fault 0x2310",
            "state_change fault",
            "telemetry 3 fault Some(1.0)",
            "fault_cleared 0x2310",
            "state_change switch_on_disabled",
            "telemetry 4 switch_on_disabled Some(1.0)",
            "availability offline",
            "offline",
        ]
    );
    assert_eq!(master.availability(node), Some(AvailabilityState::Offline));
}

/// The `cia402` profile with positions in 0.001 units.
fn milli_position() -> ObjectTable {
    let mut objects = ObjectTable::cia402();
    let mut position = ObjectTable::builtin("position").expect("a built-in object");
    position.scale = 0.001;
    objects.insert(position);
    objects
}
