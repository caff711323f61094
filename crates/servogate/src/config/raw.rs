//! The config as written: the serde structs, every value wrapped in `toml::Spanned` so a
//! check can name the line it refuses, and `#[serde(deny_unknown_fields)]` on every table
//! so a misspelt key is an error (toml reports its span; `Source::key_at` in `error.rs` finds
//! its key path). Nothing here is checked beyond what serde checks: each section's file turns
//! its raw struct into the validated types of `model.rs`.
//!
//! A bus stays one flat struct with the keys of both protocols (an internally tagged serde
//! enum would lose the spans); `buses.rs` refuses the keys of the other protocol.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// Every value keeps its byte span, for the position of an error about it.
pub(super) type S<T> = Spanned<T>;

/// A TOML table in file order (a `BTreeMap` would sort the fields of a profile).
pub(super) struct Ordered<V>(pub(super) Vec<(String, V)>);

impl<V> Default for Ordered<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, V>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) gateway: RawGateway,
    #[serde(default)]
    pub(super) mqtt: RawMqtt,
    #[serde(default)]
    pub(super) buffer: RawBuffer,
    #[serde(default)]
    pub(super) profiles: Ordered<S<Ordered<S<RawField>>>>,
    #[serde(default)]
    pub(super) buses: Vec<S<RawBus>>,
    #[serde(default)]
    pub(super) devices: Vec<S<RawDevice>>,
    pub(super) metrics: Option<RawMetrics>,
    pub(super) commands: Option<S<super::commands::RawCommands>>,
    pub(super) sparkplug: Option<S<RawSparkplug>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSparkplug {
    pub(super) group_id: S<String>,
    pub(super) edge_node_id: Option<S<String>>,
    pub(super) primary_host_id: Option<S<String>>,
    pub(super) aliases: Option<S<bool>>,
    pub(super) rebirth_interval: Option<S<String>>,
    pub(super) historical_rate: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) id: S<String>,
    pub(super) log: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqtt {
    pub(super) url: Option<S<String>>,
    pub(super) topic_prefix: Option<S<String>>,
    pub(super) qos: Option<S<u8>>,
    pub(super) client_id: Option<S<String>>,
    pub(super) keep_alive: Option<S<String>>,
    pub(super) max_packet_size: Option<S<usize>>,
    pub(super) ca_file: Option<S<PathBuf>>,
    pub(super) cert_file: Option<S<PathBuf>>,
    pub(super) key_file: Option<S<PathBuf>>,
    pub(super) credentials_file: Option<S<PathBuf>>,
    pub(super) reconnect_min: Option<S<String>>,
    pub(super) reconnect_max: Option<S<String>>,
    pub(super) shutdown_grace: Option<S<String>>,
    pub(super) version: Option<S<i64>>,
    pub(super) topic_aliases: Option<S<i64>>,
    pub(super) contract: Option<S<String>>,
    pub(super) batch_max: Option<S<i64>>,
    pub(super) batch_wait: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBuffer {
    pub(super) capacity: Option<S<usize>>,
    pub(super) on_full: Option<S<String>>,
    pub(super) path: Option<S<String>>,
    pub(super) max_bytes: Option<S<RawBytes>>,
    pub(super) max_age: Option<S<String>>,
    pub(super) sync: Option<S<String>>,
    pub(super) sync_interval: Option<S<String>>,
    pub(super) segment_bytes: Option<S<RawBytes>>,
}

/// A size: a number of bytes, or a string with a unit ("256MiB", "1GB").
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum RawBytes {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawField {
    pub(super) address: S<u32>,
    #[serde(rename = "type")]
    pub(super) data_type: S<String>,
    pub(super) kind: Option<S<String>>,
    pub(super) word_order: Option<S<String>>,
    pub(super) byte_order: Option<S<String>>,
    pub(super) bit: Option<S<u8>>,
    pub(super) scale: Option<S<f64>>,
    pub(super) offset: Option<S<f64>>,
    pub(super) unit: Option<S<String>>,
    pub(super) min: Option<S<f64>>,
    pub(super) max: Option<S<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBus {
    pub(super) name: S<String>,
    pub(super) protocol: S<String>,
    // modbus-rtu, modbus-rtu-tcp, modbus-tcp
    pub(super) port: Option<S<PathBuf>>,
    pub(super) address: Option<S<String>>,
    pub(super) max_in_flight: Option<S<i64>>,
    pub(super) baud: Option<S<u32>>,
    pub(super) parity: Option<S<String>>,
    pub(super) data_bits: Option<S<u8>>,
    pub(super) stop_bits: Option<S<u8>>,
    pub(super) timeout: Option<S<String>>,
    pub(super) t35: Option<S<String>>,
    pub(super) max_gap: Option<S<u16>>,
    pub(super) max_registers: Option<S<u16>>,
    pub(super) backoff_max: Option<S<String>>,
    // canopen
    pub(super) interface: Option<S<String>>,
    pub(super) sync_period: Option<S<String>>,
    pub(super) rcvbuf: Option<S<u64>>,
    pub(super) sdo_timeout: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTpdo {
    pub(super) number: Option<S<i64>>,
    pub(super) cob_id: Option<S<i64>>,
    pub(super) map: S<Vec<S<i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawObject {
    pub(super) name: S<String>,
    pub(super) index: Option<S<i64>>,
    pub(super) sub: Option<S<i64>>,
    #[serde(rename = "type")]
    pub(super) ty: Option<S<String>>,
    pub(super) scale: Option<S<f64>>,
    pub(super) offset: Option<S<f64>>,
    pub(super) unit: Option<S<String>>,
    pub(super) every: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    pub(super) name: S<String>,
    pub(super) bus: S<String>,
    pub(super) unit: Option<S<i64>>,
    pub(super) node: Option<S<i64>>,
    pub(super) profile: S<String>,
    pub(super) poll: Option<S<String>>,
    pub(super) late_after: Option<S<String>>,
    pub(super) timeout: Option<S<String>>,
    pub(super) offline_after: Option<S<u32>>,
    // canopen
    pub(super) heartbeat: Option<S<String>>,
    pub(super) configure_heartbeat: Option<S<bool>>,
    pub(super) start_rpdo: Option<S<i64>>,
    pub(super) tpdos: Option<Vec<S<RawTpdo>>>,
    pub(super) objects: Option<Vec<S<RawObject>>>,
    /// `[devices.commands]`: the command policy (default deny).
    pub(super) commands: Option<S<super::commands::RawPolicy>>,
}
