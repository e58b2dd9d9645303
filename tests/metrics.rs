//! The admin api: `/metrics` counters agree with what was published and
//! what is in the lake; during an S3 outage the backlog age grows and
//! `/readyz` fails, and recovers once S3 is back; `/readyz` also follows the
//! MQTT connection.

mod harness;

use std::time::Duration;

use harness::mqtt::{PubOpts, messages, publish};
use harness::*;

struct Api {
    port: u16,
}

impl Api {
    async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let resp = harness::http::get(&url)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
        Ok((status, body))
    }

    async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await.expect("scrape /metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        body
    }

    /// The value of the series `series` (name and labels, exactly as printed).
    async fn value(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        value(&text, series).unwrap_or_else(|| panic!("no series `{series}` in:\n{text}"))
    }

    async fn ready_status(&self) -> (u16, String) {
        self.get("/readyz").await.unwrap_or((0, String::new()))
    }

    async fn wait_ready(&self, want: u16, contains: &str, secs: u64, what: &str) -> String {
        let end = deadline(secs);
        loop {
            let (status, body) = self.ready_status().await;
            if status == want && body.contains(contains) {
                return body;
            }
            assert!(
                std::time::Instant::now() < end,
                "timed out after {secs}s waiting for {what}; last /readyz: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

struct Setup {
    agent: Agent,
    broker: Mosquitto,
    s3: S3Server,
    api: Api,
    _scratch: Scratch,
}

async fn setup(name: &str, ready_max_backlog_age: &str) -> Setup {
    let scratch = Scratch::new(name);
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let s3 = S3Server::start(scratch.path(), "telemetry");
    let api = Api { port: free_port() };
    let cfg = config::agent_with_api("gw-metrics", api.port, ready_max_backlog_age)
        + &config::mqtt_source("sensors", &broker.url(), &["m/#"])
        + &config::s3_sink(
            "lake",
            &["sensors"],
            &s3,
            "gzip",
            &config::batch(100, "8MiB", "1s"),
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(
            &[
                ("admin api listening", 1),
                ("mqtt subscribed", 1),
                ("silt running", 1),
            ],
            60,
        )
        .await;
    Setup {
        agent,
        broker,
        s3,
        api,
        _scratch: scratch,
    }
}

async fn publish_all(broker: &Mosquitto, client: &str, prefix: &str, n: usize) {
    let msgs = messages(prefix, n, &["m/a", "m/b"], 0, 128);
    let report = publish(
        broker.port,
        client,
        msgs,
        PubOpts::default(),
        Default::default(),
    )
    .await;
    assert_eq!(report.acked.len(), n, "publisher: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_published_events_and_lake_objects() {
    const N: usize = 500;
    let mut st = setup("metrics-counters", "5m").await;
    let (status, body) = st.api.get("/healthz").await.expect("healthz");
    assert_eq!(status, 200, "healthz: {body}");
    st.api.wait_ready(200, "", 30, "/readyz 200").await;

    publish_all(&st.broker, "metrics-pub", "c", N).await;
    let mut lake = S3Lake::new(&st.s3);
    let end = deadline(60);
    while lake.count().await < N {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {N} records in the lake"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let snap = lake.snapshot().await.unwrap();
    assert_eq!(snap.records.len(), N, "lake records");

    let api = &st.api;
    wait_until_async(
        deadline(30),
        Duration::from_millis(200),
        "events_out = N",
        || async { api.value("silt_events_out_total{sink=\"lake\"}").await == N as f64 },
    )
    .await
    .unwrap();
    let text = api.metrics().await;
    let get = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no `{s}` in:\n{text}"));
    assert_eq!(get("silt_events_in_total{source=\"sensors\"}"), N as f64);
    assert_eq!(get("silt_events_out_total{sink=\"lake\"}"), N as f64);
    assert_eq!(
        get("silt_objects_committed_total{sink=\"lake\"}"),
        snap.objects as f64,
        "objects committed vs objects in S3"
    );
    assert_eq!(
        get("silt_uploaded_bytes_total{sink=\"lake\"}"),
        snap.bytes as f64,
        "bytes uploaded vs bytes in S3"
    );
    assert_eq!(get("silt_upload_errors_total{sink=\"lake\"}"), 0.0);
    assert_eq!(get("silt_spool_unsealed_records{sink=\"lake\"}"), 0.0);
    assert_eq!(
        get("silt_spool_oldest_unsent_age_seconds{sink=\"lake\"}"),
        0.0
    );
    assert_eq!(get("silt_mqtt_connected{source=\"sensors\"}"), 1.0);
    assert_eq!(
        get("silt_events_dropped_total{reason=\"drop_newest\"}"),
        0.0
    );
    assert!(
        text.contains("# TYPE silt_events_in counter"),
        "counter metadata:\n{text}"
    );
    st.agent.sigterm_and_wait(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_ages_backlog_and_fails_readiness_until_recovery() {
    let mut st = setup("metrics-outage", "2s").await;
    st.api.wait_ready(200, "", 30, "/readyz 200 at start").await;

    st.s3.stop();
    publish_all(&st.broker, "outage-pub", "o", 50).await;
    let api = &st.api;
    wait_until_async(
        deadline(30),
        Duration::from_millis(200),
        "backlog age >= 2s",
        || async {
            api.value("silt_spool_oldest_unsent_age_seconds{sink=\"lake\"}")
                .await
                >= 2.0
        },
    )
    .await
    .unwrap();
    let age1 = api
        .value("silt_spool_oldest_unsent_age_seconds{sink=\"lake\"}")
        .await;
    let body = api
        .wait_ready(503, "sink `lake`", 30, "/readyz 503 during the outage")
        .await;
    assert!(body.contains("\"ready\":false"), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let age2 = api
        .value("silt_spool_oldest_unsent_age_seconds{sink=\"lake\"}")
        .await;
    assert!(age2 > age1, "backlog age should grow: {age1} then {age2}");
    assert!(
        api.value("silt_upload_errors_total{sink=\"lake\"}").await >= 1.0,
        "upload errors counted during the outage"
    );

    st.s3.start_again();
    st.api
        .wait_ready(200, "", 60, "/readyz 200 after S3 is back")
        .await;
    assert_eq!(
        st.api.value("silt_events_out_total{sink=\"lake\"}").await,
        50.0
    );
    assert_eq!(
        st.api
            .value("silt_spool_oldest_unsent_age_seconds{sink=\"lake\"}")
            .await,
        0.0
    );

    // Readiness also follows the broker connection.
    st.broker.stop();
    st.api
        .wait_ready(
            503,
            "mqtt source `sensors` is not connected",
            30,
            "/readyz 503 without broker",
        )
        .await;
    assert_eq!(
        st.api
            .value("silt_mqtt_connected{source=\"sensors\"}")
            .await,
        0.0
    );
    st.broker.restart();
    st.api
        .wait_ready(200, "", 60, "/readyz 200 after the broker is back")
        .await;
    st.agent.sigterm_and_wait(Duration::from_secs(60)).await;
}
