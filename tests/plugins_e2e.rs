//! WebAssembly transforms inside `silt run`, against real mosquitto and
//! s3s-fs:
//!
//! * `json-clean` -> `dedup` between an MQTT source and an S3 sink: the lake
//!   holds exactly the cleaned (renamed, converted, incomplete dropped),
//!   de-duplicated events.
//! * each misbehaving test plugin (`test-loop`, `test-membomb`, `test-trap`,
//!   `test-error`) with small limits behind an HTTP source (one POST = one
//!   plugin call), and `test-loop` behind MQTT: the poisoned batch lands
//!   intact in the dead-letter directory, the stop happens at the limit, the
//!   agent keeps serving, later batches reach S3 exactly once.
//!
//! Plugins come from `plugins/build.sh`; when one is missing the test skips
//! with a message, except under CI (`CI` set), where that is a failure.

mod harness;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use harness::http::{HttpClient, IngestReq};
use harness::mqtt::{Msg, PubOpts, spawn_publisher};
use harness::payload::{Body, binary_event, json_event};
use harness::*;
use serde_json::{Value, json};

/// Per-call limits of the misbehaving plugins: small, so a stop that does
/// not happen at the limit shows up as a slow request.
const TIMEOUT: &str = "200ms";
const MAX_MEMORY: &str = "16MiB";
/// What a request that hits a limit may take in total (the 200 ms limit plus
/// a fresh-instance start and an fsynced dead-letter write), on a loaded
/// 2-core box. The test deadlines are 60 s and more.
const STOP_BOUND: Duration = Duration::from_secs(3);

/// `[agent]` + `[spool]` with the dead-letter directory set.
fn agent_section(id: &str, dead_letter: &Path) -> String {
    config::agent(id).replacen(
        "[agent]\n",
        &format!("[agent]\ndead_letter = \"{}\"\n", dead_letter.display()),
        1,
    )
}

/// `[transforms.NAME]`; `rest` is extra TOML lines (config, limits).
fn transform(name: &str, wasm: &Path, inputs: &[&str], rest: &str) -> String {
    let inputs = inputs
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[transforms.{name}]\nplugin = \"{}\"\ninputs = [{inputs}]\n{rest}\n",
        wasm.display()
    )
}

/// One dead-letter file: its header and its events (NDJSON lines as JSON).
#[derive(Debug)]
struct DeadLetterFile {
    path: PathBuf,
    header: Value,
    events: Vec<Value>,
}

/// Completed dead-letter files in `dir` (in-progress `.name.tmp` skipped),
/// oldest first.
fn dead_letters(dir: &Path) -> Vec<DeadLetterFile> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            !name.starts_with('.') && name.ends_with(".ndjson")
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let mut lines = text.lines().map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("{}: line is not JSON ({e}): {l}", path.display()))
            });
            let header = lines
                .next()
                .unwrap_or_else(|| panic!("{}: empty dead-letter file", path.display()));
            let events = lines.collect();
            DeadLetterFile {
                path,
                header,
                events,
            }
        })
        .collect()
}

/// The payload of a dead-letter event line: `payload` (JSON) or the
/// decoded `payload_b64`.
fn dead_letter_body(line: &Value) -> Body {
    match (line.get("payload"), line.get("payload_b64")) {
        (Some(v), None) => Body::Json(v.clone()),
        (None, Some(Value::String(b))) => Body::Binary(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .expect("payload_b64 is base64"),
        ),
        _ => panic!("dead-letter line needs exactly one of payload / payload_b64: {line}"),
    }
}

