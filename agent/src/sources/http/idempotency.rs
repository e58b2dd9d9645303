//! `Idempotency-Key`: a client that lost a reply can send the request again
//! and get the first reply, with nothing stored twice.
//!
//! The key, a digest of the request and the reply are one spool mark,
//! committed in the same append as the request's events: after a crash
//! either both are on disk or neither. Entries expire after the retention
//! window and the oldest go first when the count or byte budget is reached;
//! their removal rides on the next append that adds an entry.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::spool::{Mark, StoredMarks};

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// Set on a reply that repeats an earlier one.
pub const REPLAYED: &str = "idempotent-replayed";
/// Longest key accepted; keys are meant to be UUIDs or similar.
pub const MAX_KEY_LEN: usize = 255;
/// Bytes an entry costs besides its key and reply body (digest, timestamps,
/// map and queue slots), for the byte budget.
const ENTRY_OVERHEAD: u64 = 96;

/// How long and how many replies are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub window: Duration,
    pub max_keys: usize,
    pub max_bytes: u64,
}

/// The spool tree of one HTTP source's entries.
pub fn tree(source: &str) -> String {
    format!("idempotency/{source}")
}

/// What a request carries that a repeat must match: where it went and
/// its body.
pub fn request_digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Whether `key` is acceptable: 1 to [`MAX_KEY_LEN`] visible ASCII chars.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

#[derive(Debug, Clone)]
struct Entry {
    ts_ms: i64,
    digest: [u8; 32],
    reply: Reply,
}

/// Version byte of the stored encoding: version, ts (8, LE), digest (32),
/// status (2, LE), body (the rest, UTF-8).
const ENCODING: u8 = 1;
const HEAD: usize = 1 + 8 + 32 + 2;

impl Entry {
    fn cost(&self, key: &str) -> u64 {
        key.len() as u64 + self.reply.body.len() as u64 + ENTRY_OVERHEAD
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + self.reply.body.len());
        out.push(ENCODING);
        out.extend_from_slice(&self.ts_ms.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.reply.status.to_le_bytes());
        out.extend_from_slice(self.reply.body.as_bytes());
        out
    }

    fn decode(raw: &[u8]) -> Option<Entry> {
        if raw.len() < HEAD || raw[0] != ENCODING {
            return None;
        }
        Some(Entry {
            ts_ms: i64::from_le_bytes(raw[1..9].try_into().ok()?),
            digest: raw[9..41].try_into().ok()?,
            reply: Reply {
                status: u16::from_le_bytes(raw[41..43].try_into().ok()?),
                body: String::from_utf8(raw[HEAD..].to_vec()).ok()?,
            },
        })
    }
}

/// What to do with a request that carries a key.
pub enum Begin {
    /// First time: go on, commit [`Pending::marks`] with the events, then
    /// [`Pending::committed`].
    New(Pending),
    /// Seen and answered: send this again, store nothing.
    Replay(Reply),
    /// Seen with another body: the client reused a key by mistake.
    Mismatch,
    /// The same key is being handled right now.
    InFlight,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Keys by age, oldest first; may name keys already evicted.
    order: VecDeque<(i64, String)>,
    in_flight: HashSet<String>,
    bytes: u64,
}

#[derive(Clone)]
pub struct Idempotency {
    tree: String,
    retention: Retention,
    inner: Arc<Mutex<Inner>>,
}

impl Idempotency {
    /// From the entries an earlier run committed; unreadable ones are skipped
    /// (at worst a retry is stored again).
    pub fn new(source: &str, retention: Retention, stored: StoredMarks) -> Idempotency {
        let mut loaded: Vec<(String, Entry)> = stored
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, Entry::decode(&v)?)))
            .collect();
        loaded.sort_by_key(|(_, e)| e.ts_ms);
        let mut inner = Inner::default();
        for (key, entry) in loaded {
            inner.bytes += entry.cost(&key);
            inner.order.push_back((entry.ts_ms, key.clone()));
            inner.entries.insert(key, entry);
        }
        Idempotency {
            tree: tree(source),
            retention,
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    pub fn begin(&self, key: &str, digest: [u8; 32], now_ms: i64) -> Begin {
        let mut inner = self.inner.lock().expect("lock");
        let horizon = now_ms - self.retention.window.as_millis() as i64;
        if let Some(entry) = inner.entries.get(key).filter(|e| e.ts_ms > horizon) {
            return if entry.digest == digest {
                Begin::Replay(entry.reply.clone())
            } else {
                Begin::Mismatch
            };
        }
        if !inner.in_flight.insert(key.to_string()) {
            return Begin::InFlight;
        }
        Begin::New(Pending {
            store: self.clone(),
            key: key.to_string(),
            digest,
            now_ms,
            done: false,
        })
    }

    /// Keys to drop so that one more entry of `cost` fits: expired ones,
    /// then the oldest while over a budget.
    fn evictions(&self, inner: &Inner, cost: u64, now_ms: i64) -> Vec<String> {
        let horizon = now_ms - self.retention.window.as_millis() as i64;
        let (mut keys, mut bytes) = (inner.entries.len() + 1, inner.bytes + cost);
        let mut out = Vec::new();
        for (ts, key) in &inner.order {
            let Some(entry) = inner.entries.get(key).filter(|e| e.ts_ms == *ts) else {
                continue;
            };
            let over = keys > self.retention.max_keys || bytes > self.retention.max_bytes;
            if *ts > horizon && !over {
                break;
            }
            keys -= 1;
            bytes -= entry.cost(key);
            out.push(key.clone());
        }
        out
    }
}

/// A keyed request being handled; dropping it without
/// [`Pending::committed`] lets the client retry the key.
pub struct Pending {
    store: Idempotency,
    key: String,
    digest: [u8; 32],
    now_ms: i64,
    done: bool,
}

