//! Per-sink batching: decide when to seal, encode, upload, and only then
//! let the spool forget the records.
//!
//! One [`Batcher`] task runs per sink and uploads one batch at a time, in
//! order. While the sink is down the open batch stays sealed and retried
//! and new records wait unsealed in the spool, so `drop_oldest` can still
//! make room among them.

mod dead_letter;
mod encode;
mod key;
mod media;
mod object;
mod parquet;
mod progress;
#[cfg(feature = "iceberg")]
mod table_commit;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{BatchConfig, Format, SinkConfig};
use crate::dead_letter::BatchDeadLetters;
use crate::event::{Event, now_ms};
use crate::media::MediaDir;
use crate::metrics::Metrics;
use crate::sinks::{ErrorClass, Sink, SinkError, Written, shorten};
use crate::spool::{BatchMeta, SealRule, SinkId, SinkSpec, Spool, SpoolError};
pub use dead_letter::REPLAY_SCAN_EVERY;
pub use encode::{encode_ndjson, rfc3339_ms};
pub use key::{KeyTemplate, MAX_KEY_LEN, MAX_VALUE_LEN, Part as TemplatePart, TOO_LONG};
pub use object::CONTENT_TYPE_ATTRIBUTE;
use object::{Encoding, Object};
#[cfg(feature = "iceberg")]
pub use parquet::{ParquetOptions, columns_of, writer_properties};

pub struct Batcher {
    sink: SinkId,
    name: String,
    agent: String,
    spool: Spool,
    target: Sink,
    key: KeyTemplate,
    batch: BatchConfig,
    encoding: Encoding,
    media: media::MediaSink,
    retry_max: Duration,
    deadline: UploadDeadline,
    metrics: Arc<Metrics>,
    dead_letters: BatchDeadLetters,
    progress: std::sync::Mutex<progress::BacklogProgress>,
    #[cfg(feature = "iceberg")]
    table: Option<crate::table::TableSink>,
    #[cfg(feature = "iceberg")]
    held: std::sync::Mutex<table_commit::Held>,
}

/// The longest wait before retrying a step the spool refused.
const SPOOL_RETRY_MAX: Duration = Duration::from_secs(30);

/// How often a store refusing a sink's writes for good is logged.
const OPERATOR_LOG_EVERY: Duration = Duration::from_secs(60);

/// How often a raw sink looks for media files nothing refers to any more.
const MEDIA_SWEEP_EVERY: Duration = Duration::from_secs(15 * 60);

enum Step {
    Continue,
    Done,
}

/// How long one attempt at writing an object may take.
#[derive(Debug, Clone, Copy)]
struct UploadDeadline {
    base: Duration,
    bytes_per_sec: u64,
}

impl UploadDeadline {
    fn of(self, bytes: u64) -> Duration {
        self.base + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec.max(1) as f64)
    }
}

/// How long to sleep before upload attempt `n` (0-based) after a failure.
fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16));
    base.min(max)
}

/// Where a batcher's sink stands in the pipeline.
pub struct BatcherContext {
    pub sink: SinkId,
    pub agent: String,
    pub spool: Spool,
    pub media: MediaDir,
    /// Sinks that take this sink's media index lines.
    pub sidecar_sinks: Vec<SinkId>,
    pub metrics: Arc<Metrics>,
    pub dead_letters: BatchDeadLetters,
}

impl Batcher {
    pub fn new(
        name: &str,
        target: Sink,
        config: &SinkConfig,
        context: BatcherContext,
    ) -> Result<Batcher, String> {
        let mut batch = config.batch.clone();
        if config.format == Format::Raw {
            batch.max_records = 1;
        }
        let key = KeyTemplate::parse(&config.key())?;
        #[cfg(feature = "iceberg")]
        let table = config.table.as_ref().map(|table| {
            crate::table::TableSink::new(
                &context.agent,
                name,
                config,
                table,
                key.parts(),
                object::parquet_options(config.compression(), config.row_group_size),
            )
        });
        Ok(Batcher {
            sink: context.sink,
            name: name.to_string(),
            agent: context.agent,
            spool: context.spool,
            target,
            key,
            batch,
            encoding: Encoding::of(config),
            media: media::MediaSink {
                dir: context.media,
                part_size: config.part_size.as_u64(),
                sidecar_sinks: context.sidecar_sinks,
            },
            retry_max: config.retry_max,
            deadline: UploadDeadline {
                base: config.request_timeout,
                bytes_per_sec: config.min_upload_rate.as_u64(),
            },
            metrics: context.metrics,
            dead_letters: context.dead_letters,
            progress: Default::default(),
            #[cfg(feature = "iceberg")]
            table,
            #[cfg(feature = "iceberg")]
            held: Default::default(),
        })
    }

