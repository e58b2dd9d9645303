//! The stage between sources and the spool: route each source's events to
//! the sinks that read it and commit them, so a source can acknowledge.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Config;
use crate::event::Event;
use crate::spool::{AppendOutcome, SinkId, Spool, SpoolError};

/// What sources hold to hand events in. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    spool: Spool,
    routes: Arc<HashMap<String, Vec<SinkId>>>,
    drops: Arc<DropCounter>,
}

impl Ingest {
    pub fn new(config: &Config, spool: Spool) -> Ingest {
        let routes = config
            .sources
            .keys()
            .map(|source| {
                let sinks = config
                    .sinks_reached_from(source)
                    .into_iter()
                    .filter_map(|sink| spool.sink_id(sink))
                    .collect();
                (source.clone(), sinks)
            })
            .collect();
        Ingest {
            spool,
            routes: Arc::new(routes),
            drops: Arc::new(DropCounter::default()),
        }
    }

    /// Commits events from `source`; returns once they are on disk (or were
    /// dropped by the `when_full` policy, which the outcome says).
    pub async fn ingest(&self, source: &str, events: Vec<Event>) -> Result<AppendOutcome, SpoolError> {
        let sinks = self.routes.get(source).map(Vec::as_slice).unwrap_or_default();
        let outcome = self.spool.append(sinks, events).await?;
        if outcome.dropped_new > 0 || outcome.dropped_old > 0 {
            self.drops.record(source, &outcome);
        }
        Ok(outcome)
    }

    /// Waits until the spool frees space (or `timeout` passes).
    pub async fn space_freed(&self, timeout: Duration) {
        self.spool.space_freed(timeout).await
    }
}

/// Totals of events dropped because the spool was full, logged at most
/// once per interval so a long overflow does not flood the log.
#[derive(Default)]
struct DropCounter {
    new: AtomicU64,
    old: AtomicU64,
    last_log_ms: AtomicU64,
}

impl DropCounter {
    fn record(&self, source: &str, outcome: &AppendOutcome) {
        let new = self.new.fetch_add(outcome.dropped_new as u64, Ordering::Relaxed) + outcome.dropped_new as u64;
        let old = self.old.fetch_add(outcome.dropped_old, Ordering::Relaxed) + outcome.dropped_old;
        let now = crate::event::now_ms() as u64;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                source,
                dropped_newest_total = new,
                dropped_oldest_total = old,
                "spool full: events dropped by spool.when_full"
            );
        }
    }
}
