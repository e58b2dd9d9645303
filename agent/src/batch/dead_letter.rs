//! A batch the store refuses for good leaves the queue for the dead-letter
//! area ([`crate::dead_letter`]) so the sink goes on; an operator's replay
//! request writes it again under its own key.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Batcher, backoff};
use crate::config::Compression;
use crate::dead_letter::Entry;
use crate::event::{Event, now_ms};
use crate::media::MediaRef;
use crate::sinks::{ErrorClass, ObjectInfo, SinkError, shorten};
use crate::spool::{BatchMeta, SpoolError};

/// How often a batcher looks for replay requests.
pub const REPLAY_SCAN_EVERY: Duration = Duration::from_secs(5);

/// The longest error text kept in an entry.
const ERROR_TEXT_MAX: usize = 2048;

/// The reason of a batch whose events could not be encoded.
const ENCODE_ERROR: &str = "EncodeError";

/// What the last attempt at a batch ran into.
pub(super) struct Failed<'a> {
    pub key: &'a str,
    pub reason: String,
    pub error: String,
    pub first_attempt_ms: i64,
    pub attempts: u32,
}

impl Failed<'_> {
    /// The dead-letter record of a replayable object of `bytes` bytes.
    fn entry(
        self,
        sink: &str,
        meta: &BatchMeta,
        info: &ObjectInfo,
        bytes: u64,
        sha256: Option<String>,
    ) -> Entry {
        Entry {
            sink: sink.to_string(),
            key: self.key.to_string(),
            reason: self.reason,
            error: shorten(&self.error, ERROR_TEXT_MAX),
            records: meta.records,
            bytes,
            first_attempt_ms: self.first_attempt_ms,
            last_attempt_ms: now_ms(),
            attempts: self.attempts,
            content_type: info.content_type.clone(),
            content_encoding: info.content_encoding.map(str::to_string),
            metadata: info.metadata.clone(),
            replayable: true,
            sha256,
        }
    }
}

impl Batcher {
    /// Moves the batch to dead-letter and completes it in the spool. False
    /// if the dead-letter write failed: the batch stays and is retried.
    pub(super) async fn dead_letter(
        &self,
        meta: &BatchMeta,
        body: &Bytes,
        info: &ObjectInfo,
        failed: Failed<'_>,
    ) -> Result<bool, SpoolError> {
        let entry = failed.entry(&self.name, meta, info, body.len() as u64, None);
        self.store_dead_letter(meta, entry, Kept::Body(body.clone()))
            .await
    }

    /// [`Self::dead_letter`] for a raw sink's media object: its file is
    /// linked into dead-letter, then removed from the media directory.
    pub(super) async fn dead_letter_media(
        &self,
        meta: &BatchMeta,
        media: &MediaRef,
        info: &ObjectInfo,
        failed: Failed<'_>,
    ) -> Result<bool, SpoolError> {
        let key = failed.key;
        let sha256 = Some(media.sha256.clone());
        let entry = failed.entry(&self.name, meta, info, media.size, sha256);
        let file = self.media.dir.path(&media.file);
        if !self
            .store_dead_letter(meta, entry, Kept::File(file))
            .await?
        {
            return Ok(false);
        }
        self.media.dir.remove(&media.file);
        self.media
            .forget_upload(&self.spool, &self.name, key)
            .await?;
        Ok(true)
    }

