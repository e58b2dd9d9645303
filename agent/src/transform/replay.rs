//! Plugin dead-letter files an operator asked to replay (`silt dead-letter
//! replay --transform NAME`) go through their transform again, and what it
//! emits is stored like any other output.
//!
//! Exactly once across a crash: the file's name is committed as a mark
//! with the transform's output, so a file whose output is stored is only
//! removed at the next scan, never run again. If the transform fails again
//! its events are in a new dead-letter file and the old one goes.

use std::path::Path;

use super::{Ingest, Stage};
use crate::plugin::dead_letter::{self, ListedFile};
use crate::spool::Mark;

/// The mark tree of replayed files (name -> replay time).
const REPLAYED: &str = "silt.plugin-dead-letter-replays";

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("reading or removing the file failed: {0}")]
    File(#[from] std::io::Error),
    #[error("the spool refused the transform's output: {0}")]
    Ingest(#[from] super::IngestError),
    #[error("the spool cannot be read: {0}")]
    Spool(#[from] crate::spool::SpoolError),
}

impl Ingest {
    /// Replays every requested file of the dead-letter directory whose
    /// transform is configured; errors are logged and retried next time.
    pub async fn replay_dead_letters(&self) {
        let Some(dir) = self
            .stages
            .first()
            .map(|s| s.dead_letter.dir().to_path_buf())
        else {
            return;
        };
        let listed = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || dead_letter::list(&dir))
                .await
                .expect("listing does not panic")
        };
        let requested = match listed {
            Ok(files) => files.into_iter().filter(|f| f.replay_requested),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "reading the dead-letter directory failed");
                return;
            }
        };
        for file in requested {
            if self.stop.is_cancelled() {
                return;
            }
            let Some(stage) = self.stages.iter().find(|s| s.name == file.header.plugin) else {
                tracing::warn!(file = %file.name, transform = %file.header.plugin, "a dead-letter replay waits: no transform of that name is configured");
                continue;
            };
            if let Err(e) = self.replay_file(&dir, &file, stage).await {
                tracing::warn!(file = %file.name, transform = %stage.name, error = %e, "replaying a dead-letter file failed; retried at the next scan");
            }
        }
    }

    async fn replay_file(
        &self,
        dir: &Path,
        file: &ListedFile,
        stage: &std::sync::Arc<Stage>,
    ) -> Result<(), ReplayError> {
        let key = file.name.as_bytes().to_vec();
        let mark = |value: Vec<u8>| Mark {
            tree: REPLAYED.to_string(),
            key: key.clone(),
            value,
        };
        if self.spool.mark(REPLAYED, &key)?.is_none() {
            let events = dead_letter::read_events(dir, &file.name)?;
            let count = events.len();
            match stage.process(events).await? {
                Some(out) => {
                    let replayed_at = crate::event::now_ms().to_be_bytes().to_vec();
                    self.deliver(&stage.name, out, true, vec![mark(replayed_at)])
                        .await?;
                    tracing::info!(file = %file.name, transform = %stage.name, events = count, "dead-letter file replayed through its transform");
                }
                None => tracing::warn!(
                    file = %file.name, transform = %stage.name,
                    "the transform failed again on a replayed file; its events are in a new dead-letter file"
                ),
            }
        }
        dead_letter::remove(dir, &file.name)?;
        self.store_marks(vec![mark(Vec::new())]).await?;
        Ok(())
    }
}
