//! Error paths: `silt check` on bad configs (exit 1, stderr names file, line
//! and key), HTTP ingest rejections (400 / 413 / 401 / 503) that must accept
//! nothing, and `silt --version`.

mod harness;

use std::path::Path;
use std::time::Duration;

use harness::agent::silt_output;
use harness::http::{BINARY, HttpClient, IngestReq, JSON, NDJSON};
use harness::payload::{Body, binary_event, json_event};
use harness::*;

// ---------------------------------------------------------------- CLI

#[test]
fn version_prints_name_and_version() {
    let out = silt_output(&["--version"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "silt --version failed: {out:?}");
    assert!(
        stdout.contains("silt") && stdout.contains(env!("CARGO_PKG_VERSION")),
        "unexpected --version output: {stdout:?}"
    );
}

/// A valid config that needs no running servers for `check`.
fn base_config(dir: &Path) -> String {
    format!(
        r#"[agent]
id = "gw-check"
data_dir = "{data}"

[spool]
max_bytes = "64MiB"
when_full = "block"

[sources.sensors]
type = "mqtt"
url = "mqtt://127.0.0.1:1"
topics = ["sensors/#"]
qos = 1

[sources.api]
type = "http"
listen = "127.0.0.1:1"
auth_token = "secret"
max_body = "1MiB"

[sinks.lake]
type = "s3"
inputs = ["sensors", "api"]
bucket = "telemetry"
endpoint = "http://127.0.0.1:1"
region = "us-east-1"
access_key_id = "K"
secret_access_key = "S"
key = "{{sink}}/{{yyyy}}/{{agent}}-{{batch}}.ndjson.gz"
compression = "gzip"
batch = {{ max_records = 100, max_bytes = "1MiB", max_age = "5s" }}
retry_max = "1s"

[sinks.archive]
type = "file"
inputs = ["api"]
path = "{lake}"
key = "{{sink}}/{{agent}}-{{batch}}.ndjson"
compression = "none"
"#,
        data = dir.join("data").display(),
        lake = dir.join("lake").display()
    )
}

/// Replaces the unique line starting with `old` (trimmed) with `new`; returns
/// the config and the 1-based line number of the new line.
fn edit(cfg: &str, old: &str, new: &str) -> (String, usize) {
    let mut hit = None;
    let lines: Vec<String> = cfg
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if l.trim_start().starts_with(old) {
                assert!(hit.is_none(), "test bug: {old:?} matches twice");
                hit = Some(i + 1);
                new.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    (
        lines.join("\n") + "\n",
        hit.unwrap_or_else(|| panic!("test bug: no line starts with {old:?}")),
    )
}

/// Inserts `new` right after the line `after`; returns config and its line number.
fn insert_after(cfg: &str, after: &str, new: &str) -> (String, usize) {
    let mut out = Vec::new();
    let mut at = None;
    for l in cfg.lines() {
        out.push(l.to_string());
        if l.trim() == after {
            out.push(new.to_string());
            at = Some(out.len());
        }
    }
    (
        out.join("\n") + "\n",
        at.unwrap_or_else(|| panic!("test bug: no line {after:?}")),
    )
}

fn check(path: &Path, envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = silt_output(&["check", "-c", path.to_str().unwrap()], envs);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        strip_ansi(&String::from_utf8_lossy(&out.stderr)),
    )
}

/// stderr must name the file, the line and the key.
fn assert_names(case: &str, stderr: &str, file: &Path, line: usize, key: &str) {
    let fname = file.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr.contains(fname),
        "[{case}] stderr should name the file {fname}:\n{stderr}"
    );
    let line_named = stderr.contains(&format!("{fname}:{line}"))
        || stderr.contains(&format!("line {line}"))
        || stderr.contains(&format!("line: {line}"))
        || stderr.contains(&format!("line={line}"));
    assert!(
        line_named,
        "[{case}] stderr should name line {line} (as `{fname}:{line}` or `line {line}`):\n{stderr}"
    );
    assert!(
        stderr.contains(key),
        "[{case}] stderr should name the key {key:?}:\n{stderr}"
    );
}

#[test]
fn check_accepts_valid_config_and_prints_graph() {
    let s = Scratch::new("check-ok");
    let p = s.join("silt.toml");
    std::fs::write(&p, base_config(s.path())).unwrap();
    let (code, stdout, stderr) = check(&p, &[]);
    assert_eq!(code, 0, "valid config rejected:\n{stderr}");
    for name in ["sensors", "api", "lake", "archive"] {
        assert!(
            stdout.contains(name),
            "pipeline graph should mention {name}:\n{stdout}"
        );
    }
    // ${VAR} and ${VAR:-default} substitution.
    let (cfg, _) = edit(
        &base_config(s.path()),
        "bucket =",
        r#"bucket = "${SILT_TEST_BUCKET}""#,
    );
    let (cfg, _) = edit(
        &cfg,
        "region =",
        r#"region = "${SILT_TEST_SURELY_UNSET_REGION:-us-east-1}""#,
    );
    std::fs::write(&p, cfg).unwrap();
    let (code, _, stderr) = check(&p, &[("SILT_TEST_BUCKET", "from-env")]);
    assert_eq!(
        code, 0,
        "config with ${{VAR}} / ${{VAR:-default}} rejected:\n{stderr}"
    );
}

