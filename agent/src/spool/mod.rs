//! The durable spool: every event is here before anyone is told it was
//! received, and stays until the object holding it is confirmed written.
//!
//! One writer thread owns the sled trees ([`state::SpoolState`]). Callers
//! send it commands; it applies every command that is waiting, writes one
//! chunk per sink and partition, fsyncs the segment files, flushes sled and
//! fdatasyncs its log file (group commit: one barrier for many appends), and
//! only then answers. An answer therefore always means "on disk": sled's own
//! `flush()` ends in `sync_file_range`, which is no barrier (sled#1452).

mod chunk;
pub mod inspect;
mod legacy;
mod partitions;
mod segments;
pub use segments::{create_dir_durably, sync_dir};
mod sink_log;
mod state;
#[cfg(test)]
mod tests;
mod types;
mod watermark;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::config::SpoolConfig;
use crate::event::{Event, now_ms};
pub use chunk::{DecodeError, decode_chunk, encode_chunk, encoded_len};
pub use sink_log::LoadedBatch;
use state::SpoolState;
pub use types::{
    Admission, AppendOutcome, BatchMeta, Mark, Partitioner, SealRule, SinkSpec, SinkStats,
    StoredMarks,
};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full (spool.max_bytes reached); retry later, or raise spool.max_bytes")]
    Full,
    #[error("spool storage failed: {0}; check the disk under data_dir")]
    Storage(#[from] sled::Error),
    #[error("spool holds a corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("spool is shut down")]
    Closed,
    #[error("cannot open spool at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("spool at {path} is damaged beyond what sled recovers: {detail}")]
    Damaged { path: PathBuf, detail: String },
}

impl SpoolError {
    /// Whether trying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SpoolError::Full | SpoolError::Storage(_))
    }
}

/// A sealed batch with its events, or `None` when nothing was unsealed.
type SealResult = Result<Option<(BatchMeta, Vec<Event>)>, SpoolError>;

/// Index of a sink in the spool, fixed for the life of a [`Spool`].
pub type SinkId = usize;

type KeyFn = Box<dyn FnOnce(&Event, u64) -> String + Send>;

