//! Media (images, video chunks): too large for the spool, so each upload is
//! streamed into a file under `<data_dir>/media` and the spool holds a small
//! [`MediaRef`] to it. The file is fsynced before the reference is
//! committed, so an acknowledged upload is on disk, and it is deleted once
//! the object holding it is confirmed written.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::event::{Event, MEDIA_ATTRIBUTE};

/// What an event of a raw sink carries instead of a media payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRef {
    /// File name under the media directory.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: String,
}

impl MediaRef {
    /// The reference an event holds, if it is a media event.
    pub fn of(event: &Event) -> Option<Result<MediaRef, serde_json::Error>> {
        event
            .attribute(MEDIA_ATTRIBUTE)
            .map(|_| serde_json::from_slice(&event.payload))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the upload is larger than max_media ({max} bytes)")]
    TooLarge { max: u64 },
    #[error("reading the upload failed after {received} bytes: {message}; nothing was stored")]
    Body { received: u64, message: String },
    #[error(
        "the upload was cut after {received} bytes: more would leave less than spool.min_free on the disk of data_dir; nothing was stored, retry once the spool has drained"
    )]
    DiskShort { received: u64 },
    #[error("writing the upload to {path} failed: {source}; check free space under data_dir")]
    Disk { path: PathBuf, source: io::Error },
}

impl ReceiveError {
    /// Whether the client may send the same upload again later.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ReceiveError::TooLarge { .. })
    }
}

/// An upload on disk, fsynced, not yet referenced by the spool.
#[derive(Debug)]
pub struct Received {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// `<data_dir>/media`: `incoming/` while an upload streams in, then one
/// hard link per raw sink that takes it, in `sink/<sink>/`, so each sink
/// deletes its own copy and can never see another's.
///
/// Releases up to 0.1 linked `<sink>-<stem>` into `media/` itself; those
/// files are still read, and swept by exact sink name.
#[derive(Debug, Clone)]
pub struct MediaDir {
    root: PathBuf,
}

impl MediaDir {
    /// Opens the directory, deleting uploads an earlier process left
    /// incomplete: they were never acknowledged.
    pub fn open(data_dir: &Path) -> io::Result<MediaDir> {
        let root = data_dir.join("media");
        let incoming = root.join("incoming");
        if incoming.exists() {
            // Uploads of this process may be streaming in (a reload).
            let ours = format!("-{}-", std::process::id());
            for entry in std::fs::read_dir(&incoming)? {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !name.contains(&ours) {
                    tracing::info!(path = %path.display(), "removing an upload that did not complete before the last stop");
                    std::fs::remove_file(&path)?;
                }
            }
        }
        std::fs::create_dir_all(&incoming)?;
        Ok(MediaDir { root })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.root.join(file)
    }

    fn sink_dir(&self, sink: &str) -> PathBuf {
        self.root.join(SINK_DIRS).join(sink)
    }

    /// Streams `body` into a new file under `incoming/`, hashing it, and
    /// fsyncs it. `room(n)` says whether `n` more bytes may be written
    /// without crossing the free-disk floor; it is asked before every
    /// [`ROOM_STEP`] bytes, so an upload of unknown length stops at the
    /// floor, not past it. On any error the partial file is removed.
    pub async fn receive<S, E>(
        &self,
        body: S,
        max: u64,
        room: impl Fn(u64) -> bool,
    ) -> Result<Received, ReceiveError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let path = self.root.join("incoming").join(unique_name());
        let result = write_stream(&path, body, max, room).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        result
    }

    /// Gives each of `sinks` its own link to a received file; returns the
    /// file names in `sinks` order and removes the incoming name.
    pub fn commit(&self, received: &Received, sinks: &[&str]) -> io::Result<Vec<String>> {
        let stem = received
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("upload")
            .to_string();
        let mut names = Vec::new();
        for sink in sinks {
            let dir = self.sink_dir(sink);
            crate::spool::create_dir_durably(&dir)?;
            std::fs::hard_link(&received.path, dir.join(&stem))?;
            crate::spool::sync_dir(&dir)?;
            names.push(format!("{SINK_DIRS}/{sink}/{stem}"));
        }
        std::fs::remove_file(&received.path)?;
        Ok(names)
    }