/// Log lines of the current run containing `needle`.
fn log_lines(agent: &Agent, needle: &str) -> Vec<String> {
    agent
        .log_run()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

const DEAD_LETTERED: &str = "plugin failed; its batch went to dead-letter";

// ------------------------------------------------------------ json-clean + dedup

/// The cleaned payload json-clean must produce for a complete reading:
/// `dev` -> `device`, `temp` (F) -> `temperature_c` (C, 1 decimal), `debug`
/// removed, other fields kept.
fn cleaned(id: &str, device: &str, celsius: f64, seq: u64) -> Value {
    json!({"id": id, "device": device, "temperature_c": celsius, "seq": seq})
}

/// A raw reading as a device sends it; `celsius` is sent as Fahrenheit.
fn raw(id: &str, device: &str, celsius: i64, seq: u64) -> Value {
    let f = 32.0 + 1.8 * celsius as f64;
    json!({"id": id, "dev": device, "temp": f, "debug": {"rssi": -70, "fw": "1.2"}, "seq": seq})
}

fn msg(topic: &str, payload: Vec<u8>) -> Msg {
    Msg {
        id: String::new(),
        topic: topic.to_string(),
        payload,
    }
}

fn jmsg(topic: &str, v: &Value) -> Msg {
    msg(topic, serde_json::to_vec(v).unwrap())
}

async fn publish_all(port: u16, client: &str, msgs: Vec<Msg>) {
    let n = msgs.len();
    // Ids only label PUBACKs in the report; make them unique.
    let msgs = msgs
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            m.id = format!("{client}-{i}");
            m
        })
        .collect();
    let (_p, h) = spawn_publisher(
        port,
        client,
        msgs,
        PubOpts {
            inflight: 20,
            ..Default::default()
        },
    );
    let rep = h.await.unwrap();
    assert_eq!(
        rep.acked.len(),
        n,
        "broker must PUBACK every message: {:?}",
        rep.error
    );
}

