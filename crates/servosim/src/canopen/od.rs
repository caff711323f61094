//! The object dictionary of one simulated node: which `index:sub` exist, their type,
//! access and size (CiA 301 v4.2 communication area 0x1000-0x1FFF, manufacturer objects
//! 0x2000-0x2011, CiA 402-2 drive objects 0x603F-0x60FF), the SDO abort codes, and the
//! process values every node shows at one model instant.
//!
//! The values of the objects live in the node ([`super::drive`]); this module only says
//! what exists, so the SDO server can refuse a request before it touches the node.

use std::fmt;

use crate::model::{self, DriveState, Sample};
use crate::words;

/// An SDO abort code (CiA 301 v4.2, 7.2.4.3.17, table 22), sent little-endian in bytes 4-7
/// of an abort frame.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AbortCode(pub u32);

impl AbortCode {
    /// 0x05030000 toggle bit not alternated.
    pub const TOGGLE_BIT: Self = Self(0x0503_0000);
    /// 0x05040001 client/server command specifier not valid or unknown.
    pub const UNKNOWN_COMMAND: Self = Self(0x0504_0001);
    /// 0x05040005 out of memory (a segmented download longer than any object).
    pub const OUT_OF_MEMORY: Self = Self(0x0504_0005);
    /// 0x06010001 attempt to read a write-only object.
    pub const WRITE_ONLY: Self = Self(0x0601_0001);
    /// 0x06010002 attempt to write a read-only object.
    pub const READ_ONLY: Self = Self(0x0601_0002);
    /// 0x06020000 object does not exist in the object dictionary.
    pub const NO_OBJECT: Self = Self(0x0602_0000);
    /// 0x06070010 data type does not match, length of service parameter does not match.
    pub const LENGTH_MISMATCH: Self = Self(0x0607_0010);
    /// 0x06090011 sub-index does not exist.
    pub const NO_SUB_INDEX: Self = Self(0x0609_0011);
    /// 0x06090030 invalid value for parameter (download only).
    pub const INVALID_VALUE: Self = Self(0x0609_0030);
}

impl fmt::Debug for AbortCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AbortCode({:#010x})", self.0)
    }
}

/// Who may read or write an object over SDO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
    /// No object of this dictionary is write-only; the SDO server still answers such an
    /// object as CiA 301 says (0x06010001 on upload).
    WriteOnly,
}

impl Access {
    pub fn is_readable(self) -> bool {
        self != Access::WriteOnly
    }

    pub fn is_writable(self) -> bool {
        self != Access::ReadOnly
    }
}

/// What an existing `index:sub` is. TPDO numbers `k` are 0-based (TPDO1 = 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    /// 1000:00 device type.
    DeviceType,
    /// 1001:00 error register.
    ErrorRegister,
    /// 1008:00 manufacturer device name.
    DeviceName,
    /// 1017:00 producer heartbeat time, ms.
    HeartbeatTime,
    /// 1018:00 number of identity entries.
    IdentityCount,
    /// 1018:01 vendor id.
    VendorId,
    /// 1018:02 product code.
    ProductCode,
    /// 1018:03 revision number.
    Revision,
    /// 1018:04 serial number.
    SerialNumber,
    /// 1800+k:00 highest sub-index of the TPDO communication record.
    TpdoCommCount(usize),
    /// 1800+k:01 COB-ID of TPDO k+1 (bit 31 = not valid).
    TpdoCobId(usize),
    /// 1800+k:02 transmission type.
    TpdoTransmissionType(usize),
    /// 1800+k:05 event timer, ms.
    TpdoEventTimer(usize),
    /// 1A00+k:00 number of mapped objects.
    TpdoMappingCount(usize),
    /// 1A00+k:nn mapping entry nn (1-based).
    TpdoMappingEntry(usize, usize),
    /// 1400:00 highest sub-index of the RPDO1 communication record.
    RpdoCommCount,
    /// 1400:01 COB-ID of RPDO1 (bit 31 = not valid).
    RpdoCobId,
    /// 1400:02 transmission type of RPDO1: 0-240 act on the next SYNC, 254/255 at once.
    RpdoTransmissionType,
    /// 1600:00 number of objects mapped into RPDO1.
    RpdoMappingCount,
    /// 1600:01 the controlword, RPDO1's only object.
    RpdoMappingEntry,
    /// 2000:00 model time of the sample, ms.
    ModelTime,
    /// 2010:00 temperature, 0.1 degC.
    Temperature,
    /// 2011:00 DC bus voltage, mV.
    DcBusVoltage,
    /// 603F:00 error code.
    ErrorCode,
    /// 6040:00 controlword.
    Controlword,
    /// 6041:00 statusword.
    Statusword,
    /// 6060:00 modes of operation.
    ModesOfOperation,
    /// 6061:00 modes of operation display.
    ModeDisplay,
    /// 6064:00 position actual value, 0.001 mm.
    PositionActual,
    /// 606C:00 velocity actual value, 0.001 mm/s.
    VelocityActual,
    /// 6077:00 torque actual value, per thousand of rated torque.
    TorqueActual,
    /// 6078:00 current actual value, mA.
    CurrentActual,
    /// 607A:00 target position, 0.001 mm.
    TargetPosition,
    /// 6081:00 profile velocity, 0.001 mm/s (0: the default move speed).
    ProfileVelocity,
    /// 60FF:00 target velocity, 0.001 mm/s.
    TargetVelocity,
}

