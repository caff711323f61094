//! Commands run through a [`Master`] against a drive played by hand: which SDO downloads
//! go out, in which order, and what each answer and statusword means.

use std::time::SystemTime;

use servogate_command::CommandId;
use servogate_core::{CommandStatus, Event, EventSink};

use super::*;
use crate::frame::{Frame, NodeId};
use crate::master::{Master, NodeSettings, SdoPoll, TpdoSource};
use crate::pdo::TpdoMapping;

const MS: Duration = Duration::from_millis(1);

struct Null;
impl EventSink for Null {
    fn push(&self, _: Event) {}
}

/// A node whose TPDO1 maps the statusword (or not) and whose position and velocity are
/// in mm and mm/s (scale 0.001).
fn settings(statusword_mapped: bool) -> NodeSettings {
    let mut objects = ObjectTable::cia402();
    for name in ["position", "velocity"] {
        let mut o = ObjectTable::builtin(name).unwrap();
        o.scale = 0.001;
        objects.insert(o);
    }
    objects.insert(ObjectSpec::new("speed_limit", 0x2100, 0, ObjType::U16));
    let raw: &[u32] = if statusword_mapped {
        &[0x6041_0010, 0x6064_0020]
    } else {
        &[0x6064_0020]
    };
    NodeSettings {
        tpdos: TpdoSource::Config(vec![TpdoMapping::from_raw(0x181, raw).unwrap()]),
        objects: Arc::new(objects),
        ..NodeSettings::new("axis-1", NodeId::new(1).unwrap(), Duration::ZERO)
    }
}

fn order(id: &str, action: Action, deadline: Instant) -> Order {
    Order {
        device: Arc::from("axis-1"),
        id: CommandId::parse(id).unwrap(),
        action,
        deadline,
        group: None,
    }
}

/// The drive at the other end: a CiA 402 state machine small enough to read.
struct Drive {
    sw: u16,
    controlword: u16,
    /// Every download, in order: (index, value little endian).
    downloads: Vec<(u16, u32)>,
    uploads: usize,
    abort: Option<u32>,
    /// Answers nothing at all.
    silent: bool,
    /// Ignores controlwords (a drive that does not move).
    stuck: bool,
}

const SOD: u16 = 0x0240;
const READY: u16 = 0x0221;
const SWITCHED_ON: u16 = 0x0223;
const ENABLED: u16 = 0x0237;
const QUICK_STOP: u16 = 0x0207;
const FAULT: u16 = 0x0218;

impl Drive {
    fn new(sw: u16) -> Self {
        Self {
            sw,
            controlword: 0,
            downloads: Vec::new(),
            uploads: 0,
            abort: None,
            silent: false,
            stuck: false,
        }
    }

    fn controlword(&mut self, w: u16) {
        let before = std::mem::replace(&mut self.controlword, w);
        if self.stuck {
            return;
        }
        let state = self.sw & 0x006F;
        let next = if self.sw & 0x0008 != 0 {
            if w & 0x80 != 0 && before & 0x80 == 0 {
                SOD
            } else {
                FAULT
            }
        } else {
            match w & 0x0F {
                0x06 | 0x0E => READY,
                0x07 if state != (SOD & 0x6F) => SWITCHED_ON,
                0x0F if state != (SOD & 0x6F) && state != (READY & 0x6F) => ENABLED,
                0x02 | 0x0A if state == (ENABLED & 0x6F) => QUICK_STOP,
                w if w & 0x02 == 0 || w & 0x04 == 0 => SOD,
                _ => self.sw & !0x1400,
            }
        };
        let mut sw = next;
        if next == ENABLED {
            // Set-point acknowledge follows bit 4 (rising edge latches, falling clears).
            if w & 0x10 != 0 && (before & 0x10 == 0 || self.sw & 0x1000 != 0) {
                sw |= 0x1000;
            }
        }
        self.sw = sw;
    }

