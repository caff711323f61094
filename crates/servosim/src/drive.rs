//! One Modbus unit's drive: the writable registers, fault injection, and, once commanded,
//! the CiA 402 state machine and profile position / profile velocity motion. Sans-IO:
//! every method takes the model time `t_ms`.
//!
//! A unit never written a command register (0x0010-0x0017) runs the repeating move of
//! [`crate::model`] in operation enabled, bit for bit as `model::registers(unit, t,
//! &DriveState::running(t))` shows it, so tests can recompute what they read. The first
//! write of one of those registers commands the unit: the repeating move stops where the
//! axis is at that instant, and from then on the axis does what the controlword, the mode
//! and the set-points say. Every event (a write, a fault) starts a new motion
//! [`Segment`] at the position the old one reached, so position never jumps.
//!
//! Motion once commanded:
//! - outside operation enabled, or with halt (controlword bit 8): the axis stands (a
//!   quick stop or halt stops at once: no deceleration ramp);
//! - profile position (mode 1): a rising edge of controlword bit 4 in operation enabled
//!   latches the target (absolute, or relative to the present position with bit 6) and
//!   the profile velocity (0 means [`DEFAULT_PROFILE_VELOCITY_UM_S`]), sets set-point
//!   acknowledge (statusword bit 12) until bit 4 falls, and the axis runs at that speed to
//!   the target, where target reached (bit 10) comes on. A new set-point replaces the move
//!   in progress at once. Halt pauses the move (it goes on when halt is cleared); leaving
//!   operation enabled or changing the mode ends it (no resuming on re-enable);
//! - profile velocity (mode 3): the axis runs at the target velocity;
//! - any other mode: the axis stands.

use crate::cia402::{self, cw, Cia402State};
use crate::model::{self, addr, Commanded, DriveState, Written};
use crate::motion::{elapsed_ms, Segment};
use crate::rtu::Exception;

/// The speed of a profile position move whose profile velocity is 0: 50 mm/s.
pub const DEFAULT_PROFILE_VELOCITY_UM_S: u32 = 50_000;

/// Statusword bit 10: target reached.
pub const SW_TARGET_REACHED: u16 = 0x0400;
/// Statusword bit 12: set-point acknowledge (profile position) or speed zero (profile
/// velocity).
pub const SW_SET_POINT_ACKNOWLEDGE: u16 = 0x1000;

/// A latched profile position set-point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SetPoint {
    target_um: i32,
    speed_um_s: u32,
}

/// What a commanded drive adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Axis {
    segment: Segment,
    set_point: Option<SetPoint>,
    /// The profile position move to `set_point` goes on (halt only pauses it).
    in_progress: bool,
    /// Statusword bit 12 in profile position mode.
    acknowledged: bool,
}

/// One unit's drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    unit: u8,
    written: Written,
    error_code: u16,
    state: Cia402State,
    /// Model time spent outside operation enabled in stretches already over.
    stopped_ms: u32,
    /// Model time the present stretch outside operation enabled began.
    stopped_since: Option<u32>,
    /// `None` until the first write of a command register.
    axis: Option<Axis>,
}

impl Drive {
    /// A drive at model time 0: running the repeating move in operation enabled.
    pub fn new(unit: u8) -> Self {
        Self {
            unit,
            written: Written::default(),
            error_code: 0,
            state: Cia402State::OperationEnabled,
            stopped_ms: 0,
            stopped_since: None,
            axis: None,
        }
    }

    /// True once a command register was written: the repeating move is over.
    pub fn is_commanded(&self) -> bool {
        self.axis.is_some()
    }

    /// The CiA 402 state.
    pub fn state(&self) -> Cia402State {
        self.state
    }

    /// The drive at model time `t_ms` (at or after the last event).
    pub fn state_at(&self, t_ms: u32) -> DriveState {
        DriveState {
            error_code: self.error_code,
            motion_ms: self.motion_ms(t_ms),
            written: self.written,
            commanded: self.axis.map(|axis| Commanded {
                state: self.state,
                segment: axis.segment,
                set_point: axis.set_point.map(|s| s.target_um),
                mode_bits: self.mode_bits(&axis, t_ms),
            }),
        }
    }