/// One existing `index:sub`: what it is, who may access it, and its size in bytes
/// (`None`: a visible string, any length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub object: Object,
    pub access: Access,
    pub len: Option<usize>,
}

/// 1000:00: CiA 402 device profile (0x0192 = 402) in the low word, additional information
/// 0x0002 (servo drive) in the high word.
pub const DEVICE_TYPE: u32 = 0x0002_0192;
/// 1008:00: longer than 4 bytes, so an upload of it is segmented.
pub const DEVICE_NAME: &str = "servosim CiA 402 drive";
/// 1018:01: vendor id 0x539 (1337; not a registered CiA vendor).
pub const VENDOR_ID: u32 = 0x0000_0539;
/// 1018:02.
pub const PRODUCT_CODE: u32 = 0x0000_0402;
/// 1018:03: major revision 1, minor 0.
pub const REVISION: u32 = 0x0001_0000;
/// 1001:00 bit 0: generic error (CiA 301 v4.2, 7.5.2.2).
pub const ERROR_REGISTER_GENERIC: u8 = 0x01;
/// 1800+k:01 bit 31: the PDO is not valid (CiA 301 v4.2, 7.5.2.35).
pub const COB_ID_INVALID: u32 = 0x8000_0000;
/// 1800+k:01 bit 29: 29-bit CAN-ID (not supported here).
pub const COB_ID_EXTENDED: u32 = 0x2000_0000;
/// 1800+k:02 0xFE: event-driven, manufacturer-specific (sent by the event timer here).
pub const TRANSMISSION_EVENT: u8 = 0xFE;
/// 1800+k:02 1: synchronous, on every SYNC.
pub const TRANSMISSION_SYNC_EVERY: u8 = 1;
/// Number of TPDOs (1800..1803, 1A00..1A03).
pub const TPDO_COUNT: usize = 4;
/// Highest sub-index of a TPDO communication record (1800+k:00).
pub const TPDO_COMM_SUBS: u8 = 5;
/// The fixed TPDO mappings (1A00..1A03, sub 1..=n): `0xIIIISSLL`, index, sub-index and
/// length in bits (CiA 301 v4.2, 7.5.2.36).
pub const TPDO_MAPPINGS: [&[u32]; TPDO_COUNT] = [
    // TPDO1: statusword, position actual, torque actual: 8 bytes.
    &[0x6041_0010, 0x6064_0020, 0x6077_0010],
    // TPDO2: velocity actual, current actual, temperature: 8 bytes.
    &[0x606C_0020, 0x6078_0010, 0x2010_0010],
    // TPDO3: model time, error code, mode display: 7 bytes.
    &[0x2000_0020, 0x603F_0010, 0x6061_0008],
    // TPDO4: nothing mapped (and its COB-ID is not valid).
    &[],
];
/// Highest sub-index of the RPDO communication record (1400:00).
pub const RPDO_COMM_SUBS: u8 = 2;
/// RPDO1's fixed mapping (1600:01): the controlword, 16 bits. One RPDO only: the one a
/// master needs to start several drives in the same SYNC cycle.
pub const RPDO_MAPPING: u32 = 0x6040_0010;
/// The CiA 402 modes of operation (6060) this drive accepts.
pub use crate::cia402::SUPPORTED_MODES;

