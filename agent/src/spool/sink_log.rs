//! One sink's log: its open partitions, the chunks a group commit is
//! building, and reading chunks back.
//!
//! sled's `chunks/<sink>` tree maps (partition, first sequence) to a
//! [`ChunkRef`]; the chunk itself is in the sink's segment files. A
//! partition is a run of records that may share an object (same rendered
//! key prefix); its records below the end of its last sealed batch belong
//! to a batch, the rest are "unsealed" and wait for the batcher.

use std::collections::HashMap;
use std::path::Path;

use super::SpoolError;
use super::chunk::{self, ChunkBuilder, ChunkRef, DecodeError};
pub(super) use super::partitions::OpenPartition;
use super::partitions::Partitions;
use super::segments::{self, Segments};
use super::types::{BatchMeta, Partitioner, SealRule, SinkStats};
use crate::event::Event;

/// A chunk is closed at this size and the next event starts another, so
/// reading one back never needs much memory.
const CHUNK_TARGET: usize = 256 * 1024;

/// Events of one partition added during the current group commit.
struct Run {
    partition: u64,
    chunk: ChunkBuilder,
    bytes: u64,
    first_ts: i64,
}

pub(super) struct SinkLog {
    pub name: String,
    pub chunks: sled::Tree,
    pub batches: sled::Tree,
    pub partition_of: Partitioner,
    pub next_seq: u64,
    pub next_batch: u64,
    pub next_partition: u64,
    pub open: Partitions,
    pub stats: SinkStats,
    pub segments: Segments,
    /// `next_seq` as the files held it on open.
    pub recovered_seq: u64,
    runs: Vec<Run>,
    /// The run still taking events, per partition.
    filling: HashMap<u64, usize>,
}

/// Chunk key: partition then sequence, so a partition is one key range.
pub(super) fn record_key(partition: u64, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&partition.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// `(partition, sequence)` of a chunk key.
pub(super) fn split_record_key(key: &[u8]) -> (u64, u64) {
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    match key.split_at_checked(8) {
        Some((partition, seq)) => (be(partition), be(seq)),
        None => (0, be(key)),
    }
}

/// A stored chunk read back: its selected events, or why it cannot be.
pub(super) enum Chunk {
    Events(Vec<Event>),
    Damaged { detail: String, raw: Vec<u8> },
}

/// Reads the events `r` selects. A chunk that fails its checksum, or whose
/// segment is gone or short, is `Damaged`; other I/O errors are errors.
pub(super) fn read_chunk(dir: &Path, r: &ChunkRef) -> Result<Chunk, SpoolError> {
    let raw = match segments::read(dir, r) {
        Ok(raw) => raw,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            return Ok(Chunk::Damaged {
                detail: format!("segment {} unreadable: {e}", r.segment),
                raw: Vec::new(),
            });
        }
        Err(e) => return Err(SpoolError::Storage(sled::Error::Io(e))),
    };
    let raw = bytes::Bytes::from(raw);
    let selected = chunk::decode_chunk_shared(&raw).and_then(|events| {
        let (from, to) = (r.skip as usize, (r.skip + r.count) as usize);
        if to > events.len() {
            return Err(DecodeError::Truncated("chunk reference"));
        }
        Ok(events.into_iter().skip(from).take(to - from).collect())
    });
    Ok(match selected {
        Ok(events) => Chunk::Events(events),
        Err(e) => Chunk::Damaged {
            detail: e.to_string(),
            raw: raw.to_vec(),
        },
    })
}

pub(super) fn decode_ref(key: &[u8], value: &[u8]) -> Result<(u64, u64, ChunkRef), SpoolError> {
    let (partition, seq) = split_record_key(key);
    let r = ChunkRef::decode(value).ok_or_else(|| SpoolError::Corrupt {
        what: format!("chunk reference {partition}/{seq}"),
        detail: format!("{} bytes, not a chunk reference", value.len()),
    })?;
    Ok((partition, seq, r))
}

