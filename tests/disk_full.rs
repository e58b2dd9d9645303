//! A real full filesystem (ENOSPC) under the spool: the agent pushes back
//! instead of crashing, keeps what it acknowledged, and resumes by itself
//! when space returns, with HTTP and MQTT sources. The data_dir sits on a
//! small tmpfs mounted for the test (needs root, as in CI; skipped with a
//! message otherwise). Also: SIGTERM with a full spool and MQTT load.

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use harness::http::{HttpClient, IngestReq};
use harness::mqtt::{PubOpts, messages, spawn_publisher};
use harness::payload::json_event;
use harness::tmpfs::tmpfs_or_skip;
use harness::{Agent, Mosquitto, S3Server, Scratch, config, free_port};

/// The `[agent]` and `[spool]` head of a config whose data_dir is on the
/// tmpfs, with no free-disk floor: the filesystem itself must run out.
fn full_disk_agent(id: &str) -> String {
    config::agent(id).replace(
        "when_full = \"block\"",
        "when_full = \"block\"\nmin_free = \"0B\"",
    )
}

/// Waits until every id of `acked` is in S3, asserts none is there twice,
/// then SIGTERMs the agent and asserts a clean exit; `what` heads the
/// printed figures.
async fn assert_in_s3_once_then_exit(
    agent: &mut Agent,
    s3: &S3Server,
    acked: &HashSet<String>,
    secs: u64,
    what: &str,
) {
    let mut lake = harness::S3Lake::new(s3);
    let t0 = std::time::Instant::now();
    let snap = lake
        .wait_for(acked, harness::deadline(secs), t0)
        .await
        .unwrap();
    let ids: Vec<String> = snap.records.iter().filter_map(|r| r.id()).collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    println!(
        "{what}, {} in S3, {} duplicates",
        distinct.len(),
        ids.len() - distinct.len()
    );
    assert_eq!(ids.len(), distinct.len(), "no event may be uploaded twice");
    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "silt must exit 0, got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_blocks_keeps_acked_events_and_recovers() {
    let scratch = Scratch::new("disk-full");
    let Some(disk) = tmpfs_or_skip(&scratch.join("disk"), "6m") else {
        return;
    };
    let mut s3 = S3Server::start(scratch.path(), "telemetry");
    s3.stop();
    let port = free_port();
    let cfg = full_disk_agent("gw-full")
        + &config::http_source("api", port, None, "16MiB")
        + &config::s3_sink(
            "lake",
            &["api"],
            &s3,
            "gzip",
            &config::batch(200, "8MiB", "1s"),
        );
    let data_dir = disk.0.join("data");
    let cfg = cfg.replace("{data_dir}", &data_dir.display().to_string());
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);

    let mut acked: HashSet<String> = HashSet::new();
    let mut refused = 0;
    for i in 0..600 {
        let req = IngestReq::array(
            "readings",
            (0..50)
                .map(|j| json_event(&format!("f{i}-{j}"), j, 400))
                .collect(),
        );
        match client.ingest(&req).await {
            Ok(r) if r.status == 202 => acked.extend(req.events.iter().map(|(id, _)| id.clone())),
            _ => refused += 1,
        }
        if refused >= 20 {
            break;
        }
    }
    assert!(
        refused >= 20,
        "the 6 MiB disk never filled up ({} events acked)",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "nothing was accepted before the disk filled"
    );
    agent
        .wait_log("waiting for free disk space", harness::deadline(30))
        .await
        .expect("the agent must notice the full disk and wait for space");
    assert!(agent.is_running(), "a full disk must not stop the agent");

    disk.resize("64m");
    agent
        .wait_log("spool reopened", harness::deadline(60))
        .await
        .unwrap();
    harness::wait_until(harness::deadline(30), "http back", || {
        harness::port_open(port)
    })
    .await
    .unwrap();
    let after = IngestReq::single("readings", json_event("after-full", 0, 100));
    let reply = client.ingest(&after).await.unwrap();
    assert_eq!(reply.status, 202, "accepts again once space returned");
    acked.insert("after-full".into());

    s3.start_again();
    let what = format!(
        "disk full: {} events acked before/after ENOSPC, {refused} requests refused",
        acked.len()
    );
    assert_in_s3_once_then_exit(&mut agent, &s3, &acked, 120, &what).await;
}