/// (topic, id) -> payload of every record in the lake; panics on records
/// without an id, non-JSON payloads or unreadable objects, and returns the
/// (topic, id) pairs seen more than once separately.
fn lake_by_key(snap: &harness::lake::Snapshot) -> (BTreeMap<(String, String), Value>, Vec<String>) {
    assert!(
        snap.problems.is_empty(),
        "unreadable lake: {:?}",
        snap.problems
    );
    let mut out = BTreeMap::new();
    let mut dups = Vec::new();
    for r in &snap.records {
        let Body::Json(v) = &r.body else {
            panic!("binary record in the lake ({}): {:?}", r.object, r.body);
        };
        let id = r
            .id()
            .unwrap_or_else(|| panic!("record without id in {}: {v}", r.object));
        let key = (r.topic.clone().unwrap_or_default(), id);
        if out.insert(key.clone(), v.clone()).is_some() {
            dups.push(format!("{key:?}"));
        }
    }
    (out, dups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_clean_then_dedup_mqtt_to_s3() {
    let (Some(clean_wasm), Some(dedup_wasm)) = (plugin_wasm("json-clean"), plugin_wasm("dedup"))
    else {
        return;
    };
    let t0 = Instant::now();
    let scratch = Scratch::new("plugins-chain");
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let s3 = S3Server::start(scratch.path(), "telemetry");
    let dl_dir = scratch.join("dead-letter");
    let cfg = agent_section("gw-chain", &dl_dir)
        + &config::mqtt_source("sensors", &broker.url(), &["plant/#"])
        + &transform(
            "clean",
            &clean_wasm,
            &["sensors"],
            "config = { remove = [\"debug\"], rename = { dev = \"device\", temp = \"temperature_c\" }, \
             convert = { temperature_c = { from = \"F\", to = \"C\", decimals = 1 } }, \
             required = [\"device\", \"temperature_c\"] }",
        )
        + &transform(
            "dedup",
            &dedup_wasm,
            &["clean"],
            "config = { key = \"id\", window_ms = 600000 }",
        )
        + &config::s3_sink(
            "lake",
            &["dedup"],
            &s3,
            "gzip",
            &config::batch(1_000, "8MiB", "1s"),
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("mqtt subscribed", 1), ("silt running", 1)], 60)
        .await;
    note(t0, format!("up: mqtt :{}, s3 :{}", broker.port, s3.port));

    let (ta, tb) = ("plant/a/temp", "plant/b/temp");
    let mut expected: BTreeMap<(String, String), Value> = BTreeMap::new();
    fn expect(expected: &mut BTreeMap<(String, String), Value>, topic: &str, v: Value) {
        let id = v["id"].as_str().unwrap().to_string();
        assert!(
            expected.insert((topic.to_string(), id), v).is_none(),
            "test bug: expected twice"
        );
    }

    // Phase 1: 40 complete readings (some as numeric strings), each but the
    // first also sent again right away (an identical duplicate); 8 incomplete
    // or invalid ones that json-clean must drop.
    let mut phase1 = Vec::new();
    for i in 0..40u64 {
        let topic = if i % 2 == 0 { ta } else { tb };
        let id = format!("r-{i}");
        let dev = format!("dev-{}", i % 4);
        let c = i as i64 - 10;
        let mut v = raw(&id, &dev, c, i);
        if i % 5 == 0 {
            v["temp"] = json!(format!("{}", 32.0 + 1.8 * c as f64));
        }
        phase1.push(jmsg(topic, &v));
        if i > 0 {
            phase1.push(jmsg(topic, &v));
        }
        expect(&mut expected, topic, cleaned(&id, &dev, c as f64, i));
    }
    let incomplete = [
        json!({"id": "x-nodev", "temp": 50.0, "seq": 100}),
        json!({"id": "x-notemp", "dev": "dev-9", "seq": 101}),
        json!({"id": "x-warm", "dev": "dev-9", "temp": "warm", "seq": 102}),
        json!({"id": "x-null", "dev": "dev-9", "temp": null, "seq": 103}),
        json!({"id": "x-nulldev", "dev": null, "temp": 50.0, "seq": 104}),
        json!([{"id": "x-array", "dev": "dev-9", "temp": 50.0}]),
        // Incomplete first, complete later with the same id: dedup never
        // saw the first one, so the second must get through.
        json!({"id": "late", "temp": 68.0, "seq": 105}),
    ];
    for v in &incomplete {
        phase1.push(jmsg(ta, v));
    }
    phase1.push(msg(ta, b"not json at all".to_vec()));
    let late = json!({"id": "late", "dev": "dev-7", "temp": 68.0, "seq": 106});
    phase1.push(jmsg(ta, &late));
    expect(&mut expected, ta, cleaned("late", "dev-7", 20.0, 106));
    // The last message of the phase, so waiting for it means the agent has
    // consumed the phase.
    let end1 = raw("end-1", "dev-0", 1, 107);
    phase1.push(jmsg(tb, &end1));
    expect(&mut expected, tb, cleaned("end-1", "dev-0", 1.0, 107));
    let sent1 = phase1.len();
    publish_all(broker.port, "chain-pub-1", phase1).await;

    let mut lake = S3Lake::new(&s3);
    let must: HashSet<String> = expected.keys().map(|(_, id)| id.clone()).collect();
    if let Err(e) = lake.wait_for(&must, deadline(60), t0).await {
        panic!("phase 1 did not reach the lake: {e}");
    }
    note(
        t0,
        format!(
            "phase 1: {sent1} published, {} expected in the lake",
            expected.len()
        ),
    );

    // Phase 2, after phase 1 is stored: repeats of phase-1 ids with
    // different content (dedup keeps the first), the same id on a new topic
    // (dedup is per topic, so kept), and new readings.
    let mut phase2 = Vec::new();
    for i in (0..40u64).step_by(3) {
        let topic = if i % 2 == 0 { ta } else { tb };
        let mut v = raw(&format!("r-{i}"), "dev-resent", 99, 1_000 + i);
        v["resent"] = json!(true);
        phase2.push(jmsg(topic, &v));
    }
    phase2.push(jmsg("plant/c/temp", &raw("r-0", "dev-c", 5, 200)));
    expect(
        &mut expected,
        "plant/c/temp",
        cleaned("r-0", "dev-c", 5.0, 200),
    );
    for i in 0..10u64 {
        let id = format!("n-{i}");
        phase2.push(jmsg(tb, &raw(&id, "dev-1", i as i64 + 30, 300 + i)));
        expect(
            &mut expected,
            tb,
            cleaned(&id, "dev-1", (i + 30) as f64, 300 + i),
        );
    }
    // A repeat of a phase-2 id inside phase 2.
    phase2.push(jmsg(tb, &raw("n-3", "dev-1", 0, 999)));
    phase2.push(jmsg(ta, &raw("end-2", "dev-2", 2, 400)));
    expect(&mut expected, ta, cleaned("end-2", "dev-2", 2.0, 400));
    let sent2 = phase2.len();
    publish_all(broker.port, "chain-pub-2", phase2).await;
    let must: HashSet<String> = expected.keys().map(|(_, id)| id.clone()).collect();
    if let Err(e) = lake.wait_for(&must, deadline(60), t0).await {
        panic!("phase 2 did not reach the lake: {e}");
    }
    note(t0, format!("phase 2: {sent2} published"));

    // Stop cleanly (seals and uploads everything spooled), then compare.
    let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "silt run should exit 0 after SIGTERM, got {st}"
    );
    let snap = lake.snapshot().await.expect("read lake");
    let (got, dups) = lake_by_key(&snap);
    assert!(dups.is_empty(), "duplicates in the lake: {dups:?}");
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let unexpected: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "lake differs: missing {missing:?}, unexpected {unexpected:?}"
    );
    for (k, want) in &expected {
        assert_eq!(&got[k], want, "payload of {k:?}");
    }
    assert_eq!(snap.records.len(), expected.len());
    assert!(
        dead_letters(&dl_dir).is_empty(),
        "drops are not failures: nothing may be dead-lettered"
    );
    note(
        t0,
        format!(
            "lake: {} records in {} objects, exactly the {} expected (published {})",
            snap.records.len(),
            snap.objects,
            expected.len(),
            sent1 + sent2
        ),
    );
}

