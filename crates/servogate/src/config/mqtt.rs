//! `[mqtt]`: the broker url (checked by `check_url`), topic prefix, QoS, client id,
//! keep-alive, TLS and credentials files, reconnect back-off and the shutdown grace,
//! with their defaults.

use std::time::Duration;

use toml::Spanned;

use servogate_mqtt::Version;

use super::model::{Contract, MqttConfig};
use super::raw::RawMqtt;
use super::source::Source;
use super::ConfigError;

/// A broker on this machine, without TLS.
const DEFAULT_URL: &str = "mqtt://127.0.0.1:1883";
/// QoS of telemetry.
const DEFAULT_QOS: u8 = 1;
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(10);
const DEFAULT_MAX_PACKET_SIZE: usize = 65_536;
const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Not below `DEFAULT_RECONNECT_MIN` (the check of the pair relies on it).
const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(10);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Samples per batched message at most.
const MAX_BATCH: usize = 1000;
/// How long a batch may wait to fill, by default and at most.
const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(20);
const MAX_BATCH_WAIT: Duration = Duration::from_secs(1);

/// `{prefix}` of every topic when the file gives none.
fn default_topic_prefix(gateway_id: &str) -> String {
    format!("servogate/{gateway_id}")
}

/// The MQTT client id when the file gives none.
fn default_client_id(gateway_id: &str) -> String {
    format!("servogate-{gateway_id}")
}

