//! TPDO mapping and decoding into CiA 402 telemetry (CiA 301 v4.2, 7.2.2; CiA 402-2).
//!
//! A TPDO carries the mapped objects back to back, least significant bit first, in the
//! order of its mapping (objects 0x1A00..0x1A03, sub 1..=n, each a u32 `0xIIIISSLL`:
//! index, sub-index, length in bits). The mapping comes from config, or is read from the
//! drive over SDO at start-up and parsed with [`MappingEntry::from_u32`].
//!
//! [`TpdoDecoder`] turns a TPDO frame into a [`Telemetry`] with the CiA 402 objects in
//! their canonical fields, scaled: position 0x6064 (i32), velocity 0x606C (i32), torque
//! 0x6077 (i16), statusword 0x6041 (u16, with the decoded `state`), error code 0x603F
//! (u16, `fault_code`), mode display 0x6061 (i8, in `values` as `mode_display`). Other
//! mapped objects go to `values` under the name `"IIII:SS"` (hex), unsigned and unscaled.

use std::sync::Arc;

use servogate_core::Telemetry;

use crate::frame::{cob, Frame, NodeId};
use crate::objects::{hex_name, ObjectTable};

/// 0x1A00: first TPDO mapping parameter object (TPDO n at 0x1A00 + n - 1).
pub const TPDO_MAPPING_BASE: u16 = 0x1A00;
/// 0x1800: first TPDO communication parameter object.
pub const TPDO_COMM_BASE: u16 = 0x1800;

/// CiA 402 objects with a canonical place in telemetry.
pub mod objects {
    /// 0x603F error code (u16).
    pub const ERROR_CODE: u16 = 0x603F;
    /// 0x6040 controlword (u16).
    pub const CONTROLWORD: u16 = 0x6040;
    /// 0x6041 statusword (u16).
    pub const STATUSWORD: u16 = 0x6041;
    /// 0x6061 modes of operation display (i8).
    pub const MODE_DISPLAY: u16 = 0x6061;
    /// 0x6064 position actual value (i32).
    pub const POSITION: u16 = 0x6064;
    /// 0x606C velocity actual value (i32).
    pub const VELOCITY: u16 = 0x606C;
    /// 0x6077 torque actual value (i16).
    pub const TORQUE: u16 = 0x6077;
    /// 0x6078 current actual value (i16).
    pub const CURRENT: u16 = 0x6078;
}

/// One mapped object: `index:sub`, `bits` long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingEntry {
    pub index: u16,
    pub sub: u8,
    /// Length in bits, 1..=64.
    pub bits: u8,
}

impl MappingEntry {
    /// Parses a mapping object entry `0xIIIISSLL`. `None` for a zero or over-64 length.
    pub fn from_u32(raw: u32) -> Option<Self> {
        let bits = (raw & 0xFF) as u8;
        if bits == 0 || bits > 64 {
            return None;
        }
        Some(Self {
            index: (raw >> 16) as u16,
            sub: (raw >> 8) as u8,
            bits,
        })
    }

    pub fn to_u32(self) -> u32 {
        (u32::from(self.index) << 16) | (u32::from(self.sub) << 8) | u32::from(self.bits)
    }
}

/// Why a mapping is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PdoError {
    #[error("TPDO mapping entry {raw:#010x} has an invalid length")]
    BadEntry { raw: u32 },
    #[error("TPDO mapping of {bits} bits does not fit in 64 bits")]
    TooLong { bits: u32 },
    #[error("TPDO number {0} is outside 1..=4")]
    BadNumber(u8),
    #[error("TPDO mapping count {0} is above 64")]
    BadCount(u8),
}

/// The mapping of one TPDO of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpdoMapping {
    cob_id: u16,
    entries: Vec<MappingEntry>,
    bits: u32,
}

