//! The spool's state machine over sled: append, seal, complete, drop.
//!
//! Everything here is synchronous and runs on the spool's single writer
//! thread, so no two mutations interleave; durability (the flush) is the
//! caller's job, done once per group of commands.
//!
//! Per sink there are two trees: `records/<sink>` ((partition, sequence)
//! -> encoded event) and `batches/<sink>` (batch sequence -> [`BatchMeta`]).
//! A partition is a run of records that may share an object (same rendered
//! key prefix); its records below the end of its last sealed batch belong
//! to a batch, the rest are "unsealed" and wait for the batcher.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::SpoolError;
use super::record;
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

/// Which partition to seal next; see [`SpoolState::seal`].
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

/// The unsealed tail of one partition.
#[derive(Debug)]
struct OpenPartition {
    prefix: String,
    /// First record sequence not covered by a sealed batch.
    unsealed_from: u64,
    records: u64,
    bytes: u64,
    oldest_ms: Option<i64>,
}

pub(super) struct SinkLog {
    pub name: String,
    records: sled::Tree,
    batches: sled::Tree,
    partition_of: Partitioner,
    next_seq: u64,
    next_batch: u64,
    next_partition: u64,
    open: BTreeMap<u64, OpenPartition>,
    by_prefix: HashMap<String, u64>,
    pub stats: SinkStats,
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

pub(super) struct SpoolState {
    db: sled::Db,
    meta: sled::Tree,
    pub sinks: Vec<SinkLog>,
    pub bytes: u64,
    limits: Limits,
    quarantine: PathBuf,
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn from_be(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or([0; 8]))
}

/// Record key: partition then sequence, so a partition is one key range.
pub(super) fn record_key(partition: u64, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&be(partition));
    key[8..].copy_from_slice(&be(seq));
    key
}

/// `(partition, sequence)` of a record key.
pub(super) fn split_record_key(key: &[u8]) -> (u64, u64) {
    match key.split_at_checked(8) {
        Some((partition, seq)) => (from_be(partition), from_be(seq)),
        None => (0, from_be(key)),
    }
}

impl SpoolState {
    pub fn open(
        db: &sled::Db,
        sinks: &[SinkSpec],
        limits: Limits,
        quarantine: &Path,
    ) -> Result<SpoolState, SpoolError> {
        let meta = db.open_tree("meta")?;
        let mut state = SpoolState {
            db: db.clone(),
            meta,
            sinks: Vec::new(),
            bytes: 0,
            limits,
            quarantine: quarantine.to_path_buf(),
        };
        for spec in sinks {
            let log = state.open_sink(db, spec)?;
            state.bytes += log.stats.unsealed_bytes + log.stats.sealed_bytes;
            state.sinks.push(log);
        }
        Ok(state)
    }

