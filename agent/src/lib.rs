//! silt: an edge agent that collects MQTT and HTTP readings and media, keeps
//! them in a durable local spool, and uploads batched objects to S3 or a
//! local directory.
//!
//! Data path, mirrored by the modules: [`sources`] -> [`transform`] ->
//! [`spool`] -> [`batch`] -> [`sinks`].

pub mod api;
pub mod batch;
pub mod config;
pub mod event;
pub mod metrics;
pub mod plugin;
pub mod sinks;
pub mod sources;
pub mod spool;
pub mod transform;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batch::Batcher;
use crate::config::{Config, SourceConfig};
use crate::metrics::Metrics;
use crate::sources::{http::HttpSource, mqtt::MqttSource};
use crate::spool::Spool;
use crate::transform::Ingest;

/// How often plugins' `tick` runs, for windows and aggregations.
const TICK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the pipeline until `shutdown` is cancelled, then stops the sources,
/// uploads what it can within `agent.shutdown_timeout`, and flushes the spool.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let data_dir = &config.agent.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let plugins = transform::load_plugins(&config)?;
    let dead_letter =
        plugin::DeadLetter::new(config.agent.dead_letter_dir()).with_context(|| {
            format!(
                "cannot create dead-letter dir {}",
                config.agent.dead_letter_dir().display()
            )
        })?;
    let sink_names: Vec<String> = config.sinks.keys().cloned().collect();
    let spool = Spool::open(data_dir, &sink_names, &config.spool)?;
    let metrics = Arc::new(Metrics::new(&config));
    let api_stop = CancellationToken::new();
    let api = match api::ApiServer::bind(&config.api, metrics.clone(), spool.clone()).await {
        Ok(server) => Some(tokio::spawn(server.run(api_stop.clone()))),
        Err(e) => {
            // Metrics matter less than data: run without the admin endpoints.
            tracing::error!(addr = %config.api.listen, error = %e, "admin api cannot listen; running without /metrics, /healthz and /readyz (set [api] listen)");
            None
        }
    };

    let sources_stop = CancellationToken::new();
    let mut sources = JoinSet::new();
    let drain = CancellationToken::new();
    let stop = CancellationToken::new();
    let mut batchers = JoinSet::new();
    for (name, sink) in &config.sinks {
        let store = sinks::build(name, sink)?;
        let id = spool.sink_id(name).expect("spool opened with every sink");
        let agent = &config.agent.id;
        let batcher = Batcher::new(id, name, agent, spool.clone(), store, sink, metrics.clone())
            .map_err(|e| anyhow::anyhow!("sink {name}: {e}"))?;
        batchers.spawn(batcher.run(drain.clone(), stop.clone()));
    }

    let ingest = Ingest::new(
        &config,
        spool.clone(),
        plugins,
        dead_letter,
        metrics.clone(),
    );
    if !config.transforms.is_empty() {
        let ticker = ingest.clone();
        let stop_ticks = sources_stop.clone();
        sources.spawn(async move {
            let mut interval = tokio::time::interval(TICK_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => ticker.tick(event::now_ms()).await,
                    _ = stop_ticks.cancelled() => return,
                }
            }
        });
    }
    let mut http = BTreeMap::new();
    for (name, source) in &config.sources {
        if let SourceConfig::Http(cfg) = source {
            http.insert(
                name.clone(),
                HttpSource::bind(name, cfg, ingest.clone()).await?,
            );
        }
    }
    for (_, source) in http {
        sources.spawn(source.run(sources_stop.clone()));
    }
    for (name, source) in &config.sources {
        if let SourceConfig::Mqtt(cfg) = source {
            let (agent, ingest) = (&config.agent.id, ingest.clone());
            let mqtt = MqttSource::new(name, cfg.clone(), agent, ingest, metrics.clone());
            let token = sources_stop.clone();
            let name = name.clone();
            sources.spawn(async move {
                if let Err(e) = mqtt.run(token).await {
                    tracing::error!(source = %name, error = %e, "mqtt source stopped");
                }
            });
        }
    }
    tracing::info!(agent = %config.agent.id, sources = config.sources.len(), sinks = config.sinks.len(), "silt running");

    shutdown.cancelled().await;
    tracing::info!("shutting down: stopping sources");
    sources_stop.cancel();
    while sources.join_next().await.is_some() {}

    tracing::info!(timeout = ?config.agent.shutdown_timeout, "sealing and uploading what is spooled");
    drain.cancel();
    let drained = tokio::time::timeout(config.agent.shutdown_timeout, async {
        while batchers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "shutdown_timeout reached; what is not uploaded stays in the spool for the next start"
        );
        stop.cancel();
        while batchers.join_next().await.is_some() {}
    }
    drop(ingest);
    api_stop.cancel();
    if let Some(api) = api {
        let _ = api.await;
    }
    tokio::task::spawn_blocking(move || spool.close()).await??;
    tracing::info!("silt stopped");
    Ok(())
}
