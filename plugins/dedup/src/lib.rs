//! `dedup`: drop repeats of a JSON key within a time window.
//!
//! Config:
//!
//! ```json
//! {"key": "msg_id", "window_ms": 60000, "per_topic": true, "max_keys": 100000}
//! ```
//!
//! * `key` (required): dotted path of the JSON field identifying a message,
//!   e.g. `"id"` or `"meta.seq"`. Non-string values compare by their JSON
//!   text. Events whose payload is not JSON or lacks the key pass through.
//! * `window_ms` (default 60000): an event is a repeat if an event with the
//!   same key was *kept* less than `window_ms` earlier, by event timestamp
//!   (`ts_ms`, the time silt received it). So a value repeated forever is let
//!   through once per window, and replays of old data are judged by when
//!   they were received, not by the wall clock.
//! * `per_topic` (default true): keys are scoped to the topic, so the same id
//!   on two topics is not a repeat.
//! * `max_keys` (default 100000): bound on remembered keys. When exceeded,
//!   expired keys are forgotten first, then the oldest; a forgotten key's
//!   next repeat gets through (memory beats perfect dedup on an edge box).
//!
//! State lives in the plugin instance: after an agent restart or a plugin
//! failure, the window starts empty.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use silt_sdk::json::{get_path, to_key_string};
use silt_sdk::{Config, Error, Event, Transform, log};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    key: String,
    #[serde(default = "default_window")]
    window_ms: u64,
    #[serde(default = "default_true")]
    per_topic: bool,
    #[serde(default = "default_max_keys")]
    max_keys: usize,
}

fn default_window() -> u64 {
    60_000
}
fn default_true() -> bool {
    true
}
fn default_max_keys() -> usize {
    100_000
}

pub struct Dedup {
    key: String,
    window_ms: i64,
    per_topic: bool,
    max_keys: usize,
    /// (topic or "", key text) → ts_ms of the last kept event.
    seen: HashMap<(String, String), i64>,
    /// Latest event timestamp seen; "now" for expiry, in event time.
    latest_ts: i64,
}

impl Dedup {
    /// `Some(key)` for events that take part in dedup.
    fn key_of(&self, event: &Event) -> Option<(String, String)> {
        let value: Value = serde_json::from_slice(&event.payload).ok()?;
        let key = to_key_string(get_path(&value, &self.key)?);
        let scope = if self.per_topic {
            event.topic.clone()
        } else {
            String::new()
        };
        Some((scope, key))
    }

    fn is_repeat(&mut self, event: &Event) -> bool {
        let Some(key) = self.key_of(event) else {
            return false;
        };
        self.latest_ts = self.latest_ts.max(event.ts_ms);
        match self.seen.get_mut(&key) {
            Some(kept_at) if event.ts_ms.saturating_sub(*kept_at) < self.window_ms => true,
            Some(kept_at) => {
                *kept_at = event.ts_ms;
                false
            }
            None => {
                self.seen.insert(key, event.ts_ms);
                false
            }
        }
    }

    fn evict(&mut self) {
        if self.seen.len() <= self.max_keys {
            return;
        }
        let horizon = self.latest_ts.saturating_sub(self.window_ms);
        self.seen.retain(|_, kept_at| *kept_at > horizon);
        let excess = self.seen.len().saturating_sub(self.max_keys);
        if excess > 0 {
            let mut by_age: Vec<((String, String), i64)> = self.seen.drain().collect();
            by_age.sort_unstable_by_key(|(_, ts)| *ts);
            self.seen = by_age.into_iter().skip(excess).collect();
            log::warn!(
                "dedup: more than {} distinct keys within the window; forgot the {excess} oldest (raise max_keys or shorten window_ms)",
                self.max_keys
            );
        }
    }
}