    fn open_sink(&self, db: &sled::Db, spec: &SinkSpec) -> Result<SinkLog, SpoolError> {
        let name = spec.name.as_str();
        let records = db.open_tree(format!("records/{name}"))?;
        let batches = db.open_tree(format!("batches/{name}"))?;
        let stored_next = |key: String| -> Result<u64, SpoolError> {
            Ok(self.meta.get(key)?.map(|v| from_be(&v)).unwrap_or(0))
        };
        let mut log = SinkLog {
            name: name.to_string(),
            records,
            batches,
            partition_of: spec.partition_of.clone(),
            next_seq: stored_next(format!("next_seq/{name}"))?,
            next_batch: stored_next(format!("next_batch/{name}"))?,
            next_partition: 0,
            open: BTreeMap::new(),
            by_prefix: HashMap::new(),
            stats: SinkStats::default(),
        };
        let mut sealed_until: HashMap<u64, u64> = HashMap::new();
        for item in log.batches.iter() {
            let (k, v) = item?;
            let meta = match self.decode_meta(name, &k, &v) {
                Ok(meta) => meta,
                Err(e) => {
                    // Its records become unsealed again and go out in a new
                    // batch: possibly a second copy, never a loss.
                    tracing::warn!(sink = name, error = %e, "corrupt sealed batch record; its events will be batched again");
                    quarantine_raw(
                        &self.quarantine,
                        &format!("{name}-batch-{:020}.bin", from_be(&k)),
                        &v,
                    );
                    log.batches.remove(&k)?;
                    continue;
                }
            };
            log.stats.sealed_batches += 1;
            log.stats.sealed_bytes += meta.bytes;
            let until = sealed_until.entry(meta.partition).or_default();
            *until = (*until).max(meta.last + 1);
            log.next_batch = log.next_batch.max(meta.seq + 1);
            log.next_partition = log.next_partition.max(meta.partition + 1);
        }
        for item in log.records.iter() {
            let (k, v) = item?;
            let (partition, seq) = split_record_key(&k);
            log.next_seq = log.next_seq.max(seq + 1);
            log.next_partition = log.next_partition.max(partition + 1);
            if seq < sealed_until.get(&partition).copied().unwrap_or(0) {
                continue;
            }
            let p = log.open.entry(partition).or_insert_with(|| OpenPartition {
                // A record that no longer decodes is quarantined when its
                // batch is sealed; until then it sits in a partition of its own.
                prefix: record::decode(&v)
                    .map(|e| (spec.partition_of)(&e))
                    .unwrap_or_default(),
                unsealed_from: seq,
                records: 0,
                bytes: 0,
                oldest_ms: record::timestamp(&v),
            });
            p.records += 1;
            p.bytes += v.len() as u64;
        }
        for (&id, p) in &log.open {
            log.by_prefix.insert(p.prefix.clone(), id);
        }
        log.refresh_stats();
        Ok(log)
    }

    fn decode_meta(&self, sink: &str, key: &[u8], value: &[u8]) -> Result<BatchMeta, SpoolError> {
        decode_meta(value).map_err(|detail| SpoolError::Corrupt {
            what: format!("sealed batch {} of sink {sink}", from_be(key)),
            detail,
        })
    }

    /// Stores `events` for every sink in `sinks`, applying the full policy.
    /// Stores each group's events for each of its sinks, all or nothing,
    /// applying the full policy to the total.
    pub fn append(
        &mut self,
        groups: &[(Vec<usize>, Vec<Event>)],
        marks: &[Mark],
    ) -> Result<AppendOutcome, SpoolError> {
        let encoded: Vec<Vec<Vec<u8>>> = groups
            .iter()
            .map(|(_, events)| events.iter().map(record::encode).collect())
            .collect();
        let need: u64 = groups
            .iter()
            .zip(&encoded)
            .map(|((sinks, _), raws)| {
                raws.iter().map(|r| r.len() as u64).sum::<u64>() * sinks.len() as u64
            })
            .sum();
        let count: usize = groups.iter().map(|(_, events)| events.len()).sum();
        let mut outcome = AppendOutcome::default();
        let over_cap = (self.bytes + need).saturating_sub(self.limits.max_bytes);
        // Marks alone (upload progress) are tiny and free space later.
        let disk_short = count > 0 && self.limits.disk_short(need);
        if count > 0 && (over_cap > 0 || disk_short) {
            match self.limits.when_full {
                WhenFull::Block => return Err(SpoolError::Full),
                WhenFull::DropNewest => {
                    outcome.dropped_new = count;
                    return Ok(outcome);
                }
                WhenFull::DropOldest => {
                    let want = if disk_short {
                        over_cap.max(need)
                    } else {
                        over_cap
                    };
                    let (dropped, freed) = self.drop_oldest(want)?;
                    outcome.dropped_old = dropped;
                    if freed < want {
                        outcome.dropped_new = count;
                        return Ok(outcome);
                    }
                }
            }
        }
        for ((sinks, events), raws) in groups.iter().zip(&encoded) {
            for &sink in sinks {
                let log = &mut self.sinks[sink];
                let mut batch = sled::Batch::default();
                for (event, raw) in events.iter().zip(raws) {
                    let partition = log.partition_for(event);
                    batch.insert(&record_key(partition, log.next_seq), raw.as_slice());
                    log.next_seq += 1;
                    let p = log.open.get_mut(&partition).expect("just opened");
                    p.records += 1;
                    p.bytes += raw.len() as u64;
                    p.oldest_ms.get_or_insert(event.ts_ms);
                }
                log.records.apply_batch(batch)?;
                log.refresh_stats();
                self.meta
                    .insert(format!("next_seq/{}", log.name), &be(log.next_seq))?;
            }
        }
        for mark in marks {
            let tree = self.db.open_tree(&mark.tree)?;
            if mark.value.is_empty() {
                tree.remove(&mark.key)?;
            } else {
                tree.insert(&mark.key, mark.value.as_slice())?;
            }
        }
        self.bytes += need;
        outcome.stored = count;
        Ok(outcome)
    }

