//! End to end: MQTT (mosquitto, QoS 1) + HTTP -> `silt run` -> S3 (s3s-fs),
//! read back through the S3 API: every event exactly once, byte-identical.
//! Plus a small HTTP -> file sink variant that checks the flush on SIGTERM.

mod harness;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use harness::http::{HttpClient, mixed_requests, spawn_load};
use harness::mqtt::{PubOpts, messages, spawn_publisher};
use harness::*;

const MQTT_N: usize = 20_000;
const HTTP_MAIN_N: usize = 4_500;
const HTTP_TAIL_N: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_http_to_s3_exactly_once() {
    // Small max_records so many objects are written; max_age short so the
    // lake fills up while we watch.
    let mut st = Stack::start(
        "e2e-s3",
        "gw-e2e",
        &config::batch(2_000, "8MiB", "3s"),
        &["e2e/#"],
    )
    .await;
    let mut exp = Expected::new(&st.agent_id);

    // 20,000 MQTT messages over four topics, every 4th one binary.
    let msgs = messages(
        "m",
        MQTT_N,
        &["e2e/temp", "e2e/hum/room-1", "e2e/cam/frames", "e2e/a/b/c"],
        4,
        256,
    );
    for m in &msgs {
        exp.add(&m.id, &m.topic, m.body());
    }
    // 4,500 HTTP events (singles, arrays, NDJSON, binary) now, 500 at the end.
    let main_reqs = mixed_requests("h", HTTP_MAIN_N, &["orders", "clicks"], 256);
    let tail_reqs = mixed_requests("t", HTTP_TAIL_N, &["tail"], 256);
    for r in main_reqs.iter().chain(&tail_reqs) {
        for (id, body) in &r.events {
            exp.add(id, &r.stream, body.clone());
        }
    }
    assert_eq!(exp.len(), MQTT_N + HTTP_MAIN_N + HTTP_TAIL_N);

    let t_load = Instant::now();
    let (_mp, mh) = spawn_publisher(
        st.broker.port,
        "e2e-pub",
        msgs,
        PubOpts {
            inflight: 500,
            ..Default::default()
        },
    );
    let (_hp, hh) = spawn_load(st.http(), main_reqs, 4, None);
    let mrep = mh.await.unwrap();
    st.note(format!(
        "mqtt: {} sent, {} PUBACKed in {:.2?} ({:.0} msg/s), error {:?}",
        mrep.sent,
        mrep.acked.len(),
        mrep.elapsed,
        mrep.rate(),
        mrep.error
    ));
    let hrep = hh.await.unwrap();
    st.note(format!("http: {} in {:.2?}", hrep.summary(), hrep.elapsed));
    assert_eq!(
        mrep.acked.len(),
        MQTT_N,
        "broker must PUBACK every message: {:?}",
        mrep.error
    );
    assert_eq!(
        hrep.acked.len(),
        HTTP_MAIN_N,
        "every HTTP event must get 202: {}",
        hrep.summary()
    );
    assert!(
        hrep.anomalies.is_empty(),
        "HTTP anomalies: {:?}",
        hrep.anomalies
    );

    // Everything published so far must reach the lake (this also proves the
    // agent drained the broker's queue before we stop it).
    let mut lake = st.lake();
    let so_far: HashSet<String> = mrep.acked.iter().chain(&hrep.acked).cloned().collect();
    let snap = match lake.wait_for(&so_far, harness::deadline(120), st.t0).await {
        Ok(s) => s,
        Err(e) => panic!(
            "{e}\n{}",
            Verdict::compute(&exp, &so_far, &lake_now(&mut lake).await).summary()
        ),
    };
    let secs = t_load.elapsed().as_secs_f64();
    st.note(format!(
        "{} events in the lake {:.2}s after load start ({:.0} events/s end to end), {} objects",
        so_far.len(),
        secs,
        so_far.len() as f64 / secs,
        snap.objects
    ));

    // Tail: 500 more HTTP events, then SIGTERM right away. A 202 means the
    // events are in the spool; the agent must seal and upload them on shutdown.
    let (_tp, th) = spawn_load(st.http(), tail_reqs, 2, None);
    let trep = th.await.unwrap();
    assert_eq!(trep.acked.len(), HTTP_TAIL_N, "tail: {}", trep.summary());
    st.stop_agent_cleanly().await;

    let snap = lake.snapshot().await.expect("read lake");
    let all: Vec<String> = exp.events.keys().cloned().collect();
    let v = Verdict::compute(&exp, &all, &snap);
    st.note(v.summary());
    v.assert_exactly_once();
    let b64 = snap.records.iter().filter(|r| r.had_b64).count();
    assert_eq!(
        b64,
        MQTT_N / 4 + tail_and_main_binaries(&exp),
        "binary records must use payload_b64"
    );
    // Keys follow the configured template.
    let keys = lake.keys().await.unwrap();
    assert!(
        keys.iter().all(|k| k.starts_with("lake/year=")
            && k.contains("/gw-e2e-")
            && k.ends_with(".ndjson.gz")),
        "object keys must follow the key template, got e.g. {:?}",
        keys.iter().take(3).collect::<Vec<_>>()
    );
    st.note("e2e OK");
}

