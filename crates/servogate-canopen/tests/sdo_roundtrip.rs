//! The SDO client against a small model SDO server (written from CiA 301 v4.2, 7.2.4.3,
//! independently of the client): every length from 0 to 40 bytes, upload and download.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use servogate_canopen::sdo::{SdoClient, SdoEvent};
use servogate_canopen::{Frame, NodeId};

/// One object dictionary, one transfer at a time.
#[derive(Default)]
struct ModelServer {
    od: HashMap<(u16, u8), Vec<u8>>,
    /// (index, sub, buffer, offset, toggle) of a segmented transfer.
    segmented: Option<(u16, u8, Vec<u8>, usize, u8)>,
}

impl ModelServer {
    fn answer(&mut self, req: &Frame) -> Frame {
        let d = req.data();
        assert_eq!(req.id(), 0x605);
        assert_eq!(d.len(), 8, "SDO requests are 8 bytes");
        let index = u16::from_le_bytes([d[1], d[2]]);
        let sub = d[3];
        let reply = |bytes: [u8; 8]| Frame::new(0x585, &bytes).unwrap();
        match d[0] >> 5 {
            // Initiate upload.
            2 => {
                let Some(value) = self.od.get(&(index, sub)).cloned() else {
                    return reply([0x80, d[1], d[2], sub, 0x00, 0x00, 0x02, 0x06]);
                };
                if (1..=4).contains(&value.len()) {
                    let n = (4 - value.len()) as u8;
                    let mut b = [0x43 | (n << 2), d[1], d[2], sub, 0, 0, 0, 0];
                    b[4..4 + value.len()].copy_from_slice(&value);
                    reply(b)
                } else {
                    let size = (value.len() as u32).to_le_bytes();
                    self.segmented = Some((index, sub, value, 0, 0));
                    reply([0x41, d[1], d[2], sub, size[0], size[1], size[2], size[3]])
                }
            }
            // Upload segment.
            3 => {
                let (_, _, buf, offset, toggle) = self.segmented.as_mut().unwrap();
                assert_eq!((d[0] >> 4) & 1, *toggle, "client toggle");
                let chunk = &buf[*offset..buf.len().min(*offset + 7)];
                let last = *offset + chunk.len() >= buf.len();
                let mut b = [0u8; 8];
                b[0] = (*toggle << 4) | ((7 - chunk.len() as u8) << 1) | u8::from(last);
                b[1..1 + chunk.len()].copy_from_slice(chunk);
                *offset += chunk.len();
                *toggle ^= 1;
                reply(b)
            }
            // Initiate download.
            1 => {
                let e = d[0] & 0x02 != 0;
                if e {
                    let n = usize::from((d[0] >> 2) & 3);
                    self.od.insert((index, sub), d[4..8 - n].to_vec());
                } else {
                    self.segmented = Some((index, sub, Vec::new(), 0, 0));
                }
                reply([0x60, d[1], d[2], sub, 0, 0, 0, 0])
            }
            // Download segment.
            0 => {
                let (idx, s, buf, _, toggle) = self.segmented.as_mut().unwrap();
                assert_eq!((d[0] >> 4) & 1, *toggle, "client toggle");
                let n = usize::from((d[0] >> 1) & 7);
                buf.extend_from_slice(&d[1..8 - n]);
                let t = *toggle;
                *toggle ^= 1;
                if d[0] & 1 != 0 {
                    let (idx, s, buf) = (*idx, *s, std::mem::take(buf));
                    self.od.insert((idx, s), buf);
                    self.segmented = None;
                }
                reply([0x20 | (t << 4), 0, 0, 0, 0, 0, 0, 0])
            }
            other => panic!("unexpected client command specifier {other}"),
        }
    }
}

fn run(client: &mut SdoClient, server: &mut ModelServer, first: Frame, now: Instant) -> SdoEvent {
    let mut frame = first;
    for _ in 0..100 {
        let resp = server.answer(&frame);
        match client
            .handle_frame(&resp, now)
            .expect("a response to our request")
        {
            SdoEvent::NextFrame(f) => frame = f,
            done => return done,
        }
    }
    panic!("transfer did not end");
}

#[test]
fn every_length_from_0_to_40_bytes_round_trips_through_download_and_upload() {
    let t0 = Instant::now();
    let timeout = Duration::from_millis(100);
    let mut client = SdoClient::new(NodeId::new(5).unwrap());
    let mut server = ModelServer::default();
    for len in 0..=40u8 {
        let data: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37) ^ len).collect();
        let first = client
            .start_download(0x2000, len, &data, timeout, t0)
            .unwrap();
        assert_eq!(
            run(&mut client, &mut server, first, t0),
            SdoEvent::Downloaded
        );
        assert_eq!(server.od.get(&(0x2000, len)), Some(&data), "stored {len}");
        let first = client.start_upload(0x2000, len, timeout, t0).unwrap();
        let got = run(&mut client, &mut server, first, t0);
        assert_eq!(got, SdoEvent::Uploaded(data), "uploaded {len}");
        assert!(client.is_idle());
    }
}

#[test]
fn reading_a_missing_object_ends_in_a_server_abort_and_the_client_goes_on() {
    let t0 = Instant::now();
    let timeout = Duration::from_millis(100);
    let mut client = SdoClient::new(NodeId::new(5).unwrap());
    let mut server = ModelServer::default();
    server.od.insert((0x6041, 0), vec![0x37, 0x02]);
    let first = client.start_upload(0x2FFF, 0, timeout, t0).unwrap();
    let SdoEvent::Aborted {
        code, by_server, ..
    } = run(&mut client, &mut server, first, t0)
    else {
        panic!("expected an abort");
    };
    assert!(by_server);
    assert_eq!(code.description(), "object does not exist");
    let first = client.start_upload(0x6041, 0, timeout, t0).unwrap();
    assert_eq!(
        run(&mut client, &mut server, first, t0),
        SdoEvent::Uploaded(vec![0x37, 0x02])
    );
}
