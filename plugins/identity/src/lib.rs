//! `identity`: returns every batch unchanged and never emits on `tick`.
//!
//! Exists to measure the fixed cost of the plugin boundary (copying events
//! into and out of the component) in benchmarks. Config: none (`{}`).

use silt_sdk::{Config, Error, Event, Transform};

pub struct Identity;

impl Transform for Identity {
    fn init(_config: Config) -> Result<Self, Error> {
        Ok(Identity)
    }

    fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
        Ok(events)
    }
}

silt_sdk::export!(Identity);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_through() {
        let mut p = Identity::init(Config::default()).unwrap();
        let batch = vec![
            Event::new("a", 1, b"x".to_vec()),
            Event::new("b", 2, b"{}".to_vec()),
        ];
        assert_eq!(p.process(batch.clone()).unwrap(), batch);
        assert!(p.tick(0).unwrap().is_empty());
    }
}