    /// Answers every frame the master queued; the answers go back into the master.
    fn pump(&mut self, m: &mut Master, now: Instant) -> usize {
        let mut sent = 0;
        while let Some(f) = m.poll_transmit() {
            if f.id() != 0x601 || self.silent {
                continue;
            }
            sent += 1;
            let d = f.data();
            let mux = [d[1], d[2], d[3]];
            let index = u16::from_le_bytes([d[1], d[2]]);
            let reply = match d[0] >> 5 {
                1 => {
                    let value = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
                    self.downloads.push((index, value));
                    if let Some(code) = self.abort {
                        let c = code.to_le_bytes();
                        [0x80, mux[0], mux[1], mux[2], c[0], c[1], c[2], c[3]]
                    } else {
                        if index == 0x6040 {
                            self.controlword(value as u16);
                        }
                        [0x60, mux[0], mux[1], mux[2], 0, 0, 0, 0]
                    }
                }
                2 => {
                    self.uploads += 1;
                    let s = self.sw.to_le_bytes();
                    [0x4B, mux[0], mux[1], mux[2], s[0], s[1], 0, 0]
                }
                _ => continue,
            };
            let reply = Frame::new(0x581, &reply).unwrap();
            m.handle_frame(&reply, now, SystemTime::now(), &Null);
        }
        sent
    }

    /// One TPDO1 with the present statusword.
    fn tpdo(&self, m: &mut Master, now: Instant) {
        let s = self.sw.to_le_bytes();
        let f = Frame::new(0x181, &[s[0], s[1], 0, 0, 0, 0]).unwrap();
        m.handle_frame(&f, now, SystemTime::now(), &Null);
    }

    fn cws(&self) -> Vec<u32> {
        self.downloads
            .iter()
            .filter(|(i, _)| *i == 0x6040)
            .map(|(_, v)| *v)
            .collect()
    }
}

/// Runs until the master has an outcome: pumps frames and sends a TPDO every 10 ms.
fn run(m: &mut Master, d: &mut Drive, mut now: Instant, tpdos: bool) -> (Order, Outcome, Instant) {
    for _ in 0..10_000 {
        d.pump(m, now);
        if let Some((o, outcome)) = m.poll_outcome() {
            return (o, outcome, now);
        }
        now += 10 * MS;
        m.handle_timeout(now, SystemTime::now(), &Null);
        if tpdos && !d.silent {
            d.tpdo(m, now);
        }
    }
    panic!("no outcome");
}

#[test]
fn enable_walks_the_drive_to_operation_enabled_confirming_each_step_on_the_tpdo() {
    // Given a drive in switch on disabled whose TPDO carries the statusword
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(SOD);
    // When enable is ordered
    m.command(order("c-1", Action::Enable, t0 + 500 * MS), t0)
        .unwrap();
    // Then nothing goes out before a statusword says where the drive is
    assert_eq!(d.pump(&mut m, t0), 0);
    let (o, outcome, _) = run(&mut m, &mut d, t0, true);
    // And shutdown, switch on, enable operation go out once each
    assert_eq!(outcome, Outcome::done());
    assert_eq!(o.id.as_str(), "c-1");
    assert_eq!(d.cws(), [0x06, 0x07, 0x0F]);
    assert_eq!(d.uploads, 0, "the TPDO carried every statusword");
}

#[test]
fn without_a_mapped_statusword_the_job_reads_it_over_sdo() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(false)], None, t0);
    let mut d = Drive::new(SOD);
    m.command(order("c-1", Action::Enable, t0 + 500 * MS), t0)
        .unwrap();
    let (_, outcome, _) = run(&mut m, &mut d, t0, false);
    assert_eq!(outcome, Outcome::done());
    assert_eq!(d.cws(), [0x06, 0x07, 0x0F]);
    assert_eq!(
        d.uploads, 4,
        "one statusword before each write and one after the last"
    );
}

