//! `[devices.commands]` (one device's command policy) and `[commands]` (gateway-wide):
//! DESIGN.md section 7. Default deny: a device without `[devices.commands]` takes no
//! command. What a policy allows must be possible with the device's profile: a Modbus
//! `move` needs `controlword`, `statusword` and `target_position` fields, a `write` field
//! must be a holding register of the profile, and a limit must name a field the commands
//! can set.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use servogate_command::{Action, Limit, Policy, Rules, SigningKey};
use servogate_modbus::profile::{DataType, Field, RegisterKind};

use super::raw::S;
use super::source::Source;
use super::ConfigError;

/// How far ahead of the gateway's clock a command's `ts` may be.
const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(1);
/// Telemetry older than `STALE_POLLS` poll periods (plus [`STALE_SLACK`]) is stale.
const STALE_POLLS: u32 = 3;
const STALE_SLACK: Duration = Duration::from_millis(100);

/// `[devices.commands]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    allow: Option<Vec<S<String>>>,
    writable: Option<Vec<S<String>>>,
    max_age: Option<S<String>>,
    max_rate: Option<S<f64>>,
    require_fresh: Option<S<bool>>,
    stale_after: Option<S<String>>,
    limits: Option<BTreeMap<String, S<RawLimit>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    min: Option<S<f64>>,
    max: Option<S<f64>>,
    max_step: Option<S<f64>>,
}

/// `[commands]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCommands {
    max_clock_skew: Option<S<String>>,
    hmac_key_file: Option<S<PathBuf>>,
}

/// `[commands]`: rules for every device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Commands {
    pub rules: Rules,
    /// Set: every command must be signed with this key.
    pub hmac_key_file: Option<PathBuf>,
    pub key: Option<SigningKey>,
}

/// The fields a Modbus CiA 402 action needs in the profile, besides the statusword.
fn needs(action: &str) -> &'static [&'static str] {
    match action {
        "enable" | "disable" | "quick_stop" | "halt" | "fault_reset" => {
            &["controlword", "statusword"]
        }
        "move" => &["controlword", "statusword", "target_position"],
        "velocity" => &["controlword", "statusword", "target_velocity"],
        _ => &[],
    }
}

