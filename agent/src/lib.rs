//! silt: an edge agent that collects MQTT and HTTP readings and media, keeps
//! them in a durable local spool, and uploads batched objects to S3 or a
//! local directory.
//!
//! Data path, mirrored by the modules: [`sources`] -> [`transform`] ->
//! [`spool`] -> [`batch`] -> [`sinks`].

pub mod api;
pub mod batch;
pub mod config;
pub mod dead_letter;
pub mod event;
pub mod media;
pub mod metrics;
pub mod plugin;
pub mod reload;
pub mod sinks;
pub mod sources;
pub mod spool;
#[cfg(feature = "iceberg")]
pub mod table;
pub mod tls;
pub mod transform;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batcher, BatcherContext};
use crate::config::{Config, SourceConfig};
use crate::metrics::Metrics;
use crate::plugin::Plugin;
use crate::reload::Reloader;
use crate::sources::{http::HttpSource, mqtt::MqttSource};
use crate::spool::Spool;
use crate::transform::Ingest;

/// How often plugins' `tick` runs, for windows and aggregations.
const TICK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the pipeline until `shutdown` is cancelled, then stops the sources,
/// uploads what it can within `agent.shutdown_timeout`, and flushes the spool.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_reload(config, shutdown, None).await
}

/// [`run`], swapping in a new config when `reloader` asks. The new config
/// and its plugins are loaded first; if anything fails the running pipeline
/// stays. Otherwise sources stop (acknowledging what they committed), the
/// old pipeline hands over its spool, and the new one starts on it: sealed
/// batches and unsent records of sinks that remain carry over.
pub async fn run_with_reload(
    config: Config,
    shutdown: CancellationToken,
    mut reloader: Option<Reloader>,
) -> anyhow::Result<()> {
    let plugins = transform::load_plugins(&config)?;
    if let Some(r) = &mut reloader {
        r.watch(&config);
    }
    let mut pipeline = Pipeline::start(config, plugins).await?;
    loop {
        let why = async {
            match &mut reloader {
                Some(r) => r.requested().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            why = why => {
                let r = reloader.as_mut().expect("only a reloader asks");
                pipeline = reload(pipeline, r, why).await?;
            }
            _ = pipeline.spool.storage_failed() => {
                match reopen_after_storage_failure(pipeline, &shutdown).await? {
                    Some(p) => pipeline = p,
                    None => return Ok(()),
                }
            }
        }
    }
    pipeline.stop(Stop::Shutdown).await
}

/// sled stays failed after a write error (disk full, I/O error) until it is
/// reopened. Stop the pipeline, wait for free space, and start it again on
/// the same spool; meanwhile sources are down, which is `block`: MQTT
/// messages wait at the broker, HTTP clients get refused and retry. `None`
/// when shutdown was asked for while waiting.
async fn reopen_after_storage_failure(
    old: Pipeline,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Pipeline>> {
    let config = old.config.clone();
    tracing::warn!("spool storage failed; stopping sources until the spool can be reopened");
    old.stop(Stop::Handover).await?;
    let need = config.spool.min_free.as_u64().max(1024 * 1024);
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        let free = fs2::available_space(&config.agent.data_dir).unwrap_or(0);
        if free >= need {
            let started = match transform::load_plugins(&config) {
                Ok(plugins) => Pipeline::start(config.clone(), plugins).await,
                Err(e) => Err(e.into()),
            };
            match started {
                Ok(p) => {
                    tracing::info!(free_bytes = free, "spool reopened; sources resume");
                    return Ok(Some(p));
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), retry_in = ?delay, "reopening the spool failed")
                }
            }
        } else {
            tracing::warn!(free_bytes = free, need_bytes = need, retry_in = ?delay, "waiting for free disk space under data_dir");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    }
}