    /// A write of `values` from `address` (function 06 or 16) at `t_ms`. Refused, with
    /// nothing stored, when it touches a register outside 0x0010-0x0018 (02) or writes a
    /// mode of operation the drive does not have (03).
    pub fn write(&mut self, address: u16, values: &[u16], t_ms: u32) -> Result<(), Exception> {
        let quantity = u16::try_from(values.len()).map_err(|_| Exception::IllegalDataValue)?;
        if !model::holding_writable(address, quantity) {
            return Err(Exception::IllegalDataAddress);
        }
        let touches = |register: u16| (address..address + quantity).contains(&register);
        let mut written = self.written;
        written.apply(address, values);
        if touches(addr::MODES_OF_OPERATION)
            && !cia402::is_supported_mode(written.modes_of_operation)
        {
            return Err(Exception::IllegalDataValue);
        }
        // Every writable register below the speed limit is a command register.
        if address < addr::SPEED_LIMIT {
            self.command(t_ms);
        }
        let previous = std::mem::replace(&mut self.written, written);
        let Some(mut axis) = self.axis else {
            return Ok(());
        };
        let at = axis.segment.position_um(t_ms);
        if written.modes_of_operation != previous.modes_of_operation {
            // A move does not carry over into another mode, nor back.
            axis.in_progress = false;
        }
        if touches(addr::CONTROLWORD) {
            let (before, now) = (previous.controlword, written.controlword);
            let state = cia402::on_controlword(self.state, before, now);
            if self.state == Cia402State::Fault && state != Cia402State::Fault {
                // Transition 15: the fault is gone; the drive must be enabled again.
                self.error_code = 0;
            }
            self.set_state(state, t_ms);
            if now & cw::NEW_SET_POINT == 0 {
                // The handshake's second half: bit 12 follows bit 4 down.
                axis.acknowledged = false;
            }
            let new_set_point = now & cw::NEW_SET_POINT != 0 && before & cw::NEW_SET_POINT == 0;
            if new_set_point && self.accepts_set_point() {
                let target = if now & cw::RELATIVE != 0 {
                    let sum = i64::from(at) + i64::from(written.target_position);
                    // Beyond the end of travel the target is the end of travel.
                    sum.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
                } else {
                    written.target_position
                };
                let speed = match written.profile_velocity {
                    0 => DEFAULT_PROFILE_VELOCITY_UM_S,
                    v => v,
                };
                axis.set_point = Some(SetPoint {
                    target_um: target,
                    speed_um_s: speed,
                });
                axis.in_progress = true;
                axis.acknowledged = true;
            }
        }
        self.axis = Some(self.plan(axis, at, t_ms));
        Ok(())
    }

    /// Puts the drive into Fault with `code` (0 clears, as [`Self::clear_fault`]); a new
    /// code while faulted replaces the old one. The axis stands; a move in progress ends.
    pub fn inject_fault(&mut self, code: u16, t_ms: u32) {
        if code == 0 {
            return self.clear_fault(t_ms);
        }
        self.error_code = code;
        self.set_state(Cia402State::Fault, t_ms);
        self.replan(t_ms);
    }

    /// Clears a fault from outside (the console's `clear`). A drive never commanded goes
    /// back to operation enabled and its repeating move resumes where it stopped, as it
    /// always did; a commanded drive goes to switch on disabled, as after a fault reset,
    /// so it never starts moving on its own.
    pub fn clear_fault(&mut self, t_ms: u32) {
        if self.state != Cia402State::Fault {
            return;
        }
        self.error_code = 0;
        let state = if self.is_commanded() {
            Cia402State::SwitchOnDisabled
        } else {
            Cia402State::OperationEnabled
        };
        self.set_state(state, t_ms);
        self.replan(t_ms);
    }

