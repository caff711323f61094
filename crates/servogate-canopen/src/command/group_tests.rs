//! Group moves through a [`Master`] against several drives played by hand: every
//! set-point is loaded over SDO first, then all start through their RPDOs on one SYNC;
//! a group that cannot start together sends nothing, or stops before the start.

use std::collections::BTreeMap;
use std::time::SystemTime;

use servogate_command::{CommandId, GroupTag};
use servogate_core::{CommandStatus, Event, EventSink};

use super::*;
use crate::frame::{Frame, NodeId};
use crate::master::{Master, NodeSettings, TpdoSource};
use crate::pdo::TpdoMapping;

const MS: Duration = Duration::from_millis(1);
const ENABLED: u16 = 0x0237;

struct Null;
impl EventSink for Null {
    fn push(&self, _: Event) {}
}

fn name(node: u8) -> String {
    format!("axis-{node}")
}

fn settings(node: u8) -> NodeSettings {
    let raw = &[0x6041_0010];
    let cob = 0x180 + u16::from(node);
    NodeSettings {
        tpdos: TpdoSource::Config(vec![TpdoMapping::from_raw(cob, raw).unwrap()]),
        start_rpdo: Some(1),
        ..NodeSettings::new(&name(node), NodeId::new(node).unwrap(), Duration::ZERO)
    }
}

fn group_move(node: u8, key: u64, members: usize, deadline: Instant) -> Order {
    Order {
        device: Arc::from(name(node).as_str()),
        id: CommandId::parse("g-1").unwrap(),
        action: Action::Move {
            position: f64::from(node) * 10.0,
            velocity: None,
            relative: false,
            wait: Wait::Ack,
        },
        deadline,
        group: Some(GroupTag { key, members }),
    }
}

/// One drive: enabled, its RPDO1 the controlword with `rpdo_type`.
struct Drive {
    node: u8,
    sw: u16,
    cw: u16,
    rpdo_type: u8,
    latched: Option<u16>,
    downloads: Vec<(u16, u32)>,
    /// The SYNC number at which it took a set-point by RPDO.
    started_at: Option<usize>,
    /// Answers no SDO request while set.
    deaf: bool,
}

impl Drive {
    fn new(node: u8) -> Self {
        Self {
            node,
            sw: ENABLED,
            cw: 0x0F,
            rpdo_type: 1,
            latched: None,
            downloads: Vec::new(),
            started_at: None,
            deaf: false,
        }
    }

    fn controlword(&mut self, w: u16) -> bool {
        let rising = w & 0x10 != 0 && self.cw & 0x10 == 0;
        self.cw = w;
        if rising {
            self.sw |= 0x1000;
        } else if w & 0x10 == 0 {
            self.sw &= !0x1000;
        }
        rising
    }

    fn upload(&self, index: u16, sub: u8) -> u32 {
        match (index, sub) {
            (0x1400, 1) => 0x200 + u32::from(self.node),
            (0x1400, 2) => u32::from(self.rpdo_type),
            (0x1600, 0) => 1,
            (0x1600, 1) => 0x6040_0010,
            _ => u32::from(self.sw),
        }
    }
}

/// The bus: every frame the master sends, in order, and the drives answering them.
struct Cell {
    drives: BTreeMap<u8, Drive>,
    /// (COB-ID, data) of everything the master sent.
    wire: Vec<(u16, Vec<u8>)>,
    syncs: usize,
}

impl Cell {
    fn new(nodes: &[u8]) -> Self {
        Self {
            drives: nodes.iter().map(|&n| (n, Drive::new(n))).collect(),
            wire: Vec::new(),
            syncs: 0,
        }
    }

    /// Hands every queued frame to the drives and their answers back to the master.
    fn pump(&mut self, m: &mut Master, now: Instant) {
        while let Some(f) = m.poll_transmit() {
            self.wire.push((f.id(), f.data().to_vec()));
            let id = f.id();
            let d = f.data();
            if id == 0x080 {
                self.syncs += 1;
                for drive in self.drives.values_mut() {
                    if let Some(w) = drive.latched.take() {
                        if drive.controlword(w) {
                            drive.started_at = Some(self.syncs);
                        }
                    }
                }
            } else if (0x201..=0x27F).contains(&id) {
                if let Some(drive) = self.drives.get_mut(&((id - 0x200) as u8)) {
                    let w = u16::from_le_bytes([d[0], d[1]]);
                    if drive.rpdo_type <= 240 {
                        drive.latched = Some(w);
                    } else {
                        drive.controlword(w);
                    }
                }
            } else if (0x601..=0x67F).contains(&id) {
                let node = (id - 0x600) as u8;
                let Some(drive) = self.drives.get_mut(&node) else {
                    continue;
                };
                if drive.deaf {
                    continue;
                }
                let mux = [d[1], d[2], d[3]];
                let index = u16::from_le_bytes([d[1], d[2]]);
                let reply = match d[0] >> 5 {
                    1 => {
                        let value = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                        drive.downloads.push((index, value));
                        if index == 0x6040 {
                            drive.controlword(value as u16);
                        }
                        [0x60, mux[0], mux[1], mux[2], 0, 0, 0, 0]
                    }
                    2 => {
                        let v = drive.upload(index, d[3]).to_le_bytes();
                        [0x43, mux[0], mux[1], mux[2], v[0], v[1], v[2], v[3]]
                    }
                    _ => continue,
                };
                let reply = Frame::new(0x580 + u16::from(node), &reply).unwrap();
                m.handle_frame(&reply, now, SystemTime::now(), &Null);
            }
        }
    }

