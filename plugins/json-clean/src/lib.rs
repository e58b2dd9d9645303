//! `json-clean`: tidy JSON object payloads field by field.
//!
//! Config (every key optional):
//!
//! ```json
//! {
//!   "remove":   ["debug", "rssi"],
//!   "rename":   {"temp": "temperature_c", "dev": "device"},
//!   "convert":  {"temperature_c": {"from": "F", "to": "C", "decimals": 2}},
//!   "required": ["device", "temperature_c"],
//!   "on_invalid": "drop"
//! }
//! ```
//!
//! Steps, in this order, on each event's top-level fields:
//! 1. `remove` deletes the listed fields.
//! 2. `rename` renames fields in place (field order is kept). If the new
//!    name already exists, the renamed value replaces it.
//! 3. `convert` converts numeric fields (by their new names) between units:
//!    temperature `C F K`, pressure `Pa hPa kPa bar mbar psi inHg`, speed
//!    `m/s km/h mph kn`, length `mm cm m km in ft mi`, mass `g kg lb oz`,
//!    energy `J kJ Wh kWh`. Numeric strings (`"71.6"`) are accepted and
//!    become numbers. `decimals` rounds the result (default: no rounding).
//!    A value that is not a number is removed, so `required` can catch it;
//!    an absent field is left absent.
//! 4. `required`: events missing any listed field (or having it `null`)
//!    are dropped.
//!
//! Payloads that are not a JSON object are dropped (`"on_invalid": "drop"`,
//! the default) or passed through untouched (`"keep"`). Drops are counted
//! and logged at debug level per batch; they are not errors, so they never
//! send a batch to the dead-letter directory. Topic, timestamp and
//! attributes are never changed.

mod units;

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Map, Number, Value};
use silt_sdk::{Config, Error, Event, Transform, log};

pub use units::Conversion;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    rename: HashMap<String, String>,
    #[serde(default)]
    convert: HashMap<String, ConvertSpec>,
    #[serde(default)]
    required: Vec<String>,
    #[serde(default)]
    on_invalid: OnInvalid,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvertSpec {
    from: String,
    to: String,
    decimals: Option<u8>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum OnInvalid {
    #[default]
    Drop,
    Keep,
}

pub struct JsonClean {
    remove: Vec<String>,
    rename: HashMap<String, String>,
    convert: Vec<(String, Conversion, Option<u8>)>,
    required: Vec<String>,
    on_invalid: OnInvalid,
}

/// What became of one event.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Kept,
    NotAnObject,
    MissingRequired,
}

impl JsonClean {
    fn clean(&self, event: &mut Event) -> Outcome {
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&event.payload) else {
            return Outcome::NotAnObject;
        };
        let mut fields = self.rename_fields(fields);
        for (field, conversion, decimals) in &self.convert {
            let Some(value) = fields.get_mut(field) else {
                continue;
            };
            match as_f64(value).map(|v| round(conversion.apply(v), *decimals)) {
                Some(converted) => match Number::from_f64(converted) {
                    Some(n) => *value = Value::Number(n),
                    None => {
                        fields.shift_remove(field);
                    }
                },
                None => {
                    fields.shift_remove(field);
                }
            }
        }
        if self
            .required
            .iter()
            .any(|f| fields.get(f).is_none_or(Value::is_null))
        {
            return Outcome::MissingRequired;
        }
        event.payload = Value::Object(fields).to_string().into_bytes();
        Outcome::Kept
    }

    fn rename_fields(&self, fields: Map<String, Value>) -> Map<String, Value> {
        let mut out = Map::with_capacity(fields.len());
        for (key, value) in fields {
            if self.remove.contains(&key) {
                continue;
            }
            let renamed = self.rename.get(&key);
            let is_renamed = renamed.is_some();
            let name = renamed.cloned().unwrap_or(key);
            // An original field that a rename targets loses to the renamed
            // value, whichever comes first in the object.
            if !is_renamed && out.contains_key(&name) {
                continue;
            }
            out.insert(name, value);
        }
        out
    }
}

fn as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|v| v.is_finite()),
        _ => None,
    }
}

fn round(value: f64, decimals: Option<u8>) -> f64 {
    match decimals {
        Some(d) => {
            let factor = 10f64.powi(i32::from(d.min(15)));
            (value * factor).round() / factor
        }
        None => value,
    }
}