    /// Removes the globally oldest unsealed records until `want` bytes are
    /// free. Sealed batches are never touched: their objects may be mid-upload.
    fn drop_oldest(&mut self, want: u64) -> Result<(u64, u64), SpoolError> {
        let mut freed = 0;
        let mut dropped = 0;
        while freed < want {
            let Some((log, partition)) = self
                .sinks
                .iter_mut()
                .filter_map(|l| {
                    let (id, oldest) = l.oldest_partition()?;
                    Some((oldest, l, id))
                })
                .min_by_key(|(oldest, _, _)| *oldest)
                .map(|(_, l, id)| (l, id))
            else {
                break;
            };
            let from = log.open[&partition].unsealed_from;
            let Some((k, v)) = log
                .records
                .range(record_key(partition, from)..=record_key(partition, u64::MAX))
                .next()
                .transpose()?
            else {
                log.close_partition(partition);
                continue;
            };
            log.records.remove(&k)?;
            let next = log.peek(partition, split_record_key(&k).1 + 1)?;
            let p = log.open.get_mut(&partition).expect("chosen above");
            p.unsealed_from = split_record_key(&k).1 + 1;
            p.records -= 1;
            p.bytes -= v.len() as u64;
            p.oldest_ms = next;
            if p.records == 0 {
                log.close_partition(partition);
            }
            log.refresh_stats();
            freed += v.len() as u64;
            dropped += 1;
        }
        self.bytes -= freed;
        Ok((dropped, freed))
    }

    /// Closes the next batch of `sink`, up to the limits, from the partition
    /// `rule` picks, and returns it with its events; `None` when none is due.
    pub fn seal(
        &mut self,
        sink: usize,
        rule: &SealRule,
        key: impl FnOnce(&Event, u64) -> String,
        now_ms: i64,
    ) -> Result<Option<(BatchMeta, Vec<Event>)>, SpoolError> {
        let log = &mut self.sinks[sink];
        let Some(partition) = log.pick(rule, now_ms) else {
            return Ok(None);
        };
        let from = log.open[&partition].unsealed_from;
        let mut events = Vec::new();
        let (mut count, mut bytes, mut last) = (0u64, 0u64, None);
        let mut quarantined = Vec::new();
        let range = record_key(partition, from)..=record_key(partition, u64::MAX);
        for item in log.records.range(range) {
            let (k, v) = item?;
            if count > 0 && (count >= rule.max_records || bytes + v.len() as u64 > rule.max_bytes) {
                break;
            }
            let seq = split_record_key(&k).1;
            count += 1;
            bytes += v.len() as u64;
            last = Some(seq);
            match record::decode(&v) {
                Ok(e) => events.push(e),
                Err(err) => quarantined.push((seq, err, v.to_vec())),
            }
        }
        let Some(last) = last else {
            log.close_partition(partition);
            log.refresh_stats();
            return Ok(None);
        };
        for (seq, err, raw) in quarantined {
            quarantine(&self.quarantine, &log.name, seq, &err, &raw);
        }
        let meta = BatchMeta {
            seq: log.next_batch,
            partition,
            first: from,
            last,
            key: match events.first() {
                Some(first) => key(first, log.next_batch),
                None => key(&Event::new(now_ms, "", Vec::new()), log.next_batch),
            },
            records: events.len() as u64,
            count,
            bytes,
            sealed_ms: now_ms,
        };
        log.batches.insert(be(meta.seq), encode_meta(&meta))?;
        log.next_batch += 1;
        self.meta
            .insert(format!("next_batch/{}", log.name), &be(log.next_batch))?;
        let next = log.peek(partition, last + 1)?;
        let p = log.open.get_mut(&partition).expect("picked above");
        p.unsealed_from = last + 1;
        p.records -= count;
        p.bytes -= bytes;
        p.oldest_ms = next;
        if p.records == 0 {
            log.close_partition(partition);
        }
        log.stats.sealed_batches += 1;
        log.stats.sealed_bytes += bytes;
        log.refresh_stats();
        Ok(Some((meta, events)))
    }