impl TpdoMapping {
    /// A mapping on an explicit COB-ID (11 bits; higher bits are dropped).
    pub fn new(cob_id: u16, entries: Vec<MappingEntry>) -> Result<Self, PdoError> {
        let bits: u32 = entries.iter().map(|e| u32::from(e.bits)).sum();
        if bits > 64 {
            return Err(PdoError::TooLong { bits });
        }
        Ok(Self {
            cob_id: cob_id & crate::frame::MAX_ID,
            entries,
            bits,
        })
    }

    /// TPDO `number` (1..=4) of `node` on its predefined COB-ID (0x180 / 0x280 / 0x380 /
    /// 0x480 + node).
    pub fn predefined(
        node: NodeId,
        number: u8,
        entries: Vec<MappingEntry>,
    ) -> Result<Self, PdoError> {
        if !(1..=4).contains(&number) {
            return Err(PdoError::BadNumber(number));
        }
        Self::new(
            node.cob_id(cob::TPDO1 + 0x100 * u16::from(number - 1)),
            entries,
        )
    }

    /// A mapping from the raw u32 entries of a 0x1A0n object (sub 1..=n, as read over SDO).
    pub fn from_raw(cob_id: u16, raw: &[u32]) -> Result<Self, PdoError> {
        let entries = raw
            .iter()
            .map(|&r| MappingEntry::from_u32(r).ok_or(PdoError::BadEntry { raw: r }))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(cob_id, entries)
    }

    pub fn cob_id(&self) -> u16 {
        self.cob_id
    }

    pub fn entries(&self) -> &[MappingEntry] {
        &self.entries
    }

    /// Decodes `data` into raw values, one per entry in mapping order. `None` when the
    /// frame is shorter than the mapping.
    pub fn decode_raw(&self, data: &[u8]) -> Option<Vec<(MappingEntry, u64)>> {
        if data.len() * 8 < self.bits as usize {
            return None;
        }
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let word = u64::from_le_bytes(bytes);
        let mut offset = 0u32;
        let mut out = Vec::with_capacity(self.entries.len());
        for &e in &self.entries {
            let bits = u32::from(e.bits);
            // offset + bits <= 64 holds by construction (total checked in `new`).
            let raw = word.checked_shr(offset).unwrap_or(0) & mask(bits);
            out.push((e, raw));
            offset += bits;
        }
        Some(out)
    }
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Decodes the TPDOs of one node into telemetry, one event per transmission cycle.
///
/// A drive sends its TPDOs of one cycle (one SYNC, or one event-timer period) back to back,
/// built from one sample. The decoder collects them and hands out one [`Telemetry`] when
/// every mapped TPDO has arrived, so a consumer sees each cycle whole. If a TPDO arrives
/// again before the cycle is complete (one was lost, or the drive does not send it), what
/// was collected goes out as it is and a new cycle starts: nothing waits forever.
#[derive(Debug, Clone)]
pub struct TpdoDecoder {
    mappings: Vec<TpdoMapping>,
    objects: Arc<ObjectTable>,
    /// The `values` name of every mapped entry the object table does not know, per
    /// mapping and entry (`None` for known objects): made once here rather than formatted
    /// for every frame.
    unnamed: Vec<Vec<Option<Arc<str>>>>,
    /// The cycle being collected, and which mappings (bit i = `mappings[i]`) it has.
    pending: Option<Telemetry>,
    seen: u64,
    malformed: u64,
}

impl TpdoDecoder {
    pub fn new(mappings: Vec<TpdoMapping>, objects: Arc<ObjectTable>) -> Self {
        // More than 64 mappings on one node cannot be configured (512 TPDOs exist, a
        // drive has 4 or 8); the bit set would silently alias, so keep the first 64.
        let mut mappings = mappings;
        mappings.truncate(64);
        let unnamed = mappings
            .iter()
            .map(|m| {
                m.entries()
                    .iter()
                    .map(|e| match objects.get(e.index, e.sub) {
                        Some(_) => None,
                        None => Some(hex_name(e.index, e.sub)),
                    })
                    .collect()
            })
            .collect();
        Self {
            mappings,
            objects,
            unnamed,
            pending: None,
            seen: 0,
            malformed: 0,
        }
    }

