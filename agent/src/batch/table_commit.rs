//! The Iceberg step of a Parquet sink with a `table`: batches encoded in
//! the table's schema before upload, held after upload, and appended to the
//! table together every `commit_every`; only then does the spool let them go.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Batcher, backoff};
use crate::event::Event;
use crate::sinks::{ErrorClass, ObjectInfo};
use crate::spool::{BatchMeta, SpoolError};
use crate::table::{Prepared, TableSink, Uploaded};

/// At most this many uploaded objects wait for one commit.
const MAX_HELD: usize = 500;

/// Uploaded batches whose commit is still to come.
#[derive(Default)]
pub(super) struct Held {
    batches: Vec<(BatchMeta, Uploaded)>,
    since: Option<Instant>,
}

pub(super) enum Prepare {
    Ready(Box<Prepared>),
    /// The batch can never be encoded for the table; `String` says why.
    Unencodable(String),
    Stopped,
}

impl Batcher {
    /// Encodes a batch for the table, retrying while the catalog or store
    /// is unavailable.
    pub(super) async fn prepare_for_table(
        &self,
        table: &TableSink,
        events: &[Event],
        stop: &CancellationToken,
    ) -> Prepare {
        let mut attempt = 0;
        loop {
            let error = match table.prepare(events, &self.agent).await {
                Ok(prepared) => {
                    self.metrics.sink_blocked(&self.name, None);
                    return Prepare::Ready(Box::new(prepared));
                }
                Err(e) => e,
            };
            match error.class() {
                ErrorClass::Permanent(_) => return Prepare::Unencodable(error.to_string()),
                ErrorClass::Operator(reason) => {
                    self.metrics.sink_blocked(&self.name, Some(&reason));
                    tracing::error!(sink = %self.name, error = %error, "the Iceberg table refuses this sink's batches; data is held in the spool");
                }
                ErrorClass::Transient => {
                    tracing::warn!(sink = %self.name, error = %error, "Iceberg catalog or table unavailable; data is held in the spool");
                }
            }
            let delay = backoff(attempt, self.retry_max);
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Prepare::Stopped,
            }
        }
    }

    pub(super) fn hold(&self, meta: &BatchMeta, uploaded: Uploaded) {
        let mut held = self.held.lock().expect("lock");
        held.since.get_or_insert_with(Instant::now);
        held.batches.push((meta.clone(), uploaded));
    }

    /// How long until the held batches are due for their commit; `None`
    /// when none are held.
    pub(super) fn commit_due_in(&self, table: &TableSink) -> Option<Duration> {
        let held = self.held.lock().expect("lock");
        let since = held.since?;
        if held.batches.len() >= MAX_HELD {
            return Some(Duration::ZERO);
        }
        Some(table.commit_every().saturating_sub(since.elapsed()))
    }

    /// Appends every held batch to the table in one snapshot, then
    /// completes them in the spool. `Ok(false)`: `stop` came first, and the
    /// batches stay sealed for the next start.
    pub(super) async fn commit_held(
        &self,
        table: &TableSink,
        stop: &CancellationToken,
    ) -> Result<bool, SpoolError> {
        let batches = std::mem::take(&mut *self.held.lock().expect("lock"));
        if batches.batches.is_empty() {
            return Ok(true);
        }
        let files: Vec<&Uploaded> = batches.batches.iter().map(|(_, u)| u).collect();
        let mut attempt = 0;
        loop {
            let error = match table.commit(&files).await {
                Ok(appended) => {
                    self.metrics.sink_blocked(&self.name, None);
                    tracing::info!(
                        sink = %self.name, objects = files.len(), appended,
                        already_committed = files.len() - appended, "committed to the Iceberg table"
                    );
                    break;
                }
                Err(e) => e,
            };
            if let ErrorClass::Operator(reason) | ErrorClass::Permanent(reason) = error.class() {
                self.metrics.sink_blocked(&self.name, Some(&reason));
            }
            let delay = backoff(attempt, self.retry_max);
            attempt += 1;
            tracing::warn!(sink = %self.name, error = %error, objects = files.len(), retry_in = ?delay, "Iceberg commit failed; the objects are uploaded and their batches stay in the spool until it succeeds");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Ok(false),
            }
        }
        for (i, (meta, _)) in batches.batches.iter().enumerate() {
            if let Err(e) = self.spool.complete(self.sink, meta.clone()).await {
                // Committed already: a restart finds them in the table and
                // only completes them.
                let mut held = self.held.lock().expect("lock");
                held.since.get_or_insert_with(Instant::now);
                held.batches.extend(batches.batches.into_iter().skip(i));
                return Err(e);
            }
            self.report_progress(meta.records);
        }
        Ok(true)
    }
}

/// The object a prepared batch uploads as.
pub(super) fn object_info(metadata: Vec<(String, String)>) -> ObjectInfo {
    ObjectInfo {
        content_type: super::parquet::PARQUET_CONTENT_TYPE.to_string(),
        content_encoding: None,
        metadata,
    }
}
