//! The stage between sources and the spool: run each source's events
//! through the transforms that read it, and commit what comes out to the
//! sinks that read each node, in one spool append, so a source can
//! acknowledge.
//!
//! A plugin that fails (trap, timeout, memory, fuel, or an `err` result)
//! never fails the ingest: its input batch is written to dead-letter
//! (fsynced) and the pipeline goes on. Only if the dead-letter write itself
//! fails is the ingest refused, so the source keeps the data.

mod replay;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, Format, SourceConfig};
use crate::event::{Event, RESERVED_ATTRIBUTE_PREFIX};
use crate::media::MediaDir;
use crate::metrics::{Metrics, PluginCall};
use crate::plugin::{DeadLetter, Plugin, PluginEngine, PluginError, PluginLimits};
use crate::spool::{AppendOutcome, Mark, SinkId, Spool, SpoolError, StoredMarks};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(
        "transform {transform} failed and its batch could not be dead-lettered: {error}; the events were not accepted, retry later"
    )]
    DeadLetter {
        transform: String,
        error: std::io::Error,
    },
}

impl IngestError {
    pub fn is_retryable(&self) -> bool {
        match self {
            IngestError::Spool(e) => e.is_retryable(),
            IngestError::DeadLetter { .. } => true,
        }
    }
}

/// Where events leaving a source or transform go.
#[derive(Default)]
struct Node {
    sinks: Vec<SinkId>,
    transforms: Vec<Arc<Stage>>,
}

/// One configured transform: a plugin instance and where its failures go.
struct Stage {
    name: String,
    plugin: Mutex<Plugin>,
    dead_letter: Arc<DeadLetter>,
    metrics: Arc<Metrics>,
}

/// Loads every configured plugin, calling `init`. Used by `run` and by
/// `silt check`, so a broken plugin fails before the agent starts.
pub fn load_plugins(config: &Config) -> Result<HashMap<String, Plugin>, PluginError> {
    if config.transforms.is_empty() {
        return Ok(HashMap::new());
    }
    let engine = PluginEngine::new(&config.agent.data_dir.join("plugin-cache"))?;
    config
        .transforms
        .iter()
        .map(|(name, t)| {
            let limits = PluginLimits {
                max_memory: t.max_memory.as_u64(),
                timeout: t.timeout,
                fuel: t.fuel,
            };
            let json = serde_json::to_string(&t.config).expect("a TOML table is valid JSON");
            Plugin::load(&engine, name, &t.plugin, &json, limits).map(|p| (name.clone(), p))
        })
        .collect()
}

/// What sources hold to hand events in. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    spool: Spool,
    nodes: Arc<HashMap<String, Node>>,
    stages: Arc<Vec<Arc<Stage>>>,
    drops: Arc<DropCounter>,
    metrics: Arc<Metrics>,
    media: MediaDir,
    /// Per source, the raw sinks that take its media uploads.
    media_sinks: Arc<HashMap<String, Vec<(SinkId, String)>>>,
    /// The sources' stop: waits for room in the spool end with it.
    stop: CancellationToken,
}

