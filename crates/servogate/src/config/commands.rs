//! `[devices.commands]` (one device's command policy) and `[commands]` (gateway-wide):
//! DESIGN.md section 7. Default deny: a device without `[devices.commands]` takes no
//! command. What a policy allows must be possible with the device's profile: a Modbus
//! `move` needs `controlword`, `statusword` and `target_position` fields, a `write` field
//! must be a holding register of the profile, and a limit must name a field the commands
//! can set. A CANopen drive has every CiA 402 action through its objects (0x6040, 0x6060,
//! 0x607A, 0x6081, 0x60FF); its `writable` names objects the config adds to it (by
//! index, as SDO-written values: not the built-in telemetry objects, nothing 64-bit, as
//! commands write expedited SDO).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use servogate_canopen::{ObjType, ObjectTable};
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

/// What a device's commands are carried by.
#[derive(Clone, Copy)]
pub(super) enum Target<'a> {
    /// A Modbus device's profile fields.
    Modbus(&'a [Field]),
    /// A CANopen drive's objects (the `cia402` profile plus the config's).
    Canopen(&'a ObjectTable),
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

    /// One device's `[devices.commands]`, against its profile's fields or its CANopen
    /// objects, and its poll period.
    pub(super) fn command_policy(
        &self,
        raw: S<RawPolicy>,
        key: &dyn Fn(&str) -> String,
        target: Option<Target<'_>>,
        poll: Duration,
    ) -> Result<Policy, ConfigError> {
        let p = raw.into_inner();
        let no_fields: &[Field] = &[];
        let fields = match target {
            Some(Target::Modbus(f)) => f,
            _ => no_fields,
        };
        let objects = match target {
            Some(Target::Canopen(o)) => Some(o),
            _ => None,
        };
        let field = |name: &str| fields.iter().find(|f| &*f.name == name);
        let object = |name: &str| objects.and_then(|o| o.iter().find(|x| &*x.name == name));
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
            let needed = if objects.is_some() {
                &[][..]
            } else {
                needs(name)
            };
            if let Some(missing) = needed.iter().find(|f| field(f).is_none()) {
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
            if objects.is_some() {
                let Some(o) = object(name) else {
                    return Err(self.at(
                        w,
                        key("commands.writable"),
                        format!("\"{name}\" is not an object of the drive"),
                    ));
                };
                let builtin = ObjectTable::builtin(name).is_some_and(|b| b.index == o.index);
                if builtin || matches!(o.ty, ObjType::I64 | ObjType::U64) {
                    return Err(self.at(
                        w,
                        key("commands.writable"),
                        format!("\"{name}\" cannot be written (a built-in telemetry object, or a 64-bit one: commands write expedited SDO)"),
                    ));
                }
                writable.push(name.clone());
                continue;
            }
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
            let known = ["position", "velocity"].contains(&name.as_str())
                || field(&name).is_some()
                || object(&name).is_some();
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
            fields: match objects {
                Some(o) => o.iter().map(|x| x.name.to_string()).collect(),
                None => fields.iter().map(|f| f.name.to_string()).collect(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::fixture::{err, line_of, GOOD};
    use crate::config::parse;

    fn with(extra_fields: &str, policy: &str) -> String {
        let text = GOOD.replace("dc_bus   =", &format!("{extra_fields}\ndc_bus   ="));
        format!("{text}\n[devices.commands]\n{policy}\n")
    }

    const CW: &str = "controlword = { address = 0x0110, type = \"u16\" }\nstatusword = { address = 0x0111, type = \"u16\" }\nspeed_limit = { address = 0x0112, type = \"u16\" }";

    #[test]
    fn a_policy_reaches_the_device_with_its_defaults() {
        let text = with(CW, "allow = [\"enable\", \"write\"]\nwritable = [\"speed_limit\"]\nmax_rate = 20\nlimits.speed_limit = { max = 250 }");
        let cfg = parse(&text, std::path::Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        let p = cfg.devices[0].commands.as_ref().expect("a policy");
        assert_eq!(p.allow, ["enable", "write"]);
        assert_eq!(p.writable, ["speed_limit"]);
        assert_eq!(p.max_rate, Some(20.0));
        assert!(!p.require_fresh);
        assert_eq!(p.max_age, None);
        // 3 x poll (10 ms) + 100 ms.
        assert_eq!(p.stale_after, Duration::from_millis(130));
        assert_eq!(p.limits["speed_limit"].max, Some(250.0));
        assert!(cfg.devices.iter().skip(1).all(|d| d.commands.is_none()));
    }

    #[test]
    fn an_action_the_profile_cannot_carry_names_its_line_and_what_is_missing() {
        let text = with("", "allow = [\"move\"]");
        let e = err(&text);
        let line = line_of(&text, "allow = [\"move\"]");
        assert_eq!(
            e,
            format!("t.toml:{line}:10: devices[0].commands.allow: \"move\" needs a `controlword` field in the device's profile")
        );
        let e = err(&with(CW, "allow = [\"fly\"]"));
        assert!(e.contains("unknown action \"fly\""), "{e}");
    }

    #[test]
    fn a_canopen_drive_takes_the_cia402_actions_and_writes_its_own_objects_only() {
        let can = |policy: &str| {
            format!(
                "{GOOD}\n[[buses]]\nname = \"can0\"\nprotocol = \"canopen\"\ninterface = \"can0\"\n\n\
                 [[devices]]\nname = \"axis-5\"\nbus = \"can0\"\nnode = 5\nprofile = \"cia402\"\n\
                 objects = [{{ name = \"speed_limit\", index = 0x2100, type = \"u16\" }}, \
                 {{ name = \"position\", scale = 0.001 }}]\n\
                 [devices.commands]\n{policy}\n"
            )
        };
        let text = can("allow = [\"enable\", \"move\", \"velocity\", \"write\"]\nwritable = [\"speed_limit\"]\nlimits.position = { min = 0, max = 100 }");
        let cfg = parse(&text, std::path::Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        let p = cfg.devices[1].commands.as_ref().expect("a policy");
        assert_eq!(p.allow, ["enable", "move", "velocity", "write"]);
        assert_eq!(p.writable, ["speed_limit"]);
        let e = err(&can("writable = [\"position\"]"));
        assert!(e.contains("\"position\" cannot be written"), "{e}");
        let e = err(&can("writable = [\"nope\"]"));
        assert!(e.contains("\"nope\" is not an object of the drive"), "{e}");
    }

    #[test]
    fn writable_fields_must_be_holding_registers_of_the_profile() {
        let e = err(&with(CW, "writable = [\"dc_bus\"]"));
        assert!(
            e.contains("commands.writable: \"dc_bus\" cannot be written"),
            "{e}"
        );
        let e = err(&with(CW, "writable = [\"nope\"]"));
        assert!(e.contains("\"nope\" is not a field"), "{e}");
    }

    #[test]
    fn bad_numbers_and_unknown_keys_are_refused_at_their_key() {
        let e = err(&with(CW, "max_rate = 0"));
        assert!(
            e.contains("devices[0].commands.max_rate: must be above zero"),
            "{e}"
        );
        let e = err(&with(CW, "limits.speed_limit = { min = 5, max = 1 }"));
        assert!(
            e.contains("commands.limits.speed_limit.max: max 1 is below min 5"),
            "{e}"
        );
        let e = err(&with(CW, "maximum_rate = 3"));
        assert!(e.contains("maximum_rate"), "{e}");
    }

    #[test]
    fn a_missing_key_file_is_a_config_error_naming_the_key() {
        let text = format!("{GOOD}\n[commands]\nhmac_key_file = \"/nonexistent/cmd.key\"\n");
        let e = err(&text);
        assert!(
            e.contains("commands.hmac_key_file: cannot read /nonexistent/cmd.key"),
            "{e}"
        );
    }
}
