//! `silt spool stats|check|export`: look into a spool while the agent is
//! stopped (sled's lock refuses a spool a running agent holds).

use std::io::Write;
use std::path::Path;

use super::sink_log::{Chunk, decode_ref, read_chunk};
use super::state::{decode_meta, encode_meta, segment_dir};
use super::{SpoolError, move_aside, open_db, panic_message};
use crate::event::now_ms;

/// What one sink has waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkBacklog {
    pub sink: String,
    pub records: u64,
    pub bytes: u64,
    pub sealed_batches: u64,
    pub oldest_ms: Option<i64>,
}

/// Problems `check` found (and, with repair, removed).
#[derive(Debug, Default)]
pub struct CheckReport {
    pub records: u64,
    pub batches: u64,
    pub problems: Vec<String>,
    pub repaired: u64,
}

fn open(data_dir: &Path) -> Result<sled::Db, SpoolError> {
    let path = data_dir.join("spool");
    if !path.exists() {
        return Err(SpoolError::Corrupt {
            what: "data_dir".into(),
            detail: format!(
                "no spool at {}; point -d at the agent's data_dir",
                path.display()
            ),
        });
    }
    open_db(&path).map_err(|e| match e {
        SpoolError::Open {
            source: sled::Error::Corruption { .. },
            path,
        } => SpoolError::Damaged {
            path,
            detail: "sled reports corruption".into(),
        },
        e => e,
    })
}

/// Runs an inspection, turning a sled panic on damaged files into an error
/// that says so (`silt spool` is what a person reaches for when things break).
fn guarded<T>(data_dir: &Path, f: impl FnOnce() -> Result<T, SpoolError>) -> Result<T, SpoolError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(SpoolError::Damaged {
            path: data_dir.join("spool"),
            detail: format!(
                "{}; the agent moves such a spool aside into quarantine when it starts",
                panic_message(&*panic)
            ),
        })
    })
}

fn sink_trees(db: &sled::Db) -> Vec<String> {
    let mut names: Vec<String> = db
        .tree_names()
        .iter()
        .filter_map(|n| {
            std::str::from_utf8(n)
                .ok()?
                .strip_prefix("chunks/")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

pub fn stats(data_dir: &Path) -> Result<Vec<SinkBacklog>, SpoolError> {
    guarded(data_dir, || stats_inner(data_dir))
}

fn stats_inner(data_dir: &Path) -> Result<Vec<SinkBacklog>, SpoolError> {
    let db = open(data_dir)?;
    let mut out = Vec::new();
    for sink in sink_trees(&db) {
        let chunks = db.open_tree(format!("chunks/{sink}"))?;
        let batches = db.open_tree(format!("batches/{sink}"))?;
        let mut backlog = SinkBacklog {
            sink,
            sealed_batches: batches.len() as u64,
            ..SinkBacklog::default()
        };
        for item in chunks.iter() {
            let (k, v) = item?;
            let (_, _, r) = decode_ref(&k, &v)?;
            backlog.records += r.count as u64;
            backlog.bytes += r.bytes;
            backlog.oldest_ms = Some(backlog.oldest_ms.unwrap_or(i64::MAX).min(r.first_ts));
        }
        out.push(backlog);
    }
    Ok(out)
}

pub fn print_stats(backlogs: &[SinkBacklog], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20} {:>10} {:>14} {:>8} {:>12}",
        "sink", "records", "bytes", "sealed", "oldest age"
    )?;
    for b in backlogs {
        let age = b
            .oldest_ms
            .map(|ts| {
                humantime::format_duration(std::time::Duration::from_secs(
                    (now_ms() - ts).max(0) as u64 / 1000,
                ))
                .to_string()
            })
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<20} {:>10} {:>14} {:>8} {:>12}",
            b.sink, b.records, b.bytes, b.sealed_batches, age
        )?;
    }
    Ok(())
}