    /// Links `file` (a dead-lettered object) into `sink`'s directory as
    /// `name` for a replay to upload; returns its file name as a
    /// [`MediaRef`] holds it. A sweep removes it if a crash leaves it.
    pub fn link_in(&self, sink: &str, name: &str, file: &Path) -> io::Result<String> {
        let dir = self.sink_dir(sink);
        crate::spool::create_dir_durably(&dir)?;
        let target = dir.join(name);
        if target.exists() {
            std::fs::remove_file(&target)?;
        }
        std::fs::hard_link(file, &target).or_else(|_| std::fs::copy(file, &target).map(drop))?;
        Ok(format!("{SINK_DIRS}/{sink}/{name}"))
    }

    /// Deletes `sink`'s files that no spool record refers to: left by a
    /// crash between completing a batch and deleting its file, or whose
    /// reference `drop_oldest` removed. A file is linked a moment before
    /// its reference is committed, so only files older than `settle` go.
    pub fn sweep(
        &self,
        sink: &str,
        referenced: &std::collections::HashSet<String>,
        settle: std::time::Duration,
    ) -> io::Result<usize> {
        let mut candidates = Vec::new();
        let dir = self.sink_dir(sink);
        if dir.is_dir() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = format!("{SINK_DIRS}/{sink}/{}", entry.file_name().to_string_lossy());
                candidates.push((name, entry));
            }
        }
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if entry.file_type()?.is_file() && legacy_owner(&name) == Some(sink) {
                candidates.push((name, entry));
            }
        }
        let mut removed = 0;
        for (name, entry) in candidates {
            // ctime, not mtime: linking the file changes the first only.
            let changed = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(entry.metadata()?.ctime().max(0) as u64);
            let settled = changed.elapsed().is_ok_and(|age| age >= settle);
            if !referenced.contains(&name) && settled {
                tracing::warn!(file = %name, sink, "removing a media file no spool record refers to");
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Deletes a file whose object is written (or whose reference was not
    /// committed); a missing file is fine.
    pub fn remove(&self, file: &str) {
        if let Err(e) = std::fs::remove_file(self.root.join(file))
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(file, error = %e, "removing an uploaded media file failed");
        }
    }
}

/// How many bytes of an upload are written between two free-space checks.
pub const ROOM_STEP: u64 = 1024 * 1024;

async fn write_stream<S, E>(
    path: &Path,
    mut body: S,
    max: u64,
    room: impl Fn(u64) -> bool,
) -> Result<Received, ReceiveError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let disk = |source| ReceiveError::Disk {
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::create(path).await.map_err(disk)?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut allowed = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ReceiveError::Body {
            received: size,
            message: e.to_string(),
        })?;
        if size + chunk.len() as u64 > max {
            return Err(ReceiveError::TooLarge { max });
        }
        if size + chunk.len() as u64 > allowed {
            let step = ROOM_STEP.max(chunk.len() as u64);
            if !room(step) {
                return Err(ReceiveError::DiskShort { received: size });
            }
            allowed = size + step;
        }
        size += chunk.len() as u64;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(disk)?;
    }
    file.sync_all().await.map_err(disk)?;
    Ok(Received {
        path: path.to_path_buf(),
        size,
        sha256: hex(&hasher.finalize()),
    })
}

/// Where each sink's links live, below `media/`.
const SINK_DIRS: &str = "sink";

