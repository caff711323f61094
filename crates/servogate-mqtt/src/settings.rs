//! Broker settings, their validation, and the rumqttc options and TLS config built from them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::rustls;
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};

use crate::wire::{self, Client, Conn, Version, Will};

/// Everything the forwarder needs to reach the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (default 8883).
    /// Credentials do not go in the url: see [`credentials`](Self::credentials).
    pub url: String,
    pub client_id: String,
    /// `{prefix}` of every topic, e.g. `servogate/cell-7`.
    pub topic_prefix: String,
    /// QoS of the telemetry topic: 0 or 1. 2 is accepted and sent as 1: delivery is already
    /// at-least-once end to end (the ring re-publishes after a new session) and consumers
    /// dedupe by `seq`, so QoS 2's extra round trip would buy nothing.
    pub telemetry_qos: u8,
    /// MQTT keep alive; zero (off) or at least one second (rumqttc's limit).
    pub keep_alive: Duration,
    /// Largest packet sent or accepted. An event whose packet would be larger is refused,
    /// counted and removed from the ring (one oversize publish would drop the connection).
    pub max_packet_size: usize,
    /// Required with `mqtts://`.
    pub tls: Option<TlsFiles>,
    pub credentials: Option<Credentials>,
    /// Reconnect backoff: the first wait after a lost connection, doubling up to `reconnect_max`,
    /// each wait jittered down to half so many gateways do not reconnect in step.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long a shutdown waits for the broker to acknowledge what is left in the ring.
    pub shutdown_grace: Duration,
    /// MQTT 3.1.1 (default) or 5.
    pub version: Version,
    /// MQTT 5: topic aliases the forwarder may use (0: none). The broker may grant fewer.
    pub topic_aliases: u16,
}

impl MqttSettings {
    /// Settings with the defaults: telemetry QoS 1, keep alive 30 s, 256 KiB packets, no TLS,
    /// no credentials, reconnect 100 ms..30 s, shutdown grace 5 s.
    pub fn new(
        url: impl Into<String>,
        client_id: impl Into<String>,
        topic_prefix: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            client_id: client_id.into(),
            topic_prefix: topic_prefix.into(),
            telemetry_qos: 1,
            keep_alive: Duration::from_secs(30),
            max_packet_size: 256 * 1024,
            tls: None,
            credentials: None,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            version: Version::V311,
            topic_aliases: 0,
        }
    }
}

/// PEM files for `mqtts://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) the broker's certificate must chain to. A system bundle such as
    /// `/etc/ssl/certs/ca-certificates.crt` works for a broker with a public certificate.
    pub ca: PathBuf,
    /// Client certificate chain and its private key, for brokers that require one; both or
    /// neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Broker login. `Debug` is written by hand so the password never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why the forwarder could not start. Connection problems are not errors: the forwarder
/// retries them for ever and reports them in [`MqttStats`](crate::MqttStats).
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("bad MQTT url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid MQTT setting: {0}")]
    Setting(String),
    #[error("cannot read TLS file {}: {source}", path.display())]
    TlsRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS file {}: {reason}", path.display())]
    TlsFile { path: PathBuf, reason: String },
    #[error("the MQTT event loop task ended unexpectedly: {0}")]
    EventLoop(String),
}

/// A parsed broker url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    /// Host name or IP address (an IPv6 address keeps its brackets).
    pub host: String,
    pub port: u16,
}

