//! The physical model of one simulated axis, and the register block that shows it.
//!
//! Everything here is a pure function of `(unit, t_ms)` (plus a [`DriveState`] for what
//! fault injection and writes change), so an end-to-end test can recompute exactly what the
//! simulator answered for the model time it read from registers 0x000A-0x000B.
//!
//! The axis repeats a smooth point-to-point move, `position = home + A (1 - cos θ) / 2`
//! with `θ = 2π (t + phase) / T`; velocity is its derivative; torque is an inertia term
//! proportional to the acceleration plus a friction term `F tanh(v / 10 mm/s)` (a smoothed
//! `sign(v)`, so torque stays continuous); current is proportional to `|torque|`; the
//! temperature rises in closed form `T_amb + ΔT (1 - exp(-t / τ))` plus a ripple
//! proportional to `|torque|`. Amplitude, period, phase, home, loads and temperatures
//! differ per unit ([`axis`]).
//!
//! A faulted drive (error code ≠ 0) is disabled: its motion clock stops, so position holds
//! and velocity, torque and current are 0. The slow part of the temperature keeps its
//! closed form in real time (the motor's thermal mass does not care about the fault), and
//! the ripple, which follows the actual load, vanishes. When the fault is cleared the move
//! resumes where it stopped, so position stays continuous.
//!
//! A drive that was commanded (see [`crate::drive`]) leaves the repeating move for good:
//! its [`DriveState::commanded`] carries the CiA 402 state and a [`Segment`] of
//! constant-velocity motion, and [`drive_sample`] takes position and velocity from that
//! segment, torque from the friction term alone (constant velocity: no inertia term),
//! current and temperature by the same formulas as above.

use std::f64::consts::PI;

use crate::cia402::{self, Cia402State};
use crate::motion::Segment;
use crate::words;

/// Register addresses (the protocol's 0-based addresses). See README.md for the table.
pub mod addr {
    /// Holding 0x0000-0x0001: position actual, i32 high word first, 0.001 mm.
    pub const POSITION: u16 = 0x0000;
    /// Holding 0x0002-0x0003: velocity actual, i32 high word first, 0.001 mm/s.
    pub const VELOCITY: u16 = 0x0002;
    /// Holding 0x0004: torque actual, i16, 0.1 % of rated.
    pub const TORQUE: u16 = 0x0004;
    /// Holding 0x0005: motor current, i16, 0.01 A.
    pub const CURRENT: u16 = 0x0005;
    /// Holding 0x0006: temperature, i16, 0.1 degC.
    pub const TEMPERATURE: u16 = 0x0006;
    /// Holding 0x0007: CiA 402 statusword (object 0x6041), u16.
    pub const STATUSWORD: u16 = 0x0007;
    /// Holding 0x0008: CiA 402 error code (object 0x603F), u16, 0 = no fault.
    pub const ERROR_CODE: u16 = 0x0008;
    /// Holding 0x0009: modes of operation display (object 0x6061), i16.
    pub const MODE_DISPLAY: u16 = 0x0009;
    /// Holding 0x000A-0x000B: model time of the snapshot, u32 LOW word first, ms.
    pub const MODEL_TIME: u16 = 0x000A;
    /// Holding 0x0010-0x0011: target position, i32 high word first, 0.001 mm (writable).
    pub const TARGET_POSITION: u16 = 0x0010;
    /// Holding 0x0012: CiA 402 controlword (object 0x6040), u16 (writable).
    pub const CONTROLWORD: u16 = 0x0012;
    /// Holding 0x0013: modes of operation (object 0x6060), i16 (writable).
    pub const MODES_OF_OPERATION: u16 = 0x0013;
    /// Holding 0x0014-0x0015: profile velocity (object 0x6081), u32 high word first,
    /// 0.001 mm/s (writable).
    pub const PROFILE_VELOCITY: u16 = 0x0014;
    /// Holding 0x0016-0x0017: target velocity (object 0x60FF), i32 high word first,
    /// 0.001 mm/s (writable).
    pub const TARGET_VELOCITY: u16 = 0x0016;
    /// Holding 0x0018: speed limit, u16, mm/s (writable; a plain setting, no effect on
    /// motion).
    pub const SPEED_LIMIT: u16 = 0x0018;
    /// Holding 0x0100-0x010F: not implemented; any read touching it is refused.
    pub const HOLE: std::ops::RangeInclusive<u16> = 0x0100..=0x010F;
    /// Holding 0x0110-0x0113: operating hours, f64 high word first, h.
    pub const OPERATING_HOURS: u16 = 0x0110;
    /// Holding 0x0114-0x0115: peak torque of the move profile, f32 high word first, %.
    pub const PEAK_TORQUE: u16 = 0x0114;
    /// Holding 0x0116: digital inputs, u16: bit 0 enabled, bit 1 moving.
    pub const DIGITAL_INPUTS: u16 = 0x0116;

