//! `silt dead-letter list|show|replay`: what went to dead-letter and why,
//! and a way back, for batches a sink's store refused and for batches a
//! transform failed on (`<dead_letter>/*.ndjson`). A replay only leaves a
//! request beside the entry; a running agent picks it up within
//! [`crate::batch::REPLAY_SCAN_EVERY`], a stopped one on its next start.

use std::io::{self, Write};
use std::path::Path;

use super::{BatchDeadLetters, Listed};
use crate::plugin::dead_letter as plugin_files;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterCliError {
    #[error("reading the dead-letter area {dir} failed: {source}")]
    Io { dir: String, source: io::Error },
    #[error("no dead-lettered batch {id}{}; `silt dead-letter list` shows the ids", in_sink(.sink))]
    NotFound { id: String, sink: Option<String> },
    #[error(
        "batch {id} of sink {sink} could not be encoded ({reason}); it holds the events as NDJSON (`silt dead-letter show --body {id}`), not an object to write again"
    )]
    NotReplayable {
        id: String,
        sink: String,
        reason: String,
    },
    #[error("say what to replay: --id ID, or --all")]
    NothingChosen,
}

fn in_sink(sink: &Option<String>) -> String {
    sink.as_ref()
        .map_or_else(String::new, |s| format!(" in sink {s}"))
}

fn io_err(dir: &Path) -> impl Fn(io::Error) -> DeadLetterCliError + '_ {
    move |source| DeadLetterCliError::Io {
        dir: dir.display().to_string(),
        source,
    }
}

/// One line per entry: id, sink, records, reason, state, key.
pub fn list(
    dead_letter_dir: &Path,
    sink: Option<&str>,
    out: &mut dyn Write,
) -> Result<usize, DeadLetterCliError> {
    let entries = BatchDeadLetters::new(dead_letter_dir)
        .list(sink)
        .map_err(io_err(dead_letter_dir))?;
    let line = |l: &Listed| {
        let state = match (l.entry.replayable, l.replay_requested) {
            (false, _) => "kept",
            (true, true) => "replay-requested",
            (true, false) => "waiting",
        };
        format!(
            "{}  {}  {} records  {}  {}  {}",
            l.id, l.entry.sink, l.entry.records, l.entry.reason, state, l.entry.key
        )
    };
    for l in &entries {
        writeln!(out, "{}", line(l)).map_err(io_err(dead_letter_dir))?;
    }
    let files = if sink.is_some() {
        Vec::new()
    } else {
        plugin_files::list(dead_letter_dir).map_err(io_err(dead_letter_dir))?
    };
    for f in &files {
        let state = if f.replay_requested {
            "replay-requested"
        } else {
            "waiting"
        };
        let reason: Vec<&str> = f.header.reason.split_whitespace().collect();
        let reason = crate::sinks::shorten(&reason.join(" "), 80);
        writeln!(
            out,
            "{}  transform:{}  {} events  {reason}  {state}  -",
            f.name, f.header.plugin, f.header.events
        )
        .map_err(io_err(dead_letter_dir))?;
    }
    Ok(entries.len() + files.len())
}

/// The entry as JSON, or with `body` its stored bytes.
pub fn show(
    dead_letter_dir: &Path,
    sink: Option<&str>,
    id: &str,
    body: bool,
    out: &mut dyn Write,
) -> Result<(), DeadLetterCliError> {
    if sink.is_none()
        && let Some(file) = plugin_file(dead_letter_dir, id)?
    {
        let path = dead_letter_dir.join(&file.name);
        let text = std::fs::read(&path).map_err(io_err(dead_letter_dir))?;
        return out.write_all(&text).map_err(io_err(dead_letter_dir));
    }
    let area = BatchDeadLetters::new(dead_letter_dir);
    let found = find(&area, dead_letter_dir, sink, id)?;
    let written = if body {
        let bytes = area
            .body(&found.entry.sink, id)
            .map_err(io_err(dead_letter_dir))?;
        out.write_all(&bytes)
    } else {
        let json = serde_json::to_string_pretty(&found.entry).expect("serialisable");
        writeln!(out, "{json}")
    };
    written.map_err(io_err(dead_letter_dir))
}

/// Which entries a replay is for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Chosen<'a> {
    pub sink: Option<&'a str>,
    pub transform: Option<&'a str>,
    pub id: Option<&'a str>,
    pub all: bool,
}

/// Asks for the chosen entries to be written again (batches) or run through
/// their transform again (plugin files). Returns how many.
pub fn replay(dead_letter_dir: &Path, chosen: Chosen<'_>) -> Result<usize, DeadLetterCliError> {
    if chosen.id.is_none() && !chosen.all {
        return Err(DeadLetterCliError::NothingChosen);
    }
    let mut n = 0;
    if chosen.sink.is_none() {
        let files = plugin_files::list(dead_letter_dir).map_err(io_err(dead_letter_dir))?;
        for f in files {
            let transform_ok = chosen.transform.is_none_or(|t| t == f.header.plugin);
            let id_ok = chosen.id.is_none_or(|id| id == f.name);
            if transform_ok && id_ok {
                plugin_files::request_replay(dead_letter_dir, &f.name)
                    .map_err(io_err(dead_letter_dir))?;
                n += 1;
            }
        }
        if chosen.transform.is_some() || (n > 0 && chosen.id.is_some()) {
            return match (n, chosen.id) {
                (0, Some(id)) => Err(DeadLetterCliError::NotFound {
                    id: id.to_string(),
                    sink: None,
                }),
                _ => Ok(n),
            };
        }
    }
    Ok(n + replay_batches(dead_letter_dir, chosen.sink, chosen.id, chosen.all)?)
}

