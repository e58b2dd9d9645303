//! The agent's metrics, rendered in the Prometheus text format for
//! `GET /metrics` (see [`crate::api`]).
//!
//! One [`Metrics`] is created in [`crate::run`] and shared (`Arc`) with the
//! components, which count as data moves. Spool gauges are not pushed: they
//! are read from [`Spool::stats`] at scrape time, so they are never stale.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::config::{Config, SourceConfig};
use crate::event::now_ms;
use crate::spool::{SinkId, Spool};

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_string())]
}

fn plugin_labels(transform: &str, call: PluginCall) -> Labels {
    vec![
        ("transform", transform.to_string()),
        ("call", call.as_str().to_string()),
    ]
}

/// Which plugin export a call was.
#[derive(Debug, Clone, Copy)]
pub enum PluginCall {
    Process,
    Tick,
}

impl PluginCall {
    fn as_str(self) -> &'static str {
        match self {
            PluginCall::Process => "process",
            PluginCall::Tick => "tick",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Configured MQTT sources and sinks, for readiness and scrape-time gauges.
    mqtt_sources: Vec<String>,
    sinks: Vec<String>,
    events_in: Counters,
    events_out: Counters,
    uploaded_bytes: Counters,
    objects: Counters,
    upload_errors: Counters,
    upload_retries: Counters,
    spool_bytes: Gauges,
    spool_unsealed_records: Gauges,
    spool_sealed_batches: Gauges,
    oldest_unsent_age: FloatGauges,
    dropped: Counters,
    plugin_calls: Counters,
    plugin_errors: Counters,
    dead_lettered: Counters,
    plugin_duration: Family<Labels, Histogram>,
    mqtt_connected: Gauges,
    http_refused: Counters,
    batches_dead_lettered: Counters,
    /// Sinks whose store refuses writes for a reason a person must fix.
    blocked_sinks: Mutex<HashMap<String, String>>,
    spool_lost: Counters,
    /// Per sink, the receive time of the oldest record of the batch being
    /// uploaded: sealed records no longer show in the spool's unsealed stats.
    uploading_since_ms: Mutex<HashMap<String, i64>>,
}

impl Metrics {
    pub fn new(config: &Config) -> Metrics {
        let mut registry = Registry::default();
        let events_in = Counters::default();
        registry.register(
            "silt_events_in",
            "Events accepted into the spool, per source",
            events_in.clone(),
        );
        let events_out = Counters::default();
        registry.register(
            "silt_events_out",
            "Events in objects the sink confirmed written",
            events_out.clone(),
        );
        let uploaded_bytes = Counters::default();
        registry.register_with_unit(
            "silt_uploaded",
            "Bytes of objects the sink confirmed written (after compression)",
            Unit::Bytes,
            uploaded_bytes.clone(),
        );
        let objects = Counters::default();
        registry.register(
            "silt_objects_committed",
            "Objects the sink confirmed written",
            objects.clone(),
        );
        let spool_lost = Counters::default();
        registry.register(
            "silt_spool_lost_records",
            "Records acknowledged by an earlier run that the spool no longer had when it opened",
            spool_lost.clone(),
        );
        let upload_errors = Counters::default();
        registry.register(
            "silt_upload_errors",
            "Failed upload attempts",
            upload_errors.clone(),
        );
        let upload_retries = Counters::default();
        registry.register(
            "silt_upload_retries",
            "Upload attempts repeated after a failure or a key conflict",
            upload_retries.clone(),
        );
        let spool_bytes = Gauges::default();
        registry.register_with_unit(
            "silt_spool",
            "Encoded bytes held in the spool for the sink, sealed and unsealed",
            Unit::Bytes,
            spool_bytes.clone(),
        );
        let spool_unsealed_records = Gauges::default();
        registry.register(
            "silt_spool_unsealed_records",
            "Records in the spool not yet sealed into a batch",
            spool_unsealed_records.clone(),
        );
        let spool_sealed_batches = Gauges::default();
        registry.register(
            "silt_spool_sealed_batches",
            "Batches sealed and waiting for (or in) upload",
            spool_sealed_batches.clone(),
        );
        let oldest_unsent_age = FloatGauges::default();
        registry.register_with_unit(
            "silt_spool_oldest_unsent_age",
            "Age of the oldest record not yet confirmed written by the sink (0 when none)",
            Unit::Seconds,
            oldest_unsent_age.clone(),
        );
        let dropped = Counters::default();
        registry.register(
            "silt_events_dropped",
            "Events dropped because the spool was full, by reason (spool.when_full)",
            dropped.clone(),
        );
        let plugin_calls = Counters::default();
        registry.register(
            "silt_plugin_calls",
            "Plugin calls, per transform and export",
            plugin_calls.clone(),
        );
        let plugin_errors = Counters::default();
        registry.register(
            "silt_plugin_errors",
            "Plugin calls that failed (trap, timeout, memory, fuel or err result)",
            plugin_errors.clone(),
        );
        let dead_lettered = Counters::default();
        registry.register(
            "silt_dead_lettered_events",
            "Events written to dead-letter because their transform failed",
            dead_lettered.clone(),
        );
        let plugin_duration = Family::<Labels, Histogram>::new_with_constructor(
            plugin_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "silt_plugin_call_duration",
            "Time spent in plugin calls",
            Unit::Seconds,
            plugin_duration.clone(),
        );
        let mqtt_connected = Gauges::default();
        registry.register(
            "silt_mqtt_connected",
            "1 while the MQTT source is connected to its broker, else 0",
            mqtt_connected.clone(),
        );

        let http_refused = Counters::default();
        registry.register(
            "silt_http_connections_refused",
            "Connections an HTTP source closed at once with 503 because max_connections were open",
            http_refused.clone(),
        );

        let batches_dead_lettered = Counters::default();
        registry.register(
            "silt_batches_dead_lettered",
            "Sealed batches the store refused for good, moved to the dead-letter area, by S3 error code",
            batches_dead_lettered.clone(),
        );

        // Every series exists from the start (at 0), so a rate() has a base.
        let mut mqtt_sources = Vec::new();
        for (name, source) in &config.sources {
            events_in.get_or_create(&label("source", name)).inc_by(0);
            match source {
                SourceConfig::Mqtt(_) => {
                    mqtt_connected.get_or_create(&label("source", name)).set(0);
                    mqtt_sources.push(name.clone());
                }
                SourceConfig::Http(_) => {
                    http_refused.get_or_create(&label("source", name)).inc_by(0);
                }
            }
        }
        let sinks: Vec<String> = config.sinks.keys().cloned().collect();
        for sink in &sinks {
            let l = label("sink", sink);
            for family in [
                &events_out,
                &uploaded_bytes,
                &objects,
                &upload_errors,
                &upload_retries,
            ] {
                family.get_or_create(&l).inc_by(0);
            }
        }
        for reason in ["drop_newest", "drop_oldest"] {
            dropped.get_or_create(&label("reason", reason)).inc_by(0);
        }
        for transform in config.transforms.keys() {
            for call in [PluginCall::Process, PluginCall::Tick] {
                let l = plugin_labels(transform, call);
                plugin_calls.get_or_create(&l).inc_by(0);
                plugin_errors.get_or_create(&l).inc_by(0);
            }
            dead_lettered
                .get_or_create(&label("transform", transform))
                .inc_by(0);
        }

        Metrics {
            registry,
            mqtt_sources,
            sinks,
            events_in,
            events_out,
            uploaded_bytes,
            objects,
            upload_errors,
            upload_retries,
            spool_bytes,
            spool_unsealed_records,
            spool_sealed_batches,
            oldest_unsent_age,
            dropped,
            plugin_calls,
            plugin_errors,
            dead_lettered,
            plugin_duration,
            mqtt_connected,
            http_refused,
            batches_dead_lettered,
            blocked_sinks: Mutex::new(HashMap::new()),
            spool_lost,
            uploading_since_ms: Mutex::new(HashMap::new()),
        }
    }

