//! The edge node's bookkeeping (Eclipse Sparkplug 3.0, chapters 5 and 6): the message
//! sequence number every node message carries, the birth/death sequence number (bdSeq)
//! that ties an NBIRTH to the NDEATH registered as its Will, metric aliases unique across
//! the node, and the payloads of the node's and its devices' messages. Sans-IO: the
//! caller publishes what it builds, in the order it builds it.

use std::collections::BTreeMap;

use crate::proto::{DataType, Metric, MetricValue, Payload, PropertySet};

/// The node control metric a host writes `true` to for a rebirth.
pub const REBIRTH: &str = "Node Control/Rebirth";
/// The birth/death sequence metric of NBIRTH and NDEATH.
pub const BD_SEQ: &str = "bdSeq";

/// A metric's value, with the Sparkplug type it is published as.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Double(f64),
    Float(f32),
    /// Int8, Int16, Int32 or Int64 (`ty`); sent as the two's complement bits of its own
    /// width (an Int16 of -5 is 0xFFFB, not 0xFFFFFFFB): Eclipse Tahu reads both by
    /// truncating, pysparkplug refuses the sign-extended form.
    Int(i64, DataType),
    /// UInt8, UInt16, UInt32 or UInt64 (`ty`).
    UInt(u64, DataType),
    Bool(bool),
    Str(String),
}

impl Value {
    pub fn datatype(&self) -> DataType {
        match self {
            Value::Double(_) => DataType::Double,
            Value::Float(_) => DataType::Float,
            Value::Int(_, t) | Value::UInt(_, t) => *t,
            Value::Bool(_) => DataType::Boolean,
            Value::Str(_) => DataType::String,
        }
    }

    /// The protobuf field the datatype puts it in (32-bit and smaller integers in
    /// `int_value`, 64-bit ones in `long_value`).
    pub fn to_proto(&self) -> MetricValue {
        let wide = |t: &DataType| matches!(t, DataType::Int64 | DataType::UInt64);
        match self {
            Value::Double(v) => MetricValue::DoubleValue(*v),
            Value::Float(v) => MetricValue::FloatValue(*v),
            Value::Int(v, t) if wide(t) => MetricValue::LongValue(*v as u64),
            Value::Int(v, DataType::Int8) => MetricValue::IntValue(u32::from(*v as i8 as u8)),
            Value::Int(v, DataType::Int16) => MetricValue::IntValue(u32::from(*v as i16 as u16)),
            Value::Int(v, _) => MetricValue::IntValue(*v as i32 as u32),
            Value::UInt(v, t) if wide(t) => MetricValue::LongValue(*v),
            Value::UInt(v, _) => MetricValue::IntValue(*v as u32),
            Value::Bool(v) => MetricValue::BooleanValue(*v),
            Value::Str(v) => MetricValue::StringValue(v.clone()),
        }
    }
}

/// The sequence number of the node's messages: 0 in NBIRTH, then +1 per NDATA, DBIRTH,
/// DDATA and DDEATH, from 255 back to 0.
#[derive(Debug, Clone, Default)]
pub struct Sequence {
    next: u8,
}

impl Sequence {
    /// For an NBIRTH: 0, and the next message gets 1.
    pub fn birth(&mut self) -> u64 {
        self.next = 1;
        0
    }

    /// For every other message with a seq.
    pub fn take(&mut self) -> u64 {
        let s = self.next;
        self.next = self.next.wrapping_add(1);
        u64::from(s)
    }
}

/// The birth/death sequence number: one per MQTT session, 0-255 then 0 again; the
/// NBIRTH of a session and the NDEATH registered as its Will carry the same one.
#[derive(Debug, Clone, Default)]
pub struct BdSeq {
    current: u8,
}

impl BdSeq {
    /// The value for the session about to connect (its Will and its NBIRTH).
    pub fn current(&self) -> u64 {
        u64::from(self.current)
    }

    /// A session ended: the next one gets the next value.
    pub fn next_session(&mut self) {
        self.current = self.current.wrapping_add(1);
    }
}

/// Metric aliases, unique across the whole node (its own metrics and every device's).
#[derive(Debug, Clone, Default)]
pub struct Aliases {
    by_metric: BTreeMap<(String, String), u64>,
    next: u64,
}

impl Aliases {
    /// The alias of `metric` of `device` (`""`: the node itself), given on first use.
    /// The metric of `device` (`""`: the node) that `alias` stands for.
    pub fn name_of(&self, device: &str, alias: u64) -> Option<&str> {
        self.by_metric
            .iter()
            .find(|((d, _), a)| d == device && **a == alias)
            .map(|((_, m), _)| m.as_str())
    }