    /// Input 0x0000-0x0001: DC bus voltage, u32 LOW word first, 0.001 V.
    pub const DC_BUS_VOLTAGE: u16 = 0x0000;
    /// Input 0x0002-0x0005: energy counter, u64 high word first, J.
    pub const ENERGY: u16 = 0x0002;
    /// Input 0x0006-0x0007: following error, i32 high word first, 0.001 mm.
    pub const FOLLOWING_ERROR: u16 = 0x0006;
}

/// Number of holding registers (0x0000-0x0116); addresses at or above are refused.
pub const HOLDING_LEN: usize = 0x0117;
/// Number of input registers (0x0000-0x0007).
pub const INPUT_LEN: usize = 8;

/// Statusword of a running drive: operation enabled (xxxx xxxx x01x 0111, CiA 402-2
/// "State coding") with voltage enabled (bit 4) and remote (bit 9).
pub const STATUSWORD_OPERATION_ENABLED: u16 = 0x0237;
/// Statusword of a faulted drive: fault (xxxx xxxx x0xx 1000) with voltage enabled and
/// remote.
pub const STATUSWORD_FAULT: u16 = 0x0218;
/// Modes of operation 8: cyclic synchronous position (CiA 402-2, object 0x6060), the
/// mode a unit shows until another is written.
pub const MODE_CYCLIC_SYNC_POSITION: i16 = cia402::MODE_CYCLIC_SYNC_POSITION as i16;
/// Speed limit register (0x0018) at start, mm/s.
pub const SPEED_LIMIT_DEFAULT: u16 = 200;

/// Digital inputs bit 0: the drive is enabled (not faulted; once commanded, in operation
/// enabled).
pub const DI_ENABLED: u16 = 0x0001;
/// Digital inputs bit 1: the axis moves faster than 1 mm/s.
pub const DI_MOVING: u16 = 0x0002;

/// Speed over which the friction term reaches about 76 % of its full value
/// (`tanh(1)`); smooths `sign(v)` so torque is continuous.
const FRICTION_SPEED_MM_S: f64 = 10.0;
/// Motor current per percent of rated torque (rated current 4 A).
const CURRENT_A_PER_PCT: f64 = 0.04;
/// Thermal time constant of the motor winding.
const THERMAL_TAU_S: f64 = 300.0;
/// Temperature ripple per percent of torque.
const RIPPLE_C_PER_PCT: f64 = 0.02;
/// Following error = velocity x lag of the position loop.
const POSITION_LOOP_LAG_S: f64 = 0.004;
/// DC bus: nominal voltage, ripple amplitude and period (100 Hz rectifier ripple
/// would alias at 1 ms steps; 50 Hz shows a clean sine), and sag per ampere.
const DC_BUS_NOMINAL_V: f64 = 48.0;
const DC_BUS_RIPPLE_V: f64 = 0.12;
const DC_BUS_RIPPLE_PERIOD_MS: u32 = 20;
const DC_BUS_SAG_V_PER_A: f64 = 0.02;

/// The per-unit parameters of the move; units differ so a mixed-up unit shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Axis {
    /// Stroke of the move, mm.
    pub amplitude_mm: f64,
    /// Duration of one back-and-forth cycle, ms.
    pub period_ms: u32,
    /// Where in the cycle the unit is at t = 0, ms.
    pub phase_ms: u32,
    /// Position at the start of the stroke, mm (negative for even units, so signed
    /// decoding is exercised).
    pub home_mm: f64,
    /// Torque at peak acceleration, % of rated.
    pub accel_torque_pct: f64,
    /// Full friction torque, % of rated.
    pub friction_pct: f64,
    /// Ambient temperature, degC.
    pub ambient_c: f64,
    /// Final temperature rise under this duty cycle, degC.
    pub rise_c: f64,
    /// Mean electrical power, W (drives the energy counter).
    pub mean_power_w: u64,
    /// Operating hours before the simulator started, h.
    pub base_hours: u64,
}