    /// A TPDO with the statusword from every drive.
    fn tpdos(&self, m: &mut Master, now: Instant) {
        for d in self.drives.values() {
            let s = d.sw.to_le_bytes();
            let f = Frame::new(0x180 + u16::from(d.node), &[s[0], s[1]]).unwrap();
            m.handle_frame(&f, now, SystemTime::now(), &Null);
        }
    }

    /// Runs 10 ms steps until `n` outcomes came, or `steps` passed.
    fn run(
        &mut self,
        m: &mut Master,
        now: &mut Instant,
        n: usize,
        steps: usize,
    ) -> Vec<(Order, Outcome)> {
        let mut out = Vec::new();
        for _ in 0..steps {
            self.pump(m, *now);
            while let Some(o) = m.poll_outcome() {
                out.push(o);
            }
            if out.len() >= n {
                break;
            }
            *now += 10 * MS;
            m.handle_timeout(*now, SystemTime::now(), &Null);
            self.tpdos(m, *now);
        }
        out
    }

    /// Positions in `wire` of frames with `id`s matching `f`.
    fn at(&self, f: impl Fn(u16) -> bool) -> Vec<usize> {
        (0..self.wire.len())
            .filter(|&i| f(self.wire[i].0))
            .collect()
    }

    fn downloads(&self) -> usize {
        self.drives.values().map(|d| d.downloads.len()).sum()
    }
}

/// A master over `nodes` whose start-up checks of RPDO1 have run.
fn ready(nodes: &[u8], cell: &mut Cell, t0: Instant) -> (Master, Instant) {
    let mut m = Master::new(nodes.iter().map(|&n| settings(n)).collect(), None, t0);
    let mut now = t0;
    assert!(cell.run(&mut m, &mut now, 1, 5).is_empty());
    cell.wire.clear();
    (m, now)
}

#[test]
fn a_group_move_loads_every_drive_first_then_starts_all_with_their_rpdos_and_one_sync() {
    // Given three enabled drives whose RPDO1 is the controlword, synchronous
    let t0 = Instant::now();
    let mut cell = Cell::new(&[1, 2, 3]);
    let (mut m, mut now) = ready(&[1, 2, 3], &mut cell, t0);
    // When a group move of the three arrives
    for n in [1, 2, 3] {
        m.command(group_move(n, 7, 3, now + 500 * MS), now).unwrap();
    }
    let outcomes = cell.run(&mut m, &mut now, 3, 100);
    // Then every drive confirmed its set-point
    assert_eq!(outcomes.len(), 3);
    assert!(
        outcomes.iter().all(|(_, o)| *o == Outcome::done()),
        "{outcomes:?}"
    );
    // And the three RPDOs went out back to back after every target was loaded, then one
    // SYNC, and no set-point by SDO
    let rpdos = cell.at(|id| (0x201..=0x203).contains(&id));
    let syncs = cell.at(|id| id == 0x080);
    let target_loads: Vec<usize> = (0..cell.wire.len())
        .filter(|&i| cell.wire[i].0 > 0x600 && cell.wire[i].1[1..3] == [0x7A, 0x60])
        .collect();
    assert_eq!(rpdos.len(), 3);
    assert_eq!(syncs, [rpdos[2] + 1]);
    assert_eq!(rpdos, [rpdos[0], rpdos[0] + 1, rpdos[0] + 2]);
    assert!(target_loads.len() == 3 && target_loads.iter().all(|&i| i < rpdos[0]));
    for d in cell.drives.values() {
        assert_eq!(
            d.started_at,
            Some(1),
            "node {} started at the one SYNC",
            d.node
        );
        let cws: Vec<u32> = d
            .downloads
            .iter()
            .filter(|(i, _)| *i == 0x6040)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(
            cws,
            [0x0F, 0x0F],
            "bit 4 low before and after: the rise came by RPDO"
        );
        assert!(d.downloads.contains(&(0x607A, u32::from(d.node) * 10)));
    }
}