enum Command {
    Append {
        groups: Vec<(Vec<SinkId>, Vec<Event>)>,
        marks: Vec<Mark>,
        admission: Admission,
        reply: oneshot::Sender<Result<AppendOutcome, SpoolError>>,
    },
    Seal {
        sink: SinkId,
        rule: SealRule,
        key: KeyFn,
        reply: oneshot::Sender<SealResult>,
    },
    Complete {
        sink: SinkId,
        batch: BatchMeta,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

enum Message {
    Command(Command),
    /// Flush and end the writer thread, releasing the database.
    Close,
}

struct SinkShared {
    name: String,
    chunks: sled::Tree,
    /// Where the sink's segment files are.
    segments: PathBuf,
    stats: Mutex<SinkStats>,
    /// Woken after a commit adds records for this sink.
    records_added: Notify,
    pending: Mutex<Vec<BatchMeta>>,
}

struct Shared {
    sinks: Vec<SinkShared>,
    limits: types::Limits,
    max_bytes: u64,
    when_full: crate::config::WhenFull,
    bytes: Mutex<u64>,
    /// Woken after a commit frees space.
    space_freed: Notify,
    quarantine: PathBuf,
    /// Cancelled when a flush fails: sled stays failed until reopened.
    storage_failed: tokio_util::sync::CancellationToken,
    /// Records acknowledged by an earlier run and found missing on open.
    lost: BTreeMap<String, u64>,
}

#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Message>,
    db: sled::Db,
    /// `<data_dir>/spool`, where sled's files are.
    dir: PathBuf,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Spool {
    /// Opens (or creates) the spool under `dir` for sinks whose records all
    /// share one partition, in order: `SinkId` `i` is `sinks[i]`.
    pub fn open(dir: &Path, sinks: &[String], config: &SpoolConfig) -> Result<Spool, SpoolError> {
        let specs: Vec<SinkSpec> = sinks.iter().map(|n| SinkSpec::unpartitioned(n)).collect();
        Spool::open_partitioned(dir, &specs, config)
    }

    /// Opens (or creates) the spool under `dir` for the given sinks, in order:
    /// `SinkId` `i` is `sinks[i]`.
    pub fn open_partitioned(
        dir: &Path,
        sinks: &[SinkSpec],
        config: &SpoolConfig,
    ) -> Result<Spool, SpoolError> {
        let path = dir.join("spool");
        let quarantine = dir.join("quarantine");
        let limits = types::Limits {
            max_bytes: config.max_bytes.as_u64(),
            when_full: config.when_full,
            min_free: config.min_free.as_u64(),
            dir: dir.to_path_buf(),
        };
        let watermark = watermark::Watermark::new(dir);
        let floor = watermark.read();
        let open = || open_state(&path, sinks, limits.clone(), &quarantine, &floor);
        let (db, state) = match open() {
            Err(SpoolError::Damaged { detail, .. }) => {
                // Damage sled cannot recover must not keep the device from
                // collecting new data: keep the files for a person, start empty.
                let aside = move_aside(dir)?;
                tracing::error!(error = %detail, moved_to = %aside.display(), "spool database is damaged beyond recovery; moved aside, starting an empty spool");
                open()?
            }
            other => other?,
        };
        let lost = watermark::report_lost(&floor, &state.recovered());
        // sled may just have created its directory and files, and it never
        // syncs its `conf` (after a power cut sled finds it empty).
        let db_file = sync_file(&path.join("conf"))
            .and_then(|_| segments::sync_dir(&path))
            .and_then(|_| segments::sync_dir(dir))
            .and_then(|_| std::fs::File::open(path.join("db")))
            .map_err(|source| SpoolError::Open {
                path: path.clone(),
                source: sled::Error::Io(source),
            })?;
        let mut shared_sinks = Vec::new();
        for (i, log) in state.sinks.iter().enumerate() {
            shared_sinks.push(SinkShared {
                name: log.name.clone(),
                chunks: log.chunks.clone(),
                segments: log.segments.dir().to_path_buf(),
                stats: Mutex::new(log.stats),
                records_added: Notify::new(),
                pending: Mutex::new(state.sealed_batches(i)?),
            });
        }
        let shared = Arc::new(Shared {
            sinks: shared_sinks,
            limits: limits.clone(),
            max_bytes: config.max_bytes.as_u64(),
            when_full: config.when_full,
            bytes: Mutex::new(state.bytes),
            space_freed: Notify::new(),
            quarantine,
            storage_failed: tokio_util::sync::CancellationToken::new(),
            lost,
        });
        let (commands, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer_db = db.clone();
        let spool_dir = path.clone();
        let writer = std::thread::Builder::new()
            .name("silt-spool".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    writer::writer(state, writer_db, db_file, rx, writer_shared, watermark)
                });
                if std::panic::catch_unwind(run).is_err() {
                    // Without its writer the agent can acknowledge nothing;
                    // exit so the supervisor restarts it. Everything already
                    // acknowledged is on disk.
                    tracing::error!("spool writer panicked; exiting so the agent restarts");
                    std::process::exit(70);
                }
            })
            .map_err(|e| SpoolError::Open {
                path,
                source: sled::Error::Io(e),
            })?;
        Ok(Spool {
            shared,
            commands,
            db,
            dir: spool_dir,
            writer: Arc::new(Mutex::new(Some(writer))),
        })
    }

    pub fn sink_id(&self, name: &str) -> Option<SinkId> {
        self.shared.sinks.iter().position(|s| s.name == name)
    }

    pub fn sink_name(&self, sink: SinkId) -> &str {
        &self.shared.sinks[sink].name
    }

    /// Stores events for the given sinks; returns once they are on disk.
    pub async fn append(
        &self,
        sinks: &[SinkId],
        events: Vec<Event>,
    ) -> Result<AppendOutcome, SpoolError> {
        self.append_groups(vec![(sinks.to_vec(), events)], Vec::new())
            .await
    }

    /// Stores several groups of events, each for its own sinks, as one unit:
    /// all are stored or none (a transform chain may send different events
    /// to different sinks, and a retry must not duplicate half of them).
    pub async fn append_groups(
        &self,
        groups: Vec<(Vec<SinkId>, Vec<Event>)>,
        marks: Vec<Mark>,
    ) -> Result<AppendOutcome, SpoolError> {
        self.append_admitted(groups, marks, Admission::Policy).await
    }

