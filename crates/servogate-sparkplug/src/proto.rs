//! The Sparkplug B payload (Eclipse Sparkplug 3.0, chapter 6, "Payloads"), written from
//! the specification's message definitions as prost types. Only what an edge node of
//! servo drives sends and receives is here: metrics with scalar values, their property
//! sets and the payload around them. DataSet, Template, MetaData and the extensions are
//! not: a decoder skips fields it does not know, as protobuf does.

/// Sparkplug B data types (the `datatype` of a metric, the `type` of a property value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DataType {
    Unknown = 0,
    Int8 = 1,
    Int16 = 2,
    Int32 = 3,
    Int64 = 4,
    UInt8 = 5,
    UInt16 = 6,
    UInt32 = 7,
    UInt64 = 8,
    Float = 9,
    Double = 10,
    Boolean = 11,
    String = 12,
    DateTime = 13,
    Text = 14,
    Uuid = 15,
    DataSet = 16,
    Bytes = 17,
    File = 18,
    Template = 19,
    PropertySet = 20,
    PropertySetList = 21,
}

/// The whole message body of every Sparkplug B topic but STATE.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the Unix epoch, when the message was made.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0-255, across every NBIRTH / NDATA / DBIRTH / DDATA / DDEATH of the node; absent in
    /// NDEATH.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Milliseconds since the Unix epoch, when the value was acquired.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// A [`DataType`].
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// A metric's value: the field follows the datatype (Int8-32 and UInt8-32 in
/// `int_value`, Int64 / UInt64 / DateTime in `long_value`; signed values as their two's
/// complement bits, as Eclipse Tahu writes them).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    /// A [`DataType`].
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyValueKind", tags = "3, 4, 5, 6, 7, 8, 9")]
    pub value: Option<PropertyValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyValueKind {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
    #[prost(message, tag = "9")]
    PropertysetValue(PropertySet),
}

impl PropertySet {
    /// Adds `key` = `value` (a string property).
    pub fn push_string(&mut self, key: &str, value: &str) {
        self.keys.push(key.to_owned());
        self.values.push(PropertyValue {
            r#type: Some(DataType::String as u32),
            is_null: None,
            value: Some(PropertyValueKind::StringValue(value.to_owned())),
        });
    }

    /// Adds `key` = `value` (a Double property).
    pub fn push_double(&mut self, key: &str, value: f64) {
        self.keys.push(key.to_owned());
        self.values.push(PropertyValue {
            r#type: Some(DataType::Double as u32),
            is_null: None,
            value: Some(PropertyValueKind::DoubleValue(value)),
        });
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&PropertyValue> {
        let i = self.keys.iter().position(|k| k == key)?;
        self.values.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_double_metric_is_encoded_as_the_specification_numbers_its_fields() {
        // name (1, length-delimited), datatype (4, varint), double_value (13, 64-bit).
        let m = Metric {
            name: Some("a".into()),
            datatype: Some(DataType::Double as u32),
            value: Some(MetricValue::DoubleValue(1.0)),
            ..Metric::default()
        };
        let mut want = vec![0x0A, 0x01, b'a', 0x20, 0x0A, 0x69];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        assert_eq!(m.encode_to_vec(), want);
        // In a payload: timestamp (1), metrics (2, length-delimited), seq (3).
        let p = Payload {
            timestamp: Some(5),
            metrics: vec![m],
            seq: Some(255),
            ..Payload::default()
        };
        let bytes = p.encode_to_vec();
        assert_eq!(&bytes[..4], &[0x08, 0x05, 0x12, want.len() as u8]);
        assert_eq!(&bytes[bytes.len() - 3..], &[0x18, 0xFF, 0x01]);
        assert_eq!(Payload::decode(bytes.as_slice()).unwrap(), p);
    }

    #[test]
    fn property_sets_hold_keys_and_typed_values_in_step() {
        let mut ps = PropertySet::default();
        ps.push_string("engUnit", "mm");
        ps.push_double("scale", 0.001);
        assert_eq!(
            ps.get("engUnit").and_then(|v| v.value.clone()),
            Some(PropertyValueKind::StringValue("mm".into()))
        );
        assert_eq!(
            ps.get("scale").and_then(|v| v.r#type),
            Some(DataType::Double as u32)
        );
        let back = PropertySet::decode(ps.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, ps);
    }

    #[test]
    fn unknown_fields_are_skipped_and_garbage_is_an_error_not_a_panic() {
        // A DataSet value (17) this crate does not model, then a name.
        let bytes = [0x8A, 0x01, 0x00, 0x0A, 0x01, b'x'];
        let m = Metric::decode(&bytes[..]).unwrap();
        assert_eq!(m.name.as_deref(), Some("x"));
        assert!(Payload::decode(&[0x12, 0x05, 0x01][..]).is_err());
    }
}
