//! Batches a sink can never write as they are, kept whole and durably under
//! `<dead_letter>/batches/<sink>/` so the sink goes on and nothing is lost:
//! `<id>.object` holds the encoded object (the bytes a retry would send),
//! `<id>.json` what failed ([`Entry`]), and `<id>.replay`, once an operator
//! asked for it, tells the sink's batcher to write the object again under
//! its own key (a conditional create, so a replay never writes twice).
//!
//! The batcher writes and replays entries ([`crate::batch`]); `silt
//! dead-letter list|show|replay` ([`cli`]) reads them and asks for replays,
//! whether the agent runs or not.

pub mod cli;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::spool::{create_dir_durably, sync_dir};

/// What is known of one dead-lettered batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub sink: String,
    pub key: String,
    /// The S3 error code (`InvalidStorageClass`, ...) or another short class.
    pub reason: String,
    /// The error text of the last attempt, shortened.
    pub error: String,
    pub records: u64,
    pub bytes: u64,
    pub first_attempt_ms: i64,
    pub last_attempt_ms: i64,
    pub attempts: u32,
    pub content_type: String,
    #[serde(default)]
    pub content_encoding: Option<String>,
    #[serde(default)]
    pub metadata: Vec<(String, String)>,
    /// False when the object could not even be encoded: the file then holds
    /// the batch's events as NDJSON for a person to look at, not an object.
    pub replayable: bool,
    /// Set for a media object (a raw sink's file, kept as a hard link): its
    /// content hash, which the upload records and checks.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// One entry as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub entry: Entry,
    pub replay_requested: bool,
}

/// The batch dead-letter area of one agent.
#[derive(Debug, Clone)]
pub struct BatchDeadLetters {
    root: PathBuf,
}

const ENTRY: &str = "json";
const OBJECT: &str = "object";
const REPLAY: &str = "replay";

impl BatchDeadLetters {
    /// The area below `dead_letter_dir` (`agent.dead_letter`).
    pub fn new(dead_letter_dir: &Path) -> BatchDeadLetters {
        BatchDeadLetters {
            root: dead_letter_dir.join("batches"),
        }
    }

    /// The id of the batch written under `key`: the same batch always gets
    /// the same id, so dead-lettering it again after a crash replaces the
    /// entry with the same bytes instead of adding one.
    pub fn id_of(key: &str) -> String {
        crate::media::hex(&sha2::Sha256::digest(key.as_bytes())[..8])
    }

    fn path(&self, sink: &str, id: &str, ext: &str) -> PathBuf {
        self.root.join(sink).join(format!("{id}.{ext}"))
    }

    /// Stores `body` and `entry` durably (object first: an entry is listed
    /// only once its object is on disk). Returns the entry's id.
    pub fn put(&self, entry: &Entry, body: &[u8]) -> io::Result<String> {
        let dir = self.root.join(&entry.sink);
        create_dir_durably(&self.root)?;
        create_dir_durably(&dir)?;
        let id = Self::id_of(&entry.key);
        write_durably(&self.path(&entry.sink, &id, OBJECT), body)?;
        self.write_entry(&id, entry)?;
        Ok(id)
    }

    /// [`Self::put`] for a media file: the object is a hard link to `file`
    /// (a copy, fsynced, when the dead-letter directory is on another
    /// filesystem), so gigabytes are not read into memory.
    pub fn put_file(&self, entry: &Entry, file: &Path) -> io::Result<String> {
        let dir = self.root.join(&entry.sink);
        create_dir_durably(&self.root)?;
        create_dir_durably(&dir)?;
        let id = Self::id_of(&entry.key);
        let object = self.object_path(&entry.sink, &id);
        remove_if_there(&object)?;
        if fs::hard_link(file, &object).is_err() {
            fs::copy(file, &object)?;
            fs::File::open(&object)?.sync_all()?;
        }
        sync_dir(&dir)?;
        self.write_entry(&id, entry)?;
        Ok(id)
    }

    /// Where entry `id`'s object is.
    pub fn object_path(&self, sink: &str, id: &str) -> PathBuf {
        self.path(sink, id, OBJECT)
    }

