//! The policy's rules one by one, then its invariants as properties.

use super::*;
use crate::parse::{CommandId, Wait};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn policy() -> Policy {
    let mut limits = BTreeMap::new();
    limits.insert(
        "position".to_owned(),
        Limit {
            min: Some(-100.0),
            max: Some(500.0),
            max_step: Some(50.0),
        },
    );
    limits.insert(
        "velocity".to_owned(),
        Limit {
            min: Some(0.0),
            max: Some(200.0),
            max_step: None,
        },
    );
    limits.insert(
        "speed_limit".to_owned(),
        Limit {
            min: Some(0.0),
            max: Some(250.0),
            max_step: None,
        },
    );
    Policy {
        allow: Action::NAMES.iter().map(|s| s.to_string()).collect(),
        writable: vec!["speed_limit".into()],
        max_age: None,
        max_rate: Some(20.0),
        require_fresh: true,
        stale_after: 100 * MS,
        limits,
        fields: vec!["position".into(), "speed_limit".into(), "statusword".into()],
    }
}

fn view(state: DriveState, position: f64) -> DeviceView {
    DeviceView {
        online: Some(true),
        feedback: Some(Feedback {
            at: t0() - 5 * MS,
            good: true,
            state: Some(state),
            position: Some(position),
        }),
    }
}

fn cmd(action: Action) -> Command {
    Command {
        id: CommandId::parse("c-1").unwrap(),
        action,
        timing: Timing {
            deadline: Some(t0() + 250 * MS),
            ..Timing::default()
        },
        body_hash: 0,
    }
}

fn moving(position: f64) -> Action {
    Action::Move {
        position,
        velocity: None,
        relative: false,
        wait: Wait::Ack,
    }
}

fn run(c: &Command, p: &Policy, v: &DeviceView) -> Result<SystemTime, Refused> {
    let rules = Rules::default();
    let cx = Context {
        view: v,
        rules: &rules,
        received: t0(),
        now: Instant::now(),
        expiry: None,
    };
    check(c, p, &mut RateLimiter::default(), cx)
}

fn reason(c: &Command, p: &Policy, v: &DeviceView) -> CommandReason {
    run(c, p, v).expect_err("refused").reason
}

#[test]
fn a_move_inside_every_rule_is_accepted_with_its_deadline() {
    let got = run(
        &cmd(moving(120.0)),
        &policy(),
        &view(DriveState::OperationEnabled, 100.0),
    );
    assert_eq!(got, Ok(t0() + 250 * MS));
}

#[test]
fn an_action_missing_from_allow_is_not_allowed_even_a_stop() {
    let mut p = policy();
    p.allow = vec!["move".into()];
    let v = view(DriveState::OperationEnabled, 0.0);
    assert_eq!(
        reason(&cmd(Action::QuickStop), &p, &v),
        CommandReason::NotAllowed
    );
    p.allow.clear();
    assert_eq!(reason(&cmd(moving(1.0)), &p, &v), CommandReason::NotAllowed);
}

#[test]
fn deadlines_come_from_the_payload_the_expiry_or_max_age_and_else_are_refused() {
    let rules = Rules::default();
    let halt = Action::Halt;
    let mv = moving(1.0);
    let none = Timing::default();
    assert_eq!(
        deadline(&mv, &none, t0(), None, None, &rules)
            .unwrap_err()
            .reason,
        CommandReason::NoDeadline
    );
    assert_eq!(
        deadline(&mv, &none, t0(), None, Some(500 * MS), &rules),
        Ok(t0() + 500 * MS)
    );
    assert_eq!(
        deadline(&mv, &none, t0(), Some(300 * MS), Some(500 * MS), &rules),
        Ok(t0() + 300 * MS),
        "the MQTT 5 expiry comes before max_age"
    );
    let sent = Timing {
        sent: Some(t0() - 100 * MS),
        ttl: Some(250 * MS),
        deadline: None,
    };
    assert_eq!(
        deadline(&mv, &sent, t0(), None, None, &rules),
        Ok(t0() + 150 * MS)
    );
    assert_eq!(
        deadline(&halt, &none, t0(), None, None, &rules),
        Ok(t0() + SAFETY_DEFAULT_AGE),
        "a stop without a deadline still goes"
    );
}

