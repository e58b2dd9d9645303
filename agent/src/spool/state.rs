//! The spool's state machine: append, seal, complete, drop.
//!
//! Everything here is synchronous and runs on the spool's single writer
//! thread, so no two mutations interleave. Appends of one group commit are
//! gathered into one chunk per sink and partition; [`SpoolState::write_pending`]
//! writes them, and the writer makes the whole group durable.
//!
//! Per sink, sled holds `chunks/<sink>` ((partition, first sequence) ->
//! [`super::chunk::ChunkRef`]) and `batches/<sink>` (batch sequence ->
//! [`BatchMeta`]); the chunks are in segment files under
//! `spool/chunks/<sink>/`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::SpoolError;
use super::chunk::encoded_len;
use super::segments::Segments;
use super::sink_log::{
    Chunk, OpenPartition, SinkLog, decode_ref, quarantine, read_chunk, record_key,
};
use super::types::{
    Admission, AppendOutcome, BatchMeta, Limits, Mark, Reached, SealRule, SinkSpec,
};
use crate::config::WhenFull;
use crate::event::Event;

pub(super) struct SpoolState {
    db: sled::Db,
    meta: sled::Tree,
    pub sinks: Vec<SinkLog>,
    pub bytes: u64,
    limits: Limits,
    quarantine: PathBuf,
    /// Marks of this group, written after its chunk references so that a
    /// mark is never durable without the records it vouches for.
    marks: Vec<Mark>,
    /// Why writing a group failed: the group's other answers fail too.
    failed: Option<String>,
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn from_be(key: &[u8]) -> u64 {
    u64::from_be_bytes(key.try_into().unwrap_or([0; 8]))
}

/// Where a sink's segment files live.
pub(super) fn segment_dir(spool_dir: &Path, sink: &str) -> PathBuf {
    spool_dir.join("chunks").join(sink)
}

impl SpoolState {
    /// `floor` holds the watermark's counters: a counter never restarts
    /// below what was once durable, so no `{batch}` key is used twice.
    pub fn open(
        db: &sled::Db,
        spool_dir: &Path,
        sinks: &[SinkSpec],
        limits: Limits,
        quarantine: &Path,
        floor: &BTreeMap<String, Reached>,
    ) -> Result<SpoolState, SpoolError> {
        let meta = db.open_tree("meta")?;
        let mut state = SpoolState {
            db: db.clone(),
            meta,
            sinks: Vec::new(),
            bytes: 0,
            limits,
            quarantine: quarantine.to_path_buf(),
            marks: Vec::new(),
            failed: None,
        };
        for spec in sinks {
            super::legacy::migrate(db, spool_dir, quarantine, &spec.name)?;
            let floor = floor.get(&spec.name).copied().unwrap_or_default();
            let log = state.open_sink(db, spool_dir, spec, floor)?;
            state.bytes += log.stats.unsealed_bytes + log.stats.sealed_bytes;
            state.sinks.push(log);
        }
        Ok(state)
    }

