//! Lists of Modbus unit ids (`SlaveId`s) as the command line writes them: `1-6`, `1,3,5`,
//! `1-3,7`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::SimError;

/// Lowest unicast unit id; 0 is the broadcast address (Modbus over Serial Line V1.02,
/// section 2.2).
pub const FIRST_UNIT: u8 = 1;
/// Highest unicast unit id; 248-255 are reserved (same section).
pub const LAST_UNIT: u8 = 247;

/// A non-empty, sorted set of unicast unit ids (1-247).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitList(BTreeSet<u8>);

impl UnitList {
    /// Builds a list from ids; fails on an empty list or an id outside 1-247.
    pub fn new(ids: impl IntoIterator<Item = u8>) -> Result<Self, SimError> {
        Self::checked(ids.into_iter().collect()).map_err(SimError::BadUnitList)
    }

    fn checked(set: BTreeSet<u8>) -> Result<Self, String> {
        if let Some(&bad) = set
            .iter()
            .find(|&&u| !(FIRST_UNIT..=LAST_UNIT).contains(&u))
        {
            return Err(format!("unit {bad} is outside {FIRST_UNIT}-{LAST_UNIT}"));
        }
        if set.is_empty() {
            return Err("no units".into());
        }
        Ok(Self(set))
    }

    /// True when `unit` is in the list.
    pub fn contains(&self, unit: u8) -> bool {
        self.0.contains(&unit)
    }

    /// The ids in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        self.0.iter().copied()
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a list holds at least one unit. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for UnitList {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| SimError::BadUnitList(format!("{s:?}: {why}"));
        let parse_id = |t: &str| {
            t.trim()
                .parse::<u8>()
                .map_err(|_| bad(format!("{:?} is not a unit id", t.trim())))
        };
        let mut ids = Vec::new();
        for part in s.split(',') {
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (parse_id(lo)?, parse_id(hi)?);
                    if lo > hi {
                        return Err(bad(format!("range {lo}-{hi} runs backwards")));
                    }
                    ids.extend(lo..=hi);
                }
                None => ids.push(parse_id(part)?),
            }
        }
        Self::checked(ids.into_iter().collect()).map_err(bad)
    }
}

/// The shortest form: runs of three or more ids as ranges (`1-3,7`).
impl fmt::Display for UnitList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.iter().collect();
        let mut first = true;
        let mut i = 0;
        while i < ids.len() {
            // Extend j over the run of consecutive ids starting at i.
            let mut j = i;
            while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                j += 1;
            }
            let sep = if first { "" } else { "," };
            first = false;
            match j - i {
                0 => write!(f, "{sep}{}", ids[i])?,
                1 => write!(f, "{sep}{},{}", ids[i], ids[j])?,
                _ => write!(f, "{sep}{}-{}", ids[i], ids[j])?,
            }
            i = j + 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(s: &str) -> Vec<u8> {
        s.parse::<UnitList>().unwrap().iter().collect()
    }

    #[test]
    fn ranges_lists_and_mixtures_parse() {
        assert_eq!(ids("1-6"), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(ids("1,3,5"), vec![1, 3, 5]);
        assert_eq!(ids("1-3,7"), vec![1, 2, 3, 7]);
        assert_eq!(ids(" 2 , 1 - 2 "), vec![1, 2]);
    }

    #[test]
    fn broadcast_reserved_backwards_and_garbage_lists_are_rejected() {
        for bad in ["0", "248", "3-1", "", "1,,2", "a", "1-", "1-300"] {
            assert!(bad.parse::<UnitList>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_bad_list_says_what_is_wrong_once() {
        let err = "0-3".parse::<UnitList>().unwrap_err().to_string();
        assert_eq!(err, "bad unit list \"0-3\": unit 0 is outside 1-247");
    }

    #[test]
    fn display_prints_the_compact_form_that_parses_back() {
        for (input, shown) in [
            ("1-6", "1-6"),
            ("1,3,5", "1,3,5"),
            ("7,1-3", "1-3,7"),
            ("4,5", "4,5"),
        ] {
            let list: UnitList = input.parse().unwrap();
            assert_eq!(list.to_string(), shown);
            assert_eq!(shown.parse::<UnitList>().unwrap(), list);
        }
    }
}