#[test]
fn a_move_loads_mode_target_and_speed_scaled_then_does_the_set_point_handshake() {
    // Given an enabled drive
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(ENABLED);
    let action = Action::Move {
        position: 120.5,
        velocity: Some(50.0),
        relative: false,
        wait: Wait::TargetReached,
    };
    m.command(order("c-2", action, t0 + 500 * MS), t0).unwrap();
    // When the set-point is acknowledged, and later the target reached
    let mut now = t0;
    for _ in 0..20 {
        d.pump(&mut m, now);
        now += 10 * MS;
        d.tpdo(&mut m, now);
    }
    // Then the job waits for target reached after the handshake
    assert!(m.poll_outcome().is_none());
    assert_eq!(
        d.downloads,
        [
            (0x6060, 1),
            (0x607A, 120_500),
            (0x6081, 50_000),
            (0x6040, 0x0F),
            (0x6040, 0x1F),
            (0x6040, 0x0F),
        ]
    );
    d.sw = ENABLED | 0x0400;
    let (_, outcome, _) = run(&mut m, &mut d, now, true);
    assert_eq!(outcome, Outcome::done());
    assert_eq!(d.downloads.len(), 6, "nothing more was written");
}

#[test]
fn a_relative_move_sets_bit_6_and_is_not_offset() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(ENABLED);
    let action = Action::Move {
        position: -2.0,
        velocity: None,
        relative: true,
        wait: Wait::Ack,
    };
    m.command(order("c-3", action, t0 + 500 * MS), t0).unwrap();
    let (_, outcome, _) = run(&mut m, &mut d, t0, true);
    assert_eq!(outcome, Outcome::done());
    assert_eq!(
        d.downloads,
        [
            (0x6060, 1),
            (0x607A, (-2000i32) as u32),
            (0x6040, 0x4F),
            (0x6040, 0x5F),
            (0x6040, 0x4F),
        ]
    );
}

#[test]
fn velocity_writes_mode_3_and_the_target_velocity() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(ENABLED);
    let action = Action::Velocity { velocity: -12.5 };
    m.command(order("c-4", action, t0 + 500 * MS), t0).unwrap();
    let (_, outcome, _) = run(&mut m, &mut d, t0, true);
    assert_eq!(outcome, Outcome::done());
    assert_eq!(
        d.downloads,
        [(0x6060, 3), (0x60FF, (-12_500i32) as u32), (0x6040, 0x0F)]
    );
}

#[test]
fn an_sdo_abort_fails_the_command_with_its_code_and_nothing_more_is_sent() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(ENABLED);
    d.abort = Some(0x0800_0022);
    m.command(order("c-5", Action::QuickStop, t0 + 500 * MS), t0)
        .unwrap();
    let (_, outcome, _) = run(&mut m, &mut d, t0, true);
    assert_eq!(outcome.status, CommandStatus::Failed);
    assert_eq!(outcome.reason, Some(CommandReason::SdoAbort));
    assert!(
        outcome.message.contains("0x08000022"),
        "{}",
        outcome.message
    );
    assert_eq!(d.downloads, [(0x6040, 0x02)]);
}

#[test]
fn a_download_without_an_answer_is_unknown_and_never_sent_again() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(ENABLED);
    d.silent = true;
    m.command(order("c-6", Action::QuickStop, t0 + 500 * MS), t0)
        .unwrap();
    let mut downloads = 0;
    let mut outcome = None;
    let mut now = t0;
    for _ in 0..50 {
        while let Some(f) = m.poll_transmit() {
            if f.id() == 0x601 && f.data()[0] >> 5 == 1 {
                downloads += 1;
            }
        }
        outcome = outcome.or(m.poll_outcome());
        now += 10 * MS;
        m.handle_timeout(now, SystemTime::now(), &Null);
    }
    let outcome = outcome.expect("an outcome");
    assert_eq!(outcome.1.status, CommandStatus::Unknown);
    assert_eq!(outcome.1.reason, Some(CommandReason::Timeout));
    assert_eq!(downloads, 1);
}

