//! The simulator behind a real TCP listener on 127.0.0.1: Modbus TCP ([`serve_tcp`]) with
//! tokio-modbus's TCP client and with raw sockets (pipelining, bad headers), RTU over TCP
//! ([`serve_rtu_tcp`]) with tokio-modbus's RTU client on a `TcpStream`, and the binary's
//! ready line and console.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use servosim::model::{self, addr, DriveState};
use servosim::tcp::{encode_reply, parse_request};
use servosim::{serve_rtu_tcp, serve_tcp, SimOptions, Simulator};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_modbus::prelude::*;

/// Bound on a reply that must come; generous because the test machine is shared.
/// How long we wait to conclude that no reply comes.
const SILENT: Duration = Duration::from_millis(150);

struct Rig {
    sim: Arc<Simulator>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// `servosim modbus-tcp` in process.
async fn modbus_tcp(units: &str) -> Rig {
    let (listener, addr) = listener().await;
    let sim = Arc::new(Simulator::new(
        units.parse().unwrap(),
        SimOptions::default(),
    ));
    let server = tokio::spawn(serve_tcp(listener, Arc::clone(&sim)));
    Rig { sim, addr, server }
}

/// `servosim modbus-rtu-tcp` in process.
async fn rtu_over_tcp(units: &str) -> Rig {
    let (listener, addr) = listener().await;
    let sim = Arc::new(Simulator::new(
        units.parse().unwrap(),
        SimOptions::default(),
    ));
    let server = tokio::spawn(serve_rtu_tcp(listener, Arc::clone(&sim)));
    Rig { sim, addr, server }
}

/// A read holding registers request in its MBAP header.
fn read_request(transaction: u16, unit: u8, address: u16, quantity: u16) -> Vec<u8> {
    let mut pdu = vec![0x03];
    pdu.extend_from_slice(&address.to_be_bytes());
    pdu.extend_from_slice(&quantity.to_be_bytes());
    // A request's header has the same layout as a reply's.
    encode_reply(transaction, unit, &pdu)
}

/// One MBAP frame off the socket: transaction id, unit id, PDU.
async fn read_reply(socket: &mut TcpStream) -> (u16, u8, Vec<u8>) {
    let mut header = [0u8; 7];
    timeout(REPLY, socket.read_exact(&mut header))
        .await
        .expect("reply within the timeout")
        .expect("a whole header");
    assert_eq!(header[2..4], [0, 0], "protocol id");
    let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut pdu = vec![0u8; length - 1];
    timeout(REPLY, socket.read_exact(&mut pdu))
        .await
        .expect("whole reply")
        .expect("a whole PDU");
    (u16::from_be_bytes([header[0], header[1]]), header[6], pdu)
}

/// Registers of a read reply PDU (function 03, byte count, values).
fn registers(pdu: &[u8]) -> Vec<u16> {
    assert_eq!(pdu[0], 0x03, "{pdu:02X?}");
    assert_eq!(usize::from(pdu[1]), pdu.len() - 2);
    pdu[2..]
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect()
}

#[tokio::test]
async fn a_modbus_tcp_client_reads_exactly_the_model_values_of_the_time_each_unit_reports() {
    // Given three units behind one listener
    let rig = modbus_tcp("1-3").await;
    let mut ctx = tcp::connect_slave(rig.addr, Slave(1)).await.unwrap();
    for unit in 1..=3 {
        // When the gateway reads the motion block of each
        ctx.set_slave(Slave(unit));
        let regs = read_holding(&mut ctx, 0, 12).await.unwrap();
        // Then the values are the model's at the reported model time, to the bit
        let t = model_time(&regs);
        let expected = model::registers(unit, t, &DriveState::running(t));
        assert_eq!(regs, expected[..12], "unit {unit} at t = {t} ms");
    }
    // And input registers, exceptions and writes work as on RTU
    let input = timeout(REPLY, ctx.read_input_registers(0, 8))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(input.len(), 8);
    assert_eq!(
        read_holding(&mut ctx, 0x0100, 1).await,
        Err(ExceptionCode::IllegalDataAddress)
    );
    let written = timeout(REPLY, ctx.write_single_register(addr::SPEED_LIMIT, 150))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(written, Ok(()));
    assert_eq!(
        read_holding(&mut ctx, addr::SPEED_LIMIT, 1).await.unwrap(),
        [150]
    );
    let stats = rig.sim.stats();
    assert_eq!(
        stats.units.values().map(|u| u.served).collect::<Vec<_>>(),
        [1, 1, 5]
    );
    assert_eq!((stats.units[&3].writes, stats.units[&3].applied), (1, 1));
}

#[tokio::test]
async fn a_prompt_units_reply_overtakes_a_late_units_on_one_connection() {
    // Given unit 3 late by 200 ms and unit 1 prompt
    let rig = modbus_tcp("1-3").await;
    let late = Duration::from_millis(200);
    rig.sim.set_late(3, Some(late)).unwrap();
    let mut socket = TcpStream::connect(rig.addr).await.unwrap();
    // When the gateway pipelines a read of unit 3, then one of unit 1, in one write
    let mut both = read_request(0x0A03, 3, 0, 12);
    both.extend_from_slice(&read_request(0x0B01, 1, 0, 12));
    let sent = Instant::now();
    socket.write_all(&both).await.unwrap();
    // Then unit 1's reply comes first, with its own transaction id
    let (transaction, unit, pdu) = read_reply(&mut socket).await;
    assert_eq!((transaction, unit), (0x0B01, 1));
    assert!(sent.elapsed() < late, "held back: {:?}", sent.elapsed());
    let regs = registers(&pdu);
    let t = model_time(&regs);
    assert_eq!(regs, model::registers(1, t, &DriveState::running(t))[..12]);
    // And unit 3's after its delay, with its own
    let (transaction, unit, pdu) = read_reply(&mut socket).await;
    assert_eq!((transaction, unit), (0x0A03, 3));
    assert!(sent.elapsed() >= late, "early: {:?}", sent.elapsed());
    let regs = registers(&pdu);
    let t = model_time(&regs);
    assert_eq!(regs, model::registers(3, t, &DriveState::running(t))[..12]);
}

#[tokio::test]
async fn one_units_replies_keep_their_request_order_when_its_delay_shrinks() {
    // Given unit 2 late by 200 ms
    let rig = modbus_tcp("2").await;
    rig.sim
        .set_late(2, Some(Duration::from_millis(200)))
        .unwrap();
    let mut socket = TcpStream::connect(rig.addr).await.unwrap();
    socket
        .write_all(&read_request(1, 2, addr::STATUSWORD, 1))
        .await
        .unwrap();
    // When it is on time again before the gateway's second request to it (the journal
    // shows when the first has arrived)
    let arrived = Instant::now() + REPLY;
    while rig.sim.journal().is_empty() {
        assert!(Instant::now() < arrived, "first request never arrived");
        tokio::task::yield_now().await;
    }
    rig.sim.set_late(2, None).unwrap();
    socket
        .write_all(&read_request(2, 2, addr::STATUSWORD, 1))
        .await
        .unwrap();
    // Then the replies still come in request order
    assert_eq!(read_reply(&mut socket).await.0, 1);
    assert_eq!(read_reply(&mut socket).await.0, 2);
}

#[tokio::test]
async fn a_dead_unit_and_a_unit_not_simulated_get_no_reply_and_the_next_is_not_shifted() {
    let rig = modbus_tcp("1-2").await;
    rig.sim.set_dead(2, true).unwrap();
    let mut socket = TcpStream::connect(rig.addr).await.unwrap();
    let mut three = read_request(1, 2, 0, 1);
    three.extend_from_slice(&read_request(2, 9, 0, 1));
    three.extend_from_slice(&read_request(3, 1, addr::STATUSWORD, 1));
    socket.write_all(&three).await.unwrap();
    let (transaction, unit, pdu) = read_reply(&mut socket).await;
    assert_eq!((transaction, unit), (3, 1));
    assert_eq!(registers(&pdu), [model::STATUSWORD_OPERATION_ENABLED]);
    let mut more = [0u8; 1];
    assert!(
        timeout(SILENT, socket.read(&mut more)).await.is_err(),
        "a reply came for the dead unit or unit 9"
    );
    assert_eq!(rig.sim.stats().units[&2].ignored, 1);
}

#[tokio::test]
async fn a_bad_protocol_id_closes_the_connection_and_the_listener_serves_the_next() {
    let rig = modbus_tcp("1").await;
    let mut socket = TcpStream::connect(rig.addr).await.unwrap();
    // Protocol id 7, otherwise a valid read of unit 1.
    let mut garbage = read_request(5, 1, 0, 1);
    garbage[3] = 7;
    socket.write_all(&garbage).await.unwrap();
    let mut rest = Vec::new();
    let closed = timeout(REPLY, socket.read_to_end(&mut rest))
        .await
        .expect("closed within the timeout");
    // End of file, or a reset if the server closed with our bytes unread.
    assert!(rest.is_empty(), "answered: {rest:02X?} ({closed:?})");
    assert_eq!(rig.sim.stats().bad_mbap, 1);
    assert_eq!(rig.sim.stats().units[&1].served, 0);
    assert!(!rig.server.is_finished());
    // And a new connection is served
    let mut ctx = tcp::connect_slave(rig.addr, Slave(1)).await.unwrap();
    assert!(read_holding(&mut ctx, 0, 2).await.is_ok());
}

#[tokio::test]
async fn a_header_promising_more_than_a_pdu_holds_closes_at_once() {
    let rig = modbus_tcp("1").await;
    let mut socket = TcpStream::connect(rig.addr).await.unwrap();
    // Length 0x0100 = 256 > 254: the server must not wait for 255 more bytes.
    socket
        .write_all(&[0x00, 0x01, 0x00, 0x00, 0x01, 0x00, 0x01])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = timeout(REPLY, socket.read_to_end(&mut rest))
        .await
        .expect("closed within the timeout");
    assert!(rest.is_empty());
    assert_eq!(rig.sim.stats().bad_mbap, 1);
}

#[tokio::test]
async fn many_connections_are_served_at_once() {
    let rig = modbus_tcp("1-4").await;
    let mut clients = Vec::new();
    for unit in 1..=4 {
        clients.push(tcp::connect_slave(rig.addr, Slave(unit)).await.unwrap());
    }
    for (i, ctx) in clients.iter_mut().enumerate() {
        let regs = read_holding(ctx, 0, 12).await.unwrap();
        let (unit, t) = (i as u8 + 1, model_time(&regs));
        assert_eq!(
            regs,
            model::registers(unit, t, &DriveState::running(t))[..12]
        );
    }
}

#[tokio::test]
async fn an_rtu_client_over_tcp_reads_exactly_the_model_values() {
    let rig = rtu_over_tcp("1-2").await;
    let stream = TcpStream::connect(rig.addr).await.unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    for unit in 1..=2 {
        ctx.set_slave(Slave(unit));
        let regs = read_holding(&mut ctx, 0, 12).await.unwrap();
        let t = model_time(&regs);
        assert_eq!(
            regs,
            model::registers(unit, t, &DriveState::running(t))[..12]
        );
    }
    assert!(rig.sim.stats().units.values().all(|u| u.served == 1));
}

#[tokio::test]
async fn a_new_rtu_over_tcp_client_drops_the_older_connection() {
    // Given a gateway connected and served
    let rig = rtu_over_tcp("1").await;
    let mut old = TcpStream::connect(rig.addr).await.unwrap();
    let request = servosim::rtu::encode_frame(1, &[0x03, 0x00, 0x07, 0x00, 0x01]);
    old.write_all(&request).await.unwrap();
    let mut reply = [0u8; 7];
    timeout(REPLY, old.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(servosim::rtu::crc_ok(&reply));
    // When it reconnects (the old connection half-open, say)
    let stream = TcpStream::connect(rig.addr).await.unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    // Then the new connection is served and the old one closed
    assert!(read_holding(&mut ctx, addr::STATUSWORD, 1).await.is_ok());
    let mut rest = Vec::new();
    let _ = timeout(REPLY, old.read_to_end(&mut rest))
        .await
        .expect("old connection closed");
    assert!(rest.is_empty(), "{rest:02X?}");
}

/// The binary started with `args`, its stdin, its stdout's lines, and the address of its
/// ready line `servosim ready listen=IP:PORT units={units}`.
async fn start_binary(
    args: &[&str],
    units: &str,
) -> (Child, ChildStdin, Lines<BufReader<ChildStdout>>, SocketAddr) {
    let mut child = servosim()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("servosim starts");
    let stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = next_line(&mut out).await;
    let listen = ready
        .strip_prefix("servosim ready listen=")
        .and_then(|rest| rest.strip_suffix(&format!(" units={units}")))
        .unwrap_or_else(|| panic!("{ready}"));
    let addr: SocketAddr = listen.parse().unwrap();
    (child, stdin, out, addr)
}

#[tokio::test]
async fn the_binary_prints_the_port_it_bound_and_serves_modbus_tcp_with_its_console() {
    // Given `servosim modbus-tcp` on port 0 with unit 2 dead
    let args = [
        "modbus-tcp",
        "--listen",
        "127.0.0.1:0",
        "--units",
        "1-2",
        "--dead",
        "2",
        "--turnaround",
        "1ms",
    ];
    // Then its ready line names the port it listens on
    let (child, mut stdin, mut out, addr) = start_binary(&args, "1,2").await;
    assert_ne!(addr.port(), 0);
    // And a client reads through it
    let mut ctx = tcp::connect_slave(addr, Slave(1)).await.unwrap();
    let regs = read_holding(&mut ctx, 0, 12).await.unwrap();
    let t = model_time(&regs);
    assert_eq!(regs, model::registers(1, t, &DriveState::running(t))[..12]);
    // And the console takes the RTU commands but crc
    stdin.write_all(b"alive 2\ncrc 0.5\nstats\n").await.unwrap();
    assert_eq!(next_line(&mut out).await, "ok alive 2");
    let crc = next_line(&mut out).await;
    assert!(crc.starts_with("error "), "{crc}");
    let stats = next_line(&mut out).await;
    assert!(
        stats.starts_with("ok stats corrupted=0 dropped_bytes=0 bad_mbap=0 served=1:1,2:0 "),
        "{stats}"
    );
    ctx.set_slave(Slave(2));
    assert!(read_holding(&mut ctx, 0, 1).await.is_ok());
    // And SIGTERM stops it
    sigterm_ends(child).await;
}

#[tokio::test]
async fn the_rtu_over_tcp_binary_prints_the_port_it_bound_and_answers_rtu_frames() {
    let args = [
        "modbus-rtu-tcp",
        "--listen",
        "127.0.0.1:0",
        "--units",
        "1-3",
        "--timing-faithful",
        "--baud",
        "115200",
        "--fault",
        "3:0x2310",
    ];
    let (child, _stdin, _out, addr) = start_binary(&args, "1-3").await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(3));
    assert_eq!(
        read_holding(&mut ctx, addr::STATUSWORD, 2).await.unwrap(),
        [model::STATUSWORD_FAULT, 0x2310]
    );
    sigterm_ends(child).await;
}

#[test]
fn a_request_and_its_mbap_bytes_round_trip() {
    let bytes = read_request(0x1234, 7, 0x0010, 3);
    let (request, used) = parse_request(&bytes).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!((request.transaction, request.frame.unit), (0x1234, 7));
    assert_eq!(request.frame.pdu, [0x03, 0x00, 0x10, 0x00, 0x03]);
}