/// Looks `index:sub` up: 0x06020000 for an index that does not exist, 0x06090011 for a
/// missing sub-index of one that does.
pub fn lookup(index: u16, sub: u8) -> Result<Entry, AbortCode> {
    use Access::*;
    use Object::*;
    let var = |object, access, len| {
        if sub == 0 {
            Ok(Entry {
                object,
                access,
                len: Some(len),
            })
        } else {
            Err(AbortCode::NO_SUB_INDEX)
        }
    };
    let field = |object, access, len| {
        Ok(Entry {
            object,
            access,
            len: Some(len),
        })
    };
    match index {
        0x1000 => var(DeviceType, ReadOnly, 4),
        0x1001 => var(ErrorRegister, ReadOnly, 1),
        0x1008 if sub == 0 => Ok(Entry {
            object: DeviceName,
            access: ReadOnly,
            len: None,
        }),
        0x1008 => Err(AbortCode::NO_SUB_INDEX),
        0x1017 => var(HeartbeatTime, ReadWrite, 2),
        0x1018 => match sub {
            0 => field(IdentityCount, ReadOnly, 1),
            1 => field(VendorId, ReadOnly, 4),
            2 => field(ProductCode, ReadOnly, 4),
            3 => field(Revision, ReadOnly, 4),
            4 => field(SerialNumber, ReadOnly, 4),
            _ => Err(AbortCode::NO_SUB_INDEX),
        },
        0x1800..=0x1803 => {
            let k = usize::from(index - 0x1800);
            // Sub 3 (inhibit time) and 4 (reserved) are not implemented.
            match sub {
                0 => field(TpdoCommCount(k), ReadOnly, 1),
                1 => field(TpdoCobId(k), ReadWrite, 4),
                2 => field(TpdoTransmissionType(k), ReadWrite, 1),
                5 => field(TpdoEventTimer(k), ReadWrite, 2),
                _ => Err(AbortCode::NO_SUB_INDEX),
            }
        }
        0x1A00..=0x1A03 => {
            let k = usize::from(index - 0x1A00);
            // The mappings are fixed here: read-only (CiA 301 allows that).
            match usize::from(sub) {
                0 => field(TpdoMappingCount(k), ReadOnly, 1),
                n if n <= TPDO_MAPPINGS[k].len() => field(TpdoMappingEntry(k, n), ReadOnly, 4),
                _ => Err(AbortCode::NO_SUB_INDEX),
            }
        }
        0x1400 => match sub {
            0 => field(RpdoCommCount, ReadOnly, 1),
            1 => field(RpdoCobId, ReadWrite, 4),
            2 => field(RpdoTransmissionType, ReadWrite, 1),
            _ => Err(AbortCode::NO_SUB_INDEX),
        },
        // The mapping is fixed: read-only, as for the TPDOs.
        0x1600 => match sub {
            0 => field(RpdoMappingCount, ReadOnly, 1),
            1 => field(RpdoMappingEntry, ReadOnly, 4),
            _ => Err(AbortCode::NO_SUB_INDEX),
        },
        0x2000 => var(ModelTime, ReadOnly, 4),
        0x2010 => var(Temperature, ReadOnly, 2),
        0x2011 => var(DcBusVoltage, ReadOnly, 4),
        0x603F => var(ErrorCode, ReadOnly, 2),
        0x6040 => var(Controlword, ReadWrite, 2),
        0x6041 => var(Statusword, ReadOnly, 2),
        0x6060 => var(ModesOfOperation, ReadWrite, 1),
        0x6061 => var(ModeDisplay, ReadOnly, 1),
        0x6064 => var(PositionActual, ReadOnly, 4),
        0x606C => var(VelocityActual, ReadOnly, 4),
        0x6077 => var(TorqueActual, ReadOnly, 2),
        0x6078 => var(CurrentActual, ReadOnly, 2),
        0x607A => var(TargetPosition, ReadWrite, 4),
        0x6081 => var(ProfileVelocity, ReadWrite, 4),
        0x60FF => var(TargetVelocity, ReadWrite, 4),
        _ => Err(AbortCode::NO_OBJECT),
    }
}

