//! Append-only segment files that hold one sink's chunks.
//!
//! sled keeps only a small [`ChunkRef`] per chunk. Measured on this
//! project's workload, chunk values stored in sled itself cost 3.5–8 bytes
//! written per byte (every leaf is rewritten after ten changes and again
//! when it splits); here each byte is written once. A segment is deleted
//! when no reference into it is left, after the commit that dropped the
//! last one is durable.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::chunk::ChunkRef;

/// A segment is closed once it holds this much; a chunk never spans two.
const SEGMENT_TARGET: u64 = 4 << 20;

struct Active {
    id: u64,
    file: File,
    len: u64,
}

pub(super) struct Segments {
    dir: PathBuf,
    active: Option<Active>,
    next_id: u64,
    /// References alive per segment.
    live: HashMap<u64, u64>,
    /// Written since the last sync.
    dirty: bool,
    /// A file was created in `dir` since the last sync.
    created: bool,
    /// Unreferenced segments, deleted once that is durable.
    doomed: Vec<u64>,
}

fn file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

fn parse_name(name: &str) -> Option<u64> {
    u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
}

/// Fsyncs a directory, so the files created or renamed in it survive a
/// power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) and makes the new entries durable.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durably(parent)?;
    }
    std::fs::create_dir(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Reads one stored chunk.
pub(super) fn read(dir: &Path, r: &ChunkRef) -> io::Result<Vec<u8>> {
    let file = File::open(dir.join(file_name(r.segment)))?;
    let mut buf = vec![0; r.len as usize];
    file.read_exact_at(&mut buf, r.offset)?;
    Ok(buf)
}

impl Segments {
    /// Opens the segments under `dir`; `live` counts the references sled
    /// holds. Segments nothing refers to (written by a commit that never
    /// completed, or whose deletion a crash undid) are removed.
    pub fn open(dir: &Path, live: HashMap<u64, u64>) -> io::Result<Segments> {
        create_dir_durably(dir)?;
        let mut next_id = live.keys().max().map_or(0, |m| m + 1);
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().and_then(parse_name) else {
                continue;
            };
            next_id = next_id.max(id + 1);
            if !live.contains_key(&id) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Segments {
            dir: dir.to_path_buf(),
            active: None,
            next_id,
            live,
            dirty: false,
            created: false,
            doomed: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a chunk; returns its segment and offset. Durable only after
    /// [`Segments::sync`].
    pub fn append(&mut self, chunk: &[u8]) -> io::Result<(u64, u64)> {
        if self.active.as_ref().is_none_or(|a| a.len >= SEGMENT_TARGET) {
            self.roll()?;
        }
        let active = self.active.as_mut().expect("rolled above");
        active.file.write_all(chunk)?;
        let at = active.len;
        active.len += chunk.len() as u64;
        self.dirty = true;
        Ok((active.id, at))
    }

    /// Starts a new segment file. A new one after every open: the tail of
    /// a segment written before a crash may be torn.
    fn roll(&mut self) -> io::Result<()> {
        if let Some(old) = self.active.take() {
            if self.dirty {
                old.file.sync_data()?;
            }
            if self.live.get(&old.id).copied().unwrap_or(0) == 0 {
                self.doomed.push(old.id);
            }
        }
        let id = self.next_id;
        let file = File::options()
            .append(true)
            .create_new(true)
            .open(self.dir.join(file_name(id)))?;
        self.next_id += 1;
        self.created = true;
        self.active = Some(Active { id, file, len: 0 });
        Ok(())
    }

    pub fn add_ref(&mut self, segment: u64) {
        *self.live.entry(segment).or_default() += 1;
    }

    pub fn drop_ref(&mut self, segment: u64) {
        let Some(n) = self.live.get_mut(&segment) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.live.remove(&segment);
            if self.active.as_ref().is_none_or(|a| a.id != segment) {
                self.doomed.push(segment);
            }
        }
    }

    /// Makes everything appended durable (data, and new file names).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty
            && let Some(active) = &self.active
        {
            active.file.sync_data()?;
        }
        self.dirty = false;
        if self.created {
            sync_dir(&self.dir)?;
            self.created = false;
        }
        Ok(())
    }

    /// Deletes segments left unreferenced by a commit that is now durable.
    /// A deletion lost to a crash leaves a file that [`Segments::open`] removes.
    pub fn remove_doomed(&mut self) {
        for id in self.doomed.drain(..) {
            let path = self.dir.join(file_name(id));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool segment nothing refers to; it is removed at the next start");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_ref(segment: u64, offset: u64, len: usize) -> ChunkRef {
        ChunkRef {
            segment,
            offset,
            len: len as u32,
            skip: 0,
            count: 1,
            bytes: len as u64,
            first_ts: 0,
        }
    }

    #[test]
    fn appends_read_back_and_unreferenced_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("chunks/a");
        let mut s = Segments::open(&root, HashMap::new()).unwrap();
        let (seg, at) = s.append(b"hello").unwrap();
        s.add_ref(seg);
        let (seg2, at2) = s.append(b"world!").unwrap();
        s.add_ref(seg2);
        s.sync().unwrap();
        assert_eq!((seg, at, seg2, at2), (0, 0, 0, 5));
        assert_eq!(read(&root, &chunk_ref(seg2, at2, 6)).unwrap(), b"world!");
        s.drop_ref(0);
        s.drop_ref(0);
        s.remove_doomed();
        assert!(root.join(file_name(0)).exists(), "the active segment stays");
        drop(s);
        // Reopened with no references: the segment is an orphan.
        let s = Segments::open(&root, HashMap::new()).unwrap();
        assert!(!root.join(file_name(0)).exists());
        assert_eq!(s.next_id, 1, "ids never go back");
    }
}