impl Source<'_> {
    /// `[commands]`; the key file is read here, so a bad path stops the start.
    pub(super) fn commands(&self, raw: Option<S<RawCommands>>) -> Result<Commands, ConfigError> {
        let Some(raw) = raw else {
            return Ok(Commands::default());
        };
        let c = raw.into_inner();
        let max_clock_skew = self.duration(
            &c.max_clock_skew,
            "commands.max_clock_skew",
            DEFAULT_MAX_CLOCK_SKEW,
        )?;
        let key = match &c.hmac_key_file {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path.get_ref()).map_err(|e| {
                    self.at(
                        path,
                        "commands.hmac_key_file",
                        format!("cannot read {}: {e}", path.get_ref().display()),
                    )
                })?;
                // A trailing newline from `echo secret > file` is not part of the key.
                let trimmed = bytes.trim_ascii_end();
                if trimmed.len() < 16 {
                    return Err(self.at(
                        path,
                        "commands.hmac_key_file",
                        "the key must be at least 16 bytes long",
                    ));
                }
                Some(SigningKey::new(trimmed.to_vec()))
            }
        };
        Ok(Commands {
            rules: Rules { max_clock_skew },
            hmac_key_file: c.hmac_key_file.map(S::into_inner),
            key,
        })
    }

    /// One device's `[devices.commands]`, against its profile's `fields` (`None` for a
    /// CANopen device) and its poll period.
    pub(super) fn command_policy(
        &self,
        raw: S<RawPolicy>,
        key: &dyn Fn(&str) -> String,
        fields: Option<&[Field]>,
        poll: Duration,
    ) -> Result<Policy, ConfigError> {
        let table = raw.span();
        let p = raw.into_inner();
        let Some(fields) = fields else {
            return Err(self.error(
                table,
                Some(key("commands")),
                "commands to CANopen drives are not supported yet: only modbus-rtu devices take commands".into(),
            ));
        };
        let field = |name: &str| fields.iter().find(|f| &*f.name == name);
        let mut allow = Vec::new();
        for a in p.allow.iter().flatten() {
            let name = a.get_ref();
            if !Action::NAMES.contains(&name.as_str()) {
                return Err(self.at(
                    a,
                    key("commands.allow"),
                    format!(
                        "unknown action \"{name}\" (actions: {})",
                        Action::NAMES.join(", ")
                    ),
                ));
            }
            if let Some(missing) = needs(name).iter().find(|f| field(f).is_none()) {
                return Err(self.at(
                    a,
                    key("commands.allow"),
                    format!("\"{name}\" needs a `{missing}` field in the device's profile"),
                ));
            }
            allow.push(name.clone());
        }
        let mut writable = Vec::new();
        for w in p.writable.iter().flatten() {
            let name = w.get_ref();
            let Some(f) = field(name) else {
                return Err(self.at(
                    w,
                    key("commands.writable"),
                    format!("\"{name}\" is not a field of the device's profile"),
                ));
            };
            if f.kind != RegisterKind::Holding || (f.data_type == DataType::Bool && f.bit.is_some())
            {
                return Err(self.at(
                    w,
                    key("commands.writable"),
                    format!("\"{name}\" cannot be written (an input register, or one bit of a register)"),
                ));
            }
            writable.push(name.clone());
        }
        let max_age = match &p.max_age {
            None => None,
            Some(v) => Some(self.parse_duration(v, key("commands.max_age"))?),
        };
        let max_rate = match &p.max_rate {
            None => None,
            Some(v) if !(v.get_ref().is_finite() && *v.get_ref() > 0.0) => {
                return Err(self.at(
                    v,
                    key("commands.max_rate"),
                    "must be above zero (commands per second)",
                ))
            }
            Some(v) => Some(*v.get_ref()),
        };
        let stale_after = self.positive(
            &p.stale_after,
            key("commands.stale_after"),
            poll * STALE_POLLS + STALE_SLACK,
        )?;
        let mut limits = BTreeMap::new();
        for (name, l) in p.limits.unwrap_or_default() {
            let known = ["position", "velocity"].contains(&name.as_str()) || field(&name).is_some();
            if !known {
                return Err(self.at(
                    &l,
                    key(&format!("commands.limits.{name}")),
                    format!("\"{name}\" is neither a profile field nor position/velocity"),
                ));
            }
            let l = l.into_inner();
            let num = |v: &Option<S<f64>>, k: &str| -> Result<Option<f64>, ConfigError> {
                match v {
                    Some(x) if !x.get_ref().is_finite() => Err(self.at(
                        x,
                        key(&format!("commands.limits.{name}.{k}")),
                        "must be a finite number",
                    )),
                    Some(x) => Ok(Some(*x.get_ref())),
                    None => Ok(None),
                }
            };
            let limit = Limit {
                min: num(&l.min, "min")?,
                max: num(&l.max, "max")?,
                max_step: num(&l.max_step, "max_step")?,
            };
            if let (Some(min), Some(max), Some(at)) = (limit.min, limit.max, &l.max) {
                if min > max {
                    return Err(self.at(
                        at,
                        key(&format!("commands.limits.{name}.max")),
                        format!("max {max} is below min {min}"),
                    ));
                }
            }
            limits.insert(name, limit);
        }
        Ok(Policy {
            allow,
            writable,
            max_age,
            max_rate,
            require_fresh: p.require_fresh.map(|v| *v.get_ref()).unwrap_or(false),
            stale_after,
            limits,
            fields: fields.iter().map(|f| f.name.to_string()).collect(),
        })
    }
}
