//! How far each sink's log had durably got, kept outside sled.
//!
//! sled recovers a truncated or damaged file to an older state without an
//! error. This small file, written only after a successful flush, lets the
//! next start see that records it had acknowledged are gone and say so,
//! instead of losing them silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often the file is rewritten at most; it may lag, never lead.
const EVERY: Duration = Duration::from_secs(1);

pub(super) struct Watermark {
    path: PathBuf,
    written: Option<Instant>,
}

impl Watermark {
    pub fn new(dir: &Path) -> Watermark {
        Watermark {
            path: dir.join("spool-watermark.json"),
            written: None,
        }
    }

    /// Records `next_seq` per sink after a flush; `force` ignores the interval.
    pub fn update(&mut self, next_seqs: BTreeMap<String, u64>, force: bool) {
        if !force && self.written.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.written = Some(Instant::now());
        let tmp = self.path.with_extension("tmp");
        let json = serde_json::to_vec(&next_seqs).expect("serialisable");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, &self.path)) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the spool watermark");
        }
    }

    /// Compares what sled recovered with the last watermark and logs any
    /// records that were acknowledged but are no longer there. Returns the
    /// number of records lost per sink.
    pub fn check(&self, recovered: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let Ok(text) = std::fs::read(&self.path) else {
            return BTreeMap::new();
        };
        let Ok(marked) = serde_json::from_slice::<BTreeMap<String, u64>>(&text) else {
            tracing::warn!(path = %self.path.display(), "spool watermark unreadable; ignored");
            return BTreeMap::new();
        };
        let mut lost = BTreeMap::new();
        for (sink, &mark) in &marked {
            // A sink no longer configured keeps its records; not a loss.
            let Some(&now) = recovered.get(sink) else {
                continue;
            };
            if mark > now {
                tracing::error!(
                    sink,
                    lost_from = now,
                    lost_to = mark - 1,
                    records = mark - now,
                    "spool files were damaged (truncated?): records acknowledged earlier are gone"
                );
                lost.insert(sink.clone(), mark - now);
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_records_missing_below_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watermark::new(dir.path());
        w.update(BTreeMap::from([("a".into(), 100), ("b".into(), 5)]), true);
        let recovered = BTreeMap::from([("a".into(), 60), ("b".into(), 9)]);
        assert_eq!(w.check(&recovered), BTreeMap::from([("a".into(), 40)]));
    }
}
