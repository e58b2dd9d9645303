//! Where sealed batches go: one `ObjectStore` per sink, and the one way
//! silt writes an object.

mod file;
mod s3;

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use crate::config::{SinkConfig, SinkKind};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot set up sink {sink}: {message}")]
    Setup { sink: String, message: String },
    #[error("writing {key} failed: {source}")]
    Write {
        key: String,
        source: object_store::Error,
    },
    #[error("object {key} already exists with other content; it was left untouched")]
    Conflict { key: String },
}

impl SinkError {
    /// Whether the same write may succeed later (the store is down, slow,
    /// refusing for now). Setup and conflicts need a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Write { source, .. } => !matches!(
                source,
                object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }
            ),
            SinkError::Setup { .. } | SinkError::Conflict { .. } => false,
        }
    }
}

/// One configured destination for objects.
pub struct Sink {
    store: Arc<dyn ObjectStore>,
    /// Local files have no place for content type and encoding.
    object_attributes: bool,
}

pub fn build(name: &str, config: &SinkConfig) -> Result<Sink, SinkError> {
    let setup = |message: String| SinkError::Setup {
        sink: name.to_string(),
        message,
    };
    let (store, object_attributes) = match config.kind {
        SinkKind::S3 => (s3::build(config).map_err(setup)?, true),
        SinkKind::File => (file::build(config).map_err(setup)?, false),
    };
    Ok(Sink {
        store,
        object_attributes,
    })
}

/// What happened to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    /// An earlier attempt (before a crash or a lost response) already wrote
    /// these exact bytes.
    AlreadyThere,
}

/// Writes `body` under `key` without ever replacing an existing object.
///
/// A conditional create makes retries after a crash idempotent: if the key
/// exists with the same bytes, our earlier attempt succeeded; if it exists
/// with other bytes, somebody else's data is there and is not overwritten.
impl Sink {
    pub async fn put_new(
        &self,
        key: &str,
        body: bytes::Bytes,
        content_type: &'static str,
        content_encoding: Option<&'static str>,
    ) -> Result<Written, SinkError> {
        let store = self.store.as_ref();
        let path = ObjectPath::from(key);
        let mut attributes = Attributes::new();
        if self.object_attributes {
            attributes.insert(Attribute::ContentType, content_type.into());
            if let Some(encoding) = content_encoding {
                attributes.insert(Attribute::ContentEncoding, encoding.into());
            }
        }
        let options = PutOptions {
            mode: PutMode::Create,
            attributes,
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
                if existing == body {
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