    /// [`Spool::append_groups`] with `admission` deciding what a full spool
    /// may do to these events.
    pub async fn append_admitted(
        &self,
        groups: Vec<(Vec<SinkId>, Vec<Event>)>,
        marks: Vec<Mark>,
        admission: Admission,
    ) -> Result<AppendOutcome, SpoolError> {
        let groups: Vec<_> = groups
            .into_iter()
            .filter(|(sinks, events)| !sinks.is_empty() && !events.is_empty())
            .collect();
        if groups.is_empty() && marks.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::Append {
            groups,
            marks,
            admission,
            reply,
        })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Closes the next due batch for `sink`, durably, before anything is
    /// uploaded; `None` when no partition is due under `rule`.
    pub async fn seal(
        &self,
        sink: SinkId,
        rule: SealRule,
        key: impl FnOnce(&Event, u64) -> String + Send + 'static,
    ) -> SealResult {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Seal {
            sink,
            rule,
            key: Box::new(key),
            reply,
        })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Drops a batch and its records once its object is confirmed written.
    pub async fn complete(&self, sink: SinkId, batch: BatchMeta) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Complete { sink, batch, reply })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    fn send(&self, command: Command) -> Result<(), SpoolError> {
        self.commands
            .send(Message::Command(command))
            .map_err(|_| SpoolError::Closed)
    }

    /// Batches sealed by an earlier run that still wait for upload, oldest first.
    /// Each is handed out once.
    pub fn take_pending(&self, sink: SinkId) -> Vec<BatchMeta> {
        std::mem::take(&mut *self.shared.sinks[sink].pending.lock().expect("lock"))
    }

    /// A mark written by an earlier append.
    pub fn mark(&self, tree: &str, key: &[u8]) -> Result<Option<sled::IVec>, SpoolError> {
        Ok(self.db.open_tree(tree)?.get(key)?)
    }

    /// Every mark of `tree`; none (and no tree created) if it never had one.
    pub fn marks(&self, tree: &str) -> Result<StoredMarks, SpoolError> {
        if !self.db.tree_names().iter().any(|n| n == tree.as_bytes()) {
            return Ok(Vec::new());
        }
        self.db
            .open_tree(tree)?
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    /// Puts batches taken with [`Spool::take_pending`] back, in front, when
    /// they could not be handled now.
    pub fn return_pending(&self, sink: SinkId, batches: Vec<BatchMeta>) {
        let mut pending = self.shared.sinks[sink].pending.lock().expect("lock");
        let later = std::mem::replace(&mut *pending, batches);
        pending.extend(later);
    }

    /// The events of a sealed batch, read back from disk.
    pub fn load_batch(&self, sink: SinkId, batch: &BatchMeta) -> Result<LoadedBatch, SpoolError> {
        let s = &self.shared.sinks[sink];
        sink_log::load_batch(
            &s.chunks,
            &s.segments,
            &s.name,
            batch,
            &self.shared.quarantine,
        )
    }

    /// Calls `f` with every event held for `sink`, sealed or not; chunks
    /// that no longer decode are skipped (the batcher quarantines them).
    pub fn for_each_event(
        &self,
        sink: SinkId,
        mut f: impl FnMut(&Event),
    ) -> Result<(), SpoolError> {
        let s = &self.shared.sinks[sink];
        for item in s.chunks.iter() {
            let (k, v) = item?;
            let (_, _, r) = sink_log::decode_ref(&k, &v)?;
            if let sink_log::Chunk::Events(events) = sink_log::read_chunk(&s.segments, &r)? {
                events.iter().for_each(&mut f);
            }
        }
        Ok(())
    }

    /// Records per sink that an earlier run had acknowledged and this open
    /// found missing (the spool's files were damaged or lost writes).
    pub fn lost_on_open(&self) -> &BTreeMap<String, u64> {
        &self.shared.lost
    }

    pub fn stats(&self, sink: SinkId) -> SinkStats {
        *self.shared.sinks[sink].stats.lock().expect("lock")
    }

    /// Completes when the storage under the spool failed (ENOSPC, I/O
    /// error). sled keeps failing after that until it is reopened.
    pub async fn storage_failed(&self) {
        self.shared.storage_failed.cancelled().await
    }

    /// Whether an append would be refused now (full, with the block policy).
    pub fn refuses_appends(&self) -> bool {
        self.shared.when_full == crate::config::WhenFull::Block
            && self.bytes() >= self.shared.max_bytes
    }

    /// Whether storing `need` more bytes under the data directory (a media
    /// file beside the spool) would dip under `spool.min_free`.
    pub fn disk_short(&self, need: u64) -> bool {
        self.shared.limits.disk_short(need)
    }

    /// `spool.max_bytes`.
    pub fn max_bytes(&self) -> u64 {
        self.shared.max_bytes
    }

    /// Total encoded bytes held, across sinks.
    pub fn bytes(&self) -> u64 {
        *self.shared.bytes.lock().expect("lock")
    }

    /// Waits until a commit adds records for `sink` (or `timeout` passes).
    pub async fn records_added(&self, sink: SinkId, timeout: Duration) {
        let _ =
            tokio::time::timeout(timeout, self.shared.sinks[sink].records_added.notified()).await;
    }

    /// Waits until a commit frees space (or `timeout` passes).
    pub async fn space_freed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.space_freed.notified()).await;
    }

    /// Flushes everything, stops the writer and releases the database, so
    /// the same directory can be opened again. Commands sent after this fail
    /// with [`SpoolError::Closed`].
    pub fn close(self) -> Result<(), SpoolError> {
        let _ = self.commands.send(Message::Close);
        if let Some(handle) = self.writer.lock().expect("lock").take() {
            let _ = handle.join();
        }
        // After a storage failure sled refuses every flush; what it holds
        // unflushed was never acknowledged, so closing goes on regardless.
        let flushed = self
            .db
            .flush()
            .and_then(|_| sync_db(&self.dir).map_err(sled::Error::Io));
        if let Err(e) = flushed
            && !self.shared.storage_failed.is_cancelled()
        {
            return Err(e.into());
        }
        Ok(())
    }
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// fdatasyncs sled's log file: sled's `flush()` stops at `sync_file_range`,
/// and a sync through any descriptor of the file makes its data durable.
pub(super) fn sync_db(spool_dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(spool_dir.join("db"))?.sync_data()
}

