//! The CANopen master of one bus: every protocol piece of this crate behind one sans-IO
//! state, producing typed events into an [`EventSink`] (as `servogate_modbus::poll` does
//! for Modbus).
//!
//! The bus task owns the socket and the timer and calls:
//! - [`Master::handle_frame`] with every received frame (and the acquisition time),
//! - [`Master::poll_transmit`] until `None` after every call, and sends what it returns,
//! - [`Master::handle_timeout`] at [`Master::poll_timeout`].
//!
//! What becomes an event:
//! - heartbeat transitions: the availability topic plus an `online` / `offline` notice;
//! - EMCY: `fault` / `fault_cleared` notices (the fast, pushed fault path; the 0x603F error
//!   code in a TPDO is telemetry only, so one fault is not reported twice);
//! - TPDOs: telemetry, and a `state_change` notice when the CiA 402 state changes;
//! - SDO aborts and timeouts: a `comm_error` notice naming the object and the abort code.
//!
//! Boot-up messages queue an NMT start for the node. SDO transfers are started with
//! [`Master::sdo_upload`] / [`Master::sdo_download`]; their segments are sent by the
//! master, and their results are returned from `handle_frame` / `handle_timeout`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use servogate_core::{
    Availability, AvailabilityState, DeviceEvents, DriveState, EventBody, EventKind, EventSink,
};

use crate::emcy::{EmcyConsumer, FaultChange};
use crate::frame::{CobKind, Frame, NodeId};
use crate::heartbeat::{consumer_time, AvailabilityChange, HeartbeatConsumer};
use crate::nmt::NodeTable;
use crate::pdo::{Cia402Scale, TpdoDecoder, TpdoMapping};
use crate::sdo::{AbortCode, SdoClient, SdoError, SdoEvent};
use crate::sync::SyncProducer;

/// One configured drive on the bus.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Device name (MQTT topic level).
    pub name: Arc<str>,
    pub node: NodeId,
    /// Heartbeat producer time of the drive; zero = not watched.
    pub heartbeat: Duration,
    /// TPDO mappings (from config, or read with [`crate::pdo::MappingReader`]).
    pub tpdos: Vec<TpdoMapping>,
    pub scale: Cia402Scale,
}

/// The end of an SDO transfer started through the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdoResult {
    Uploaded {
        node: NodeId,
        index: u16,
        sub: u8,
        data: Vec<u8>,
    },
    Downloaded {
        node: NodeId,
        index: u16,
        sub: u8,
    },
    Aborted {
        node: NodeId,
        index: u16,
        sub: u8,
        code: AbortCode,
        by_server: bool,
    },
}

#[derive(Debug)]
struct Node {
    settings: NodeSettings,
    events: DeviceEvents,
    decoder: TpdoDecoder,
    sdo: SdoClient,
    drive_state: Option<DriveState>,
}

/// The sans-IO master of one CAN bus.
#[derive(Debug)]
pub struct Master {
    nodes: Vec<Node>,
    nmt: NodeTable,
    heartbeat: HeartbeatConsumer,
    emcy: EmcyConsumer,
    sync: Option<SyncProducer>,
    transmit: VecDeque<Frame>,
}

impl Master {
    /// A master for `nodes` (a node id given twice keeps its first settings), with an
    /// optional SYNC producer. NMT start commands for every node are queued at once.
    pub fn new(nodes: Vec<NodeSettings>, sync: Option<SyncProducer>, now: Instant) -> Self {
        let mut heartbeat = HeartbeatConsumer::new();
        let mut kept: Vec<Node> = Vec::new();
        for settings in nodes {
            if kept.iter().any(|n| n.settings.node == settings.node) {
                continue;
            }
            heartbeat.add(settings.node, settings.heartbeat, now);
            kept.push(Node {
                events: DeviceEvents::new(settings.name.clone()),
                decoder: TpdoDecoder::new(settings.tpdos.clone(), settings.scale),
                sdo: SdoClient::new(settings.node),
                drive_state: None,
                settings,
            });
        }
        let mut nmt = NodeTable::new(kept.iter().map(|n| n.settings.node));
        nmt.start_all();
        let mut master = Self {
            nodes: kept,
            nmt,
            heartbeat,
            emcy: EmcyConsumer::new(),
            sync,
            transmit: VecDeque::new(),
        };
        master.drain_nmt();
        master
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// The earliest time `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let sdo = self.nodes.iter().filter_map(|n| n.sdo.poll_timeout());
        let sync = self.sync.as_ref().and_then(SyncProducer::poll_timeout);
        sdo.chain(self.heartbeat.poll_timeout()).chain(sync).min()
    }

