//! The simulator's shared state: which units exist, fault injection, counters, and the
//! sans-IO answer to one request frame.

use std::collections::BTreeMap;
use std::num::NonZeroU8;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use servogate_modbus::timing::{t35, wire_time};
use tokio::time::Instant;

use crate::drive::Drive;
use crate::model::{self, DriveState, Sample};
use crate::rtu::{self, Exception, Request, RequestFrame};
use crate::units::UnitList;
use crate::SimError;

/// When replies go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Timing {
    /// As soon as the reply is built (a pty has no baud rate).
    #[default]
    Instant,
    /// Each transaction costs its wire time at the configured baud rate; see
    /// [`faithful_delay`].
    Faithful {
        /// The drive's processing time between request and reply.
        turnaround: Duration,
    },
    /// No wire time, only the drive's processing time: a drive on Ethernet
    /// (`servosim modbus-tcp --turnaround`).
    Network {
        /// The drive's processing time between request and reply.
        turnaround: Duration,
    },
}

/// How a [`Simulator`] behaves; fault injection comes later through its methods.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Baud rate whose wire time [`Timing::Faithful`] charges.
    pub baud: u32,
    /// Instant or timing-faithful replies.
    pub timing: Timing,
    /// Seed of the CRC-noise RNG; `None` seeds from the OS, so runs differ.
    pub seed: Option<u64>,
    /// Fraction (0.0-1.0) of replies sent with a corrupted byte.
    pub crc_noise: f64,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            baud: 115_200,
            timing: Timing::Instant,
            seed: None,
            crc_noise: 0.0,
        }
    }
}

/// How long after a request arrived (all at once, over a pty) its reply goes out in
/// timing-faithful mode: the request's own wire time, the t3.5 silence that ends it, the
/// drive's turnaround and the reply's wire time. The gateway owes the second t3.5 before
/// its next request, which makes the whole transaction
/// `(req + reply) x 11 / baud + 2 t3.5 + turnaround` (DESIGN.md section 5).
pub fn faithful_delay(
    request_len: usize,
    reply_len: usize,
    baud: u32,
    turnaround: Duration,
) -> Duration {
    wire_time(request_len, baud) + t35(baud) + turnaround + wire_time(reply_len, baud)
}

/// Requests the journal keeps.
pub const JOURNAL_LEN: usize = 512;

/// One request frame to a simulated unit, as it arrived (for tests of the gateway's
/// order on the line: a command ahead of the polls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalEntry {
    pub unit: u8,
    /// The function code (3 read holding, 4 read input, 6 and 16 writes).
    pub function: u8,
    /// Model time of its arrival, ms.
    pub t_ms: u32,
}

/// Counters of one unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitStats {
    /// Replies sent (normal or exception, corrupted or not).
    pub served: u64,
    /// Requests left unanswered because the unit was dead.
    pub ignored: u64,
    /// Write request frames (06, 16) addressed to this unit or broadcast, whatever became
    /// of them: applied, refused with an exception, unanswered, or ignored by a dead unit.
    pub writes: u64,
    /// Writes the drive took (stored and acted on), answered or not.
    pub applied: u64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Per simulated unit.
    pub units: BTreeMap<u8, UnitStats>,
    /// Replies sent with a corrupted byte (CRC noise).
    pub corrupted: u64,
    /// Bytes dropped from the line because no valid frame started with them (bad CRC,
    /// garbage, truncated frames).
    pub dropped_bytes: u64,
    /// Modbus TCP connections closed because a request's MBAP header broke the framing
    /// (protocol id not 0, length outside 2-254).
    pub bad_mbap: u64,
}

/// What the simulator knows at one instant about one unit: for `truth` and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Truth {
    pub unit: u8,
    pub t_ms: u32,
    pub drive: DriveState,
    pub sample: Sample,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The frame to write, CRC included (possibly corrupted).
    pub bytes: Vec<u8>,
    /// How long after the request arrived to write it.
    pub delay: Duration,
    /// True when CRC noise corrupted this reply.
    pub corrupted: bool,
}

#[derive(Debug)]
struct UnitCtl {
    dead: bool,
    late: Option<Duration>,
    /// Answer every write with this exception code and apply nothing.
    reject: Option<NonZeroU8>,
    /// Apply writes but send no reply to them.
    mute_writes: bool,
    drive: Drive,
    stats: UnitStats,
}

