//! S3 outage under steady load: uploads fail and are retried; once the
//! server is back the backlog drains and every event is in the lake exactly
//! once.

mod harness;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use harness::http::{mixed_requests, spawn_load};
use harness::mqtt::{PubOpts, messages, spawn_publisher};
use harness::*;

const LOAD_SECS: u64 = 25;
const MQTT_RATE: u32 = 600;
const HTTP_RATE: u32 = 120;
const OUTAGE_AT: u64 = 5;
const OUTAGE_SECS: u64 = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_then_drain_exactly_once() {
    let mut st = Stack::start(
        "outage",
        "gw-outage",
        &config::batch(500, "8MiB", "1s"),
        &["plant/#"],
    )
    .await;
    let mut exp = Expected::new(&st.agent_id);
    let msgs = messages(
        "o",
        MQTT_RATE as usize * LOAD_SECS as usize,
        &["plant/line1/temp", "plant/line2/vib"],
        5,
        256,
    );
    for m in &msgs {
        exp.add(&m.id, &m.topic, m.body());
    }
    let reqs = mixed_requests(
        "oh",
        HTTP_RATE as usize * LOAD_SECS as usize,
        &["events"],
        256,
    );
    for r in &reqs {
        for (id, body) in &r.events {
            exp.add(id, &r.stream, body.clone());
        }
    }

    let t_load = Instant::now();
    let (mp, mh) = spawn_publisher(
        st.broker.port,
        "outage-pub",
        msgs,
        PubOpts {
            inflight: 200,
            rate: Some(MQTT_RATE),
            ..Default::default()
        },
    );
    let (hp, hh) = spawn_load(st.http(), reqs, 4, Some(HTTP_RATE));
    let mut lake = st.lake();

    tokio::time::sleep_until((t_load + Duration::from_secs(OUTAGE_AT)).into()).await;
    let before = lake.count().await;
    st.s3.stop();
    let t_down = Instant::now();
    st.note(format!(
        "S3 stopped; lake had {before} records; load so far: mqtt {} acked, http {} acked",
        mp.acked.load(std::sync::atomic::Ordering::Relaxed),
        hp.acked_events.load(std::sync::atomic::Ordering::Relaxed)
    ));
    // The agent must notice (stable WARN); checked at the end so data
    // problems are reported first.
    let warned = st
        .agent
        .wait_log(
            "sink unreachable",
            t_down + Duration::from_secs(OUTAGE_SECS),
        )
        .await;
    st.note(format!("sink unreachable warning: {warned:?}"));

    tokio::time::sleep_until((t_down + Duration::from_secs(OUTAGE_SECS)).into()).await;
    let acked_at_restart = mp.acked.load(std::sync::atomic::Ordering::Relaxed)
        + hp.acked_events.load(std::sync::atomic::Ordering::Relaxed);
    let backlog_at_restart = acked_at_restart.saturating_sub(before);
    st.s3.start_again();
    let t_up = Instant::now();
    st.note(format!(
        "S3 restarted after {:.1?}; ~{backlog_at_restart} acknowledged events were not in the lake",
        t_down.elapsed()
    ));
    // Drain time: until the lake holds as many records as had been
    // acknowledged when S3 came back (load keeps running meanwhile).
    let mut drained_at = None;
    while t_up.elapsed() < Duration::from_secs(120) {
        if lake.count().await >= acked_at_restart {
            drained_at = Some(t_up.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    match drained_at {
        Some(d) => st.note(format!(
            "backlog drained {:.2?} after S3 came back: ~{:.0} events/s (load still running)",
            d,
            backlog_at_restart as f64 / d.as_secs_f64()
        )),
        None => st.note("backlog NOT drained within 120 s of S3 coming back"),
    }

    let mrep = mh.await.unwrap();
    let hrep = hh.await.unwrap();
    let t_load_end = Instant::now();
    st.note(format!(
        "mqtt: {} sent, {} acked, error {:?}; http: {}",
        mrep.sent,
        mrep.acked.len(),
        mrep.error,
        hrep.summary()
    ));
    assert_eq!(
        mrep.acked.len(),
        exp.events.keys().filter(|k| k.starts_with("o-")).count(),
        "broker must PUBACK every message"
    );
    assert_eq!(
        hrep.acked.len(),
        HTTP_RATE as usize * LOAD_SECS as usize,
        "every HTTP event must get 202 (spool is large): {}",
        hrep.summary()
    );

    let all: HashSet<String> = exp.events.keys().cloned().collect();
    let res = lake.wait_for(&all, harness::deadline(180), st.t0).await;
    let drain = t_up.elapsed();
    match &res {
        Ok(_) => st.note(format!(
            "all {} events in the lake {:.2?} after S3 came back ({:.2?} after load end)",
            all.len(),
            drain,
            t_load_end.elapsed()
        )),
        Err(e) => st.note(format!("drain failed: {e}")),
    }
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.expect("read lake");
    let v = Verdict::compute(&exp, &all, &snap);
    st.note(v.summary());
    v.assert_exactly_once();
    res.expect("lake should hold every event before SIGTERM");
    warned.expect("agent should log a `sink unreachable` WARN while S3 is down");
}