/// Parses `mqtt://host[:port]` / `mqtts://host[:port]` (`tcp://` and `ssl://` are accepted
/// as aliases). User info, paths and queries are refused rather than silently ignored.
pub fn parse_url(url: &str) -> Result<BrokerUrl, MqttError> {
    let bad = |reason: &str| MqttError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected mqtt://host:port or mqtts://host:port"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        _ => return Err(bad("the scheme must be mqtt or mqtts")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err(bad("a broker url has no path or query"));
    }
    if rest.contains('@') {
        return Err(bad(
            "put credentials in the credentials file, not in the url",
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed '[' in IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("expected ':' after the IPv6 address"))?,
            ),
        };
        (format!("[{addr}]"), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (rest.to_owned(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("missing host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(bad("the port must be a number from 1 to 65535")),
        },
    };
    Ok(BrokerUrl { tls, host, port })
}

/// Smallest `max_packet_size` accepted: room for the status and a modest telemetry payload.
const MIN_PACKET_SIZE: usize = 1024;

impl MqttSettings {
    /// Checks everything that can be checked without the network.
    pub fn validate(&self) -> Result<BrokerUrl, MqttError> {
        let url = parse_url(&self.url)?;
        let setting = |s: String| Err(MqttError::Setting(s));
        if self.telemetry_qos > 2 {
            return setting(format!("qos must be 0, 1 or 2, not {}", self.telemetry_qos));
        }
        if !self.keep_alive.is_zero() && self.keep_alive < Duration::from_secs(1) {
            return setting("keep_alive must be 0 (off) or at least 1s".into());
        }
        if self.topic_aliases > 0 && self.version != Version::V5 {
            return setting("topic_aliases needs MQTT 5 (version = 5)".into());
        }
        if self.max_packet_size < MIN_PACKET_SIZE {
            return setting(format!(
                "max_packet_size must be at least {MIN_PACKET_SIZE} bytes"
            ));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return setting("reconnect_min must be above 0 and at most reconnect_max".into());
        }
        let p = &self.topic_prefix;
        if p.is_empty() || p.contains(['+', '#', '\0']) || p.ends_with('/') {
            return setting(format!(
                "topic_prefix {p:?} must be non-empty, without + # or a trailing /"
            ));
        }
        match (&self.tls, url.tls) {
            (None, true) => return setting("mqtts:// needs tls.ca".into()),
            (Some(_), false) => {
                return setting("tls files are given but the url is not mqtts://".into())
            }
            _ => {}
        }
        Ok(url)
    }

    /// The forwarder's connection, in `version`: clean session (the ring, not the broker,
    /// owns delivery), the Last Will, packet limits, in-flight window, login and transport.
    /// Reads the TLS files.
    pub(crate) fn connect(
        &self,
        url: &BrokerUrl,
        will: Will,
        inflight: u16,
        channel: usize,
    ) -> Result<(Client, Conn), MqttError> {
        Ok(match self.version {
            Version::V311 => {
                let mut opts = self.options(url)?;
                opts.set_inflight(inflight).set_last_will(wire::will4(will));
                let (c, el) = rumqttc::AsyncClient::new(opts, channel);
                (Client::V4(c), Conn::V4(Box::new(el)))
            }
            Version::V5 => {
                let mut opts = self.options_v5(url)?;
                opts.set_outgoing_inflight_upper_limit(inflight)
                    .set_last_will(wire::will5(will));
                let (c, el) = rumqttc::v5::AsyncClient::new(opts, channel);
                (Client::V5(c), Conn::V5(Box::new(el)))
            }
        })
    }

    /// A second connection to the same broker in the same version (the replay answerer):
    /// the same login and transport, client id `client_id`, no Last Will.
    pub fn session(&self, client_id: &str, channel: usize) -> Result<(Client, Conn), MqttError> {
        let url = self.validate()?;
        Ok(match self.version {
            Version::V311 => {
                let mut opts = self.options(&url)?;
                opts.set_client_id(client_id.to_owned());
                let (c, el) = rumqttc::AsyncClient::new(opts, channel);
                (Client::V4(c), Conn::V4(Box::new(el)))
            }
            Version::V5 => {
                let mut opts = self.options_v5(&url)?;
                opts.set_client_id(client_id.to_owned());
                let (c, el) = rumqttc::v5::AsyncClient::new(opts, channel);
                (Client::V5(c), Conn::V5(Box::new(el)))
            }
        })
    }

    /// [`Self::options`], in MQTT 5.
    fn options_v5(&self, url: &BrokerUrl) -> Result<rumqttc::v5::MqttOptions, MqttError> {
        let mut opts =
            rumqttc::v5::MqttOptions::new(self.client_id.clone(), url.host.clone(), url.port);
        let max = u32::try_from(self.max_packet_size).unwrap_or(u32::MAX);
        opts.set_clean_start(true)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(Some(max));
        if let Some(c) = &self.credentials {
            opts.set_credentials(c.username.clone(), c.password.clone());
        }
        if let Some(t) = self.transport()? {
            opts.set_transport(t);
        }
        Ok(opts)
    }

    /// TLS with the configured files, or `None` for plain TCP. Reads the files.
    fn transport(&self) -> Result<Option<Transport>, MqttError> {
        let Some(files) = &self.tls else {
            return Ok(None);
        };
        let config = tls_client_config(files)?;
        Ok(Some(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        ))))
    }

    /// Options for a short-lived client of the same broker (`servogate cmd`): the same
    /// login and transport, no Last Will.
    pub fn client_options(&self) -> Result<MqttOptions, MqttError> {
        self.options(&self.validate()?)
    }

    /// What every client of ours sets: clean session (the ring, not the broker, owns
    /// delivery), keep alive, packet limits, login and transport. Reads the TLS files.
    fn options(&self, url: &BrokerUrl) -> Result<MqttOptions, MqttError> {
        let mut opts = MqttOptions::new(self.client_id.clone(), url.host.clone(), url.port);
        opts.set_clean_session(true)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(self.max_packet_size, self.max_packet_size);
        if let Some(c) = &self.credentials {
            opts.set_credentials(c.username.clone(), c.password.clone());
        }
        if let Some(t) = self.transport()? {
            opts.set_transport(t);
        }
        Ok(opts)
    }

    pub(crate) fn telemetry_qos(&self) -> QoS {
        match self.telemetry_qos {
            0 => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::TlsRead {
        path: path.to_owned(),
        source,
    })
}