    fn write_entry(&self, id: &str, entry: &Entry) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(entry).expect("serialisable");
        write_durably(&self.path(&entry.sink, id, ENTRY), &json)
    }

    /// Every entry (of `sink` when given), oldest first.
    pub fn list(&self, sink: Option<&str>) -> io::Result<Vec<Listed>> {
        let mut out = Vec::new();
        let sinks = match sink {
            Some(s) => vec![s.to_string()],
            None => names_in(&self.root)?,
        };
        for sink in sinks {
            let dir = self.root.join(&sink);
            for file in names_in(&dir)? {
                let Some(id) = file.strip_suffix(".json") else {
                    continue;
                };
                let entry: Entry = serde_json::from_slice(&fs::read(dir.join(&file))?)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                out.push(Listed {
                    id: id.to_string(),
                    replay_requested: self.path(&sink, id, REPLAY).exists(),
                    entry,
                });
            }
        }
        out.sort_by_key(|l| (l.entry.first_attempt_ms, l.id.clone()));
        Ok(out)
    }

    /// The entry `id` (of `sink` when given: ids are unique per sink).
    pub fn find(&self, sink: Option<&str>, id: &str) -> io::Result<Option<Listed>> {
        Ok(self.list(sink)?.into_iter().find(|l| l.id == id))
    }

    pub fn body(&self, sink: &str, id: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(sink, id, OBJECT))
    }

    /// Asks the sink's batcher to write entry `id` again.
    pub fn request_replay(&self, sink: &str, id: &str) -> io::Result<()> {
        write_durably(&self.path(sink, id, REPLAY), b"")
    }

    /// Entries of `sink` an operator asked to replay.
    pub fn replays(&self, sink: &str) -> io::Result<Vec<Listed>> {
        Ok(self
            .list(Some(sink))?
            .into_iter()
            .filter(|l| l.replay_requested)
            .collect())
    }

    /// A replay failed for good again: the entry records it and waits for
    /// the next request.
    pub fn replay_failed(&self, id: &str, entry: &Entry) -> io::Result<()> {
        self.write_entry(id, entry)?;
        remove_if_there(&self.path(&entry.sink, id, REPLAY))?;
        sync_dir(&self.root.join(&entry.sink))
    }

    /// Deletes entry `id` once its object is written (entry first, so a
    /// crash midway leaves at most an unlisted object file, which the next
    /// [`Self::put`] of the same key or a removal replaces).
    pub fn remove(&self, sink: &str, id: &str) -> io::Result<()> {
        for ext in [ENTRY, OBJECT, REPLAY] {
            remove_if_there(&self.path(sink, id, ext))?;
        }
        sync_dir(&self.root.join(sink))
    }
}

fn names_in(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                names.push(e?.file_name().to_string_lossy().to_string());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    names.sort();
    Ok(names)
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `path` through a temporary file, fsynced, renamed, and the
/// directory fsynced: after a power cut the file is whole or absent.
fn write_durably(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().expect("a file in a directory");
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sink: &str, key: &str, at: i64) -> Entry {
        Entry {
            sink: sink.into(),
            key: key.into(),
            reason: "InvalidStorageClass".into(),
            error: "400".into(),
            records: 5,
            bytes: 3,
            first_attempt_ms: at,
            last_attempt_ms: at,
            attempts: 1,
            content_type: "application/x-ndjson".into(),
            content_encoding: Some("gzip".into()),
            metadata: vec![("site".into(), "p1".into())],
            replayable: true,
            sha256: None,
        }
    }

    #[test]
    fn put_list_replay_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let dl = BatchDeadLetters::new(dir.path());
        assert!(dl.list(None).unwrap().is_empty());
        let a = dl.put(&entry("lake", "k/2", 20), b"two").unwrap();
        let b = dl.put(&entry("lake", "k/1", 10), b"one").unwrap();
        let c = dl.put(&entry("other", "k/1", 30), b"x").unwrap();
        assert_eq!(b, c, "the id depends on the key only");
        assert_eq!(dl.put(&entry("lake", "k/2", 20), b"two").unwrap(), a);
        let listed = dl.list(None).unwrap();
        let keys: Vec<_> = listed.iter().map(|l| l.entry.key.as_str()).collect();
        assert_eq!(keys, ["k/1", "k/2", "k/1"], "oldest first");
        assert_eq!(dl.list(Some("lake")).unwrap().len(), 2);
        assert_eq!(dl.body("lake", &a).unwrap(), b"two");

        assert!(dl.replays("lake").unwrap().is_empty());
        dl.request_replay("lake", &a).unwrap();
        let replays = dl.replays("lake").unwrap();
        assert_eq!(replays.len(), 1);
        assert_eq!(replays[0].entry, entry("lake", "k/2", 20));

        let mut again = replays[0].entry.clone();
        again.attempts += 1;
        dl.replay_failed(&a, &again).unwrap();
        assert!(dl.replays("lake").unwrap().is_empty());
        assert_eq!(
            dl.find(Some("lake"), &a).unwrap().unwrap().entry.attempts,
            2
        );

        let media = dir.path().join("clip.mp4");
        std::fs::write(&media, b"frames").unwrap();
        let mut clip = entry("media", "media/clip.mp4", 40);
        clip.sha256 = Some("ab".into());
        let id = dl.put_file(&clip, &media).unwrap();
        assert_eq!(
            std::fs::read(dl.object_path("media", &id)).unwrap(),
            b"frames"
        );
        assert_eq!(dl.find(Some("media"), &id).unwrap().unwrap().entry, clip);

        dl.remove("lake", &a).unwrap();
        assert_eq!(dl.list(Some("lake")).unwrap().len(), 1);
        let left: Vec<_> = names_in(&dir.path().join("batches/lake")).unwrap();
        assert_eq!(left.len(), 2, "one entry, one object: {left:?}");
    }
}