/// The parameters of `unit`'s axis.
pub fn axis(unit: u8) -> Axis {
    let u = u32::from(unit);
    let amplitude_mm = 80.0 + 20.0 * f64::from(u % 6);
    let period_ms = 1_600 + 200 * (u % 5);
    let accel_torque_pct = 40.0 + 6.0 * f64::from(u % 5);
    Axis {
        amplitude_mm,
        period_ms,
        phase_ms: (250 * u) % period_ms,
        home_mm: if u % 2 == 0 { -amplitude_mm / 2.0 } else { 0.0 },
        accel_torque_pct,
        friction_pct: 6.0 + f64::from(u % 3),
        ambient_c: 25.0 + 0.5 * f64::from(u % 4),
        rise_c: 0.4 * accel_torque_pct,
        mean_power_w: 3 * (40 + 6 * u64::from(u % 5)),
        // Large enough that the energy counter needs more than 32 bits.
        base_hours: 10_000 + 1_234 * u64::from(u),
    }
}

/// What the axis does at one instant, in engineering units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub position_mm: f64,
    pub velocity_mm_s: f64,
    pub torque_pct: f64,
    pub current_a: f64,
    pub temperature_c: f64,
}

/// The writable holding registers 0x0010-0x0018 as last written (or at their start
/// values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// 0x0010-0x0011: target position, 0.001 mm; 0 at start.
    pub target_position: i32,
    /// 0x0012: controlword; 0 at start.
    pub controlword: u16,
    /// 0x0013: modes of operation; 8 at start (the mode the display showed all along).
    pub modes_of_operation: i16,
    /// 0x0014-0x0015: profile velocity, 0.001 mm/s; 0 at start (a move then runs at
    /// [`crate::drive::DEFAULT_PROFILE_VELOCITY_UM_S`]).
    pub profile_velocity: u32,
    /// 0x0016-0x0017: target velocity, 0.001 mm/s; 0 at start.
    pub target_velocity: i32,
    /// 0x0018: speed limit, mm/s; [`SPEED_LIMIT_DEFAULT`] at start.
    pub speed_limit: u16,
}

impl Default for Written {
    fn default() -> Self {
        Self {
            target_position: 0,
            controlword: 0,
            modes_of_operation: MODE_CYCLIC_SYNC_POSITION,
            profile_velocity: 0,
            target_velocity: 0,
            speed_limit: SPEED_LIMIT_DEFAULT,
        }
    }
}

impl Written {
    /// Stores a write already checked by [`holding_writable`]; words outside the
    /// writable range are ignored. Writing one half of a 32-bit value keeps the other.
    pub fn apply(&mut self, address: u16, values: &[u16]) {
        let mut target = words::i32_high_first(self.target_position);
        let mut profile = words::u32_high_first(self.profile_velocity);
        let mut velocity = words::i32_high_first(self.target_velocity);
        // Addresses past 0xFFFF do not exist (and `address..` would overflow).
        let addresses = (0..=u16::MAX).skip(usize::from(address));
        for (a, &v) in addresses.zip(values) {
            match a.wrapping_sub(addr::TARGET_POSITION) {
                0 => target[0] = v,
                1 => target[1] = v,
                2 => self.controlword = v,
                3 => self.modes_of_operation = v as i16,
                4 => profile[0] = v,
                5 => profile[1] = v,
                6 => velocity[0] = v,
                7 => velocity[1] = v,
                8 => self.speed_limit = v,
                _ => {}
            }
        }
        self.target_position = words::i32_from_high_first(target);
        self.profile_velocity = words::u32_from_high_first(profile);
        self.target_velocity = words::i32_from_high_first(velocity);
    }
}

/// A commanded drive at one instant: what [`crate::drive::Drive`] adds once the repeating
/// move has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commanded {
    /// The CiA 402 state.
    pub state: Cia402State,
    /// The motion since the last event.
    pub segment: Segment,
    /// The target of the last profile position set-point (absolute, 0.001 mm); `None`
    /// before the first.
    pub set_point: Option<i32>,
    /// Statusword bits 10 (target reached) and 12 (set-point acknowledge / speed zero)
    /// at this instant; shown in operation enabled only.
    pub mode_bits: u16,
}

/// The state the simulator adds to the pure motion: fault injection, written values and,
/// once commanded, the CiA 402 drive. Taken at one instant: `motion_ms` and
/// `commanded.mode_bits` belong to the model time it was taken at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriveState {
    /// CiA 402 error code (0x603F); 0 = no fault, anything else = faulted.
    pub error_code: u16,
    /// The axis's motion clock, ms: model time minus the time spent outside operation
    /// enabled (faulted, for a drive never commanded). Equals the model time for a drive
    /// that was never faulted or disabled. It drives the repeating move and the energy
    /// counter.
    pub motion_ms: u32,
    /// The writable registers.
    pub written: Written,
    /// `None` for a drive never commanded: it runs the repeating move in operation
    /// enabled (or stands in Fault).
    pub commanded: Option<Commanded>,
}

