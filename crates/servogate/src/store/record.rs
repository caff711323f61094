//! What one event looks like in the event log: the message exactly as it is published
//! (topic and payload, the payload carrying the boot's `boot_id`), with its kind, device
//! and seq beside it so the log can be filtered and published without parsing JSON.
//!
//! ```text
//! version u8 = 1 | kind u8 | topic_len u16 LE | topic | device_len u16 LE | device |
//! seq u64 LE | payload (the rest)
//! ```

use std::sync::Arc;

use servogate_mqtt::{Kind, Prepared};

const VERSION: u8 = 1;

/// Puts `"boot_id"` first in `payload` (a JSON object), in place: in durable mode every
/// event names its boot, so a recovered or replayed event is byte for byte what a live
/// subscriber received. Anything but an object is left as it is.
pub fn add_boot_id(payload: &mut Vec<u8>, boot_id: &str) {
    if payload.first() != Some(&b'{') {
        return;
    }
    let sep = if payload.get(1) == Some(&b'}') {
        ""
    } else {
        ","
    };
    let member = format!("\"boot_id\":\"{boot_id}\"{sep}");
    payload.splice(1..1, member.into_bytes());
}

/// Appends the record body of `p` to `out`.
pub fn encode(p: &Prepared, out: &mut Vec<u8>) {
    // Topics and device names are far below 64 KiB (MQTT topics are at most 65535 bytes
    // and the forwarder refuses longer packets); clip rather than corrupt if not.
    let topic = &p.topic.as_bytes()[..p.topic.len().min(u16::MAX as usize)];
    let device = &p.device.as_bytes()[..p.device.len().min(u16::MAX as usize)];
    out.push(VERSION);
    out.push(p.kind.as_u8());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&(device.len() as u16).to_le_bytes());
    out.extend_from_slice(device);
    out.extend_from_slice(&p.seq.to_le_bytes());
    out.extend_from_slice(&p.payload);
}

/// The message of a record body; `None` for a body this version cannot read.
pub fn decode(body: &[u8]) -> Option<Prepared> {
    let (&version, rest) = body.split_first()?;
    if version != VERSION {
        return None;
    }
    let (&kind, rest) = rest.split_first()?;
    let kind = Kind::from_u8(kind)?;
    let (topic, rest) = take_str(rest)?;
    let (device, rest) = take_str(rest)?;
    let seq = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    Some(Prepared {
        topic: topic.to_owned(),
        payload: rest[8..].to_vec(),
        kind,
        device: Arc::from(device),
        seq,
        reply: None,
    })
}

fn take_str(b: &[u8]) -> Option<(&str, &[u8])> {
    let len = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let s = std::str::from_utf8(b.get(2..2 + len)?).ok()?;
    Some((s, &b[2 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_comes_back_from_its_record_exactly() {
        let p = Prepared {
            topic: "servogate/c/devices/axis-1/telemetry".into(),
            payload: br#"{"boot_id":"ab","seq":7}"#.to_vec(),
            kind: Kind::Availability,
            device: Arc::from("axis-1"),
            seq: 7,
            reply: None,
        };
        let mut body = Vec::new();
        encode(&p, &mut body);
        assert_eq!(decode(&body), Some(p));
        for cut in 0..body.len() - 25 {
            assert_eq!(decode(&body[..cut]), None, "cut at {cut}");
        }
        body[0] = 2;
        assert_eq!(decode(&body), None);
    }

    #[test]
    fn boot_id_goes_first_in_the_object() {
        let with = |p: &[u8]| {
            let mut v = p.to_vec();
            add_boot_id(&mut v, "ff");
            v
        };
        assert_eq!(with(br#"{"seq":1}"#), br#"{"boot_id":"ff","seq":1}"#);
        assert_eq!(with(b"{}"), br#"{"boot_id":"ff"}"#);
    }
}