    /// TPDO frames shorter than their mapping.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    pub fn mappings(&self) -> &[TpdoMapping] {
        &self.mappings
    }

    /// Feeds a frame. Returns telemetry when the frame completes a cycle (or, for a frame
    /// that starts a new cycle early, the incomplete previous one). `None` for frames on
    /// other COB-IDs and frames shorter than their mapping (counted in `malformed`).
    pub fn handle_frame(&mut self, frame: &Frame) -> Option<Telemetry> {
        let i = self.mappings.iter().position(|m| m.cob_id == frame.id())?;
        let Some(values) = self.mappings[i].decode_raw(frame.data()) else {
            self.malformed += 1;
            return None;
        };
        let bit = 1u64 << i;
        let early = if self.seen & bit != 0 {
            self.seen = 0;
            self.pending.take()
        } else {
            None
        };
        let t = self.pending.get_or_insert_with(Telemetry::default);
        for (k, (e, raw)) in values.into_iter().enumerate() {
            match self.objects.get(e.index, e.sub) {
                Some(spec) => t.set(&spec.name, spec.value(raw, e.bits)),
                None => {
                    let name = match self.unnamed[i].get(k) {
                        Some(Some(name)) => name.clone(),
                        // Cannot happen (one name per entry, made in `new`).
                        _ => hex_name(e.index, e.sub),
                    };
                    t.values.push((name, raw as f64));
                }
            }
        }
        self.seen |= bit;
        let all = if self.mappings.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << self.mappings.len()) - 1
        };
        if early.is_some() {
            return early;
        }
        if self.seen == all {
            self.seen = 0;
            return self.pending.take();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use servogate_core::DriveState;

    use super::*;

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn cia402() -> Arc<ObjectTable> {
        Arc::new(ObjectTable::cia402())
    }

    fn e(index: u16, bits: u8) -> MappingEntry {
        MappingEntry {
            index,
            sub: 0,
            bits,
        }
    }

    #[test]
    fn mapping_entries_parse_from_iiiissll() {
        // 0x60640020: position actual value, sub 0, 32 bits.
        let entry = MappingEntry::from_u32(0x6064_0020).unwrap();
        assert_eq!(entry, e(0x6064, 32));
        assert_eq!(entry.to_u32(), 0x6064_0020);
        assert_eq!(MappingEntry::from_u32(0x6064_0000), None);
        assert_eq!(MappingEntry::from_u32(0x6064_0041), None);
    }

    #[test]
    fn a_mapping_longer_than_64_bits_is_refused() {
        let err = TpdoMapping::from_raw(0x181, &[0x6064_0020, 0x606C_0020, 0x6041_0010]);
        assert_eq!(err, Err(PdoError::TooLong { bits: 80 }));
        assert_eq!(
            TpdoMapping::from_raw(0x181, &[0x6064_0000]),
            Err(PdoError::BadEntry { raw: 0x6064_0000 })
        );
    }

    #[test]
    fn a_tpdo_decodes_into_scaled_cia402_telemetry() {
        // Given TPDO1 of node 1: statusword, position (i32), torque (i16)
        let mapping =
            TpdoMapping::from_raw(0x181, &[0x6041_0010, 0x6064_0020, 0x6077_0010]).unwrap();
        let mut table = ObjectTable::cia402();
        for (name, scale) in [("position", 0.001), ("torque", 0.1)] {
            let mut spec = ObjectTable::builtin(name).unwrap();
            spec.scale = scale;
            table.insert(spec);
        }
        let mut d = TpdoDecoder::new(vec![mapping], Arc::new(table));
        // When a frame arrives: sw 0x0237, position -1000, torque -25
        let mut data = vec![0x37, 0x02];
        data.extend_from_slice(&(-1000i32).to_le_bytes());
        data.extend_from_slice(&(-25i16).to_le_bytes());
        let t = d.handle_frame(&Frame::new(0x181, &data).unwrap()).unwrap();
        // Then
        assert_eq!(t.statusword, Some(0x0237));
        assert_eq!(t.state, Some(DriveState::OperationEnabled));
        assert_eq!(t.position, Some(-1.0));
        assert_eq!(t.torque, Some(-2.5));
        assert_eq!(t.velocity, None);
    }

    #[test]
    fn velocity_error_code_and_mode_display_decode_from_a_second_tpdo() {
        let mapping =
            TpdoMapping::predefined(n(2), 2, vec![e(0x606C, 32), e(0x603F, 16), e(0x6061, 8)])
                .unwrap();
        assert_eq!(mapping.cob_id(), 0x282);
        let mut d = TpdoDecoder::new(vec![mapping], cia402());
        let mut data = (-300i32).to_le_bytes().to_vec();
        data.extend_from_slice(&0x2310u16.to_le_bytes());
        data.push((-3i8) as u8);
        let t = d.handle_frame(&Frame::new(0x282, &data).unwrap()).unwrap();
        assert_eq!(t.velocity, Some(-300.0));
        assert_eq!(t.fault_code, Some(0x2310));
        assert_eq!(t.values, vec![(Arc::from("mode_display"), -3.0)]);
    }

    #[test]
    fn a_tpdo_shorter_than_its_mapping_is_counted_not_decoded() {
        let mapping = TpdoMapping::from_raw(0x181, &[0x6064_0020]).unwrap();
        let mut d = TpdoDecoder::new(vec![mapping], cia402());
        assert_eq!(
            d.handle_frame(&Frame::new(0x181, &[1, 2, 3]).unwrap()),
            None
        );
        assert_eq!(d.malformed(), 1);
        assert_eq!(
            d.handle_frame(&Frame::new(0x182, &[1, 2, 3, 4]).unwrap()),
            None
        );
        assert_eq!(d.malformed(), 1);
    }

    #[test]
    fn objects_outside_cia402_go_to_values_by_index_and_sub() {
        let mapping = TpdoMapping::from_raw(0x181, &[0x2001_0108, 0x6041_0010]).unwrap();
        let mut d = TpdoDecoder::new(vec![mapping], cia402());
        let t = d
            .handle_frame(&Frame::new(0x181, &[0xFF, 0x50, 0x02]).unwrap())
            .unwrap();
        assert_eq!(t.values, vec![(Arc::from("2001:01"), 255.0)]);
        assert_eq!(t.state, Some(DriveState::SwitchOnDisabled));
    }

    #[test]
    fn two_tpdos_of_one_cycle_make_one_telemetry() {
        // Given TPDO1 (statusword, position) and TPDO2 (velocity) of node 1
        let tpdo1 = TpdoMapping::from_raw(0x181, &[0x6041_0010, 0x6064_0020]).unwrap();
        let tpdo2 = TpdoMapping::from_raw(0x281, &[0x606C_0020]).unwrap();
        let mut d = TpdoDecoder::new(vec![tpdo1, tpdo2], cia402());
        let f1 = Frame::new(0x181, &[0x37, 0x02, 10, 0, 0, 0]).unwrap();
        let f2 = Frame::new(0x281, &(-5i32).to_le_bytes()).unwrap();
        // When TPDO1 arrives, nothing yet; when TPDO2 arrives, the whole cycle
        assert_eq!(d.handle_frame(&f1), None);
        let t = d.handle_frame(&f2).unwrap();
        assert_eq!((t.position, t.velocity), (Some(10.0), Some(-5.0)));
        assert_eq!(t.statusword, Some(0x0237));
        // And the next cycle starts empty
        assert_eq!(d.handle_frame(&f1), None);
        assert_eq!(d.handle_frame(&f2).unwrap().position, Some(10.0));
    }

    #[test]
    fn a_lost_tpdo_hands_out_the_partial_cycle_when_the_next_begins() {
        let tpdo1 = TpdoMapping::from_raw(0x181, &[0x6064_0020]).unwrap();
        let tpdo2 = TpdoMapping::from_raw(0x281, &[0x606C_0020]).unwrap();
        let mut d = TpdoDecoder::new(vec![tpdo1, tpdo2], cia402());
        assert_eq!(
            d.handle_frame(&Frame::new(0x181, &[1, 0, 0, 0]).unwrap()),
            None
        );
        // TPDO2 of that cycle is lost; TPDO1 of the next cycle arrives
        let partial = d
            .handle_frame(&Frame::new(0x181, &[2, 0, 0, 0]).unwrap())
            .unwrap();
        assert_eq!((partial.position, partial.velocity), (Some(1.0), None));
        let next = d
            .handle_frame(&Frame::new(0x281, &[3, 0, 0, 0]).unwrap())
            .unwrap();
        assert_eq!((next.position, next.velocity), (Some(2.0), Some(3.0)));
    }

    #[test]
    fn sub_byte_fields_are_packed_lsb_first() {
        let mapping = TpdoMapping::new(0x181, vec![e(0x2000, 4), e(0x2001, 4)]).unwrap();
        let raw = mapping.decode_raw(&[0xA5]).unwrap();
        assert_eq!(raw[0].1, 0x5);
        assert_eq!(raw[1].1, 0xA);
    }

    #[test]
    fn tpdo_numbers_outside_1_to_4_are_refused() {
        assert_eq!(
            TpdoMapping::predefined(n(1), 5, vec![]),
            Err(PdoError::BadNumber(5))
        );
    }
}

