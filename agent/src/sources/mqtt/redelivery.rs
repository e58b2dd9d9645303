//! Recognising QoS 1 redeliveries of messages silt already committed.
//!
//! If silt dies after committing a message but before its PUBACK reached the
//! broker, the broker sends it again (DUP set, same packet id) on the next
//! session. Each committed QoS 1 message leaves a mark, packet id -> digest
//! of topic and payload, stored in the same spool append as the event. A DUP
//! message whose mark matches is acked without being stored twice.
//!
//! A packet id is reused by the broker only after our PUBACK for it arrived,
//! and the new message overwrites the mark when it is committed. The one
//! blind spot: the same topic and payload sent again under the same packet
//! id, and silt dying between receiving and committing it, would be taken
//! for a redelivery of the first.

use std::collections::HashMap;

use rumqttc::{Publish, QoS};
use sha2::{Digest, Sha256};

use crate::event::Event;
use crate::spool::Mark;

pub(super) struct Redelivery {
    tree: String,
}

/// What to store for one group of publishes.
#[derive(Debug, Default)]
pub(super) struct Filtered {
    pub events: Vec<Event>,
    pub marks: Vec<Mark>,
    /// Redeliveries of committed messages: ack, don't store.
    pub redelivered: usize,
}

fn digest(publish: &Publish) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update((publish.topic.len() as u64).to_le_bytes());
    h.update(publish.topic.as_bytes());
    h.update(&publish.payload);
    h.finalize()[..16].to_vec()
}

impl Redelivery {
    pub fn new(source: &str) -> Redelivery {
        Redelivery {
            tree: format!("mqtt-inflight/{source}"),
        }
    }

    pub fn tree(&self) -> &str {
        &self.tree
    }

    /// `committed` looks up the stored mark of a packet id.
    pub fn filter(
        &self,
        group: &[Publish],
        ts_ms: i64,
        committed: impl Fn(&[u8]) -> Option<Vec<u8>>,
    ) -> Filtered {
        let mut out = Filtered::default();
        // The original and its redelivery may arrive in one group.
        let mut in_group: HashMap<u16, Vec<u8>> = HashMap::new();
        for publish in group {
            if publish.qos == QoS::AtLeastOnce {
                let key = publish.pkid.to_be_bytes();
                let digest = digest(publish);
                let seen = in_group
                    .get(&publish.pkid)
                    .cloned()
                    .or_else(|| committed(&key));
                if publish.dup && seen.as_deref() == Some(digest.as_slice()) {
                    out.redelivered += 1;
                    continue;
                }
                in_group.insert(publish.pkid, digest.clone());
                out.marks.push(Mark {
                    tree: self.tree.clone(),
                    key: key.to_vec(),
                    value: digest,
                });
            }
            out.events.push(Event::new(
                ts_ms,
                publish.topic.clone(),
                publish.payload.clone(),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16, dup: bool, payload: &str) -> Publish {
        let mut p = Publish::new("sensors/a", QoS::AtLeastOnce, payload.as_bytes().to_vec());
        p.pkid = pkid;
        p.dup = dup;
        p
    }

    fn stored(filtered: &Filtered) -> HashMap<Vec<u8>, Vec<u8>> {
        filtered
            .marks
            .iter()
            .map(|m| (m.key.clone(), m.value.clone()))
            .collect()
    }

    #[test]
    fn redelivery_of_a_committed_message_is_not_stored_again() {
        let r = Redelivery::new("s");
        let first = r.filter(&[publish(7, false, "a"), publish(8, false, "b")], 1, |_| {
            None
        });
        assert_eq!((first.events.len(), first.redelivered), (2, 0));
        let marks = stored(&first);
        let again = r.filter(&[publish(7, true, "a"), publish(9, false, "c")], 2, |k| {
            marks.get(k).cloned()
        });
        assert_eq!(again.redelivered, 1);
        assert_eq!(again.events.len(), 1);
        assert_eq!(again.events[0].payload.as_ref(), b"c");
    }

    #[test]
    fn dup_of_something_never_committed_is_stored() {
        let r = Redelivery::new("s");
        let marks = stored(&r.filter(&[publish(7, false, "old")], 1, |_| None));
        let out = r.filter(&[publish(7, true, "new")], 2, |k| marks.get(k).cloned());
        assert_eq!((out.events.len(), out.redelivered), (1, 0));
    }

    #[test]
    fn original_and_redelivery_in_one_group_store_once() {
        let r = Redelivery::new("s");
        let out = r.filter(&[publish(3, false, "x"), publish(3, true, "x")], 1, |_| {
            None
        });
        assert_eq!((out.events.len(), out.redelivered), (1, 1));
    }

    #[test]
    fn qos0_is_passed_through_without_marks() {
        let r = Redelivery::new("s");
        let mut p = publish(0, false, "q0");
        p.qos = QoS::AtMostOnce;
        let out = r.filter(&[p], 1, |_| None);
        assert_eq!((out.events.len(), out.marks.len()), (1, 0));
    }
}