    pub fn of(&mut self, device: &str, metric: &str) -> u64 {
        let key = (device.to_owned(), metric.to_owned());
        if let Some(a) = self.by_metric.get(&key) {
            return *a;
        }
        let a = self.next;
        self.next += 1;
        self.by_metric.insert(key, a);
        a
    }
}

/// One metric of a birth: its name, value (or `None`: null), and properties.
#[derive(Debug, Clone, PartialEq)]
pub struct BirthMetric {
    pub name: String,
    pub datatype: DataType,
    pub value: Option<Value>,
    pub properties: Option<PropertySet>,
}

fn metric(
    name: Option<String>,
    alias: Option<u64>,
    datatype: DataType,
    value: Option<&Value>,
    timestamp: u64,
) -> Metric {
    Metric {
        name,
        alias,
        timestamp: Some(timestamp),
        datatype: Some(datatype as u32),
        is_null: value.is_none().then_some(true),
        value: value.map(Value::to_proto),
        ..Metric::default()
    }
}

/// The bdSeq metric of NBIRTH and NDEATH (Int64).
fn bd_seq_metric(bd_seq: &BdSeq, now_ms: u64) -> Metric {
    let v = Value::Int(bd_seq.current() as i64, DataType::Int64);
    metric(Some(BD_SEQ.into()), None, DataType::Int64, Some(&v), now_ms)
}

/// A payload made at `now_ms`.
fn message(seq: Option<u64>, metrics: Vec<Metric>, now_ms: u64) -> Payload {
    Payload {
        timestamp: Some(now_ms),
        metrics,
        seq,
        ..Payload::default()
    }
}

impl BirthMetric {
    /// The metric of a birth: name, alias (when aliases are used), type, value or null,
    /// properties.
    fn to_proto(&self, alias: Option<u64>, now_ms: u64) -> Metric {
        let mut x = metric(
            Some(self.name.clone()),
            alias,
            self.datatype,
            self.value.as_ref(),
            now_ms,
        );
        x.properties = self.properties.clone();
        x
    }
}

/// The NBIRTH payload: seq 0, bdSeq, the rebirth control (false), and the node's own
/// metrics. Aliases are given (and kept) for every metric when `aliases` is set.
pub fn nbirth(
    seq: &mut Sequence,
    bd_seq: &BdSeq,
    mut aliases: Option<&mut Aliases>,
    own: &[BirthMetric],
    now_ms: u64,
) -> Payload {
    let mut metrics = vec![
        bd_seq_metric(bd_seq, now_ms),
        metric(
            Some(REBIRTH.into()),
            None,
            DataType::Boolean,
            Some(&Value::Bool(false)),
            now_ms,
        ),
    ];
    for m in own {
        let alias = aliases.as_deref_mut().map(|a| a.of("", &m.name));
        metrics.push(m.to_proto(alias, now_ms));
    }
    message(Some(seq.birth()), metrics, now_ms)
}

/// The NDEATH payload (the Will): bdSeq only, no seq.
pub fn ndeath(bd_seq: &BdSeq, now_ms: u64) -> Payload {
    message(None, vec![bd_seq_metric(bd_seq, now_ms)], now_ms)
}

/// A DBIRTH payload: every metric of `device`, with names (and aliases when given).
pub fn dbirth(
    seq: &mut Sequence,
    mut aliases: Option<&mut Aliases>,
    device: &str,
    metrics: &[BirthMetric],
    now_ms: u64,
) -> Payload {
    let metrics = metrics
        .iter()
        .map(|m| {
            let alias = aliases.as_deref_mut().map(|a| a.of(device, &m.name));
            m.to_proto(alias, now_ms)
        })
        .collect();
    message(Some(seq.take()), metrics, now_ms)
}

/// A DDATA payload: `values` of `device` acquired at `at_ms`; by alias alone when
/// aliases are used (the DBIRTH said which name each stands for), else by name.
pub fn ddata(
    seq: &mut Sequence,
    mut aliases: Option<&mut Aliases>,
    device: &str,
    values: &[(&str, Value)],
    at_ms: u64,
    now_ms: u64,
    historical: bool,
) -> Payload {
    let metrics = values
        .iter()
        .map(|(name, v)| {
            let alias = aliases.as_deref_mut().map(|a| a.of(device, name));
            let name = alias.is_none().then(|| (*name).to_owned());
            let mut m = metric(name, alias, v.datatype(), Some(v), at_ms);
            m.is_historical = historical.then_some(true);
            m
        })
        .collect();
    message(Some(seq.take()), metrics, now_ms)
}