impl DriveState {
    /// A drive that has run without a fault up to `t_ms` and was never written to.
    pub fn running(t_ms: u32) -> Self {
        Self {
            error_code: 0,
            motion_ms: t_ms,
            written: Written::default(),
            commanded: None,
        }
    }

    /// True when a fault is active.
    pub fn is_faulted(&self) -> bool {
        self.error_code != 0
    }

    /// The CiA 402 state: operation enabled or fault until the drive is commanded.
    pub fn state(&self) -> Cia402State {
        match self.commanded {
            Some(c) => c.state,
            None if self.is_faulted() => Cia402State::Fault,
            None => Cia402State::OperationEnabled,
        }
    }

    /// The CiA 402 statusword this state shows: the state coding with voltage enabled
    /// and remote, plus bits 10 and 12 in operation enabled once commanded. A drive never
    /// commanded shows 0x0237 or 0x0218, as it always has.
    pub fn statusword(&self) -> u16 {
        let state = self.state();
        let mode_bits = match self.commanded {
            Some(c) if state == Cia402State::OperationEnabled => c.mode_bits,
            _ => 0,
        };
        state.statusword() | mode_bits
    }

    /// True when the power stage drives the axis (digital input bit 0): not faulted, and
    /// in operation enabled once commanded.
    pub fn is_enabled(&self) -> bool {
        self.state() == Cia402State::OperationEnabled
    }
}

/// A never-faulted drive `unit` at model time `t_ms`.
pub fn sample(unit: u8, t_ms: u32) -> Sample {
    drive_sample(unit, t_ms, &DriveState::running(t_ms))
}

/// Drive `unit` at model time `t_ms` in state `drive` (see the module docs for faults).
pub fn drive_sample(unit: u8, t_ms: u32, drive: &DriveState) -> Sample {
    let ax = axis(unit);
    // The angle from integer milliseconds modulo the period keeps full precision at any t.
    let in_cycle = (u64::from(drive.motion_ms) + u64::from(ax.phase_ms)) % u64::from(ax.period_ms);
    let theta = 2.0 * PI * in_cycle as f64 / f64::from(ax.period_ms);
    let period_s = f64::from(ax.period_ms) / 1000.0;

    let (position_mm, velocity_mm_s, torque_pct) = match drive.commanded {
        Some(c) => {
            // Integer micrometres to mm by a division, so 120500 shows as 120.5 exactly.
            let position = f64::from(c.segment.position_um(t_ms)) / 1000.0;
            let v = c.segment.velocity_um_s(t_ms) as f64 / 1000.0;
            // Constant velocity: friction only, the same smoothed sign as the move's.
            (position, v, friction(&ax, v))
        }
        None => {
            let position = ax.home_mm + ax.amplitude_mm * (1.0 - theta.cos()) / 2.0;
            if drive.is_faulted() {
                (position, 0.0, 0.0)
            } else {
                let v = ax.amplitude_mm * PI / period_s * theta.sin();
                (
                    position,
                    v,
                    ax.accel_torque_pct * theta.cos() + friction(&ax, v),
                )
            }
        }
    };
    let t_s = f64::from(t_ms) / 1000.0;
    let temperature_c = ax.ambient_c
        + ax.rise_c * (1.0 - (-t_s / THERMAL_TAU_S).exp())
        + RIPPLE_C_PER_PCT * torque_pct.abs();
    Sample {
        position_mm,
        velocity_mm_s,
        torque_pct,
        current_a: CURRENT_A_PER_PCT * torque_pct.abs(),
        temperature_c,
    }
}

/// Friction torque at `v` mm/s, % of rated: `F tanh(v / 10 mm/s)`, a smoothed `sign(v)`
/// so torque stays continuous in velocity.
fn friction(ax: &Axis, velocity_mm_s: f64) -> f64 {
    ax.friction_pct * (velocity_mm_s / FRICTION_SPEED_MM_S).tanh()
}

/// `value / resolution` rounded to the nearest step; `as` saturates, so no value panics.
fn steps_i32(value: f64, resolution: f64) -> i32 {
    (value / resolution).round() as i32
}

