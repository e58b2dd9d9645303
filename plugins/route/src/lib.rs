//! `route`: copy a JSON field into an event attribute, so sinks can
//! partition objects by it (e.g. a key template `site={site}/...`).
//!
//! Config:
//!
//! ```json
//! {"field": "meta.site", "attribute": "site", "default": "unknown"}
//! ```
//!
//! * `field` (required): dotted path of the JSON field to read.
//! * `attribute` (default: the last segment of `field`): attribute to set;
//!   an existing attribute of that name is replaced.
//! * `default`: value used when the payload is not JSON or lacks the field.
//!   Without it such events pass through without the attribute.
//!
//! Values become text (strings as-is, other JSON as compact JSON), then are
//! made safe for object keys: every character outside `A-Z a-z 0-9 . _ -`
//! becomes `_`, and the result is cut to 128 bytes. An empty result counts
//! as missing. Payloads are never changed.

use serde::Deserialize;
use serde_json::Value;
use silt_sdk::json::{get_path, to_key_string};
use silt_sdk::{Config, Error, Event, Transform};

const MAX_LEN: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    field: String,
    #[serde(default)]
    attribute: Option<String>,
    #[serde(default)]
    default: Option<String>,
}

pub struct Route {
    field: String,
    attribute: String,
    default: Option<String>,
}

/// Make `raw` usable as one path segment of an object key.
pub fn sanitize(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_LEN)
        .collect()
}

impl Route {
    fn value_for(&self, event: &Event) -> Option<String> {
        let payload: Value = serde_json::from_slice(&event.payload).ok()?;
        let raw = to_key_string(get_path(&payload, &self.field)?);
        Some(sanitize(&raw)).filter(|v| !v.is_empty())
    }
}

impl Transform for Route {
    fn init(config: Config) -> Result<Self, Error> {
        let s: Settings = config.deserialize()?;
        if s.field.is_empty() {
            return Err(Error::new(
                "route: `field` must name a JSON field, e.g. \"site\"",
            ));
        }
        let attribute = s
            .attribute
            .unwrap_or_else(|| s.field.rsplit('.').next().unwrap_or(&s.field).to_string());
        let default = s.default.map(|d| sanitize(&d)).filter(|d| !d.is_empty());
        Ok(Route {
            field: s.field,
            attribute,
            default,
        })
    }

    fn process(&mut self, mut events: Vec<Event>) -> Result<Vec<Event>, Error> {
        for event in &mut events {
            if let Some(v) = self.value_for(event).or_else(|| self.default.clone()) {
                event.set_attr(self.attribute.clone(), v);
            }
        }
        Ok(events)
    }
}

silt_sdk::export!(Route);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(config: Value) -> Route {
        Route::init(Config::from_value(config).unwrap()).unwrap()
    }

    fn attr_of(p: &mut Route, payload: &[u8]) -> Option<String> {
        let out = p
            .process(vec![Event::new("t", 0, payload.to_vec())])
            .unwrap();
        out[0].attr(&p.attribute).map(str::to_string)
    }

    #[test]
    fn sets_attribute_from_nested_field() {
        let mut p = plugin(json!({"field": "meta.site"}));
        assert_eq!(p.attribute, "site");
        assert_eq!(
            attr_of(&mut p, br#"{"meta":{"site":"north-1"}}"#).as_deref(),
            Some("north-1")
        );
        assert_eq!(
            attr_of(&mut p, br#"{"meta":{"site":7}}"#).as_deref(),
            Some("7")
        );
        assert_eq!(attr_of(&mut p, br#"{"meta":{}}"#), None);
        assert_eq!(attr_of(&mut p, b"garbage"), None);
    }

    #[test]
    fn default_and_replacement() {
        let mut p = plugin(json!({"field": "site", "attribute": "s", "default": "un known"}));
        assert_eq!(attr_of(&mut p, b"{}").as_deref(), Some("un_known"));
        let mut e = Event::new("t", 0, br#"{"site":"b"}"#.to_vec());
        e.set_attr("s", "old");
        let out = p.process(vec![e]).unwrap();
        assert_eq!(out[0].attributes, vec![("s".to_string(), "b".to_string())]);
    }

    #[test]
    fn sanitizes_for_object_keys() {
        assert_eq!(sanitize("../etc/passwd"), ".._etc_passwd");
        assert_eq!(sanitize("a b/ü"), "a_b__");
        assert_eq!(sanitize(&"x".repeat(500)).len(), MAX_LEN);
    }
}
