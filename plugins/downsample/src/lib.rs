//! `downsample`: per-sensor aggregates over fixed time windows, emitted by
//! `tick` once a window has closed.
//!
//! Config:
//!
//! ```json
//! {
//!   "sensor": "device",
//!   "window_ms": 60000,
//!   "fields": ["temperature_c", "humidity"],
//!   "stats": ["avg", "min", "max"],
//!   "grace_ms": 5000,
//!   "topic": "sensors/downsampled",
//!   "max_windows": 100000
//! }
//! ```
//!
//! * `sensor` (required): dotted path of the JSON field naming the series.
//!   A series is (topic, sensor value). Events that are not JSON objects or
//!   lack the field pass through unchanged.
//! * `window_ms` (default 60000): tumbling windows aligned to the Unix epoch,
//!   `[start, start + window_ms)`, by event timestamp.
//! * `fields`: numeric top-level fields to aggregate (numeric strings count).
//!   Default: every numeric top-level field other than the sensor field.
//! * `stats` (default `["avg"]`): any of `avg` (written as the field's own
//!   name), `min`, `max`, `sum` (written as `<field>_min` etc.).
//! * `grace_ms` (default 5000): a window is emitted at the first tick with
//!   `now >= end + grace_ms`, so events delayed by batching still count.
//!   An event arriving after its window was emitted opens a new, separate
//!   aggregate for that window (emitted at the next tick).
//! * `topic`: output topic; default the input topic.
//! * `max_windows` (default 100000): bound on open aggregates; beyond it the
//!   oldest are emitted early, from `process`.
//!
//! Output, one event per series and window, stamped `ts_ms = start`, with the
//! attributes of the window's first event:
//! `{"<sensor>": "a", "window_start_ms": S, "window_end_ms": E, "count": N,
//!   "temperature_c": 21.5, "temperature_c_max": 22.0, ...}`.
//! A field with no numeric value in the window is left out.
//!
//! Open windows live in the plugin instance: they are lost if the agent
//! restarts or the plugin fails.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Number, Value};
use silt_sdk::json::{get_path, to_key_string};
use silt_sdk::{Config, Error, Event, Transform, log};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    sensor: String,
    #[serde(default = "default_window")]
    window_ms: u64,
    #[serde(default)]
    fields: Option<Vec<String>>,
    #[serde(default = "default_stats")]
    stats: Vec<Stat>,
    #[serde(default = "default_grace")]
    grace_ms: u64,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "default_max_windows")]
    max_windows: usize,
}

fn default_window() -> u64 {
    60_000
}
fn default_stats() -> Vec<Stat> {
    vec![Stat::Avg]
}
fn default_grace() -> u64 {
    5_000
}
fn default_max_windows() -> usize {
    100_000
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Stat {
    Avg,
    Min,
    Max,
    Sum,
}

/// Window identity; ordering by start first makes "oldest first" a scan.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct WindowKey {
    start: i64,
    topic: String,
    sensor: String,
}

#[derive(Debug)]
struct Window {
    sensor_value: Value,
    attributes: Vec<(String, String)>,
    count: u64,
    /// In order of first appearance so output is stable and readable.
    fields: Vec<(String, Acc)>,
}

#[derive(Debug, Clone, Copy)]
struct Acc {
    sum: f64,
    min: f64,
    max: f64,
    n: u64,
}

impl Acc {
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.n += 1;
    }
}

pub struct Downsample {
    sensor: String,
    window_ms: i64,
    fields: Option<Vec<String>>,
    stats: Vec<Stat>,
    grace_ms: i64,
    topic: Option<String>,
    max_windows: usize,
    open: BTreeMap<WindowKey, Window>,
}