fn steps_i16(value: f64, resolution: f64) -> u16 {
    (value / resolution).round() as i16 as u16
}

/// The whole holding-register block of `unit` at `t_ms` (the hole reads as zeros here;
/// [`holding_readable`] says which ranges may be read).
pub fn registers(unit: u8, t_ms: u32, drive: &DriveState) -> [u16; HOLDING_LEN] {
    let s = drive_sample(unit, t_ms, drive);
    let ax = axis(unit);
    let mut r = [0u16; HOLDING_LEN];
    let mut put = |at: u16, words: &[u16]| {
        let at = usize::from(at);
        r[at..at + words.len()].copy_from_slice(words);
    };
    put(
        addr::POSITION,
        &words::i32_high_first(steps_i32(s.position_mm, 0.001)),
    );
    put(
        addr::VELOCITY,
        &words::i32_high_first(steps_i32(s.velocity_mm_s, 0.001)),
    );
    put(addr::TORQUE, &[steps_i16(s.torque_pct, 0.1)]);
    put(addr::CURRENT, &[steps_i16(s.current_a, 0.01)]);
    put(addr::TEMPERATURE, &[steps_i16(s.temperature_c, 0.1)]);
    put(addr::STATUSWORD, &[drive.statusword()]);
    put(addr::ERROR_CODE, &[drive.error_code]);
    let w = &drive.written;
    // The display follows the mode written (8 until one is): every mode is taken at once.
    put(addr::MODE_DISPLAY, &[w.modes_of_operation as u16]);
    put(addr::MODEL_TIME, &words::u32_low_first(t_ms));
    put(
        addr::TARGET_POSITION,
        &words::i32_high_first(w.target_position),
    );
    put(addr::CONTROLWORD, &[w.controlword]);
    put(addr::MODES_OF_OPERATION, &[w.modes_of_operation as u16]);
    put(
        addr::PROFILE_VELOCITY,
        &words::u32_high_first(w.profile_velocity),
    );
    put(
        addr::TARGET_VELOCITY,
        &words::i32_high_first(w.target_velocity),
    );
    put(addr::SPEED_LIMIT, &[w.speed_limit]);
    let hours = ax.base_hours as f64 + f64::from(t_ms) / 3_600_000.0;
    put(addr::OPERATING_HOURS, &words::f64_high_first(hours));
    let peak = (ax.accel_torque_pct + ax.friction_pct) as f32;
    put(addr::PEAK_TORQUE, &words::f32_high_first(peak));
    let mut inputs = 0;
    if drive.is_enabled() {
        inputs |= DI_ENABLED;
    }
    if s.velocity_mm_s.abs() > 1.0 {
        inputs |= DI_MOVING;
    }
    put(addr::DIGITAL_INPUTS, &[inputs]);
    r
}

/// The input-register block of `unit` at `t_ms`.
pub fn input_registers(unit: u8, t_ms: u32, drive: &DriveState) -> [u16; INPUT_LEN] {
    let s = drive_sample(unit, t_ms, drive);
    let ax = axis(unit);
    let mut r = [0u16; INPUT_LEN];
    let ripple_phase =
        f64::from(t_ms % DC_BUS_RIPPLE_PERIOD_MS) / f64::from(DC_BUS_RIPPLE_PERIOD_MS);
    let volts = DC_BUS_NOMINAL_V + DC_BUS_RIPPLE_V * (2.0 * PI * ripple_phase).sin()
        - DC_BUS_SAG_V_PER_A * s.current_a;
    let millivolts = (volts * 1000.0).round() as u32;
    r[0..2].copy_from_slice(&words::u32_low_first(millivolts));
    // Integer joules: base energy of the hours already run, plus mean power x motion time.
    let energy_j = ax.mean_power_w * ax.base_hours * 3_600
        + ax.mean_power_w * u64::from(drive.motion_ms) / 1_000;
    r[2..6].copy_from_slice(&words::u64_high_first(energy_j));
    let following_mm = s.velocity_mm_s * POSITION_LOOP_LAG_S;
    r[6..8].copy_from_slice(&words::i32_high_first(steps_i32(following_mm, 0.001)));
    r
}

/// True when holding registers `address .. address + quantity` exist (none in the hole,
/// none past 0x0116).
pub fn holding_readable(address: u16, quantity: u16) -> bool {
    let (start, end) = (u32::from(address), u32::from(address) + u32::from(quantity));
    let (hole_start, hole_end) = (
        u32::from(*addr::HOLE.start()),
        u32::from(*addr::HOLE.end()) + 1,
    );
    end <= HOLDING_LEN as u32 && (end <= hole_start || start >= hole_end)
}

