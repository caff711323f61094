//! The simulator served on one end of an in-process pty pair
//! (`tokio_serial::SerialStream::pair()`), with tokio-modbus's RTU client, the gateway's
//! own library, on the other end.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use servosim::model::{self, addr, DriveState};
use servosim::rtu::{crc_ok, encode_frame};
use servosim::{serve_rtu, words, SimOptions, Simulator, Timing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;
use tokio_serial::SerialStream;

/// Bound on a reply that must come; generous because the test machine is shared.
/// How long we wait to conclude that no reply comes.
const SILENT: Duration = Duration::from_millis(150);

struct Rig {
    sim: Arc<Simulator>,
    server: JoinHandle<std::io::Result<()>>,
}

fn serve(units: &str, options: SimOptions) -> (Rig, SerialStream) {
    let (server_end, client_end) = SerialStream::pair().expect("pty pair");
    let sim = Arc::new(Simulator::new(units.parse().unwrap(), options));
    let server = tokio::spawn(serve_rtu(server_end, Arc::clone(&sim)));
    (Rig { sim, server }, client_end)
}

fn client(port: SerialStream, unit: u8) -> Context {
    rtu::attach_slave(port, Slave(unit))
}

#[tokio::test]
async fn every_unit_answers_exactly_the_model_values_of_the_time_it_reports() {
    // Given six units
    let (rig, port) = serve("1-6", SimOptions::default());
    let mut ctx = client(port, 1);
    for unit in 1..=6 {
        // When the gateway reads the motion block of each
        ctx.set_slave(Slave(unit));
        let regs = read_holding(&mut ctx, 0, 12).await.unwrap();
        // Then the values are the model's at the reported model time, to the bit
        let t = model_time(&regs);
        let expected = model::registers(unit, t, &DriveState::running(t));
        assert_eq!(regs, expected[..12], "unit {unit} at t = {t} ms");
    }
    let stats = rig.sim.stats();
    assert!(stats.units.values().all(|u| u.served == 1), "{stats:?}");
}

#[tokio::test]
async fn upper_block_and_input_registers_decode_within_the_time_bounds() {
    let (rig, port) = serve("2", SimOptions::default());
    let mut ctx = client(port, 2);
    let t0 = model_time(&read_holding(&mut ctx, 0, 12).await.unwrap());
    let upper = read_holding(&mut ctx, addr::OPERATING_HOURS, 7)
        .await
        .unwrap();
    let input = timeout(REPLY, ctx.read_input_registers(0, 8))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let t1 = rig.sim.t_ms();

    let ax = model::axis(2);
    let hours = words::f64_from_high_first([upper[0], upper[1], upper[2], upper[3]]);
    let hours_at = |t: u32| ax.base_hours as f64 + f64::from(t) / 3_600_000.0;
    assert!((hours_at(t0)..=hours_at(t1)).contains(&hours), "{hours}");
    let peak = words::f32_from_high_first([upper[4], upper[5]]);
    assert_eq!(peak, (ax.accel_torque_pct + ax.friction_pct) as f32);
    assert_eq!(upper[6] & model::DI_ENABLED, model::DI_ENABLED);

    let volts = f64::from(words::u32_from_low_first([input[0], input[1]])) / 1000.0;
    assert!((47.5..48.5).contains(&volts), "{volts} V");
    let energy = words::u64_from_high_first([input[2], input[3], input[4], input[5]]);
    let energy_at = |t: u32| model::input_registers(2, t, &DriveState::running(t));
    let e = |r: [u16; 8]| words::u64_from_high_first([r[2], r[3], r[4], r[5]]);
    assert!(
        (e(energy_at(t0))..=e(energy_at(t1))).contains(&energy),
        "{energy} J"
    );
}

#[tokio::test]
async fn the_hole_and_unknown_functions_answer_exceptions_and_125_registers_read() {
    let (_rig, port) = serve("1", SimOptions::default());
    let mut ctx = client(port, 1);
    assert_eq!(
        read_holding(&mut ctx, 0x0100, 1).await,
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        read_holding(&mut ctx, 0x00F0, 0x20).await,
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        read_holding(&mut ctx, 0x0117, 1).await,
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        read_holding(&mut ctx, 0x0000, 125).await.unwrap().len(),
        125
    );
    let input = timeout(REPLY, ctx.read_input_registers(0x0007, 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(input, Err(ExceptionCode::IllegalDataAddress));
    let coils = timeout(REPLY, ctx.read_coils(0, 8)).await.unwrap().unwrap();
    assert_eq!(coils, Err(ExceptionCode::IllegalFunction));
}

#[tokio::test]
async fn target_position_and_controlword_writes_are_stored_and_other_writes_refused() {
    let (rig, port) = serve("1", SimOptions::default());
    let mut ctx = client(port, 1);
    let target = words::i32_high_first(-12_345);
    let w = timeout(
        REPLY,
        ctx.write_multiple_registers(addr::TARGET_POSITION, &[target[0], target[1], 0x000F]),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(w, Ok(()));
    let back = read_holding(&mut ctx, addr::TARGET_POSITION, 3)
        .await
        .unwrap();
    assert_eq!(words::i32_from_high_first([back[0], back[1]]), -12_345);
    assert_eq!(
        rig.sim.drive_state(1, 0).unwrap().written.controlword,
        0x000F
    );
    let refused = timeout(REPLY, ctx.write_single_register(addr::POSITION, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refused, Err(ExceptionCode::IllegalDataAddress));
}

async fn write(ctx: &mut Context, address: u16, values: &[u16]) -> Result<(), ExceptionCode> {
    let written = match values {
        [value] => timeout(REPLY, ctx.write_single_register(address, *value)).await,
        _ => timeout(REPLY, ctx.write_multiple_registers(address, values)).await,
    };
    written
        .expect("reply within the timeout")
        .expect("a valid frame")
}

async fn statusword(ctx: &mut Context) -> u16 {
    read_holding(ctx, addr::STATUSWORD, 1).await.unwrap()[0]
}

#[tokio::test]
async fn a_unit_is_enabled_and_moved_to_a_target_over_the_wire() {
    // Given unit 2, never written, running its repeating move
    let (rig, port) = serve("1-2", SimOptions::default());
    let mut ctx = client(port, 2);
    assert_eq!(statusword(&mut ctx).await, 0x0237);
    // When the gateway selects profile position at 100 mm/s and walks the state machine
    let [hi, lo] = words::u32_high_first(100_000);
    write(&mut ctx, addr::MODES_OF_OPERATION, &[1, hi, lo])
        .await
        .unwrap();
    for (controlword, want) in [(0x0006, 0x0231), (0x0007, 0x0233), (0x000F, 0x0637)] {
        write(&mut ctx, addr::CONTROLWORD, &[controlword])
            .await
            .unwrap();
        // Then each transition shows in the next read
        assert_eq!(statusword(&mut ctx).await, want, "{controlword:#06x}");
    }
    // When it sends a target 5 mm from where the axis stands, and a new set-point
    let regs = read_holding(&mut ctx, 0, 2).await.unwrap();
    let start = words::i32_from_high_first([regs[0], regs[1]]);
    let target = start + 5_000;
    write(
        &mut ctx,
        addr::TARGET_POSITION,
        &words::i32_high_first(target),
    )
    .await
    .unwrap();
    write(&mut ctx, addr::CONTROLWORD, &[0x001F]).await.unwrap();
    // Then the set-point is acknowledged (bit 12; bit 10 is not checked: on a busy
    // machine the axis may already be there)
    let sw = statusword(&mut ctx).await;
    assert_eq!(sw & 0x1000, 0x1000, "{sw:#06x}");
    write(&mut ctx, addr::CONTROLWORD, &[0x000F]).await.unwrap();
    // And once it is there (50 ms at 100 mm/s), target reached, exactly on the target
    let deadline = Instant::now() + REPLY;
    let sw = loop {
        let sw = statusword(&mut ctx).await;
        if sw & 0x0400 != 0 || Instant::now() > deadline {
            break sw;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(
        sw, 0x0637,
        "operation enabled, target reached, no acknowledge"
    );
    let regs = read_holding(&mut ctx, 0, 10).await.unwrap();
    assert_eq!(words::i32_from_high_first([regs[0], regs[1]]), target);
    assert_eq!(regs[2..4], [0, 0], "standing");
    assert_eq!(regs[usize::from(addr::MODE_DISPLAY)], 1);
    // And every write reached the drive exactly once; unit 1 saw none
    let stats = rig.sim.stats();
    assert_eq!((stats.units[&2].writes, stats.units[&2].applied), (7, 7));
    assert_eq!((stats.units[&1].writes, stats.units[&1].applied), (0, 0));
    let truth = rig.sim.truth(2).unwrap();
    assert_eq!(truth.drive.commanded.unwrap().set_point, Some(target));
}

#[tokio::test]
async fn a_rejected_write_gets_its_exception_and_a_muted_one_no_reply() {
    let (rig, port) = serve("1-2", SimOptions::default());
    rig.sim.set_reject(1, std::num::NonZeroU8::new(4)).unwrap();
    rig.sim.set_mute_writes(2, true).unwrap();
    let mut ctx = client(port, 1);
    assert_eq!(
        write(&mut ctx, addr::CONTROLWORD, &[0x0006]).await,
        Err(ExceptionCode::ServerDeviceFailure)
    );
    assert_eq!(statusword(&mut ctx).await, 0x0237, "nothing applied");
    ctx.set_slave(Slave(2));
    assert!(
        timeout(SILENT, ctx.write_single_register(addr::CONTROLWORD, 0x0006))
            .await
            .is_err(),
        "a muted write was answered"
    );
    assert_eq!(statusword(&mut ctx).await, 0x0231, "applied all the same");
    let stats = rig.sim.stats();
    assert_eq!((stats.units[&1].writes, stats.units[&1].applied), (1, 0));
    assert_eq!((stats.units[&2].writes, stats.units[&2].applied), (1, 1));
}

#[tokio::test]
async fn a_unit_not_simulated_stays_silent_and_the_next_reply_is_not_shifted() {
    let (_rig, port) = serve("1-2", SimOptions::default());
    let mut ctx = client(port, 7);
    assert!(
        timeout(SILENT, ctx.read_holding_registers(0, 12))
            .await
            .is_err(),
        "unit 7 answered"
    );
    ctx.set_slave(Slave(1));
    let regs = read_holding(&mut ctx, 0, 12).await.unwrap();
    let t = model_time(&regs);
    assert_eq!(regs, model::registers(1, t, &DriveState::running(t))[..12]);
}

#[tokio::test]
async fn a_dead_unit_is_silent_until_it_is_alive_again() {
    let (rig, port) = serve("1-2", SimOptions::default());
    rig.sim.set_dead(2, true).unwrap();
    let mut ctx = client(port, 2);
    assert!(timeout(SILENT, ctx.read_holding_registers(0, 1))
        .await
        .is_err());
    rig.sim.set_dead(2, false).unwrap();
    assert!(read_holding(&mut ctx, 0, 1).await.is_ok());
    assert_eq!(rig.sim.stats().units[&2].ignored, 1);
}

#[tokio::test]
async fn a_late_unit_answers_after_its_delay() {
    let (rig, port) = serve("3", SimOptions::default());
    rig.sim
        .set_late(3, Some(Duration::from_millis(30)))
        .unwrap();
    let mut ctx = client(port, 3);
    let start = Instant::now();
    read_holding(&mut ctx, 0, 10).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(30),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_drive_fault_shows_in_statusword_and_error_code_and_freezes_position() {
    let (rig, port) = serve("4", SimOptions::default());
    let mut ctx = client(port, 4);
    rig.sim.inject_fault(4, 0x2310).unwrap();
    let a = read_holding(&mut ctx, 0, 12).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // let model time move on
    let b = read_holding(&mut ctx, 0, 12).await.unwrap();
    assert_eq!(a[usize::from(addr::STATUSWORD)], model::STATUSWORD_FAULT);
    assert_eq!(a[usize::from(addr::ERROR_CODE)], 0x2310);
    assert!(model_time(&b) > model_time(&a));
    assert_eq!(a[..4], b[..4], "position and velocity frozen");
    assert_eq!(b[2..4], [0, 0], "velocity is zero");
    rig.sim.clear_fault(4).unwrap();
    let c = read_holding(&mut ctx, 0, 12).await.unwrap();
    assert_eq!(
        c[usize::from(addr::STATUSWORD)],
        model::STATUSWORD_OPERATION_ENABLED
    );
    assert_eq!(c[usize::from(addr::ERROR_CODE)], 0);
}

#[tokio::test]
async fn a_crc_noise_reply_fails_its_crc_on_the_wire_and_is_counted() {
    // Raw bytes on the client side, so we see exactly what the simulator wrote.
    let (rig, mut port) = serve(
        "1",
        SimOptions {
            seed: Some(3),
            crc_noise: 1.0,
            ..SimOptions::default()
        },
    );
    let request = encode_frame(1, &[0x03, 0x00, 0x00, 0x00, 0x0A]);
    let mut reply = [0u8; 25];
    for noisy in [true, false] {
        port.write_all(&request).await.unwrap();
        timeout(REPLY, port.read_exact(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(crc_ok(&reply), !noisy, "{reply:02X?}");
        assert_eq!(reply[..3], [0x01, 0x03, 20], "header intact");
        rig.sim.set_crc_noise(0.0);
    }
    assert_eq!(rig.sim.stats().corrupted, 1);
}

#[tokio::test]
async fn garbage_on_the_line_costs_bytes_not_the_server() {
    let (rig, mut port) = serve("1", SimOptions::default());
    // A header that promises 200 more bytes, then random junk, then silence.
    port.write_all(&[0x01, 0x10, 0x00, 0x00, 0x00, 0x64, 200, 0xAA, 0x55])
        .await
        .unwrap();
    tokio::time::sleep(servosim::SILENCE * 3).await;
    let request = encode_frame(1, &[0x03, 0x00, 0x07, 0x00, 0x01]);
    port.write_all(&request).await.unwrap();
    let mut reply = [0u8; 7];
    timeout(REPLY, port.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(crc_ok(&reply));
    assert_eq!(
        reply[3..5],
        model::STATUSWORD_OPERATION_ENABLED.to_be_bytes()
    );
    assert!(!rig.server.is_finished());
    assert_eq!(rig.sim.stats().dropped_bytes, 9);
}

#[tokio::test]
async fn timing_faithful_mode_charges_the_wire_time_of_each_transaction() {
    let options = SimOptions {
        baud: 115_200,
        timing: Timing::Faithful {
            turnaround: Duration::ZERO,
        },
        ..SimOptions::default()
    };
    let (_rig, port) = serve("1", options);
    let mut ctx = client(port, 1);
    // Request 8 + reply 25 bytes at 11 bits / 115200 baud + t3.5 = 4.901 ms from the
    // request's arrival; the gateway's own t3.5 before the next request makes 6.65 ms.
    let floor = Duration::from_micros(4_901);
    let mut took = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        read_holding(&mut ctx, 0, 10).await.unwrap();
        took.push(start.elapsed());
    }
    took.sort();
    assert!(took[0] >= floor, "fastest {:?}", took[0]);
    // The median stays near the floor (the PreciseTimer, not tokio's 1 ms timer, waits);
    // loose bound because the machine is shared.
    assert!(
        took[10] < floor + Duration::from_millis(5),
        "median {:?}",
        took[10]
    );
}

#[tokio::test]
async fn serve_rtu_returns_when_the_other_end_closes() {
    let (rig, port) = serve("1", SimOptions::default());
    drop(port);
    let ended = timeout(REPLY, rig.server)
        .await
        .expect("server ended")
        .expect("no panic");
    // A pty reports the hang-up as EIO or end of file; either ends the loop.
    let _ = ended;
}