impl Transform for Dedup {
    fn init(config: Config) -> Result<Self, Error> {
        let s: Settings = config.deserialize()?;
        if s.key.is_empty() {
            return Err(Error::new(
                "dedup: `key` must name a JSON field, e.g. \"id\"",
            ));
        }
        Ok(Dedup {
            key: s.key,
            window_ms: i64::try_from(s.window_ms).unwrap_or(i64::MAX),
            per_topic: s.per_topic,
            max_keys: s.max_keys.max(1),
            seen: HashMap::new(),
            latest_ts: i64::MIN,
        })
    }

    fn process(&mut self, mut events: Vec<Event>) -> Result<Vec<Event>, Error> {
        events.retain(|e| !self.is_repeat(e));
        self.evict();
        Ok(events)
    }

    fn tick(&mut self, _now_ms: u64) -> Result<Vec<Event>, Error> {
        // Expire in event time, not wall time: see the module docs.
        let horizon = self.latest_ts.saturating_sub(self.window_ms);
        self.seen.retain(|_, kept_at| *kept_at > horizon);
        Ok(Vec::new())
    }
}

silt_sdk::export!(Dedup);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(config: Value) -> Dedup {
        Dedup::init(Config::from_value(config).unwrap()).unwrap()
    }

    fn ev(topic: &str, ts: i64, payload: Value) -> Event {
        Event::from_json(topic, &payload).unwrap().with_ts(ts)
    }

    fn ts_of(events: &[Event]) -> Vec<i64> {
        events.iter().map(|e| e.ts_ms).collect()
    }

    #[test]
    fn drops_repeats_within_window() {
        let mut p = plugin(json!({"key": "id", "window_ms": 1000}));
        let out = p
            .process(vec![
                ev("t", 0, json!({"id": 1})),
                ev("t", 500, json!({"id": 1})),
                ev("t", 600, json!({"id": 2})),
                ev("t", 999, json!({"id": 1})),
                ev("t", 1000, json!({"id": 1})),
            ])
            .unwrap();
        assert_eq!(ts_of(&out), [0, 600, 1000]);
        // State carries across batches.
        let out = p.process(vec![ev("t", 1500, json!({"id": 1}))]).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn scoping_and_passthrough() {
        let mut p = plugin(json!({"key": "meta.seq"}));
        let out = p
            .process(vec![
                ev("a", 0, json!({"meta": {"seq": "x"}})),
                ev("b", 1, json!({"meta": {"seq": "x"}})),
                ev("a", 2, json!({"other": 1})),
                ev("a", 3, json!({"other": 1})),
                Event::new("a", 4, b"not json".to_vec()),
            ])
            .unwrap();
        assert_eq!(ts_of(&out), [0, 1, 2, 3, 4]);

        let mut global = plugin(json!({"key": "meta.seq", "per_topic": false}));
        let out = global
            .process(vec![
                ev("a", 0, json!({"meta": {"seq": "x"}})),
                ev("b", 1, json!({"meta": {"seq": "x"}})),
            ])
            .unwrap();
        assert_eq!(ts_of(&out), [0]);
    }

    #[test]
    fn bounded_memory() {
        let mut p = plugin(json!({"key": "id", "max_keys": 10, "window_ms": 1_000_000}));
        let batch = (0..100).map(|i| ev("t", i, json!({"id": i}))).collect();
        assert_eq!(p.process(batch).unwrap().len(), 100);
        assert!(p.seen.len() <= 10);
        // The newest keys are the ones remembered.
        assert!(
            p.process(vec![ev("t", 200, json!({"id": 99}))])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn tick_expires_old_keys() {
        let mut p = plugin(json!({"key": "id", "window_ms": 10}));
        p.process(vec![
            ev("t", 0, json!({"id": 1})),
            ev("t", 100, json!({"id": 2})),
        ])
        .unwrap();
        p.tick(0).unwrap();
        assert_eq!(p.seen.len(), 1);
    }

    #[test]
    fn key_is_required() {
        assert!(Dedup::init(Config::default()).is_err());
    }
}