    pub fn events_in(&self, source: &str, n: u64) {
        self.events_in
            .get_or_create(&label("source", source))
            .inc_by(n);
    }

    /// An object the sink confirmed written.
    pub fn object_committed(&self, sink: &str, events: u64, bytes: u64) {
        let l = label("sink", sink);
        self.events_out.get_or_create(&l).inc_by(events);
        self.uploaded_bytes.get_or_create(&l).inc_by(bytes);
        self.objects.get_or_create(&l).inc();
    }

    /// Counts what the spool found lost when it opened.
    pub fn spool_opened(&self, spool: &Spool) {
        for (sink, &n) in spool.lost_on_open() {
            self.spool_lost
                .get_or_create(&label("sink", sink))
                .inc_by(n);
        }
    }

    pub fn upload_error(&self, sink: &str) {
        self.upload_errors.get_or_create(&label("sink", sink)).inc();
    }

    pub fn upload_retry(&self, sink: &str) {
        self.upload_retries
            .get_or_create(&label("sink", sink))
            .inc();
    }

    /// A batch whose oldest record was received at `oldest_ms` is being
    /// uploaded (`Some`), or no batch is in upload any more (`None`).
    pub fn uploading(&self, sink: &str, oldest_ms: Option<i64>) {
        let mut map = self.uploading_since_ms.lock().expect("lock");
        match oldest_ms {
            Some(ts) => map.insert(sink.to_string(), ts),
            None => map.remove(sink),
        };
    }

