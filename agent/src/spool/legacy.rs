//! Migration of spools written before chunks: one sled value per event in
//! `records/<sink>`, keyed (partition, sequence), in the version 1 layout.
//!
//! Each run of consecutive sequences in one partition becomes one chunk
//! under the same keys and sequences, so sealed batches (sequence ranges)
//! and counters stay valid. The chunks are synced, their references and
//! the emptied legacy tree flushed and synced together; a crash before that
//! leaves the legacy records in place and the migration runs again (chunks
//! already referenced are skipped).

use std::path::Path;

use super::chunk::{self, ChunkRef};
use super::segments::Segments;
use super::sink_log::{quarantine, record_key, split_record_key};
use super::state::segment_dir;
use super::{SpoolError, sync_db};
use crate::event::Event;

fn legacy_tree(sink: &str) -> String {
    format!("records/{sink}")
}

/// Converts `sink`'s legacy records, if it has any.
pub(super) fn migrate(
    db: &sled::Db,
    spool_dir: &Path,
    quarantine_dir: &Path,
    sink: &str,
) -> Result<(), SpoolError> {
    let name = legacy_tree(sink);
    if !db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == name.as_bytes())
    {
        return Ok(());
    }
    let legacy = db.open_tree(&name)?;
    let chunks = db.open_tree(format!("chunks/{sink}"))?;
    let dir = segment_dir(spool_dir, sink);
    let io = |e: std::io::Error| SpoolError::Storage(sled::Error::Io(e));
    let mut live = std::collections::HashMap::new();
    for item in chunks.iter() {
        let (_, v) = item?;
        if let Some(r) = ChunkRef::decode(&v) {
            *live.entry(r.segment).or_default() += 1;
        }
    }
    let mut segments = Segments::open(&dir, live).map_err(io)?;
    // A chunk never crosses the edge of a sealed batch: batches are
    // sequence ranges, read back whole chunks at a time.
    let mut edges = std::collections::HashSet::new();
    for item in db.open_tree(format!("batches/{sink}"))?.iter() {
        let (_, v) = item?;
        if let Ok(meta) = super::state::decode_meta(&v) {
            edges.insert((meta.partition, meta.first));
            edges.insert((meta.partition, meta.last + 1));
        }
    }
    let mut run: Option<(u64, u64, Vec<Event>)> = None;
    let mut refs = Vec::new();
    let mut records = 0u64;
    let mut flush_run =
        |run: Option<(u64, u64, Vec<Event>)>, segments: &mut Segments| -> Result<(), SpoolError> {
            let Some((partition, first, events)) = run else {
                return Ok(());
            };
            if chunks.contains_key(record_key(partition, first))? {
                return Ok(());
            }
            let raw = chunk::encode_chunk(&events);
            let (segment, offset) = segments.append(&raw).map_err(io)?;
            segments.add_ref(segment);
            let r = ChunkRef {
                segment,
                offset,
                len: raw.len() as u32,
                skip: 0,
                count: events.len() as u32,
                bytes: events.iter().map(chunk::encoded_len).sum(),
                first_ts: events[0].ts_ms,
            };
            refs.push((record_key(partition, first), r));
            Ok(())
        };
    for item in legacy.iter() {
        let (k, v) = item?;
        let (partition, seq) = split_record_key(&k);
        records += 1;
        let event = match chunk::decode_legacy(&v) {
            Ok(event) => event,
            Err(e) => {
                quarantine(quarantine_dir, sink, seq, &e.to_string(), &v);
                continue;
            }
        };
        match &mut run {
            Some((p, first, events))
                if *p == partition
                    && *first + events.len() as u64 == seq
                    && !edges.contains(&(partition, seq)) =>
            {
                events.push(event);
            }
            _ => {
                flush_run(run.take(), &mut segments)?;
                run = Some((partition, seq, vec![event]));
            }
        }
    }
    flush_run(run, &mut segments)?;
    segments.sync().map_err(io)?;
    let mut batch = sled::Batch::default();
    for (key, r) in &refs {
        batch.insert(key, &r.encode()[..]);
    }
    chunks.apply_batch(batch)?;
    db.drop_tree(name.as_bytes())?;
    db.flush()?;
    sync_db(spool_dir).map_err(io)?;
    tracing::info!(
        sink,
        records,
        chunks = refs.len(),
        "migrated spool records to the chunk format"
    );
    Ok(())
}
