//! Hot reload: a valid config change is applied under load with no event
//! lost or duplicated; an invalid one is rejected and the old pipeline keeps
//! running.

mod harness;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use harness::config;
use harness::http::spawn_load;
use harness::mqtt::{PubOpts, messages, spawn_publisher};
use harness::{Expected, Stack, Verdict};

const N: usize = 6_000;

fn expected(st: &Stack, msgs: &[harness::mqtt::Msg]) -> Expected {
    let mut exp = Expected::new(&st.agent_id);
    for m in msgs {
        exp.add(&m.id, &m.topic, m.body());
    }
    exp
}

/// The stack's config with other batch settings: a change that rebuilds the
/// sink while the same spool and MQTT session carry on.
fn changed_config(st: &Stack, batch: &str) -> String {
    std::fs::read_to_string(&st.agent.config)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("batch = ") {
                format!("batch = {batch}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_change_is_applied_under_load_without_loss_or_duplicates() {
    let mut st = Stack::start(
        "reload-ok",
        "gw-reload",
        &config::batch(500, "8MiB", "1s"),
        &["rl/#"],
    )
    .await;
    let msgs = messages("r", N, &["rl/a", "rl/b"], 5, 200);
    let exp = expected(&st, &msgs);
    let (progress, publisher) = spawn_publisher(
        st.broker.port,
        "reload-pub",
        msgs,
        PubOpts {
            rate: Some(1_500),
            ..Default::default()
        },
    );

    // Rewrite the config twice while messages flow (the file watcher
    // reloads), then ask with SIGHUP.
    let progress_acked = |p: &harness::mqtt::Progress| p.acked.load(Ordering::Relaxed);
    harness::wait_until(harness::deadline(30), "a quarter published", || {
        progress_acked(&progress) > N / 4
    })
    .await
    .unwrap();
    std::fs::write(
        &st.agent.config,
        changed_config(&st, &config::batch(300, "8MiB", "2s")),
    )
    .unwrap();
    st.agent
        .wait_log_n("reload applied", 1, harness::deadline(30))
        .await
        .unwrap();
    st.note("first reload applied");
    harness::wait_until(harness::deadline(30), "half published", || {
        progress_acked(&progress) > N / 2
    })
    .await
    .unwrap();
    std::fs::write(
        &st.agent.config,
        changed_config(&st, &config::batch(700, "8MiB", "1s")),
    )
    .unwrap();
    st.agent
        .wait_log_n("reload applied", 2, harness::deadline(30))
        .await
        .unwrap();
    st.note("second reload applied");
    let pid = st.agent.pid().expect("agent runs") as i32;
    // SAFETY: kill(2) on the agent's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    st.agent
        .wait_log_n("reload applied", 3, harness::deadline(30))
        .await
        .unwrap();
    st.note("SIGHUP reload applied");

    let report = publisher.await.unwrap();
    assert_eq!(
        report.acked.len(),
        N,
        "broker must PUBACK every message: {:?}",
        report.error
    );
    let mut lake = st.lake();
    let ids: HashSet<String> = report.acked.iter().cloned().collect();
    lake.wait_for(&ids, harness::deadline(120), st.t0)
        .await
        .unwrap();
    st.stop_agent_cleanly().await;

    let snap = lake.snapshot().await.unwrap();
    let verdict = Verdict::compute(&exp, &report.acked, &snap);
    st.note(verdict.summary());
    verdict.assert_exactly_once();
    assert!(st.agent.count_log("reload applied") >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_change_is_rejected_and_the_old_pipeline_keeps_running() {
    let mut st = Stack::start(
        "reload-bad",
        "gw-reload-bad",
        &config::batch(100, "8MiB", "1s"),
        &["rb/#"],
    )
    .await;
    let good = std::fs::read_to_string(&st.agent.config).unwrap();
    std::fs::write(
        &st.agent.config,
        format!("{good}\n[sinks.lake2]\ntype = \"file\"\ninputs = [\"nope\"]\npath = \"/tmp\"\n"),
    )
    .unwrap();
    st.agent
        .wait_log_n("reload rejected", 1, harness::deadline(30))
        .await
        .unwrap();
    // A bad plugin path is refused too, before anything stops.
    std::fs::write(
        &st.agent.config,
        format!("{good}\n[transforms.t]\nplugin = \"/does/not/exist.wasm\"\ninputs = [\"api\"]\n"),
    )
    .unwrap();
    st.agent
        .wait_log_n("reload rejected", 2, harness::deadline(30))
        .await
        .unwrap();
    assert_eq!(st.agent.count_log("reload applied"), 0);
    assert!(
        st.agent.is_running(),
        "a rejected reload must not stop the agent"
    );

    // The old pipeline still takes and uploads events.
    let msgs = messages("b", 500, &["rb/x"], 0, 100);
    let exp = expected(&st, &msgs);
    let (_p, publisher) =
        spawn_publisher(st.broker.port, "reload-bad-pub", msgs, PubOpts::default());
    let report = publisher.await.unwrap();
    assert_eq!(report.acked.len(), 500, "{:?}", report.error);
    let reqs = harness::http::mixed_requests("hb", 200, &["api-stream"], 100);
    let mut exp = exp;
    for r in &reqs {
        for (id, body) in &r.events {
            exp.add(id, &r.stream, body.clone());
        }
    }
    let (_hp, http) = spawn_load(st.http(), reqs, 2, None);
    let hrep = http.await.unwrap();
    assert_eq!(hrep.acked.len(), 200, "{}", hrep.summary());

    let t = Instant::now();
    let mut lake = st.lake();
    let ids: HashSet<String> = report.acked.iter().chain(&hrep.acked).cloned().collect();
    lake.wait_for(&ids, harness::deadline(60), st.t0)
        .await
        .unwrap();
    st.note(format!(
        "old pipeline delivered {} events {:.1?} after the rejected reloads",
        ids.len(),
        t.elapsed()
    ));
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.unwrap();
    let verdict = Verdict::compute(&exp, &ids, &snap);
    verdict.assert_exactly_once();
}