impl SinkLog {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        chunks: sled::Tree,
        batches: sled::Tree,
        partition_of: Partitioner,
        next_seq: u64,
        next_batch: u64,
        segments: Segments,
    ) -> SinkLog {
        SinkLog {
            name: name.to_string(),
            chunks,
            batches,
            partition_of,
            next_seq,
            next_batch,
            next_partition: 0,
            open: Partitions::default(),
            stats: SinkStats::default(),
            segments,
            recovered_seq: next_seq,
            runs: Vec::new(),
            filling: HashMap::new(),
        }
    }

    /// Adds an event to this group commit's chunk of its partition.
    pub fn add(&mut self, event: &Event, len: u64) {
        let partition = self.partition_for(event);
        let i = *self.filling.entry(partition).or_insert_with(|| {
            self.runs.push(Run {
                partition,
                chunk: ChunkBuilder::new(),
                bytes: 0,
                first_ts: event.ts_ms,
            });
            self.runs.len() - 1
        });
        let run = &mut self.runs[i];
        run.chunk.push(event);
        run.bytes += len;
        if run.chunk.len() >= CHUNK_TARGET {
            self.filling.remove(&partition);
        }
        let p = self.open.get_mut(partition).expect("just opened");
        p.records += 1;
        p.bytes += len;
        p.oldest_ms.get_or_insert(event.ts_ms);
    }

    /// Writes the chunks built since the last call to the segment files;
    /// [`SinkLog::ref_batch`] then numbers them for sled. Durable after the
    /// segments are synced and sled flushed.
    pub fn write_chunks(&mut self) -> Result<Vec<(u64, ChunkRef)>, SpoolError> {
        self.filling.clear();
        let mut written = Vec::with_capacity(self.runs.len());
        for run in std::mem::take(&mut self.runs) {
            let count = run.chunk.count();
            let chunk = run.chunk.finish();
            let (segment, offset) = self
                .segments
                .append(&chunk)
                .map_err(|e| SpoolError::Storage(sled::Error::Io(e)))?;
            self.segments.add_ref(segment);
            let r = ChunkRef {
                segment,
                offset,
                len: chunk.len() as u32,
                skip: 0,
                count,
                bytes: run.bytes,
                first_ts: run.first_ts,
            };
            written.push((run.partition, r));
        }
        Ok(written)
    }

    /// The references of chunks [`SinkLog::write_chunks`] wrote, numbering
    /// their records, for the caller to apply to [`SinkLog::chunks`].
    pub fn ref_batch(&mut self, written: Vec<(u64, ChunkRef)>) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (partition, r) in written {
            batch.insert(&record_key(partition, self.next_seq), &r.encode()[..]);
            self.next_seq += r.count as u64;
        }
        batch
    }

    /// The chunk references of `partition` from sequence `from` on.
    pub fn refs_from(
        &self,
        partition: u64,
        from: u64,
    ) -> impl Iterator<Item = Result<(u64, ChunkRef), SpoolError>> + '_ {
        self.chunks
            .range(record_key(partition, from)..=record_key(partition, u64::MAX))
            .map(|item| {
                let (k, v) = item?;
                let (_, seq, r) = decode_ref(&k, &v)?;
                Ok((seq, r))
            })
    }

    /// Removes one chunk reference (in sled and the segment count).
    pub fn remove_ref(&mut self, partition: u64, seq: u64, r: &ChunkRef) -> Result<(), SpoolError> {
        self.chunks.remove(record_key(partition, seq))?;
        self.segments.drop_ref(r.segment);
        Ok(())
    }

    /// Splits the reference at `seq` after its first `keep` events, whose
    /// bytes are `kept_bytes`; `next_ts` is the timestamp of the first event
    /// of the rest.
    pub fn split_ref(
        &mut self,
        partition: u64,
        seq: u64,
        r: &ChunkRef,
        keep: u32,
        kept_bytes: u64,
        next_ts: i64,
    ) -> Result<(), SpoolError> {
        let head = ChunkRef {
            count: keep,
            bytes: kept_bytes,
            ..*r
        };
        let tail = ChunkRef {
            skip: r.skip + keep,
            count: r.count - keep,
            bytes: r.bytes - kept_bytes,
            first_ts: next_ts,
            ..*r
        };
        let mut batch = sled::Batch::default();
        batch.insert(&record_key(partition, seq), &head.encode()[..]);
        batch.insert(
            &record_key(partition, seq + keep as u64),
            &tail.encode()[..],
        );
        self.chunks.apply_batch(batch)?;
        self.segments.add_ref(r.segment);
        Ok(())
    }

    /// The open partition `event` belongs to, opened if needed.
    fn partition_for(&mut self, event: &Event) -> u64 {
        let prefix = (self.partition_of)(event);
        if let Some(id) = self.open.by_prefix(&prefix) {
            return id;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        self.open.insert(
            id,
            OpenPartition {
                prefix,
                unsealed_from: self.next_seq,
                records: 0,
                bytes: 0,
                oldest_ms: None,
            },
        );
        id
    }

    pub fn close_partition(&mut self, id: u64) {
        self.open.remove(id);
    }

    pub fn oldest_partition(&mut self) -> Option<(u64, i64)> {
        self.open.reindex();
        self.open.oldest()
    }

    /// The fullest full partition first; otherwise the oldest one, if it is old
    /// enough, there are too many open, or `force`.
    pub fn pick(&mut self, rule: &SealRule, now_ms: i64) -> Option<u64> {
        self.open.reindex();
        if let Some(id) = self.open.full(rule.max_records, rule.max_bytes) {
            return Some(id);
        }
        let (id, oldest) = self.oldest_partition()?;
        let due = rule.force
            || self.open.len() > rule.max_partitions
            || now_ms.saturating_sub(oldest) >= rule.max_age_ms;
        due.then_some(id)
    }

    /// Timestamp of the first record of `partition` at or after `seq`.
    pub fn peek(&self, partition: u64, seq: u64) -> Result<Option<i64>, SpoolError> {
        Ok(self
            .refs_from(partition, seq)
            .next()
            .transpose()?
            .map(|(_, r)| r.first_ts))
    }

    /// Marks `n` records of `bytes` from the front of `partition` as gone
    /// from its unsealed tail (sealed or dropped), the next one at `next`.
    pub fn take_front(
        &mut self,
        partition: u64,
        next: u64,
        n: u64,
        bytes: u64,
    ) -> Result<(), SpoolError> {
        let oldest = self.peek(partition, next)?;
        let p = self.open.get_mut(partition).expect("an open partition");
        p.unsealed_from = next;
        p.records -= n;
        p.bytes -= bytes;
        p.oldest_ms = oldest;
        if p.records == 0 {
            self.close_partition(partition);
        }
        Ok(())
    }

    pub fn refresh_stats(&mut self) {
        self.open.reindex();
        let s = &mut self.stats;
        s.partitions = self.open.len();
        s.unsealed_records = self.open.records();
        s.unsealed_bytes = self.open.bytes();
        s.oldest_unsealed_ms = self.open.oldest_ms();
        (s.fullest_records, s.fullest_bytes) = self.open.fullest();
    }
}