    /// Feeds a received frame; `wall` is its acquisition time. Returns the end of an SDO
    /// transfer when this frame ended one.
    pub fn handle_frame(
        &mut self,
        frame: &Frame,
        now: Instant,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) -> Option<SdoResult> {
        match CobKind::of(frame.id()) {
            CobKind::Heartbeat(_) => {
                self.nmt.handle_frame(frame);
                self.drain_nmt();
                if let Some(change) = self.heartbeat.handle_frame(frame, now) {
                    self.on_availability(change, wall, sink);
                }
                None
            }
            CobKind::Emcy(_) => {
                if let Some(change) = self.emcy.handle_frame(frame) {
                    self.on_fault(change, wall, sink);
                }
                None
            }
            CobKind::Tpdo(..) => {
                self.on_tpdo(frame, wall, sink);
                None
            }
            CobKind::SdoResponse(node) => {
                let n = self.nodes.iter_mut().find(|n| n.settings.node == node)?;
                let current = n.sdo.current();
                let event = n.sdo.handle_frame(frame, now)?;
                self.on_sdo(node, current, event, wall, sink)
            }
            // A TPDO on a non-default COB-ID (mapped from 0x180n) lands here.
            _ => {
                self.on_tpdo(frame, wall, sink);
                None
            }
        }
    }