    pub fn dropped(&self, newest: u64, oldest: u64) {
        self.dropped
            .get_or_create(&label("reason", "drop_newest"))
            .inc_by(newest);
        self.dropped
            .get_or_create(&label("reason", "drop_oldest"))
            .inc_by(oldest);
    }

    /// One plugin call that took `took`; `failed` when it returned an error.
    pub fn plugin_call(&self, transform: &str, call: PluginCall, took: Duration, failed: bool) {
        let l = plugin_labels(transform, call);
        self.plugin_calls.get_or_create(&l).inc();
        if failed {
            self.plugin_errors.get_or_create(&l).inc();
        }
        self.plugin_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    pub fn dead_lettered(&self, transform: &str, events: u64) {
        self.dead_lettered
            .get_or_create(&label("transform", transform))
            .inc_by(events);
    }

    pub fn batch_dead_lettered(&self, sink: &str, reason: &str) {
        self.batches_dead_lettered
            .get_or_create(&vec![
                ("sink", sink.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// Marks `sink` as refused by its store for `reason` (None: writes go
    /// through again); readiness fails while a sink is marked.
    pub fn sink_blocked(&self, sink: &str, reason: Option<&str>) {
        let mut blocked = self.blocked_sinks.lock().expect("lock");
        match reason {
            Some(r) => blocked.insert(sink.to_string(), r.to_string()),
            None => blocked.remove(sink),
        };
    }

    pub fn http_connection_refused(&self, source: &str) {
        self.http_refused
            .get_or_create(&label("source", source))
            .inc();
    }

    pub fn mqtt_connected(&self, source: &str, connected: bool) {
        self.mqtt_connected
            .get_or_create(&label("source", source))
            .set(i64::from(connected));
    }

    /// Age of the oldest record of `sink` not yet confirmed written, if any.
    pub fn oldest_unsent_age(&self, spool: &Spool, sink: SinkId) -> Option<Duration> {
        let stats = spool.stats(sink);
        let uploading = self
            .uploading_since_ms
            .lock()
            .expect("lock")
            .get(spool.sink_name(sink))
            .copied();
        let oldest = match (stats.oldest_unsealed_ms, uploading) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(Duration::from_millis(
            now_ms().saturating_sub(oldest).max(0) as u64,
        ))
    }

    /// Why the agent is not ready (empty when it is): an MQTT source is not
    /// connected, or a sink's backlog is older than `max_backlog_age`.
    pub fn not_ready(&self, spool: &Spool, max_backlog_age: Duration) -> Vec<String> {
        let mut reasons = Vec::new();
        for source in &self.mqtt_sources {
            if self
                .mqtt_connected
                .get_or_create(&label("source", source))
                .get()
                != 1
            {
                reasons.push(format!("mqtt source `{source}` is not connected"));
            }
        }
        for (sink, reason) in self.blocked_sinks.lock().expect("lock").iter() {
            reasons.push(format!(
                "sink `{sink}`: the store refuses writes ({reason}); check its credentials, permissions, bucket and options"
            ));
        }
        for sink in &self.sinks {
            let Some(id) = spool.sink_id(sink) else {
                continue;
            };
            if let Some(age) = self.oldest_unsent_age(spool, id)
                && age >= max_backlog_age
            {
                reasons.push(format!(
                    "sink `{sink}`: oldest unsent record is {:.1}s old (limit {:.1}s)",
                    age.as_secs_f64(),
                    max_backlog_age.as_secs_f64()
                ));
            }
        }
        reasons
    }

    /// The text exposition, with spool gauges read from `spool` now.
    pub fn render(&self, spool: &Spool) -> String {
        for sink in &self.sinks {
            let Some(id) = spool.sink_id(sink) else {
                continue;
            };
            let stats = spool.stats(id);
            let l = label("sink", sink);
            self.spool_bytes
                .get_or_create(&l)
                .set(clamp(stats.unsealed_bytes + stats.sealed_bytes));
            self.spool_unsealed_records
                .get_or_create(&l)
                .set(clamp(stats.unsealed_records));
            self.spool_sealed_batches
                .get_or_create(&l)
                .set(clamp(stats.sealed_batches));
            let age = self.oldest_unsent_age(spool, id).unwrap_or_default();
            self.oldest_unsent_age
                .get_or_create(&l)
                .set(age.as_secs_f64());
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// 100 µs .. ~3.3 s: plugin calls are meant to be fast; the default timeout is 1 s.
fn plugin_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::config::load_str(
            r#"
            [sources.sensors]
            type = "mqtt"
            url = "mqtt://127.0.0.1:1883"
            topics = ["a/#"]
            [sinks.lake]
            type = "file"
            inputs = ["sensors"]
            path = "/tmp/x"
            "#,
            "test.toml",
        )
        .expect("valid config")
    }

    #[test]
    fn renders_names_with_units_and_initial_series() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config();
        let spool = Spool::open(dir.path(), &["lake".to_string()], &cfg.spool).unwrap();
        let m = Metrics::new(&cfg);
        m.events_in("sensors", 3);
        m.object_committed("lake", 3, 120);
        m.dropped(2, 0);
        let text = m.render(&spool);
        for line in [
            "silt_events_in_total{source=\"sensors\"} 3",
            "silt_events_out_total{sink=\"lake\"} 3",
            "silt_uploaded_bytes_total{sink=\"lake\"} 120",
            "silt_objects_committed_total{sink=\"lake\"} 1",
            "silt_upload_errors_total{sink=\"lake\"} 0",
            "silt_events_dropped_total{reason=\"drop_newest\"} 2",
            "silt_spool_bytes{sink=\"lake\"} 0",
            "silt_spool_oldest_unsent_age_seconds{sink=\"lake\"} 0.0",
            "silt_mqtt_connected{source=\"sensors\"} 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        assert_eq!(
            m.not_ready(&spool, Duration::from_secs(60)),
            vec!["mqtt source `sensors` is not connected".to_string()]
        );
        m.mqtt_connected("sensors", true);
        m.uploading("lake", Some(now_ms() - 120_000));
        let reasons = m.not_ready(&spool, Duration::from_secs(60));
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("sink `lake`"), "{reasons:?}");
        m.uploading("lake", None);
        assert!(m.not_ready(&spool, Duration::from_secs(60)).is_empty());

        m.sink_blocked("lake", Some("AccessDenied"));
        let reasons = m.not_ready(&spool, Duration::from_secs(60));
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].contains("sink `lake`: the store refuses writes (AccessDenied)"),
            "{reasons:?}"
        );
        m.sink_blocked("lake", None);
        assert!(m.not_ready(&spool, Duration::from_secs(60)).is_empty());
        m.batch_dead_lettered("lake", "InvalidStorageClass");
        assert!(m.render(&spool).contains(
            "silt_batches_dead_lettered_total{sink=\"lake\",reason=\"InvalidStorageClass\"} 1"
        ));
        spool.close().unwrap();
    }
}
