//! `[metrics]`: where the Prometheus endpoint listens. No table, no endpoint.

use super::model::Metrics;
use super::raw::RawMetrics;
use super::source::Source;
use super::ConfigError;

impl Source<'_> {
    /// `[metrics]`, when the file has the table.
    pub(super) fn metrics(&self, m: RawMetrics) -> Result<Metrics, ConfigError> {
        Ok(Metrics {
            listen: m.listen.get_ref().trim().parse().map_err(|_| {
                self.at(
                    &m.listen,
                    "metrics.listen",
                    format!(
                        "\"{}\" is not IP:PORT; write e.g. \"127.0.0.1:9898\" or \"[::1]:9898\"",
                        m.listen.get_ref()
                    ),
                )
            })?,
        })
    }
}