// ------------------------------------------------------------ misbehaving plugins over HTTP

struct BadPlugin {
    /// Component name under plugins/target/wasm.
    plugin: &'static str,
    /// `PluginError::kind()` the failure must be logged with.
    kind: &'static str,
    /// A phrase the dead-letter reason must contain.
    reason: &'static str,
    /// Whether the instance is replaced after the failure.
    fatal: bool,
}

const LOOP: BadPlugin = BadPlugin {
    plugin: "test-loop",
    kind: "timeout",
    reason: "ran longer than its 200ms limit",
    fatal: true,
};
const MEMBOMB: BadPlugin = BadPlugin {
    plugin: "test-membomb",
    kind: "memory_limit",
    reason: "needed more than its 16777216 byte memory limit",
    fatal: true,
};
const TRAP: BadPlugin = BadPlugin {
    plugin: "test-trap",
    kind: "trap",
    reason: "trapped in process",
    fatal: true,
};
const ERROR: BadPlugin = BadPlugin {
    plugin: "test-error",
    kind: "failed",
    reason: "process returned an error: boom from the test",
    fatal: false,
};

fn good_batch(prefix: &str, n: usize) -> IngestReq {
    let vs = (0..n)
        .map(|i| json_event(&format!("{prefix}-{i}"), i as u64, 200))
        .collect();
    IngestReq::ndjson("good", vs)
}

async fn post(client: &HttpClient, req: &IngestReq) -> (harness::http::Reply, Duration) {
    let t = Instant::now();
    let reply = client
        .ingest(req)
        .await
        .unwrap_or_else(|e| panic!("POST to {}: {e}", req.stream));
    (reply, t.elapsed())
}

fn assert_accepted(reply: &harness::http::Reply, n: u64, what: &str) {
    assert_eq!(reply.status, 202, "{what}: {reply:?}");
    assert_eq!(
        reply.json().and_then(|v| v["accepted"].as_u64()),
        Some(n),
        "{what}: {reply:?}"
    );
}