/// A sealed batch read back from disk.
#[derive(Debug)]
pub struct LoadedBatch {
    pub events: Vec<Event>,
    /// Records of the range no longer in the spool. Only `complete` removes
    /// records of a sealed batch, and only after the upload was confirmed,
    /// so a batch with missing records was uploaded before a crash.
    pub missing: u64,
}

pub(super) fn load_batch(
    chunks: &sled::Tree,
    dir: &Path,
    sink: &str,
    batch: &BatchMeta,
    quarantine_dir: &Path,
) -> Result<LoadedBatch, SpoolError> {
    let mut events = Vec::with_capacity(batch.records as usize);
    let mut found = 0;
    let range = record_key(batch.partition, batch.first)..=record_key(batch.partition, batch.last);
    for item in chunks.range(range) {
        let (k, v) = item?;
        let (_, seq, r) = decode_ref(&k, &v)?;
        found += r.count as u64;
        match read_chunk(dir, &r)? {
            Chunk::Events(mut e) => events.append(&mut e),
            Chunk::Damaged { detail, raw } => quarantine(quarantine_dir, sink, seq, &detail, &raw),
        }
    }
    Ok(LoadedBatch {
        events,
        missing: batch.count.saturating_sub(found),
    })
}

/// Keeps a chunk that failed its checksum where a person can look at it,
/// instead of uploading garbage or refusing to start.
pub(super) fn quarantine(dir: &Path, sink: &str, seq: u64, detail: &str, raw: &[u8]) {
    let path = dir.join(format!("{sink}-{seq:020}.bin"));
    let written = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, raw));
    match written {
        Ok(()) => {
            tracing::warn!(sink, seq, error = detail, path = %path.display(), "corrupt spool chunk quarantined")
        }
        Err(io) => {
            tracing::warn!(sink, seq, error = detail, io = %io, "corrupt spool chunk skipped; writing the quarantine file failed")
        }
    }
}