    /// Forgets a batch whose object is confirmed written, and its records.
    pub fn complete(&mut self, sink: usize, batch: &BatchMeta) -> Result<(), SpoolError> {
        let log = &mut self.sinks[sink];
        if !log.batches.contains_key(be(batch.seq))? {
            return Ok(());
        }
        // Records go before the batch: a crash in between leaves a batch
        // with records missing, which the batcher recognises as uploaded
        // (see `LoadedBatch::missing`) instead of re-batching leftovers.
        let mut remove = sled::Batch::default();
        let range =
            record_key(batch.partition, batch.first)..=record_key(batch.partition, batch.last);
        for item in log.records.range(range) {
            remove.remove(item?.0);
        }
        log.records.apply_batch(remove)?;
        log.batches.remove(be(batch.seq))?;
        log.stats.sealed_batches -= 1;
        log.stats.sealed_bytes -= batch.bytes;
        self.bytes -= batch.bytes;
        Ok(())
    }

    pub fn sealed_batches(&self, sink: usize) -> Result<Vec<BatchMeta>, SpoolError> {
        let log = &self.sinks[sink];
        log.batches
            .iter()
            .map(|item| {
                let (k, v) = item?;
                self.decode_meta(&log.name, &k, &v)
            })
            .collect()
    }
}

impl SinkLog {
    /// The open partition `event` belongs to, opened if needed.
    fn partition_for(&mut self, event: &Event) -> u64 {
        let prefix = (self.partition_of)(event);
        if let Some(&id) = self.by_prefix.get(&prefix) {
            return id;
        }
        let id = self.next_partition;
        self.next_partition += 1;
        self.open.insert(
            id,
            OpenPartition {
                prefix: prefix.clone(),
                unsealed_from: self.next_seq,
                records: 0,
                bytes: 0,
                oldest_ms: None,
            },
        );
        self.by_prefix.insert(prefix, id);
        id
    }

    fn close_partition(&mut self, id: u64) {
        if let Some(p) = self.open.remove(&id)
            && self.by_prefix.get(&p.prefix) == Some(&id)
        {
            self.by_prefix.remove(&p.prefix);
        }
    }

    fn oldest_partition(&self) -> Option<(u64, i64)> {
        self.open
            .iter()
            .map(|(&id, p)| (id, p.oldest_ms.unwrap_or(i64::MIN)))
            .min_by_key(|&(_, oldest)| oldest)
    }