/// HTTP source -> `bad` (the misbehaving plugin, poisoned by topic
/// `poison`) -> S3. Good batch, poisoned batch, good batch, poisoned batch
/// again (the fresh instance must fail the same way), good batch.
async fn misbehaving_over_http(bad: BadPlugin) {
    let Some(bad_wasm) = plugin_wasm(bad.plugin) else {
        return;
    };
    let t0 = Instant::now();
    let scratch = Scratch::new(bad.plugin);
    let s3 = S3Server::start(scratch.path(), "telemetry");
    let dl_dir = scratch.join("dead-letter");
    let port = free_port();
    let cfg = agent_section("gw-bad", &dl_dir)
        + &config::http_source("api", port, Some(TOKEN), "1MiB")
        + &transform(
            "bad",
            &bad_wasm,
            &["api"],
            &format!(
                "timeout = \"{TIMEOUT}\"\nmax_memory = \"{MAX_MEMORY}\"\n\
                 config = {{ topic = \"poison\"{} }}",
                if bad.plugin == "test-error" {
                    ", message = \"boom from the test\""
                } else {
                    ""
                }
            ),
        )
        + &config::s3_sink(
            "lake",
            &["bad"],
            &s3,
            "gzip",
            &config::batch(1_000, "8MiB", "1s"),
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, Some(TOKEN));
    let mut exp = Expected::new("gw-bad");
    let p = bad.plugin;

    let mut poison_batches = Vec::new();
    for round in 0..2 {
        let good = good_batch(&format!("g{round}"), 5);
        let (reply, took) = post(&client, &good).await;
        assert_accepted(&reply, 5, &format!("{p}: good batch {round}"));
        note(t0, format!("{p}: good batch {round}: 202 in {took:.2?}"));
        for (id, body) in &good.events {
            exp.add(id, "good", body.clone());
        }

        // A poisoned batch: three events, all of topic `poison`.
        let poison = IngestReq::ndjson(
            "poison",
            (0..3)
                .map(|i| json_event(&format!("p{round}-{i}"), i, 120))
                .collect(),
        );
        let (reply, took) = post(&client, &poison).await;
        note(
            t0,
            format!(
                "{p}: poisoned batch {round}: {} in {took:.2?}",
                reply.status
            ),
        );
        // The failure never fails the ingest: the batch is dead-lettered
        // (durably) and the request answered: silt has taken the events.
        assert_accepted(&reply, 3, &format!("{p}: poisoned batch {round}"));
        assert!(
            took < STOP_BOUND,
            "{p}: the poisoned request took {took:?}; the plugin must be stopped at its {TIMEOUT} / {MAX_MEMORY} limit"
        );
        if bad.kind == "timeout" {
            // Epoch ticks are 10 ms, so the stop may come a tick early.
            assert!(
                took >= Duration::from_millis(180),
                "{p}: stopped after {took:?}, before its {TIMEOUT} limit"
            );
        }
        poison_batches.push(poison);
        // The answer comes after the dead-letter file is durable.
        let files = dead_letters(&dl_dir);
        assert_eq!(
            files.len(),
            round + 1,
            "{p}: one dead-letter file per failed batch: {files:?}"
        );
        assert!(agent.is_running(), "{p}: the agent must survive");
    }

    // A last good batch, then everything good must be in the lake exactly once.
    let good = good_batch("g2", 5);
    let (reply, _) = post(&client, &good).await;
    assert_accepted(&reply, 5, &format!("{p}: good batch after failures"));
    for (id, body) in &good.events {
        exp.add(id, "good", body.clone());
    }
    let mut lake = S3Lake::new(&s3);
    let all: HashSet<String> = exp.events.keys().cloned().collect();
    if let Err(e) = lake.wait_for(&all, deadline(60), t0).await {
        panic!("{p}: good batches did not reach the lake: {e}");
    }
    assert!(agent.is_running(), "{p}: the agent must survive");

    // Dead-letter files: header names the plugin, the reason and the count;
    // then the poisoned batch, intact and in order.
    let files = dead_letters(&dl_dir);
    assert_eq!(files.len(), 2, "{p}: {files:?}");
    for (f, poison) in files.iter().zip(&poison_batches) {
        let h = &f.header["dead_letter"];
        assert_eq!(h["plugin"], "bad", "{}", f.path.display());
        assert_eq!(h["events"], 3, "{}", f.path.display());
        let reason = h["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(bad.reason),
            "{p}: dead-letter reason {reason:?} should contain {:?}",
            bad.reason
        );
        assert_eq!(f.events.len(), 3, "{}", f.path.display());
        for (line, (id, body)) in f.events.iter().zip(&poison.events) {
            assert_eq!(line["topic"], "poison", "{id}");
            assert!(
                line["ts_ms"].as_i64().is_some_and(|t| t > 0),
                "{id}: {line}"
            );
            assert_eq!(
                &dead_letter_body(line),
                body,
                "{id}: payload must be intact"
            );
        }
    }

    // The log names the failure kind once per poisoned batch.
    let failures = log_lines(&agent, DEAD_LETTERED);
    assert_eq!(failures.len(), 2, "{p}: {failures:?}");
    for l in &failures {
        assert_eq!(
            harness::agent::field(l, "kind").as_deref(),
            Some(bad.kind),
            "{p}: log line {l}"
        );
        assert_eq!(
            harness::agent::field(l, "events").as_deref(),
            Some("3"),
            "{l}"
        );
    }
    let restarts = log_lines(&agent, "starting a fresh plugin instance after a failure").len();
    if bad.fatal {
        assert!(
            restarts >= 2,
            "{p}: a fresh instance must replace the failed one (saw {restarts} restarts)"
        );
    } else {
        assert_eq!(restarts, 0, "{p}: an `err` result keeps the instance");
    }

    let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "{p}: silt run should exit 0 after SIGTERM, got {st}"
    );
    let snap = lake.snapshot().await.expect("read lake");
    let v = Verdict::compute(&exp, &all, &snap);
    note(t0, format!("{p}: {}", v.summary().trim_end()));
    v.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loop_is_stopped_at_timeout_over_http() {
    misbehaving_over_http(LOOP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_stopped_at_max_memory_over_http() {
    misbehaving_over_http(MEMBOMB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_is_contained_over_http() {
    misbehaving_over_http(TRAP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_result_is_dead_lettered_over_http() {
    misbehaving_over_http(ERROR).await;
}

// ------------------------------------------------------------ misbehaving plugin over MQTT

/// MQTT source -> `test-loop` (poisoned by topic `plant/poison`) -> S3. The
/// loop must not stall the source: later messages keep flowing, and the
/// poisoned messages are dead-lettered (not redelivered forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loop_is_stopped_at_timeout_over_mqtt() {
    let Some(loop_wasm) = plugin_wasm("test-loop") else {
        return;
    };
    let t0 = Instant::now();
    let scratch = Scratch::new("plugins-mqtt-loop");
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let s3 = S3Server::start(scratch.path(), "telemetry");
    let dl_dir = scratch.join("dead-letter");
    let cfg = agent_section("gw-mqtt-bad", &dl_dir)
        + &config::mqtt_source("sensors", &broker.url(), &["plant/#"])
        + &transform(
            "guard",
            &loop_wasm,
            &["sensors"],
            &format!(
                "timeout = \"{TIMEOUT}\"\nmax_memory = \"{MAX_MEMORY}\"\n\
                 config = {{ topic = \"plant/poison\" }}"
            ),
        )
        + &config::s3_sink(
            "lake",
            &["guard"],
            &s3,
            "gzip",
            &config::batch(1_000, "8MiB", "1s"),
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("mqtt subscribed", 1), ("silt running", 1)], 60)
        .await;
    let mut exp = Expected::new("gw-mqtt-bad");
    let mut lake = S3Lake::new(&s3);

    let good = |prefix: &str| -> Vec<Msg> {
        (0..10)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                let payload = serde_json::to_vec(&json_event(&id, i, 200)).unwrap();
                Msg {
                    id,
                    topic: "plant/ok".into(),
                    payload,
                }
            })
            .collect()
    };

    // 1. Good messages flow.
    let before = good("m0");
    for m in &before {
        exp.add(&m.id, &m.topic, m.body());
    }
    publish_all(broker.port, "loop-pub-0", before).await;
    let ids: HashSet<String> = exp.events.keys().cloned().collect();
    if let Err(e) = lake.wait_for(&ids, deadline(60), t0).await {
        panic!("good messages before the poison did not reach the lake: {e}");
    }

    // 2. Poisoned messages (one JSON, one binary): the loop is stopped at
    // the timeout and they are dead-lettered byte for byte.
    let poison = vec![
        Msg {
            id: "bad-json".into(),
            topic: "plant/poison".into(),
            payload: serde_json::to_vec(&json_event("bad-json", 0, 150)).unwrap(),
        },
        Msg {
            id: "bad-bin".into(),
            topic: "plant/poison".into(),
            payload: binary_event("bad-bin", 300),
        },
    ];
    let poison_bodies: Vec<Body> = poison.iter().map(Msg::body).collect();
    let t_poison = Instant::now();
    publish_all(broker.port, "loop-pub-1", poison).await;
    let dead: Vec<Value> = {
        let mut dead = Vec::new();
        let r = wait_until(deadline(30), "2 dead-lettered events", || {
            dead = dead_letters(&dl_dir)
                .into_iter()
                .flat_map(|f| f.events)
                .collect();
            dead.len() >= 2
        })
        .await;
        if let Err(e) = r {
            panic!("{e} (have {dead:?})");
        }
        dead
    };
    let took = t_poison.elapsed();
    note(
        t0,
        format!("poisoned messages dead-lettered {took:.2?} after publishing"),
    );
    assert!(
        took < STOP_BOUND * 2,
        "the looping plugin must be stopped at its {TIMEOUT} limit (took {took:?})"
    );
    let got: Vec<Body> = dead.iter().map(dead_letter_body).collect();
    assert_eq!(got, poison_bodies, "dead-lettered payloads must be intact");
    assert!(dead.iter().all(|l| l["topic"] == "plant/poison"));
    assert!(agent.is_running(), "the agent must survive the loop");

    // 3. Later messages flow.
    let after = good("m1");
    for m in &after {
        exp.add(&m.id, &m.topic, m.body());
    }
    publish_all(broker.port, "loop-pub-2", after).await;
    let all: HashSet<String> = exp.events.keys().cloned().collect();
    if let Err(e) = lake.wait_for(&all, deadline(60), t0).await {
        panic!("good messages after the poison did not reach the lake: {e}");
    }

    let failures = log_lines(&agent, DEAD_LETTERED);
    assert!(!failures.is_empty());
    for l in &failures {
        assert_eq!(
            harness::agent::field(l, "kind").as_deref(),
            Some("timeout"),
            "{l}"
        );
    }
    let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "silt run should exit 0 after SIGTERM, got {st}"
    );

    // Exactly the poisoned messages were dead-lettered (acked, so not
    // redelivered), and exactly the good ones are in the lake.
    let files = dead_letters(&dl_dir);
    let n: usize = files.iter().map(|f| f.events.len()).sum();
    assert_eq!(n, 2, "dead-letter files: {files:?}");
    for f in &files {
        let reason = f.header["dead_letter"]["reason"]
            .as_str()
            .unwrap_or_default();
        assert!(
            reason.contains("ran longer than its 200ms limit"),
            "{reason}"
        );
    }
    let snap = lake.snapshot().await.expect("read lake");
    let v = Verdict::compute(&exp, &all, &snap);
    note(t0, v.summary().trim_end());
    v.assert_exactly_once();
}
