//! Config shared by the `test-*` plugins, which exist only to exercise the
//! host's failure handling:
//!
//! ```json
//! {"in": "process", "topic": "poison"}
//! ```
//!
//! * `in`: which call misbehaves: `"init"`, `"process"` (default) or `"tick"`.
//! * `topic`: for `process`, misbehave only on batches containing an event
//!   with this topic, so tests can mix good and bad batches. Absent: every
//!   batch.

use serde::Deserialize;
use silt_sdk::{Config, Error, Event};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Call {
    Init,
    #[default]
    Process,
    Tick,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    #[serde(default, rename = "in")]
    pub call: Call,
    #[serde(default)]
    pub topic: Option<String>,
    /// Only used by `test-error`: the message to return.
    #[serde(default)]
    pub message: Option<String>,
}

impl Trigger {
    pub fn from_config(config: &Config) -> Result<Trigger, Error> {
        config.deserialize()
    }

    pub fn on_init(&self) -> bool {
        self.call == Call::Init
    }

    pub fn on_tick(&self) -> bool {
        self.call == Call::Tick
    }

    pub fn on_process(&self, events: &[Event]) -> bool {
        self.call == Call::Process
            && match &self.topic {
                None => true,
                Some(t) => events.iter().any(|e| &e.topic == t),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_to_every_process_call() {
        let t = Trigger::from_config(&Config::default()).unwrap();
        assert!(t.on_process(&[]));
        assert!(!t.on_init() && !t.on_tick());
    }

    #[test]
    fn topic_filter() {
        let c = Config::from_value(json!({"topic": "poison"})).unwrap();
        let t = Trigger::from_config(&c).unwrap();
        assert!(!t.on_process(&[Event::new("ok", 0, vec![])]));
        assert!(t.on_process(&[Event::new("ok", 0, vec![]), Event::new("poison", 0, vec![])]));
    }

    #[test]
    fn rejects_unknown_keys() {
        let c = Config::from_value(json!({"when": "init"})).unwrap();
        assert!(Trigger::from_config(&c).is_err());
    }
}
