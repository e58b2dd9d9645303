//! `test-error` (test only): returns an error (no trap), to check dead-letter
//! handling of a well-behaved failure. Config: see `test-trigger`, plus
//! `"message"` for the error text (default "test-error: configured to fail").

use silt_sdk::{Config, Error, Event, Transform};
use test_trigger::Trigger;

pub struct Fail {
    trigger: Trigger,
}

impl Fail {
    fn error(&self) -> Error {
        Error::new(
            self.trigger
                .message
                .as_deref()
                .unwrap_or("test-error: configured to fail"),
        )
    }
}

impl Transform for Fail {
    fn init(config: Config) -> Result<Self, Error> {
        let trigger = Trigger::from_config(&config)?;
        let plugin = Fail { trigger };
        if plugin.trigger.on_init() {
            return Err(plugin.error());
        }
        Ok(plugin)
    }

    fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
        if self.trigger.on_process(&events) {
            return Err(self.error());
        }
        Ok(events)
    }

    fn tick(&mut self, _now_ms: u64) -> Result<Vec<Event>, Error> {
        if self.trigger.on_tick() {
            return Err(self.error());
        }
        Ok(Vec::new())
    }
}

silt_sdk::export!(Fail);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fails_only_on_trigger_topic() {
        let config = Config::from_value(json!({"topic": "poison", "message": "boom"})).unwrap();
        let mut p = Fail::init(config).unwrap();
        let ok = vec![Event::new("fine", 1, b"{}".to_vec())];
        assert_eq!(p.process(ok.clone()).unwrap(), ok);
        let err = p
            .process(vec![Event::new("poison", 1, vec![])])
            .unwrap_err();
        assert_eq!(err.message(), "boom");
    }

    #[test]
    fn init_failure() {
        let config = Config::from_value(json!({"in": "init"})).unwrap();
        assert!(Fail::init(config).is_err());
    }
}
