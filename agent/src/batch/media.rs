//! The media side of a raw sink: resumable uploads whose progress lives in
//! the spool, the sidecar index line, and removing the file once done.
//!
//! Order after the object is confirmed: index line (with a mark saying it
//! was written, in the same commit), then the batch is completed, then the
//! file and the marks go. A crash anywhere repeats only steps that check
//! their mark or the store first, so the index gets exactly one line.

use crate::event::{Event, RESERVED_ATTRIBUTE_PREFIX};
use crate::media::{MediaDir, MediaRef};
use futures::future::BoxFuture;

use crate::sinks::{Checkpoint, ObjectInfo, Sink, SinkError, UploadState, Written};
use crate::spool::{Admission, BatchMeta, Mark, SinkId, Spool, SpoolError};

pub struct MediaSink {
    pub dir: MediaDir,
    pub part_size: u64,
    pub sidecar_sinks: Vec<SinkId>,
}

fn upload_tree(sink: &str) -> String {
    format!("multipart/{sink}")
}

fn sidecar_tree(sink: &str) -> String {
    format!("sidecar/{sink}")
}

/// A mark with an empty value removes the key.
fn forget(tree: String, key: Vec<u8>) -> Mark {
    Mark {
        tree,
        key,
        value: Vec::new(),
    }
}

/// How old an unreferenced media file must be before a sweep removes it.
const SWEEP_SETTLE: std::time::Duration = std::time::Duration::from_secs(60);

impl MediaSink {
    /// Removes this sink's media files no spool record refers to.
    pub fn sweep(&self, spool: &Spool, sink: SinkId, name: &str) -> Result<(), SpoolError> {
        let mut referenced = std::collections::HashSet::new();
        spool.for_each_event(sink, |event| {
            if let Some(Ok(media)) = MediaRef::of(event) {
                referenced.insert(media.file);
            }
        })?;
        if let Err(e) = self.dir.sweep(name, &referenced, SWEEP_SETTLE) {
            tracing::warn!(sink = name, error = %e, "sweeping unreferenced media files failed");
        }
        Ok(())
    }

    pub async fn upload(
        &self,
        spool: &Spool,
        sink: &str,
        target: &Sink,
        key: &str,
        media: &MediaRef,
        info: &ObjectInfo,
    ) -> Result<Written, SinkError> {
        let checkpoint = SpoolCheckpoint {
            spool: spool.clone(),
            tree: upload_tree(sink),
            key: key.to_string(),
        };
        let resume = spool
            .mark(&checkpoint.tree, key.as_bytes())
            .map_err(|e| checkpoint.error(e))?
            .and_then(|v| serde_json::from_slice::<UploadState>(&v).ok());
        target
            .put_file(
                key,
                &self.dir.path(&media.file),
                media.size,
                &media.sha256,
                info,
                self.part_size,
                resume,
                &checkpoint,
            )
            .await
    }

    /// Forgets the multipart progress kept for `key` (its upload is done,
    /// or the object went to dead-letter).
    pub async fn forget_upload(
        &self,
        spool: &Spool,
        name: &str,
        key: &str,
    ) -> Result<(), SpoolError> {
        let mark = forget(upload_tree(name), key.as_bytes().to_vec());
        spool.append_groups(Vec::new(), vec![mark]).await.map(drop)
    }

    /// After the object is confirmed: index line, complete, clean up.
    /// Returns how many older records `drop_oldest` removed to make room
    /// for the index line.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish(
        &self,
        spool: &Spool,
        sink: SinkId,
        name: &str,
        meta: BatchMeta,
        key: &str,
        media: &MediaRef,
        event: &Event,
    ) -> Result<u64, SpoolError> {
        let mut dropped_old = 0;
        let sidecar_key = meta.seq.to_be_bytes().to_vec();
        if !self.sidecar_sinks.is_empty()
            && spool.mark(&sidecar_tree(name), &sidecar_key)?.is_none()
        {
            let line = index_line(name, key, media, event);
            let mark = Mark {
                tree: sidecar_tree(name),
                key: sidecar_key.clone(),
                value: b"1".to_vec(),
            };
            let groups = vec![(self.sidecar_sinks.clone(), vec![line])];
            dropped_old = spool
                .append_admitted(groups, vec![mark], Admission::NeverDrop)
                .await?
                .dropped_old;
        }
        spool.complete(sink, meta).await?;
        self.dir.remove(&media.file);
        spool
            .append_groups(
                Vec::new(),
                vec![
                    forget(sidecar_tree(name), sidecar_key),
                    forget(upload_tree(name), key.as_bytes().to_vec()),
                ],
            )
            .await?;
        Ok(dropped_old)
    }
}

/// Upload progress as a spool mark under the object key.
struct SpoolCheckpoint {
    spool: Spool,
    tree: String,
    key: String,
}

impl SpoolCheckpoint {
    fn error(&self, e: SpoolError) -> SinkError {
        SinkError::Checkpoint {
            key: self.key.clone(),
            message: e.to_string(),
        }
    }
}

impl Checkpoint for SpoolCheckpoint {
    fn save(&self, state: Option<&UploadState>) -> BoxFuture<'_, Result<(), SinkError>> {
        let mark = Mark {
            tree: self.tree.clone(),
            key: self.key.as_bytes().to_vec(),
            value: state
                .map(|s| serde_json::to_vec(s).expect("serialisable"))
                .unwrap_or_default(),
        };
        Box::pin(async move {
            self.spool
                .append_groups(Vec::new(), vec![mark])
                .await
                .map(|_| ())
                .map_err(|e| self.error(e))
        })
    }
}

/// The event the index sinks get for one media object: where it is, what
/// it is, and the attributes it came with, so the lake can join it.
fn index_line(sink: &str, key: &str, media: &MediaRef, event: &Event) -> Event {
    let attributes: serde_json::Map<String, serde_json::Value> = event
        .attributes
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_ATTRIBUTE_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let line = serde_json::json!({
        "sink": sink,
        "key": key,
        "size": media.size,
        "sha256": media.sha256,
        "content_type": media.content_type,
        "stream": event.topic,
        "ts": super::rfc3339_ms(event.ts_ms),
        "attributes": attributes,
    });
    Event::new(
        event.ts_ms,
        format!("media/{}", event.topic),
        serde_json::to_vec(&line).expect("serialisable"),
    )
}