impl Transform for JsonClean {
    fn init(config: Config) -> Result<Self, Error> {
        let s: Settings = config.deserialize()?;
        let mut convert = Vec::with_capacity(s.convert.len());
        for (field, spec) in s.convert {
            let conversion = Conversion::new(&spec.from, &spec.to)
                .map_err(|e| Error::new(format!("json-clean: convert.{field}: {e}")))?;
            convert.push((field, conversion, spec.decimals));
        }
        // HashMap order is random; a fixed order keeps output reproducible.
        convert.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(JsonClean {
            remove: s.remove,
            rename: s.rename,
            convert,
            required: s.required,
            on_invalid: s.on_invalid,
        })
    }

    fn process(&mut self, mut events: Vec<Event>) -> Result<Vec<Event>, Error> {
        let before = events.len();
        let (mut invalid, mut incomplete) = (0usize, 0usize);
        events.retain_mut(|event| match self.clean(event) {
            Outcome::Kept => true,
            Outcome::NotAnObject => {
                invalid += 1;
                self.on_invalid == OnInvalid::Keep
            }
            Outcome::MissingRequired => {
                incomplete += 1;
                false
            }
        });
        if events.len() < before {
            log::debug!(
                "json-clean: dropped {} of {before} events ({invalid} not JSON objects, {incomplete} missing required fields)",
                before - events.len()
            );
        }
        Ok(events)
    }
}

silt_sdk::export!(JsonClean);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(config: Value) -> JsonClean {
        JsonClean::init(Config::from_value(config).unwrap()).unwrap()
    }

    fn run(p: &mut JsonClean, payloads: &[Value]) -> Vec<Value> {
        let events = payloads
            .iter()
            .map(|v| Event::from_json("t", v).unwrap())
            .collect();
        p.process(events)
            .unwrap()
            .iter()
            .map(|e| e.json().unwrap())
            .collect()
    }

    #[test]
    fn renames_converts_and_requires() {
        let mut p = plugin(json!({
            "rename": {"temp": "temperature_c"},
            "convert": {"temperature_c": {"from": "F", "to": "C", "decimals": 1}},
            "required": ["device", "temperature_c"],
        }));
        let out = run(
            &mut p,
            &[
                json!({"device": "a", "temp": 212}),
                json!({"device": "b", "temp": "50"}),
                json!({"temp": 50}),
                json!({"device": "c", "temp": "warm"}),
                json!({"device": "d", "temp": null}),
            ],
        );
        assert_eq!(
            out,
            vec![
                json!({"device": "a", "temperature_c": 100.0}),
                json!({"device": "b", "temperature_c": 10.0}),
            ]
        );
    }

    #[test]
    fn rename_keeps_field_order_and_wins_collisions() {
        let mut p = plugin(json!({"rename": {"t": "temp"}, "remove": ["x"]}));
        let out = run(
            &mut p,
            &[json!({"a": 1, "temp": 0, "t": 5, "x": 9, "z": 2})],
        );
        let keys: Vec<_> = out[0].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["a", "temp", "z"]);
        assert_eq!(out[0]["temp"], json!(5));
    }

    #[test]
    fn invalid_payloads() {
        let bad = Event::new("t", 1, b"not json".to_vec());
        let list = Event::new("t", 1, b"[1,2]".to_vec());
        let mut drop = plugin(json!({}));
        assert!(
            drop.process(vec![bad.clone(), list.clone()])
                .unwrap()
                .is_empty()
        );
        let mut keep = plugin(json!({"on_invalid": "keep"}));
        assert_eq!(keep.process(vec![bad.clone()]).unwrap(), vec![bad]);
    }

    #[test]
    fn keeps_metadata() {
        let mut p = plugin(json!({}));
        let mut e = Event::new("sensors/x", 42, br#"{"a":1}"#.to_vec());
        e.set_attr("site", "north");
        assert_eq!(p.process(vec![e.clone()]).unwrap(), vec![e]);
    }

    #[test]
    fn config_errors_are_specific() {
        let err = JsonClean::init(
            Config::from_value(json!({"convert": {"t": {"from": "F", "to": "kg"}}})).unwrap(),
        )
        .err()
        .unwrap();
        assert!(err.message().contains("convert.t"), "{err}");
        let err = JsonClean::init(Config::from_value(json!({"renmae": {}})).unwrap())
            .err()
            .unwrap();
        assert!(err.message().contains("unknown field"), "{err}");
    }
}
