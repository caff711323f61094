//! Jobs driven by hand: what goes on the wire, in which order, and what each answer means.

use super::*;
use crate::profile::DataType;
use servogate_command::CommandId;
use servogate_core::CommandStatus;

const MS: Duration = Duration::from_millis(1);

fn fields() -> Vec<Field> {
    let mut target = Field::new("target_position", 0x10, DataType::I32);
    target.scale = 0.001;
    let mut pv = Field::new("profile_velocity", 0x14, DataType::U32);
    pv.scale = 0.001;
    let mut tv = Field::new("target_velocity", 0x16, DataType::I32);
    tv.scale = 0.001;
    vec![
        Field::new("statusword", 0x07, DataType::U16),
        target,
        Field::new("controlword", 0x12, DataType::U16),
        Field::new("modes_of_operation", 0x13, DataType::I16),
        pv,
        tv,
        Field::new("speed_limit", 0x18, DataType::U16),
    ]
}

fn order(action: Action, deadline: Instant) -> Order {
    Order {
        device: Arc::from("axis-1"),
        id: CommandId::parse("c-1").unwrap(),
        action,
        deadline,
        group: None,
    }
}

fn job(action: Action, now: Instant) -> Job {
    Job::plan(order(action, now + 100 * MS), 1, &fields(), now).expect("planned")
}

/// Runs `job` against a drive answering with `statuswords` in turn for reads and an echo
/// for writes; returns the writes (address, values) and the outcome.
fn run(mut job: Job, now: Instant, mut statuswords: Vec<u16>) -> (Vec<(u16, Vec<u16>)>, Outcome) {
    let mut writes = Vec::new();
    let mut t = now;
    for _ in 0..1000 {
        let tx = match job.poll_transaction(t) {
            Ok(tx) => tx,
            Err(outcome) => return (writes, outcome),
        };
        let result = match tx {
            Transaction::Write { start, values, .. } => {
                writes.push((start, values.to_vec()));
                TxResult::Ok(values.to_vec())
            }
            Transaction::Read(r) => {
                assert_eq!((r.start, r.count), (0x07, 1));
                let sw = if statuswords.len() > 1 {
                    statuswords.remove(0)
                } else {
                    statuswords[0]
                };
                TxResult::Ok(vec![sw])
            }
        };
        if let Some(outcome) = job.on_result(t, result) {
            return (writes, outcome);
        }
        t = t.max(job.next_due());
    }
    panic!("the job never ended");
}

#[test]
fn enable_walks_the_state_machine_and_confirms_each_step_on_the_statusword() {
    let now = Instant::now();
    // switch on disabled, ready, switched on, operation enabled.
    let (writes, outcome) = run(
        job(Action::Enable, now),
        now,
        vec![0x0250, 0x0231, 0x0233, 0x0237],
    );
    assert_eq!(outcome.status, CommandStatus::Done, "{outcome:?}");
    assert_eq!(
        writes,
        vec![(0x12, vec![0x06]), (0x12, vec![0x07]), (0x12, vec![0x0F])]
    );
}

#[test]
fn enable_of_a_faulted_drive_fails_with_wrong_state_and_writes_nothing() {
    let now = Instant::now();
    let (writes, outcome) = run(job(Action::Enable, now), now, vec![0x0218]);
    assert_eq!(
        (outcome.status, outcome.reason),
        (CommandStatus::Failed, Some(CommandReason::WrongState))
    );
    assert!(writes.is_empty());
}

#[test]
fn a_transition_that_does_not_happen_in_time_fails_after_one_write() {
    let now = Instant::now();
    // The drive stays switch on disabled whatever it is told.
    let (writes, outcome) = run(job(Action::Enable, now), now, vec![0x0250]);
    assert_eq!(outcome.reason, Some(CommandReason::WrongState));
    assert_eq!(
        writes,
        vec![(0x12, vec![0x06])],
        "never written twice for one state"
    );
    assert!(
        outcome.message.contains("operation_enabled"),
        "{}",
        outcome.message
    );
}

#[test]
fn quick_stop_writes_at_once_then_confirms() {
    let now = Instant::now();
    let (writes, outcome) = run(job(Action::QuickStop, now), now, vec![0x0217]);
    assert_eq!(outcome.status, CommandStatus::Done);
    assert_eq!(writes, vec![(0x12, vec![0x02])]);
}

#[test]
fn a_move_loads_mode_target_and_velocity_then_hands_the_set_point_over() {
    let now = Instant::now();
    let mv = Action::Move {
        position: 120.5,
        velocity: Some(50.0),
        relative: false,
        wait: Wait::TargetReached,
    };
    // Ack not yet, ack, then not reached, reached.
    let sws = vec![0x0237, 0x1237, 0x0237, 0x0637];
    let (writes, outcome) = run(job(mv, now), now, sws);
    assert_eq!(outcome.status, CommandStatus::Done, "{outcome:?}");
    assert_eq!(
        writes,
        vec![
            (0x13, vec![1]),
            (0x10, vec![0x0001, 0xD6B4]),
            (0x14, vec![0x0000, 0xC350]),
            (0x12, vec![0x0F]),
            (0x12, vec![0x1F]),
            (0x12, vec![0x0F]),
        ]
    );
}