impl UnitCtl {
    fn new(unit: u8) -> Self {
        Self {
            dead: false,
            late: None,
            reject: None,
            mute_writes: false,
            drive: Drive::new(unit),
            stats: UnitStats::default(),
        }
    }
}

#[derive(Debug)]
struct Inner {
    units: BTreeMap<u8, UnitCtl>,
    rng: fastrand::Rng,
    crc_noise: f64,
    corrupted: u64,
    dropped_bytes: u64,
    bad_mbap: u64,
    /// The last requests to simulated units, oldest first.
    journal: std::collections::VecDeque<JournalEntry>,
}

/// Simulated servo drives answering as Modbus RTU units. Share it in an `Arc`: the
/// serving task, a console and tests all call `&self` methods (a short `Mutex` inside,
/// never held across an await).
#[derive(Debug)]
pub struct Simulator {
    unit_list: UnitList,
    options: SimOptions,
    start: Instant,
    inner: Mutex<Inner>,
}

impl Simulator {
    /// Creates the units; model time starts now.
    pub fn new(units: UnitList, options: SimOptions) -> Self {
        let rng = match options.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let inner = Inner {
            units: units.iter().map(|u| (u, UnitCtl::new(u))).collect(),
            rng,
            crc_noise: clamp_rate(options.crc_noise),
            corrupted: 0,
            dropped_bytes: 0,
            bad_mbap: 0,
            journal: std::collections::VecDeque::with_capacity(JOURNAL_LEN),
        };
        Self {
            unit_list: units,
            options,
            start: Instant::now(),
            inner: Mutex::new(inner),
        }
    }

    /// The simulated units.
    pub fn units(&self) -> &UnitList {
        &self.unit_list
    }

    /// The options it was created with (CRC noise may have changed since).
    pub fn options(&self) -> &SimOptions {
        &self.options
    }