#[test]
fn a_deadline_already_passed_is_expired() {
    let mut c = cmd(moving(1.0));
    c.timing.deadline = Some(t0() - MS);
    let v = view(DriveState::OperationEnabled, 0.0);
    assert_eq!(reason(&c, &policy(), &v), CommandReason::Expired);
    c.timing.deadline = Some(t0());
    assert_eq!(reason(&c, &policy(), &v), CommandReason::Expired);
}

#[test]
fn a_ts_ahead_of_the_clock_by_more_than_the_skew_is_refused() {
    let mut c = cmd(moving(1.0));
    c.timing = Timing {
        sent: Some(t0() + 1500 * MS),
        ttl: Some(250 * MS),
        deadline: None,
    };
    let v = view(DriveState::OperationEnabled, 0.0);
    assert_eq!(reason(&c, &policy(), &v), CommandReason::ClockSkew);
    c.timing.sent = Some(t0() + 900 * MS);
    assert!(run(&c, &policy(), &v).is_ok(), "within a second is fine");
}

#[test]
fn the_rate_limit_refuses_above_max_rate_but_never_a_stop() {
    let p = Policy {
        max_rate: Some(2.0),
        ..policy()
    };
    let v = view(DriveState::OperationEnabled, 0.0);
    let rules = Rules::default();
    let now = Instant::now();
    let mut rate = RateLimiter::default();
    let mut go = |a: Action, at: Instant| {
        let cx = Context {
            view: &v,
            rules: &rules,
            received: t0(),
            now: at,
            expiry: None,
        };
        check(&cmd(a), &p, &mut rate, cx).map_err(|r| r.reason)
    };
    assert!(go(moving(1.0), now).is_ok());
    assert!(go(moving(1.0), now).is_ok());
    assert_eq!(go(moving(1.0), now), Err(CommandReason::RateLimited));
    assert!(go(Action::QuickStop, now).is_ok());
    assert!(go(moving(1.0), now + 500 * MS).is_ok(), "refilled");
}

#[test]
fn a_write_names_a_known_writable_field_inside_its_limits() {
    let v = view(DriveState::OperationEnabled, 0.0);
    let write = |f: &str, x: f64| {
        cmd(Action::Write {
            values: vec![(f.to_owned(), x)],
        })
    };
    assert!(run(&write("speed_limit", 250.0), &policy(), &v).is_ok());
    assert_eq!(
        reason(&write("speed_limit", 300.0), &policy(), &v),
        CommandReason::OutOfRange
    );
    assert_eq!(
        reason(&write("torque_limit", 1.0), &policy(), &v),
        CommandReason::UnknownField
    );
    assert_eq!(
        reason(&write("statusword", 1.0), &policy(), &v),
        CommandReason::NotAllowed
    );
    let msg = run(&write("speed_limit", 300.0), &policy(), &v).unwrap_err();
    assert_eq!(msg.message, "speed_limit 300 > max 250");
}