impl Source<'_> {
    /// `[mqtt]`; `id` is the gateway's, for the default topic prefix and client id.
    pub(super) fn mqtt(&self, m: RawMqtt, id: &str) -> Result<MqttConfig, ConfigError> {
        let (url, tls) = match &m.url {
            Some(u) => {
                let tls = check_url(u.get_ref()).map_err(|msg| self.at(u, "mqtt.url", msg))?;
                (u.get_ref().trim().to_owned(), tls)
            }
            None => (DEFAULT_URL.to_owned(), false),
        };
        let topic_prefix = match &m.topic_prefix {
            Some(p) => {
                let s = p.get_ref();
                let bad = if s.is_empty() {
                    Some("must not be empty")
                } else if s.contains(['+', '#']) {
                    Some("must not contain the wildcards + or #")
                } else if s.starts_with('/') || s.ends_with('/') {
                    Some("must not start or end with /")
                } else if s.contains("//") {
                    Some("must not contain an empty level (//)")
                } else if s.contains('\0') {
                    Some("must not contain NUL")
                } else {
                    None
                };
                if let Some(bad) = bad {
                    return Err(self.at(p, "mqtt.topic_prefix", bad));
                }
                s.clone()
            }
            None => default_topic_prefix(id),
        };
        let qos = match &m.qos {
            Some(q) if *q.get_ref() > 1 => {
                return Err(self.at(q, "mqtt.qos", "telemetry QoS must be 0 or 1"))
            }
            Some(q) => *q.get_ref(),
            None => DEFAULT_QOS,
        };
        let client_id = match &m.client_id {
            Some(c) if c.get_ref().trim().is_empty() => {
                return Err(self.at(c, "mqtt.client_id", "must not be empty"))
            }
            Some(c) => c.get_ref().clone(),
            None => default_client_id(id),
        };
        let keep_alive = self.duration(&m.keep_alive, "mqtt.keep_alive", DEFAULT_KEEP_ALIVE)?;
        if let Some(v) = &m.keep_alive {
            if !keep_alive.is_zero() && keep_alive < Duration::from_secs(1) {
                return Err(self.at(
                    v,
                    "mqtt.keep_alive",
                    "must be \"0s\" (off) or at least \"1s\"",
                ));
            }
            if keep_alive > Duration::from_secs(u64::from(u16::MAX)) {
                return Err(self.at(
                    v,
                    "mqtt.keep_alive",
                    "must be at most 65535s (MQTT's limit)",
                ));
            }
        }
        let max_packet_size = match &m.max_packet_size {
            Some(v) if !(1024..=268_435_455).contains(v.get_ref()) => {
                return Err(self.at(v, "mqtt.max_packet_size", "must be 1024 to 268435455 bytes"))
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_MAX_PACKET_SIZE,
        };
        for (name, file) in [
            ("ca_file", &m.ca_file),
            ("cert_file", &m.cert_file),
            ("key_file", &m.key_file),
            ("credentials_file", &m.credentials_file),
        ] {
            if let Some(f) = file {
                let key = format!("mqtt.{name}");
                if f.get_ref().as_os_str().is_empty() {
                    return Err(self.at(f, key, "must not be empty"));
                }
                if !tls && name != "credentials_file" {
                    return Err(self.at(f, key, "TLS files need an mqtts:// url"));
                }
            }
        }
        match (&m.cert_file, &m.key_file) {
            (Some(c), None) => {
                return Err(self.at(
                    c,
                    "mqtt.cert_file",
                    "needs mqtt.key_file too (both or neither)",
                ))
            }
            (None, Some(k)) => {
                return Err(self.at(
                    k,
                    "mqtt.key_file",
                    "needs mqtt.cert_file too (both or neither)",
                ))
            }
            _ => {}
        }
        if let (true, None, Some(u)) = (tls, &m.ca_file, &m.url) {
            return Err(self.at(
                u,
                "mqtt.url",
                "an mqtts:// url needs mqtt.ca_file (the CA that signed the broker's certificate; \
                 /etc/ssl/certs/ca-certificates.crt for a public one)",
            ));
        }
        let reconnect_min = self.positive(
            &m.reconnect_min,
            "mqtt.reconnect_min",
            DEFAULT_RECONNECT_MIN,
        )?;
        let reconnect_max = self.positive(
            &m.reconnect_max,
            "mqtt.reconnect_max",
            DEFAULT_RECONNECT_MAX,
        )?;
        if reconnect_max < reconnect_min {
            let (v, key) = match (&m.reconnect_max, &m.reconnect_min) {
                (Some(v), _) => (v, "mqtt.reconnect_max"),
                (None, Some(v)) => (v, "mqtt.reconnect_min"),
                (None, None) => unreachable!("the defaults are ordered"),
            };
            return Err(self.at(
                v,
                key,
                format!(
                    "reconnect_max ({}) must not be below reconnect_min ({})",
                    humantime::format_duration(reconnect_max),
                    humantime::format_duration(reconnect_min)
                ),
            ));
        }
        let shutdown_grace = self.duration(
            &m.shutdown_grace,
            "mqtt.shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
        )?;
        let version = match &m.version {
            None => Version::V311,
            Some(v) => match v.get_ref() {
                3 => Version::V311,
                5 => Version::V5,
                _ => {
                    return Err(self.at(
                        v,
                        "mqtt.version",
                        "must be 3 (MQTT 3.1.1, the default) or 5 (MQTT 5)",
                    ))
                }
            },
        };
        let topic_aliases = match &m.topic_aliases {
            None => 0,
            Some(raw) => {
                let Ok(n) = u16::try_from(*raw.get_ref()) else {
                    return Err(self.at(raw, "mqtt.topic_aliases", "must be 0 to 65535"));
                };
                if n > 0 && version != Version::V5 {
                    return Err(self.at(
                        raw,
                        "mqtt.topic_aliases",
                        "topic aliases are an MQTT 5 feature: set mqtt.version = 5",
                    ));
                }
                n
            }
        };
        let contract = match &m.contract {
            None => Contract::Json,
            Some(c) => match c.get_ref().as_str() {
                "json" => Contract::Json,
                "sparkplug" => Contract::Sparkplug,
                "both" => Contract::Both,
                _ => {
                    return Err(self.at(
                        c,
                        "mqtt.contract",
                        "must be \"json\" (the default), \"sparkplug\" or \"both\"",
                    ))
                }
            },
        };
        let batch_max = match &m.batch_max {
            None => 1,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(v @ 1..=MAX_BATCH) => v,
                _ => {
                    return Err(self.at(
                        n,
                        "mqtt.batch_max",
                        format!("must be 1 (no batching) to {MAX_BATCH}"),
                    ))
                }
            },
        };
        let batch_wait = self.positive(&m.batch_wait, "mqtt.batch_wait", DEFAULT_BATCH_WAIT)?;
        if let Some(w) = &m.batch_wait {
            if batch_wait > MAX_BATCH_WAIT {
                return Err(self.at(w, "mqtt.batch_wait", "must be at most \"1s\""));
            }
        }
        Ok(MqttConfig {
            url,
            tls,
            topic_prefix,
            qos,
            client_id,
            keep_alive,
            max_packet_size,
            ca_file: m.ca_file.map(Spanned::into_inner),
            cert_file: m.cert_file.map(Spanned::into_inner),
            key_file: m.key_file.map(Spanned::into_inner),
            credentials_file: m.credentials_file.map(Spanned::into_inner),
            reconnect_min,
            reconnect_max,
            shutdown_grace,
            version,
            topic_aliases,
            contract,
            batching: servogate_mqtt::Batching {
                max: batch_max,
                wait: batch_wait,
            },
        })
    }
}

