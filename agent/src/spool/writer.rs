//! The spool's writer thread: applies every waiting command, then makes
//! the group durable with one barrier, then answers.

use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

use super::state::SpoolState;
use super::{AppendOutcome, Command, Message, SealResult, Shared, SinkId, SpoolError, watermark};
use crate::event::now_ms;

/// Most commands applied under one flush; bounds reply latency under load.
const MAX_GROUP: usize = 4096;

/// Answers computed while applying a group, sent after its flush.
enum Reply {
    Append(
        oneshot::Sender<Result<AppendOutcome, SpoolError>>,
        Result<AppendOutcome, SpoolError>,
    ),
    Seal(SinkId, oneshot::Sender<SealResult>, SealResult),
    Complete(
        oneshot::Sender<Result<(), SpoolError>>,
        Result<(), SpoolError>,
    ),
}

pub(super) fn writer(
    mut state: SpoolState,
    db: sled::Db,
    db_file: std::fs::File,
    rx: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    mut watermark: watermark::Watermark,
) {
    let mut open = true;
    while open {
        let Ok(first) = rx.recv() else { break };
        let mut replies = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Message::Close => open = false,
                Message::Command(command) => replies.push(apply(&mut state, command)),
            }
            if open && replies.len() < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
        let committed = commit(&mut state, &db, &db_file);
        match &committed {
            Ok(()) => {
                state.remove_doomed();
                watermark.update(state.reached(), !open);
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed (disk full?); nothing more is acknowledged until the spool is reopened");
                shared.storage_failed.cancel();
            }
        }
        publish(&state, &shared);
        for reply in replies {
            send_reply(reply, committed.as_ref().err(), &shared);
        }
    }
}

/// The barrier of one group: chunks and their segment files first, then
/// sled's references to them, each fsynced before the next step.
fn commit(
    state: &mut SpoolState,
    db: &sled::Db,
    db_file: &std::fs::File,
) -> Result<(), sled::Error> {
    match state.write_pending() {
        Ok(()) => {}
        Err(SpoolError::Storage(e)) => return Err(e),
        Err(e) => return Err(sled::Error::Io(std::io::Error::other(e.to_string()))),
    }
    state.sync_segments()?;
    db.flush()?;
    db_file.sync_data()?;
    Ok(())
}

fn apply(state: &mut SpoolState, command: Command) -> Reply {
    match command {
        Command::Append {
            groups,
            marks,
            admission,
            reply,
        } => Reply::Append(reply, state.append(&groups, &marks, admission)),
        Command::Seal {
            sink,
            rule,
            key,
            reply,
        } => Reply::Seal(sink, reply, state.seal(sink, &rule, key, now_ms())),
        Command::Complete { sink, batch, reply } => {
            Reply::Complete(reply, state.complete(sink, &batch))
        }
    }
}

/// Makes the state after a commit visible to readers and wakes waiters.
fn publish(state: &SpoolState, shared: &Shared) {
    let mut freed = false;
    {
        let mut bytes = shared.bytes.lock().expect("lock");
        freed |= state.bytes < *bytes;
        *bytes = state.bytes;
    }
    for (log, s) in state.sinks.iter().zip(&shared.sinks) {
        let mut stats = s.stats.lock().expect("lock");
        let added = log.stats.unsealed_records > stats.unsealed_records;
        *stats = log.stats;
        drop(stats);
        if added {
            s.records_added.notify_one();
        }
    }
    if freed {
        shared.space_freed.notify_waiters();
    }
}

fn send_reply(reply: Reply, flush_error: Option<&sled::Error>, shared: &Shared) {
    match reply {
        Reply::Append(tx, r) => answer(tx, r, flush_error),
        Reply::Seal(sink, tx, r) => {
            // The batch is sealed in memory but not known durable; hand it
            // out again so its records are not stranded until a restart.
            if let (Some(_), Ok(Some((meta, _)))) = (flush_error, &r) {
                shared.sinks[sink]
                    .pending
                    .lock()
                    .expect("lock")
                    .push(meta.clone());
            }
            answer(tx, r, flush_error)
        }
        Reply::Complete(tx, r) => answer(tx, r, flush_error),
    }
}

/// A failed flush fails every answer of its group: nothing in it is known durable.
fn answer<T>(
    tx: oneshot::Sender<Result<T, SpoolError>>,
    r: Result<T, SpoolError>,
    flush_error: Option<&sled::Error>,
) {
    let _ = tx.send(match flush_error {
        Some(e) => Err(SpoolError::Storage(e.clone())),
        None => r,
    });
}