impl Pending {
    /// The marks to commit with the events when they are answered `reply`:
    /// the entry, and the removal of entries it pushes out.
    pub fn marks(&self, reply: &Reply) -> Vec<Mark> {
        let entry = self.entry(reply);
        let inner = self.store.inner.lock().expect("lock");
        let evicted = self
            .store
            .evictions(&inner, entry.cost(&self.key), self.now_ms);
        let mut marks: Vec<Mark> = evicted
            .into_iter()
            .filter(|k| *k != self.key)
            .map(|k| Mark {
                tree: self.store.tree.clone(),
                key: k.into_bytes(),
                value: Vec::new(),
            })
            .collect();
        marks.push(Mark {
            tree: self.store.tree.clone(),
            key: self.key.as_bytes().to_vec(),
            value: entry.encode(),
        });
        marks
    }

    /// The marks were committed: later repeats get `reply`.
    pub fn committed(mut self, reply: &Reply) {
        let entry = self.entry(reply);
        let mut inner = self.store.inner.lock().expect("lock");
        for key in self
            .store
            .evictions(&inner, entry.cost(&self.key), self.now_ms)
        {
            if let Some(old) = inner.entries.remove(&key) {
                inner.bytes -= old.cost(&key);
            }
        }
        inner.bytes += entry.cost(&self.key);
        inner.order.push_back((entry.ts_ms, self.key.clone()));
        if let Some(old) = inner.entries.insert(self.key.clone(), entry) {
            inner.bytes -= old.cost(&self.key);
        }
        // The queue may hold evicted keys; rebuild it when they dominate.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let Inner { order, entries, .. } = &mut *inner;
            order.retain(|(ts, k)| entries.get(k).is_some_and(|e| e.ts_ms == *ts));
        }
        inner.in_flight.remove(&self.key);
        self.done = true;
    }

    fn entry(&self, reply: &Reply) -> Entry {
        Entry {
            ts_ms: self.now_ms,
            digest: self.digest,
            reply: reply.clone(),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let mut inner = self.store.inner.lock().expect("lock");
            inner.in_flight.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn retention(max_keys: usize) -> Retention {
        Retention {
            window: Duration::from_secs(24 * 3600),
            max_keys,
            max_bytes: 1 << 20,
        }
    }

    fn accepted(n: u32) -> Reply {
        Reply {
            status: 202,
            body: format!("{{\"accepted\":{n}}}"),
        }
    }

    /// Commits a new key; returns the marks it wrote.
    fn commit(store: &Idempotency, key: &str, body: &[u8], now: i64) -> Vec<Mark> {
        let Begin::New(pending) = store.begin(key, request_digest(&[body]), now) else {
            panic!("{key} is new");
        };
        let marks = pending.marks(&accepted(1));
        pending.committed(&accepted(1));
        marks
    }

    #[test]
    fn a_repeat_gets_the_first_reply_and_another_body_is_refused() {
        let store = Idempotency::new("api", retention(10), Vec::new());
        commit(&store, "k1", b"body", 0);
        match store.begin("k1", request_digest(&[b"body"]), HOUR) {
            Begin::Replay(reply) => assert_eq!(reply, accepted(1)),
            _ => panic!("a repeat is replayed"),
        }
        assert!(matches!(
            store.begin("k1", request_digest(&[b"other"]), HOUR),
            Begin::Mismatch
        ));
    }

    #[test]
    fn a_key_in_flight_is_refused_and_free_again_when_dropped() {
        let store = Idempotency::new("api", retention(10), Vec::new());
        let first = store.begin("k", request_digest(&[b"b"]), 0);
        assert!(matches!(
            store.begin("k", request_digest(&[b"b"]), 0),
            Begin::InFlight
        ));
        drop(first);
        assert!(matches!(
            store.begin("k", request_digest(&[b"b"]), 0),
            Begin::New(_)
        ));
    }

    #[test]
    fn entries_survive_a_restart_until_they_expire() {
        let store = Idempotency::new("api", retention(10), Vec::new());
        let marks = commit(&store, "k", b"b", 0);
        let stored: StoredMarks = marks.into_iter().map(|m| (m.key, m.value)).collect();
        let again = Idempotency::new("api", retention(10), stored);
        assert!(matches!(
            again.begin("k", request_digest(&[b"b"]), 23 * HOUR),
            Begin::Replay(_)
        ));
        assert!(matches!(
            again.begin("k", request_digest(&[b"b"]), 25 * HOUR),
            Begin::New(_)
        ));
    }

    #[test]
    fn the_oldest_and_the_expired_are_removed_with_the_next_entry() {
        let store = Idempotency::new("api", retention(2), Vec::new());
        commit(&store, "a", b"1", 0);
        commit(&store, "b", b"2", 1);
        let marks = commit(&store, "c", b"3", 2);
        let removed: Vec<&[u8]> = marks
            .iter()
            .filter(|m| m.value.is_empty())
            .map(|m| m.key.as_slice())
            .collect();
        assert_eq!(removed, [b"a"]);
        assert!(matches!(
            store.begin("a", request_digest(&[b"1"]), 3),
            Begin::New(_)
        ));
        let marks = commit(&store, "d", b"4", 30 * HOUR);
        let removed = marks.iter().filter(|m| m.value.is_empty()).count();
        assert_eq!(removed, 2, "b and c expired");
    }

    #[test]
    fn keys_must_be_short_visible_ascii() {
        assert!(valid_key("2f1e6a0c-4b1d-4c1e-9a53-0f1a2b3c4d5e"));
        assert!(!valid_key(""));
        assert!(!valid_key("has space"));
        assert!(!valid_key(&"k".repeat(MAX_KEY_LEN + 1)));
    }
}
