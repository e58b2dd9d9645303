//! Progress of a backlog drain, for the log: after an outage a person
//! wants to know how much is left and when it will be done.

use std::time::{Duration, Instant};

/// How often a draining backlog is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct BacklogProgress {
    drain: Option<Drain>,
}

#[derive(Debug)]
struct Drain {
    started: Instant,
    window_start: Instant,
    window_records: u64,
    total_records: u64,
}

/// What to log after an upload.
#[derive(Debug, PartialEq)]
pub enum Report {
    Draining {
        records_left: u64,
        bytes_left: u64,
        records_per_sec: f64,
        eta: Duration,
    },
    Drained {
        records: u64,
        took: Duration,
    },
}

impl BacklogProgress {
    /// Called after each uploaded batch. `backlog` says whether what is
    /// left counts as a backlog (more than a couple of batches).
    pub fn on_upload(
        &mut self,
        records: u64,
        left: (u64, u64),
        backlog: bool,
        now: Instant,
    ) -> Option<Report> {
        let (records_left, bytes_left) = left;
        if !backlog {
            let drain = self.drain.take()?;
            return Some(Report::Drained {
                records: drain.total_records + records,
                took: now - drain.started,
            });
        }
        let drain = self.drain.get_or_insert(Drain {
            started: now,
            window_start: now,
            window_records: 0,
            total_records: 0,
        });
        drain.window_records += records;
        drain.total_records += records;
        let elapsed = now - drain.window_start;
        if elapsed < REPORT_EVERY {
            return None;
        }
        let rate = drain.window_records as f64 / elapsed.as_secs_f64();
        drain.window_start = now;
        drain.window_records = 0;
        Some(Report::Draining {
            records_left,
            bytes_left,
            records_per_sec: rate,
            eta: Duration::from_secs_f64(records_left as f64 / rate.max(1e-9))
                .min(Duration::from_secs(86_400 * 365)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_rate_and_eta_while_draining_then_done() {
        let mut p = BacklogProgress::default();
        let t0 = Instant::now();
        assert_eq!(p.on_upload(1000, (9000, 900_000), true, t0), None);
        assert_eq!(
            p.on_upload(1000, (8000, 800_000), true, t0 + Duration::from_secs(1)),
            None
        );
        let report = p
            .on_upload(3000, (5000, 500_000), true, t0 + Duration::from_secs(5))
            .unwrap();
        let Report::Draining {
            records_left,
            records_per_sec,
            eta,
            ..
        } = report
        else {
            panic!("{report:?}")
        };
        assert_eq!(records_left, 5000);
        assert_eq!(records_per_sec, 1000.0);
        assert_eq!(eta, Duration::from_secs(5));
        let done = p
            .on_upload(5000, (0, 0), false, t0 + Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            done,
            Report::Drained {
                records: 10_000,
                took: Duration::from_secs(10)
            }
        );
        assert_eq!(
            p.on_upload(1, (0, 0), false, t0 + Duration::from_secs(11)),
            None
        );
    }
}
