//! The durable spool: every event is here before anyone is told it was
//! received, and stays until the object holding it is confirmed written.
//!
//! One writer thread owns the sled trees ([`state::SpoolState`]). Callers
//! send it commands; it applies every command that is waiting, flushes sled
//! once (group commit: one fsync for many appends), and only then answers.
//! An answer therefore always means "on disk".

mod record;
mod state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::config::SpoolConfig;
use crate::event::{Event, now_ms};
pub use record::{DecodeError, decode, encode};
pub use state::{AppendOutcome, BatchMeta, SinkStats};
use state::SpoolState;

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
}

impl SpoolError {
    /// Whether trying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SpoolError::Full | SpoolError::Storage(_))
    }
}

/// Index of a sink in the spool, fixed for the life of a [`Spool`].
pub type SinkId = usize;

type KeyFn = Box<dyn FnOnce(&Event, u64) -> String + Send>;

enum Command {
    Append {
        sinks: Vec<SinkId>,
        events: Vec<Event>,
        reply: oneshot::Sender<Result<AppendOutcome, SpoolError>>,
    },
    Seal {
        sink: SinkId,
        max_records: u64,
        max_bytes: u64,
        key: KeyFn,
        reply: oneshot::Sender<Result<Option<(BatchMeta, Vec<Event>)>, SpoolError>>,
    },
    Complete {
        sink: SinkId,
        batch: BatchMeta,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// Answers computed while applying a group, sent after its flush.
enum Reply {
    Append(oneshot::Sender<Result<AppendOutcome, SpoolError>>, Result<AppendOutcome, SpoolError>),
    Seal(
        oneshot::Sender<Result<Option<(BatchMeta, Vec<Event>)>, SpoolError>>,
        Result<Option<(BatchMeta, Vec<Event>)>, SpoolError>,
    ),
    Complete(oneshot::Sender<Result<(), SpoolError>>, Result<(), SpoolError>),
}

struct SinkShared {
    name: String,
    records: sled::Tree,
    stats: Mutex<SinkStats>,
    /// Woken after a commit adds records for this sink.
    records_added: Notify,
    pending: Mutex<Vec<BatchMeta>>,
}

struct Shared {
    sinks: Vec<SinkShared>,
    bytes: Mutex<u64>,
    /// Woken after a commit frees space.
    space_freed: Notify,
    quarantine: PathBuf,
}

#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    db: sled::Db,
}

/// Most commands applied under one flush; bounds reply latency under load.
const MAX_GROUP: usize = 4096;

impl Spool {
    /// Opens (or creates) the spool under `dir` for the given sinks, in order:
    /// `SinkId` `i` is `sinks[i]`.
    pub fn open(dir: &Path, sinks: &[String], config: &SpoolConfig) -> Result<Spool, SpoolError> {
        let path = dir.join("spool");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(32 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| SpoolError::Open { path: path.clone(), source })?;
        let quarantine = dir.join("quarantine");
        let state = SpoolState::open(&db, sinks, config.max_bytes.as_u64(), config.when_full, &quarantine)?;
        let mut shared_sinks = Vec::new();
        for (i, log) in state.sinks.iter().enumerate() {
            shared_sinks.push(SinkShared {
                name: log.name.clone(),
                records: state.records_tree(i),
                stats: Mutex::new(log.stats),
                records_added: Notify::new(),
                pending: Mutex::new(state.sealed_batches(i)?),
            });
        }
        let shared = Arc::new(Shared {
            sinks: shared_sinks,
            bytes: Mutex::new(state.bytes),
            space_freed: Notify::new(),
            quarantine,
        });
        let (commands, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("silt-spool".into())
            .spawn(move || writer(state, writer_db, rx, writer_shared))
            .map_err(|e| SpoolError::Open { path, source: sled::Error::Io(e) })?;
        Ok(Spool { shared, commands, db })
    }

    pub fn sink_id(&self, name: &str) -> Option<SinkId> {
        self.shared.sinks.iter().position(|s| s.name == name)
    }

    pub fn sink_name(&self, sink: SinkId) -> &str {
        &self.shared.sinks[sink].name
    }

    /// Stores events for the given sinks; returns once they are on disk.
    pub async fn append(&self, sinks: &[SinkId], events: Vec<Event>) -> Result<AppendOutcome, SpoolError> {
        if events.is_empty() || sinks.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::Append { sinks: sinks.to_vec(), events, reply })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Closes the next batch for `sink`, durably, before anything is uploaded.
    pub async fn seal(
        &self,
        sink: SinkId,
        max_records: u64,
        max_bytes: u64,
        key: impl FnOnce(&Event, u64) -> String + Send + 'static,
    ) -> Result<Option<(BatchMeta, Vec<Event>)>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Seal { sink, max_records, max_bytes, key: Box::new(key), reply })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Drops a batch and its records once its object is confirmed written.
    pub async fn complete(&self, sink: SinkId, batch: BatchMeta) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Complete { sink, batch, reply })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    fn send(&self, command: Command) -> Result<(), SpoolError> {
        self.commands.send(command).map_err(|_| SpoolError::Closed)
    }