#[test]
fn moves_outside_the_limits_or_steps_too_large_are_refused() {
    let v = view(DriveState::OperationEnabled, 100.0);
    let p = policy();
    assert_eq!(
        reason(&cmd(moving(600.0)), &p, &v),
        CommandReason::OutOfRange
    );
    assert_eq!(
        reason(&cmd(moving(-101.0)), &p, &v),
        CommandReason::OutOfRange
    );
    assert_eq!(
        reason(&cmd(moving(151.0)), &p, &v),
        CommandReason::StepTooLarge
    );
    assert!(run(&cmd(moving(150.0)), &p, &v).is_ok());
    let fast = Action::Move {
        position: 120.0,
        velocity: Some(250.0),
        relative: false,
        wait: Wait::Ack,
    };
    assert_eq!(reason(&cmd(fast), &p, &v), CommandReason::OutOfRange);
    let rel = |d: f64| Action::Move {
        position: d,
        velocity: None,
        relative: true,
        wait: Wait::Ack,
    };
    assert!(run(&cmd(rel(-50.0)), &p, &v).is_ok());
    assert_eq!(reason(&cmd(rel(51.0)), &p, &v), CommandReason::StepTooLarge);
    let near_max = view(DriveState::OperationEnabled, 480.0);
    assert_eq!(
        reason(&cmd(rel(30.0)), &p, &near_max),
        CommandReason::OutOfRange,
        "a relative move's target is checked against the bounds too"
    );
}

#[test]
fn require_fresh_refuses_motion_offline_late_or_old_but_never_a_stop() {
    let p = policy();
    let mut v = view(DriveState::OperationEnabled, 100.0);
    v.online = Some(false);
    assert_eq!(
        reason(&cmd(moving(110.0)), &p, &v),
        CommandReason::DeviceOffline
    );
    assert!(run(&cmd(Action::Halt), &p, &v).is_ok());
    let mut late = view(DriveState::OperationEnabled, 100.0);
    late.feedback.as_mut().unwrap().good = false;
    assert_eq!(
        reason(&cmd(moving(110.0)), &p, &late),
        CommandReason::StaleFeedback
    );
    let mut old = view(DriveState::OperationEnabled, 100.0);
    old.feedback.as_mut().unwrap().at = t0() - 101 * MS;
    assert_eq!(
        reason(&cmd(moving(110.0)), &p, &old),
        CommandReason::StaleFeedback
    );
    assert!(run(&cmd(Action::Disable), &p, &old).is_ok());
    let relaxed = Policy {
        require_fresh: false,
        ..policy()
    };
    assert!(run(&cmd(moving(110.0)), &relaxed, &late).is_ok());
}

#[test]
fn motion_needs_operation_enabled_and_enable_needs_no_fault() {
    let p = policy();
    let switched_on = view(DriveState::SwitchedOn, 100.0);
    assert_eq!(
        reason(&cmd(moving(110.0)), &p, &switched_on),
        CommandReason::WrongState
    );
    assert_eq!(
        reason(&cmd(Action::Velocity { velocity: 10.0 }), &p, &switched_on),
        CommandReason::WrongState
    );
    assert!(run(&cmd(Action::Enable), &p, &switched_on).is_ok());
    let fault = view(DriveState::Fault, 100.0);
    assert_eq!(
        reason(&cmd(Action::Enable), &p, &fault),
        CommandReason::WrongState
    );
    assert!(run(&cmd(Action::FaultReset), &p, &fault).is_ok());
    assert!(run(&cmd(Action::QuickStop), &p, &fault).is_ok());
}

#[test]
fn max_step_without_a_known_position_is_stale_feedback() {
    let p = Policy {
        require_fresh: false,
        ..policy()
    };
    let mut v = view(DriveState::OperationEnabled, 0.0);
    v.feedback.as_mut().unwrap().position = None;
    assert_eq!(
        reason(&cmd(moving(10.0)), &p, &v),
        CommandReason::StaleFeedback
    );
}

fn any_action() -> impl Strategy<Value = Action> {
    let num = prop_oneof![-1000.0..1000.0f64, Just(0.0), Just(500.0), Just(-100.0)];
    prop_oneof![
        Just(Action::Enable),
        Just(Action::Disable),
        Just(Action::QuickStop),
        Just(Action::Halt),
        Just(Action::FaultReset),
        (
            num.clone(),
            proptest::option::of(num.clone()),
            any::<bool>()
        )
            .prop_map(|(position, velocity, relative)| Action::Move {
                position,
                velocity,
                relative,
                wait: Wait::Ack
            }),
        num.clone()
            .prop_map(|velocity| Action::Velocity { velocity }),
        (
            prop_oneof![Just("speed_limit"), Just("statusword"), Just("nope")],
            num
        )
            .prop_map(|(f, x)| Action::Write {
                values: vec![(f.to_owned(), x)]
            }),
    ]
}

