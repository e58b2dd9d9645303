//! Recognising QoS 1 redeliveries of messages silt already committed.
//!
//! If silt dies after committing a message but before its PUBACK reached the
//! broker, the broker sends it again (DUP set, same packet id) on the next
//! session. Each committed QoS 1 message leaves a mark, packet id -> digest
//! of topic and payload, stored in the same spool append as the event. A DUP
//! message whose mark matches is acked without being stored twice.
//!
//! Marks live in pages of 64 packet ids, one sled value each, written whole
//! when one of their ids changes: a group of messages costs a few sled
//! writes, not one per message (one key per message was half of the MQTT
//! path's disk writes). All 1,024 pages of a source fit in 512 KiB and are
//! held in memory, so filtering reads nothing from disk.
//!
//! A mark is only meaningful within the broker session it was committed in.
//! When the broker answers a connect with `session_present = 0` (it
//! restarted without persistence, or expired or lost the session) it holds
//! nothing in flight for us and numbers packets from 1 again, so every mark
//! would only ever match a *new* message that happens to repeat an old one
//! (a sensor sending `{"door":"open"}` twice). The source then removes all
//! marks, durably, before it subscribes again ([`Redelivery::forget_all`]).
//!
//! What QoS 1 cannot tell apart, and this does not either: within one broker
//! session, the broker reuses a packet id as soon as our PUBACK for it
//! arrived; if the new message has the same topic and payload and silt dies
//! between receiving and committing it, its redelivery looks exactly like a
//! redelivery of the first and is acked without being stored. mosquitto
//! numbers packets in sequence, so that takes 65,535 other deliveries in
//! between; a broker that hands out the lowest free id narrows it to one
//! crash window per repeated payload. The same holds for a crash in the
//! milliseconds between a new session's CONNACK and the commit removing the
//! old marks. Closing it needs the PUBCOMP of QoS 2 held until the mark is
//! gone, which the MQTT client does not offer.

use std::collections::{BTreeSet, HashMap};

use rumqttc::QoS;
use sha2::{Digest, Sha256};

use crate::event::Event;
use crate::spool::Mark;

use super::link::Message;

const PAGE_IDS: usize = 64;
const DIGEST_LEN: usize = 8;
const PAGE_LEN: usize = PAGE_IDS * DIGEST_LEN;
/// An all-zero slot is an id without a mark.
const NO_MARK: [u8; DIGEST_LEN] = [0; DIGEST_LEN];

pub(super) struct Redelivery {
    tree: String,
    pages: HashMap<u16, Box<[u8; PAGE_LEN]>>,
    /// Marks read from the one-key-per-id tree of earlier releases, removed
    /// with the first commit that writes them into pages.
    legacy: Vec<Mark>,
}

/// What to store for one group of publishes.
#[derive(Debug, Default)]
pub(super) struct Filtered {
    pub events: Vec<Event>,
    pub marks: Vec<Mark>,
    /// Redeliveries of committed messages: ack, don't store.
    pub redelivered: usize,
}

fn digest(message: &Message) -> [u8; DIGEST_LEN] {
    let mut h = Sha256::new();
    h.update((message.topic.len() as u64).to_le_bytes());
    h.update(message.topic.as_bytes());
    h.update(&message.payload);
    let mut out = NO_MARK;
    out.copy_from_slice(&h.finalize()[..DIGEST_LEN]);
    out
}

fn slot(pkid: u16) -> (u16, usize) {
    let page = pkid / PAGE_IDS as u16;
    let at = usize::from(pkid) % PAGE_IDS * DIGEST_LEN;
    (page, at)
}

/// The spool tree holding a source's mark pages.
pub(super) fn page_tree(source: &str) -> String {
    format!("mqtt-marks/{source}")
}

/// The tree of one mark per packet id (16-byte digests) that releases up to
/// 0.1 wrote.
pub(super) fn legacy_tree(source: &str) -> String {
    format!("mqtt-inflight/{source}")
}