    /// Handles everything due at `now`: heartbeat deadlines, SDO timeouts, SYNC. Returns
    /// the SDO transfers that timed out.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) -> Vec<SdoResult> {
        for change in self.heartbeat.handle_timeout(now) {
            self.on_availability(change, wall, sink);
        }
        let mut results = Vec::new();
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let node = n.settings.node;
            let current = n.sdo.current();
            if let Some(event) = n.sdo.handle_timeout(now) {
                results.extend(self.on_sdo(node, current, event, wall, sink));
            }
        }
        if let Some(frame) = self.sync.as_mut().and_then(|s| s.handle_timeout(now)) {
            self.transmit.push_back(frame);
        }
        results
    }

    /// Starts reading `index:sub` of `node`; the request is queued for transmission.
    pub fn sdo_upload(
        &mut self,
        node: NodeId,
        index: u16,
        sub: u8,
        timeout: Duration,
        now: Instant,
    ) -> Result<(), SdoError> {
        let n = self.node_mut(node)?;
        let frame = n.sdo.start_upload(index, sub, timeout, now)?;
        self.transmit.push_back(frame);
        Ok(())
    }

    /// Starts writing `data` to `index:sub` of `node`; the request is queued.
    pub fn sdo_download(
        &mut self,
        node: NodeId,
        index: u16,
        sub: u8,
        data: &[u8],
        timeout: Duration,
        now: Instant,
    ) -> Result<(), SdoError> {
        let n = self.node_mut(node)?;
        let frame = n.sdo.start_download(index, sub, data, timeout, now)?;
        self.transmit.push_back(frame);
        Ok(())
    }

    /// True when `node` has no SDO transfer running.
    pub fn is_sdo_idle(&self, node: NodeId) -> bool {
        self.nodes
            .iter()
            .find(|n| n.settings.node == node)
            .is_some_and(|n| n.sdo.is_idle())
    }

    /// Replaces the TPDO mappings of `node` (after reading them from the drive).
    pub fn set_tpdos(&mut self, node: NodeId, tpdos: Vec<TpdoMapping>) -> Result<(), SdoError> {
        let n = self.node_mut(node)?;
        n.decoder = TpdoDecoder::new(tpdos.clone(), n.settings.scale);
        n.settings.tpdos = tpdos;
        Ok(())
    }

    /// The availability the heartbeat consumer last reported for `node`.
    pub fn availability(&self, node: NodeId) -> Option<AvailabilityState> {
        self.heartbeat.state(node)
    }

    fn node_mut(&mut self, node: NodeId) -> Result<&mut Node, SdoError> {
        self.nodes
            .iter_mut()
            .find(|n| n.settings.node == node)
            .ok_or(SdoError::UnknownNode(node))
    }

    fn drain_nmt(&mut self) {
        while let Some(frame) = self.nmt.poll_transmit() {
            self.transmit.push_back(frame);
        }
    }

    fn on_availability(
        &mut self,
        change: AvailabilityChange,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) {
        let Some(n) = self
            .nodes
            .iter_mut()
            .find(|n| n.settings.node == change.node)
        else {
            return;
        };
        let reason = match change.nmt_state {
            Some(nmt) => format!("heartbeat received (NMT {})", nmt.as_str()),
            None => {
                let hb = n.settings.heartbeat;
                format!(
                    "no heartbeat for {} ms (1.5 x producer time {} ms)",
                    consumer_time(hb).as_millis(),
                    hb.as_millis()
                )
            }
        };
        let state = change.state;
        sink.push(n.events.event(
            wall,
            EventBody::Availability(Availability {
                state,
                since: wall,
                reason: reason.clone(),
            }),
        ));
        sink.push(
            n.events
                .notice(wall, EventKind::Availability { state }, reason),
        );
    }

    fn on_fault(&mut self, change: FaultChange, wall: SystemTime, sink: &dyn EventSink) {
        let Some(n) = self
            .nodes
            .iter_mut()
            .find(|n| n.settings.node == change.node())
        else {
            return;
        };
        let message = match change {
            FaultChange::Fault { code, register, .. } => {
                format!("EMCY {code:#06x}, error register {register:#04x}")
            }
            FaultChange::FaultCleared { code, .. } => format!("fault {code:#06x} cleared"),
        };
        sink.push(n.events.notice(wall, change.to_event_kind(), message));
    }

    fn on_tpdo(&mut self, frame: &Frame, wall: SystemTime, sink: &dyn EventSink) {
        for n in &mut self.nodes {
            let Some(telemetry) = n.decoder.handle_frame(frame) else {
                continue;
            };
            // The state change goes out before the telemetry that shows it.
            if let Some(state) = telemetry.state {
                if n.drive_state != Some(state) {
                    sink.push(n.events.notice(
                        wall,
                        EventKind::StateChange {
                            from: n.drive_state,
                            to: state,
                        },
                        format!(
                            "{} -> {}",
                            n.drive_state.map_or("unknown", DriveState::as_str),
                            state.as_str()
                        ),
                    ));
                    n.drive_state = Some(state);
                }
            }
            sink.push(n.events.event(wall, EventBody::Telemetry(telemetry)));
            return;
        }
    }

    fn on_sdo(
        &mut self,
        node: NodeId,
        current: Option<(u16, u8)>,
        event: SdoEvent,
        wall: SystemTime,
        sink: &dyn EventSink,
    ) -> Option<SdoResult> {
        let (index, sub) = current.unwrap_or((0, 0));
        match event {
            SdoEvent::NextFrame(frame) => {
                self.transmit.push_back(frame);
                None
            }
            SdoEvent::Uploaded(data) => Some(SdoResult::Uploaded {
                node,
                index,
                sub,
                data,
            }),
            SdoEvent::Downloaded => Some(SdoResult::Downloaded { node, index, sub }),
            SdoEvent::Aborted {
                index,
                sub,
                code,
                by_server,
                frame,
            } => {
                if let Some(frame) = frame {
                    self.transmit.push_back(frame);
                }
                let error = if code == AbortCode::TIMEOUT && !by_server {
                    "timeout"
                } else {
                    "sdo_abort"
                };
                let who = if by_server { "drive" } else { "gateway" };
                if let Some(n) = self.nodes.iter_mut().find(|n| n.settings.node == node) {
                    sink.push(n.events.notice(
                        wall,
                        EventKind::CommError { error },
                        format!("SDO {index:#06x}:{sub} aborted by the {who}: {code}"),
                    ));
                }
                Some(SdoResult::Aborted {
                    node,
                    index,
                    sub,
                    code,
                    by_server,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use servogate_core::{Event, Telemetry};

    use super::*;

    #[derive(Default)]
    struct VecSink(Mutex<Vec<Event>>);

    impl EventSink for VecSink {
        fn push(&self, event: Event) {
            self.0.lock().unwrap().push(event);
        }
    }

    impl VecSink {
        fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    const MS: Duration = Duration::from_millis(1);
    const WALL: SystemTime = SystemTime::UNIX_EPOCH;

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn f(id: u16, data: &[u8]) -> Frame {
        Frame::new(id, data).unwrap()
    }

    fn master(t0: Instant) -> Master {
        let settings = |id: u8| NodeSettings {
            name: Arc::from(format!("axis-{id}")),
            node: n(id),
            heartbeat: 100 * MS,
            tpdos: vec![
                TpdoMapping::from_raw(0x180 + u16::from(id), &[0x6041_0010, 0x6064_0020]).unwrap(),
            ],
            scale: Cia402Scale {
                position: 0.001,
                ..Cia402Scale::default()
            },
        };
        Master::new(vec![settings(1), settings(2)], None, t0)
    }

    fn drain(m: &mut Master) -> Vec<Frame> {
        std::iter::from_fn(|| m.poll_transmit()).collect()
    }

    #[test]
    fn a_new_master_starts_every_configured_node() {
        let mut m = master(Instant::now());
        assert_eq!(drain(&mut m), vec![f(0, &[1, 1]), f(0, &[1, 2])]);
    }

    #[test]
    fn a_heartbeat_brings_a_drive_online_and_silence_takes_it_offline() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        m.handle_frame(&f(0x701, &[0x05]), t0, WALL, &sink);
        let events = sink.take();
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0].body,
            EventBody::Availability(a) if a.state == AvailabilityState::Online));
        assert_eq!(&*events[0].device, "axis-1");
        // Node 2 never sent anything; node 1 is silent after t0.
        m.handle_timeout(t0 + 150 * MS, WALL, &sink);
        let offline: Vec<_> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Availability(a) => Some((e.device, a.reason)),
                _ => None,
            })
            .collect();
        assert_eq!(offline.len(), 2);
        assert_eq!(
            offline[0].1,
            "no heartbeat for 150 ms (1.5 x producer time 100 ms)"
        );
    }

    #[test]
    fn a_rebooted_drive_is_started_again() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.handle_frame(&f(0x702, &[0x00]), t0, WALL, &sink);
        assert_eq!(drain(&mut m), vec![f(0, &[1, 2])]);
    }

    #[test]
    fn a_tpdo_gives_a_state_change_then_telemetry_with_growing_seq() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        let tpdo = f(0x181, &[0x37, 0x02, 0xE8, 0x03, 0, 0]);
        m.handle_frame(&tpdo, t0, WALL, &sink);
        m.handle_frame(&tpdo, t0, WALL, &sink);
        let events = sink.take();
        assert_eq!(events.len(), 3);
        assert!(matches!(
            &events[0].body,
            EventBody::Notice(notice) if notice.kind == EventKind::StateChange {
                from: None,
                to: DriveState::OperationEnabled,
            }
        ));
        let EventBody::Telemetry(Telemetry { position, .. }) = &events[1].body else {
            panic!("expected telemetry");
        };
        assert_eq!(*position, Some(1.0));
        assert_eq!((events[1].seq, events[2].seq), (1, 2));
    }

    #[test]
    fn an_emcy_gives_a_fault_notice_for_its_device() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        m.handle_frame(
            &f(0x082, &[0x10, 0x23, 0x03, 0, 0, 0, 0, 0]),
            t0,
            WALL,
            &sink,
        );
        let events = sink.take();
        assert_eq!(&*events[0].device, "axis-2");
        assert!(matches!(
            &events[0].body,
            EventBody::Notice(notice) if notice.kind == EventKind::Fault {
                code: 0x2310,
                register: Some(0x03),
            }
        ));
    }

    #[test]
    fn an_sdo_abort_is_a_comm_error_and_a_result_and_the_bus_goes_on() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.sdo_upload(n(1), 0x2FFF, 0, 50 * MS, t0).unwrap();
        assert_eq!(
            drain(&mut m),
            vec![f(0x601, &[0x40, 0xFF, 0x2F, 0, 0, 0, 0, 0])]
        );
        let abort = f(0x581, &[0x80, 0xFF, 0x2F, 0, 0x00, 0x00, 0x02, 0x06]);
        let result = m.handle_frame(&abort, t0, WALL, &sink);
        assert_eq!(
            result,
            Some(SdoResult::Aborted {
                node: n(1),
                index: 0x2FFF,
                sub: 0,
                code: AbortCode::NO_OBJECT,
                by_server: true,
            })
        );
        let EventBody::Notice(notice) = &sink.take()[0].body else {
            panic!("expected a notice");
        };
        assert_eq!(notice.kind, EventKind::CommError { error: "sdo_abort" });
        assert_eq!(
            notice.message,
            "SDO 0x2fff:0 aborted by the drive: 0x06020000 (object does not exist)"
        );
        assert!(m.is_sdo_idle(n(1)));
        assert!(m.sdo_upload(n(1), 0x6041, 0, 50 * MS, t0).is_ok());
    }

    #[test]
    fn an_sdo_timeout_sends_an_abort_and_reports_a_timeout() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = master(t0);
        drain(&mut m);
        m.sdo_upload(n(2), 0x6041, 0, 50 * MS, t0).unwrap();
        drain(&mut m);
        assert_eq!(m.poll_timeout(), Some(t0 + 50 * MS));
        let results = m.handle_timeout(t0 + 50 * MS, WALL, &sink);
        assert!(matches!(
            results[..],
            [SdoResult::Aborted {
                code: AbortCode::TIMEOUT,
                by_server: false,
                ..
            }]
        ));
        assert_eq!(
            drain(&mut m),
            vec![f(0x602, &[0x80, 0x41, 0x60, 0, 0x00, 0x00, 0x04, 0x05])]
        );
        let kinds: Vec<_> = sink
            .take()
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Notice(n) => Some(n.kind),
                _ => None,
            })
            .collect();
        assert!(kinds.contains(&EventKind::CommError { error: "timeout" }));
    }

    #[test]
    fn sdo_requests_to_unknown_nodes_are_refused() {
        let mut m = master(Instant::now());
        assert_eq!(
            m.sdo_upload(n(9), 0x6041, 0, MS, Instant::now()),
            Err(SdoError::UnknownNode(n(9)))
        );
    }

    #[test]
    fn the_sync_producer_sends_on_its_period() {
        let t0 = Instant::now();
        let sink = VecSink::default();
        let mut m = Master::new(vec![], Some(SyncProducer::new(10 * MS, None, t0)), t0);
        assert_eq!(m.poll_timeout(), Some(t0));
        m.handle_timeout(t0, WALL, &sink);
        assert_eq!(drain(&mut m), vec![f(0x080, &[])]);
        assert_eq!(m.poll_timeout(), Some(t0 + 10 * MS));
    }
}