fn any_state() -> impl Strategy<Value = Option<DriveState>> {
    proptest::option::of(prop_oneof![
        Just(DriveState::SwitchOnDisabled),
        Just(DriveState::SwitchedOn),
        Just(DriveState::OperationEnabled),
        Just(DriveState::Fault),
        Just(DriveState::QuickStopActive),
    ])
}

fn any_view() -> impl Strategy<Value = DeviceView> {
    (
        proptest::option::of(any::<bool>()),
        proptest::option::of((
            0u64..300,
            any::<bool>(),
            any_state(),
            proptest::option::of(-200.0..600.0f64),
        )),
    )
        .prop_map(|(online, fb)| DeviceView {
            online,
            feedback: fb.map(|(age, good, state, position)| Feedback {
                at: t0() - Duration::from_millis(age),
                good,
                state,
                position,
            }),
        })
}

fn any_timing() -> impl Strategy<Value = Timing> {
    // Offsets from receipt in ms: negative = in the past.
    let off = -2000i64..2000;
    (
        proptest::option::of(off.clone()),
        proptest::option::of((off, 0u64..1000)),
    )
        .prop_map(|(d, s)| {
            let at = |ms: i64| {
                if ms >= 0 {
                    t0() + Duration::from_millis(ms as u64)
                } else {
                    t0() - Duration::from_millis(ms.unsigned_abs())
                }
            };
            Timing {
                deadline: d.map(at),
                sent: s.map(|(o, _)| at(o)),
                ttl: s.map(|(_, t)| Duration::from_millis(t)),
            }
        })
}

proptest! {
    #[test]
    fn nothing_accepted_has_a_deadline_in_the_past(
        action in any_action(), v in any_view(), timing in any_timing(), max_age in proptest::option::of(0u64..1000),
    ) {
        let mut c = cmd(action);
        c.timing = timing;
        let p = Policy { max_age: max_age.map(Duration::from_millis), ..policy() };
        if let Ok(deadline) = run(&c, &p, &v) {
            prop_assert!(deadline > t0());
        }
    }

    #[test]
    fn a_stop_allowed_by_allow_is_never_refused_with_a_deadline_ahead(
        v in any_view(), pick in 0usize..3,
    ) {
        let a = [Action::QuickStop, Action::Halt, Action::Disable][pick].clone();
        prop_assert!(run(&cmd(a), &policy(), &v).is_ok());
    }

    #[test]
    fn an_accepted_move_is_within_bounds_and_step_of_a_fresh_operating_drive(
        action in any_action(), v in any_view(),
    ) {
        let c = cmd(action.clone());
        if run(&c, &policy(), &v).is_ok() {
            if let Action::Move { position, relative, velocity, .. } = action {
                let fb = v.feedback.expect("fresh feedback");
                prop_assert_eq!(v.online, Some(true));
                prop_assert!(fb.good);
                prop_assert_eq!(fb.state, Some(DriveState::OperationEnabled));
                let present = fb.position.expect("a position");
                let target = if relative { present + position } else { position };
                prop_assert!((-100.0..=500.0).contains(&target));
                prop_assert!((target - present).abs() <= 50.0 + 1e-9);
                if let Some(v) = velocity {
                    prop_assert!((0.0..=200.0).contains(&v));
                }
            }
            if let Action::Write { values } = &action {
                prop_assert_eq!(values[0].0.as_str(), "speed_limit");
                prop_assert!((0.0..=250.0).contains(&values[0].1));
            }
        }
    }
}