    /// Model time at `at`: milliseconds since the simulator was created, wrapping after
    /// about 49.7 days like the u32 register that shows it.
    pub fn t_ms_at(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.start).as_millis() as u32
    }

    /// Model time now.
    pub fn t_ms(&self) -> u32 {
        self.t_ms_at(Instant::now())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters or flags half-updated
        // in a way that matters to a simulator, so a poisoned lock is used as is.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with_unit<T>(&self, unit: u8, f: impl FnOnce(&mut UnitCtl) -> T) -> Result<T, SimError> {
        let mut inner = self.lock();
        let ctl = inner
            .units
            .get_mut(&unit)
            .ok_or(SimError::UnknownUnit(unit))?;
        Ok(f(ctl))
    }

    /// A dead unit ignores every request, as a drive with no power would.
    pub fn set_dead(&self, unit: u8, dead: bool) -> Result<(), SimError> {
        self.with_unit(unit, |u| u.dead = dead)
    }

    /// Delays `unit`'s replies by `late` (on top of timing-faithful wire time); `None`
    /// answers on time again.
    pub fn set_late(&self, unit: u8, late: Option<Duration>) -> Result<(), SimError> {
        self.with_unit(unit, |u| u.late = late)
    }

    /// Makes `unit` answer every write (06, 16) with Modbus exception `code` (e.g. 4
    /// Server Device Failure) and apply nothing; reads are answered as before. `None`
    /// accepts writes again.
    pub fn set_reject(&self, unit: u8, code: Option<NonZeroU8>) -> Result<(), SimError> {
        self.with_unit(unit, |u| u.reject = code)
    }

    /// Makes `unit` apply writes but send no reply to them (reads are answered), so the
    /// gateway cannot know whether they arrived; `false` answers them again.
    pub fn set_mute_writes(&self, unit: u8, mute: bool) -> Result<(), SimError> {
        self.with_unit(unit, |u| u.mute_writes = mute)
    }

    /// Puts `unit` into CiA 402 Fault with error `code`: statusword shows Fault, register
    /// 0x0008 holds the code, motion stops. A new code while faulted replaces the old
    /// one. Code 0 means "no error" (as in a CANopen EMCY) and clears the fault.
    pub fn inject_fault(&self, unit: u8, code: u16) -> Result<(), SimError> {
        self.inject_fault_at(unit, code, self.t_ms())
    }

    /// Clears `unit`'s fault. A unit never commanded returns to operation enabled and its
    /// move resumes where it stopped; a commanded one goes to switch on disabled.
    pub fn clear_fault(&self, unit: u8) -> Result<(), SimError> {
        self.clear_fault_at(unit, self.t_ms())
    }

    /// [`Self::inject_fault`] at model time `t_ms`, for tests with exact times.
    pub(crate) fn inject_fault_at(&self, unit: u8, code: u16, t_ms: u32) -> Result<(), SimError> {
        self.with_unit(unit, |u| u.drive.inject_fault(code, t_ms))
    }

    pub(crate) fn clear_fault_at(&self, unit: u8, t_ms: u32) -> Result<(), SimError> {
        self.with_unit(unit, |u| u.drive.clear_fault(t_ms))
    }

    /// Sets the fraction (clamped to 0.0-1.0) of replies that get a corrupted byte.
    pub fn set_crc_noise(&self, rate: f64) {
        self.lock().crc_noise = clamp_rate(rate);
    }

    /// The current CRC-noise rate.
    pub fn crc_noise(&self) -> f64 {
        self.lock().crc_noise
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        Stats {
            units: inner.units.iter().map(|(&u, c)| (u, c.stats)).collect(),
            corrupted: inner.corrupted,
            dropped_bytes: inner.dropped_bytes,
            bad_mbap: inner.bad_mbap,
        }
    }

    /// The last [`JOURNAL_LEN`] requests to simulated units, oldest first.
    pub fn journal(&self) -> Vec<JournalEntry> {
        self.lock().journal.iter().copied().collect()
    }

    /// Adds bytes the line dropped to the counters (called by the serving loop).
    pub fn count_dropped_bytes(&self, n: u64) {
        self.lock().dropped_bytes += n;
    }

    /// Counts a Modbus TCP connection closed on a bad MBAP header (called by the
    /// serving loop).
    pub fn count_bad_mbap(&self) {
        self.lock().bad_mbap += 1;
    }

    /// `unit`'s drive state at model time `t_ms`.
    pub fn drive_state(&self, unit: u8, t_ms: u32) -> Option<DriveState> {
        self.lock().units.get(&unit).map(|c| c.drive.state_at(t_ms))
    }

    /// What `unit` would report now.
    pub fn truth(&self, unit: u8) -> Option<Truth> {
        let t_ms = self.t_ms();
        let drive = self.drive_state(unit, t_ms)?;
        Some(Truth {
            unit,
            t_ms,
            drive,
            sample: model::drive_sample(unit, t_ms, &drive),
        })
    }

    /// Answers one request frame that arrived at model time `t_ms`: `None` when no reply
    /// goes out (another unit's request, a dead unit, a broadcast, a muted write). All
    /// registers of one reply come from that one instant.
    pub fn handle(&self, frame: &RequestFrame, t_ms: u32) -> Option<Reply> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let function = frame.pdu.first().copied().unwrap_or(0);
        // Counted by function code, so a malformed write (refused with 03) counts too.
        let is_write = rtu::is_write_function(function);
        if frame.unit == 0 {
            // Broadcast: writes go to every live unit, and nobody answers
            // (Modbus over Serial Line V1.02, section 2.1).
            if is_write {
                let request = Request::parse(&frame.pdu);
                for (&unit, ctl) in inner.units.iter_mut() {
                    ctl.stats.writes += 1;
                    if ctl.dead || ctl.reject.is_some() {
                        continue;
                    }
                    if let Ok(request) = &request {
                        if execute(unit, ctl, request, t_ms).is_ok() {
                            ctl.stats.applied += 1;
                        }
                    }
                }
            }
            return None;
        }
        // A unit we do not simulate belongs to someone else (or no one): stay silent.
        let ctl = inner.units.get_mut(&frame.unit)?;
        if inner.journal.len() == JOURNAL_LEN {
            inner.journal.pop_front();
        }
        inner.journal.push_back(JournalEntry {
            unit: frame.unit,
            function,
            t_ms,
        });
        if is_write {
            ctl.stats.writes += 1;
        }
        if ctl.dead {
            ctl.stats.ignored += 1;
            return None;
        }
        let pdu = match ctl.reject {
            Some(code) if is_write => rtu::exception_code_pdu(function, code.get()),
            _ => {
                match Request::parse(&frame.pdu).and_then(|r| execute(frame.unit, ctl, &r, t_ms)) {
                    Ok(pdu) => {
                        if is_write {
                            ctl.stats.applied += 1;
                        }
                        pdu
                    }
                    Err(exception) => rtu::exception_pdu(function, exception),
                }
            }
        };
        if is_write && ctl.mute_writes {
            // Done (or refused) but unanswered: the gateway cannot tell which.
            return None;
        }
        ctl.stats.served += 1;
        let late = ctl.late.unwrap_or(Duration::ZERO);

        let mut bytes = rtu::encode_frame(frame.unit, &pdu);
        let corrupted = inner.crc_noise > 0.0 && inner.rng.f64() < inner.crc_noise;
        if corrupted {
            rtu::corrupt(&mut bytes, &mut inner.rng);
            inner.corrupted += 1;
        }
        let wire = match self.options.timing {
            Timing::Instant => Duration::ZERO,
            Timing::Faithful { turnaround } => {
                faithful_delay(frame.wire_len, bytes.len(), self.options.baud, turnaround)
            }
            Timing::Network { turnaround } => turnaround,
        };
        Some(Reply {
            bytes,
            delay: wire + late,
            corrupted,
        })
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

