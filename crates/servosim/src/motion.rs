//! Commanded motion as segments: a commanded axis moves at constant velocity from where it
//! was at the last event (a write, a fault), possibly up to a target where it stops. Each
//! event starts a new segment at the position the old one had reached, so position is
//! continuous; between events the motion is a pure function of the segment and the model
//! time.
//!
//! Integer micrometres and milliseconds throughout, the registers' own resolution: a
//! profile position move ends exactly on its target, and no rounding drifts over hours.
//! Positions stay within the i32 range of the position register (the end of travel);
//! velocities are what the registers can carry (i32 target velocity, u32 profile
//! velocity), so `velocity x time` is computed in i128 and cannot overflow.

/// How far back a time may lie before an event and still count as that event's time.
/// The console thread and the serving task take model time a moment apart, so a request
/// stamped at its arrival can be handled just after a console event stamped later; such a
/// time means "at the event", not "49.7 days later" as wrapping arithmetic would say.
pub const BACKWARD_SLACK_MS: u32 = 60_000;

/// Milliseconds from `from` to `to` on the wrapping u32 model clock; 0 when `to` lies up
/// to [`BACKWARD_SLACK_MS`] before `from`.
pub fn elapsed_ms(from: u32, to: u32) -> u32 {
    let elapsed = to.wrapping_sub(from);
    if elapsed > u32::MAX - BACKWARD_SLACK_MS {
        0
    } else {
        elapsed
    }
}

/// One stretch of constant-velocity motion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    start_um: i32,
    start_ms: u32,
    velocity_um_s: i64,
    target_um: Option<i32>,
}

impl Segment {
    /// The axis stands at `at_um` from `t_ms` on.
    pub fn hold(at_um: i32, t_ms: u32) -> Self {
        Self {
            start_um: at_um,
            start_ms: t_ms,
            velocity_um_s: 0,
            target_um: None,
        }
    }

    /// The axis moves at `velocity_um_s` (signed) from `at_um`, until the end of travel.
    pub fn run(at_um: i32, t_ms: u32, velocity_um_s: i64) -> Self {
        Self {
            velocity_um_s,
            ..Self::hold(at_um, t_ms)
        }
    }

    /// The axis moves from `at_um` towards `target_um` at `speed_um_s` and stops there.
    /// A zero speed never gets there.
    pub fn toward(at_um: i32, t_ms: u32, target_um: i32, speed_um_s: u32) -> Self {
        let direction = i64::from(target_um.cmp(&at_um) as i8);
        Self {
            start_um: at_um,
            start_ms: t_ms,
            velocity_um_s: direction * i64::from(speed_um_s),
            target_um: Some(target_um),
        }
    }

    /// Where the segment starts, 0.001 mm.
    pub fn start_um(&self) -> i32 {
        self.start_um
    }

    /// The model time it starts at, ms.
    pub fn start_ms(&self) -> u32 {
        self.start_ms
    }

    /// Where it stops, for a move to a target.
    pub fn target_um(&self) -> Option<i32> {
        self.target_um
    }

    /// Position at model time `t_ms` (model time wraps like its u32 register; a time
    /// shortly before the start counts as the start, see [`elapsed_ms`]), 0.001 mm.
    pub fn position_um(&self, t_ms: u32) -> i32 {
        self.travel(t_ms).0
    }

    /// Velocity at `t_ms`, 0.001 mm/s: the segment's velocity while it moves, 0 once it
    /// has arrived at its target or at the end of travel.
    pub fn velocity_um_s(&self, t_ms: u32) -> i64 {
        if self.travel(t_ms).1 {
            self.velocity_um_s
        } else {
            0
        }
    }

    /// True when the segment stands at `t_ms`: it holds, has arrived, or hit the end of
    /// travel.
    pub fn is_standing(&self, t_ms: u32) -> bool {
        self.velocity_um_s(t_ms) == 0
    }

