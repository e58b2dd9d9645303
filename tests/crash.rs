//! SIGKILL the agent mid-stream and restart it on the same data dir: every
//! acknowledged event (PUBACKed by the broker, 202 from the agent) must reach
//! the lake at least once.

mod harness;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::http::{mixed_requests, spawn_load};
use harness::mqtt::{PubOpts, messages, spawn_publisher};
use harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_keeps_acknowledged_events() {
    let mut st = Stack::start(
        "crash",
        "gw-crash",
        &config::batch(1_000, "8MiB", "2s"),
        &["fleet/#"],
    )
    .await;
    let mut exp = Expected::new(&st.agent_id);
    const SECS: usize = 14;
    let msgs = messages(
        "c",
        1_000 * SECS,
        &["fleet/truck-1/gps", "fleet/truck-2/can"],
        3,
        256,
    );
    for m in &msgs {
        exp.add(&m.id, &m.topic, m.body());
    }
    let reqs = mixed_requests("ch", 250 * SECS, &["telemetry"], 256);
    for r in &reqs {
        for (id, body) in &r.events {
            exp.add(id, &r.stream, body.clone());
        }
    }
    let t_load = Instant::now();
    let (mp, mh) = spawn_publisher(
        st.broker.port,
        "crash-pub",
        msgs,
        PubOpts {
            inflight: 200,
            rate: Some(1_000),
            ..Default::default()
        },
    );
    let (hp, hh) = spawn_load(st.http(), reqs, 4, Some(250));

    // Two crashes: one early, one while the restarted agent is catching up on
    // the broker's queue and its own spool.
    for (kill_at, down_for) in [(4u64, 2u64), (9, 1)] {
        tokio::time::sleep_until((t_load + Duration::from_secs(kill_at)).into()).await;
        let pid = st.agent.pid();
        st.agent.kill9();
        st.note(format!(
            "SIGKILLed agent (pid {pid:?}); so far mqtt {} acked, http {} acked",
            mp.acked.load(Ordering::Relaxed),
            hp.acked_events.load(Ordering::Relaxed)
        ));
        tokio::time::sleep(Duration::from_secs(down_for)).await;
        st.agent.spawn();
        st.agent
            .wait_ready(&[("mqtt subscribed", 1), ("http listening", 1)], 60)
            .await;
        st.note(format!("agent restarted (run #{})", st.agent.runs));
    }

    let mrep = mh.await.unwrap();
    let hrep = hh.await.unwrap();
    st.note(format!(
        "mqtt: {} sent, {} acked, error {:?}",
        mrep.sent,
        mrep.acked.len(),
        mrep.error
    ));
    st.note(format!("http: {}", hrep.summary()));
    assert_eq!(
        mrep.acked.len(),
        mrep.sent,
        "the broker (not the agent) acks MQTT; it should ack all"
    );
    assert!(
        hrep.acked.len() > 250 * SECS / 2,
        "most HTTP requests should succeed: {}",
        hrep.summary()
    );

    let acked: HashSet<String> = mrep.acked.iter().chain(&hrep.acked).cloned().collect();
    let mut lake = st.lake();
    let res = lake.wait_for(&acked, harness::deadline(120), st.t0).await;
    st.note(format!(
        "wait for acknowledged events: {:?}",
        res.as_ref().map(|s| s.records.len())
    ));
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.expect("read lake");
    let v = Verdict::compute(&exp, &acked, &snap);
    st.note(v.summary());
    v.assert_at_least_once();
    let dup_extra: usize = v.duplicated.iter().map(|(_, c)| c - 1).sum();
    st.note(format!(
        "at-least-once OK: {} acknowledged events present; {} unacknowledged also present; {dup_extra} duplicate copies (allowed after SIGKILL)",
        acked.len(),
        v.distinct - acked.len()
    ));
}

/// Events spooled while S3 is down survive a SIGKILL and are uploaded by the
/// next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_outage_keeps_spooled_events() {
    let mut st = Stack::start(
        "crash-spool",
        "gw-spool",
        &config::batch(300, "8MiB", "1s"),
        &["spool/#"],
    )
    .await;
    st.s3.stop();
    let mut exp = Expected::new(&st.agent_id);
    let reqs = mixed_requests("sp", 2_000, &["buffered"], 256);
    for r in &reqs {
        for (id, body) in &r.events {
            exp.add(id, &r.stream, body.clone());
        }
    }
    let (_p, h) = spawn_load(st.http(), reqs, 4, None);
    let rep = h.await.unwrap();
    assert_eq!(
        rep.acked.len(),
        2_000,
        "all events must be accepted while S3 is down: {}",
        rep.summary()
    );
    // Let some batches seal (max_age 1s) and fail to upload, then crash.
    let _ = st
        .agent
        .wait_log("sink unreachable", harness::deadline(15))
        .await;
    st.agent.kill9();
    st.note("SIGKILLed agent with 2,000 spooled events; S3 back, agent restarted");
    st.s3.start_again();
    st.agent.spawn();
    st.agent.wait_ready(&[("silt running", 1)], 60).await;
    let acked: HashSet<String> = rep.acked.iter().cloned().collect();
    let mut lake = st.lake();
    let res = lake.wait_for(&acked, harness::deadline(60), st.t0).await;
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.expect("read lake");
    let v = Verdict::compute(&exp, &acked, &snap);
    st.note(v.summary());
    v.assert_at_least_once();
    res.expect("spooled events should be uploaded by the restarted agent");
}
