//! `test-loop` (test only): spins forever, to check that the host's per-call
//! timeout interrupts it and the agent carries on. Config: see `test-trigger`
//! (`{"in": "init"|"process"|"tick", "topic": ".."}`).

use silt_sdk::{Config, Error, Event, Transform};
use test_trigger::Trigger;

pub struct Loop {
    trigger: Trigger,
}

/// Never returns. `black_box` keeps the optimiser from proving the loop
/// side-effect free; the host can only stop it from outside.
pub fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

impl Transform for Loop {
    fn init(config: Config) -> Result<Self, Error> {
        let trigger = Trigger::from_config(&config)?;
        if trigger.on_init() {
            spin();
        }
        Ok(Loop { trigger })
    }

    fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
        if self.trigger.on_process(&events) {
            spin();
        }
        Ok(events)
    }

    fn tick(&mut self, _now_ms: u64) -> Result<Vec<Event>, Error> {
        if self.trigger.on_tick() {
            spin();
        }
        Ok(Vec::new())
    }
}

silt_sdk::export!(Loop);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn passes_batches_without_the_trigger_topic() {
        let config = Config::from_value(json!({"topic": "poison"})).unwrap();
        let mut p = Loop::init(config).unwrap();
        let batch = vec![Event::new("fine", 1, b"{}".to_vec())];
        assert_eq!(p.process(batch.clone()).unwrap(), batch);
        assert!(p.tick(0).unwrap().is_empty());
    }
}