impl Downsample {
    /// Absorb `event` into its window, or hand it back if it is not ours.
    fn absorb(&mut self, event: Event) -> Option<Event> {
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&event.payload) else {
            return Some(event);
        };
        let root = Value::Object(obj);
        let Some(sensor_value) = get_path(&root, &self.sensor).cloned() else {
            return Some(event);
        };
        let Value::Object(obj) = root else {
            unreachable!("matched as an object above")
        };
        let start = event.ts_ms - event.ts_ms.rem_euclid(self.window_ms);
        let key = WindowKey {
            start,
            topic: event.topic,
            sensor: to_key_string(&sensor_value),
        };
        let window = self.open.entry(key).or_insert_with(|| Window {
            sensor_value,
            attributes: event.attributes,
            count: 0,
            fields: Vec::new(),
        });
        window.count += 1;
        for (name, value) in &obj {
            let wanted = match &self.fields {
                Some(list) => list.contains(name),
                None => *name != self.sensor,
            };
            let Some(v) = wanted.then(|| as_f64(value)).flatten() else {
                continue;
            };
            match window.fields.iter_mut().find(|(n, _)| n == name) {
                Some((_, acc)) => acc.add(v),
                None => window.fields.push((
                    name.clone(),
                    Acc {
                        sum: v,
                        min: v,
                        max: v,
                        n: 1,
                    },
                )),
            }
        }
        None
    }

    fn emit(&self, key: WindowKey, w: Window) -> Result<Event, Error> {
        let end = key.start.saturating_add(self.window_ms);
        let mut out = Map::new();
        out.insert(self.sensor.clone(), w.sensor_value);
        out.insert("window_start_ms".into(), key.start.into());
        out.insert("window_end_ms".into(), end.into());
        out.insert("count".into(), w.count.into());
        for (name, acc) in &w.fields {
            for stat in &self.stats {
                let (field, v) = match stat {
                    Stat::Avg => (name.clone(), acc.sum / acc.n as f64),
                    Stat::Min => (format!("{name}_min"), acc.min),
                    Stat::Max => (format!("{name}_max"), acc.max),
                    Stat::Sum => (format!("{name}_sum"), acc.sum),
                };
                if let Some(n) = Number::from_f64(v) {
                    out.insert(field, Value::Number(n));
                }
            }
        }
        let topic = self.topic.clone().unwrap_or(key.topic);
        let mut event = Event::from_json(topic, &Value::Object(out))?.with_ts(key.start);
        event.attributes = w.attributes;
        Ok(event)
    }

    /// Emit (and forget) every window for which `done` holds, oldest first.
    fn flush(&mut self, done: impl Fn(&WindowKey) -> bool) -> Result<Vec<Event>, Error> {
        let mut out = Vec::new();
        while let Some(entry) = self.open.first_entry() {
            if !done(entry.key()) {
                break;
            }
            let (key, window) = entry.remove_entry();
            out.push(self.emit(key, window)?);
        }
        Ok(out)
    }
}

fn as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|v| v.is_finite()),
        _ => None,
    }
}

impl Transform for Downsample {
    fn init(config: Config) -> Result<Self, Error> {
        let s: Settings = config.deserialize()?;
        if s.window_ms == 0 {
            return Err(Error::new("downsample: window_ms must be at least 1"));
        }
        if s.stats.is_empty() {
            return Err(Error::new(
                "downsample: stats must name at least one of avg, min, max, sum",
            ));
        }
        Ok(Downsample {
            sensor: s.sensor,
            window_ms: i64::try_from(s.window_ms).unwrap_or(i64::MAX),
            fields: s.fields,
            stats: s.stats,
            grace_ms: i64::try_from(s.grace_ms).unwrap_or(i64::MAX),
            topic: s.topic,
            max_windows: s.max_windows.max(1),
            open: BTreeMap::new(),
        })
    }

    fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
        let mut out: Vec<Event> = events.into_iter().filter_map(|e| self.absorb(e)).collect();
        let excess = self.open.len().saturating_sub(self.max_windows);
        if excess > 0 {
            log::warn!(
                "downsample: more than {} open windows; emitting the {excess} oldest early (raise max_windows)",
                self.max_windows
            );
            let mut left = excess;
            let mut early = Vec::with_capacity(excess);
            while left > 0 {
                let Some((key, window)) = self.open.pop_first() else {
                    break;
                };
                early.push(self.emit(key, window)?);
                left -= 1;
            }
            out.extend(early);
        }
        Ok(out)
    }

    fn tick(&mut self, now_ms: u64) -> Result<Vec<Event>, Error> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let (window, grace) = (self.window_ms, self.grace_ms);
        self.flush(|k| k.start.saturating_add(window).saturating_add(grace) <= now)
    }
}

silt_sdk::export!(Downsample);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(config: Value) -> Downsample {
        Downsample::init(Config::from_value(config).unwrap()).unwrap()
    }

    fn ev(ts: i64, payload: Value) -> Event {
        Event::from_json("s", &payload).unwrap().with_ts(ts)
    }

    fn payloads(events: &[Event]) -> Vec<Value> {
        events.iter().map(|e| e.json().unwrap()).collect()
    }

    #[test]
    fn averages_per_sensor_and_window() {
        let mut p = plugin(json!({"sensor": "device", "window_ms": 1000, "grace_ms": 0,
                                   "stats": ["avg", "max"]}));
        let passthrough = p
            .process(vec![
                ev(100, json!({"device": "a", "t": 10, "h": "50"})),
                ev(900, json!({"device": "a", "t": 20})),
                ev(950, json!({"device": "b", "t": 1})),
                ev(1100, json!({"device": "a", "t": 99})),
                ev(1200, json!({"no_device": 1})),
            ])
            .unwrap();
        assert_eq!(payloads(&passthrough), [json!({"no_device": 1})]);
        assert!(p.tick(999).unwrap().is_empty());

        let out = p.tick(1000).unwrap();
        assert_eq!(
            payloads(&out),
            [
                json!({"device": "a", "window_start_ms": 0, "window_end_ms": 1000, "count": 2,
                       "t": 15.0, "t_max": 20.0, "h": 50.0, "h_max": 50.0}),
                json!({"device": "b", "window_start_ms": 0, "window_end_ms": 1000, "count": 1,
                       "t": 1.0, "t_max": 1.0}),
            ]
        );
        assert_eq!(out[0].ts_ms, 0);
        assert_eq!(payloads(&p.tick(5000).unwrap())[0]["t"], json!(99.0));
        assert!(p.tick(10_000).unwrap().is_empty());
    }

    #[test]
    fn grace_topic_attributes_and_field_filter() {
        let mut p = plugin(json!({"sensor": "id", "window_ms": 10, "grace_ms": 5,
                                   "fields": ["v"], "topic": "agg"}));
        let mut e = ev(3, json!({"id": 7, "v": 1, "w": 2}));
        e.set_attr("site", "north");
        p.process(vec![e]).unwrap();
        assert!(p.tick(14).unwrap().is_empty());
        let out = p.tick(15).unwrap();
        assert_eq!(out[0].topic, "agg");
        assert_eq!(out[0].attr("site"), Some("north"));
        assert_eq!(
            out[0].json::<Value>().unwrap(),
            json!({"id": 7, "window_start_ms": 0, "window_end_ms": 10, "count": 1, "v": 1.0})
        );
    }

    #[test]
    fn caps_open_windows() {
        let mut p = plugin(json!({"sensor": "id", "max_windows": 2}));
        let out = p
            .process((0..5).map(|i| ev(0, json!({"id": i, "v": i}))).collect())
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(p.open.len(), 2);
    }

    #[test]
    fn negative_timestamps_align_down() {
        let mut p = plugin(json!({"sensor": "id", "window_ms": 1000, "grace_ms": 0}));
        p.process(vec![ev(-1, json!({"id": 1, "v": 1}))]).unwrap();
        let out = p.tick(0).unwrap();
        assert_eq!(
            out[0].json::<Value>().unwrap()["window_start_ms"],
            json!(-1000)
        );
    }
}