#[test]
fn a_drive_whose_rpdo_acts_at_once_refuses_the_whole_group_and_nothing_is_sent() {
    let t0 = Instant::now();
    let mut cell = Cell::new(&[1, 2]);
    cell.drives.get_mut(&2).unwrap().rpdo_type = 255;
    let (mut m, mut now) = ready(&[1, 2], &mut cell, t0);
    for n in [1, 2] {
        m.command(group_move(n, 1, 2, now + 500 * MS), now).unwrap();
    }
    let outcomes = cell.run(&mut m, &mut now, 2, 10);
    let by = |dev: &str| {
        outcomes
            .iter()
            .find(|(o, _)| &*o.device == dev)
            .unwrap()
            .1
            .clone()
    };
    let two = by("axis-2");
    assert_eq!(
        (two.status, two.reason),
        (CommandStatus::Rejected, Some(CommandReason::NotAllowed))
    );
    assert!(
        two.message.contains("transmission type 255"),
        "{}",
        two.message
    );
    assert_eq!(by("axis-1").reason, Some(CommandReason::GroupRejected));
    assert_eq!(cell.downloads(), 0);
    assert!(cell.wire.is_empty(), "not a frame: {:?}", cell.wire);
}

#[test]
fn a_drive_without_a_start_rpdo_in_the_config_refuses_the_group() {
    let t0 = Instant::now();
    let mut cell = Cell::new(&[1, 2]);
    let nodes = vec![
        settings(1),
        NodeSettings {
            start_rpdo: None,
            ..settings(2)
        },
    ];
    let mut m = Master::new(nodes, None, t0);
    let mut now = t0;
    cell.run(&mut m, &mut now, 1, 5);
    cell.wire.clear();
    for n in [1, 2] {
        m.command(group_move(n, 1, 2, now + 500 * MS), now).unwrap();
    }
    let outcomes = cell.run(&mut m, &mut now, 2, 10);
    assert!(outcomes
        .iter()
        .all(|(_, o)| o.status == CommandStatus::Rejected));
    assert!(outcomes
        .iter()
        .any(|(_, o)| o.message.contains("none configured")));
    assert_eq!(cell.downloads(), 0);
}

#[test]
fn a_quick_stop_to_one_drive_while_the_group_loads_ends_it_and_no_drive_starts() {
    // Given a group of two whose second drive is slow to answer
    let t0 = Instant::now();
    let mut cell = Cell::new(&[1, 2]);
    let (mut m, mut now) = ready(&[1, 2], &mut cell, t0);
    cell.drives.get_mut(&2).unwrap().deaf = true;
    for n in [1, 2] {
        m.command(group_move(n, 3, 2, now + 500 * MS), now).unwrap();
    }
    cell.run(&mut m, &mut now, 1, 3);
    // When axis-1 is told to quick stop before the start
    let stop = Order {
        action: Action::QuickStop,
        id: CommandId::parse("s-1").unwrap(),
        group: None,
        ..group_move(1, 0, 1, now + 500 * MS)
    };
    m.command(stop, now).unwrap();
    cell.drives.get_mut(&2).unwrap().deaf = false;
    let outcomes = cell.run(&mut m, &mut now, 3, 200);
    // Then both moves end unstarted, the stop is done, and nothing started either drive
    let moves: Vec<&Outcome> = outcomes
        .iter()
        .filter(|(o, _)| o.id.as_str() == "g-1")
        .map(|(_, o)| o)
        .collect();
    assert_eq!(moves.len(), 2, "{outcomes:?}");
    assert!(
        moves.iter().all(|o| o.status != CommandStatus::Done),
        "{moves:?}"
    );
    assert!(moves
        .iter()
        .any(|o| o.reason == Some(CommandReason::GroupRejected)));
    assert!(cell
        .at(|id| (0x201..=0x202).contains(&id) || id == 0x080)
        .is_empty());
    assert!(cell
        .drives
        .values()
        .all(|d| d.started_at.is_none() && d.sw & 0x1000 == 0));
}

#[test]
fn a_group_whose_other_members_never_reach_the_bus_expires_and_sends_nothing() {
    let t0 = Instant::now();
    let mut cell = Cell::new(&[1, 2]);
    let (mut m, mut now) = ready(&[1, 2], &mut cell, t0);
    m.command(group_move(1, 9, 2, now + 50 * MS), now).unwrap();
    let outcomes = cell.run(&mut m, &mut now, 1, 20);
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].1.status, CommandStatus::Expired);
    assert!(cell.wire.is_empty());
}