    fn open_sink(
        &self,
        db: &sled::Db,
        spool_dir: &Path,
        spec: &SinkSpec,
        floor: Reached,
    ) -> Result<SinkLog, SpoolError> {
        let name = spec.name.as_str();
        let chunks = db.open_tree(format!("chunks/{name}"))?;
        let batches = db.open_tree(format!("batches/{name}"))?;
        let stored_next = |key: String| -> Result<u64, SpoolError> {
            Ok(self.meta.get(key)?.map(|v| from_be(&v)).unwrap_or(0))
        };
        let stored_seq = stored_next(format!("next_seq/{name}"))?;
        let next_batch = stored_next(format!("next_batch/{name}"))?.max(floor.next_batch);
        let mut sealed_until: HashMap<u64, u64> = HashMap::new();
        let (mut sealed_batches, mut sealed_bytes) = (0, 0);
        let (mut max_batch, mut max_partition) = (next_batch, 0);
        for item in batches.iter() {
            let (k, v) = item?;
            let meta = match self.decode_meta(name, &k, &v) {
                Ok(meta) => meta,
                Err(e) => {
                    // Its records become unsealed again and go out in a new
                    // batch: possibly a second copy, never a loss.
                    tracing::warn!(sink = name, error = %e, "corrupt sealed batch record; its events will be batched again");
                    quarantine(
                        &self.quarantine,
                        &format!("{name}-batch"),
                        from_be(&k),
                        "corrupt batch",
                        &v,
                    );
                    batches.remove(&k)?;
                    continue;
                }
            };
            sealed_batches += 1;
            sealed_bytes += meta.bytes;
            let until = sealed_until.entry(meta.partition).or_default();
            *until = (*until).max(meta.last + 1);
            max_batch = max_batch.max(meta.seq + 1);
            max_partition = max_partition.max(meta.partition + 1);
        }
        let dir = segment_dir(spool_dir, name);
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut open: BTreeMap<u64, OpenPartition> = BTreeMap::new();
        let mut max_seq = stored_seq;
        for item in chunks.iter() {
            let (k, v) = item?;
            let (partition, seq, r) = decode_ref(&k, &v)?;
            *live.entry(r.segment).or_default() += 1;
            max_seq = max_seq.max(seq + r.count as u64);
            max_partition = max_partition.max(partition + 1);
            if seq < sealed_until.get(&partition).copied().unwrap_or(0) {
                continue;
            }
            let p = match open.entry(partition) {
                std::collections::btree_map::Entry::Occupied(p) => p.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    // A chunk that no longer reads is quarantined when its
                    // batch is sealed; until then it sits in a partition of its own.
                    let prefix = match read_chunk(&dir, &r)? {
                        Chunk::Events(events) => events
                            .first()
                            .map(|e| (spec.partition_of)(e))
                            .unwrap_or_default(),
                        Chunk::Damaged { .. } => format!("\u{0}damaged-{partition}"),
                    };
                    slot.insert(OpenPartition {
                        prefix,
                        unsealed_from: seq,
                        records: 0,
                        bytes: 0,
                        oldest_ms: Some(r.first_ts),
                    })
                }
            };
            p.records += r.count as u64;
            p.bytes += r.bytes;
        }
        let segments =
            Segments::open(&dir, live).map_err(|e| SpoolError::Storage(sled::Error::Io(e)))?;
        let mut log = SinkLog::new(
            name,
            chunks,
            batches,
            spec.partition_of.clone(),
            max_seq.max(floor.next_seq),
            max_batch,
            segments,
        );
        log.recovered_seq = max_seq;
        log.next_partition = max_partition;
        for (id, p) in open {
            log.open.insert(id, p);
        }
        log.stats.sealed_batches = sealed_batches;
        log.stats.sealed_bytes = sealed_bytes;
        log.refresh_stats();
        Ok(log)
    }

    fn decode_meta(&self, sink: &str, key: &[u8], value: &[u8]) -> Result<BatchMeta, SpoolError> {
        decode_meta(value).map_err(|detail| SpoolError::Corrupt {
            what: format!("sealed batch {} of sink {sink}", from_be(key)),
            detail,
        })
    }