/// Checks an MQTT url; returns whether it is TLS.
fn check_url(url: &str) -> Result<bool, String> {
    let url = url.trim();
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!(
            "\"{url}\" is not a broker url; expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
        ));
    };
    if rest.contains('@') {
        return Err("credentials do not go in the url; use mqtt.credentials_file".to_owned());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err("a broker url has no path or query: mqtt://HOST[:PORT]".to_owned());
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or("unclosed '[' in an IPv6 address")?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("[{addr}] is not an IPv6 address"));
        }
        match after {
            "" => (addr, None),
            p => (
                addr,
                Some(
                    p.strip_prefix(':')
                        .ok_or("expected ':PORT' after the IPv6 address")?,
                ),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let v6 = rest.starts_with('[');
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || (c == ':' && !v6)) {
        return Err("the url names no host".to_owned());
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("\"{p}\" is not a port (1-65535)")),
        }
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::check_url;
    use crate::config::fixture::{err, GOOD};
    use crate::config::parse;

    #[test]
    fn mqtt_settings_are_checked() {
        let with = |mqtt: &str| {
            err(&GOOD.replace("[profiles.ax]", &format!("[mqtt]\n{mqtt}\n\n[profiles.ax]")))
        };
        assert!(with("url = \"http://x\"")
            .starts_with("t.toml:5:7: mqtt.url: \"http://x\" is not a broker url"));
        assert!(
            with("url = \"mqtt://u:p@x\"").contains("mqtt.url: credentials do not go in the url")
        );
        assert!(
            with("url = \"mqtts://x\"").contains("mqtt.url: an mqtts:// url needs mqtt.ca_file")
        );
        assert!(
            with("ca_file = \"ca.pem\"").contains("mqtt.ca_file: TLS files need an mqtts:// url")
        );
        assert!(
            with("url = \"mqtts://x\"\nca_file = \"ca\"\ncert_file = \"c\"")
                .contains("mqtt.cert_file: needs mqtt.key_file too")
        );
        assert!(with("topic_prefix = \"a/+/b\"")
            .contains("mqtt.topic_prefix: must not contain the wildcards"));
        assert!(with("topic_prefix = \"a/b/\"")
            .contains("mqtt.topic_prefix: must not start or end with /"));
        assert!(with("qos = 2").contains("mqtt.qos: telemetry QoS must be 0 or 1"));
        assert!(with("reconnect_min = \"20s\"").contains(
            "mqtt.reconnect_min: reconnect_max (10s) must not be below reconnect_min (20s)"
        ));
        assert!(with("keep_alive = \"500ms\"").contains("mqtt.keep_alive:"));
        assert!(with("version = 4").starts_with("t.toml:5:11: mqtt.version: must be 3"));
        assert!(with("batch_max = 0").contains("mqtt.batch_max: must be 1 (no batching) to 1000"));
        assert!(with("batch_max = 1001").contains("mqtt.batch_max: must be 1"));
        assert!(with("batch_wait = \"2s\"").contains("mqtt.batch_wait: must be at most"));
        let durable = GOOD
            .replace("[profiles.ax]", "[mqtt]\nbatch_max = 10\n\n[profiles.ax]")
            .replacen("[gateway]", "[buffer]\npath = \"/tmp/x\"\n\n[gateway]", 1);
        assert!(err(&durable)
            .contains("mqtt.batch_max: the JSON contract is batched in memory mode only"));
        assert!(with("topic_aliases = 8").contains(
            "mqtt.topic_aliases: topic aliases are an MQTT 5 feature: set mqtt.version = 5"
        ));
        assert!(with("version = 5\ntopic_aliases = 70000").contains("mqtt.topic_aliases: must be"));
        let v5 = GOOD.replace(
            "[profiles.ax]",
            "[mqtt]\nversion = 5\ntopic_aliases = 16\n\n[profiles.ax]",
        );
        let c = parse(&v5, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.mqtt.version, c.mqtt.topic_aliases),
            (servogate_mqtt::Version::V5, 16)
        );
        let ok = GOOD.replace(
            "[profiles.ax]",
            "[mqtt]\nurl = \"mqtts://[::1]:8883\"\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\ntopic_prefix = \"plant/line-1\"\nqos = 0\n\n[profiles.ax]",
        );
        let c = parse(&ok, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.mqtt.tls);
        assert_eq!(c.mqtt.topic_prefix, "plant/line-1");
        assert_eq!(c.mqtt.qos, 0);
    }

    #[test]
    fn check_url_accepts_hosts_ports_and_ipv6() {
        assert_eq!(check_url("mqtt://localhost"), Ok(false));
        assert_eq!(check_url("mqtt://10.0.0.1:1884/"), Ok(false));
        assert_eq!(check_url("mqtts://[::1]"), Ok(true));
        assert!(check_url("mqtt://host:0").is_err());
        assert!(check_url("mqtt://host:99999").is_err());
        assert!(check_url("mqtt://:1883").is_err());
        assert!(check_url("mqtt://host/path").is_err());
    }
}