/// True when input registers `address .. address + quantity` exist.
pub fn input_readable(address: u16, quantity: u16) -> bool {
    u32::from(address) + u32::from(quantity) <= INPUT_LEN as u32
}

/// True when holding registers `address .. address + quantity` may be written
/// (0x0010-0x0018: target position, controlword, modes of operation, profile velocity,
/// target velocity, speed limit).
pub fn holding_writable(address: u16, quantity: u16) -> bool {
    let end = u32::from(address) + u32::from(quantity);
    address >= addr::TARGET_POSITION && end <= u32::from(addr::SPEED_LIMIT) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNITS: [u8; 6] = [1, 2, 3, 4, 5, 6];

    #[test]
    fn the_model_is_a_pure_function_of_unit_and_time() {
        for unit in UNITS {
            for t in [0, 1, 999, 123_456, u32::MAX] {
                assert_eq!(sample(unit, t), sample(unit, t));
                assert_eq!(
                    registers(unit, t, &DriveState::running(t)),
                    registers(unit, t, &DriveState::running(t))
                );
            }
        }
    }

    #[test]
    fn position_velocity_torque_and_temperature_move_continuously_at_1ms_steps() {
        // Largest plausible per-ms change: v_max = A π / T ≈ 0.39 mm/ms for the fastest
        // unit, so position steps stay well under 1 mm; torque and velocity change
        // smoothly too (friction uses tanh, not sign).
        for unit in UNITS {
            let mut prev = sample(unit, 0);
            for t in 1..5_000 {
                let s = sample(unit, t);
                assert!(
                    (s.position_mm - prev.position_mm).abs() < 1.0,
                    "unit {unit} t {t}"
                );
                assert!(
                    (s.velocity_mm_s - prev.velocity_mm_s).abs() < 5.0,
                    "unit {unit} t {t}"
                );
                assert!(
                    (s.torque_pct - prev.torque_pct).abs() < 2.0,
                    "unit {unit} t {t}"
                );
                assert!(
                    (s.temperature_c - prev.temperature_c).abs() < 0.1,
                    "unit {unit} t {t}"
                );
                prev = s;
            }
        }
    }

    #[test]
    fn velocity_is_the_derivative_of_position() {
        for unit in UNITS {
            for t in [100, 777, 1_234, 2_001] {
                let numeric =
                    (sample(unit, t + 1).position_mm - sample(unit, t - 1).position_mm) / 0.002;
                let v = sample(unit, t).velocity_mm_s;
                assert!(
                    (numeric - v).abs() < 0.5,
                    "unit {unit} t {t}: {numeric} vs {v}"
                );
            }
        }
    }

    #[test]
    fn units_follow_different_trajectories() {
        let a: Vec<_> = (0..50).map(|t| sample(1, t * 40).position_mm).collect();
        for unit in 2..=6 {
            let b: Vec<_> = (0..50).map(|t| sample(unit, t * 40).position_mm).collect();
            assert_ne!(a, b, "unit {unit} moves like unit 1");
        }
    }

    #[test]
    fn temperature_rises_towards_ambient_plus_rise() {
        let ax = axis(3);
        let cold = sample(3, 0).temperature_c;
        let warm = sample(3, 3_000_000).temperature_c;
        assert!(cold < ax.ambient_c + 2.0, "{cold}");
        assert!((warm - (ax.ambient_c + ax.rise_c)).abs() < 2.0, "{warm}");
    }

    #[test]
    fn holding_registers_decode_back_to_the_sample() {
        let (unit, t) = (2, 65_537 + 1_000);
        let drive = DriveState::running(t);
        let r = registers(unit, t, &drive);
        let s = sample(unit, t);
        let pos = f64::from(words::i32_from_high_first([r[0], r[1]])) * 0.001;
        let vel = f64::from(words::i32_from_high_first([r[2], r[3]])) * 0.001;
        assert!(
            (pos - s.position_mm).abs() <= 0.0005,
            "{pos} vs {}",
            s.position_mm
        );
        assert!((vel - s.velocity_mm_s).abs() <= 0.0005);
        assert!((f64::from(r[4] as i16) * 0.1 - s.torque_pct).abs() <= 0.05);
        assert!((f64::from(r[5] as i16) * 0.01 - s.current_a).abs() <= 0.005);
        assert!((f64::from(r[6] as i16) * 0.1 - s.temperature_c).abs() <= 0.05);
        assert_eq!(r[7], STATUSWORD_OPERATION_ENABLED);
        assert_eq!(r[8], 0);
        assert_eq!(r[9], 8);
        // Model time above 65535 ms makes both words non-zero, so word order matters.
        assert_eq!(words::u32_from_low_first([r[10], r[11]]), t);
        assert_eq!([r[10], r[11]], [(t & 0xFFFF) as u16, (t >> 16) as u16]);
        let hours = words::f64_from_high_first([r[0x110], r[0x111], r[0x112], r[0x113]]);
        assert!((hours - (axis(unit).base_hours as f64 + f64::from(t) / 3.6e6)).abs() < 1e-9);
        let peak = words::f32_from_high_first([r[0x114], r[0x115]]);
        assert_eq!(
            peak,
            (axis(unit).accel_torque_pct + axis(unit).friction_pct) as f32
        );
        assert_eq!(r[0x116] & DI_ENABLED, DI_ENABLED);
    }

    #[test]
    fn even_units_report_negative_positions_as_signed_i32() {
        // Unit 2 at its home (θ = 0) sits at -A/2.
        let ax = axis(2);
        let t = ax.period_ms - ax.phase_ms;
        let r = registers(2, t, &DriveState::running(t));
        let pos = words::i32_from_high_first([r[0], r[1]]);
        assert_eq!(pos, (ax.home_mm * 1000.0).round() as i32);
        assert!(pos < 0 && r[0] == 0xFFFF);
    }

    #[test]
    fn input_registers_hold_bus_voltage_energy_and_following_error() {
        let (unit, t) = (4, 10_000);
        let r = input_registers(unit, t, &DriveState::running(t));
        let volts = f64::from(words::u32_from_low_first([r[0], r[1]])) / 1000.0;
        assert!((47.5..48.5).contains(&volts), "{volts}");
        let energy = words::u64_from_high_first([r[2], r[3], r[4], r[5]]);
        let ax = axis(unit);
        assert_eq!(energy, ax.mean_power_w * (ax.base_hours * 3600 + 10));
        assert!(
            energy > u64::from(u32::MAX),
            "energy should need the high words"
        );
        let fe = f64::from(words::i32_from_high_first([r[6], r[7]])) * 0.001;
        assert!((fe - sample(unit, t).velocity_mm_s * 0.004).abs() < 0.001);
    }

    #[test]
    fn a_faulted_drive_holds_position_and_shows_the_fault() {
        let drive = DriveState {
            error_code: 0x2310,
            motion_ms: 700,
            ..DriveState::running(0)
        };
        let s = drive_sample(1, 5_000, &drive);
        assert_eq!(s.position_mm, sample(1, 700).position_mm);
        assert_eq!(
            (s.velocity_mm_s, s.torque_pct, s.current_a),
            (0.0, 0.0, 0.0)
        );
        let r = registers(1, 5_000, &drive);
        assert_eq!(r[usize::from(addr::STATUSWORD)], STATUSWORD_FAULT);
        assert_eq!(r[usize::from(addr::STATUSWORD)] & 0x0008, 0x0008);
        assert_eq!(r[usize::from(addr::ERROR_CODE)], 0x2310);
        assert_eq!(r[usize::from(addr::DIGITAL_INPUTS)] & DI_ENABLED, 0);
    }

    #[test]
    fn the_hole_and_the_end_of_the_map_are_not_readable() {
        assert!(holding_readable(0x0000, 125));
        assert!(holding_readable(0x0080, 0x80)); // up to 0x00FF exactly
        assert!(!holding_readable(0x0080, 0x81)); // touches 0x0100
        assert!(!holding_readable(0x0105, 1));
        assert!(!holding_readable(0x00F0, 0x30)); // spans the hole
        assert!(holding_readable(0x0110, 7));
        assert!(!holding_readable(0x0110, 8)); // 0x0117 is past the end
        assert!(!holding_readable(0xFFFF, 1));
        assert!(input_readable(0, 8));
        assert!(!input_readable(7, 2));
    }

    #[test]
    fn only_the_command_registers_and_the_speed_limit_are_writable() {
        assert!(holding_writable(0x0010, 9));
        assert!(holding_writable(0x0012, 1));
        assert!(holding_writable(0x0018, 1));
        assert!(!holding_writable(0x000F, 2));
        assert!(!holding_writable(0x0012, 8));
        assert!(!holding_writable(0x0019, 1));
        assert!(!holding_writable(0xFFFF, 1));
    }

    #[test]
    fn writes_are_stored_in_their_registers_and_halves_of_wide_values_kept() {
        // Given the start values
        let mut w = Written::default();
        assert_eq!((w.modes_of_operation, w.speed_limit), (8, 200));
        // When the whole block is written high word first
        w.apply(
            0x0010,
            &[
                0xFFFF, 0xFC18, 0x000F, 0x0001, 0x0001, 0x0002, 0xFFFF, 0xFFFE, 250,
            ],
        );
        // Then each register holds its value
        assert_eq!(
            w,
            Written {
                target_position: -1000,
                controlword: 0x000F,
                modes_of_operation: 1,
                profile_velocity: 0x0001_0002,
                target_velocity: -2,
                speed_limit: 250,
            }
        );
        // And a write of one half keeps the other
        w.apply(0x0011, &[0x0001]);
        assert_eq!(
            w.target_position,
            words::i32_from_high_first([0xFFFF, 0x0001])
        );
        w.apply(0x0014, &[0]);
        assert_eq!(w.profile_velocity, 0x0002);
        // And nothing past the end of the address space is written (or panics)
        let before = w;
        w.apply(0xFFFF, &[1, 2, 3]);
        assert_eq!(w, before);
    }

    #[test]
    fn the_written_registers_read_back_and_start_at_their_defaults() {
        let t = 5_000;
        let r = registers(3, t, &DriveState::running(t));
        // 0x0010-0x0018 at start: target 0, controlword 0, mode 8, profile and target
        // velocity 0, speed limit 200
        assert_eq!(r[0x10..0x19], [0, 0, 0, 8, 0, 0, 0, 0, 200]);
        let mut drive = DriveState::running(t);
        drive
            .written
            .apply(0x0013, &[3, 0, 40_000, 0xFFFF, 0x63C0, 120]);
        let r = registers(3, t, &drive);
        assert_eq!(r[0x13..0x19], [3, 0, 40_000, 0xFFFF, 0x63C0, 120]);
        assert_eq!(r[usize::from(addr::MODE_DISPLAY)], 3);
    }

    #[test]
    fn a_commanded_drive_moves_by_its_segment_with_friction_torque_only() {
        // Given a commanded drive moving at 20 mm/s from 10 mm since 1 s
        let drive = DriveState {
            commanded: Some(Commanded {
                state: Cia402State::OperationEnabled,
                segment: Segment::run(10_000, 1_000, 20_000),
                set_point: None,
                mode_bits: 0x0400,
            }),
            ..DriveState::running(0)
        };
        // When sampled half a second later
        let s = drive_sample(1, 1_500, &drive);
        // Then position and velocity come from the segment, torque from friction
        assert_eq!((s.position_mm, s.velocity_mm_s), (20.0, 20.0));
        let ax = axis(1);
        assert_eq!(s.torque_pct, ax.friction_pct * 2.0f64.tanh());
        assert_eq!(s.current_a, 0.04 * s.torque_pct);
        let r = registers(1, 1_500, &drive);
        assert_eq!(words::i32_from_high_first([r[0], r[1]]), 20_000);
        assert_eq!(words::i32_from_high_first([r[2], r[3]]), 20_000);
        assert_eq!(r[usize::from(addr::STATUSWORD)], 0x0637);
        assert_eq!(r[usize::from(addr::DIGITAL_INPUTS)], DI_ENABLED | DI_MOVING);
        // And standing still it has no torque at all
        let still = DriveState {
            commanded: Some(Commanded {
                segment: Segment::hold(-5, 0),
                ..drive.commanded.unwrap()
            }),
            ..drive
        };
        let s = drive_sample(1, 1_500, &still);
        assert_eq!(
            (s.position_mm, s.velocity_mm_s, s.torque_pct),
            (-0.005, 0.0, 0.0)
        );
    }

    #[test]
    fn mode_bits_show_in_operation_enabled_only() {
        let commanded = |state| DriveState {
            commanded: Some(Commanded {
                state,
                segment: Segment::hold(0, 0),
                set_point: None,
                mode_bits: 0x1400,
            }),
            ..DriveState::running(0)
        };
        assert_eq!(
            commanded(Cia402State::OperationEnabled).statusword(),
            0x1637
        );
        assert_eq!(commanded(Cia402State::SwitchedOn).statusword(), 0x0233);
        assert_eq!(commanded(Cia402State::Fault).statusword(), 0x0218);
        assert!(!commanded(Cia402State::QuickStopActive).is_enabled());
    }
}