#[test]
fn check_rejects_unknown_key() {
    let s = Scratch::new("check-unknown");
    let p = s.join("silt.toml");
    let (cfg, line) = insert_after(&base_config(s.path()), "[sinks.lake]", r#"colour = "blue""#);
    std::fs::write(&p, cfg).unwrap();
    let (code, _, stderr) = check(&p, &[]);
    assert_eq!(
        code, 1,
        "unknown key must fail check with exit 1; stderr:\n{stderr}"
    );
    assert_names("unknown key", &stderr, &p, line, "colour");

    // `run` refuses it too, quickly and with an error exit.
    let out = silt_output(&["run", "-c", p.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "silt run must refuse a bad config");
}

#[test]
fn check_rejects_missing_env_var() {
    let s = Scratch::new("check-var");
    let p = s.join("silt.toml");
    let (cfg, line) = edit(
        &base_config(s.path()),
        "secret_access_key =",
        r#"secret_access_key = "${SILT_TEST_SURELY_UNSET_SECRET}""#,
    );
    std::fs::write(&p, cfg).unwrap();
    let (code, _, stderr) = check(&p, &[]);
    assert_eq!(
        code, 1,
        "missing env var must fail check with exit 1; stderr:\n{stderr}"
    );
    assert_names("missing var", &stderr, &p, line, "secret_access_key");
    assert!(
        stderr.contains("SILT_TEST_SURELY_UNSET_SECRET"),
        "stderr should name the variable:\n{stderr}"
    );
}

#[test]
fn check_rejects_bad_values() {
    let s = Scratch::new("check-values");
    let cases: &[(&str, &str, &str)] = &[
        ("qos =", "qos = 7", "qos"),
        (
            "compression = \"gzip\"",
            "compression = \"lzma\"",
            "compression",
        ),
        ("when_full =", "when_full = \"sometimes\"", "when_full"),
        ("max_bytes = \"64MiB\"", "max_bytes = \"lots\"", "max_bytes"),
        ("retry_max =", "retry_max = \"soon\"", "retry_max"),
        ("type = \"mqtt\"", "type = \"amqp\"", "type"),
        ("max_body =", "max_body = -5", "max_body"),
        (
            "key = \"{sink}/{yyyy}",
            "key = \"{sink}/{yyyy}/{agent}.ndjson.gz\"",
            "key",
        ),
        (
            "inputs = [\"sensors\", \"api\"]",
            "inputs = [\"sensors\", \"nosuchsource\"]",
            "inputs",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (old, new, key)) in cases.iter().enumerate() {
        let p = s.join(&format!("case{i}.toml"));
        let (cfg, line) = edit(&base_config(s.path()), old, new);
        std::fs::write(&p, cfg).unwrap();
        let (code, _, stderr) = check(&p, &[]);
        let r = std::panic::catch_unwind(|| {
            assert_eq!(
                code, 1,
                "[{new}] must fail check with exit 1; stderr:\n{stderr}"
            );
            assert_names(new, &stderr, &p, line, key);
        });
        if let Err(e) = r {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            failures.push(msg);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad-value cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n---\n")
    );
}

#[test]
fn check_on_directory_names_the_bad_file() {
    let s = Scratch::new("check-dir");
    let dir = s.join("conf.d");
    std::fs::create_dir_all(&dir).unwrap();
    let base = base_config(s.path());
    let sinks_at = base.find("[sinks.lake]").unwrap();
    std::fs::write(dir.join("10-agent.toml"), &base[..sinks_at]).unwrap();
    let (sinks, line) = insert_after(&base[sinks_at..], "[sinks.archive]", "rotate = true");
    std::fs::write(dir.join("20-sinks.toml"), sinks).unwrap();
    std::fs::write(dir.join("README.md"), "not toml: ignored").unwrap();
    let (code, _, stderr) = check(&dir, &[]);
    assert_eq!(
        code, 1,
        "bad key in 20-sinks.toml must fail; stderr:\n{stderr}"
    );
    assert_names("dir", &stderr, &dir.join("20-sinks.toml"), line, "rotate");
    // Without the bad line the split config is valid.
    let (fixed, _) = edit(
        &std::fs::read_to_string(dir.join("20-sinks.toml")).unwrap(),
        "rotate = true",
        "",
    );
    std::fs::write(dir.join("20-sinks.toml"), fixed).unwrap();
    let (code, _, stderr) = check(&dir, &[]);
    assert_eq!(code, 0, "split config should be valid:\n{stderr}");
}

// ---------------------------------------------------------------- HTTP

const TOK: &str = "tok-123";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rejects_bad_requests_and_accepts_nothing_from_them() {
    let t0 = std::time::Instant::now();
    let s = Scratch::new("http-errors");
    let port = free_port();
    let lake_dir = s.join("lake");
    let cfg = config::agent("gw-err")
        + &config::http_source("api", port, Some(TOK), "64KiB")
        + &config::file_sink(
            "files",
            &["api"],
            &lake_dir,
            "none",
            &config::batch(1_000_000, "64MiB", "1h"),
        );
    let mut agent = Agent::start(&s.join("agent"), &cfg);
    agent.wait_ready(&[("http listening", 1)], 60).await;
    let c = HttpClient::new(port, Some(TOK));
    let bearer = format!("Bearer {TOK}");
    let mut exp = Expected::new("gw-err");
    let mut failures: Vec<String> = Vec::new();
    let mut expect = |what: &str,
                      r: &Result<harness::http::Reply, String>,
                      status: u16,
                      body_has: Option<&str>| {
        if let Some(f) = expect_status(what, r, status, body_has) {
            failures.push(f);
        }
    };

    // Malformed NDJSON: line 3 is broken; lines 1, 2, 4, 5 are fine but must
    // not be accepted either.
    let mut nd = Vec::new();
    for i in 1..=5 {
        if i == 3 {
            nd.extend_from_slice(b"{\"id\":\"bad-nd-3\", \"v\": \n");
        } else {
            nd.extend_from_slice(
                &serde_json::to_vec(&json_event(&format!("bad-nd-{i}"), i, 64)).unwrap(),
            );
            nd.push(b'\n');
        }
    }
    let r = c.post_raw("/v1/ingest/s1", NDJSON, nd, Some(&bearer)).await;
    expect("malformed NDJSON", &r, 400, Some("line 3"));

    // Malformed JSON array; the error is on line 3.
    let arr =
        b"[\n  {\"id\": \"bad-arr-1\"},\n  {\"id\": bad-arr-2},\n  {\"id\": \"bad-arr-3\"}\n]\n"
            .to_vec();
    let r = c.post_raw("/v1/ingest/s1", JSON, arr, Some(&bearer)).await;
    expect("malformed JSON array", &r, 400, Some("line 3"));

    // Over max_body (64 KiB).
    let mut big = Vec::new();
    let mut i = 0;
    while big.len() < 100 * 1024 {
        big.extend_from_slice(
            &serde_json::to_vec(&json_event(&format!("big-{i}"), i, 500)).unwrap(),
        );
        big.push(b'\n');
        i += 1;
    }
    let r = c
        .post_raw("/v1/ingest/s1", NDJSON, big, Some(&bearer))
        .await;
    expect("oversized body", &r, 413, None);
    // The rest of that body is never read, so the connection cannot carry
    // another request: the reply must say so, or a pooling client sends
    // the next request into a closing socket.
    if r.as_ref().is_ok_and(|rep| !rep.closes) {
        expect(
            "oversized body: 413 without `Connection: close`",
            &Err(String::new()),
            0,
            None,
        );
    }

    // Auth: missing header, wrong token, wrong scheme.
    let one = |id: &str| serde_json::to_vec(&json_event(id, 0, 64)).unwrap();
    let r = c
        .post_raw("/v1/ingest/s1", JSON, one("unauth-1"), None)
        .await;
    expect("missing token", &r, 401, None);
    let r = c
        .post_raw("/v1/ingest/s1", JSON, one("unauth-2"), Some("Bearer wrong"))
        .await;
    expect("wrong token", &r, 401, None);
    let r = c
        .post_raw("/v1/ingest/s1", JSON, one("unauth-3"), Some(TOK))
        .await;
    expect("token without Bearer", &r, 401, None);

    // Good requests are accepted with the exact count.
    let good = [
        IngestReq::single("s1", json_event("good-1", 1, 100)),
        IngestReq::ndjson(
            "s2",
            (2..5)
                .map(|i| json_event(&format!("good-{i}"), i, 100))
                .collect(),
        ),
        IngestReq::array(
            "s2",
            (5..8)
                .map(|i| json_event(&format!("good-{i}"), i, 100))
                .collect(),
        ),
        IngestReq::binary("s3", "good-bin", 300),
    ];
    for g in &good {
        let r = c.ingest(g).await;
        match &r {
            Ok(rep) if rep.status == 202 => {
                let n = rep
                    .json()
                    .and_then(|v| v.get("accepted").and_then(|a| a.as_u64()));
                if n != Some(g.events.len() as u64) {
                    let what = format!(
                        "good request: accepted should be {}, body {:?}",
                        g.events.len(),
                        rep.body
                    );
                    expect(&what, &Err(String::new()), 0, None);
                }
            }
            _ => expect(&format!("good request to {}", g.stream), &r, 202, None),
        }
        for (id, body) in &g.events {
            exp.add(id, &g.stream, body.clone());
        }
    }
    // An unknown content type is one binary event.
    let raw = binary_event("good-text", 50);
    let r = c
        .post_raw("/v1/ingest/s3", "text/plain", raw.clone(), Some(&bearer))
        .await;
    expect("text/plain body", &r, 202, None);
    exp.add("good-text", "s3", Body::Binary(raw));
    let _ = BINARY;

    let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "silt run should exit 0 after SIGTERM, got {st}"
    );
    let snap = FileLake::new(&lake_dir).snapshot();
    let all: Vec<String> = exp.events.keys().cloned().collect();
    let v = Verdict::compute(&exp, &all, &snap);
    note(t0, v.summary());
    note(t0, format!("HTTP status failures: {failures:#?}"));
    // Rejected requests' events would show up as `unknown`.
    let rejected_leaked: Vec<&String> = v
        .unknown
        .iter()
        .filter(|u| ["bad-", "big-", "unauth-"].iter().any(|p| u.starts_with(p)))
        .collect();
    assert!(
        rejected_leaked.is_empty(),
        "events of rejected requests reached the lake: {rejected_leaked:?}"
    );
    assert!(
        failures.is_empty(),
        "HTTP error handling:\n  {}",
        failures.join("\n  ")
    );
    v.assert_exactly_once();
}

fn expect_status(
    what: &str,
    r: &Result<harness::http::Reply, String>,
    status: u16,
    body_has: Option<&str>,
) -> Option<String> {
    match r {
        Err(e) if e.is_empty() => Some(what.to_string()),
        Err(e) => Some(format!("{what}: transport error {e}")),
        Ok(r) if r.status != status => Some(format!(
            "{what}: expected {status}, got {} {:?}",
            r.status, r.body
        )),
        Ok(r) => {
            let needle = body_has?;
            let err = r
                .json()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
            match err {
                Some(e) if e.contains(needle) => None,
                _ => Some(format!(
                    "{what}: body should be JSON {{\"error\": ...}} mentioning {needle:?}, got {:?}",
                    r.body
                )),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_spool_full_returns_503_with_retry_after() {
    let s = Scratch::new("spool-full");
    let port = free_port();
    let dead = free_port(); // nothing listens: uploads never succeed
    let cfg = format!(
        r#"[agent]
id = "gw-full"
data_dir = "{data}"
shutdown_timeout = "1s"

[spool]
max_bytes = "256KiB"
when_full = "block"

[sources.api]
type = "http"
listen = "127.0.0.1:{port}"

[sinks.lake]
type = "s3"
inputs = ["api"]
bucket = "telemetry"
endpoint = "http://127.0.0.1:{dead}"
region = "us-east-1"
access_key_id = "K"
secret_access_key = "S"
key = "{{sink}}/{{agent}}-{{batch}}.ndjson"
compression = "none"
batch = {{ max_records = 50, max_bytes = "64KiB", max_age = "1s" }}
retry_max = "1s"
"#,
        data = s.join("agent/data").display()
    );
    let mut agent = Agent::start(&s.join("agent"), &cfg);
    agent.wait_ready(&[("http listening", 1)], 60).await;
    let c = HttpClient::new(port, None);
    let mut accepted = 0usize;
    let mut got = None;
    for i in 0..2_000u64 {
        let req = IngestReq::single("s", json_event(&format!("fill-{i}"), i, 1024));
        let r = c.ingest(&req).await.expect("agent must stay reachable");
        match r.status {
            202 => accepted += 1,
            503 => {
                got = Some(r);
                break;
            }
            other => panic!(
                "unexpected status {other} while filling the spool: {:?}",
                r.body
            ),
        }
    }
    let r = got
        .unwrap_or_else(|| panic!("no 503 after {accepted} x 1 KiB events into a 256 KiB spool"));
    assert!(r.retry_after.is_some(), "503 must carry Retry-After: {r:?}");
    assert!(
        accepted >= 50,
        "spool of 256 KiB should take more than {accepted} KiB before refusing"
    );
    eprintln!(
        "spool full after {accepted} events; Retry-After {:?}",
        r.retry_after
    );
}