fn pem_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, MqttError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MqttError::TlsFile {
            path: path.to_owned(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(MqttError::TlsFile {
            path: path.to_owned(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Builds the rustls client config (the rustls that rumqttc 0.25 re-exports through
/// `tokio_rustls`) from PEM files.
///
/// The crypto provider is named explicitly (aws-lc-rs, the one rumqttc's `use-rustls`
/// feature brings) instead of `ClientConfig::builder()`, which panics at run time when a
/// second provider is compiled in and none was installed as the process default.
pub fn tls_client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, MqttError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(pem_certs(&files.ca)?);
    if added == 0 {
        return Err(MqttError::TlsFile {
            path: files.ca.clone(),
            reason: "no usable CA certificate".into(),
        });
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Setting(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = pem_certs(cert)?;
            let pem = read_file(key)?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .map_err(|e| MqttError::TlsFile {
                    path: key.clone(),
                    reason: format!("bad PEM: {e}"),
                })?
                .ok_or_else(|| MqttError::TlsFile {
                    path: key.clone(),
                    reason: "no PRIVATE KEY block found".into(),
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| MqttError::TlsFile {
                    path: cert.clone(),
                    reason: format!("client certificate and key do not work together: {e}"),
                })
        }
        _ => Err(MqttError::Setting(
            "tls.client_cert and tls.client_key go together".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_and_explicit_ports() {
        let u = parse_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 1884));
        let u = parse_url("mqtts://broker.example").unwrap();
        assert_eq!((u.tls, u.port), (true, 8883));
        let u = parse_url("mqtt://[::1]:1885/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 1885));
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for url in [
            "127.0.0.1:1883",
            "http://h:1",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u:p@h:1883",
            "mqtt://h:1883/topic",
        ] {
            let err = parse_url(url).unwrap_err();
            assert!(matches!(err, MqttError::BadUrl { .. }), "{url}: {err}");
        }
    }

    #[test]
    fn credentials_debug_never_shows_the_password() {
        let c = Credentials {
            username: "gw".into(),
            password: "s3cret".into(),
        };
        let text = format!("{c:?}");
        assert!(text.contains("gw") && !text.contains("s3cret"), "{text}");
        let mut s = MqttSettings::new("mqtt://h", "c", "p");
        s.credentials = Some(c);
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn settings_validation_catches_inconsistent_values() {
        let ok = MqttSettings::new("mqtt://h", "c", "servogate/cell-7");
        assert!(ok.validate().is_ok());
        let mut s = ok.clone();
        s.keep_alive = Duration::from_millis(500);
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.url = "mqtts://h".into();
        assert!(s.validate().is_err(), "mqtts without a CA");
        let mut s = ok.clone();
        s.topic_prefix = "a/+/b".into();
        assert!(s.validate().is_err());
        let mut s = ok.clone();
        s.reconnect_min = Duration::from_secs(60);
        assert!(s.validate().is_err());
        let mut s = ok;
        s.telemetry_qos = 3;
        assert!(s.validate().is_err());
    }

    #[test]
    fn an_unreadable_tls_file_is_named_in_the_error() {
        let files = TlsFiles {
            ca: PathBuf::from("/nonexistent/ca.pem"),
            client_cert: None,
            client_key: None,
        };
        let err = tls_client_config(&files).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_certificates_is_refused_naming_the_path() {
        let path = std::env::temp_dir().join(format!("sg-mqtt-notpem-{}", std::process::id()));
        std::fs::write(&path, b"not a certificate\n").unwrap();
        let files = TlsFiles {
            ca: path.clone(),
            client_cert: None,
            client_key: None,
        };
        let err = tls_client_config(&files).unwrap_err();
        std::fs::remove_file(&path).ok();
        assert!(matches!(err, MqttError::TlsFile { .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()));
    }
}