    /// Batches sealed by an earlier run that still wait for upload, oldest first.
    /// Each is handed out once.
    pub fn take_pending(&self, sink: SinkId) -> Vec<BatchMeta> {
        std::mem::take(&mut *self.shared.sinks[sink].pending.lock().expect("lock"))
    }

    /// The events of a sealed batch, read back from disk.
    pub fn load_batch(&self, sink: SinkId, batch: &BatchMeta) -> Result<Vec<Event>, SpoolError> {
        let s = &self.shared.sinks[sink];
        state::load_batch(&s.records, &s.name, batch, &self.shared.quarantine)
    }

    pub fn stats(&self, sink: SinkId) -> SinkStats {
        *self.shared.sinks[sink].stats.lock().expect("lock")
    }

    /// Total encoded bytes held, across sinks.
    pub fn bytes(&self) -> u64 {
        *self.shared.bytes.lock().expect("lock")
    }

    /// Waits until a commit adds records for `sink` (or `timeout` passes).
    pub async fn records_added(&self, sink: SinkId, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.sinks[sink].records_added.notified()).await;
    }

    /// Waits until a commit frees space (or `timeout` passes).
    pub async fn space_freed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.space_freed.notified()).await;
    }

    /// Flushes everything to disk; used at shutdown.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

fn writer(mut state: SpoolState, db: sled::Db, rx: mpsc::Receiver<Command>, shared: Arc<Shared>) {
    while let Ok(first) = rx.recv() {
        let mut replies = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next.take() {
            replies.push(apply(&mut state, command));
            if replies.len() < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
        let flushed = db.flush();
        publish(&state, &shared);
        for reply in replies {
            send_reply(reply, flushed.as_ref().err());
        }
    }
}

fn apply(state: &mut SpoolState, command: Command) -> Reply {
    match command {
        Command::Append { sinks, events, reply } => Reply::Append(reply, state.append(&sinks, &events)),
        Command::Seal { sink, max_records, max_bytes, key, reply } => {
            Reply::Seal(reply, state.seal(sink, max_records, max_bytes, key, now_ms()))
        }
        Command::Complete { sink, batch, reply } => Reply::Complete(reply, state.complete(sink, &batch)),
    }
}

/// Makes the state after a commit visible to readers and wakes waiters.
fn publish(state: &SpoolState, shared: &Shared) {
    let mut freed = false;
    {
        let mut bytes = shared.bytes.lock().expect("lock");
        freed |= state.bytes < *bytes;
        *bytes = state.bytes;
    }
    for (log, s) in state.sinks.iter().zip(&shared.sinks) {
        let mut stats = s.stats.lock().expect("lock");
        let added = log.stats.unsealed_records > stats.unsealed_records;
        *stats = log.stats;
        drop(stats);
        if added {
            s.records_added.notify_one();
        }
    }
    if freed {
        shared.space_freed.notify_waiters();
    }
}

fn send_reply(reply: Reply, flush_error: Option<&sled::Error>) {
    // A failed flush fails every answer of the group: nothing in it is known durable.
    let fail = || SpoolError::Storage(flush_error.cloned().expect("flush error"));
    match reply {
        Reply::Append(tx, r) => {
            let _ = tx.send(if flush_error.is_some() { Err(fail()) } else { r });
        }
        Reply::Seal(tx, r) => {
            let _ = tx.send(if flush_error.is_some() { Err(fail()) } else { r });
        }
        Reply::Complete(tx, r) => {
            let _ = tx.send(if flush_error.is_some() { Err(fail()) } else { r });
        }
    }
}