/// Verifies every record and sealed batch. With `repair`, corrupt ones are
/// written to `<data_dir>/quarantine` and removed, so the agent re-batches
/// what is left.
pub fn check(data_dir: &Path, repair: bool) -> Result<CheckReport, SpoolError> {
    match guarded(data_dir, || check_inner(data_dir, repair)) {
        // Damage below the records: nothing in it can be trusted record by
        // record. Repair does what the agent would do at start-up.
        Err(SpoolError::Damaged { detail, .. }) => {
            let mut report = CheckReport::default();
            report
                .problems
                .push(format!("the spool database itself is damaged: {detail}"));
            if repair {
                let aside = move_aside(data_dir)?;
                // What the agent would start with, so a second check passes.
                drop(open_db(&data_dir.join("spool"))?);
                report.problems.push(format!(
                    "moved it to {}; the spool is now empty",
                    aside.display()
                ));
                report.repaired = report.problems.len() as u64;
            }
            Ok(report)
        }
        other => other,
    }
}

fn check_inner(data_dir: &Path, repair: bool) -> Result<CheckReport, SpoolError> {
    let db = open(data_dir)?;
    let quarantine = data_dir.join("quarantine");
    let io = |e: std::io::Error| SpoolError::Storage(sled::Error::Io(e));
    let keep = |name: String, raw: &[u8]| {
        std::fs::create_dir_all(&quarantine)
            .and_then(|_| std::fs::write(quarantine.join(name), raw))
            .map_err(io)
    };
    let mut report = CheckReport::default();
    for sink in sink_trees(&db) {
        let dir = segment_dir(&data_dir.join("spool"), &sink);
        let chunks = db.open_tree(format!("chunks/{sink}"))?;
        let mut damaged = Vec::new();
        for item in chunks.iter() {
            let (k, v) = item?;
            let (partition, seq, r) = decode_ref(&k, &v)?;
            report.records += r.count as u64;
            let Chunk::Damaged { detail, raw } = read_chunk(&dir, &r)? else {
                continue;
            };
            report.problems.push(format!(
                "sink {sink} chunk {seq} ({} records): {detail}",
                r.count
            ));
            damaged.push((partition, seq, r.count as u64, r.bytes));
            if repair {
                keep(format!("{sink}-chunk-{seq:020}.bin"), &raw)?;
                chunks.remove(&k)?;
                report.repaired += 1;
            }
        }
        let batches = db.open_tree(format!("batches/{sink}"))?;
        for item in batches.iter() {
            let (k, v) = item?;
            report.batches += 1;
            let problem = match decode_meta(&v) {
                Ok(meta) => {
                    reseal(&batches, &k, meta, &damaged, repair, &sink, &mut report)?;
                    continue;
                }
                Err(problem) => problem,
            };
            let seq = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
            report
                .problems
                .push(format!("sink {sink} batch {seq}: {problem}"));
            if repair {
                keep(format!("{sink}-batch-{seq:020}.bin"), &v)?;
                batches.remove(&k)?;
                report.repaired += 1;
            }
        }
    }
    db.flush()?;
    super::sync_db(&data_dir.join("spool")).map_err(io)?;
    Ok(report)
}

