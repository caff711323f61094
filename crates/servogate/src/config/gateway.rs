//! `[gateway]`: the gateway's id and its log filter (checked lightly here; the logger
//! parses it for real).

use super::model::Gateway;
use super::raw::RawGateway;
use super::source::{topic_safe, Source, TOPIC_SAFE};
use super::ConfigError;

/// `[gateway] log` when the file leaves it out (`RUST_LOG` may still override it).
const DEFAULT_LOG: &str = "info";

impl Source<'_> {
    /// `[gateway]`: the id (it goes into topics) and the log filter.
    pub(super) fn gateway(&self, g: &RawGateway) -> Result<Gateway, ConfigError> {
        let id = g.id.get_ref().clone();
        if !topic_safe(&id) {
            return Err(self.at(&g.id, "gateway.id", TOPIC_SAFE));
        }
        let log = match &g.log {
            Some(l) => {
                check_log_filter(l.get_ref()).map_err(|m| self.at(l, "gateway.log", m))?;
                l.get_ref().trim().to_owned()
            }
            None => DEFAULT_LOG.to_owned(),
        };
        Ok(Gateway { id, log })
    }
}

/// A light check of a log filter: comma-separated `LEVEL` or `TARGET=LEVEL` directives.
/// Span filters (`[...]`) are left to the logger.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if filter.trim().is_empty() {
        return Err("must not be empty; e.g. \"info\" or \"info,servogate_modbus=debug\"".into());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if directive.contains('[') {
            continue;
        }
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        let is_target = !directive.contains('=');
        let ok_level = LEVELS.contains(&level.to_ascii_lowercase().as_str());
        // A bare word that is no level is a target (`servogate` = everything from it).
        if !(ok_level || (is_target && topic_like(level))) {
            return Err(format!(
                "\"{directive}\": the level must be one of trace, debug, info, warn, error, off"
            ));
        }
    }
    Ok(())
}

fn topic_like(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::check_log_filter;

    #[test]
    fn log_filters_are_checked_lightly() {
        assert!(check_log_filter("info").is_ok());
        assert!(check_log_filter("warn,servogate_modbus=debug").is_ok());
        assert!(check_log_filter("servogate").is_ok());
        assert!(check_log_filter("info,servogate=loud").is_err());
        assert!(check_log_filter("").is_err());
    }
}
