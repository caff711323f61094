// A SocketCAN canary for the test VM, std only (no crates): opens two raw CAN sockets on an
// interface, sends N frames on one, reads them on the other, and prints what went through.
// Built by scripts/vm/smoke.sh with plain rustc; proves that a dynamically linked Rust
// program gets working CAN_RAW sockets in the guest.
//
//   can_smoke [IFACE] [N]        (defaults: vcan0 2000)
use std::ffi::CString;
use std::time::Instant;

const PF_CAN: i32 = 29;
const SOCK_RAW: i32 = 3;
const CAN_RAW: i32 = 1;

#[repr(C)]
struct SockaddrCan {
    can_family: u16,
    can_ifindex: i32,
    addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CanFrame {
    can_id: u32,
    len: u8,
    pad: u8,
    res0: u8,
    len8_dlc: u8,
    data: [u8; 8],
}

extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrCan, len: u32) -> i32;
    fn if_nametoindex(name: *const i8) -> u32;
    fn write(fd: i32, buf: *const u8, n: usize) -> isize;
    fn read(fd: i32, buf: *mut u8, n: usize) -> isize;
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const i64, len: u32) -> i32;
}

fn open(ifindex: u32) -> i32 {
    unsafe {
        let fd = socket(PF_CAN, SOCK_RAW, CAN_RAW);
        if fd < 0 {
            eprintln!("socket(PF_CAN): {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        let addr = SockaddrCan { can_family: PF_CAN as u16, can_ifindex: ifindex as i32, addr: [0; 16] };
        if bind(fd, &addr, std::mem::size_of::<SockaddrCan>() as u32) != 0 {
            eprintln!("bind: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        fd
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iface = args.get(1).cloned().unwrap_or_else(|| "vcan0".into());
    let n: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let name = CString::new(iface.clone()).unwrap();
    let ifindex = unsafe { if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        eprintln!("no interface {iface}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let rx = open(ifindex);
    // SO_RCVTIMEO 2 s: a frame lost by the kernel (full receive buffer) ends the wait.
    let tv: [i64; 2] = [2, 0];
    unsafe { setsockopt(rx, 1, 20, tv.as_ptr(), 16) };
    let tx = open(ifindex);
    let reader = std::thread::spawn(move || {
        let mut f = CanFrame { can_id: 0, len: 0, pad: 0, res0: 0, len8_dlc: 0, data: [0; 8] };
        let mut bad = 0u32;
        for i in 0..n {
            let r = unsafe { read(rx, &mut f as *mut CanFrame as *mut u8, 16) };
            if r != 16 {
                return bad + (n - i); // timed out: the rest never came
            }
            if f.can_id != 0x180 + (i % 0x7f) || f.data[..4] != i.to_le_bytes() {
                bad += 1;
            }
        }
        bad
    });
    let start = Instant::now();
    for i in 0..n {
        let mut data = [0u8; 8];
        data[..4].copy_from_slice(&i.to_le_bytes());
        let f = CanFrame { can_id: 0x180 + (i % 0x7f), len: 8, pad: 0, res0: 0, len8_dlc: 0, data };
        loop {
            let w = unsafe { write(tx, &f as *const CanFrame as *const u8, 16) };
            if w == 16 {
                break;
            }
            // ENOBUFS: the interface queue is full; give the reader a moment.
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
    let bad = reader.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "can_smoke: {n} frames over {iface} in {secs:.3} s ({:.0} frames/s), {bad} wrong or lost",
        n as f64 / secs
    );
    std::process::exit(if bad == 0 { 0 } else { 1 });
}