/// A DDEATH payload: only the seq.
pub fn ddeath(seq: &mut Sequence, now_ms: u64) -> Payload {
    message(Some(seq.take()), Vec::new(), now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn birth_metric(name: &str) -> BirthMetric {
        BirthMetric {
            name: name.into(),
            datatype: DataType::Double,
            value: Some(Value::Double(1.5)),
            properties: None,
        }
    }

    fn bd_seq_of(p: &Payload) -> Option<u64> {
        p.metrics
            .iter()
            .find(|m| m.name.as_deref() == Some(BD_SEQ))
            .and_then(|m| match m.value {
                Some(MetricValue::LongValue(v)) => Some(v),
                _ => None,
            })
    }

    #[test]
    fn tck_id_payloads_nbirth_bdseq_matches_the_ndeath_of_the_same_session() {
        let (mut seq, mut bd) = (Sequence::default(), BdSeq::default());
        bd.next_session();
        let will = ndeath(&bd, 1);
        let birth = nbirth(&mut seq, &bd, None, &[], 2);
        assert_eq!(bd_seq_of(&will), Some(1));
        assert_eq!(bd_seq_of(&birth), bd_seq_of(&will));
        assert_eq!(will.seq, None, "NDEATH carries no seq");
        assert!(birth
            .metrics
            .iter()
            .any(|m| m.name.as_deref() == Some(REBIRTH)
                && m.value == Some(MetricValue::BooleanValue(false))));
    }

    #[test]
    fn tck_id_payloads_sequence_num_runs_0_to_255_and_wraps_and_a_rebirth_restarts_it() {
        let (mut seq, bd) = (Sequence::default(), BdSeq::default());
        assert_eq!(nbirth(&mut seq, &bd, None, &[], 0).seq, Some(0));
        let seqs: Vec<u64> = (0..300).map(|_| ddeath(&mut seq, 0).seq.unwrap()).collect();
        assert_eq!(seqs[0], 1);
        assert_eq!(seqs[254], 255);
        assert_eq!(seqs[255], 0);
        assert!(seqs.iter().all(|s| *s <= 255));
        assert_eq!(
            nbirth(&mut seq, &bd, None, &[], 0).seq,
            Some(0),
            "a rebirth restarts at 0"
        );
        assert_eq!(ddeath(&mut seq, 0).seq, Some(1));
    }

    #[test]
    fn tck_id_payloads_alias_unique_across_the_node_and_data_by_alias_only() {
        let (mut seq, mut aliases) = (Sequence::default(), Aliases::default());
        let b1 = dbirth(
            &mut seq,
            Some(&mut aliases),
            "axis-1",
            &[birth_metric("position"), birth_metric("velocity")],
            0,
        );
        let b2 = dbirth(
            &mut seq,
            Some(&mut aliases),
            "axis-2",
            &[birth_metric("position")],
            0,
        );
        let all: Vec<u64> = b1
            .metrics
            .iter()
            .chain(&b2.metrics)
            .map(|m| m.alias.unwrap())
            .collect();
        let unique: std::collections::BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "{all:?}");
        let d = ddata(
            &mut seq,
            Some(&mut aliases),
            "axis-2",
            &[("position", Value::Double(2.0))],
            7,
            8,
            false,
        );
        assert_eq!(d.metrics[0].alias, b2.metrics[0].alias);
        assert_eq!(d.metrics[0].name, None, "by alias alone");
        assert_eq!(d.metrics[0].timestamp, Some(7), "the acquisition time");
    }

    #[test]
    fn integers_go_in_the_field_their_datatype_names_as_twos_complement_of_their_width() {
        assert_eq!(
            Value::Int(-5, DataType::Int16).to_proto(),
            MetricValue::IntValue(0xFFFB)
        );
        assert_eq!(
            Value::Int(-5, DataType::Int8).to_proto(),
            MetricValue::IntValue(0xFB)
        );
        assert_eq!(
            Value::Int(-5, DataType::Int32).to_proto(),
            MetricValue::IntValue(0xFFFF_FFFB)
        );
        assert_eq!(
            Value::Int(-5, DataType::Int64).to_proto(),
            MetricValue::LongValue(u64::MAX - 4)
        );
        assert_eq!(
            Value::UInt(70_000, DataType::UInt32).to_proto(),
            MetricValue::IntValue(70_000)
        );
        let m = metric(
            Some("x".into()),
            None,
            DataType::Int16,
            Some(&Value::Int(-5, DataType::Int16)),
            0,
        );
        let back = Metric::decode(m.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.datatype, Some(DataType::Int16 as u32));
        assert_eq!(back.value, Some(MetricValue::IntValue(0xFFFB)));
    }

    #[test]
    fn a_null_metric_says_so_and_carries_no_value() {
        let mut seq = Sequence::default();
        let b = dbirth(
            &mut seq,
            None,
            "axis-1",
            &[BirthMetric {
                name: "torque".into(),
                datatype: DataType::Double,
                value: None,
                properties: None,
            }],
            0,
        );
        assert_eq!(b.metrics[0].is_null, Some(true));
        assert_eq!(b.metrics[0].value, None);
    }
}
