use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

/// One event as the plugin sees it. Same fields as the agent's event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// MQTT topic or HTTP stream name.
    pub topic: String,
    /// Milliseconds since the Unix epoch (UTC) when silt received the event.
    pub ts_ms: i64,
    /// Key/value pairs; sinks can partition objects by them.
    pub attributes: Vec<(String, String)>,
    /// Raw payload bytes, usually JSON.
    pub payload: Vec<u8>,
}

impl Event {
    pub fn new(topic: impl Into<String>, ts_ms: i64, payload: impl Into<Vec<u8>>) -> Self {
        Event {
            topic: topic.into(),
            ts_ms,
            attributes: Vec::new(),
            payload: payload.into(),
        }
    }

    /// A new event whose payload is `value` serialized as JSON, stamped with
    /// the current wall clock. Use [`Event::with_ts`] to set another time,
    /// e.g. the end of an aggregation window.
    pub fn from_json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        value: &T,
    ) -> Result<Event, Error> {
        Ok(Event::new(topic, now_ms(), serde_json::to_vec(value)?))
    }

    pub fn with_ts(mut self, ts_ms: i64) -> Self {
        self.ts_ms = ts_ms;
        self
    }

    /// Parse the payload as JSON into `T` (use `serde_json::Value` when the
    /// shape is not fixed).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::new(format!(
                "payload on topic `{}` is not the expected JSON: {e}",
                self.topic
            ))
        })
    }

    /// Replace the payload with `value` serialized as JSON.
    pub fn set_json<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.payload = serde_json::to_vec(value)?;
        Ok(())
    }

    /// The first attribute called `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Set attribute `name`, replacing an existing value so the name stays unique.
    pub fn set_attr(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.attributes.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.attributes.push((name, value)),
        }
    }

    /// Remove attribute `name`, returning its value if it was set.
    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let i = self.attributes.iter().position(|(k, _)| k == name)?;
        Some(self.attributes.remove(i).1)
    }
}

/// Wall clock in ms since the Unix epoch (WASI's clock inside the agent).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn json_round_trip() {
        let e = Event::from_json("t", &json!({"a": 1})).unwrap().with_ts(7);
        assert_eq!(e.ts_ms, 7);
        assert_eq!(e.json::<Value>().unwrap(), json!({"a": 1}));
    }

    #[test]
    fn bad_json_names_topic() {
        let e = Event::new("sensors/x", 0, b"nope".to_vec());
        let err = e.json::<Value>().unwrap_err();
        assert!(err.message().contains("sensors/x"), "{err}");
    }

    #[test]
    fn attributes_stay_unique() {
        let mut e = Event::default();
        e.set_attr("site", "a");
        e.set_attr("site", "b");
        assert_eq!(e.attributes, vec![("site".into(), "b".into())]);
        assert_eq!(e.attr("site"), Some("b"));
        assert_eq!(e.remove_attr("site").as_deref(), Some("b"));
        assert_eq!(e.attr("site"), None);
    }
}