/// Reads TPDO mappings from a drive's object dictionary at start-up.
///
/// For each TPDO number it reads the COB-ID (0x180n-1:01; bit 31 set = TPDO not valid,
/// skipped), the entry count (0x1A0n-1:00) and the entries (0x1A0n-1:01..). It does no
/// transfer itself: the caller uploads [`MappingReader::next_object`] with its
/// [`crate::sdo::SdoClient`] and passes the bytes to [`MappingReader::on_uploaded`], until
/// `next_object` is `None`; then [`MappingReader::finish`] gives the mappings.
#[derive(Debug, Clone)]
pub struct MappingReader {
    numbers: Vec<u8>,
    /// Position in `numbers`.
    current: usize,
    step: ReadStep,
    cob_id: u16,
    raw: Vec<u32>,
    done: Vec<TpdoMapping>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadStep {
    CobId,
    Count,
    Entry { sub: u8, count: u8 },
}

/// Bit 31 of a PDO COB-ID entry: the PDO does not exist / is not valid.
const PDO_INVALID: u32 = 1 << 31;
/// Bit 29 of a PDO COB-ID entry: 29-bit identifier (not supported here).
const PDO_EXTENDED: u32 = 1 << 29;

impl MappingReader {
    /// Reads TPDOs `numbers` (each 1..=4; others are refused).
    pub fn new(numbers: &[u8]) -> Result<Self, PdoError> {
        if let Some(&bad) = numbers.iter().find(|n| !(1..=4).contains(*n)) {
            return Err(PdoError::BadNumber(bad));
        }
        Ok(Self {
            numbers: numbers.to_vec(),
            current: 0,
            step: ReadStep::CobId,
            cob_id: 0,
            raw: Vec::new(),
            done: Vec::new(),
        })
    }