/// Carries out one parsed request on one unit; returns the reply PDU.
fn execute(
    unit: u8,
    ctl: &mut UnitCtl,
    request: &Request,
    t_ms: u32,
) -> Result<Vec<u8>, Exception> {
    match *request {
        Request::ReadHoldingRegisters { address, quantity } => {
            if !model::holding_readable(address, quantity) {
                return Err(Exception::IllegalDataAddress);
            }
            let regs = model::registers(unit, t_ms, &ctl.drive.state_at(t_ms));
            let range = usize::from(address)..usize::from(address) + usize::from(quantity);
            Ok(rtu::read_reply_pdu(
                rtu::READ_HOLDING_REGISTERS,
                &regs[range],
            ))
        }
        Request::ReadInputRegisters { address, quantity } => {
            if !model::input_readable(address, quantity) {
                return Err(Exception::IllegalDataAddress);
            }
            let regs = model::input_registers(unit, t_ms, &ctl.drive.state_at(t_ms));
            let range = usize::from(address)..usize::from(address) + usize::from(quantity);
            Ok(rtu::read_reply_pdu(rtu::READ_INPUT_REGISTERS, &regs[range]))
        }
        Request::WriteSingleRegister { address, value } => {
            ctl.drive.write(address, &[value], t_ms)?;
            // The normal reply echoes the request (Application Protocol 6.6).
            let mut pdu = vec![rtu::WRITE_SINGLE_REGISTER];
            pdu.extend_from_slice(&address.to_be_bytes());
            pdu.extend_from_slice(&value.to_be_bytes());
            Ok(pdu)
        }
        Request::WriteMultipleRegisters {
            address,
            ref values,
        } => {
            ctl.drive.write(address, values, t_ms)?;
            // Reply: function, address, quantity (Application Protocol 6.12). At most
            // 123 values passed parsing, so the count fits.
            let mut pdu = vec![rtu::WRITE_MULTIPLE_REGISTERS];
            pdu.extend_from_slice(&address.to_be_bytes());
            pdu.extend_from_slice(&(values.len() as u16).to_be_bytes());
            Ok(pdu)
        }
        Request::Unsupported { .. } => Err(Exception::IllegalFunction),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtu::{crc_ok, encode_frame};

    fn sim(units: &str, options: SimOptions) -> Simulator {
        Simulator::new(units.parse().unwrap(), options)
    }

    fn request(unit: u8, pdu: &[u8]) -> RequestFrame {
        let bytes = encode_frame(unit, pdu);
        RequestFrame {
            unit,
            pdu: pdu.to_vec(),
            wire_len: bytes.len(),
        }
    }

    fn read_holding(unit: u8, address: u16, quantity: u16) -> RequestFrame {
        let [a0, a1] = address.to_be_bytes();
        let [q0, q1] = quantity.to_be_bytes();
        request(unit, &[0x03, a0, a1, q0, q1])
    }

    #[test]
    fn the_journal_keeps_the_last_requests_in_arrival_order() {
        let s = sim("1-2", SimOptions::default());
        s.handle(&read_holding(1, 0, 2), 10);
        s.handle(&request(2, &[0x06, 0, 0x18, 0, 100]), 11);
        s.handle(&read_holding(9, 0, 2), 12); // not simulated: not journaled
        let j = s.journal();
        assert_eq!(
            j.iter()
                .map(|e| (e.unit, e.function, e.t_ms))
                .collect::<Vec<_>>(),
            vec![(1, 3, 10), (2, 6, 11)]
        );
        for t in 0..JOURNAL_LEN as u32 + 5 {
            s.handle(&read_holding(1, 0, 1), t);
        }
        assert_eq!(s.journal().len(), JOURNAL_LEN);
        assert_eq!(s.journal()[0].t_ms, 5);
    }

    #[test]
    fn a_read_answers_the_model_registers_of_that_instant() {
        let s = sim("1-6", SimOptions::default());
        let reply = s.handle(&read_holding(3, 0, 12), 70_000).unwrap();
        let expected = model::registers(3, 70_000, &DriveState::running(70_000));
        assert_eq!(
            reply.bytes,
            encode_frame(3, &rtu::read_reply_pdu(0x03, &expected[..12]))
        );
        assert_eq!(reply.delay, Duration::ZERO);
    }

    #[test]
    fn a_unit_not_simulated_gets_no_reply() {
        let s = sim("1-3", SimOptions::default());
        assert_eq!(s.handle(&read_holding(4, 0, 1), 0), None);
    }

    #[test]
    fn reads_touching_the_hole_or_past_the_map_answer_illegal_data_address() {
        let s = sim("1", SimOptions::default());
        for (address, quantity) in [
            (0x0100, 1),
            (0x00FF, 2),
            (0x010F, 3),
            (0x0117, 1),
            (0x0110, 8),
        ] {
            let reply = s.handle(&read_holding(1, address, quantity), 0).unwrap();
            assert_eq!(
                reply.bytes,
                encode_frame(1, &[0x83, 0x02]),
                "{address:#06X}+{quantity}"
            );
        }
        let input = s.handle(&request(1, &[0x04, 0, 7, 0, 2]), 0).unwrap();
        assert_eq!(input.bytes, encode_frame(1, &[0x84, 0x02]));
    }

    #[test]
    fn unsupported_functions_answer_illegal_function() {
        let s = sim("1", SimOptions::default());
        let reply = s.handle(&request(1, &[0x01, 0, 0, 0, 8]), 0).unwrap();
        assert_eq!(reply.bytes, encode_frame(1, &[0x81, 0x01]));
    }

    #[test]
    fn writes_to_target_and_controlword_are_stored_and_read_back() {
        let s = sim("1", SimOptions::default());
        let w = s
            .handle(
                &request(
                    1,
                    &[0x10, 0, 0x10, 0, 3, 6, 0xFF, 0xFF, 0xFC, 0x18, 0, 0x0F],
                ),
                0,
            )
            .unwrap();
        assert_eq!(w.bytes, encode_frame(1, &[0x10, 0, 0x10, 0, 3]));
        let d = s.drive_state(1, 0).unwrap();
        assert_eq!(
            (d.written.target_position, d.written.controlword),
            (-1000, 0x000F)
        );
        let single = s.handle(&request(1, &[0x06, 0, 0x12, 0, 0x80]), 0).unwrap();
        assert_eq!(single.bytes, encode_frame(1, &[0x06, 0, 0x12, 0, 0x80]));
        let bad = s.handle(&request(1, &[0x06, 0, 0x00, 0, 1]), 0).unwrap();
        assert_eq!(bad.bytes, encode_frame(1, &[0x86, 0x02]));
    }

    #[test]
    fn a_broadcast_write_reaches_every_unit_and_gets_no_reply() {
        let s = sim("1-2", SimOptions::default());
        assert_eq!(s.handle(&request(0, &[0x06, 0, 0x12, 0, 0x06]), 0), None);
        assert_eq!(s.drive_state(1, 0).unwrap().written.controlword, 6);
        assert_eq!(s.drive_state(2, 0).unwrap().written.controlword, 6);
    }

    fn write_single(unit: u8, address: u16, value: u16) -> RequestFrame {
        let [a0, a1] = address.to_be_bytes();
        let [v0, v1] = value.to_be_bytes();
        request(unit, &[0x06, a0, a1, v0, v1])
    }

    fn counters(s: &Simulator, unit: u8) -> (u64, u64, u64) {
        let u = s.stats().units[&unit];
        (u.writes, u.applied, u.served)
    }

    #[test]
    fn accepted_and_refused_writes_are_counted_apart() {
        // Given a unit
        let s = sim("1-2", SimOptions::default());
        // When it gets a good write, a write to a read-only register, a bad mode and a
        // malformed write-multiple (and a read)
        assert!(s.handle(&write_single(1, 0x0018, 150), 0).is_some());
        for (frame, answer) in [
            (write_single(1, 0x0000, 1), [0x86, 0x02]),
            (write_single(1, 0x0013, 2), [0x86, 0x03]),
            (request(1, &[0x10, 0, 0x10, 0, 2, 2, 0, 1]), [0x90, 0x03]),
        ] {
            let reply = s.handle(&frame, 0).unwrap();
            assert_eq!(reply.bytes, encode_frame(1, &answer));
        }
        assert!(s.handle(&read_holding(1, 0, 1), 0).is_some());
        // Then all four writes are counted, one applied; unit 2 saw nothing
        assert_eq!(counters(&s, 1), (4, 1, 5));
        assert_eq!(counters(&s, 2), (0, 0, 0));
    }

    #[test]
    fn a_rejecting_unit_answers_writes_with_its_exception_and_applies_nothing() {
        // Given unit 1 set to reject writes with 04 Server Device Failure
        let s = sim("1", SimOptions::default());
        s.set_reject(1, NonZeroU8::new(4)).unwrap();
        // When the gateway enables it with a write
        let reply = s.handle(&write_single(1, 0x0012, 0x0006), 100).unwrap();
        let multiple = request(1, &[0x10, 0, 0x12, 0, 1, 2, 0, 0x0F]);
        let reply16 = s.handle(&multiple, 100).unwrap();
        // Then the answer is the exception, nothing reached the drive, reads go on
        assert_eq!(reply.bytes, encode_frame(1, &[0x86, 0x04]));
        assert_eq!(reply16.bytes, encode_frame(1, &[0x90, 0x04]));
        let d = s.drive_state(1, 200).unwrap();
        assert_eq!((d.written.controlword, d.commanded), (0, None));
        let read = s.handle(&read_holding(1, 0, 12), 200).unwrap();
        let expected = model::registers(1, 200, &DriveState::running(200));
        assert_eq!(
            read.bytes,
            encode_frame(1, &rtu::read_reply_pdu(0x03, &expected[..12]))
        );
        assert_eq!(counters(&s, 1), (2, 0, 3));
        // And once it accepts again, the write is applied
        s.set_reject(1, None).unwrap();
        assert!(s.handle(&write_single(1, 0x0012, 0x0006), 300).is_some());
        assert_eq!(counters(&s, 1), (3, 1, 4));
        assert!(s.drive_state(1, 300).unwrap().commanded.is_some());
    }

    #[test]
    fn a_muted_unit_applies_writes_without_answering_them() {
        // Given unit 1 muted for writes
        let s = sim("1", SimOptions::default());
        s.set_mute_writes(1, true).unwrap();
        // When a shutdown is written
        assert_eq!(s.handle(&write_single(1, 0x0012, 0x0006), 100), None);
        // Then the drive took it, no reply went out, and reads are answered
        assert_eq!(
            s.drive_state(1, 100).unwrap().state(),
            crate::cia402::Cia402State::ReadyToSwitchOn
        );
        assert!(s.handle(&read_holding(1, 0x0007, 1), 100).is_some());
        assert_eq!(counters(&s, 1), (1, 1, 1));
        // And unmuted, writes are answered again
        s.set_mute_writes(1, false).unwrap();
        assert!(s.handle(&write_single(1, 0x0012, 0x0007), 200).is_some());
        assert_eq!(counters(&s, 1), (2, 2, 2));
    }

    #[test]
    fn broadcast_and_dead_unit_writes_are_counted_but_reach_live_accepting_drives_only() {
        let s = sim("1-3", SimOptions::default());
        s.set_dead(2, true).unwrap();
        s.set_reject(3, NonZeroU8::new(6)).unwrap();
        assert_eq!(s.handle(&write_single(0, 0x0018, 99), 0), None);
        assert_eq!(s.handle(&write_single(2, 0x0018, 98), 0), None);
        let speed = |u| s.drive_state(u, 0).unwrap().written.speed_limit;
        assert_eq!((speed(1), speed(2), speed(3)), (99, 200, 200));
        assert_eq!(counters(&s, 1), (1, 1, 0));
        assert_eq!(counters(&s, 2), (2, 0, 0));
        assert_eq!(s.stats().units[&2].ignored, 1);
        assert_eq!(counters(&s, 3), (1, 0, 0));
        assert_eq!(s.set_reject(9, None), Err(SimError::UnknownUnit(9)));
        assert_eq!(s.set_mute_writes(9, true), Err(SimError::UnknownUnit(9)));
    }

    #[test]
    fn a_unit_is_enabled_and_moved_by_writes_and_shows_it_in_its_registers() {
        // Given unit 1, written as the gateway's move action would
        let s = sim("1", SimOptions::default());
        let t0 = 10_000;
        let start = {
            let r = model::registers(1, t0, &DriveState::running(t0));
            crate::words::i32_from_high_first([r[0], r[1]])
        };
        let target = crate::words::i32_high_first(start + 4_000);
        // mode 1 and profile velocity 40 mm/s, target, then the set-point
        let setup = request(1, &[0x10, 0, 0x13, 0, 3, 6, 0, 1, 0, 0, 0x9C, 0x40]);
        assert!(s.handle(&setup, t0).is_some());
        let [t_hi, t_lo] = target.map(u16::to_be_bytes);
        let go = request(
            1,
            &[
                0x10, 0, 0x10, 0, 3, 6, t_hi[0], t_hi[1], t_lo[0], t_lo[1], 0, 0x1F,
            ],
        );
        assert!(s.handle(&go, t0).is_some());
        // When it has had time to get there
        let reply = s.handle(&read_holding(1, 0, 10), t0 + 100).unwrap();
        // Then the statusword shows target reached and acknowledge (bit 4 still high)
        let regs: Vec<u16> = reply.bytes[3..23]
            .chunks(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(
            crate::words::i32_from_high_first([regs[0], regs[1]]),
            start + 4_000
        );
        assert_eq!(regs[7], 0x1637);
        assert_eq!(regs[9], 1);
        assert_eq!(counters(&s, 1), (2, 2, 3));
    }

    #[test]
    fn a_dead_unit_is_silent_and_counted_until_alive_again() {
        let s = sim("1-2", SimOptions::default());
        s.set_dead(2, true).unwrap();
        assert_eq!(s.handle(&read_holding(2, 0, 1), 0), None);
        assert!(s.handle(&read_holding(1, 0, 1), 0).is_some());
        s.set_dead(2, false).unwrap();
        assert!(s.handle(&read_holding(2, 0, 1), 0).is_some());
        let st = s.stats();
        assert_eq!(
            st.units[&2],
            UnitStats {
                served: 1,
                ignored: 1,
                ..UnitStats::default()
            }
        );
        assert_eq!(st.units[&1].served, 1);
        assert_eq!(s.set_dead(9, true), Err(SimError::UnknownUnit(9)));
    }

    #[test]
    fn a_late_unit_delays_its_reply_by_the_set_amount() {
        let s = sim("1", SimOptions::default());
        s.set_late(1, Some(Duration::from_millis(30))).unwrap();
        assert_eq!(
            s.handle(&read_holding(1, 0, 1), 0).unwrap().delay,
            Duration::from_millis(30)
        );
        s.set_late(1, None).unwrap();
        assert_eq!(
            s.handle(&read_holding(1, 0, 1), 0).unwrap().delay,
            Duration::ZERO
        );
    }

    #[test]
    fn timing_faithful_charges_the_documented_transaction_time() {
        // 115200 baud, 10 registers: request 8 bytes, reply 25 bytes, 11 bits each:
        // 3.151 ms on the wire + t3.5 (1.75 ms) here + t3.5 owed by the gateway = 6.65 ms.
        let d = faithful_delay(8, 25, 115_200, Duration::ZERO);
        assert_eq!(d.as_micros(), 4_901);
        assert_eq!((d + Duration::from_micros(1_750)).as_micros(), 6_651);
        let options = SimOptions {
            timing: Timing::Faithful {
                turnaround: Duration::from_micros(100),
            },
            ..SimOptions::default()
        };
        let s = sim("1", options);
        s.set_late(1, Some(Duration::from_millis(2))).unwrap();
        let reply = s.handle(&read_holding(1, 0, 10), 0).unwrap();
        assert_eq!(reply.bytes.len(), 25);
        assert_eq!(reply.delay.as_micros(), 4_901 + 100 + 2_000);
    }

    #[test]
    fn network_timing_charges_the_turnaround_and_no_wire_time() {
        let options = SimOptions {
            timing: Timing::Network {
                turnaround: Duration::from_micros(300),
            },
            ..SimOptions::default()
        };
        let s = sim("1", options);
        assert_eq!(
            s.handle(&read_holding(1, 0, 10), 0).unwrap().delay,
            Duration::from_micros(300)
        );
        s.set_late(1, Some(Duration::from_millis(2))).unwrap();
        assert_eq!(
            s.handle(&read_holding(1, 0, 10), 0).unwrap().delay,
            Duration::from_micros(2_300)
        );
    }

    #[test]
    fn crc_noise_corrupts_the_configured_fraction_reproducibly() {
        let run = || {
            let s = sim(
                "1",
                SimOptions {
                    seed: Some(42),
                    crc_noise: 0.25,
                    ..SimOptions::default()
                },
            );
            let flags: Vec<bool> = (0..400)
                .map(|_| {
                    let r = s.handle(&read_holding(1, 0, 4), 0).unwrap();
                    assert_eq!(r.corrupted, !crc_ok(&r.bytes));
                    r.corrupted
                })
                .collect();
            (flags, s.stats().corrupted)
        };
        let (a, count) = run();
        assert_eq!(a, run().0, "same seed, same corrupted replies");
        assert_eq!(count, a.iter().filter(|&&c| c).count() as u64);
        assert!((60..140).contains(&count), "{count} of 400 at rate 0.25");
    }

    #[test]
    fn a_fault_freezes_motion_shows_in_the_statusword_and_clears() {
        let s = sim("1", SimOptions::default());
        s.inject_fault_at(1, 0x2310, 1_000).unwrap();
        let during = s.drive_state(1, 3_000).unwrap();
        assert_eq!((during.error_code, during.motion_ms), (0x2310, 1_000));
        assert_eq!(during.statusword() & 0x0008, 0x0008);
        // A second code replaces the first but the fault still dates from 1000 ms.
        s.inject_fault_at(1, 0x7500, 3_500).unwrap();
        assert_eq!(s.drive_state(1, 3_600).unwrap().motion_ms, 1_000);
        let frozen = model::drive_sample(1, 4_000, &s.drive_state(1, 4_000).unwrap());
        s.clear_fault_at(1, 4_000).unwrap();
        let resumed = model::drive_sample(1, 4_000, &s.drive_state(1, 4_000).unwrap());
        // Position is continuous across the clear: the move resumes where it stopped.
        assert_eq!(frozen.position_mm, resumed.position_mm);
        let after = s.drive_state(1, 5_000).unwrap();
        assert_eq!((after.error_code, after.motion_ms), (0, 2_000));
        assert_eq!(after.statusword(), model::STATUSWORD_OPERATION_ENABLED);
    }

    #[test]
    fn inject_and_clear_fault_through_the_public_api() {
        let s = sim("1", SimOptions::default());
        s.inject_fault(1, 0x7500).unwrap();
        let reply = s
            .handle(&read_holding(1, model::addr::STATUSWORD, 2), s.t_ms())
            .unwrap();
        // 01 03 04 | statusword 0x0218 | error code 0x7500
        assert_eq!(reply.bytes[3..7], [0x02, 0x18, 0x75, 0x00]);
        s.clear_fault(1).unwrap();
        assert_eq!(s.drive_state(1, s.t_ms()).unwrap().error_code, 0);
        s.inject_fault(1, 0x2310).unwrap();
        s.inject_fault(1, 0).unwrap();
        assert!(!s.drive_state(1, s.t_ms()).unwrap().is_faulted());
    }
}
