//! How far each sink's log had durably got, kept outside sled.
//!
//! Written (fsynced, renamed into place, directory fsynced) only after a
//! commit is durable, so it may lag but never leads. The next start uses it
//! twice: counters never restart below it (no `{batch}` key is used twice),
//! and records it had seen acknowledged but sled no longer has are
//! reported as lost instead of vanishing silently.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::segments::sync_dir;
use super::types::Reached;

/// How often the file is rewritten at most.
const EVERY: Duration = Duration::from_secs(1);

pub(super) struct Watermark {
    path: PathBuf,
    written: Option<Instant>,
}

/// Before chunks the file held only `next_seq` per sink.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Stored {
    Now(Reached),
    Seq(u64),
}

impl Watermark {
    pub fn new(dir: &Path) -> Watermark {
        Watermark {
            path: dir.join("spool-watermark.json"),
            written: None,
        }
    }

    /// Records how far each sink got after a durable commit; `force`
    /// ignores the interval.
    pub fn update(&mut self, reached: BTreeMap<String, Reached>, force: bool) {
        if !force && self.written.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.written = Some(Instant::now());
        if let Err(e) = self.write(&reached) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the spool watermark");
        }
    }

    fn write(&self, reached: &BTreeMap<String, Reached>) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(reached).expect("serialisable"))?;
        file.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))
    }

    /// The last watermark written; empty when there is none.
    pub fn read(&self) -> BTreeMap<String, Reached> {
        let Ok(text) = std::fs::read(&self.path) else {
            return BTreeMap::new();
        };
        match serde_json::from_slice::<BTreeMap<String, Stored>>(&text) {
            Ok(stored) => stored
                .into_iter()
                .map(|(sink, s)| {
                    let reached = match s {
                        Stored::Now(r) => r,
                        Stored::Seq(next_seq) => Reached {
                            next_seq,
                            next_batch: 0,
                        },
                    };
                    (sink, reached)
                })
                .collect(),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "spool watermark unreadable; losses since the last run cannot be checked");
                BTreeMap::new()
            }
        }
    }
}

/// Compares what the spool recovered (`next_seq` per sink, before the
/// watermark's floor) with the watermark, logs every acknowledged range
/// that is gone, and returns the records lost per sink.
pub(super) fn report_lost(
    marked: &BTreeMap<String, Reached>,
    recovered: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    let mut lost = BTreeMap::new();
    for (sink, mark) in marked {
        // A sink no longer configured keeps its records; not a loss.
        let Some(&now) = recovered.get(sink) else {
            continue;
        };
        if mark.next_seq > now {
            tracing::error!(
                sink,
                lost_from = now,
                lost_to = mark.next_seq - 1,
                records = mark.next_seq - now,
                "spool lost records acknowledged earlier (files damaged or truncated, or writes dropped by the disk); counted in silt_spool_lost_records_total"
            );
            lost.insert(sink.clone(), mark.next_seq - now);
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_records_missing_below_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watermark::new(dir.path());
        let at = |next_seq| Reached {
            next_seq,
            next_batch: 3,
        };
        w.update(
            BTreeMap::from([("a".into(), at(100)), ("b".into(), at(5))]),
            true,
        );
        let marked = w.read();
        assert_eq!(marked["a"], at(100));
        let recovered = BTreeMap::from([("a".into(), 60), ("b".into(), 9)]);
        assert_eq!(
            report_lost(&marked, &recovered),
            BTreeMap::from([("a".into(), 40)])
        );
    }

    #[test]
    fn reads_the_format_before_chunks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("spool-watermark.json"), br#"{"a":7}"#).unwrap();
        let marked = Watermark::new(dir.path()).read();
        assert_eq!(marked["a"].next_seq, 7);
    }
}