/// The process objects of one node at one model instant, in the resolutions of the
/// object dictionary. Built from ONE model sample, so every object read from it (an SDO
/// upload, or all TPDOs of one cycle) belongs to the same `t_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessValues {
    /// 2000:00, ms.
    pub t_ms: u32,
    /// 6064:00, 0.001 mm.
    pub position: i32,
    /// 606C:00, 0.001 mm/s.
    pub velocity: i32,
    /// 6077:00, per thousand of rated torque.
    pub torque: i16,
    /// 6078:00, mA.
    pub current: i16,
    /// 2010:00, 0.1 degC.
    pub temperature: i16,
    /// 2011:00, mV.
    pub dc_bus_mv: u32,
}

/// Stands in for "power stage off" in a model `DriveState` of a drive that is not faulted
/// but not in Operation enabled either: the model stops the axis (velocity, torque and
/// current 0, load ripple gone) for any non-zero error code, and that is exactly what a
/// disabled drive does. Used only to compute samples, never shown in 0x603F.
const MODEL_STOPPED: u16 = 0xFFFF;

/// The model state of a node: `moving` is true in Operation enabled only; `motion_ms` is
/// its motion clock; `error_code` its 0x603F.
pub fn model_drive(motion_ms: u32, moving: bool, error_code: u16) -> DriveState {
    DriveState {
        error_code: match (moving, error_code) {
            (true, _) => 0,
            (false, 0) => MODEL_STOPPED,
            (false, code) => code,
        },
        ..DriveState::running(motion_ms)
    }
}