impl Redelivery {
    /// From the stored pages of [`page_tree`] and the entries of
    /// [`legacy_tree`]; entries of either that are not what this release
    /// writes are ignored (at worst a redelivery is stored twice).
    pub fn new(
        source: &str,
        pages: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        legacy: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Redelivery {
        let mut r = Redelivery {
            tree: page_tree(source),
            pages: HashMap::new(),
            legacy: Vec::new(),
        };
        for (key, value) in pages {
            if let (Ok(key), Ok(page)) =
                (<[u8; 2]>::try_from(key), <[u8; PAGE_LEN]>::try_from(value))
            {
                r.pages.insert(u16::from_be_bytes(key), Box::new(page));
            }
        }
        let legacy_tree = legacy_tree(source);
        for (key, value) in legacy {
            if let Ok(id) = <[u8; 2]>::try_from(key.as_slice())
                && value.len() >= DIGEST_LEN
            {
                let (page, at) = slot(u16::from_be_bytes(id));
                r.page(page)[at..at + DIGEST_LEN].copy_from_slice(&value[..DIGEST_LEN]);
            }
            r.legacy.push(Mark {
                tree: legacy_tree.clone(),
                key,
                value: Vec::new(),
            });
        }
        r
    }

    fn page(&mut self, page: u16) -> &mut [u8; PAGE_LEN] {
        self.pages
            .entry(page)
            .or_insert_with(|| Box::new([0; PAGE_LEN]))
    }

    /// Removes every mark and returns what commits that. For a broker
    /// session that is new: no mark of an earlier one can be live.
    pub fn forget_all(&mut self) -> Vec<Mark> {
        let mut marks = std::mem::take(&mut self.legacy);
        marks.extend(self.pages.drain().map(|(page, _)| Mark {
            tree: self.tree.clone(),
            key: page.to_be_bytes().to_vec(),
            value: Vec::new(),
        }));
        marks
    }

    /// Splits `group` into events to store and redeliveries to only ack.
    /// The marks it returns must be committed with the events before the
    /// next call: memory already holds them.
    pub fn filter(&mut self, group: &[Message], ts_ms: i64) -> Filtered {
        let mut out = Filtered::default();
        let mut touched = BTreeSet::new();
        for message in group {
            if message.qos == QoS::AtLeastOnce {
                let digest = digest(message);
                let (page, at) = slot(message.pkid);
                let stored = &mut self.page(page)[at..at + DIGEST_LEN];
                // The original and its redelivery may arrive in one group.
                if message.dup && digest != NO_MARK && *stored == digest {
                    out.redelivered += 1;
                    continue;
                }
                stored.copy_from_slice(&digest);
                touched.insert(page);
            }
            let mut event = Event::new(ts_ms, message.topic.clone(), message.payload.clone());
            event.attributes.clone_from(&message.properties);
            out.events.push(event);
        }
        if !touched.is_empty() && !self.legacy.is_empty() {
            touched.extend(self.pages.keys().copied());
            out.marks.append(&mut self.legacy);
        }
        out.marks.extend(touched.into_iter().map(|page| Mark {
            tree: self.tree.clone(),
            key: page.to_be_bytes().to_vec(),
            value: self.pages[&page].to_vec(),
        }));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16, dup: bool, payload: &str) -> Message {
        Message {
            topic: "sensors/a".into(),
            payload: payload.as_bytes().to_vec().into(),
            pkid,
            qos: QoS::AtLeastOnce,
            dup,
            properties: Vec::new(),
            connection: 0,
        }
    }

    /// What a restart reads back after `filtered` was committed on top of `before`.
    fn committed(
        before: &HashMap<(String, Vec<u8>), Vec<u8>>,
        filtered: &Filtered,
    ) -> HashMap<(String, Vec<u8>), Vec<u8>> {
        let mut after = before.clone();
        for m in &filtered.marks {
            if m.value.is_empty() {
                after.remove(&(m.tree.clone(), m.key.clone()));
            } else {
                after.insert((m.tree.clone(), m.key.clone()), m.value.clone());
            }
        }
        after
    }

    fn restart(stored: &HashMap<(String, Vec<u8>), Vec<u8>>) -> Redelivery {
        let of = |tree: String| {
            stored
                .iter()
                .filter(move |((t, _), _)| *t == tree)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        Redelivery::new("s", of(page_tree("s")), of(legacy_tree("s")))
    }

    #[test]
    fn redelivery_of_a_committed_message_is_not_stored_again_after_a_restart() {
        let mut r = restart(&HashMap::new());
        let first = r.filter(&[publish(7, false, "a"), publish(8, false, "b")], 1);
        assert_eq!((first.events.len(), first.redelivered), (2, 0));
        assert_eq!(first.marks.len(), 1, "ids 7 and 8 share one page");
        let stored = committed(&HashMap::new(), &first);
        let again = restart(&stored).filter(&[publish(7, true, "a"), publish(9, false, "c")], 2);
        assert_eq!(again.redelivered, 1);
        assert_eq!(again.events.len(), 1);
        assert_eq!(again.events[0].payload.as_ref(), b"c");
    }

    #[test]
    fn dup_of_something_never_committed_is_stored() {
        let mut r = restart(&HashMap::new());
        let stored = committed(&HashMap::new(), &r.filter(&[publish(7, false, "old")], 1));
        let out = restart(&stored).filter(&[publish(7, true, "new")], 2);
        assert_eq!((out.events.len(), out.redelivered), (1, 0));
    }

    #[test]
    fn original_and_redelivery_in_one_group_store_once() {
        let mut r = restart(&HashMap::new());
        let out = r.filter(&[publish(3, false, "x"), publish(3, true, "x")], 1);
        assert_eq!((out.events.len(), out.redelivered), (1, 1));
    }

    #[test]
    fn a_repeated_message_of_a_new_broker_session_is_stored() {
        let mut r = restart(&HashMap::new());
        let first = r.filter(&[publish(1, false, "same"), publish(70, false, "x")], 1);
        let mut stored = committed(&HashMap::new(), &first);
        let mut r = restart(&stored);
        let forgotten = Filtered {
            marks: r.forget_all(),
            ..Filtered::default()
        };
        assert_eq!(forgotten.marks.len(), 2, "one removal per stored page");
        stored = committed(&stored, &forgotten);
        assert!(stored.is_empty());
        // The new session numbers from 1 again; silt died before committing
        // its first message, which comes back with DUP set.
        let out = restart(&stored).filter(&[publish(1, true, "same")], 2);
        assert_eq!((out.events.len(), out.redelivered), (1, 0));
        assert_eq!(
            restart(&stored).forget_all().len(),
            0,
            "nothing left to remove"
        );
    }

    #[test]
    fn qos0_is_passed_through_without_marks() {
        let mut r = restart(&HashMap::new());
        let mut p = publish(0, false, "q0");
        p.qos = QoS::AtMostOnce;
        let out = r.filter(&[p], 1);
        assert_eq!((out.events.len(), out.marks.len()), (1, 0));
    }

    #[test]
    fn a_group_writes_one_mark_per_page_it_touched() {
        let mut r = restart(&HashMap::new());
        let group: Vec<_> = (60..200).map(|id| publish(id, false, "p")).collect();
        let out = r.filter(&group, 1);
        let pages: Vec<_> = out.marks.iter().map(|m| m.key.clone()).collect();
        assert_eq!(pages, [[0, 0], [0, 1], [0, 2], [0, 3]]);
        assert!(out.marks.iter().all(|m| m.value.len() == PAGE_LEN));
    }

    #[test]
    fn marks_of_the_one_key_per_id_format_are_moved_into_pages() {
        let mut old = HashMap::new();
        let original = publish(300, false, "before the upgrade");
        let mut digest16 = digest(&original).to_vec();
        digest16.extend_from_slice(&[0xAB; 8]);
        old.insert((legacy_tree("s"), 300u16.to_be_bytes().to_vec()), digest16);
        let mut r = restart(&old);
        let out = r.filter(
            &[
                publish(300, true, "before the upgrade"),
                publish(5, false, "n"),
            ],
            1,
        );
        assert_eq!((out.events.len(), out.redelivered), (1, 1));
        let stored = committed(&old, &out);
        assert!(
            stored.keys().all(|(tree, _)| *tree == page_tree("s")),
            "the old marks are removed in the commit that moves them"
        );
        let again = restart(&stored).filter(&[publish(300, true, "before the upgrade")], 2);
        assert_eq!(again.redelivered, 1, "the moved mark survives a restart");
    }
}