#[test]
fn a_command_whose_deadline_passed_before_its_first_frame_is_expired_and_sends_nothing() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(ENABLED);
    m.command(order("c-7", Action::QuickStop, t0), t0 + MS)
        .unwrap();
    let (_, outcome) = m.poll_outcome().expect("an outcome at once");
    assert_eq!(outcome.status, CommandStatus::Expired);
    assert_eq!(d.pump(&mut m, t0 + MS), 0);
}

#[test]
fn a_command_waits_for_the_transfer_in_flight_then_goes_before_the_polls() {
    // Given a node whose client is busy with a poll of the statusword
    let t0 = Instant::now();
    let mut s = settings(true);
    s.polls = vec![SdoPoll {
        object: ObjectSpec::new("dc_bus", 0x2011, 0, ObjType::U32),
        every: 5 * MS,
    }];
    let mut m = Master::new(vec![s], None, t0);
    let nmt_start = m.poll_transmit().expect("NMT start");
    assert_eq!(nmt_start.id(), 0x000);
    let poll = m.poll_transmit().expect("the first poll");
    assert_eq!(poll.data()[0], 0x40);
    // When a quick stop comes while it runs, it waits: one transfer per client
    m.command(order("c-8", Action::QuickStop, t0 + 500 * MS), t0)
        .unwrap();
    assert!(m.poll_transmit().is_none());
    // Then the poll's answer releases the client, and the stop goes first, though
    // the next poll is due too
    let answer = Frame::new(0x581, &[0x43, 0x11, 0x20, 0, 1, 0, 0, 0]).unwrap();
    m.handle_frame(&answer, t0 + 10 * MS, SystemTime::now(), &Null);
    let next = m.poll_transmit().expect("the stop");
    assert_eq!(next.data()[..6], [0x2B, 0x40, 0x60, 0, 0x02, 0]);
}

#[test]
fn a_quick_stop_interrupts_the_running_job_and_cancels_the_queued_one() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(SOD);
    m.command(order("c-9", Action::Enable, t0 + 500 * MS), t0)
        .unwrap();
    d.tpdo(&mut m, t0 + MS);
    d.pump(&mut m, t0 + MS);
    let action = Action::Move {
        position: 1.0,
        velocity: None,
        relative: false,
        wait: Wait::Ack,
    };
    m.command(order("c-10", action, t0 + 500 * MS), t0 + 2 * MS)
        .unwrap();
    m.command(order("c-11", Action::QuickStop, t0 + 500 * MS), t0 + 3 * MS)
        .unwrap();
    let (o, outcome) = m.poll_outcome().unwrap();
    assert_eq!(
        (o.id.as_str(), outcome.status),
        ("c-9", CommandStatus::Failed)
    );
    assert!(outcome.message.contains("interrupted by quick_stop c-11"));
    let (o, outcome) = m.poll_outcome().unwrap();
    assert_eq!(
        (o.id.as_str(), outcome.status),
        ("c-10", CommandStatus::Rejected)
    );
    let (o, _, _) = run(&mut m, &mut d, t0 + 3 * MS, true);
    assert_eq!(o.id.as_str(), "c-11");
    assert_eq!(d.cws(), [0x06, 0x02]);
}

#[test]
fn a_transition_that_does_not_come_in_time_fails_with_wrong_state() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(SOD);
    d.stuck = true;
    m.command(order("c-12", Action::Enable, t0 + 500 * MS), t0)
        .unwrap();
    let (_, outcome, at) = run(&mut m, &mut d, t0, true);
    assert_eq!(outcome.status, CommandStatus::Failed);
    assert_eq!(outcome.reason, Some(CommandReason::WrongState));
    assert!(at >= t0 + TRANSITION_TIMEOUT && at <= t0 + TRANSITION_TIMEOUT + 20 * MS);
    assert_eq!(
        d.cws(),
        [0x06],
        "one write per state, not one per statusword"
    );
}

