//! The RPDO a group start goes through (DESIGN.md section 7, group commands).
//!
//! To start several drives in the same cycle the master loads each drive's set-point over
//! SDO, then sends every drive the controlword with "new set-point" in its RPDO and one
//! SYNC after them: a drive acts on a synchronous RPDO (transmission type 0-240) at the
//! next SYNC (CiA 301 v4.2, 7.2.2.2), so all of them take their set-points on that one
//! frame. That needs an RPDO that maps the controlword alone and is synchronous; the
//! config names it (`start_rpdo`) and the master reads it from the drive at start-up
//! rather than rewriting the drive's PDO configuration, which the plant may own.

use crate::pdo::objects::CONTROLWORD;

/// 0x1400 + n - 1: RPDO n's communication parameters (sub 1 COB-ID, sub 2 type).
const RPDO_COMM: u16 = 0x1400;
/// 0x1600 + n - 1: RPDO n's mapping (sub 0 count, sub 1.. entries).
const RPDO_MAPPING: u16 = 0x1600;
/// COB-ID bit 31: the PDO is not valid; bit 29: a 29-bit id.
const COB_INVALID: u32 = 0x8000_0000;
const COB_EXTENDED: u32 = 0x2000_0000;
/// The mapping entry of the controlword: index 0x6040, sub 0, 16 bits.
const CONTROLWORD_ENTRY: u32 = ((CONTROLWORD as u32) << 16) | 0x10;

/// Reads and checks RPDO `number` of a drive, one SDO upload at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRpdoCheck {
    number: u16,
    /// How many of the four objects were read.
    read: usize,
    cob: u16,
}

impl StartRpdoCheck {
    /// A check of RPDO `number` (1..=512, CiA 301).
    pub fn new(number: u16) -> Result<Self, String> {
        if !(1..=512).contains(&number) {
            return Err(format!("RPDO {number} does not exist (1..=512)"));
        }
        Ok(Self {
            number,
            read: 0,
            cob: 0,
        })
    }

    pub fn number(&self) -> u16 {
        self.number
    }

    /// The next object to read, `None` once all four were.
    pub fn next_object(&self) -> Option<(u16, u8)> {
        let k = self.number - 1;
        match self.read {
            0 => Some((RPDO_COMM + k, 1)),
            1 => Some((RPDO_COMM + k, 2)),
            2 => Some((RPDO_MAPPING + k, 0)),
            3 => Some((RPDO_MAPPING + k, 1)),
            _ => None,
        }
    }

    /// The value of the object last asked for. `Err` says why the RPDO cannot start a
    /// group (the check is over); `Ok(Some(cob))` when it can.
    pub fn on_uploaded(&mut self, data: &[u8]) -> Result<Option<u16>, String> {
        let n = self.number;
        let value = |len: usize| -> Result<u32, String> {
            match data.get(..len) {
                Some(b) => Ok(b.iter().rev().fold(0u32, |v, &x| (v << 8) | u32::from(x))),
                None => Err(format!(
                    "RPDO {n}: {} bytes where {len} were due",
                    data.len()
                )),
            }
        };
        let step = self.read;
        self.read += 1;
        match step {
            0 => {
                let cob = value(4)?;
                if cob & COB_INVALID != 0 {
                    return Err(format!("RPDO {n} is not valid (COB-ID {cob:#010x})"));
                }
                if cob & COB_EXTENDED != 0 {
                    return Err(format!("RPDO {n} has a 29-bit COB-ID ({cob:#010x})"));
                }
                self.cob = (cob & 0x7FF) as u16;
                Ok(None)
            }
            1 => match value(1)? as u8 {
                0..=240 => Ok(None),
                t => Err(format!(
                    "RPDO {n} has transmission type {t}: the drive would act on it at once, \
                     not at the next SYNC (set 0x{:04X}:02 to 1)",
                    RPDO_COMM + n - 1
                )),
            },
            2 => match value(1)? {
                1 => Ok(None),
                c => Err(format!(
                    "RPDO {n} maps {c} objects: a group start needs one that maps the \
                     controlword alone"
                )),
            },
            3 => match value(4)? {
                CONTROLWORD_ENTRY => Ok(Some(self.cob)),
                e => Err(format!(
                    "RPDO {n} maps {e:#010x}, not the controlword (0x60400010)"
                )),
            },
            _ => Err(format!("RPDO {n}: read past its end")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(values: &[&[u8]]) -> Result<Option<u16>, String> {
        let mut c = StartRpdoCheck::new(1).unwrap();
        let mut last = Ok(None);
        for v in values {
            assert!(c.next_object().is_some());
            last = c.on_uploaded(v);
            if last.is_err() {
                break;
            }
        }
        last
    }

    #[test]
    fn a_synchronous_rpdo_of_the_controlword_alone_gives_its_cob_id() {
        let mut c = StartRpdoCheck::new(1).unwrap();
        assert_eq!(c.next_object(), Some((0x1400, 1)));
        c.on_uploaded(&0x203u32.to_le_bytes()).unwrap();
        assert_eq!(c.next_object(), Some((0x1400, 2)));
        c.on_uploaded(&[1]).unwrap();
        assert_eq!(c.next_object(), Some((0x1600, 0)));
        c.on_uploaded(&[1]).unwrap();
        assert_eq!(c.next_object(), Some((0x1600, 1)));
        assert_eq!(
            c.on_uploaded(&0x6040_0010u32.to_le_bytes()),
            Ok(Some(0x203))
        );
        assert_eq!(c.next_object(), None);
    }

    #[test]
    fn an_unfit_rpdo_is_refused_with_the_reason() {
        let cob = 0x203u32.to_le_bytes();
        let cw = 0x6040_0010u32.to_le_bytes();
        let invalid = 0x8000_0203u32.to_le_bytes();
        let cases: [(&[&[u8]], &str); 5] = [
            (&[&invalid], "not valid"),
            (&[&cob, &[255]], "transmission type 255"),
            (&[&cob, &[1], &[2]], "maps 2 objects"),
            (
                &[&cob, &[1], &[1], &0x607A_0020u32.to_le_bytes()],
                "not the controlword",
            ),
            (&[&cob, &[1], &[1], &cw[..2]], "2 bytes where 4"),
        ];
        for (values, why) in cases {
            let e = run(values).unwrap_err();
            assert!(e.contains(why), "{e} should say {why}");
        }
        assert!(StartRpdoCheck::new(0).is_err());
        assert_eq!(
            StartRpdoCheck::new(4).unwrap().next_object(),
            Some((0x1403, 1))
        );
    }
}