/// A sealed batch whose range holds `damaged` chunks: with `repair`, its
/// meta is rewritten to cover only the good records, so the batcher uploads
/// them (under the same key) instead of reading the gap as "completed
/// before a crash" and dropping them; a batch left with none is removed.
fn reseal(
    batches: &sled::Tree,
    key: &[u8],
    mut meta: super::BatchMeta,
    damaged: &[(u64, u64, u64, u64)],
    repair: bool,
    sink: &str,
    report: &mut CheckReport,
) -> Result<(), SpoolError> {
    let (mut records, mut bytes) = (0, 0);
    for &(partition, seq, count, size) in damaged {
        if partition == meta.partition && (meta.first..=meta.last).contains(&seq) {
            records += count;
            bytes += size;
        }
    }
    if records == 0 {
        return Ok(());
    }
    let survivors = meta.count.saturating_sub(records);
    let fix = if survivors == 0 {
        "removed with them: nothing in it is left to upload"
    } else {
        "re-sealed with the good records, which upload under the same key"
    };
    report.problems.push(format!(
        "sink {sink} batch {} (key {}): {records} of its {} records are in damaged chunks{}",
        meta.seq,
        meta.key,
        meta.count,
        if repair {
            format!("; {fix}")
        } else {
            String::new()
        }
    ));
    if !repair {
        return Ok(());
    }
    if survivors == 0 {
        batches.remove(key)?;
    } else {
        meta.count = survivors;
        meta.records = meta.records.saturating_sub(records).min(survivors);
        meta.bytes = meta.bytes.saturating_sub(bytes);
        meta.repaired += records;
        batches.insert(key, encode_meta(&meta))?;
    }
    report.repaired += 1;
    Ok(())
}

/// Writes every pending record as NDJSON (`{"sink","seq","ts_ms","topic",
/// "attributes","payload"|"payload_b64"}`), oldest first per sink. The lines
/// are also valid input for `silt plugin test`.
pub fn export(data_dir: &Path, only: Option<&str>, out: &mut dyn Write) -> Result<u64, SpoolError> {
    guarded(data_dir, || export_inner(data_dir, only, out))
}