    /// The motion clock: model time minus the time spent outside operation enabled.
    fn motion_ms(&self, t_ms: u32) -> u32 {
        let current = self.stopped_since.map_or(0, |s| elapsed_ms(s, t_ms));
        t_ms.wrapping_sub(self.stopped_ms).wrapping_sub(current)
    }

    fn set_state(&mut self, state: Cia402State, t_ms: u32) {
        let (was, is) = (
            self.state == Cia402State::OperationEnabled,
            state == Cia402State::OperationEnabled,
        );
        if was && !is {
            self.stopped_since = Some(t_ms);
        } else if !was && is {
            if let Some(since) = self.stopped_since.take() {
                self.stopped_ms = self.stopped_ms.wrapping_add(elapsed_ms(since, t_ms));
            }
        }
        self.state = state;
    }

    /// Stops the repeating move where the axis is at `t_ms`, once.
    fn command(&mut self, t_ms: u32) {
        if self.axis.is_some() {
            return;
        }
        let sample = model::drive_sample(self.unit, t_ms, &self.state_at(t_ms));
        // Rounded as the position register rounds it, so the register does not move.
        let at = (sample.position_mm * 1000.0).round() as i32;
        self.axis = Some(Axis {
            segment: Segment::hold(at, t_ms),
            set_point: None,
            in_progress: false,
            acknowledged: false,
        });
    }

    /// A profile position set-point is taken in operation enabled and profile position
    /// mode only.
    fn accepts_set_point(&self) -> bool {
        self.state == Cia402State::OperationEnabled
            && self.written.modes_of_operation == i16::from(cia402::MODE_PROFILE_POSITION)
    }

    /// A new segment after an event that did not come through [`Self::write`].
    fn replan(&mut self, t_ms: u32) {
        if let Some(axis) = self.axis {
            let at = axis.segment.position_um(t_ms);
            self.axis = Some(self.plan(axis, at, t_ms));
        }
    }

    /// The segment from `at_um` at `t_ms` that the state, the mode and the set-point ask
    /// for.
    fn plan(&self, mut axis: Axis, at_um: i32, t_ms: u32) -> Axis {
        if self.state != Cia402State::OperationEnabled {
            axis.in_progress = false;
        }
        let halted = self.written.controlword & cw::HALT != 0;
        let runs = self.state == Cia402State::OperationEnabled && !halted;
        let mode = self.written.modes_of_operation;
        axis.segment = match (axis.set_point, runs) {
            (Some(s), true)
                if mode == i16::from(cia402::MODE_PROFILE_POSITION) && axis.in_progress =>
            {
                Segment::toward(at_um, t_ms, s.target_um, s.speed_um_s)
            }
            (_, true) if mode == i16::from(cia402::MODE_PROFILE_VELOCITY) => {
                Segment::run(at_um, t_ms, i64::from(self.written.target_velocity))
            }
            _ => Segment::hold(at_um, t_ms),
        };
        axis
    }