/// Moves `<dir>/spool` into `<dir>/quarantine/spool-<ms>`; returns where.
fn move_aside(dir: &Path) -> Result<PathBuf, SpoolError> {
    let path = dir.join("spool");
    let aside = dir.join("quarantine").join(format!("spool-{}", now_ms()));
    std::fs::create_dir_all(dir.join("quarantine"))
        .and_then(|_| std::fs::rename(&path, &aside))
        .map_err(|e| SpoolError::Open {
            path,
            source: sled::Error::Io(e),
        })?;
    Ok(aside)
}

/// Opens sled and the spool state on it. sled reports some damage as
/// `Corruption` and panics on other damage; both become [`SpoolError::Damaged`].
fn open_state(
    path: &Path,
    sinks: &[SinkSpec],
    limits: types::Limits,
    quarantine: &Path,
    floor: &BTreeMap<String, types::Reached>,
) -> Result<(sled::Db, SpoolState), SpoolError> {
    let damaged = |detail: String| SpoolError::Damaged {
        path: path.to_path_buf(),
        detail,
    };
    // The partitioners are plain functions of an event; a panic in sled
    // leaves nothing of them half-updated.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let db = open_db(path)?;
        let state = SpoolState::open(&db, path, sinks, limits, quarantine, floor)?;
        Ok((db, state))
    }));
    match opened {
        Err(panic) => Err(damaged(panic_message(&*panic))),
        Ok(Err(SpoolError::Open {
            source: sled::Error::Corruption { .. },
            ..
        }))
        | Ok(Err(SpoolError::Storage(sled::Error::Corruption { .. }))) => {
            Err(damaged("sled reports corruption".into()))
        }
        Ok(other) => other,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "sled panicked while reading it".into())
}

/// Opens sled, waiting briefly for the lock: sled's background threads of a
/// database closed a moment ago (a restart in the same process) may still
/// hold it.
fn open_db(path: &Path) -> Result<sled::Db, SpoolError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(32 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => {
                return other.map_err(|source| SpoolError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}