#[test]
fn enable_from_fault_fails_and_fault_reset_clears_it_on_a_rising_edge() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(FAULT);
    m.command(order("c-13", Action::Enable, t0 + 500 * MS), t0)
        .unwrap();
    let (_, outcome, now) = run(&mut m, &mut d, t0, true);
    assert_eq!(outcome.reason, Some(CommandReason::WrongState));
    assert!(d.downloads.is_empty());
    m.command(order("c-14", Action::FaultReset, now + 500 * MS), now)
        .unwrap();
    let (_, outcome, _) = run(&mut m, &mut d, now, true);
    assert_eq!(outcome, Outcome::done());
    assert_eq!(d.cws(), [0x00, 0x80]);
}

#[test]
fn a_statusword_older_than_the_step_does_not_confirm_it() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0 + 10 * MS);
    let mut d = Drive::new(SWITCHED_ON);
    m.command(order("c-15", Action::Disable, t0 + 500 * MS), t0 + 10 * MS)
        .unwrap();
    // A TPDO stamped before the command arrived says nothing about it
    d.tpdo(&mut m, t0);
    assert_eq!(d.pump(&mut m, t0 + 10 * MS), 0);
    d.tpdo(&mut m, t0 + 11 * MS);
    assert_eq!(d.pump(&mut m, t0 + 11 * MS), 1);
}

#[test]
fn write_scales_in_reverse_and_refuses_what_the_object_cannot_hold() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    let mut d = Drive::new(ENABLED);
    let write = |v: f64| Action::Write {
        values: vec![("speed_limit".into(), v)],
    };
    m.command(order("c-16", write(250.0), t0 + 500 * MS), t0)
        .unwrap();
    let (_, outcome, _) = run(&mut m, &mut d, t0, true);
    assert_eq!(outcome, Outcome::done());
    assert_eq!(d.downloads, [(0x2100, 250)]);
    let e = m
        .command(order("c-17", write(70_000.0), t0 + 500 * MS), t0)
        .unwrap_err();
    assert_eq!(e.reason, Some(CommandReason::OutOfRange));
    let nope = Action::Write {
        values: vec![("nope".into(), 1.0)],
    };
    let e = m
        .command(order("c-18", nope, t0 + 500 * MS), t0)
        .unwrap_err();
    assert_eq!(e.reason, Some(CommandReason::UnknownField));
}

#[test]
fn draining_answers_started_jobs_unknown_and_waiting_ones_bus_down() {
    let t0 = Instant::now();
    let mut m = Master::new(vec![settings(true)], None, t0);
    m.command(order("c-19", Action::QuickStop, t0 + 500 * MS), t0)
        .unwrap();
    m.command(order("c-20", Action::Enable, t0 + 500 * MS), t0)
        .unwrap();
    m.drain_commands();
    let (_, a) = m.poll_outcome().unwrap();
    let (_, b) = m.poll_outcome().unwrap();
    assert_eq!(a.status, CommandStatus::Unknown);
    assert_eq!(
        (b.status, b.reason),
        (CommandStatus::Rejected, Some(CommandReason::BusDown))
    );
}

#[test]
fn encoding_rounds_checks_the_range_and_never_writes_64_bit_objects() {
    let mut o = ObjectSpec::new("x", 0x2000, 0, ObjType::I16);
    o.scale = 0.1;
    o.offset = 10.0;
    assert_eq!(encode(&o, 12.26, true).unwrap(), [23, 0]);
    assert_eq!(encode(&o, 12.26, false).unwrap(), [123, 0]);
    assert!(encode(&o, 1e9, true).is_err());
    assert!(encode(&o, f64::NAN, true).is_err());
    let big = ObjectSpec::new("y", 0x2001, 0, ObjType::U64);
    assert!(encode(&big, 1.0, true).is_err());
    let f = ObjectSpec::new("z", 0x2002, 0, ObjType::F32);
    assert_eq!(encode(&f, 1.5, true).unwrap(), 1.5f32.to_le_bytes());
}