    /// Statusword bits 10 and 12 at `t_ms` (shown in operation enabled only).
    fn mode_bits(&self, axis: &Axis, t_ms: u32) -> u16 {
        let mode = self.written.modes_of_operation;
        if mode == i16::from(cia402::MODE_PROFILE_POSITION) {
            // Target reached: standing on the last set-point's target (or none yet).
            let reached = axis
                .set_point
                .is_none_or(|s| axis.segment.position_um(t_ms) == s.target_um);
            let mut bits = 0;
            if reached {
                bits |= SW_TARGET_REACHED;
            }
            if axis.acknowledged {
                bits |= SW_SET_POINT_ACKNOWLEDGE;
            }
            bits
        } else if mode == i16::from(cia402::MODE_PROFILE_VELOCITY) {
            // No ramps: the target velocity is reached at once; bit 12 is speed zero.
            let mut bits = SW_TARGET_REACHED;
            if axis.segment.is_standing(t_ms) {
                bits |= SW_SET_POINT_ACKNOWLEDGE;
            }
            bits
        } else {
            // Other modes stand still: nothing to reach.
            SW_TARGET_REACHED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{addr, DriveState, HOLDING_LEN};
    use crate::words;
    use Cia402State::*;

    const UNIT: u8 = 3;

    fn registers(d: &Drive, t_ms: u32) -> [u16; HOLDING_LEN] {
        model::registers(UNIT, t_ms, &d.state_at(t_ms))
    }

    fn statusword(d: &Drive, t_ms: u32) -> u16 {
        d.state_at(t_ms).statusword()
    }

    fn position_um(d: &Drive, t_ms: u32) -> i32 {
        let r = registers(d, t_ms);
        words::i32_from_high_first([r[0], r[1]])
    }

    fn velocity_um_s(d: &Drive, t_ms: u32) -> i32 {
        let r = registers(d, t_ms);
        words::i32_from_high_first([r[2], r[3]])
    }

    fn controlword(d: &mut Drive, value: u16, t_ms: u32) {
        d.write(addr::CONTROLWORD, &[value], t_ms).unwrap();
    }

    /// A drive commanded at `t_ms` into profile position mode, enabled, with `speed`
    /// as profile velocity (0.001 mm/s).
    fn profile_position(t_ms: u32, speed: u32) -> Drive {
        let mut d = Drive::new(UNIT);
        let [hi, lo] = words::u32_high_first(speed);
        d.write(addr::MODES_OF_OPERATION, &[1, hi, lo], t_ms)
            .unwrap();
        controlword(&mut d, 0x000F, t_ms);
        d
    }

    fn move_to(d: &mut Drive, target_um: i32, controlword_bits: u16, t_ms: u32) {
        d.write(
            addr::TARGET_POSITION,
            &words::i32_high_first(target_um),
            t_ms,
        )
        .unwrap();
        controlword(d, 0x001F | controlword_bits, t_ms);
    }

    #[test]
    fn an_untouched_unit_reads_bit_identical_to_the_model() {
        for unit in 1..=6 {
            let d = Drive::new(unit);
            for t in [0, 1, 999, 65_537, 1_234_567, u32::MAX] {
                let running = DriveState::running(t);
                assert_eq!(d.state_at(t), running, "unit {unit} t {t}");
                assert_eq!(
                    model::registers(unit, t, &d.state_at(t)),
                    model::registers(unit, t, &running)
                );
                assert_eq!(
                    model::input_registers(unit, t, &d.state_at(t)),
                    model::input_registers(unit, t, &running)
                );
                assert_eq!(d.state_at(t).statusword(), 0x0237);
            }
        }
    }

    #[test]
    fn a_speed_limit_write_or_a_refused_write_does_not_command_the_unit() {
        // Given an untouched unit
        let mut d = Drive::new(UNIT);
        // When the speed limit is written, and writes are refused
        d.write(addr::SPEED_LIMIT, &[250], 100).unwrap();
        assert_eq!(
            d.write(addr::MODES_OF_OPERATION, &[2], 200),
            Err(Exception::IllegalDataValue)
        );
        assert_eq!(
            d.write(addr::SPEED_LIMIT, &[1, 2], 200),
            Err(Exception::IllegalDataAddress)
        );
        assert_eq!(
            d.write(addr::STATUSWORD, &[0], 200),
            Err(Exception::IllegalDataAddress)
        );
        // Then it still runs the repeating move, and only the speed limit changed
        assert!(!d.is_commanded());
        let t = 5_000;
        let mut want = model::registers(UNIT, t, &DriveState::running(t));
        want[usize::from(addr::SPEED_LIMIT)] = 250;
        assert_eq!(registers(&d, t), want);
    }

    #[test]
    fn the_first_command_write_stops_the_move_where_the_axis_is() {
        // Given a unit moving fast at 1234 ms
        let t = 1_234;
        let before = model::registers(UNIT, t, &DriveState::running(t));
        let moving = words::i32_from_high_first([before[2], before[3]]);
        assert!(moving.abs() > 10_000, "{moving}");
        // When the target position is written (just stored: the mode is still 8)
        let mut d = Drive::new(UNIT);
        d.write(addr::TARGET_POSITION, &[0, 5], t).unwrap();
        // Then the axis stands where it was, in operation enabled with target reached
        assert!(d.is_commanded());
        for later in [t, t + 1, t + 10_000] {
            assert_eq!(registers(&d, later)[..2], before[..2], "{later}");
            assert_eq!(velocity_um_s(&d, later), 0);
        }
        assert_eq!(d.state(), OperationEnabled);
        assert_eq!(statusword(&d, t + 1), 0x0637);
        assert_eq!(registers(&d, t)[usize::from(addr::MODE_DISPLAY)], 8);
    }

    #[test]
    fn controlwords_walk_the_state_machine_with_the_standard_statuswords() {
        // Given a unit commanded by a disable voltage
        let mut d = Drive::new(UNIT);
        // When each controlword of CiA 402-2's device control is written in turn
        // Then the unit is in the state, with the statusword, it names
        for (value, state, sw) in [
            (0x0000, SwitchOnDisabled, 0x0250),
            (0x000F, SwitchOnDisabled, 0x0250), // enable refused here
            (0x0006, ReadyToSwitchOn, 0x0231),  // shutdown
            (0x0007, SwitchedOn, 0x0233),       // switch on
            (0x000F, OperationEnabled, 0x0637), // enable operation
            (0x0007, SwitchedOn, 0x0233),       // disable operation
            (0x000F, OperationEnabled, 0x0637),
            (0x0006, ReadyToSwitchOn, 0x0231), // shutdown from enabled
            (0x000F, OperationEnabled, 0x0637), // switch on + enable at once
            (0x0002, QuickStopActive, 0x0217), // quick stop
            (0x0006, QuickStopActive, 0x0217),
            (0x000F, OperationEnabled, 0x0637), // back from quick stop
            (0x0000, SwitchOnDisabled, 0x0250), // disable voltage
            (0x0006, ReadyToSwitchOn, 0x0231),
            (0x0002, SwitchOnDisabled, 0x0250), // quick stop from ready
        ] {
            controlword(&mut d, value, 100);
            assert_eq!(
                (d.state(), statusword(&d, 100)),
                (state, sw),
                "{value:#06x}"
            );
        }
    }

    #[test]
    fn an_injected_fault_is_left_by_a_rising_fault_reset_only() {
        // Given a commanded, enabled unit that faults
        let mut d = profile_position(0, 0);
        d.inject_fault(0x2310, 100);
        assert_eq!((d.state(), statusword(&d, 100)), (Fault, 0x0218));
        assert_eq!(registers(&d, 100)[usize::from(addr::ERROR_CODE)], 0x2310);
        // When commands are written, nothing happens
        controlword(&mut d, 0x000F, 110);
        controlword(&mut d, 0x0006, 120);
        assert_eq!(d.state(), Fault);
        // Then the rising edge of bit 7 resets it to switch on disabled, code cleared
        controlword(&mut d, 0x0080, 130);
        assert_eq!((d.state(), statusword(&d, 130)), (SwitchOnDisabled, 0x0250));
        assert_eq!(registers(&d, 130)[usize::from(addr::ERROR_CODE)], 0);
        // And it takes the usual way back to operation enabled
        for value in [0x0006, 0x0007, 0x000F] {
            controlword(&mut d, value, 140);
        }
        assert_eq!(d.state(), OperationEnabled);
    }

    #[test]
    fn a_fault_reset_needs_a_rising_edge_and_clear_leaves_a_commanded_unit_disabled() {
        let mut d = Drive::new(UNIT);
        controlword(&mut d, 0x0080, 10);
        d.inject_fault(0x7500, 20);
        // Bit 7 was already set: no edge
        controlword(&mut d, 0x0080, 30);
        assert_eq!(d.state(), Fault);
        // The console's clear: a commanded drive must be enabled again
        d.clear_fault(40);
        assert_eq!(
            (d.state(), d.state_at(40).error_code),
            (SwitchOnDisabled, 0)
        );
    }

    #[test]
    fn an_untouched_unit_faults_and_clears_as_it_always_did() {
        let mut d = Drive::new(UNIT);
        d.inject_fault(0x2310, 1_000);
        assert_eq!(d.state_at(3_000).motion_ms, 1_000);
        assert_eq!(statusword(&d, 3_000), 0x0218);
        d.clear_fault(4_000);
        assert!(!d.is_commanded());
        let after = d.state_at(5_000);
        assert_eq!((after.error_code, after.motion_ms), (0, 2_000));
        assert_eq!(after.statusword(), 0x0237);
    }

    #[test]
    fn a_profile_position_move_acknowledges_runs_and_reaches_its_target() {
        // Given an enabled unit in profile position mode at 20 mm/s
        let t0 = 1_000;
        let mut d = profile_position(t0, 20_000);
        let start = position_um(&d, t0);
        assert_eq!(statusword(&d, t0), 0x0637, "no set-point yet: reached");
        // When a set-point 10 mm further is started (bit 4 rises)
        let target = start + 10_000;
        move_to(&mut d, target, 0, t0);
        // Then set-point acknowledge is on, target reached off, and the axis moves
        assert_eq!(statusword(&d, t0), 0x1237);
        assert_eq!(d.state_at(t0).commanded.unwrap().set_point, Some(target));
        assert_eq!(velocity_um_s(&d, t0 + 100), 20_000);
        assert_eq!(position_um(&d, t0 + 100), start + 2_000);
        // When bit 4 falls, acknowledge follows
        controlword(&mut d, 0x000F, t0 + 200);
        assert_eq!(statusword(&d, t0 + 200), 0x0237);
        // Then at 500 ms it is exactly on the target, standing, target reached
        assert_eq!(position_um(&d, t0 + 499), target - 20);
        assert_eq!(statusword(&d, t0 + 499), 0x0237);
        assert_eq!(position_um(&d, t0 + 500), target);
        assert_eq!(velocity_um_s(&d, t0 + 500), 0);
        assert_eq!(statusword(&d, t0 + 500), 0x0637);
        assert_eq!(position_um(&d, t0 + 90_000), target);
    }

    #[test]
    fn a_move_without_profile_velocity_runs_at_50_mm_s() {
        let mut d = profile_position(0, 0);
        let start = position_um(&d, 0);
        move_to(&mut d, start - 5_000, 0, 0);
        assert_eq!(velocity_um_s(&d, 50), -50_000);
        assert_eq!(position_um(&d, 100), start - 5_000);
    }

    #[test]
    fn a_relative_move_goes_from_the_present_position() {
        // Given a unit that moved to 10 mm
        let mut d = profile_position(0, 100_000);
        move_to(&mut d, 10_000, 0, 0);
        controlword(&mut d, 0x000F, 1);
        assert_eq!(position_um(&d, 10_000), 10_000);
        // When a relative set-point of -2.5 mm starts (bit 6)
        move_to(&mut d, -2_500, 0x0040, 10_000);
        // Then it ends at 7.5 mm
        assert_eq!(d.state_at(10_000).commanded.unwrap().set_point, Some(7_500));
        assert_eq!(position_um(&d, 20_000), 7_500);
        assert_eq!(
            statusword(&d, 20_000) & SW_TARGET_REACHED,
            SW_TARGET_REACHED
        );
    }

    #[test]
    fn a_new_set_point_replaces_the_move_in_progress_from_where_the_axis_is() {
        let mut d = profile_position(0, 10_000);
        move_to(&mut d, 100_000, 0, 0);
        controlword(&mut d, 0x000F, 0);
        // 1 s later the axis is at +10 mm, heading for 100 mm
        let at = position_um(&d, 1_000);
        move_to(&mut d, at - 1_000, 0, 1_000);
        assert_eq!(velocity_um_s(&d, 1_050), -10_000);
        assert_eq!(position_um(&d, 1_100), at - 1_000);
    }

    #[test]
    fn no_set_point_is_taken_outside_operation_enabled_or_profile_position() {
        // Switched on: bit 4 rises with switch on (0x0017), nothing latched
        let mut d = profile_position(0, 0);
        controlword(&mut d, 0x0007, 10);
        d.write(addr::TARGET_POSITION, &words::i32_high_first(50_000), 20)
            .unwrap();
        controlword(&mut d, 0x0017, 20);
        assert_eq!(d.state(), SwitchedOn);
        assert_eq!(d.state_at(20).commanded.unwrap().set_point, None);
        assert_eq!(statusword(&d, 20), 0x0233);
        // Enable operation with bit 4 still high: no edge, still nothing
        controlword(&mut d, 0x001F, 30);
        assert_eq!(d.state(), OperationEnabled);
        assert_eq!(d.state_at(30).commanded.unwrap().set_point, None);
        assert_eq!(statusword(&d, 30) & SW_SET_POINT_ACKNOWLEDGE, 0);
        // Enabled but in profile velocity mode: nothing latched either
        let mut d = profile_position(0, 0);
        d.write(addr::MODES_OF_OPERATION, &[3], 5).unwrap();
        move_to(&mut d, 50_000, 0, 10);
        assert_eq!(d.state_at(10).commanded.unwrap().set_point, None);
        // Bit 4 held high: no new edge, no new set-point
        let mut d = profile_position(0, 0);
        let start = position_um(&d, 0);
        controlword(&mut d, 0x001F, 0);
        assert_eq!(d.state_at(0).commanded.unwrap().set_point, Some(0));
        controlword(&mut d, 0x001F, 1);
        d.write(addr::TARGET_POSITION, &words::i32_high_first(start), 1)
            .unwrap();
        controlword(&mut d, 0x001F, 2);
        assert_eq!(d.state_at(2).commanded.unwrap().set_point, Some(0));
    }

    #[test]
    fn halt_pauses_a_move_that_goes_on_when_halt_is_cleared() {
        // Given a move of 10 mm at 10 mm/s
        let mut d = profile_position(0, 10_000);
        let start = position_um(&d, 0);
        move_to(&mut d, start + 10_000, 0, 0);
        // When halt is set after 300 ms
        controlword(&mut d, 0x011F, 300);
        // Then the axis stands at once, target not reached
        assert_eq!(position_um(&d, 300), start + 3_000);
        assert_eq!(position_um(&d, 5_000), start + 3_000);
        assert_eq!(velocity_um_s(&d, 5_000), 0);
        assert_eq!(statusword(&d, 5_000), 0x1237);
        // When halt is cleared, the move goes on and ends on the target
        controlword(&mut d, 0x000F, 5_000);
        assert_eq!(position_um(&d, 5_100), start + 4_000);
        assert_eq!(position_um(&d, 5_700), start + 10_000);
        assert_eq!(statusword(&d, 5_700), 0x0637);
    }

    #[test]
    fn quick_stop_holds_the_axis_and_ends_the_move() {
        let mut d = profile_position(0, 10_000);
        let start = position_um(&d, 0);
        move_to(&mut d, start + 10_000, 0, 0);
        // Quick stop after 200 ms: the axis stands at once in quick stop active
        controlword(&mut d, 0x0002, 200);
        assert_eq!((d.state(), statusword(&d, 300)), (QuickStopActive, 0x0217));
        assert_eq!(position_um(&d, 3_000), start + 2_000);
        assert_eq!(velocity_um_s(&d, 3_000), 0);
        // Enabled again it does not resume: the move is over, its target not reached
        controlword(&mut d, 0x000F, 3_000);
        assert_eq!(position_um(&d, 9_000), start + 2_000);
        assert_eq!(statusword(&d, 9_000), 0x0237);
    }

    #[test]
    fn a_fault_during_a_move_stops_the_axis_where_it_is() {
        let mut d = profile_position(0, 10_000);
        let start = position_um(&d, 0);
        move_to(&mut d, start + 10_000, 0, 0);
        d.inject_fault(0x2310, 400);
        assert_eq!(position_um(&d, 2_000), start + 4_000);
        assert_eq!(
            d.state_at(2_000).commanded.unwrap().set_point,
            Some(start + 10_000)
        );
    }

    #[test]
    fn a_time_stamped_just_before_the_last_event_reads_the_axis_at_that_event() {
        // Given a move in progress, stopped by a fault from the console at 1000 ms
        let mut d = profile_position(0, 10_000);
        let start = position_um(&d, 0);
        move_to(&mut d, start + 20_000, 0, 0);
        d.inject_fault(0x2310, 1_000);
        // When a request stamped 2 ms earlier is answered after it, and writes to it
        // Then it sees the axis where the fault stopped it, not 49.7 days on
        assert_eq!(position_um(&d, 998), start + 10_000);
        controlword(&mut d, 0x0080, 999);
        assert_eq!(d.state(), SwitchOnDisabled);
        assert_eq!(position_um(&d, 5_000), start + 10_000);
        assert_eq!(d.state_at(5_000).motion_ms, 1_000);
    }

    #[test]
    fn profile_velocity_runs_at_the_target_velocity_while_enabled_and_not_halted() {
        // Given an enabled unit in profile velocity mode
        let mut d = Drive::new(UNIT);
        d.write(addr::MODES_OF_OPERATION, &[3], 0).unwrap();
        controlword(&mut d, 0x000F, 0);
        let start = position_um(&d, 0);
        assert_eq!(statusword(&d, 0), 0x1637, "speed zero");
        assert_eq!(registers(&d, 0)[usize::from(addr::MODE_DISPLAY)], 3);
        // When a target velocity of -30 mm/s is written
        d.write(addr::TARGET_VELOCITY, &words::i32_high_first(-30_000), 100)
            .unwrap();
        // Then the axis runs at it
        assert_eq!(velocity_um_s(&d, 200), -30_000);
        assert_eq!(position_um(&d, 600), start - 15_000);
        assert_eq!(statusword(&d, 600), 0x0637);
        let s = model::drive_sample(UNIT, 600, &d.state_at(600));
        assert!(s.torque_pct < 0.0 && s.current_a > 0.0, "{s:?}");
        // And halt or disable operation stand it still, continuous in position
        controlword(&mut d, 0x010F, 600);
        assert_eq!(position_um(&d, 1_000), start - 15_000);
        controlword(&mut d, 0x000F, 1_000);
        assert_eq!(position_um(&d, 1_100), start - 18_000);
        controlword(&mut d, 0x0007, 1_100);
        assert_eq!(position_um(&d, 5_000), start - 18_000);
        assert_eq!(velocity_um_s(&d, 5_000), 0);
    }

    #[test]
    fn the_motion_clock_runs_in_operation_enabled_only_once_commanded() {
        let mut d = Drive::new(UNIT);
        controlword(&mut d, 0x0007, 1_000);
        controlword(&mut d, 0x000F, 3_000);
        assert_eq!(d.state_at(4_000).motion_ms, 2_000);
    }

    #[test]
    fn no_write_of_any_values_panics() {
        // Arbitrary u16s from the line, on every writable address, in every state
        let mut rng = fastrand::Rng::with_seed(11);
        for unit in [1, 2] {
            let mut d = Drive::new(unit);
            let mut t = 0u32;
            for _ in 0..20_000 {
                t = t.wrapping_add(rng.u32(0..5_000));
                let address = rng.u16(0x000E..0x001A);
                let values: Vec<u16> = (0..rng.usize(1..12))
                    .map(|_| match rng.u8(0..4) {
                        0 => rng.u16(..),
                        1 => [0, 1, 3, 0xFFFF, 0x8000, 0x7FFF][rng.usize(0..6)],
                        _ => [0x0006, 0x0007, 0x000F, 0x001F, 0x005F, 0x0080, 0x010F]
                            [rng.usize(0..7)],
                    })
                    .collect();
                let _ = d.write(address, &values, t);
                if rng.u8(0..50) == 0 {
                    d.inject_fault(rng.u16(..), t);
                }
                let _ = model::registers(unit, t, &d.state_at(t));
                let _ = model::input_registers(unit, t.wrapping_add(rng.u32(..)), &d.state_at(t));
            }
        }
    }
}