/// The sink of a file in the layout of releases up to 0.1,
/// `<sink>-<ms>-<pid>-<n>`; sink names may contain `-`, the stem never does.
fn legacy_owner(name: &str) -> Option<&str> {
    let mut parts = name.rsplitn(4, '-');
    let stem_is_numeric = parts
        .by_ref()
        .take(3)
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let sink = parts.next()?;
    (stem_is_numeric && !sink.is_empty()).then_some(sink)
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        crate::event::now_ms(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(
        parts: Vec<Result<&'static [u8], &'static str>>,
    ) -> impl Stream<Item = Result<Bytes, &'static str>> + Unpin {
        futures::stream::iter(parts.into_iter().map(|p| p.map(Bytes::from_static)))
    }

    #[tokio::test]
    async fn receive_hashes_and_commit_links_per_sink() {
        let dir = tempfile::tempdir().unwrap();
        let media = MediaDir::open(dir.path()).unwrap();
        let got = media
            .receive(chunks(vec![Ok(b"hello "), Ok(b"world")]), 100, |_| true)
            .await
            .unwrap();
        assert_eq!(got.size, 11);
        assert_eq!(
            got.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        let names = media.commit(&got, &["a", "b"]).unwrap();
        for name in &names {
            assert_eq!(std::fs::read(media.path(name)).unwrap(), b"hello world");
        }
        assert!(!got.path.exists());
        media.remove(&names[0]);
        assert!(!media.path(&names[0]).exists());
        assert!(media.path(&names[1]).exists());
        let settle = std::time::Duration::ZERO;
        let referenced = [names[1].clone()].into_iter().collect();
        assert_eq!(media.sweep("b", &referenced, settle).unwrap(), 0);
        assert_eq!(media.sweep("b", &Default::default(), settle).unwrap(), 1);
        assert!(!media.path(&names[1]).exists());
    }

    #[tokio::test]
    async fn a_sweep_never_touches_a_sink_whose_name_it_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let media = MediaDir::open(dir.path()).unwrap();
        let got = media
            .receive(chunks(vec![Ok(b"frame")]), 100, |_| true)
            .await
            .unwrap();
        let names = media.commit(&got, &["cam", "cam-hd"]).unwrap();
        // Files of the layout of earlier releases, straight under media/.
        let legacy = ["cam-1795496858123-77-0", "cam-hd-1795496858123-77-1"];
        for name in legacy {
            std::fs::write(media.path(name), b"old").unwrap();
        }
        let settle = std::time::Duration::ZERO;
        let cam_refs = [names[0].clone()].into_iter().collect();
        assert_eq!(media.sweep("cam", &cam_refs, settle).unwrap(), 1);
        assert!(!media.path(legacy[0]).exists());
        for kept in [&names[0], &names[1], &legacy[1].to_string()] {
            assert!(media.path(kept).exists(), "{kept} was swept by `cam`");
        }
        assert_eq!(legacy_owner("cam-hd-1-2-3"), Some("cam-hd"));
        assert_eq!(legacy_owner("cam-hd-x-2-3"), None);
        assert_eq!(legacy_owner("1-2-3"), None);
    }

    #[tokio::test]
    async fn an_upload_stops_at_the_free_space_floor() {
        let dir = tempfile::tempdir().unwrap();
        let media = MediaDir::open(dir.path()).unwrap();
        let step = ROOM_STEP as usize;
        let body = futures::stream::iter(
            [vec![1u8; step], vec![2u8; step]].map(|c| Ok::<_, &str>(Bytes::from(c))),
        );
        let asked = std::cell::Cell::new(0);
        let room = |more: u64| {
            assert_eq!(more, ROOM_STEP);
            asked.set(asked.get() + 1);
            asked.get() == 1
        };
        let err = media.receive(body, u64::MAX, room).await.unwrap_err();
        assert!(
            matches!(err, ReceiveError::DiskShort { received } if received == ROOM_STEP),
            "{err}"
        );
        assert!(err.is_retryable());
        let left = std::fs::read_dir(dir.path().join("media/incoming"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "a refused upload leaves no file");
    }

    #[tokio::test]
    async fn broken_or_oversized_uploads_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let media = MediaDir::open(dir.path()).unwrap();
        let err = media
            .receive(
                chunks(vec![Ok(b"part"), Err("connection reset")]),
                100,
                |_| true,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReceiveError::Body { received: 4, .. }),
            "{err}"
        );
        let err = media
            .receive(chunks(vec![Ok(b"0123456789")]), 5, |_| true)
            .await
            .unwrap_err();
        assert!(matches!(err, ReceiveError::TooLarge { .. }));
        let left = std::fs::read_dir(dir.path().join("media/incoming"))
            .unwrap()
            .count();
        assert_eq!(left, 0);
    }
}
