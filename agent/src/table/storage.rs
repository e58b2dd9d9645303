//! iceberg's file access over silt's own object stores, so table metadata
//! and manifests travel through the same S3 client, endpoint, CA and
//! credential chain as the sink's objects.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use iceberg::io::{
    FileMetadata, FileRead, FileWrite, InputFile, OutputFile, Storage, StorageConfig,
    StorageFactory,
};
use iceberg::{Error, ErrorKind, Result};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::config::SinkConfig;

/// Builds [`SinkStorage`]; it holds the sink's settings, not a serialized
/// form of them (silt never sends a FileIO to another process).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SinkStorageFactory {
    storage: SinkStorage,
}

impl SinkStorageFactory {
    pub fn new(storage: SinkStorage) -> SinkStorageFactory {
        SinkStorageFactory { storage }
    }
}

#[typetag::serde]
impl StorageFactory for SinkStorageFactory {
    fn build(&self, _config: &StorageConfig) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(self.storage.clone()))
    }
}

/// `s3://bucket/key` through an S3 store per bucket (built like the sink's),
/// `file:///path` through the local file system.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SinkStorage {
    #[serde(skip)]
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// `None` only in a deserialized copy, which cannot open stores.
    sink: Option<SinkConfig>,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
    /// Table metadata files written since the last take.
    written_metadata: Mutex<Vec<String>>,
}

impl SinkStorage {
    pub fn new(sink: &SinkConfig) -> SinkStorage {
        SinkStorage {
            inner: Arc::new(Inner {
                sink: Some(sink.clone()),
                ..Default::default()
            }),
        }
    }

    pub fn take_written_metadata(&self) -> Vec<String> {
        std::mem::take(&mut *self.inner.written_metadata.lock().expect("lock"))
    }

    fn wrote(&self, path: &str) {
        if path.ends_with(".metadata.json") {
            self.inner
                .written_metadata
                .lock()
                .expect("lock")
                .push(path.to_string());
        }
    }
}

fn io_error(what: &str, path: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unexpected, format!("{what} {path}: {e}"))
}

impl SinkStorage {
    fn locate(&self, path: &str) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
        let (store_key, key) = if let Some(rest) = path.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            (format!("s3://{bucket}"), key.to_string())
        } else if let Some(rest) = path.strip_prefix("file://") {
            ("file://".to_string(), rest.to_string())
        } else {
            return Err(Error::new(
                ErrorKind::FeatureUnsupported,
                format!("silt reads and writes table files on s3:// or file:// only, not {path}"),
            ));
        };
        let mut stores = self.inner.stores.lock().expect("lock");
        if let Some(store) = stores.get(&store_key) {
            return Ok((store.clone(), ObjectPath::from(key)));
        }
        let store: Arc<dyn ObjectStore> = match store_key.strip_prefix("s3://") {
            Some(bucket) => {
                let sink = self.inner.sink.as_ref().ok_or_else(|| {
                    Error::new(ErrorKind::Unexpected, "silt storage without sink settings")
                })?;
                let mut config = sink.clone();
                config.bucket = Some(bucket.to_string());
                crate::sinks::s3_store(&config).map_err(|e| io_error("opening", path, e))?
            }
            None => Arc::new(LocalFileSystem::new()),
        };
        stores.insert(store_key, store.clone());
        Ok((store, ObjectPath::from(key)))
    }
}

#[async_trait]
#[typetag::serde]
impl Storage for SinkStorage {
    async fn exists(&self, path: &str) -> Result<bool> {
        let (store, key) = self.locate(path)?;
        match store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(io_error("looking up", path, e)),
        }
    }

    async fn metadata(&self, path: &str) -> Result<FileMetadata> {
        let (store, key) = self.locate(path)?;
        let meta = store
            .head(&key)
            .await
            .map_err(|e| io_error("looking up", path, e))?;
        Ok(FileMetadata { size: meta.size })
    }

    async fn read(&self, path: &str) -> Result<Bytes> {
        let (store, key) = self.locate(path)?;
        let got = store
            .get(&key)
            .await
            .map_err(|e| io_error("reading", path, e))?;
        got.bytes().await.map_err(|e| io_error("reading", path, e))
    }

    async fn reader(&self, path: &str) -> Result<Box<dyn FileRead>> {
        let (store, key) = self.locate(path)?;
        Ok(Box::new(RangeReader {
            store,
            key,
            path: path.to_string(),
        }))
    }

    async fn write(&self, path: &str, bs: Bytes) -> Result<()> {
        let (store, key) = self.locate(path)?;
        self.wrote(path);
        store
            .put(&key, PutPayload::from_bytes(bs))
            .await
            .map_err(|e| io_error("writing", path, e))?;
        Ok(())
    }

    async fn writer(&self, path: &str) -> Result<Box<dyn FileWrite>> {
        let (store, key) = self.locate(path)?;
        self.wrote(path);
        Ok(Box::new(BufferedWriter {
            store,
            key,
            path: path.to_string(),
            buffer: Some(Vec::new()),
        }))
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let (store, key) = self.locate(path)?;
        match store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_error("deleting", path, e)),
        }
    }

    async fn delete_prefix(&self, path: &str) -> Result<()> {
        let (store, prefix) = self.locate(path)?;
        let mut listed = store.list(Some(&prefix));
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| io_error("listing", path, e))?;
            store
                .delete(&meta.location)
                .await
                .map_err(|e| io_error("deleting", meta.location.as_ref(), e))?;
        }
        Ok(())
    }

    async fn delete_stream(&self, mut paths: BoxStream<'static, String>) -> Result<()> {
        while let Some(path) = paths.next().await {
            self.delete(&path).await?;
        }
        Ok(())
    }

    fn new_input(&self, path: &str) -> Result<InputFile> {
        Ok(InputFile::new(Arc::new(self.clone()), path.to_string()))
    }

    fn new_output(&self, path: &str) -> Result<OutputFile> {
        Ok(OutputFile::new(Arc::new(self.clone()), path.to_string()))
    }
}

struct RangeReader {
    store: Arc<dyn ObjectStore>,
    key: ObjectPath,
    path: String,
}

#[async_trait]
impl FileRead for RangeReader {
    async fn read(&self, range: Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.key, range)
            .await
            .map_err(|e| io_error("reading", &self.path, e))
    }
}

/// Table metadata and manifests are small: written in one PUT on close.
struct BufferedWriter {
    store: Arc<dyn ObjectStore>,
    key: ObjectPath,
    path: String,
    buffer: Option<Vec<u8>>,
}

#[async_trait]
impl FileWrite for BufferedWriter {
    async fn write(&mut self, bs: Bytes) -> Result<()> {
        match &mut self.buffer {
            Some(buffer) => {
                buffer.extend_from_slice(&bs);
                Ok(())
            }
            None => Err(Error::new(ErrorKind::DataInvalid, "write after close")),
        }
    }

    async fn close(&mut self) -> Result<()> {
        let buffer = self
            .buffer
            .take()
            .ok_or_else(|| Error::new(ErrorKind::DataInvalid, "closed twice"))?;
        self.store
            .put(&self.key, PutPayload::from(buffer))
            .await
            .map_err(|e| io_error("writing", &self.path, e))?;
        Ok(())
    }
}
