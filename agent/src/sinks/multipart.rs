//! Media files as objects: one part at a time from disk, so memory stays
//! at one part whatever the file size, and resumable, so a crash or outage
//! in the middle of a large upload continues where it stopped.
//!
//! Progress (upload id and the ids of finished parts) is handed to a
//! checkpoint callback after every step; the batcher keeps it in the spool.
//! The file's sha256 goes into the object's metadata, which is how a later
//! attempt recognises its own object (multipart completion cannot be
//! conditional the way a single PUT is).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use futures::future::BoxFuture;
use object_store::multipart::PartId;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, GetOptions, ObjectStoreExt, PutMultipartOptions, PutPayload, WriteMultipart,
};
use serde::{Deserialize, Serialize};

use super::{ObjectInfo, Sink, SinkError, Written};

/// How far a multipart upload got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    pub upload_id: String,
    /// Ids of the parts written so far, in order.
    pub parts: Vec<String>,
}

/// Where a multipart upload's progress is kept durably; `None` forgets it.
pub trait Checkpoint: Send + Sync {
    fn save(&self, state: Option<&UploadState>) -> BoxFuture<'_, Result<(), SinkError>>;
}

/// The metadata entry that identifies a media object's content.
pub const SHA256_METADATA: &str = "sha256";

impl Sink {
    /// Writes the file at `file` (`size` bytes, `sha256` hex) under `key`,
    /// never replacing an object with other content. Files above
    /// `part_size` go up in parts, resuming from `resume`.
    #[allow(clippy::too_many_arguments)]
    pub async fn put_file(
        &self,
        key: &str,
        file: &Path,
        size: u64,
        sha256: &str,
        info: &ObjectInfo,
        part_size: u64,
        resume: Option<UploadState>,
        checkpoint: &dyn Checkpoint,
    ) -> Result<Written, SinkError> {
        let mut info = info.clone();
        info.metadata
            .push((SHA256_METADATA.to_string(), sha256.to_string()));
        if size <= part_size {
            let body = read_part(file, 0, size).await?;
            return self.put_new(key, body, &info).await;
        }
        let Some(multipart) = self.multipart.clone() else {
            return self.copy_local(key, file, size, sha256, part_size).await;
        };
        let path = ObjectPath::from(key);
        let write_err = |source| SinkError::Write {
            key: key.to_string(),
            source,
        };
        let parts = size.div_ceil(part_size) as usize;
        let mut state = match resume.filter(|s| !s.upload_id.is_empty()) {
            Some(state) => {
                tracing::info!(
                    key,
                    parts_done = state.parts.len(),
                    parts,
                    "resuming multipart upload"
                );
                state
            }
            None => {
                if let Some(written) = self.existing(key, sha256).await? {
                    return Ok(written);
                }
                let options = PutMultipartOptions {
                    attributes: self.attributes(&info),
                    ..Default::default()
                };
                let upload_id = multipart
                    .create_multipart_opts(&path, options)
                    .await
                    .map_err(write_err)?;
                let state = UploadState {
                    upload_id,
                    parts: Vec::new(),
                };
                checkpoint.save(Some(&state)).await?;
                state
            }
        };
        while state.parts.len() < parts {
            let idx = state.parts.len();
            let offset = idx as u64 * part_size;
            let body = read_part(file, offset, part_size.min(size - offset)).await?;
            match multipart
                .put_part(&path, &state.upload_id, idx, PutPayload::from_bytes(body))
                .await
            {
                Ok(part) => {
                    state.parts.push(part.content_id);
                    checkpoint.save(Some(&state)).await?;
                    tracing::info!(key, part = idx + 1, parts, "multipart part written");
                }
                Err(e) => return self.failed(key, sha256, write_err(e), checkpoint).await,
            }
        }
        let ids = state
            .parts
            .iter()
            .map(|id| PartId {
                content_id: id.clone(),
            })
            .collect();
        match multipart
            .complete_multipart(&path, &state.upload_id, ids)
            .await
        {
            Ok(_) => Ok(Written::Created),
            Err(e) => self.failed(key, sha256, write_err(e), checkpoint).await,
        }
    }

