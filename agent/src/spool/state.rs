//! The spool's state machine over sled: append, seal, complete, drop.
//!
//! Everything here is synchronous and runs on the spool's single writer
//! thread, so no two mutations interleave; durability (the flush) is the
//! caller's job, done once per group of commands.
//!
//! Per sink there are two trees: `records/<sink>` (sequence -> encoded
//! event) and `batches/<sink>` (batch sequence -> [`BatchMeta`]). Records
//! below the end of the last sealed batch belong to a batch; the rest are
//! "unsealed" and wait for the batcher.

use std::path::{Path, PathBuf};

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

pub(super) struct SinkLog {
    pub name: String,
    records: sled::Tree,
    batches: sled::Tree,
    next_seq: u64,
    next_batch: u64,
    /// First record sequence not covered by a sealed batch.
    unsealed_from: u64,
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
    fn disk_short(&self, need: u64) -> bool {
        self.min_free > 0
            && fs2::available_space(&self.dir)
                .is_ok_and(|free| free < self.min_free.saturating_add(need))
    }
}

/// A small key/value stored with an append, after its records, so it is
/// durable exactly when they are (e.g. which MQTT packet ids were committed).
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

impl SpoolState {
    pub fn open(
        db: &sled::Db,
        sink_names: &[String],
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
        for name in sink_names {
            let log = state.open_sink(db, name)?;
            state.bytes += log.stats.unsealed_bytes + log.stats.sealed_bytes;
            state.sinks.push(log);
        }
        Ok(state)
    }

    fn open_sink(&self, db: &sled::Db, name: &str) -> Result<SinkLog, SpoolError> {
        let records = db.open_tree(format!("records/{name}"))?;
        let batches = db.open_tree(format!("batches/{name}"))?;
        let stored_next = |key: String| -> Result<u64, SpoolError> {
            Ok(self.meta.get(key)?.map(|v| from_be(&v)).unwrap_or(0))
        };
        let last_record = records.last()?.map(|(k, _)| from_be(&k) + 1).unwrap_or(0);
        let next_seq = stored_next(format!("next_seq/{name}"))?.max(last_record);

        let mut stats = SinkStats::default();
        let mut unsealed_from = records
            .first()?
            .map(|(k, _)| from_be(&k))
            .unwrap_or(next_seq);
        let mut last_batch = 0;
        for item in batches.iter() {
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
                    batches.remove(&k)?;
                    continue;
                }
            };
            stats.sealed_batches += 1;
            stats.sealed_bytes += meta.bytes;
            unsealed_from = unsealed_from.max(meta.last + 1);
            last_batch = meta.seq + 1;
        }
        let next_batch = stored_next(format!("next_batch/{name}"))?.max(last_batch);
        for item in records.range(be(unsealed_from)..) {
            let (_, v) = item?;
            stats.unsealed_records += 1;
            stats.unsealed_bytes += v.len() as u64;
            if stats.oldest_unsealed_ms.is_none() {
                stats.oldest_unsealed_ms = record::timestamp(&v);
            }
        }
        Ok(SinkLog {
            name: name.to_string(),
            records,
            batches,
            next_seq,
            next_batch,
            unsealed_from,
            stats,
        })
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
        let disk_short = self.limits.disk_short(need);
        if over_cap > 0 || disk_short {
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
                for raw in raws {
                    batch.insert(&be(log.next_seq), raw.as_slice());
                    log.next_seq += 1;
                    log.stats.unsealed_records += 1;
                    log.stats.unsealed_bytes += raw.len() as u64;
                }
                if log.stats.oldest_unsealed_ms.is_none() {
                    log.stats.oldest_unsealed_ms = events.first().map(|e| e.ts_ms);
                }
                log.records.apply_batch(batch)?;
                self.meta
                    .insert(format!("next_seq/{}", log.name), &be(log.next_seq))?;
            }
        }
        for mark in marks {
            self.db
                .open_tree(&mark.tree)?
                .insert(&mark.key, mark.value.as_slice())?;
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
            let Some(log) = self
                .sinks
                .iter_mut()
                .filter(|l| l.stats.unsealed_records > 0)
                .min_by_key(|l| l.stats.oldest_unsealed_ms)
            else {
                break;
            };
            let Some((k, v)) = log
                .records
                .range(be(log.unsealed_from)..)
                .next()
                .transpose()?
            else {
                break;
            };
            log.records.remove(&k)?;
            log.unsealed_from = from_be(&k) + 1;
            log.stats.unsealed_records -= 1;
            log.stats.unsealed_bytes -= v.len() as u64;
            log.stats.oldest_unsealed_ms = log.peek_oldest_unsealed()?;
            freed += v.len() as u64;
            dropped += 1;
        }
        self.bytes -= freed;
        Ok((dropped, freed))
    }

    /// Closes the next batch of `sink` (up to the limits) and returns it with
    /// its events, or `None` when nothing is unsealed.
    pub fn seal(
        &mut self,
        sink: usize,
        max_records: u64,
        max_bytes: u64,
        key: impl FnOnce(&Event, u64) -> String,
        now_ms: i64,
    ) -> Result<Option<(BatchMeta, Vec<Event>)>, SpoolError> {
        let log = &mut self.sinks[sink];
        let mut events = Vec::new();
        let (mut count, mut bytes, mut last) = (0u64, 0u64, None);
        let mut quarantined = Vec::new();
        for item in log.records.range(be(log.unsealed_from)..) {
            let (k, v) = item?;
            if count > 0 && (count >= max_records || bytes + v.len() as u64 > max_bytes) {
                break;
            }
            count += 1;
            bytes += v.len() as u64;
            last = Some(from_be(&k));
            match record::decode(&v) {
                Ok(e) => events.push(e),
                Err(err) => quarantined.push((from_be(&k), err, v.to_vec())),
            }
        }
        let Some(last) = last else {
            return Ok(None);
        };
        for (seq, err, raw) in quarantined {
            quarantine(&self.quarantine, &log.name, seq, &err, &raw);
        }
        let meta = BatchMeta {
            seq: log.next_batch,
            first: log.unsealed_from,
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
        log.unsealed_from = last + 1;
        log.stats.unsealed_records -= count;
        log.stats.unsealed_bytes -= bytes;
        log.stats.oldest_unsealed_ms = log.peek_oldest_unsealed()?;
        log.stats.sealed_batches += 1;
        log.stats.sealed_bytes += bytes;
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
        for item in log.records.range(be(batch.first)..=be(batch.last)) {
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
    fn peek_oldest_unsealed(&self) -> Result<Option<i64>, SpoolError> {
        Ok(self
            .records
            .range(be(self.unsealed_from)..)
            .next()
            .transpose()?
            .and_then(|(_, v)| record::timestamp(&v)))
    }
}

/// Reads the events of a sealed batch back, quarantining records that no
/// longer decode.
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
    for item in records.range(be(batch.first)..=be(batch.last)) {
        let (k, v) = item?;
        found += 1;
        match record::decode(&v) {
            Ok(e) => events.push(e),
            Err(err) => quarantine(quarantine_dir, sink, from_be(&k), &err, &v),
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