    /// The object (index, sub) to upload next, `None` when every TPDO has been read.
    pub fn next_object(&self) -> Option<(u16, u8)> {
        let number = u16::from(*self.numbers.get(self.current)?);
        Some(match self.step {
            ReadStep::CobId => (TPDO_COMM_BASE + number - 1, 1),
            ReadStep::Count => (TPDO_MAPPING_BASE + number - 1, 0),
            ReadStep::Entry { sub, .. } => (TPDO_MAPPING_BASE + number - 1, sub),
        })
    }

    /// The bytes uploaded from [`MappingReader::next_object`]. An invalid value stops
    /// nothing else: the caller decides whether to fall back to the configured mapping.
    pub fn on_uploaded(&mut self, data: &[u8]) -> Result<(), PdoError> {
        let mut le = [0u8; 4];
        let n = data.len().min(4);
        le[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(le);
        match self.step {
            ReadStep::CobId => {
                if value & (PDO_INVALID | PDO_EXTENDED) != 0 {
                    self.next_tpdo();
                } else {
                    self.cob_id = (value & u32::from(crate::frame::MAX_ID)) as u16;
                    self.step = ReadStep::Count;
                }
            }
            ReadStep::Count => {
                let count = le[0];
                if count == 0 {
                    self.next_tpdo();
                } else if count > 64 {
                    self.next_tpdo();
                    return Err(PdoError::BadCount(count));
                } else {
                    self.raw.clear();
                    self.step = ReadStep::Entry { sub: 1, count };
                }
            }
            ReadStep::Entry { sub, count } => {
                self.raw.push(value);
                if sub < count {
                    self.step = ReadStep::Entry {
                        sub: sub + 1,
                        count,
                    };
                } else {
                    let result = TpdoMapping::from_raw(self.cob_id, &self.raw);
                    self.next_tpdo();
                    self.done.push(result?);
                }
            }
        }
        Ok(())
    }

    /// The mappings read so far (every valid TPDO once `next_object` is `None`).
    pub fn finish(self) -> Vec<TpdoMapping> {
        self.done
    }

    /// Gives up on the TPDO being read (the drive does not have one of its objects) and
    /// goes on with the next; what was read of the others stays.
    pub fn skip_tpdo(&mut self) {
        self.next_tpdo();
    }

    fn next_tpdo(&mut self) {
        self.current += 1;
        self.step = ReadStep::CobId;
        self.raw.clear();
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;

    #[test]
    fn the_reader_walks_the_comm_and_mapping_objects_of_each_tpdo() {
        // Given a drive with TPDO1 on 0x181 mapping statusword + position, TPDO2 disabled
        let mut r = MappingReader::new(&[1, 2]).unwrap();
        let mut answers = vec![
            ((0x1800, 1), 0x0000_0181u32.to_le_bytes().to_vec()),
            ((0x1A00, 0), vec![2]),
            ((0x1A00, 1), 0x6041_0010u32.to_le_bytes().to_vec()),
            ((0x1A00, 2), 0x6064_0020u32.to_le_bytes().to_vec()),
            ((0x1801, 1), 0x8000_0281u32.to_le_bytes().to_vec()),
        ]
        .into_iter();
        // When every requested object is answered
        while let Some(object) = r.next_object() {
            let (expected, data) = answers.next().expect("no more objects expected");
            assert_eq!(object, expected);
            r.on_uploaded(&data).unwrap();
        }
        // Then TPDO1 is mapped and TPDO2 skipped
        let mappings = r.finish();
        assert_eq!(mappings.len(), 1);
        assert_eq!(mappings[0].cob_id(), 0x181);
        assert_eq!(
            mappings[0]
                .entries()
                .iter()
                .map(|e| e.index)
                .collect::<Vec<_>>(),
            vec![0x6041, 0x6064]
        );
    }

    #[test]
    fn a_bad_mapping_entry_is_an_error_and_the_reader_moves_on() {
        let mut r = MappingReader::new(&[1]).unwrap();
        r.on_uploaded(&0x181u32.to_le_bytes()).unwrap();
        r.on_uploaded(&[1]).unwrap();
        assert_eq!(
            r.on_uploaded(&0x6041_0000u32.to_le_bytes()),
            Err(PdoError::BadEntry { raw: 0x6041_0000 })
        );
        assert_eq!(r.next_object(), None);
        assert!(r.finish().is_empty());
    }

    #[test]
    fn short_uploads_are_zero_extended_without_a_panic() {
        let mut r = MappingReader::new(&[1]).unwrap();
        r.on_uploaded(&[]).unwrap();
        assert_eq!(r.next_object(), Some((0x1A00, 0)));
        assert!(MappingReader::new(&[0]).is_err());
    }
}
