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

use std::f64::consts::PI;

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
/// Modes of operation 8: cyclic synchronous position (CiA 402-2, object 0x6060).
pub const MODE_CYCLIC_SYNC_POSITION: i16 = 8;

/// Digital inputs bit 0: the drive is enabled (not faulted).
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

/// The state the simulator adds to the pure motion: fault injection and written values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriveState {
    /// CiA 402 error code (0x603F); 0 = no fault, anything else = faulted.
    pub error_code: u16,
    /// The axis's motion clock, ms: model time minus the time spent faulted. Equals the
    /// model time for a drive that was never faulted.
    pub motion_ms: u32,
    /// Last value written to 0x0010-0x0011 (0.001 mm).
    pub target_position: i32,
    /// Last value written to 0x0012.
    pub controlword: u16,
}

impl DriveState {
    /// A drive that has run without a fault up to `t_ms` and was never written to.
    pub fn running(t_ms: u32) -> Self {
        Self {
            error_code: 0,
            motion_ms: t_ms,
            target_position: 0,
            controlword: 0,
        }
    }

    /// True when a fault is active.
    pub fn is_faulted(&self) -> bool {
        self.error_code != 0
    }

    /// The CiA 402 statusword this state shows.
    pub fn statusword(&self) -> u16 {
        if self.is_faulted() {
            STATUSWORD_FAULT
        } else {
            STATUSWORD_OPERATION_ENABLED
        }
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

    let position_mm = ax.home_mm + ax.amplitude_mm * (1.0 - theta.cos()) / 2.0;
    let (velocity_mm_s, torque_pct) = if drive.is_faulted() {
        (0.0, 0.0)
    } else {
        let v = ax.amplitude_mm * PI / period_s * theta.sin();
        let torque =
            ax.accel_torque_pct * theta.cos() + ax.friction_pct * (v / FRICTION_SPEED_MM_S).tanh();
        (v, torque)
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
    put(addr::MODE_DISPLAY, &[MODE_CYCLIC_SYNC_POSITION as u16]);
    put(addr::MODEL_TIME, &words::u32_low_first(t_ms));
    put(
        addr::TARGET_POSITION,
        &words::i32_high_first(drive.target_position),
    );
    put(addr::CONTROLWORD, &[drive.controlword]);
    let hours = ax.base_hours as f64 + f64::from(t_ms) / 3_600_000.0;
    put(addr::OPERATING_HOURS, &words::f64_high_first(hours));
    let peak = (ax.accel_torque_pct + ax.friction_pct) as f32;
    put(addr::PEAK_TORQUE, &words::f32_high_first(peak));
    let mut inputs = 0;
    if !drive.is_faulted() {
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
/// (0x0010-0x0012: target position and controlword).
pub fn holding_writable(address: u16, quantity: u16) -> bool {
    let end = u32::from(address) + u32::from(quantity);
    address >= addr::TARGET_POSITION && end <= u32::from(addr::CONTROLWORD) + 1
}

/// Stores a write already checked by [`holding_writable`]; words outside the writable
/// range are ignored. Writing one half of the target position keeps the other half.
pub fn apply_write(drive: &mut DriveState, address: u16, values: &[u16]) {
    let mut target = words::u32_high_first(drive.target_position as u32);
    for (a, &v) in (address..).zip(values) {
        match a {
            a if a == addr::TARGET_POSITION => target[0] = v,
            a if a == addr::TARGET_POSITION + 1 => target[1] = v,
            a if a == addr::CONTROLWORD => drive.controlword = v,
            _ => {}
        }
    }
    drive.target_position = words::i32_from_high_first(target);
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
    fn only_target_position_and_controlword_are_writable() {
        assert!(holding_writable(0x0010, 3));
        assert!(holding_writable(0x0012, 1));
        assert!(!holding_writable(0x000F, 2));
        assert!(!holding_writable(0x0012, 2));
        let mut d = DriveState::running(0);
        apply_write(&mut d, 0x0010, &[0xFFFF, 0xFC18, 0x000F]);
        assert_eq!((d.target_position, d.controlword), (-1000, 0x000F));
        apply_write(&mut d, 0x0011, &[0x0001]);
        assert_eq!(
            d.target_position,
            words::i32_from_high_first([0xFFFF, 0x0001])
        );
    }
}