fn plugin_file(
    dir: &Path,
    name: &str,
) -> Result<Option<plugin_files::ListedFile>, DeadLetterCliError> {
    Ok(plugin_files::list(dir)
        .map_err(io_err(dir))?
        .into_iter()
        .find(|f| f.name == name))
}

fn replay_batches(
    dead_letter_dir: &Path,
    sink: Option<&str>,
    id: Option<&str>,
    all: bool,
) -> Result<usize, DeadLetterCliError> {
    let area = BatchDeadLetters::new(dead_letter_dir);
    let chosen = match (id, all) {
        (Some(id), _) => {
            let found = find(&area, dead_letter_dir, sink, id)?;
            if !found.entry.replayable {
                return Err(DeadLetterCliError::NotReplayable {
                    id: found.id,
                    sink: found.entry.sink,
                    reason: found.entry.reason,
                });
            }
            vec![found]
        }
        (None, true) => area
            .list(sink)
            .map_err(io_err(dead_letter_dir))?
            .into_iter()
            .filter(|l| l.entry.replayable)
            .collect(),
        (None, false) => return Err(DeadLetterCliError::NothingChosen),
    };
    for l in &chosen {
        area.request_replay(&l.entry.sink, &l.id)
            .map_err(io_err(dead_letter_dir))?;
    }
    Ok(chosen.len())
}

fn find(
    area: &BatchDeadLetters,
    dir: &Path,
    sink: Option<&str>,
    id: &str,
) -> Result<Listed, DeadLetterCliError> {
    area.find(sink, id)
        .map_err(io_err(dir))?
        .ok_or_else(|| DeadLetterCliError::NotFound {
            id: id.to_string(),
            sink: sink.map(str::to_string),
        })
}

#[cfg(test)]
mod tests {
    use super::super::Entry;
    use super::*;

    #[test]
    fn list_show_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let area = BatchDeadLetters::new(dir.path());
        let mut entry = Entry {
            sink: "lake".into(),
            key: "lake/a.ndjson".into(),
            reason: "InvalidStorageClass".into(),
            error: "400".into(),
            records: 5,
            bytes: 4,
            first_attempt_ms: 1,
            last_attempt_ms: 1,
            attempts: 1,
            content_type: "application/x-ndjson".into(),
            content_encoding: None,
            metadata: vec![],
            replayable: true,
            sha256: None,
        };
        let id = area.put(&entry, b"body").unwrap();
        entry.key = "lake/b.parquet".into();
        entry.replayable = false;
        let kept = area.put(&entry, b"{}\n").unwrap();

        let mut out = Vec::new();
        assert_eq!(list(dir.path(), None, &mut out).unwrap(), 2);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(&format!(
                "{id}  lake  5 records  InvalidStorageClass  waiting  lake/a.ndjson"
            )),
            "{text}"
        );
        assert!(text.contains("kept"), "{text}");

        let mut out = Vec::new();
        show(dir.path(), None, &id, true, &mut out).unwrap();
        assert_eq!(out, b"body");
        assert!(matches!(
            show(dir.path(), Some("other"), &id, false, &mut Vec::new()),
            Err(DeadLetterCliError::NotFound { .. })
        ));

        let one = |id| Chosen {
            id: Some(id),
            ..Chosen::default()
        };
        assert!(matches!(
            replay(dir.path(), one(&kept)),
            Err(DeadLetterCliError::NotReplayable { .. })
        ));
        assert!(matches!(
            replay(dir.path(), Chosen::default()),
            Err(DeadLetterCliError::NothingChosen)
        ));
        let all_of_lake = Chosen {
            sink: Some("lake"),
            all: true,
            ..Chosen::default()
        };
        assert_eq!(replay(dir.path(), all_of_lake).unwrap(), 1);
        assert_eq!(area.replays("lake").unwrap()[0].id, id);

        // A transform's file is listed, shown and replayed the same way.
        let plugin_dl = crate::plugin::DeadLetter::new(dir.path()).unwrap();
        let events = [crate::event::Event::new(1, "t", &b"{}"[..])];
        let path = plugin_dl
            .write("clean", "trap:  unreachable", &events)
            .unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let mut out = Vec::new();
        assert_eq!(list(dir.path(), None, &mut out).unwrap(), 3);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(&format!(
                "{name}  transform:clean  1 events  trap: unreachable  waiting  -"
            )),
            "{text}"
        );
        let mut out = Vec::new();
        show(dir.path(), None, &name, false, &mut out).unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("{\"dead_letter\"")
        );
        let of_clean = Chosen {
            transform: Some("clean"),
            all: true,
            ..Chosen::default()
        };
        assert_eq!(replay(dir.path(), of_clean).unwrap(), 1);
        assert!(plugin_files::list(dir.path()).unwrap()[0].replay_requested);
    }
}