/// The MQTT commit loop used to retry a full disk forever without looking
/// at the stop signal, so the reopen after ENOSPC (which stops the sources
/// first) never happened and MQTT never resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_under_mqtt_and_http_recovers_and_every_message_arrives_once() {
    let scratch = Scratch::new("disk-full-mqtt");
    let Some(disk) = tmpfs_or_skip(&scratch.join("disk"), "6m") else {
        return;
    };
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let mut s3 = S3Server::start(scratch.path(), "telemetry");
    s3.stop();
    let port = free_port();
    let cfg = full_disk_agent("gw-full-mqtt")
        + &config::mqtt_source("sensors", &broker.url(), &["full/#"])
        + &config::http_source("api", port, None, "16MiB")
        + &config::s3_sink(
            "lake",
            &["sensors", "api"],
            &s3,
            "gzip",
            &config::batch(500, "8MiB", "1s"),
        );
    let data_dir = disk.0.join("data");
    let cfg = cfg.replace("{data_dir}", &data_dir.display().to_string());
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("mqtt subscribed", 1), ("silt running", 1)], 60)
        .await;

    // About 10 MB of messages for a 6 MiB disk; the broker keeps what silt
    // cannot take.
    let msgs = messages("full", 20_000, &["full/a", "full/b"], 0, 500);
    let (_, publisher) = spawn_publisher(
        broker.port,
        "full-pub",
        msgs,
        PubOpts {
            inflight: 200,
            ..Default::default()
        },
    );
    agent
        .wait_log("waiting for free disk space", harness::deadline(60))
        .await
        .expect("the agent must notice the full disk and wait for space");
    let report = publisher.await.unwrap();
    assert!(report.error.is_none(), "publisher: {:?}", report.error);

    disk.resize("256m");
    agent
        .wait_log("spool reopened", harness::deadline(60))
        .await
        .expect("the spool must reopen once space is back, with an MQTT source running");
    harness::wait_until(harness::deadline(30), "http back", || {
        harness::port_open(port)
    })
    .await
    .unwrap();
    let client = HttpClient::new(port, None);
    let after = IngestReq::single("readings", json_event("after-full", 0, 100));
    assert_eq!(client.ingest(&after).await.unwrap().status, 202);

    let mut acked: HashSet<String> = report.acked.iter().cloned().collect();
    acked.insert("after-full".into());
    s3.start_again();
    let what = format!(
        "disk full with mqtt: {} messages acked by the broker",
        report.acked.len()
    );
    assert_in_s3_once_then_exit(&mut agent, &s3, &acked, 180, &what).await;
}

/// SIGTERM with the spool full (its cap, not the disk), S3 down and MQTT
/// messages waiting: the agent must exit within `shutdown_timeout` + 5 s,
/// leaving the messages it could not store unacked with the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_full_spool_under_mqtt_load_exits_in_time() {
    let scratch = Scratch::new("full-sigterm");
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let mut s3 = S3Server::start(scratch.path(), "telemetry");
    s3.stop();
    let cfg = config::agent("gw-full-term")
        .replace("max_bytes = \"1GiB\"", "max_bytes = \"256KiB\"")
        .replace("shutdown_timeout = \"30s\"", "shutdown_timeout = \"5s\"")
        + &config::mqtt_source("sensors", &broker.url(), &["term/#"])
        + &config::s3_sink(
            "lake",
            &["sensors"],
            &s3,
            "gzip",
            &config::batch(100, "8MiB", "1s"),
        );
    assert!(
        cfg.contains("256KiB") && cfg.contains("shutdown_timeout = \"5s\""),
        "the harness config changed: {cfg}"
    );
    let cfg = cfg.replace("{data_dir}", &scratch.join("data").display().to_string());
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("mqtt subscribed", 1), ("silt running", 1)], 60)
        .await;
    let msgs = messages("term", 5_000, &["term/a"], 0, 300);
    let (_, publisher) = spawn_publisher(broker.port, "term-pub", msgs, PubOpts::default());
    agent
        .wait_log("spool full: holding mqtt acks", harness::deadline(60))
        .await
        .expect("the spool must fill up");
    let t0 = std::time::Instant::now();
    let status = agent.sigterm_and_wait(Duration::from_secs(10)).await;
    println!("sigterm with a full spool: exited in {:.1?}", t0.elapsed());
    assert!(status.success(), "silt must exit 0, got {status}");
    publisher.abort();
}
