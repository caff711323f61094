//! `servogate cmd`: sends one command to a device through the configured broker, waits
//! for its result and prints it (DESIGN.md section 7). Exit 0 only for `done`.
//!
//! `servogate cmd --config FILE axis-1 move position=120 --ttl 500ms` publishes
//! `{"id":"cli-…","action":"move","position":120,"ts":"<now>","ttl_ms":500}` on
//! `{prefix}/devices/axis-1/cmd` (signed when `commands.hmac_key_file` is set), after
//! subscribing to `{prefix}/devices/axis-1/cmd/result`, and prints the result whose id
//! matches.

use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::Usage;

/// The command line of `servogate cmd`.
#[derive(Debug, clap::Args)]
pub struct CmdArgs {
    /// The TOML config file (broker, topic prefix, signing key).
    #[arg(long, short)]
    pub config: std::path::PathBuf,
    /// The device, as named in the config.
    pub device: String,
    /// write, enable, disable, quick_stop, halt, fault_reset, move or velocity.
    pub action: String,
    /// Parameters as name=value: position=120 velocity=50 relative=true
    /// wait=target_reached; for `write`, the fields to set (speed_limit=150).
    pub params: Vec<String>,
    /// How long after sending it the command may still start.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The command id (default: a fresh one). The same id is never executed twice.
    #[arg(long)]
    pub id: Option<String>,
    /// How long to wait for the result.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

fn value(text: &str) -> Value {
    if let Ok(b) = text.parse::<bool>() {
        return Value::Bool(b);
    }
    match text
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
    {
        Some(n) => Value::Number(n),
        None => Value::String(text.to_owned()),
    }
}

/// The command's JSON text.
fn payload(args: &CmdArgs, id: &str, now: SystemTime) -> anyhow::Result<String> {
    let mut obj = Map::new();
    obj.insert("id".into(), Value::String(id.to_owned()));
    obj.insert("action".into(), Value::String(args.action.clone()));
    let mut values = Map::new();
    for p in &args.params {
        let Some((k, v)) = p.split_once('=') else {
            return Err(Usage(format!("parameter {p:?} is not name=value")).into());
        };
        if args.action == "write" {
            values.insert(k.to_owned(), value(v));
        } else {
            obj.insert(k.to_owned(), value(v));
        }
    }
    if args.action == "write" {
        obj.insert("values".into(), Value::Object(values));
    }
    obj.insert(
        "ts".into(),
        Value::String(servogate_mqtt::payload::rfc3339_millis(now)),
    );
    obj.insert("ttl_ms".into(), Value::from(args.ttl.as_millis() as u64));
    Ok(Value::Object(obj).to_string())
}

/// Sends the command and waits for its result; true when it is `done`.
pub async fn run(cfg: Config, args: CmdArgs) -> anyhow::Result<bool> {
    if cfg.device(&args.device).is_none() {
        return Err(Usage(format!(
            "no device named {:?} in {}",
            args.device,
            cfg.file.display()
        ))
        .into());
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("cli-{:012x}", fastrand::u64(..) >> 16));
    let text = payload(&args, &id, SystemTime::now())?;
    let body = match &cfg.commands.key {
        None => text,
        Some(key) => {
            let sig = servogate_command::sign::sign_hex(key, text.as_bytes());
            serde_json::json!({"signed": text, "sig": sig}).to_string()
        }
    };
    let mut settings = crate::app::mqtt_settings(&cfg)?;
    settings.client_id = format!("{}-cmd-{:08x}", cfg.gateway.id, fastrand::u32(..));
    let opts = settings.client_options()?;
    let prefix = &cfg.mqtt.topic_prefix;
    let cmd_topic = format!("{prefix}/devices/{}/cmd", args.device);
    let result_topic = format!("{cmd_topic}/result");
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    client
        .subscribe(&result_topic, QoS::AtLeastOnce)
        .await
        .context("subscribe")?;
    let wait = async {
        let mut sent = false;
        loop {
            let event = eventloop
                .poll()
                .await
                .with_context(|| format!("MQTT broker at {}", cfg.mqtt.url))?;
            match event {
                // Subscribed before sending: the result cannot slip past.
                Event::Incoming(Packet::SubAck(_)) if !sent => {
                    sent = true;
                    client
                        .publish(&cmd_topic, QoS::AtLeastOnce, false, body.clone())
                        .await
                        .context("publish")?;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == result_topic => {
                    let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                        continue;
                    };
                    if v.get("id").and_then(Value::as_str) == Some(id.as_str()) {
                        // As published: the contract's key order, byte for byte.
                        println!("{}", String::from_utf8_lossy(&p.payload));
                        let _ = client.disconnect().await;
                        return anyhow::Ok(v.get("status").and_then(Value::as_str) == Some("done"));
                    }
                }
                _ => {}
            }
        }
    };
    match tokio::time::timeout(args.ttl + args.wait, wait).await {
        Ok(r) => r,
        Err(_) => bail!(
            "no result for command {id} within {:?} (is servogate running with this config?)",
            args.ttl + args.wait
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: CmdArgs,
    }

    #[test]
    fn parameters_become_json_numbers_booleans_or_write_values() {
        let t = T::parse_from([
            "x",
            "-c",
            "f.toml",
            "axis-1",
            "move",
            "position=120.5",
            "relative=true",
            "wait=target_reached",
        ]);
        let v: Value =
            serde_json::from_str(&payload(&t.a, "c1", SystemTime::UNIX_EPOCH).unwrap()).unwrap();
        assert_eq!(v["position"], 120.5);
        assert_eq!(v["relative"], true);
        assert_eq!(v["wait"], "target_reached");
        assert_eq!(v["ttl_ms"], 500);
        let t = T::parse_from(["x", "-c", "f.toml", "axis-1", "write", "speed_limit=150"]);
        let v: Value =
            serde_json::from_str(&payload(&t.a, "c2", SystemTime::UNIX_EPOCH).unwrap()).unwrap();
        assert_eq!(v["values"]["speed_limit"], 150.0);
        let t = T::parse_from(["x", "-c", "f.toml", "axis-1", "move", "position"]);
        assert!(payload(&t.a, "c3", SystemTime::UNIX_EPOCH).is_err());
    }
}