    /// A batch whose object cannot be built is kept as NDJSON of its
    /// events, for a person: removing it would lose acknowledged data.
    pub(super) async fn keep_unencodable(
        &self,
        meta: &BatchMeta,
        events: &[Event],
        error: &str,
        stop: &CancellationToken,
    ) -> Result<bool, SpoolError> {
        let body = Bytes::from(super::encode_ndjson(
            events,
            &self.agent,
            Compression::None,
            0,
        ));
        let now = now_ms();
        let entry = Entry {
            sink: self.name.clone(),
            key: meta.key.clone(),
            reason: ENCODE_ERROR.into(),
            error: shorten(error, ERROR_TEXT_MAX),
            records: meta.records,
            bytes: body.len() as u64,
            first_attempt_ms: now,
            last_attempt_ms: now,
            attempts: 1,
            content_type: "application/x-ndjson".into(),
            content_encoding: None,
            metadata: Vec::new(),
            replayable: false,
            sha256: None,
        };
        let mut attempt = 0;
        while !self
            .store_dead_letter(meta, entry.clone(), Kept::Body(body.clone()))
            .await?
        {
            attempt += 1;
            if attempt >= 20 {
                tracing::error!(sink = %self.name, key = %shorten(&meta.key, 200), "dead-letter still not writable; the batch stays sealed");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt, Duration::from_secs(30))) => {}
                _ = stop.cancelled() => return Ok(false),
            }
        }
        Ok(true)
    }

    async fn store_dead_letter(
        &self,
        meta: &BatchMeta,
        entry: Entry,
        kept: Kept,
    ) -> Result<bool, SpoolError> {
        let area = self.dead_letters.clone();
        let stored = {
            let entry = entry.clone();
            tokio::task::spawn_blocking(move || match kept {
                Kept::Body(body) => area.put(&entry, &body),
                Kept::File(file) => area.put_file(&entry, &file),
            })
            .await
            .expect("dead-letter write does not panic")
        };
        match stored {
            Ok(id) => {
                self.metrics.batch_dead_lettered(&self.name, &entry.reason);
                tracing::error!(
                    sink = %self.name, key = %shorten(&entry.key, 200), reason = %entry.reason,
                    error = %shorten(&entry.error, 300), records = entry.records, id,
                    "the store will never take this batch as it is; it went to dead-letter and the sink goes on (`silt dead-letter list`, then `replay` once fixed)"
                );
                self.metrics.uploading(&self.name, None);
                self.spool.complete(self.sink, meta.clone()).await?;
                Ok(true)
            }
            Err(e) => {
                tracing::error!(sink = %self.name, key = %shorten(&entry.key, 200), error = %e, "writing a batch to dead-letter failed (disk full?); the batch stays sealed and is retried");
                Ok(false)
            }
        }
    }

    /// Writes every entry of this sink an operator asked to replay. A
    /// permanent refusal goes back on the entry; anything else is retried
    /// at the next scan.
    pub(super) async fn replay_dead_letters(&self, stop: &CancellationToken) {
        let area = self.dead_letters.clone();
        let sink = self.name.clone();
        let requested = tokio::task::spawn_blocking(move || area.replays(&sink))
            .await
            .expect("listing does not panic");
        let requested = match requested {
            Ok(requested) => requested,
            Err(e) => {
                tracing::warn!(sink = %self.name, error = %e, "reading replay requests failed");
                return;
            }
        };
        for listed in requested {
            if stop.is_cancelled() {
                return;
            }
            let mut entry = listed.entry;
            let result = if entry.sha256.is_some() {
                self.rewrite_media(&entry, &listed.id).await
            } else {
                match self.dead_letters.body(&self.name, &listed.id) {
                    Ok(body) => self.rewrite(&entry, Bytes::from(body)).await,
                    Err(e) => Err(SinkError::Media {
                        path: self.dead_letters.object_path(&self.name, &listed.id),
                        source: e,
                    }),
                }
            };
            let area = &self.dead_letters;
            match result {
                Ok(written) => {
                    if let Err(e) = area.remove(&self.name, &listed.id) {
                        tracing::warn!(sink = %self.name, id = %listed.id, error = %e, "removing a replayed dead-letter entry failed; a later replay finds the object already written");
                    }
                    self.metrics
                        .object_committed(&self.name, entry.records, entry.bytes);
                    tracing::info!(
                        sink = %self.name, key = %shorten(&entry.key, 200), records = entry.records,
                        already_there = written == crate::sinks::Written::AlreadyThere,
                        "dead-lettered batch replayed"
                    );
                }
                Err(e) => {
                    entry.attempts += 1;
                    entry.last_attempt_ms = now_ms();
                    entry.error = shorten(&e.to_string(), ERROR_TEXT_MAX);
                    match e.class() {
                        ErrorClass::Permanent(reason) => {
                            entry.reason = reason;
                            tracing::error!(sink = %self.name, key = %shorten(&entry.key, 200), reason = %entry.reason, error = %e, "replay refused again; the batch stays in dead-letter");
                            if let Err(e) = area.replay_failed(&listed.id, &entry) {
                                tracing::warn!(sink = %self.name, id = %listed.id, error = %e, "recording a failed replay failed");
                            }
                        }
                        _ => {
                            tracing::warn!(sink = %self.name, key = %shorten(&entry.key, 200), error = %e, retry_in = ?REPLAY_SCAN_EVERY, "replay failed for now; retried");
                        }
                    }
                }
            }
        }
    }

    async fn rewrite(
        &self,
        entry: &Entry,
        body: Bytes,
    ) -> Result<crate::sinks::Written, SinkError> {
        let info = info_of(entry);
        let deadline = self.deadline.of(body.len() as u64);
        tokio::time::timeout(deadline, self.target.put_new(&entry.key, body, &info))
            .await
            .unwrap_or_else(|_| {
                Err(SinkError::Timeout {
                    key: entry.key.clone(),
                    after: deadline,
                })
            })
    }
}

impl Batcher {
    /// Uploads a dead-lettered media object the way a raw sink uploads its
    /// files (in parts, resumable across a restart), from a link in the
    /// sink's media directory. The sidecar index line is not written.
    async fn rewrite_media(
        &self,
        entry: &Entry,
        id: &str,
    ) -> Result<crate::sinks::Written, SinkError> {
        let object = self.dead_letters.object_path(&self.name, id);
        let linked = self
            .media
            .dir
            .link_in(&self.name, &format!("dead-letter-{id}"), &object)
            .map_err(|source| SinkError::Media {
                path: object.clone(),
                source,
            })?;
        let media = MediaRef {
            file: linked,
            size: entry.bytes,
            sha256: entry.sha256.clone().unwrap_or_default(),
            content_type: entry.content_type.clone(),
        };
        let deadline = self.deadline.of(entry.bytes);
        let info = info_of(entry);
        let upload = self.media.upload(
            &self.spool,
            &self.name,
            &self.target,
            &entry.key,
            &media,
            &info,
        );
        let written = tokio::time::timeout(deadline, upload)
            .await
            .unwrap_or_else(|_| {
                Err(SinkError::Timeout {
                    key: entry.key.clone(),
                    after: deadline,
                })
            });
        if written.is_ok()
            && let Err(e) = self
                .media
                .forget_upload(&self.spool, &self.name, &entry.key)
                .await
        {
            tracing::warn!(sink = %self.name, error = %e, "forgetting a replayed upload's progress failed");
        }
        self.media.dir.remove(&media.file);
        written
    }
}

/// What a dead-letter entry keeps: encoded bytes, or a media file.
enum Kept {
    Body(Bytes),
    File(std::path::PathBuf),
}

fn info_of(entry: &Entry) -> ObjectInfo {
    ObjectInfo {
        content_type: entry.content_type.clone(),
        content_encoding: match entry.content_encoding.as_deref() {
            Some("gzip") => Some("gzip"),
            Some("zstd") => Some("zstd"),
            _ => None,
        },
        metadata: entry.metadata.clone(),
    }
}
