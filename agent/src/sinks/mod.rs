//! Where sealed batches go: one `ObjectStore` per sink, and the one way
//! silt writes an object.

mod class;
mod file;
mod multipart;
mod s3;

use std::sync::Arc;

use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use crate::config::{SinkConfig, SinkKind};
pub use class::{ErrorClass, shorten};
pub use multipart::{Checkpoint, UploadState};

/// `error` and the causes under it that its message leaves out: object
/// store's HTTP errors end at "error sending request", while the reason
/// (refused connection, untrusted certificate) is in their sources.
fn with_causes(error: &object_store::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        let message = e.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = e.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot set up sink {sink}: {message}")]
    Setup { sink: String, message: String },
    #[error("writing {key} failed: {}", with_causes(source))]
    Write {
        key: String,
        source: object_store::Error,
    },
    #[error("object {key} already exists with other content; it was left untouched")]
    Conflict { key: String },
    #[error("reading media file {path} failed: {source}")]
    Media {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("saving upload progress of {key} failed: {message}")]
    Checkpoint { key: String, message: String },
    #[error(
        "writing {key} did not finish within {after:?}; if the link is slower than `min_upload_rate`, lower it"
    )]
    Timeout {
        key: String,
        after: std::time::Duration,
    },
}

/// One configured destination for objects.
pub struct Sink {
    store: Arc<dyn ObjectStore>,
    /// Resumable multipart uploads (S3); `None` for local files.
    multipart: Option<Arc<dyn MultipartStore>>,
    /// Local files have no place for content type, encoding or metadata.
    object_attributes: bool,
    storage_class: Option<String>,
}

pub fn build(name: &str, config: &SinkConfig) -> Result<Sink, SinkError> {
    let setup = |message: String| SinkError::Setup {
        sink: name.to_string(),
        message,
    };
    let (store, multipart): (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>) =
        match config.kind {
            SinkKind::S3 => {
                let s3 = s3::build(config).map_err(setup)?;
                (s3.clone(), Some(s3))
            }
            SinkKind::File => (file::build(config).map_err(setup)?, None),
        };
    Ok(Sink {
        store,
        object_attributes: multipart.is_some(),
        multipart,
        storage_class: config.storage_class.clone(),
    })
}

/// An S3 store built from a sink's settings (for the bucket in `config`).
#[cfg(feature = "iceberg")]
pub fn s3_store(config: &SinkConfig) -> Result<Arc<dyn ObjectStore>, String> {
    Ok(s3::build(config)?)
}

#[cfg(feature = "iceberg")]
/// The AWS credential chain an s3 sink signs with, for other AWS requests
/// made on its behalf (an Iceberg REST catalog that takes SigV4).
pub fn s3_credentials(
    config: &SinkConfig,
) -> Result<object_store::aws::AwsCredentialProvider, String> {
    Ok(s3::build(config)?.credentials().clone())
}

#[cfg(feature = "iceberg")]
pub(crate) use s3::trusting_ca_file;

/// What happened to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    /// An earlier attempt (before a crash or a lost response) already wrote
    /// these exact bytes.
    AlreadyThere,
}

/// HTTP-level properties of one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectInfo {
    pub content_type: String,
    pub content_encoding: Option<&'static str>,
    /// User metadata (`x-amz-meta-NAME`).
    pub metadata: Vec<(String, String)>,
}

/// Whether two compressed objects hold the same bytes once decompressed:
/// a batch uploaded by an earlier version (another gzip encoder) before a
/// crash is the same batch, not a conflict.
fn same_content(a: &[u8], b: &[u8], encoding: Option<&str>) -> bool {
    use std::io::Read;
    let plain = |data: &[u8]| -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match encoding? {
            "gzip" => flate2::read::MultiGzDecoder::new(data)
                .read_to_end(&mut out)
                .ok()?,
            "zstd" => zstd::stream::read::Decoder::new(data)
                .ok()?
                .read_to_end(&mut out)
                .ok()?,
            _ => return None,
        };
        Some(out)
    };
    matches!((plain(a), plain(b)), (Some(x), Some(y)) if x == y)
}

impl Sink {
    fn attributes(&self, info: &ObjectInfo) -> Attributes {
        let mut attributes = Attributes::new();
        if !self.object_attributes {
            return attributes;
        }
        attributes.insert(Attribute::ContentType, info.content_type.clone().into());
        if let Some(encoding) = info.content_encoding {
            attributes.insert(Attribute::ContentEncoding, encoding.into());
        }
        if let Some(class) = &self.storage_class {
            attributes.insert(Attribute::StorageClass, class.clone().into());
        }
        for (name, value) in &info.metadata {
            attributes.insert(
                Attribute::Metadata(name.clone().into()),
                value.clone().into(),
            );
        }
        attributes
    }

    /// Writes `body` under `key` without ever replacing an existing object.
    ///
    /// A conditional create makes retries after a crash idempotent: if the
    /// key exists with the same bytes, our earlier attempt succeeded; if it
    /// exists with other bytes, somebody else's data is there and is not
    /// overwritten.
    pub async fn put_new(
        &self,
        key: &str,
        body: bytes::Bytes,
        info: &ObjectInfo,
    ) -> Result<Written, SinkError> {
        let store = self.store.as_ref();
        let path = ObjectPath::from(key);
        let options = PutOptions {
            mode: PutMode::Create,
            attributes: self.attributes(info),
            ..Default::default()
        };
        let write_err = |source| SinkError::Write {
            key: key.to_string(),
            source,
        };
        match store
            .put_opts(&path, PutPayload::from_bytes(body.clone()), options)
            .await
        {
            Ok(_) => Ok(Written::Created),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = store
                    .get(&path)
                    .await
                    .map_err(write_err)?
                    .bytes()
                    .await
                    .map_err(write_err)?;
                if existing == body || same_content(&existing, &body, info.content_encoding) {
                    Ok(Written::AlreadyThere)
                } else {
                    Err(SinkError::Conflict {
                        key: key.to_string(),
                    })
                }
            }
            Err(source) => Err(write_err(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn other_encoder_same_content_is_the_same_object() {
        let data = b"{\"a\":1}\n".repeat(500);
        let (fast, best) = (gzip(&data, 1), gzip(&data, 9));
        assert_ne!(fast, best);
        assert!(same_content(&fast, &best, Some("gzip")));
        assert!(!same_content(&fast, &gzip(b"other", 9), Some("gzip")));
        assert!(
            !same_content(&fast, &best, None),
            "plain bytes compare as bytes"
        );
        let z = |level| zstd::encode_all(data.as_slice(), level).unwrap();
        assert!(same_content(&z(1), &z(19), Some("zstd")));
    }
}
