//! The spool's vocabulary: what callers hand it (sinks, seal rules, marks)
//! and what it answers (outcomes, sealed batches, statistics).

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::WhenFull;
use crate::event::Event;

/// A closed batch: its records, and the object key it is uploaded under.
/// Written before the upload starts, so a retry or restart re-uploads the
/// same records under the same key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMeta {
    pub seq: u64,
    /// The partition whose records `first..=last` the batch holds.
    #[serde(default)]
    pub partition: u64,
    pub first: u64,
    pub last: u64,
    pub key: String,
    /// Records that decoded; corrupt ones in the range were quarantined.
    pub records: u64,
    /// Records in the range, corrupt ones included.
    pub count: u64,
    /// Encoded bytes of the range in the spool.
    pub bytes: u64,
    pub sealed_ms: i64,
    /// Records of damaged chunks `silt spool check --repair` removed from
    /// the range (they are in quarantine); `records`, `count` and `bytes`
    /// cover the survivors, so the batch uploads them like any other.
    #[serde(default)]
    pub repaired: u64,
}

/// What the batcher needs to decide when to seal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub unsealed_records: u64,
    pub unsealed_bytes: u64,
    /// Timestamp of the oldest unsealed record.
    pub oldest_unsealed_ms: Option<i64>,
    pub sealed_batches: u64,
    pub sealed_bytes: u64,
    /// Partitions holding unsealed records.
    pub partitions: usize,
    /// Unsealed records and bytes of the fullest partition.
    pub fullest_records: u64,
    pub fullest_bytes: u64,
}

/// Which partition to seal next: a full one, else the oldest when due.
#[derive(Debug, Clone, Copy)]
pub struct SealRule {
    pub max_records: u64,
    pub max_bytes: u64,
    pub max_age_ms: i64,
    pub max_partitions: usize,
    /// Seal the oldest partition even if it is not due (draining).
    pub force: bool,
}

/// Maps an event to its partition (the key it renders to without `{batch}`).
pub type Partitioner = Arc<dyn Fn(&Event) -> String + Send + Sync>;

/// One sink as the spool knows it.
#[derive(Clone)]
pub struct SinkSpec {
    pub name: String,
    pub partition_of: Partitioner,
}

impl SinkSpec {
    /// A sink whose records all share one partition.
    pub fn unpartitioned(name: &str) -> SinkSpec {
        SinkSpec {
            name: name.to_string(),
            partition_of: Arc::new(|_| String::new()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    pub stored: usize,
    /// Events dropped by `drop_newest` (or `drop_oldest` when nothing older
    /// could make room).
    pub dropped_new: usize,
    /// Older records dropped by `drop_oldest` to make room.
    pub dropped_old: u64,
}

/// What a full spool may do with an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// `spool.when_full` decides: block, or drop new or old records.
    Policy,
    /// Metadata of data already accepted (a media index line): never
    /// dropped. Older records may still make room under `drop_oldest`;
    /// otherwise the append fails with [`super::SpoolError::Full`] and the
    /// caller retries.
    NeverDrop,
}

/// When the spool counts as full.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// Free bytes to leave on the filesystem holding `dir`.
    pub min_free: u64,
    pub dir: PathBuf,
}

impl Limits {
    /// Whether writing `need` more bytes would dip under the free-disk floor.
    pub fn disk_short(&self, need: u64) -> bool {
        self.min_free > 0
            && fs2::available_space(&self.dir)
                .is_ok_and(|free| free < self.min_free.saturating_add(need))
    }
}

/// A small key/value stored with an append, after its records, so it is
/// durable exactly when they are (e.g. which MQTT packet ids were committed).
/// An empty value removes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub tree: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// The (key, value) pairs of one mark tree.
pub type StoredMarks = Vec<(Vec<u8>, Vec<u8>)>;

/// What the watermark says a sink had durably reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reached {
    pub next_seq: u64,
    #[serde(default)]
    pub next_batch: u64,
}