impl ProcessValues {
    /// The values of `node` at model time `t_ms` in model state `drive`
    /// (see [`model_drive`]). The same resolutions and rounding as the Modbus registers
    /// (`value / resolution`, rounded; `as` saturates).
    pub fn at(node: u8, t_ms: u32, drive: &DriveState) -> Self {
        let s: Sample = model::drive_sample(node, t_ms, drive);
        let inputs = model::input_registers(node, t_ms, drive);
        let dc = usize::from(model::addr::DC_BUS_VOLTAGE);
        Self {
            t_ms,
            position: (s.position_mm / 0.001).round() as i32,
            velocity: (s.velocity_mm_s / 0.001).round() as i32,
            torque: (s.torque_pct / 0.1).round() as i16,
            current: (s.current_a / 0.001).round() as i16,
            temperature: (s.temperature_c / 0.1).round() as i16,
            dc_bus_mv: words::u32_from_low_first([inputs[dc], inputs[dc + 1]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_indexes_and_missing_sub_indexes_abort_differently() {
        assert_eq!(lookup(0x1234, 0), Err(AbortCode::NO_OBJECT));
        assert_eq!(lookup(0x1A04, 0), Err(AbortCode::NO_OBJECT));
        assert_eq!(lookup(0x6041, 1), Err(AbortCode::NO_SUB_INDEX));
        assert_eq!(lookup(0x1018, 5), Err(AbortCode::NO_SUB_INDEX));
        assert_eq!(lookup(0x1800, 3), Err(AbortCode::NO_SUB_INDEX));
        assert_eq!(lookup(0x1A00, 4), Err(AbortCode::NO_SUB_INDEX));
        assert_eq!(lookup(0x1A03, 1), Err(AbortCode::NO_SUB_INDEX));
        assert_eq!(lookup(0x1008, 1), Err(AbortCode::NO_SUB_INDEX));
    }

    #[test]
    fn the_contract_objects_have_their_size_and_access() {
        for (index, sub, access, len) in [
            (0x1000, 0, Access::ReadOnly, Some(4)),
            (0x1001, 0, Access::ReadOnly, Some(1)),
            (0x1008, 0, Access::ReadOnly, None),
            (0x1017, 0, Access::ReadWrite, Some(2)),
            (0x1018, 4, Access::ReadOnly, Some(4)),
            (0x1802, 1, Access::ReadWrite, Some(4)),
            (0x1802, 2, Access::ReadWrite, Some(1)),
            (0x1802, 5, Access::ReadWrite, Some(2)),
            (0x1A01, 0, Access::ReadOnly, Some(1)),
            (0x1A02, 3, Access::ReadOnly, Some(4)),
            (0x2000, 0, Access::ReadOnly, Some(4)),
            (0x2010, 0, Access::ReadOnly, Some(2)),
            (0x2011, 0, Access::ReadOnly, Some(4)),
            (0x603F, 0, Access::ReadOnly, Some(2)),
            (0x6040, 0, Access::ReadWrite, Some(2)),
            (0x6041, 0, Access::ReadOnly, Some(2)),
            (0x6060, 0, Access::ReadWrite, Some(1)),
            (0x6061, 0, Access::ReadOnly, Some(1)),
            (0x6064, 0, Access::ReadOnly, Some(4)),
            (0x606C, 0, Access::ReadOnly, Some(4)),
            (0x6077, 0, Access::ReadOnly, Some(2)),
            (0x6078, 0, Access::ReadOnly, Some(2)),
            (0x607A, 0, Access::ReadWrite, Some(4)),
            (0x6081, 0, Access::ReadWrite, Some(4)),
            (0x60FF, 0, Access::ReadWrite, Some(4)),
        ] {
            let e = lookup(index, sub).unwrap();
            assert_eq!((e.access, e.len), (access, len), "{index:04X}:{sub:02X}");
        }
    }

    #[test]
    fn each_mapping_entry_is_an_object_of_the_length_it_claims() {
        for (k, mapping) in TPDO_MAPPINGS.iter().enumerate() {
            let bits: u32 = mapping.iter().map(|raw| raw & 0xFF).sum();
            assert!(bits <= 64, "TPDO{} maps {bits} bits", k + 1);
            for &raw in mapping.iter() {
                let e = lookup((raw >> 16) as u16, (raw >> 8) as u8).unwrap();
                assert_eq!(e.len, Some((raw & 0xFF) as usize / 8), "{raw:#010x}");
                assert!(e.access.is_readable());
            }
        }
        let lens: Vec<u32> = TPDO_MAPPINGS
            .iter()
            .map(|m| m.iter().map(|raw| (raw & 0xFF) / 8).sum())
            .collect();
        assert_eq!(lens, [8, 8, 7, 0]);
    }

    #[test]
    fn process_values_use_the_modbus_resolutions() {
        let (node, t) = (3, 12_345);
        let drive = model_drive(t, true, 0);
        let v = ProcessValues::at(node, t, &drive);
        let s = model::sample(node, t);
        let r = model::registers(node, t, &DriveState::running(t));
        assert_eq!(v.position, words::i32_from_high_first([r[0], r[1]]));
        assert_eq!(v.velocity, words::i32_from_high_first([r[2], r[3]]));
        assert_eq!(v.torque, r[4] as i16);
        assert_eq!(v.temperature, r[6] as i16);
        assert!((f64::from(v.current) / 1000.0 - s.current_a).abs() <= 0.0005);
        let volts = f64::from(v.dc_bus_mv) / 1000.0;
        assert!((47.5..48.5).contains(&volts), "{volts}");
    }

    #[test]
    fn a_drive_that_is_not_enabled_stands_still_without_a_fault_code() {
        let drive = model_drive(700, false, 0);
        let s = model::drive_sample(1, 5_000, &drive);
        assert_eq!(s.position_mm, model::sample(1, 700).position_mm);
        assert_eq!((s.velocity_mm_s, s.torque_pct), (0.0, 0.0));
        assert_eq!(model_drive(700, false, 0x2310).error_code, 0x2310);
        assert_eq!(model_drive(700, true, 0).error_code, 0);
    }
}