    /// A full partition first; otherwise the oldest one, if it is old
    /// enough, there are too many open, or `force`.
    fn pick(&self, rule: &SealRule, now_ms: i64) -> Option<u64> {
        let full = self
            .open
            .iter()
            .find(|(_, p)| p.records >= rule.max_records || p.bytes >= rule.max_bytes);
        if let Some((&id, _)) = full {
            return Some(id);
        }
        let (id, oldest) = self.oldest_partition()?;
        let due = rule.force
            || self.open.len() > rule.max_partitions
            || now_ms.saturating_sub(oldest) >= rule.max_age_ms;
        due.then_some(id)
    }

    /// Timestamp of the first record of `partition` at or after `seq`.
    fn peek(&self, partition: u64, seq: u64) -> Result<Option<i64>, SpoolError> {
        Ok(self
            .records
            .range(record_key(partition, seq)..=record_key(partition, u64::MAX))
            .next()
            .transpose()?
            .and_then(|(_, v)| record::timestamp(&v)))
    }

    fn refresh_stats(&mut self) {
        let s = &mut self.stats;
        s.partitions = self.open.len();
        s.unsealed_records = self.open.values().map(|p| p.records).sum();
        s.unsealed_bytes = self.open.values().map(|p| p.bytes).sum();
        s.oldest_unsealed_ms = self.open.values().filter_map(|p| p.oldest_ms).min();
        s.fullest_records = self.open.values().map(|p| p.records).max().unwrap_or(0);
        s.fullest_bytes = self.open.values().map(|p| p.bytes).max().unwrap_or(0);
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
    records: &sled::Tree,
    sink: &str,
    batch: &BatchMeta,
    quarantine_dir: &Path,
) -> Result<LoadedBatch, SpoolError> {
    let mut events = Vec::with_capacity(batch.records as usize);
    let mut found = 0;
    let range = record_key(batch.partition, batch.first)..=record_key(batch.partition, batch.last);
    for item in records.range(range) {
        let (k, v) = item?;
        found += 1;
        match record::decode(&v) {
            Ok(e) => events.push(e),
            Err(err) => quarantine(quarantine_dir, sink, split_record_key(&k).1, &err, &v),
        }
    }
    Ok(LoadedBatch {
        events,
        missing: batch.count.saturating_sub(found),
    })
}

impl SpoolState {
    /// The next record sequence of every sink: how far each log has got.
    pub fn next_seqs(&self) -> std::collections::BTreeMap<String, u64> {
        self.sinks
            .iter()
            .map(|l| (l.name.clone(), l.next_seq))
            .collect()
    }

    pub fn records_tree(&self, sink: usize) -> sled::Tree {
        self.sinks[sink].records.clone()
    }
}

/// A sealed batch as stored: `crc32 u32 LE | JSON`.
fn encode_meta(meta: &BatchMeta) -> Vec<u8> {
    let json = serde_json::to_vec(meta).expect("serialisable");
    let mut out = crc32fast::hash(&json).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

pub(super) fn decode_meta(raw: &[u8]) -> Result<BatchMeta, String> {
    let (crc, json) = raw.split_at_checked(4).ok_or("shorter than its checksum")?;
    if crc32fast::hash(json).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| e.to_string())
}

fn quarantine_raw(dir: &Path, name: &str, raw: &[u8]) {
    let path = dir.join(name);
    if let Err(e) = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, raw)) {
        tracing::warn!(path = %path.display(), error = %e, "writing a quarantine file failed");
    }
}

/// Keeps a record that failed its checksum where a person can look at it,
/// instead of uploading garbage or refusing to start.
fn quarantine(dir: &Path, sink: &str, seq: u64, err: &record::DecodeError, raw: &[u8]) {
    let path = dir.join(format!("{sink}-{seq:020}.bin"));
    let written = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, raw));
    match written {
        Ok(()) => {
            tracing::warn!(sink, seq, error = %err, path = %path.display(), "corrupt spool record quarantined")
        }
        Err(io) => {
            tracing::warn!(sink, seq, error = %err, io = %io, "corrupt spool record skipped; writing the quarantine file failed")
        }
    }
}