fn tail_and_main_binaries(exp: &Expected) -> usize {
    exp.events
        .iter()
        .filter(|(id, e)| {
            !id.starts_with("m-") && matches!(e.body, harness::payload::Body::Binary(_))
        })
        .count()
}

async fn lake_now(lake: &mut S3Lake) -> harness::lake::Snapshot {
    lake.snapshot().await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_file_sink_flushes_on_sigterm() {
    let t0 = Instant::now();
    let scratch = Scratch::new("e2e-file");
    let port = free_port();
    let lake_dir = scratch.join("lake");
    // One hour max_age and a huge max_records: nothing is due before shutdown,
    // so the lake is written by the seal-on-SIGTERM path.
    let cfg = config::agent("gw-file")
        + &config::http_source("ingest", port, None, "1MiB")
        + &config::file_sink(
            "files",
            &["ingest"],
            &lake_dir,
            "zstd",
            &config::batch(1_000_000, "64MiB", "1h"),
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;

    let reqs = mixed_requests("f", 1_000, &["alpha", "beta"], 200);
    let mut exp = Expected::new("gw-file");
    for r in &reqs {
        for (id, body) in &r.events {
            exp.add(id, &r.stream, body.clone());
        }
    }
    let (_p, h) = spawn_load(HttpClient::new(port, None), reqs, 4, None);
    let rep = h.await.unwrap();
    note(t0, format!("http: {}", rep.summary()));
    assert_eq!(
        rep.acked.len(),
        1_000,
        "every event must get 202: {}",
        rep.summary()
    );

    let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "silt run should exit 0 after SIGTERM, got {st}"
    );

    let lake = FileLake::new(&lake_dir);
    let files = lake.files();
    let snap = lake.snapshot();
    let all: Vec<String> = exp.events.keys().cloned().collect();
    let v = Verdict::compute(&exp, &all, &snap);
    note(t0, v.summary());
    v.assert_exactly_once();
    for f in &files {
        let rel = f.strip_prefix(&lake_dir).unwrap().display().to_string();
        assert!(
            rel.starts_with("files/") && rel.contains("gw-file-") && rel.ends_with(".ndjson.zst"),
            "file {rel} does not follow the key template"
        );
    }
}

/// `Idempotency-Key`: a repeat gets the first reply (marked replayed) and
/// stores nothing, also after a SIGKILL and restart; the same key with
/// another body is refused with 422; a malformed key with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_repeats_get_the_first_reply_and_store_once() {
    let mut st = Stack::start(
        "e2e-idem",
        "gw-idem",
        &config::batch(100, "8MiB", "1s"),
        &["idem/#"],
    )
    .await;
    let client = st.http();
    let first = http::IngestReq::array(
        "idem",
        vec![
            payload::json_event("idem-1", 1, 64),
            payload::json_event("idem-2", 2, 64),
        ],
    );
    let other = http::IngestReq::single("idem", payload::json_event("idem-3", 3, 64));
    let key = Some("0d5c7f7e-idem-key");

    let sent = client.ingest_keyed(&first, key).await.unwrap();
    assert_eq!((sent.status, sent.replayed), (202, false), "{}", sent.body);
    let again = client.ingest_keyed(&first, key).await.unwrap();
    assert_eq!(
        (again.status, again.replayed),
        (202, true),
        "{}",
        again.body
    );
    assert_eq!(again.body, sent.body, "the first reply, byte for byte");
    let reused = client.ingest_keyed(&other, key).await.unwrap();
    assert_eq!(reused.status, 422, "{}", reused.body);
    let bad = client
        .ingest_keyed(&other, Some("has space"))
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);

    // The key is on disk with the events: a crash does not forget it.
    st.agent.kill9();
    st.agent.spawn();
    st.agent.wait_stack_up().await;
    let after = client.ingest_keyed(&first, key).await.unwrap();
    assert_eq!(
        (after.status, after.replayed),
        (202, true),
        "{}",
        after.body
    );
    let fresh = client
        .ingest_keyed(&other, Some("another-key"))
        .await
        .unwrap();
    assert_eq!(
        (fresh.status, fresh.replayed),
        (202, false),
        "{}",
        fresh.body
    );

    let mut exp = Expected::new(&st.agent_id);
    for r in [&first, &other] {
        for (id, body) in &r.events {
            exp.add(id, &r.stream, body.clone());
        }
    }
    let ids: HashSet<String> = ["idem-1", "idem-2", "idem-3"].map(String::from).into();
    let mut lake = st.lake();
    let snap = lake
        .wait_for(&ids, harness::deadline(60), st.t0)
        .await
        .unwrap();
    st.stop_agent_cleanly().await;
    let verdict = Verdict::compute(&exp, &ids, &snap);
    st.note(verdict.summary());
    verdict.assert_exactly_once();
}