fn export_inner(
    data_dir: &Path,
    only: Option<&str>,
    out: &mut dyn Write,
) -> Result<u64, SpoolError> {
    let db = open(data_dir)?;
    let mut written = 0;
    let io = |e: std::io::Error| SpoolError::Storage(sled::Error::Io(e));
    for sink in sink_trees(&db) {
        if only.is_some_and(|o| o != sink) {
            continue;
        }
        let dir = segment_dir(&data_dir.join("spool"), &sink);
        for item in db.open_tree(format!("chunks/{sink}"))?.iter() {
            let (k, v) = item?;
            let (_, first, r) = decode_ref(&k, &v)?;
            let Chunk::Events(events) = read_chunk(&dir, &r)? else {
                tracing::warn!(
                    sink,
                    seq = first,
                    records = r.count,
                    "corrupt chunk skipped; `silt spool check --repair` quarantines it"
                );
                continue;
            };
            for (seq, event) in (first..).zip(&events) {
                let mut line = Vec::new();
                crate::plugin::ndjson::write_event(&mut line, event).map_err(io)?;
                // Prefix sink and seq, keeping the rest of the line as it is.
                write!(
                    out,
                    "{{\"sink\":{},\"seq\":{seq},",
                    serde_json::Value::from(sink.as_str())
                )
                .map_err(io)?;
                out.write_all(&line[1..]).map_err(io)?;
                written += 1;
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use bytesize::ByteSize;

    use super::*;
    use crate::config::{SpoolConfig, WhenFull};
    use crate::event::Event;
    use crate::spool::Spool;

    fn filled() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            max_bytes: ByteSize::gib(1),
            when_full: WhenFull::Block,
            min_free: ByteSize::b(0),
        };
        let spool = Spool::open(dir.path(), &["lake".to_string()], &cfg).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let events = vec![
                Event::new(1_000, "a", &b"{\"x\":1}"[..]),
                Event::new(2_000, "b", &b"\x00bin"[..]),
            ];
            spool.append(&[0], events).await.unwrap();
            spool
                .seal(
                    0,
                    super::super::SealRule {
                        max_records: 1,
                        max_bytes: u64::MAX,
                        max_age_ms: 0,
                        max_partitions: usize::MAX,
                        force: true,
                    },
                    |_, s| format!("k{s}"),
                )
                .await
                .unwrap();
        });
        spool.close().unwrap();
        dir
    }

    #[test]
    fn stats_and_export_show_what_is_pending() {
        let dir = filled();
        let backlog = stats(dir.path()).unwrap();
        assert_eq!(backlog.len(), 1);
        assert_eq!(
            (
                backlog[0].records,
                backlog[0].sealed_batches,
                backlog[0].oldest_ms
            ),
            (2, 1, Some(1_000))
        );
        let mut out = Vec::new();
        assert_eq!(export(dir.path(), None, &mut out).unwrap(), 2);
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["sink"], "lake");
        assert_eq!(lines[0]["payload"]["x"], 1);
        assert_eq!(lines[1]["payload_b64"], "AGJpbg==");
    }

    /// The one segment file of sink `lake` in `data_dir`'s spool.
    fn first_segment(data_dir: &Path) -> std::path::PathBuf {
        let segments = segment_dir(&data_dir.join("spool"), "lake");
        std::fs::read_dir(&segments)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    }

    #[test]
    fn check_finds_and_repairs_flipped_bytes() {
        let dir = filled();
        // Both records share one chunk (one append), split by the seal into
        // two references: one flipped byte damages both.
        let file = first_segment(dir.path());
        let mut raw = std::fs::read(&file).unwrap();
        raw[12] ^= 1;
        std::fs::write(&file, raw).unwrap();
        let report = check(dir.path(), false).unwrap();
        assert_eq!(
            (report.records, report.batches, report.problems.len()),
            (2, 1, 3),
            "two chunk references and the sealed batch holding one: {:?}",
            report.problems
        );
        let report = check(dir.path(), true).unwrap();
        assert_eq!(report.repaired, 3, "{:?}", report.problems);
        assert!(check(dir.path(), false).unwrap().problems.is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .unwrap()
                .count(),
            2
        );
    }

    /// Three appends (three chunks) sealed as one batch; the middle chunk is
    /// damaged. After `--repair` the batch must still hand out the two good
    /// records, with nothing "missing" that would make the batcher think it
    /// was uploaded before a crash.
    #[test]
    fn repair_keeps_the_good_records_of_a_sealed_batch() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            max_bytes: ByteSize::gib(1),
            when_full: WhenFull::Block,
            min_free: ByteSize::b(0),
        };
        let rule = super::super::SealRule {
            max_records: u64::MAX,
            max_bytes: u64::MAX,
            max_age_ms: 0,
            max_partitions: usize::MAX,
            force: true,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let spool = Spool::open(dir.path(), &["lake".to_string()], &cfg).unwrap();
        let payload = |i: u8| vec![b'a' + i; 64];
        rt.block_on(async {
            for i in 0..3 {
                let event = Event::new(1_000 + i as i64, "t", payload(i));
                spool.append(&[0], vec![event]).await.unwrap();
            }
            spool.seal(0, rule, |_, s| format!("k{s}")).await.unwrap();
        });
        spool.close().unwrap();
        let file = first_segment(dir.path());
        let mut raw = std::fs::read(&file).unwrap();
        let middle = raw
            .windows(64)
            .position(|w| w == payload(1).as_slice())
            .expect("the middle payload is in the segment");
        raw[middle + 10] ^= 0xff;
        std::fs::write(&file, raw).unwrap();

        let report = check(dir.path(), true).unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("batch 0 (key k0): 1 of its 3 records")),
            "the report names the batch and the count: {:?}",
            report.problems
        );
        assert!(check(dir.path(), false).unwrap().problems.is_empty());

        let spool = Spool::open(dir.path(), &["lake".to_string()], &cfg).unwrap();
        let pending = spool.take_pending(0);
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (
                pending[0].key.as_str(),
                pending[0].records,
                pending[0].repaired
            ),
            ("k0", 2, 1)
        );
        let loaded = spool.load_batch(0, &pending[0]).unwrap();
        assert_eq!(loaded.missing, 0);
        let payloads: Vec<Vec<u8>> = loaded.events.iter().map(|e| e.payload.to_vec()).collect();
        assert_eq!(payloads, [payload(0), payload(2)]);
        spool.close().unwrap();
    }
}
