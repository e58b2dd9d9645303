//! The committer task: takes what the event loop received, commits each
//! group to the spool with its redelivery marks, then acks it.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::COMMIT_GROUP;
use super::link::{Ack, Message};
use super::redelivery::{self, Redelivery};
use crate::event::now_ms;
use crate::spool::SpoolError;
use crate::transform::{Ingest, IngestError};

/// What the event loop hands the committer, in the order it happened.
pub(super) enum Incoming {
    /// A message with its share of the in-flight byte budget, given back
    /// once it is acked.
    Message(Message, OwnedSemaphorePermit),
    /// The broker answered a connect with no session for us. The event
    /// loop subscribes only after `forgotten` fires: the marks of the old
    /// session are then durably gone, and every earlier group is acked.
    NewSession { forgotten: oneshot::Sender<()> },
}

pub(super) struct Committer {
    pub source: String,
    pub topic_fields: Vec<String>,
    pub ingest: Ingest,
    /// To the connection task, which owns the connection the acks go on.
    pub acks: mpsc::UnboundedSender<Vec<Ack>>,
    pub stop: CancellationToken,
}

impl Committer {
    /// Runs until the event loop closes `rx`, or until `stop` while the
    /// spool cannot take a group; then fires `done`.
    pub async fn run(self, mut rx: mpsc::Receiver<Incoming>, done: CancellationToken) {
        let mut received = Vec::with_capacity(COMMIT_GROUP);
        let mut group = Vec::with_capacity(COMMIT_GROUP);
        let mut held = Vec::with_capacity(COMMIT_GROUP);
        let mut redelivery = self.load_marks();
        'recv: while rx.recv_many(&mut received, COMMIT_GROUP).await > 0 {
            for incoming in received.drain(..) {
                match incoming {
                    Incoming::Message(message, bytes) => {
                        group.push(message);
                        held.push(bytes);
                    }
                    Incoming::NewSession { forgotten } => {
                        if !self.commit_group(&mut redelivery, &mut group).await
                            || !self.forget(&mut redelivery).await
                        {
                            break 'recv;
                        }
                        held.clear();
                        let _ = forgotten.send(());
                    }
                }
            }
            if !self.commit_group(&mut redelivery, &mut group).await {
                break;
            }
            held.clear();
        }
        done.cancel();
    }

    /// The redelivery marks a previous run committed. Without them a
    /// redelivery would be stored twice, never lost, so a spool that cannot
    /// be read here is logged and the source goes on.
    fn load_marks(&self) -> Redelivery {
        let source = &self.source;
        let read = |tree: String| {
            self.ingest.marks(&tree).unwrap_or_else(|e| {
                tracing::error!(source, tree, error = %e, "cannot read mqtt redelivery marks; redeliveries of messages committed before the restart may be stored twice");
                Vec::new()
            })
        };
        Redelivery::new(
            source,
            read(redelivery::page_tree(source)),
            read(redelivery::legacy_tree(source)),
        )
    }

    /// Commits and acks `group`, leaving it empty, in parts the spool can
    /// take. False when `stop` came while the spool could not take a part:
    /// that part and the rest were neither stored nor acked.
    async fn commit_group(&self, redelivery: &mut Redelivery, group: &mut Vec<Message>) -> bool {
        let cap = self.ingest.commit_bytes_cap();
        while !group.is_empty() {
            let mut bytes = 0;
            let n = group
                .iter()
                .take_while(|p| {
                    bytes += p.payload.len() + p.topic.len();
                    bytes <= cap
                })
                .count()
                .max(1);
            let part: Vec<Message> = group.drain(..n).collect();
            if !self.commit_part(redelivery, &part).await {
                tracing::warn!(
                    source = self.source,
                    messages = part.len() + group.len(),
                    "stopping with mqtt messages the spool did not take; left unacked with the broker"
                );
                group.clear();
                return false;
            }
        }
        true
    }

    /// Commits `part` with its redelivery marks, then acks it.
    async fn commit_part(&self, redelivery: &mut Redelivery, part: &[Message]) -> bool {
        let source = self.source.as_str();
        let filtered = redelivery.filter(part, now_ms());
        if filtered.redelivered > 0 {
            tracing::info!(
                source,
                messages = filtered.redelivered,
                "mqtt redeliveries of messages already committed; acked, not stored again"
            );
        }
        let mut events = filtered.events;
        for event in &mut events {
            // The operator's topic_fields win over a publisher's properties.
            let from_topic = topic_attributes(&self.topic_fields, &event.topic);
            event
                .attributes
                .retain(|(name, _)| from_topic.iter().all(|(n, _)| n != name));
            event.attributes.extend(from_topic);
        }
        let marks = filtered.marks;
        let committed = self
            .retry(|| {
                let (events, marks) = (events.clone(), marks.clone());
                async move {
                    self.ingest
                        .ingest_marked(source, events, marks)
                        .await
                        .map(drop)
                }
            })
            .await;
        if !committed {
            return false;
        }
        if let (Some(first), Some(last)) = (part.first(), part.last()) {
            tracing::debug!(
                source,
                messages = part.len(),
                first_pkid = first.pkid,
                last_pkid = last.pkid,
                "mqtt group committed; acking"
            );
        }
        let acks: Vec<Ack> = part.iter().filter_map(Message::ack).collect();
        if !acks.is_empty() && self.acks.send(acks).is_err() {
            tracing::warn!(
                source,
                "mqtt acks not sent: the connection has stopped; the broker will redeliver"
            );
        }
        true
    }

    /// Durably removes every redelivery mark (see [`Redelivery::forget_all`]).
    async fn forget(&self, redelivery: &mut Redelivery) -> bool {
        let marks = redelivery.forget_all();
        if marks.is_empty() {
            return true;
        }
        let pages = marks.len();
        let forgotten = self
            .retry(|| async {
                self.ingest
                    .store_marks(marks.clone())
                    .await
                    .map_err(IngestError::from)
            })
            .await;
        if forgotten {
            tracing::info!(
                source = self.source,
                pages,
                "the broker holds no session for this client (new, expired or lost): redelivery marks of the old session removed before subscribing"
            );
        }
        forgotten
    }

    /// Runs `attempt` until it succeeds, waiting out a full spool or a
    /// failing disk: the broker keeps unacked messages meanwhile. False when
    /// `stop` came first.
    async fn retry<F, Fut>(&self, mut attempt: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), IngestError>>,
    {
        let (source, ingest, stop) = (self.source.as_str(), &self.ingest, &self.stop);
        let mut waited = false;
        loop {
            if waited && stop.is_cancelled() {
                return false;
            }
            match attempt().await {
                Ok(()) => {
                    if waited {
                        tracing::info!(source, "spool accepts events again; mqtt acks resume");
                    }
                    return true;
                }
                Err(IngestError::Spool(SpoolError::Full)) => {
                    if !waited {
                        tracing::warn!(
                            source,
                            "spool full: holding mqtt acks, the broker keeps the messages"
                        );
                    }
                    tokio::select! {
                        _ = ingest.space_freed(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(source, error = %e, "cannot commit mqtt messages; retrying in 1s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
            waited = true;
        }
    }
}

/// Attributes named by `topic_fields` from the topic's segments, in order.
fn topic_attributes(topic_fields: &[String], topic: &str) -> Vec<(String, String)> {
    topic_fields
        .iter()
        .zip(topic.split('/'))
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, segment)| (name.clone(), segment.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_fields_name_segments() {
        let fields = ["site".to_string(), "".to_string(), "metric".to_string()];
        assert_eq!(
            topic_attributes(&fields, "plant-1/pump-7/temp/extra"),
            [
                ("site".to_string(), "plant-1".to_string()),
                ("metric".to_string(), "temp".to_string())
            ]
        );
        assert_eq!(topic_attributes(&fields, "plant-1").len(), 1);
    }
}
