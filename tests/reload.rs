//! Hot reload: a valid config change is applied under load with no event
//! lost or duplicated; an invalid one is rejected and the old pipeline keeps
//! running; one that fails to start falls back to the old config.

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

    old_pipeline_delivers(&mut st, "b", "rb/x").await;
}

/// A config that passes validation but cannot start (a new HTTP source on a
/// port another process holds): the agent must not exit, and the previous
/// config must serve again. Before starts were transactional, the admin api
/// task kept sled's lock, the fallback could not open the spool, and the
/// process exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_that_fails_to_start_falls_back_to_the_old_pipeline() {
    let mut st = Stack::start(
        "reload-nostart",
        "gw-reload-nostart",
        &config::batch(100, "8MiB", "1s"),
        &["rn/#"],
    )
    .await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let good = std::fs::read_to_string(&st.agent.config).unwrap();
    let inputs = "inputs = [\"sensors\", \"api\"]";
    assert!(
        good.contains(inputs),
        "the stack's sink reads sensors and api"
    );
    let unstartable = good.replace(inputs, "inputs = [\"sensors\", \"api\", \"api2\"]")
        + &config::http_source("api2", port, None, "1MiB");
    std::fs::write(&st.agent.config, unstartable).unwrap();
    st.agent
        .wait_log_n(
            "new config failed to start; going back to the previous one",
            1,
            harness::deadline(30),
        )
        .await
        .unwrap();
    st.agent
        .wait_log_n("previous config running again", 1, harness::deadline(30))
        .await
        .unwrap();
    assert!(
        st.agent.is_running(),
        "a reload that fails to start must not stop the agent"
    );
    old_pipeline_delivers(&mut st, "n", "rn/x").await;
    drop(taken);
}

/// MQTT and HTTP events sent now reach the lake exactly once.
async fn old_pipeline_delivers(st: &mut Stack, tag: &str, topic: &str) {
    let msgs = messages(tag, 500, &[topic], 0, 100);
    let exp = expected(st, &msgs);
    let (_p, publisher) = spawn_publisher(
        st.broker.port,
        &format!("reload-{tag}-pub"),
        msgs,
        PubOpts::default(),
    );
    let report = publisher.await.unwrap();
    assert_eq!(report.acked.len(), 500, "{:?}", report.error);
    let reqs = harness::http::mixed_requests(&format!("h{tag}"), 200, &["api-stream"], 100);
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
        "the running pipeline delivered {} events {:.1?} after the reloads",
        ids.len(),
        t.elapsed()
    ));
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.unwrap();
    let verdict = Verdict::compute(&exp, &ids, &snap);
    verdict.assert_exactly_once();
}

/// A client in the middle of a slow request must not keep the old pipeline
/// (and sled's lock) alive: the reload cuts it after a short grace and the
/// new pipeline opens the spool. Before connections were tracked, the
/// connection task outlived its source, the new spool could not be opened
/// and the agent exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_cuts_a_slow_request_and_takes_over_the_spool() {
    use tokio::io::AsyncWriteExt;

    let mut st = Stack::start(
        "reload-slow",
        "gw-reload-slow",
        &config::batch(100, "8MiB", "1s"),
        &["rs/#"],
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", st.http_port))
        .await
        .unwrap();
    slow.write_all(
        format!(
            "POST /v1/ingest/slow HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: 100000\r\n\r\n{{\"id\":",
            harness::TOKEN
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    std::fs::write(
        &st.agent.config,
        changed_config(&st, &config::batch(200, "8MiB", "1s")),
    )
    .unwrap();
    let t = Instant::now();
    st.agent
        .wait_log_n("reload applied", 1, harness::deadline(30))
        .await
        .unwrap();
    st.note(format!(
        "reload applied {:.1?} after the change, with a request half sent",
        t.elapsed()
    ));
    assert!(st.agent.is_running());
    old_pipeline_delivers(&mut st, "s", "rs/x").await;
    drop(slow);
}