    /// After a failed part or completion: an upload the store no longer
    /// knows (aborted, expired, or completed by an attempt whose answer was
    /// lost) starts over, unless our object is already there.
    async fn failed(
        &self,
        key: &str,
        sha256: &str,
        error: SinkError,
        checkpoint: &dyn Checkpoint,
    ) -> Result<Written, SinkError> {
        let unknown_upload = matches!(
            &error,
            SinkError::Write {
                source: object_store::Error::NotFound { .. },
                ..
            }
        );
        if unknown_upload {
            if let Some(written) = self.existing(key, sha256).await? {
                return Ok(written);
            }
            tracing::warn!(
                key,
                "the store no longer knows the multipart upload; starting it again"
            );
            checkpoint.save(None).await?;
        }
        Err(error)
    }

    /// Whether `key` already holds an object: ours (same sha256) or not.
    async fn existing(&self, key: &str, sha256: &str) -> Result<Option<Written>, SinkError> {
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        match self.store.get_opts(&ObjectPath::from(key), head).await {
            Ok(found) => {
                let theirs = found
                    .attributes
                    .get(&Attribute::Metadata(SHA256_METADATA.into()))
                    .map(|v| v.as_ref().to_string());
                if theirs.as_deref() == Some(sha256) {
                    Ok(Some(Written::AlreadyThere))
                } else {
                    Err(SinkError::Conflict {
                        key: key.to_string(),
                    })
                }
            }
            // Without `s3:ListBucket`, S3 answers a HEAD of a missing key
            // with 403, not 404. Only this sink's own keys (agent id and
            // batch number in them) are asked, so 403 reads as absent: at
            // worst an upload whose answer was lost is completed again with
            // the same bytes. A foreign object under the key would be
            // replaced; the README says to grant ListBucket to rule it out.
            Err(
                object_store::Error::NotFound { .. } | object_store::Error::PermissionDenied { .. },
            ) => Ok(None),
            Err(source) => Err(SinkError::Write {
                key: key.to_string(),
                source,
            }),
        }
    }

    /// A local directory: a streamed copy, which the store publishes by
    /// rename when complete. Local files carry no metadata, so an existing
    /// object is recognised by its content.
    async fn copy_local(
        &self,
        key: &str,
        file: &Path,
        size: u64,
        sha256: &str,
        part_size: u64,
    ) -> Result<Written, SinkError> {
        let path = ObjectPath::from(key);
        let write_err = |source| SinkError::Write {
            key: key.to_string(),
            source,
        };
        if let Ok(meta) = self.store.head(&path).await {
            let same = meta.size == size && local_sha256(&self.store, &path).await? == sha256;
            return if same {
                Ok(Written::AlreadyThere)
            } else {
                Err(SinkError::Conflict {
                    key: key.to_string(),
                })
            };
        }
        let upload = self.store.put_multipart(&path).await.map_err(write_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size as usize);
        let mut offset = 0;
        while offset < size {
            let len = part_size.min(size - offset);
            writer.wait_for_capacity(1).await.map_err(write_err)?;
            writer.put(read_part(file, offset, len).await?);
            offset += len;
        }
        writer.finish().await.map_err(write_err)?;
        Ok(Written::Created)
    }
}

async fn local_sha256(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    path: &ObjectPath,
) -> Result<String, SinkError> {
    use futures::StreamExt;
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut stream = store
        .get(path)
        .await
        .map_err(|source| SinkError::Write {
            key: path.to_string(),
            source,
        })?
        .into_stream();
    while let Some(chunk) = stream.next().await {
        hasher.update(chunk.map_err(|source| SinkError::Write {
            key: path.to_string(),
            source,
        })?);
    }
    Ok(crate::media::hex(&hasher.finalize()))
}

/// `len` bytes of `file` from `offset`, read off the async runtime.
async fn read_part(file: &Path, offset: u64, len: u64) -> Result<bytes::Bytes, SinkError> {
    let path = file.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0; len as usize];
        f.read_exact(&mut buf)?;
        Ok(bytes::Bytes::from(buf))
    })
    .await
    .expect("reading a file does not panic")
    .map_err(|source| SinkError::Media {
        path: file.to_path_buf(),
        source,
    })
}
