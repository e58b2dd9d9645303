//! `test-membomb` (test only): allocates (and touches) memory without bound,
//! to check that the host's memory limit stops it. Config: see
//! `test-trigger` (`{"in": "init"|"process"|"tick", "topic": ".."}`).

use silt_sdk::{Config, Error, Event, Transform};
use test_trigger::Trigger;

pub struct MemBomb {
    trigger: Trigger,
}

/// Grows a heap in 1 MiB steps until allocation fails, which aborts (traps)
/// the instance. Writing to every chunk makes the memory real.
pub fn explode() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![0xA5; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

impl Transform for MemBomb {
    fn init(config: Config) -> Result<Self, Error> {
        let trigger = Trigger::from_config(&config)?;
        if trigger.on_init() {
            explode();
        }
        Ok(MemBomb { trigger })
    }

    fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
        if self.trigger.on_process(&events) {
            explode();
        }
        Ok(events)
    }

    fn tick(&mut self, _now_ms: u64) -> Result<Vec<Event>, Error> {
        if self.trigger.on_tick() {
            explode();
        }
        Ok(Vec::new())
    }
}

silt_sdk::export!(MemBomb);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn passes_batches_without_the_trigger_topic() {
        let config = Config::from_value(json!({"topic": "poison"})).unwrap();
        let mut p = MemBomb::init(config).unwrap();
        let batch = vec![Event::new("fine", 1, b"{}".to_vec())];
        assert_eq!(p.process(batch.clone()).unwrap(), batch);
    }
}
