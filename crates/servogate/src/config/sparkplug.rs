//! `[sparkplug]`: the gateway as a Sparkplug B 3.0 edge node, and `mqtt.contract` that
//! turns it on. The ids go into Sparkplug topics, so they are checked as Sparkplug ids.

use std::time::Duration;

use servogate_sparkplug::topic::check_id;

use super::model::{MqttConfig, Sparkplug};
use super::raw::{RawSparkplug, S};
use super::source::Source;
use super::ConfigError;

/// Rebirth requests closer together than this make one rebirth.
const DEFAULT_REBIRTH_INTERVAL: Duration = Duration::from_secs(1);
/// Messages a second of held data after a reconnect.
const DEFAULT_HISTORICAL_RATE: u32 = 1000;

impl Source<'_> {
    /// `[sparkplug]`, required when the contract publishes Sparkplug, refused otherwise.
    pub(super) fn sparkplug(
        &self,
        raw: Option<S<RawSparkplug>>,
        contract_at: Option<S<String>>,
        mqtt: &MqttConfig,
        gateway_id: &str,
    ) -> Result<Option<Sparkplug>, ConfigError> {
        let Some(raw) = raw else {
            if let (true, Some(at)) = (mqtt.contract.sparkplug(), &contract_at) {
                return Err(self.at(
                    at,
                    "mqtt.contract",
                    "publishes Sparkplug: add a [sparkplug] table with group_id",
                ));
            }
            return Ok(None);
        };
        if !mqtt.contract.sparkplug() {
            return Err(self.at(
                &raw,
                "sparkplug",
                "[sparkplug] is set but mqtt.contract is \"json\": set it to \"sparkplug\" or \"both\"",
            ));
        }
        let raw = raw.into_inner();
        let id = |value: &S<String>, key: &str, what: &'static str| {
            check_id(what, value.get_ref())
                .map(|()| value.get_ref().clone())
                .map_err(|e| self.at(value, key, e.to_string()))
        };
        let group_id = id(&raw.group_id, "sparkplug.group_id", "group_id")?;
        let edge_node_id = match &raw.edge_node_id {
            Some(v) => id(v, "sparkplug.edge_node_id", "edge_node_id")?,
            None => gateway_id.to_owned(),
        };
        let primary_host_id = match &raw.primary_host_id {
            Some(v) => Some(id(v, "sparkplug.primary_host_id", "primary_host_id")?),
            None => None,
        };
        let rebirth_interval = self.duration(
            &raw.rebirth_interval,
            "sparkplug.rebirth_interval",
            DEFAULT_REBIRTH_INTERVAL,
        )?;
        let historical_rate = match &raw.historical_rate {
            None => DEFAULT_HISTORICAL_RATE,
            Some(r) => match u32::try_from(*r.get_ref()) {
                Ok(v @ 1..=1_000_000) => v,
                _ => {
                    return Err(self.at(
                        r,
                        "sparkplug.historical_rate",
                        "must be 1 to 1000000 messages a second",
                    ))
                }
            },
        };
        Ok(Some(Sparkplug {
            group_id,
            edge_node_id,
            primary_host_id,
            aliases: raw.aliases.map(|a| a.into_inner()).unwrap_or(false),
            rebirth_interval,
            historical_rate,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::fixture::{err, GOOD};
    use crate::config::{parse, Contract};

    fn with(mqtt: &str, sparkplug: &str) -> String {
        GOOD.replace(
            "[profiles.ax]",
            &format!("[mqtt]\n{mqtt}\n\n{sparkplug}\n\n[profiles.ax]"),
        )
    }

    #[test]
    fn a_sparkplug_contract_needs_its_table_and_its_ids_are_checked() {
        let e = err(&with("contract = \"sparkplug\"", ""));
        assert!(
            e.contains("mqtt.contract: publishes Sparkplug: add a [sparkplug]"),
            "{e}"
        );
        let e = err(&with("", "[sparkplug]\ngroup_id = \"plant-1\""));
        assert!(
            e.contains("sparkplug: [sparkplug] is set but mqtt.contract"),
            "{e}"
        );
        let e = err(&with(
            "contract = \"both\"",
            "[sparkplug]\ngroup_id = \"plant/1\"",
        ));
        assert!(
            e.contains("sparkplug.group_id: group_id \"plant/1\" cannot be a Sparkplug id"),
            "{e}"
        );
        let e = err(&with("contract = \"spb\"", ""));
        assert!(e.contains("mqtt.contract: must be \"json\""), "{e}");
        let ok = with(
            "contract = \"both\"",
            "[sparkplug]\ngroup_id = \"plant-1\"\naliases = true\nprimary_host_id = \"scada\"",
        );
        let c = parse(&ok, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.mqtt.contract, Contract::Both);
        let s = c.sparkplug.clone().expect("sparkplug");
        assert_eq!(
            (s.group_id.as_str(), s.edge_node_id.as_str()),
            ("plant-1", c.gateway.id.as_str())
        );
        assert!(s.aliases);
        assert_eq!(s.primary_host_id.as_deref(), Some("scada"));
        // `check` says what a host will see.
        let summary = c.summary();
        assert!(
            summary.contains("sparkplug B edge node plant-1/")
                && summary.contains("beside the JSON topics")
                && summary.contains("waits for primary host scada (spBv1.0/STATE/scada)"),
            "{summary}"
        );
    }
}
