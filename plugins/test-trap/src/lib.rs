//! `test-trap` (test only): panics, which in a wasm32 plugin aborts the
//! instance with an `unreachable` trap, to check that the host survives and
//! dead-letters the batch. Config: see `test-trigger`
//! (`{"in": "init"|"process"|"tick", "topic": ".."}`).

use silt_sdk::{Config, Error, Event, Transform};
use test_trigger::Trigger;

pub struct Trap {
    trigger: Trigger,
}

impl Transform for Trap {
    fn init(config: Config) -> Result<Self, Error> {
        let trigger = Trigger::from_config(&config)?;
        if trigger.on_init() {
            panic!("test-trap: configured to panic in init");
        }
        Ok(Trap { trigger })
    }

    fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
        if self.trigger.on_process(&events) {
            panic!("test-trap: configured to panic in process");
        }
        Ok(events)
    }

    fn tick(&mut self, _now_ms: u64) -> Result<Vec<Event>, Error> {
        if self.trigger.on_tick() {
            panic!("test-trap: configured to panic in tick");
        }
        Ok(Vec::new())
    }
}

silt_sdk::export!(Trap);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    #[should_panic(expected = "panic in process")]
    fn panics_on_trigger_topic() {
        let config = Config::from_value(json!({"topic": "poison"})).unwrap();
        let mut p = Trap::init(config).unwrap();
        let ok = vec![Event::new("fine", 1, b"{}".to_vec())];
        assert_eq!(p.process(ok.clone()).unwrap(), ok);
        let _ = p.process(vec![Event::new("poison", 1, b"{}".to_vec())]);
    }
}