    /// Stores each group's events for each of its sinks, all or nothing,
    /// applying the full policy (as `admission` allows) to the total.
    pub fn append(
        &mut self,
        groups: &[(Vec<usize>, Vec<Event>)],
        marks: &[Mark],
        admission: Admission,
    ) -> Result<AppendOutcome, SpoolError> {
        let lens: Vec<Vec<u64>> = groups
            .iter()
            .map(|(_, events)| events.iter().map(encoded_len).collect())
            .collect();
        let need: u64 = groups
            .iter()
            .zip(&lens)
            .map(|((sinks, _), lens)| lens.iter().sum::<u64>() * sinks.len() as u64)
            .sum();
        let count: usize = groups.iter().map(|(_, events)| events.len()).sum();
        let mut outcome = AppendOutcome::default();
        let over_cap = (self.bytes + need).saturating_sub(self.limits.max_bytes);
        // Marks alone (upload progress) are tiny and free space later.
        let disk_short = count > 0 && self.limits.disk_short(need);
        if count > 0 && (over_cap > 0 || disk_short) {
            let never_drop = admission == Admission::NeverDrop;
            match self.limits.when_full {
                WhenFull::Block => return Err(SpoolError::Full),
                WhenFull::DropNewest if never_drop => return Err(SpoolError::Full),
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
                    if freed < want && never_drop {
                        return Err(SpoolError::Full);
                    }
                    if freed < want {
                        outcome.dropped_new = count;
                        return Ok(outcome);
                    }
                }
            }
        }
        for ((sinks, events), lens) in groups.iter().zip(&lens) {
            for &sink in sinks {
                let log = &mut self.sinks[sink];
                for (event, &len) in events.iter().zip(lens) {
                    log.add(event, len);
                }
                log.refresh_stats();
            }
        }
        self.marks.extend_from_slice(marks);
        self.bytes += need;
        outcome.stored = count;
        Ok(outcome)
    }

    /// Writes this group's chunks, chunk references and marks. The caller
    /// then syncs ([`SpoolState::sync_segments`]) and flushes sled.
    ///
    /// Once a write failed nothing more is written: sled and the segments
    /// are then behind memory, and only a reopen sets that right. Writing
    /// on would store what the failed group left queued (its MQTT marks
    /// without its events: the redeliveries would be taken for stored).
    pub fn write_pending(&mut self) -> Result<(), SpoolError> {
        if let Some(failure) = &self.failed {
            return Err(SpoolError::Storage(sled::Error::Io(std::io::Error::other(
                failure.clone(),
            ))));
        }
        let written = self.write_pending_unchecked();
        if let Err(e) = &written {
            self.failed.get_or_insert_with(|| e.to_string());
        }
        written
    }

    fn write_pending_unchecked(&mut self) -> Result<(), SpoolError> {
        // Every sink's chunks before any reference: a full disk fails the
        // group here, while sled holds none of it, so nothing of a group
        // answered with an error is found stored after the reopen (an MQTT
        // redelivery of it would be stored a second time).
        let written = self
            .sinks
            .iter_mut()
            .map(SinkLog::write_chunks)
            .collect::<Result<Vec<_>, _>>()?;
        // References, counters and marks in one sled transaction: sled
        // recovers it whole or not at all, so a write that fails halfway
        // (ENOSPC) never leaves events stored without their MQTT marks
        // (stored twice on redelivery) or marks without their events.
        let mut trees = Vec::new();
        let mut batches = Vec::new();
        let mut counters = sled::Batch::default();
        for (log, written) in self.sinks.iter_mut().zip(written) {
            if !written.is_empty() {
                batches.push(log.ref_batch(written));
                trees.push(log.chunks.clone());
                counters.insert(
                    format!("next_seq/{}", log.name).as_bytes(),
                    &be(log.next_seq),
                );
            }
        }
        if !trees.is_empty() {
            trees.push(self.meta.clone());
            batches.push(counters);
        }
        let mut marks: BTreeMap<String, sled::Batch> = BTreeMap::new();
        for mark in std::mem::take(&mut self.marks) {
            let batch = marks.entry(mark.tree).or_default();
            if mark.value.is_empty() {
                batch.remove(mark.key);
            } else {
                batch.insert(mark.key, mark.value);
            }
        }
        for (tree, batch) in marks {
            trees.push(self.db.open_tree(tree)?);
            batches.push(batch);
        }
        if trees.is_empty() {
            return Ok(());
        }
        trees
            .as_slice()
            .transaction(|tx| {
                for (tree, batch) in tx.iter().zip(&batches) {
                    tree.apply_batch(batch)?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => SpoolError::Storage(e),
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })
    }

    /// Fsyncs every segment written since the last call: before sled's
    /// flush, so no reference is durable before its chunk.
    pub fn sync_segments(&mut self) -> std::io::Result<()> {
        self.sinks.iter_mut().try_for_each(|l| l.segments.sync())
    }

    /// Deletes segments the now durable commit left unreferenced.
    pub fn remove_doomed(&mut self) {
        self.sinks
            .iter_mut()
            .for_each(|l| l.segments.remove_doomed());
    }

    /// Removes the globally oldest unsealed chunks until `want` bytes are
    /// free. Sealed batches are never touched: their objects may be mid-upload.
    fn drop_oldest(&mut self, want: u64) -> Result<(u64, u64), SpoolError> {
        self.write_pending()?;
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
            let from = log.open.get(partition).expect("open").unsealed_from;
            let Some((seq, mut r)) = log.refs_from(partition, from).next().transpose()? else {
                log.close_partition(partition);
                continue;
            };
            // Drop no more of a chunk than needed: split off its head.
            if r.bytes > want - freed
                && let Chunk::Events(events) = read_chunk(log.segments.dir(), &r)?
            {
                let (mut keep, mut bytes) = (0, 0);
                while bytes < want - freed {
                    bytes += encoded_len(&events[keep]);
                    keep += 1;
                }
                if keep < events.len() {
                    let next_ts = events[keep].ts_ms;
                    log.split_ref(partition, seq, &r, keep as u32, bytes, next_ts)?;
                    r.count = keep as u32;
                    r.bytes = bytes;
                }
            }
            log.remove_ref(partition, seq, &r)?;
            log.take_front(partition, seq + r.count as u64, r.count as u64, r.bytes)?;
            log.refresh_stats();
            freed += r.bytes;
            dropped += r.count as u64;
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
        self.write_pending()?;
        let log = &mut self.sinks[sink];
        let Some(partition) = log.pick(rule, now_ms) else {
            return Ok(None);
        };
        let from = log.open.get(partition).expect("picked").unsealed_from;
        let mut events = Vec::new();
        let (mut count, mut bytes, mut next) = (0u64, 0u64, from);
        let mut split = None;
        // Read lazily: a partition may hold a backlog of thousands of chunks.
        let dir = log.segments.dir().to_path_buf();
        let chunks = log.chunks.clone();
        let range = record_key(partition, from)..=record_key(partition, u64::MAX);
        'refs: for item in chunks.range(range) {
            let (k, v) = item?;
            let (_, seq, r) = decode_ref(&k, &v)?;
            let full = |count: u64, bytes: u64, len: u64| {
                count > 0 && (count >= rule.max_records || bytes + len > rule.max_bytes)
            };
            if full(count, bytes, 0) {
                break;
            }
            match read_chunk(&dir, &r)? {
                Chunk::Damaged { detail, raw } => {
                    quarantine(&self.quarantine, &log.name, seq, &detail, &raw);
                    count += r.count as u64;
                    bytes += r.bytes;
                }
                Chunk::Events(chunk) => {
                    let mut taken_bytes = 0;
                    for (i, e) in chunk.into_iter().enumerate() {
                        let len = encoded_len(&e);
                        if full(count, bytes, len) {
                            if i > 0 {
                                split = Some((seq, r, i as u32, taken_bytes, e.ts_ms));
                            }
                            next = seq + i as u64;
                            break 'refs;
                        }
                        count += 1;
                        bytes += len;
                        taken_bytes += len;
                        events.push(e);
                    }
                }
            }
            next = seq + r.count as u64;
        }
        if count == 0 {
            log.close_partition(partition);
            log.refresh_stats();
            return Ok(None);
        }
        if let Some((seq, r, keep, kept_bytes, next_ts)) = split {
            log.split_ref(partition, seq, &r, keep, kept_bytes, next_ts)?;
        }
        let meta = BatchMeta {
            seq: log.next_batch,
            partition,
            first: from,
            last: next - 1,
            key: match events.first() {
                Some(first) => key(first, log.next_batch),
                None => key(&Event::new(now_ms, "", Vec::new()), log.next_batch),
            },
            records: events.len() as u64,
            count,
            bytes,
            sealed_ms: now_ms,
            repaired: 0,
        };
        log.batches.insert(be(meta.seq), encode_meta(&meta))?;
        log.next_batch += 1;
        self.meta
            .insert(format!("next_batch/{}", log.name), &be(log.next_batch))?;
        log.take_front(partition, next, count, bytes)?;
        log.stats.sealed_batches += 1;
        log.stats.sealed_bytes += bytes;
        log.refresh_stats();
        Ok(Some((meta, events)))
    }

    /// Forgets a batch whose object is confirmed written, and its records.
    pub fn complete(&mut self, sink: usize, batch: &BatchMeta) -> Result<(), SpoolError> {
        self.write_pending()?;
        let log = &mut self.sinks[sink];
        if !log.batches.contains_key(be(batch.seq))? {
            return Ok(());
        }
        // Records go before the batch: a crash in between leaves a batch
        // with records missing, which the batcher recognises as uploaded
        // (see `LoadedBatch::missing`) instead of re-batching leftovers.
        let refs: Vec<_> = log
            .refs_from(batch.partition, batch.first)
            .take_while(|item| item.as_ref().map_or(true, |(seq, _)| *seq <= batch.last))
            .collect::<Result<_, _>>()?;
        for (seq, r) in refs {
            log.remove_ref(batch.partition, seq, &r)?;
        }
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

    /// `next_seq` per sink as the files held it on open, before the
    /// watermark's floor was applied.
    pub fn recovered(&self) -> BTreeMap<String, u64> {
        self.sinks
            .iter()
            .map(|l| (l.name.clone(), l.recovered_seq))
            .collect()
    }

    /// How far every sink's log has got.
    pub fn reached(&self) -> BTreeMap<String, Reached> {
        self.sinks
            .iter()
            .map(|l| {
                let reached = Reached {
                    next_seq: l.next_seq,
                    next_batch: l.next_batch,
                };
                (l.name.clone(), reached)
            })
            .collect()
    }
}

/// A sealed batch as stored: `crc32 u32 LE | JSON`.
pub(super) fn encode_meta(meta: &BatchMeta) -> Vec<u8> {
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