    /// Position at `t_ms`, and whether the axis is still moving then.
    fn travel(&self, t_ms: u32) -> (i32, bool) {
        let elapsed_ms = i128::from(elapsed_ms(self.start_ms, t_ms));
        // Truncated towards zero: the axis never shows a step it has not completed.
        let travel = i128::from(self.velocity_um_s) * elapsed_ms / 1000;
        let start = i128::from(self.start_um);
        match self.target_um {
            Some(target) => {
                let distance = i128::from(target) - start;
                if travel.abs() >= distance.abs() {
                    (target, false)
                } else {
                    // |travel| < |distance| fits between start and target: an i32.
                    ((start + travel) as i32, true)
                }
            }
            None => {
                let at = start + travel;
                let clamped = at.clamp(i128::from(i32::MIN), i128::from(i32::MAX));
                // The clamp makes it fit.
                (clamped as i32, at == clamped && self.velocity_um_s != 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_axis_stays_where_it_is() {
        let s = Segment::hold(-12_345, 1_000);
        for t in [1_000, 1_001, 50_000, u32::MAX] {
            assert_eq!((s.position_um(t), s.velocity_um_s(t)), (-12_345, 0));
        }
        assert!(s.is_standing(2_000));
    }

    #[test]
    fn a_move_runs_at_its_speed_and_stops_exactly_on_its_target() {
        // Given a move from 1 mm to 11 mm at 50 mm/s starting at 2 s
        let s = Segment::toward(1_000, 2_000, 11_000, 50_000);
        // When time passes
        // Then it covers 50 µm per ms and stops after 200 ms, exactly on the target
        assert_eq!(s.position_um(2_000), 1_000);
        assert_eq!(s.position_um(2_001), 1_050);
        assert_eq!(s.position_um(2_100), 6_000);
        assert_eq!(s.velocity_um_s(2_199), 50_000);
        assert_eq!(s.position_um(2_199), 10_950);
        assert_eq!((s.position_um(2_200), s.velocity_um_s(2_200)), (11_000, 0));
        assert_eq!(s.position_um(9_999_999), 11_000);
        assert!(s.is_standing(2_200) && !s.is_standing(2_199));
    }

    #[test]
    fn a_move_backwards_runs_with_a_negative_velocity() {
        let s = Segment::toward(0, 0, -1_001, 1_000);
        assert_eq!(s.velocity_um_s(500), -1_000);
        assert_eq!(s.position_um(500), -500);
        // 1.001 mm at 1 mm/s: the last micrometre arrives at 1001 ms, not before
        assert_eq!(s.position_um(1_000), -1_000);
        assert_eq!(s.position_um(1_001), -1_001);
    }

    #[test]
    fn a_move_to_where_it_stands_has_arrived_at_once() {
        let s = Segment::toward(500, 10, 500, 50_000);
        assert_eq!((s.position_um(10), s.velocity_um_s(10)), (500, 0));
    }

    #[test]
    fn a_velocity_run_stops_at_the_end_of_travel_without_overflow() {
        // The fastest the registers allow, for the longest the model clock allows
        let s = Segment::run(i32::MAX - 10, 0, i64::from(i32::MAX));
        let longest = u32::MAX - BACKWARD_SLACK_MS;
        assert_eq!(s.position_um(longest), i32::MAX);
        assert_eq!(s.velocity_um_s(longest), 0);
        let s = Segment::run(0, 0, -i64::from(u32::MAX));
        assert_eq!(s.position_um(longest), i32::MIN);
        let s = Segment::toward(i32::MIN, 0, i32::MAX, u32::MAX);
        assert_eq!(s.position_um(0), i32::MIN);
        assert!(s.position_um(1) > i32::MIN && s.position_um(1) < 0);
        assert_eq!(s.position_um(1_001), i32::MAX);
    }

    #[test]
    fn a_time_shortly_before_the_start_counts_as_the_start() {
        // A read stamped 3 ms before a console event that started this segment
        let s = Segment::toward(0, 1_000, 50_000, 50_000);
        assert_eq!(s.position_um(997), 0);
        assert_eq!(s.velocity_um_s(997), 50_000);
        assert_eq!(elapsed_ms(1_000, 997), 0);
        assert_eq!(
            elapsed_ms(1_000, 1_000u32.wrapping_sub(BACKWARD_SLACK_MS + 1)),
            u32::MAX - BACKWARD_SLACK_MS
        );
    }

    #[test]
    fn model_time_wraps_like_its_register() {
        let s = Segment::run(0, u32::MAX - 99, 10_000);
        // 200 ms later, across the wrap: 2 mm
        assert_eq!(s.position_um(100), 2_000);
    }
}