async fn reload(old: Pipeline, reloader: &mut Reloader, why: &str) -> anyhow::Result<Pipeline> {
    tracing::info!(trigger = why, "reloading config");
    let candidate = reloader
        .load()
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok((transform::load_plugins(&c)?, c)));
    let (plugins, config) = match candidate {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "reload rejected; the running pipeline stays as it is");
            return Ok(old);
        }
    };
    let previous = old.config.clone();
    old.stop(Stop::Handover).await?;
    reloader.watch(&config);
    match Pipeline::start(config, plugins).await {
        Ok(new) => {
            tracing::info!("reload applied");
            Ok(new)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "new config failed to start; going back to the previous one");
            let plugins = transform::load_plugins(&previous)?;
            reloader.watch(&previous);
            let pipeline = Pipeline::start(previous, plugins).await?;
            tracing::info!("previous config running again");
            Ok(pipeline)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Seal and upload within `shutdown_timeout`.
    Shutdown,
    /// Stop at once; the next pipeline uploads what is spooled.
    Handover,
}

/// One running configuration: spool, batchers, sources, admin API.
struct Pipeline {
    config: Config,
    spool: Spool,
    ingest: Ingest,
    sources: JoinSet<()>,
    sources_stop: CancellationToken,
    batchers: JoinSet<()>,
    drain: CancellationToken,
    stop: CancellationToken,
    api: Option<JoinHandle<()>>,
    api_stop: CancellationToken,
}

impl Pipeline {
    /// Starts `config`. Every step that can fail runs before anything is
    /// spawned, and a failure closes the spool again, so sled's lock is free
    /// for the next attempt (a reload falling back, a reopen after disk full).
    async fn start(config: Config, plugins: HashMap<String, Plugin>) -> anyhow::Result<Pipeline> {
        let data_dir = &config.agent.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
        let sinks = config
            .sinks
            .iter()
            .map(|(name, sink)| batch::sink_spec(&config.agent.id, name, sink))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!(e))?;
        let spool = Spool::open_partitioned(data_dir, &sinks, &config.spool)?;
        match Parts::prepare(&config, &spool, plugins).await {
            Ok(parts) => Ok(parts.spawn(config, spool)),
            Err(e) => {
                // Nothing else holds the spool: the parts went with the error.
                let closed = tokio::task::spawn_blocking(move || spool.close()).await?;
                if let Err(close) = closed {
                    tracing::warn!(error = %close, "closing the spool after a failed start");
                }
                Err(e)
            }
        }
    }

    async fn stop(mut self, how: Stop) -> anyhow::Result<()> {
        tracing::info!("stopping sources");
        self.sources_stop.cancel();
        while self.sources.join_next().await.is_some() {}

        if how == Stop::Shutdown {
            let timeout = self.config.agent.shutdown_timeout;
            tracing::info!(timeout = ?timeout, "sealing and uploading what is spooled");
            self.drain.cancel();
            let drained = tokio::time::timeout(timeout, async {
                while self.batchers.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    "shutdown_timeout reached; what is not uploaded stays in the spool for the next start"
                );
            }
        }
        // An upload cut short here is repeated under the same key later.
        self.stop.cancel();
        while self.batchers.join_next().await.is_some() {}
        self.ingest.log_drop_totals();
        drop(self.ingest);
        self.api_stop.cancel();
        if let Some(api) = self.api {
            let _ = api.await;
        }
        let spool = self.spool;
        tokio::task::spawn_blocking(move || spool.close()).await??;
        tracing::info!(handover = how == Stop::Handover, "pipeline stopped");
        Ok(())
    }
}

/// A pipeline built but not yet running: everything that can fail is done.
struct Parts {
    api: Option<api::ApiServer>,
    batchers: Vec<Batcher>,
    ingest: Ingest,
    sources_stop: CancellationToken,
    http: Vec<HttpSource>,
    mqtt: Vec<MqttSource>,
}