#[test]
fn a_relative_move_sets_bit_6_in_every_controlword() {
    let now = Instant::now();
    let mv = Action::Move {
        position: -5.0,
        velocity: None,
        relative: true,
        wait: Wait::Ack,
    };
    let (writes, outcome) = run(job(mv, now), now, vec![0x1237]);
    assert_eq!(outcome.status, CommandStatus::Done);
    let cws: Vec<u16> = writes
        .iter()
        .filter(|w| w.0 == 0x12)
        .map(|w| w.1[0])
        .collect();
    assert_eq!(cws, vec![0x4F, 0x5F, 0x4F]);
}

#[test]
fn a_job_whose_deadline_passed_before_its_first_frame_expires_and_sends_nothing() {
    let now = Instant::now();
    let mut j = Job::plan(order(Action::Enable, now), 1, &fields(), now).unwrap();
    let err = j.poll_transaction(now + MS).unwrap_err();
    assert_eq!(err.status, CommandStatus::Expired);
}

#[test]
fn a_write_without_an_echo_is_unknown_and_not_retried() {
    let now = Instant::now();
    let w = Action::Write {
        values: vec![("speed_limit".into(), 150.0)],
    };
    let mut j = job(w, now);
    let tx = j.poll_transaction(now).unwrap();
    assert!(matches!(tx, Transaction::Write { start: 0x18, .. }));
    let outcome = j.on_result(now, TxResult::Timeout).expect("ends");
    assert_eq!(
        (outcome.status, outcome.reason),
        (CommandStatus::Unknown, Some(CommandReason::Timeout))
    );
}

#[test]
fn an_exception_to_a_write_is_failed_with_its_code() {
    let now = Instant::now();
    let mut j = job(
        Action::Write {
            values: vec![("speed_limit".into(), 150.0)],
        },
        now,
    );
    j.poll_transaction(now).unwrap();
    let outcome = j.on_result(now, TxResult::Exception(4)).unwrap();
    assert_eq!(outcome.reason, Some(CommandReason::Exception));
    assert!(outcome.message.contains("0x04"), "{}", outcome.message);
}

#[test]
fn a_closed_port_rejects_a_job_that_sent_nothing() {
    let now = Instant::now();
    let mut j = job(Action::QuickStop, now);
    j.poll_transaction(now).unwrap();
    let outcome = j.on_result(now, TxResult::Io).unwrap();
    assert_eq!(outcome.reason, Some(CommandReason::BusDown));
    assert_eq!(outcome.status, CommandStatus::Rejected);
}

#[test]
fn a_value_the_register_cannot_hold_is_refused_at_planning() {
    let now = Instant::now();
    let w = Action::Write {
        values: vec![("speed_limit".into(), 70_000.0)],
    };
    let err = Job::plan(order(w, now + MS), 1, &fields(), now).unwrap_err();
    assert_eq!(err.reason, Some(CommandReason::OutOfRange));
    let no_cw = vec![Field::new("statusword", 7, DataType::U16)];
    let err = Job::plan(order(Action::Enable, now + MS), 1, &no_cw, now).unwrap_err();
    assert_eq!(err.reason, Some(CommandReason::NotAllowed));
}

#[test]
fn halt_of_a_drive_at_rest_writes_nothing() {
    let now = Instant::now();
    let (writes, outcome) = run(job(Action::Halt, now), now, vec![0x0233]);
    assert_eq!(outcome.status, CommandStatus::Done);
    assert!(writes.is_empty());
    let (writes, _) = run(job(Action::Halt, now), now, vec![0x0237]);
    assert_eq!(writes, vec![(0x12, vec![0x010F])]);
}

#[test]
fn a_quick_stop_cancels_the_devices_queued_move_and_runs_first() {
    let now = Instant::now();
    let mut ex = Executor::default();
    let mv = Action::Move {
        position: 1.0,
        velocity: None,
        relative: false,
        wait: Wait::Ack,
    };
    assert!(ex.push(job(mv.clone(), now)).is_empty());
    let mut other = Job::plan(order(mv, now + 100 * MS), 2, &fields(), now).unwrap();
    other.order.device = Arc::from("axis-2");
    assert!(ex.push(other).is_empty());
    let ended = ex.push(job(Action::QuickStop, now));
    assert_eq!(ended.len(), 1, "axis-1's move is cancelled");
    assert_eq!(ended[0].1.status, CommandStatus::Rejected);
    let mut done = Vec::new();
    let (i, tx) = ex.poll(now, &mut done).unwrap();
    assert_eq!(
        tx,
        Transaction::Write {
            unit: 1,
            start: 0x12,
            values: heapless::Vec::from_slice(&[2]).unwrap()
        }
    );
    assert!(ex.jobs[i].is_safety());
}

#[test]
fn a_job_whose_frames_were_all_confirmed_is_done_when_a_stop_ends_it() {
    let now = Instant::now();
    let mut ex = Executor::default();
    let w = Action::Write {
        values: vec![("speed_limit".into(), 150.0)],
    };
    ex.push(job(w, now));
    let mut ended = Vec::new();
    let (i, _) = ex.poll(now, &mut ended).unwrap();
    // The echo came; the job has nothing left but has not been polled to its end yet.
    assert!(ex.on_result(i, now, TxResult::Ok(vec![150])).is_none());
    let ended = ex.push(job(Action::QuickStop, now));
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].1.status, CommandStatus::Done);
}