impl Ingest {
    pub fn new(
        config: &Config,
        spool: Spool,
        plugins: HashMap<String, Plugin>,
        dead_letter: DeadLetter,
        media: MediaDir,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Ingest {
        let dead_letter = Arc::new(dead_letter);
        let stages: HashMap<&str, Arc<Stage>> = plugins
            .into_iter()
            .map(|(name, plugin)| {
                let stage = Stage {
                    name: name.clone(),
                    plugin: Mutex::new(plugin),
                    dead_letter: dead_letter.clone(),
                    metrics: metrics.clone(),
                };
                let key = config
                    .transforms
                    .get_key_value(&name)
                    .expect("plugin per transform")
                    .0;
                (key.as_str(), Arc::new(stage))
            })
            .collect();
        let mut nodes: HashMap<String, Node> = HashMap::new();
        let names = config.sources.keys().chain(config.transforms.keys());
        for name in names {
            let node = nodes.entry(name.clone()).or_default();
            let http = matches!(config.sources.get(name), Some(SourceConfig::Http(_)));
            for (sink, cfg) in &config.sinks {
                // A raw sink reading an HTTP source takes its media uploads
                // (see `media_sinks`), not one object per posted event.
                let media_only = http && cfg.format == Format::Raw;
                if cfg.inputs.contains(name) && !media_only {
                    node.sinks.extend(spool.sink_id(sink));
                }
            }
            for (t, cfg) in &config.transforms {
                if cfg.inputs.contains(name) {
                    node.transforms.push(stages[t.as_str()].clone());
                }
            }
        }
        let media_sinks = config
            .sources
            .keys()
            .map(|source| {
                let raw = config
                    .sinks
                    .iter()
                    .filter(|(_, cfg)| cfg.format == Format::Raw && cfg.inputs.contains(source));
                let targets = raw
                    .filter_map(|(sink, _)| Some((spool.sink_id(sink)?, sink.clone())))
                    .collect();
                (source.clone(), targets)
            })
            .collect();
        Ingest {
            media,
            media_sinks: Arc::new(media_sinks),
            spool,
            nodes: Arc::new(nodes),
            stages: Arc::new(stages.into_values().collect()),
            drops: Arc::new(DropCounter::default()),
            metrics,
            stop,
        }
    }

    /// Commits events entering at `source` (a source, or a transform for
    /// events it emits on tick); returns once they are on disk, or were
    /// dropped by the `when_full` policy, which the outcome says.
    pub async fn ingest(
        &self,
        source: &str,
        events: Vec<Event>,
    ) -> Result<AppendOutcome, IngestError> {
        // Plugins may keep state (dedup windows): once they have seen a batch
        // it must be stored, not refused and sent again. So refuse up front
        // when full, and after transforms wait for room instead of failing.
        self.ingest_marked(source, events, Vec::new()).await
    }

    /// [`Ingest::ingest`], also storing `marks` with the events.
    pub async fn ingest_marked(
        &self,
        source: &str,
        events: Vec<Event>,
        marks: Vec<Mark>,
    ) -> Result<AppendOutcome, IngestError> {
        if self.spool.refuses_appends() {
            return Err(SpoolError::Full.into());
        }
        let count = events.len() as u64;
        let outcome = self.deliver(source, events, false, marks).await?;
        self.metrics.events_in(source, count);
        Ok(outcome)
    }

    /// The most payload bytes a source should commit at once: a commit
    /// larger than the spool's cap could never be taken, and waiting for
    /// room would wait forever.
    pub fn commit_bytes_cap(&self) -> usize {
        (self.spool.max_bytes() / 4).max(1) as usize
    }

    /// Whether the spool would refuse events now (full, `block` policy).
    pub fn refuses_appends(&self) -> bool {
        self.spool.refuses_appends()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether `need` more bytes on disk would dip under `spool.min_free`.
    pub fn disk_short(&self, need: u64) -> bool {
        self.spool.disk_short(need)
    }

    /// Where media uploads are streamed to.
    pub fn media_dir(&self) -> &MediaDir {
        &self.media
    }

    /// The raw sinks (id, name) that take `source`'s media uploads.
    pub fn media_sinks(&self, source: &str) -> &[(SinkId, String)] {
        self.media_sinks.get(source).map_or(&[], Vec::as_slice)
    }

    /// Commits media reference events, one group per raw sink, with
    /// `marks`. Plugins do not see media: its payload is a file on disk.
    pub async fn ingest_media(
        &self,
        source: &str,
        groups: Vec<(Vec<SinkId>, Vec<Event>)>,
        marks: Vec<Mark>,
    ) -> Result<AppendOutcome, IngestError> {
        if self.spool.refuses_appends() {
            return Err(SpoolError::Full.into());
        }
        let outcome = self.spool.append_groups(groups, marks).await?;
        self.metrics.events_in(source, 1);
        Ok(outcome)
    }

    /// Commits `marks` without events. A full spool takes them: marks are
    /// bookkeeping of what sources already received, and tiny.
    pub async fn store_marks(&self, marks: Vec<Mark>) -> Result<(), SpoolError> {
        self.spool.append_groups(Vec::new(), marks).await.map(drop)
    }

    /// Every mark of `tree` stored by earlier [`Ingest::ingest_marked`]s.
    pub fn marks(&self, tree: &str) -> Result<StoredMarks, SpoolError> {
        self.spool.marks(tree)
    }

    /// Runs `events` from `node` through the transforms downstream and
    /// commits the results in one append. `transformed` says the events
    /// already came out of a plugin.
    async fn deliver(
        &self,
        node: &str,
        events: Vec<Event>,
        mut transformed: bool,
        marks: Vec<Mark>,
    ) -> Result<AppendOutcome, IngestError> {
        let mut groups = Vec::new();
        let mut todo = vec![(node.to_string(), events)];
        while let Some((name, events)) = todo.pop() {
            let Some(node) = self.nodes.get(&name) else {
                continue;
            };
            for stage in &node.transforms {
                transformed = true;
                if let Some(out) = stage.process(events.clone()).await? {
                    todo.push((stage.name.clone(), out));
                }
            }
            if !node.sinks.is_empty() {
                groups.push((node.sinks.clone(), events));
            }
        }
        let outcome = if transformed {
            self.append_waiting(groups, marks).await?
        } else {
            self.spool.append_groups(groups, marks).await?
        };
        if outcome.dropped_new > 0 || outcome.dropped_old > 0 {
            self.metrics
                .dropped(outcome.dropped_new as u64, outcome.dropped_old);
            self.drops.record(node, &outcome);
        }
        Ok(outcome)
    }

    async fn append_waiting(
        &self,
        groups: Vec<(Vec<SinkId>, Vec<Event>)>,
        marks: Vec<Mark>,
    ) -> Result<AppendOutcome, SpoolError> {
        let mut warned = false;
        loop {
            match self
                .spool
                .append_groups(groups.clone(), marks.clone())
                .await
            {
                // At stop the caller gets the error: HTTP answers 503, MQTT
                // leaves the messages unacked.
                Err(e) if e.is_retryable() && !self.stop.is_cancelled() => {
                    if !warned {
                        tracing::warn!(error = %e, "transformed events wait for room in the spool");
                        warned = true;
                    }
                    tokio::select! {
                        _ = self.space_freed(Duration::from_secs(1)) => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
                other => return other,
            }
        }
    }

    /// Calls every plugin's `tick` and commits what they emit.
    pub async fn tick(&self, now_ms: i64) {
        for stage in self.stages.iter() {
            match stage.tick(now_ms).await {
                Ok(events) if !events.is_empty() => {
                    if let Err(e) = self.deliver(&stage.name, events, true, Vec::new()).await {
                        tracing::error!(transform = %stage.name, error = %e, "events emitted by tick were not committed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(transform = %stage.name, error = %e, "plugin tick failed"),
            }
        }
    }

    /// Logs how many events the `when_full` policy dropped in total.
    pub fn log_drop_totals(&self) {
        self.drops.log_totals();
    }

    /// Waits until the spool frees space (or `timeout` passes).
    pub async fn space_freed(&self, timeout: Duration) {
        self.spool.space_freed(timeout).await
    }
}

impl Stage {
    /// The plugin's output, or `None` when it failed and its input went to
    /// dead-letter.
    async fn process(
        self: &Arc<Self>,
        events: Vec<Event>,
    ) -> Result<Option<Vec<Event>>, IngestError> {
        let stage = self.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = stage
                .plugin
                .lock()
                .expect("plugin lock")
                .process(events.clone());
            stage.metrics.plugin_call(
                &stage.name,
                PluginCall::Process,
                started.elapsed(),
                result.is_err(),
            );
            match result {
                Ok(mut out) => {
                    // A plugin must not turn an event into a reference to a
                    // local file the agent would then upload.
                    for event in &mut out {
                        event
                            .attributes
                            .retain(|(k, _)| !k.starts_with(RESERVED_ATTRIBUTE_PREFIX));
                    }
                    Ok(Some(out))
                }
                Err(error) => stage.dead_letter(&error, &events).map(|()| None),
            }
        })
        .await
        .expect("plugin calls do not panic the host")
    }

    async fn tick(self: &Arc<Self>, now_ms: i64) -> Result<Vec<Event>, PluginError> {
        let stage = self.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = stage.plugin.lock().expect("plugin lock").tick(now_ms);
            let failed = result.is_err();
            stage
                .metrics
                .plugin_call(&stage.name, PluginCall::Tick, started.elapsed(), failed);
            result
        })
        .await
        .expect("plugin calls do not panic the host")
    }

    fn dead_letter(&self, error: &PluginError, events: &[Event]) -> Result<(), IngestError> {
        let reason = error.to_string();
        match self.dead_letter.write(&self.name, &reason, events) {
            Ok(path) => {
                self.metrics.dead_lettered(&self.name, events.len() as u64);
                tracing::warn!(
                    transform = %self.name, kind = error.kind(), error = %reason, events = events.len(),
                    path = %path.display(), "plugin failed; its batch went to dead-letter and the pipeline goes on"
                );
                Ok(())
            }
            Err(io) => Err(IngestError::DeadLetter {
                transform: self.name.clone(),
                error: io,
            }),
        }
    }
}

/// Totals of events dropped because the spool was full, logged at most
/// once per interval so a long overflow does not flood the log.
#[derive(Default)]
struct DropCounter {
    new: AtomicU64,
    old: AtomicU64,
    last_log_ms: AtomicU64,
}

impl DropCounter {
    fn record(&self, source: &str, outcome: &AppendOutcome) {
        let new = self
            .new
            .fetch_add(outcome.dropped_new as u64, Ordering::Relaxed)
            + outcome.dropped_new as u64;
        let old = self.old.fetch_add(outcome.dropped_old, Ordering::Relaxed) + outcome.dropped_old;
        let now = crate::event::now_ms() as u64;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                source,
                dropped_newest_total = new,
                dropped_oldest_total = old,
                "spool full: events dropped by spool.when_full"
            );
        }
    }

    /// The final totals, so the last drops are not hidden by the interval.
    fn log_totals(&self) {
        let (new, old) = (
            self.new.load(Ordering::Relaxed),
            self.old.load(Ordering::Relaxed),
        );
        if new > 0 || old > 0 {
            tracing::warn!(
                dropped_newest_total = new,
                dropped_oldest_total = old,
                "events dropped by spool.when_full while this pipeline ran"
            );
        }
    }
}