impl Parts {
    async fn prepare(
        config: &Config,
        spool: &Spool,
        plugins: HashMap<String, Plugin>,
    ) -> anyhow::Result<Parts> {
        let data_dir = &config.agent.data_dir;
        let dead_letter_dir = config.agent.dead_letter_dir();
        let dead_letter = plugin::DeadLetter::new(&dead_letter_dir).with_context(|| {
            format!(
                "cannot create dead-letter dir {}",
                dead_letter_dir.display()
            )
        })?;
        let media = media::MediaDir::open(data_dir)
            .with_context(|| format!("cannot prepare {}", data_dir.join("media").display()))?;
        let metrics = Arc::new(Metrics::new(config));
        metrics.spool_opened(spool);
        let api = match api::ApiServer::bind(&config.api, metrics.clone(), spool.clone()).await {
            Ok(server) => Some(server),
            Err(e) => {
                // Metrics matter less than data: run without the admin endpoints.
                tracing::error!(addr = %config.api.listen, error = %e, "admin api cannot listen; running without /metrics, /healthz and /readyz (set [api] listen)");
                None
            }
        };
        let mut batchers = Vec::new();
        for (name, sink) in &config.sinks {
            let store = sinks::build(name, sink)?;
            let context = BatcherContext {
                sink: spool.sink_id(name).expect("spool opened with every sink"),
                agent: config.agent.id.clone(),
                spool: spool.clone(),
                media: media.clone(),
                sidecar_sinks: sink
                    .sidecar_sinks
                    .iter()
                    .filter_map(|s| spool.sink_id(s))
                    .collect(),
                metrics: metrics.clone(),
                dead_letters: dead_letter::BatchDeadLetters::new(&config.agent.dead_letter_dir()),
            };
            let batcher = Batcher::new(name, store, sink, context)
                .map_err(|e| anyhow::anyhow!("sink {name}: {e}"))?;
            batchers.push(batcher);
        }
        let sources_stop = CancellationToken::new();
        let ingest = Ingest::new(
            config,
            spool.clone(),
            plugins,
            dead_letter,
            media,
            metrics.clone(),
            sources_stop.clone(),
        );
        let mut http = Vec::new();
        let mut mqtt = Vec::new();
        for (name, source) in &config.sources {
            match source {
                SourceConfig::Http(cfg) => {
                    http.push(HttpSource::bind(name, cfg, ingest.clone()).await?);
                }
                SourceConfig::Mqtt(cfg) => {
                    let (agent, ingest) = (&config.agent.id, ingest.clone());
                    let source = MqttSource::new(name, cfg.clone(), agent, ingest, metrics.clone())
                        .with_context(|| format!("mqtt source {name}"))?;
                    mqtt.push(source);
                }
            }
        }
        Ok(Parts {
            api,
            batchers,
            ingest,
            sources_stop,
            http,
            mqtt,
        })
    }

    fn spawn(self, config: Config, spool: Spool) -> Pipeline {
        let api_stop = CancellationToken::new();
        let api = self
            .api
            .map(|server| tokio::spawn(server.run(api_stop.clone())));
        let (drain, stop) = (CancellationToken::new(), CancellationToken::new());
        let mut batchers = JoinSet::new();
        for batcher in self.batchers {
            batchers.spawn(batcher.run(drain.clone(), stop.clone()));
        }
        let sources_stop = self.sources_stop;
        let mut sources = JoinSet::new();
        if !config.transforms.is_empty() {
            sources.spawn(tick_plugins(self.ingest.clone(), sources_stop.clone()));
        }
        for source in self.http {
            sources.spawn(source.run(sources_stop.clone()));
        }
        for source in self.mqtt {
            sources.spawn(source.run(sources_stop.clone()));
        }
        for warning in config::warnings(&config) {
            tracing::warn!("config: {warning}");
        }
        tracing::info!(agent = %config.agent.id, sources = config.sources.len(), sinks = config.sinks.len(), "silt running");
        notify_systemd_ready();
        Pipeline {
            config,
            spool,
            ingest: self.ingest,
            sources,
            sources_stop,
            batchers,
            drain,
            stop,
            api,
            api_stop,
        }
    }
}

/// Tells systemd (`Type=notify`) that silt is up, when run under it.
fn notify_systemd_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = socket.to_string_lossy();
    let addr = match socket.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(socket.as_ref()),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr));
    if let Err(e) = sent {
        tracing::warn!(socket = %socket, error = %e, "could not notify systemd of readiness");
    }
}

/// Calls the plugins' `tick`, and replays the dead-letter files an
/// operator asked for every [`batch::REPLAY_SCAN_EVERY`].
async fn tick_plugins(ingest: Ingest, stop: CancellationToken) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_scan: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.cancelled() => return,
        }
        ingest.tick(event::now_ms()).await;
        if last_scan.is_none_or(|t| t.elapsed() >= batch::REPLAY_SCAN_EVERY) {
            last_scan = Some(std::time::Instant::now());
            ingest.replay_dead_letters().await;
        }
    }
}
