//! Batches a plugin could not transform, kept for inspection and replay.
//!
//! One file per failed batch, `<dir>/<unix ms>-<plugin>-<pid>-<seq>.ndjson`
//! (names sort by time). Line 1 is a header,
//! `{"dead_letter":{"plugin":"dedup","reason":"...","at_ms":1700000000000,"events":3}}`,
//! then one event per line in the format described in `ndjson.rs`:
//! `{"ts_ms":..,"topic":"..","attributes":{..},"payload":<JSON>}` or
//! `"payload_b64":".."` for payloads that are not JSON. The header is
//! skipped by `silt plugin test --input`, so a file can be replayed as is.
//!
//! Files appear atomically (written aside, fsynced, renamed, directory
//! fsynced): after `write` returns, the batch survives a power cut.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::ndjson;
use crate::event::{Event, now_ms};

pub struct DeadLetter {
    dir: PathBuf,
    /// Keeps names unique when one plugin fails twice in a millisecond.
    seq: AtomicU64,
}

impl DeadLetter {
    /// Use (and create if needed) `dir` for dead-letter files.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create dead-letter directory {}: {e}", dir.display()),
            )
        })?;
        Ok(DeadLetter {
            dir,
            seq: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write `events` with the failing `plugin` and `reason`; returns the
    /// new file's path once it is durable.
    pub fn write(&self, plugin: &str, reason: &str, events: &[Event]) -> io::Result<PathBuf> {
        let at_ms = now_ms();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{at_ms}-{}-{}-{seq}.ndjson",
            file_safe(plugin),
            std::process::id()
        );
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));

        let result = (|| {
            let mut out = BufWriter::new(File::create(&tmp)?);
            let header = serde_json::json!({"dead_letter": {
                "plugin": plugin, "reason": reason, "at_ms": at_ms, "events": events.len(),
            }});
            serde_json::to_writer(&mut out, &header)?;
            out.write_all(b"\n")?;
            for event in events {
                ndjson::write_event(&mut out, event)?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot write dead-letter file {}: {e}", path.display()),
            ));
        }
        Ok(path)
    }
}

/// The header line of a plugin dead-letter file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Header {
    pub plugin: String,
    pub reason: String,
    pub at_ms: i64,
    pub events: u64,
}

#[derive(serde::Deserialize)]
struct HeaderLine {
    dead_letter: Header,
}

/// A file as listed: its name, header, and whether a replay is asked for.
#[derive(Debug, Clone)]
pub struct ListedFile {
    pub name: String,
    pub header: Header,
    pub replay_requested: bool,
}

const SUFFIX: &str = ".ndjson";
const REPLAY_SUFFIX: &str = ".replay";

/// The complete dead-letter files in `dir`, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<ListedFile>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !name.ends_with(SUFFIX) {
            continue;
        }
        let header = read_header(&dir.join(&name))?;
        out.push(ListedFile {
            replay_requested: dir.join(format!("{name}{REPLAY_SUFFIX}")).exists(),
            name,
            header,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn read_header(path: &Path) -> io::Result<Header> {
    use std::io::BufRead;
    let mut first = String::new();
    io::BufReader::new(File::open(path)?).read_line(&mut first)?;
    serde_json::from_str::<HeaderLine>(&first)
        .map(|h| h.dead_letter)
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a dead-letter file: {e}", path.display()),
            )
        })
}

/// The events of file `name` in `dir`.
pub fn read_events(dir: &Path, name: &str) -> io::Result<Vec<Event>> {
    let text = fs::read_to_string(dir.join(name))?;
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let parsed = ndjson::parse_line(line, 0).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} line {}: {e}", n + 1),
            )
        })?;
        events.extend(parsed);
    }
    Ok(events)
}

/// Asks the running (or next) agent to run file `name` through its
/// transform again.
pub fn request_replay(dir: &Path, name: &str) -> io::Result<()> {
    let marker = dir.join(format!("{name}{REPLAY_SUFFIX}"));
    File::create(&marker)?.sync_all()?;
    File::open(dir)?.sync_all()
}

/// Removes file `name` and its replay request once its events are stored
/// (or in a newer dead-letter file).
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    for path in [dir.join(name), dir.join(format!("{name}{REPLAY_SUFFIX}"))] {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    File::open(dir)?.sync_all()
}

fn file_safe(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "plugin".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_read_and_replay_requests() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path()).unwrap();
        let events = vec![
            Event::new(5, "a", &br#"{"x":1}"#[..]),
            Event::new(6, "b", &b"\xff"[..]),
        ];
        let path = dl.write("my plugin", "trap", &events).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let listed = list(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].header.plugin, "my plugin");
        assert_eq!(listed[0].header.events, 2);
        assert!(!listed[0].replay_requested);
        let back = read_events(dir.path(), &name).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].payload.as_ref(), b"\xff");
        assert_eq!(back[0].ts_ms, 5);
        request_replay(dir.path(), &name).unwrap();
        assert!(list(dir.path()).unwrap()[0].replay_requested);
        remove(dir.path(), &name).unwrap();
        assert!(list(dir.path()).unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn writes_header_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path().join("dl")).unwrap();
        let events = vec![
            Event::new(1, "a", &br#"{"x":1}"#[..]),
            Event::new(2, "b", &b"\x00\x01"[..]),
        ];
        let p1 = dl.write("json/clean", "trap: boom", &events).unwrap();
        let p2 = dl.write("json/clean", "again", &[]).unwrap();
        assert_ne!(p1, p2);
        assert!(
            p1.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .contains("-json_clean-")
        );

        let text = fs::read_to_string(&p1).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let header: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(header["dead_letter"]["plugin"], "json/clean");
        assert_eq!(header["dead_letter"]["reason"], "trap: boom");
        assert_eq!(header["dead_letter"]["events"], 2);
        let parsed: Vec<Event> = lines
            .iter()
            .filter_map(|l| ndjson::parse_line(l, 0).unwrap())
            .collect();
        assert_eq!(parsed, events);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dl.dir()).unwrap().count(), 2);
    }
}
