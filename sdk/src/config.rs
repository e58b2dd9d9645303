use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::Error;

/// The plugin's config table from the agent config, as a JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    table: Map<String, Value>,
}

impl Config {
    /// Parse the JSON the host passes to `init`. Empty input means "no
    /// config" so hosts and tests need not spell out `{}`.
    pub fn parse(json: &str) -> Result<Config, Error> {
        if json.trim().is_empty() {
            return Ok(Config::default());
        }
        match serde_json::from_str(json) {
            Ok(Value::Object(table)) => Ok(Config { table }),
            Ok(other) => Err(Error::new(format!(
                "plugin config must be a table (JSON object), got {}",
                kind(&other)
            ))),
            Err(e) => Err(Error::new(format!("plugin config is not valid JSON: {e}"))),
        }
    }

    /// Build a config from a JSON value, e.g. `serde_json::json!({..})` in tests.
    pub fn from_value(value: Value) -> Result<Config, Error> {
        Config::parse(&value.to_string())
    }

    /// Deserialize the whole table into `T`, typically a
    /// `#[derive(Deserialize)] #[serde(deny_unknown_fields)]` struct so
    /// typos in the agent config are reported rather than ignored.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_value(Value::Object(self.table.clone()))
            .map_err(|e| Error::new(format!("invalid plugin config: {e}")))
    }

    /// One key of the table; `Ok(None)` when it is absent or null.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        match self.table.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| Error::new(format!("invalid plugin config key `{key}`: {e}"))),
        }
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.table
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn empty_is_default() {
        assert_eq!(Config::parse("  ").unwrap(), Config::default());
    }

    #[test]
    fn rejects_non_object() {
        let err = Config::parse("[1]").unwrap_err();
        assert!(err.message().contains("an array"), "{err}");
    }

    #[test]
    fn get_and_deserialize() {
        #[derive(Deserialize)]
        struct C {
            window_ms: u64,
        }
        let c = Config::parse(r#"{"window_ms": 5, "key": null}"#).unwrap();
        assert_eq!(c.get::<u64>("window_ms").unwrap(), Some(5));
        assert_eq!(c.get::<String>("key").unwrap(), None);
        assert_eq!(c.get::<String>("missing").unwrap(), None);
        assert!(c.get::<String>("window_ms").is_err());
        assert_eq!(c.deserialize::<C>().unwrap().window_ms, 5);
    }
}