    /// Runs until `drain` is cancelled and everything spooled for this sink
    /// is uploaded, or until `stop` is cancelled (leaving the rest spooled).
    pub async fn run(self, drain: CancellationToken, stop: CancellationToken) {
        let mut last_sweep: Option<std::time::Instant> = None;
        let mut last_replay_scan: Option<std::time::Instant> = None;
        let mut failures = 0;
        loop {
            if last_replay_scan.is_none_or(|t| t.elapsed() >= REPLAY_SCAN_EVERY) {
                last_replay_scan = Some(std::time::Instant::now());
                self.replay_dead_letters(&stop).await;
            }
            if self.encoding.format == Format::Raw
                && last_sweep.is_none_or(|t| t.elapsed() >= MEDIA_SWEEP_EVERY)
            {
                last_sweep = Some(std::time::Instant::now());
                if let Err(e) = self.media.sweep(&self.spool, self.sink, &self.name) {
                    tracing::warn!(sink = %self.name, error = %e, "reading the spool for a media sweep failed");
                }
            }
            match self.step(&drain, &stop).await {
                Ok(Step::Continue) => failures = 0,
                Ok(Step::Done) => return,
                Err(e) => {
                    let delay = backoff(failures + 3, SPOOL_RETRY_MAX);
                    failures += 1;
                    if matches!(e, SpoolError::Full) {
                        tracing::warn!(sink = %self.name, retry_in = ?delay, "spool full: the media index line of an uploaded object waits for room (the batch stays sealed)");
                    } else {
                        tracing::error!(sink = %self.name, error = %e, retry_in = ?delay, "spool error while batching; the batch stays sealed and is retried");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn step(
        &self,
        drain: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<Step, SpoolError> {
        if stop.is_cancelled() {
            return Ok(Step::Done);
        }
        // A batch leaves the queue only once handled; an error or a stop puts
        // it (and those behind it) back for the next step.
        let mut pending: VecDeque<BatchMeta> = self.spool.take_pending(self.sink).into();
        while let Some(meta) = pending.pop_front() {
            let handled = self.upload_sealed_earlier(&meta, stop).await;
            if !matches!(handled, Ok(true)) {
                pending.push_front(meta);
                self.spool.return_pending(self.sink, pending.into());
                return handled.map(|_| Step::Done);
            }
        }
        let draining = drain.is_cancelled();
        #[cfg(feature = "iceberg")]
        if let Some(table) = &self.table
            && (draining || self.commit_due_in(table) == Some(Duration::ZERO))
            && !self.commit_held(table, stop).await?
        {
            return Ok(Step::Done);
        }
        let stats = self.spool.stats(self.sink);
        let age = stats
            .oldest_unsealed_ms
            .map(|ts| Duration::from_millis(now_ms().saturating_sub(ts).max(0) as u64));
        let due = stats.fullest_records >= self.batch.max_records as u64
            || stats.fullest_bytes >= self.batch.max_bytes.as_u64()
            || age.is_some_and(|a| a >= self.batch.max_age)
            || stats.partitions > self.batch.max_partitions
            || (draining && stats.unsealed_records > 0);
        if due && let Some((meta, events)) = self.seal(draining).await? {
            let handled = self.upload(&meta, &events, stop).await;
            if !matches!(handled, Ok(true)) {
                self.spool.return_pending(self.sink, vec![meta]);
            }
            return handled.map(|done| if done { Step::Continue } else { Step::Done });
        }
        if draining {
            return Ok(Step::Done);
        }
        let wait = match age {
            Some(a) => self.batch.max_age.saturating_sub(a),
            None => self.batch.max_age,
        };
        #[cfg(feature = "iceberg")]
        let wait = match self.table.as_ref().and_then(|t| self.commit_due_in(t)) {
            Some(due) => wait.min(due),
            None => wait,
        };
        tokio::select! {
            _ = self.spool.records_added(self.sink, wait.max(Duration::from_millis(5))) => {}
            _ = drain.cancelled() => {}
            _ = stop.cancelled() => {}
        }
        Ok(Step::Continue)
    }

    /// A batch sealed by an earlier step or run: finishes its removal when
    /// its records are gone already, else uploads it.
    async fn upload_sealed_earlier(
        &self,
        meta: &BatchMeta,
        stop: &CancellationToken,
    ) -> Result<bool, SpoolError> {
        let loaded = self.spool.load_batch(self.sink, meta)?;
        if loaded.missing > 0 {
            tracing::info!(sink = %self.name, key = %meta.key, "batch was uploaded before a restart; finishing its removal");
            self.spool.complete(self.sink, meta.clone()).await?;
            return Ok(true);
        }
        if meta.repaired > 0 {
            tracing::warn!(sink = %self.name, key = %meta.key, records = meta.records, quarantined = meta.repaired, "uploading the good records of a batch `silt spool check --repair` shortened");
        } else {
            tracing::info!(sink = %self.name, key = %meta.key, records = meta.records, "uploading batch sealed earlier");
        }
        self.upload(meta, &loaded.events, stop).await
    }

    async fn seal(&self, draining: bool) -> Result<Option<(BatchMeta, Vec<Event>)>, SpoolError> {
        let (template, agent, sink) = (self.key.clone(), self.agent.clone(), self.name.clone());
        let rule = SealRule {
            max_records: self.batch.max_records as u64,
            max_bytes: self.batch.max_bytes.as_u64(),
            max_age_ms: self.batch.max_age.as_millis() as i64,
            max_partitions: self.batch.max_partitions,
            force: draining,
        };
        self.spool
            .seal(self.sink, rule, move |first, seq| {
                template.render(&agent, &sink, first, seq)
            })
            .await
    }

    /// Uploads until the store confirms, then completes the batch in the
    /// spool. Returns `false` if `stop` ended the attempt first.
    async fn upload(
        &self,
        meta: &BatchMeta,
        events: &[Event],
        stop: &CancellationToken,
    ) -> Result<bool, SpoolError> {
        if events.is_empty() {
            self.spool.complete(self.sink, meta.clone()).await?;
            return Ok(true);
        }
        #[cfg(feature = "iceberg")]
        let mut for_table = None;
        #[cfg(feature = "iceberg")]
        let built = match &self.table {
            Some(table) => match self.prepare_for_table(table, events, stop).await {
                table_commit::Prepare::Ready(prepared) => {
                    let info = table_commit::object_info(object::metadata(
                        &events[0],
                        &self.encoding.metadata_attributes,
                    ));
                    let body = prepared.body.clone();
                    for_table = Some(prepared);
                    Ok(Object::Bytes { body, info })
                }
                table_commit::Prepare::Unencodable(error) => Err(error),
                table_commit::Prepare::Stopped => return Ok(false),
            },
            None => self.build_object(events).await,
        };
        #[cfg(not(feature = "iceberg"))]
        let built = self.build_object(events).await;
        let object = match built {
            Ok(object) => object,
            Err(error) => return self.keep_unencodable(meta, events, &error, stop).await,
        };
        self.metrics
            .uploading(&self.name, events.iter().map(|e| e.ts_ms).min());
        let mut key = meta.key.clone();
        let (mut attempt, mut conflicts) = (0, 0);
        let first_attempt_ms = now_ms();
        let mut operator_logged: Option<std::time::Instant> = None;
        let deadline = self.deadline.of(object.size());
        let size = loop {
            let result = tokio::select! {
                r = tokio::time::timeout(deadline, self.write(&key, &object)) => {
                    r.unwrap_or_else(|_| Err(SinkError::Timeout { key: key.clone(), after: deadline }))
                }
                _ = stop.cancelled() => return Ok(false),
            };
            if let Err(e) = &result {
                if !matches!(e, SinkError::Conflict { .. }) {
                    self.metrics.upload_error(&self.name);
                }
                self.metrics.upload_retry(&self.name);
            }
            match result {
                Ok((written, size)) => {
                    self.metrics.sink_blocked(&self.name, None);
                    if attempt > 0 {
                        tracing::info!(sink = %self.name, attempts = attempt + 1, "sink reachable again");
                    }
                    tracing::info!(
                        sink = %self.name, key = %key, records = meta.records, bytes = size,
                        already_there = written == Written::AlreadyThere, "uploaded object"
                    );
                    break size;
                }
                Err(SinkError::Conflict { .. }) => {
                    conflicts += 1;
                    let moved = conflict_key(&meta.key, meta.sealed_ms, conflicts);
                    tracing::error!(
                        sink = %self.name, key = %key, new_key = %moved,
                        "an object with other content already exists under this key (spool reset or two agents sharing an id?); writing the batch under a new key"
                    );
                    key = moved;
                }
                Err(SinkError::Media { path, source })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    // Retrying cannot bring the file back; holding the batch
                    // would block every later object of this sink.
                    tracing::error!(
                        sink = %self.name, key = %key, path = %path.display(),
                        "media file is gone (deleted outside silt?); its object cannot be written, removing it from the spool"
                    );
                    self.metrics.uploading(&self.name, None);
                    self.spool.complete(self.sink, meta.clone()).await?;
                    return Ok(true);
                }
                Err(e) => {
                    let delay = backoff(attempt, self.retry_max);
                    attempt += 1;
                    let held = self.spool.stats(self.sink);
                    let held = held.unsealed_records + meta.records;
                    match e.class() {
                        ErrorClass::Permanent(reason) => {
                            let failed = dead_letter::Failed {
                                key: &key,
                                reason,
                                error: e.to_string(),
                                first_attempt_ms,
                                attempts: attempt,
                            };
                            let moved = match &object {
                                Object::Bytes { body, info } => {
                                    self.dead_letter(meta, body, info, failed).await?
                                }
                                Object::File { media, info, .. } => {
                                    self.dead_letter_media(meta, media, info, failed).await?
                                }
                            };
                            if moved {
                                return Ok(true);
                            }
                        }
                        ErrorClass::Operator(reason) => {
                            self.metrics.sink_blocked(&self.name, Some(&reason));
                            if operator_logged.is_none_or(|t| t.elapsed() >= OPERATOR_LOG_EVERY) {
                                operator_logged = Some(std::time::Instant::now());
                                tracing::error!(
                                    sink = %self.name, key = %shorten(&key, 200), reason, error = %e,
                                    held_records = held,
                                    "the store refuses this sink's writes; check its credentials, permissions, bucket and options (retried with backoff, logged once a minute)"
                                );
                            }
                        }
                        ErrorClass::Transient => tracing::warn!(
                            sink = %self.name, key = %shorten(&key, 200), error = %e,
                            retry_in = ?delay, held_records = held,
                            "sink unreachable; data is held in the spool"
                        ),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return Ok(false),
                    }
                }
            }
        };
        self.metrics
            .object_committed(&self.name, meta.records, size);
        #[cfg(feature = "iceberg")]
        if let Some(prepared) = for_table {
            self.metrics.uploading(&self.name, None);
            self.hold(meta, prepared.uploaded(meta.seq, &key));
            return Ok(true);
        }
        let records = meta.records;
        let completed = match &object {
            Object::File { media, event, .. } => self
                .media
                .finish(
                    &self.spool,
                    self.sink,
                    &self.name,
                    meta.clone(),
                    &key,
                    media,
                    event,
                )
                .await
                .map(|dropped_old| self.metrics.dropped(0, dropped_old)),
            _ => self.spool.complete(self.sink, meta.clone()).await,
        };
        self.metrics.uploading(&self.name, None);
        completed?;
        self.report_progress(records);
        Ok(true)
    }

    async fn build_object(&self, events: &[Event]) -> Result<Object, String> {
        let (events, agent, encoding) =
            (events.to_vec(), self.agent.clone(), self.encoding.clone());
        tokio::task::spawn_blocking(move || object::build(&events, &agent, &encoding))
            .await
            .expect("encoding does not panic")
    }

    /// One attempt at writing `object` under `key`; the bytes written.
    async fn write(&self, key: &str, object: &Object) -> Result<(Written, u64), SinkError> {
        match object {
            Object::Bytes { body, info } => {
                let written = self.target.put_new(key, body.clone(), info).await?;
                Ok((written, body.len() as u64))
            }
            Object::File { media, info, .. } => {
                let written = self
                    .media
                    .upload(&self.spool, &self.name, &self.target, key, media, info)
                    .await?;
                Ok((written, media.size))
            }
        }
    }

    fn report_progress(&self, records: u64) {
        let stats = self.spool.stats(self.sink);
        let left = (
            stats.unsealed_records,
            stats.unsealed_bytes + stats.sealed_bytes,
        );
        let backlog = left.0 > 2 * self.batch.max_records as u64;
        let report = self.progress.lock().expect("lock").on_upload(
            records,
            left,
            backlog,
            std::time::Instant::now(),
        );
        match report {
            Some(progress::Report::Draining {
                records_left,
                bytes_left,
                records_per_sec,
                eta,
            }) => tracing::info!(
                sink = %self.name, records_left, bytes_left, records_per_sec = records_per_sec.round(),
                eta = %humantime::format_duration(Duration::from_secs(eta.as_secs())), "backlog draining"
            ),
            Some(progress::Report::Drained { records, took }) => tracing::info!(
                sink = %self.name, records, took = ?took, "backlog drained"
            ),
            None => {}
        }
    }
}

/// How the spool keeps `sink`'s records: one partition per rendered key
/// prefix, so one object never mixes partitions.
pub fn sink_spec(agent: &str, name: &str, config: &SinkConfig) -> Result<SinkSpec, String> {
    let template = KeyTemplate::parse(&config.key()).map_err(|e| format!("sink {name}: {e}"))?;
    let partitions = key::PartitionCache::new(template, agent, name);
    Ok(SinkSpec {
        name: name.to_string(),
        partition_of: Arc::new(move |event| partitions.partition(event)),
    })
}

/// Where a batch goes when its key is taken by other bytes: the same key
/// with the seal time (and a counter) before the extension, so it sorts
/// beside the original and a restart picks the same new key.
fn conflict_key(key: &str, sealed_ms: i64, n: u32) -> String {
    let name_start = key.rfind('/').map_or(0, |i| i + 1);
    let dot = key[name_start..]
        .find('.')
        .map_or(key.len(), |i| name_start + i);
    format!("{}-r{sealed_ms}-{n}{}", &key[..dot], &key[dot..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(5);
        assert_eq!(backoff(0, max), Duration::from_millis(100));
        assert_eq!(backoff(3, max), Duration::from_millis(800));
        assert_eq!(backoff(30, max), max);
    }

    #[test]
    fn the_upload_deadline_grows_with_the_object() {
        let d = UploadDeadline {
            base: Duration::from_secs(30),
            bytes_per_sec: 32 * 1024,
        };
        assert_eq!(d.of(0), Duration::from_secs(30));
        // 8 MiB at 32 KiB/s: 256 s to move it.
        assert_eq!(d.of(8 << 20), Duration::from_secs(30 + 256));
    }

    #[test]
    fn conflict_key_keeps_directory_and_extension() {
        assert_eq!(
            conflict_key("a.b/c/x-01.ndjson.gz", 7, 1),
            "a.b/c/x-01-r7-1.ndjson.gz"
        );
        assert_eq!(conflict_key("plain", 7, 2), "plain-r7-2");
    }
}