/// One event whose partition value is 1,500 characters, into a sink keyed
/// by it: the key would be over S3's limit, S3 would refuse it for good, and
/// every later event of the sink would wait behind the retried batch. The
/// value renders as `__too_long__`, and the events after it flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_key_value_does_not_stall_the_sink() {
    let t0 = Instant::now();
    let scratch = Scratch::new("e2e-long-key");
    let s3 = S3Server::start(scratch.path(), "telemetry");
    let port = free_port();
    let sink = config::s3_sink(
        "lake",
        &["api"],
        &s3,
        "gzip",
        &config::batch(1, "1MiB", "1s"),
    )
    .replace(config::S3_KEY, "p/site={field.site}/{agent}-{batch}");
    let cfg = config::agent("gw-key") + &config::http_source("api", port, None, "1MiB") + &sink;
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);
    let long = "x".repeat(1_500);
    for (i, site) in std::iter::once(long.as_str())
        .chain(["a", "b", "c", "d", "e"])
        .enumerate()
    {
        let req = http::IngestReq::single(
            "s",
            serde_json::json!({"id": format!("k{i}"), "site": site}),
        );
        let reply = client.ingest(&req).await.expect("ingest");
        assert_eq!(reply.status, 202, "event {i}: {reply:?}");
    }
    let lake = S3Lake::new(&s3);
    let end = deadline(30);
    let keys = loop {
        let keys = lake.keys().await.unwrap_or_default();
        if keys.len() >= 6 {
            break keys;
        }
        if Instant::now() >= end {
            agent.dump_log(40);
            panic!("6 objects expected in S3 within 30 s, got {keys:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    note(t0, format!("objects: {keys:?}"));
    assert!(
        keys.iter()
            .any(|k| k.starts_with("p/site=__too_long__/gw-key-")),
        "the long value's object: {keys:?}"
    );
    assert!(keys.iter().all(|k| k.len() < 100), "{keys:?}");
    let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "silt run should exit 0 after SIGTERM, got {st}"
    );
}
