//! Host tests against the real components from `plugins/build.sh`.
//!
//! Without the built plugins these tests skip with a message, except under
//! CI (`CI` set), where a missing plugin is a failure: CI runs build.sh
//! before `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::event::Event;

fn wasm(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm")
        .join(format!("{name}.wasm"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: CI must run plugins/build.sh before cargo test",
        path.display()
    );
    eprintln!("SKIPPED: {} missing; run plugins/build.sh", path.display());
    None
}

/// One engine for all tests: fewer ticker threads, and the compile cache
/// under target/ makes reruns fast.
fn engine() -> &'static PluginEngine {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugin-test-cache");
        PluginEngine::new(&dir).unwrap()
    })
}

fn load(name: &str, config: Value, limits: PluginLimits) -> Option<Result<Plugin, PluginError>> {
    let path = wasm(name)?;
    Some(Plugin::load(
        engine(),
        name,
        &path,
        &config.to_string(),
        limits,
    ))
}

fn json_event(topic: &str, ts: i64, payload: Value) -> Event {
    Event::new(ts, topic, payload.to_string().into_bytes())
}

fn payloads(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .map(|e| serde_json::from_slice(&e.payload).unwrap())
        .collect()
}

#[test]
fn an_unknown_target_is_an_engine_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = PluginEngine::for_target(dir.path(), Some("no-such-arch-triple"))
        .err()
        .expect("an unknown target must be refused");
    assert!(matches!(err, PluginError::Engine { .. }), "{err}");
    assert!(
        err.to_string().contains("cannot create wasmtime engine"),
        "{err}"
    );
}

#[test]
fn identity_round_trips_every_field() {
    let Some(p) = load("identity", json!({}), PluginLimits::default()) else {
        return;
    };
    let mut p = p.unwrap();
    let mut a = Event::new(-5, "sensors/a", &b"\x00\xffraw"[..]);
    a.attributes = vec![("z".into(), "1".into()), ("a".into(), "2".into())];
    let batch = vec![
        a,
        json_event("b", i64::MAX, json!({"x": 1})),
        Event::new(0, "", Vec::new()),
    ];
    assert_eq!(p.process(batch.clone()).unwrap(), batch);
    assert_eq!(p.process(Vec::new()).unwrap(), Vec::new());
    assert!(p.tick(i64::MIN).unwrap().is_empty());
}

#[test]
fn example_plugins_transform_through_the_host() {
    let config = json!({"rename": {"temp": "temperature_c"},
                        "convert": {"temperature_c": {"from": "F", "to": "C", "decimals": 1}},
                        "required": ["device"]});
    let Some(p) = load("json-clean", config, PluginLimits::default()) else {
        return;
    };
    let out = p
        .unwrap()
        .process(vec![
            json_event("t", 1, json!({"device": "a", "temp": 212})),
            json_event("t", 2, json!({"temp": 1})),
        ])
        .unwrap();
    assert_eq!(
        payloads(&out),
        [json!({"device": "a", "temperature_c": 100.0})]
    );

    let config = json!({"sensor": "id", "window_ms": 1000, "grace_ms": 0});
    let Some(p) = load("downsample", config, PluginLimits::default()) else {
        return;
    };
    let mut p = p.unwrap();
    let absorbed = p
        .process(vec![
            json_event("t", 10, json!({"id": "s", "v": 1})),
            json_event("t", 20, json!({"id": "s", "v": 3})),
        ])
        .unwrap();
    assert!(absorbed.is_empty());
    let out = p.tick(1000).unwrap();
    assert_eq!(payloads(&out)[0]["v"], json!(2.0));
}

#[test]
fn init_errors_name_the_plugin_and_the_problem() {
    let Some(r) = load("json-clean", json!({"renmae": {}}), PluginLimits::default()) else {
        return;
    };
    let err = r.err().unwrap();
    assert!(matches!(err, PluginError::Init { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("json-clean") && msg.contains("renmae"),
        "{msg}"
    );

    let Some(r) = load("test-error", json!({"in": "init"}), PluginLimits::default()) else {
        return;
    };
    assert!(matches!(r.err().unwrap(), PluginError::Init { .. }));

    let Some(r) = load("test-trap", json!({"in": "init"}), PluginLimits::default()) else {
        return;
    };
    let err = r.err().unwrap();
    assert!(
        matches!(err, PluginError::Trap { call: "init", .. }),
        "{err:?}"
    );
}

#[test]
fn plugin_error_keeps_the_instance() {
    let config = json!({"topic": "poison", "message": "bad batch"});
    let Some(p) = load("test-error", config, PluginLimits::default()) else {
        return;
    };
    let mut p = p.unwrap();
    let err = p
        .process(vec![json_event("poison", 1, json!({}))])
        .unwrap_err();
    assert!(matches!(&err, PluginError::Failed { message, .. } if message == "bad batch"));
    assert!(!err.is_fatal_to_instance());
    assert_eq!(
        p.process(vec![json_event("ok", 1, json!({}))])
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn trap_is_an_error_and_the_next_call_gets_a_fresh_instance() {
    let Some(p) = load(
        "test-trap",
        json!({"topic": "poison"}),
        PluginLimits::default(),
    ) else {
        return;
    };
    let mut p = p.unwrap();
    let ok = vec![json_event("ok", 1, json!({"a": 1}))];
    assert_eq!(p.process(ok.clone()).unwrap(), ok);
    let err = p
        .process(vec![json_event("poison", 1, json!({}))])
        .unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::Trap {
                call: "process",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_fatal_to_instance());
    assert_eq!(p.process(ok.clone()).unwrap(), ok);
    p.reinstantiate().unwrap();
    assert_eq!(p.process(ok.clone()).unwrap(), ok);
}

#[test]
fn endless_loop_times_out() {
    let limits = PluginLimits {
        timeout: Duration::from_millis(200),
        ..PluginLimits::default()
    };
    let Some(p) = load("test-loop", json!({"topic": "poison"}), limits) else {
        return;
    };
    let mut p = p.unwrap();
    let started = Instant::now();
    let err = p
        .process(vec![json_event("poison", 1, json!({}))])
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            PluginError::Timeout {
                call: "process",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(
        p.process(vec![json_event("ok", 1, json!({}))])
            .unwrap()
            .len(),
        1
    );

    let Some(p) = load("test-loop", json!({"in": "tick"}), limits_ms(100)) else {
        return;
    };
    let err = p.unwrap().tick(0).unwrap_err();
    assert!(
        matches!(err, PluginError::Timeout { call: "tick", .. }),
        "{err:?}"
    );
}

fn limits_ms(ms: u64) -> PluginLimits {
    PluginLimits {
        timeout: Duration::from_millis(ms),
        ..PluginLimits::default()
    }
}

#[test]
fn memory_bomb_hits_the_limit() {
    let limits = PluginLimits {
        max_memory: 16 << 20,
        ..PluginLimits::default()
    };
    let Some(p) = load("test-membomb", json!({"topic": "poison"}), limits) else {
        return;
    };
    let mut p = p.unwrap();
    let err = p
        .process(vec![json_event("poison", 1, json!({}))])
        .unwrap_err();
    assert!(
        matches!(err, PluginError::MemoryLimit { limit, .. } if limit == 16 << 20),
        "{err:?}"
    );
    assert_eq!(
        p.process(vec![json_event("ok", 1, json!({}))])
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn fuel_budget_stops_a_loop() {
    let limits = PluginLimits {
        fuel: Some(50_000_000),
        timeout: Duration::from_secs(30),
        ..PluginLimits::default()
    };
    let Some(p) = load("test-loop", json!({"topic": "poison"}), limits.clone()) else {
        return;
    };
    let mut p = p.unwrap();
    assert_eq!(
        p.process(vec![json_event("ok", 1, json!({}))])
            .unwrap()
            .len(),
        1
    );
    let err = p
        .process(vec![json_event("poison", 1, json!({}))])
        .unwrap_err();
    assert!(matches!(err, PluginError::FuelExhausted { .. }), "{err:?}");
}

#[test]
fn compile_cache_is_reused_across_engines() {
    let Some(path) = wasm("identity") else { return };
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    Plugin::load(
        &PluginEngine::new(dir.path()).unwrap(),
        "identity",
        &path,
        "{}",
        PluginLimits::default(),
    )
    .unwrap();
    let cold = t0.elapsed();
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].extension().is_some_and(|e| e == "cwasm"));

    let t1 = Instant::now();
    let mut p = Plugin::load(
        &PluginEngine::new(dir.path()).unwrap(),
        "identity",
        &path,
        "{}",
        PluginLimits::default(),
    )
    .unwrap();
    let warm = t1.elapsed();
    eprintln!("identity load: cold {cold:?}, from cache {warm:?}");
    assert_eq!(
        p.process(vec![Event::new(1, "t", &b"x"[..])])
            .unwrap()
            .len(),
        1
    );

    // A corrupt cache entry is replaced, not fatal.
    std::fs::write(&entries[0], b"garbage").unwrap();
    Plugin::load(
        &PluginEngine::new(dir.path()).unwrap(),
        "identity",
        &path,
        "{}",
        PluginLimits::default(),
    )
    .unwrap();
    assert_ne!(std::fs::read(&entries[0]).unwrap(), b"garbage");
}

#[test]
fn load_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.wasm");
    let err = Plugin::load(engine(), "x", &missing, "{}", PluginLimits::default())
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::Load { .. }));
    assert!(err.to_string().contains("nope.wasm"), "{err}");

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm junk").unwrap();
    let err = Plugin::load(engine(), "x", &junk, "{}", PluginLimits::default())
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::Load { .. }), "{err:?}");
}

/// Components hand-written in WAT, for failures the SDK never produces.
fn wat_component(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let path = dir.join(format!("{name}.wat"));
    std::fs::write(&path, wat).unwrap();
    path
}

#[test]
fn components_built_against_0_1_0_are_refused_with_a_rebuild_hint() {
    let dir = tempfile::tempdir().unwrap();
    let old = wat_component(
        dir.path(),
        "old",
        r#"(component
            (import "silt:plugin/host@0.1.0" (instance
                (export "log" (func (param "message" string))))))"#,
    );
    let err = Plugin::load(engine(), "old", &old, "{}", PluginLimits::default())
        .err()
        .unwrap();
    assert!(matches!(err, PluginError::Contract { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("silt:plugin@0.1.0"), "{msg}");
    assert!(msg.contains("silt:plugin@0.2.0"), "{msg}");
    assert!(
        msg.contains("rebuild it against the current silt-sdk"),
        "{msg}"
    );
}

#[test]
fn malformed_output_is_an_error_not_a_panic() {
    // `process` and `tick` return `ok` with a 3-byte buffer: a truncated
    // event count. `init` returns `ok` (a zeroed return area at address 0).
    let dir = tempfile::tempdir().unwrap();
    let bad = wat_component(
        dir.path(),
        "bad",
        r#"(component
            (core module $m
                (memory (export "memory") 1)
                (data (i32.const 16) "\00\00\00\00\40\00\00\00\03\00\00\00")
                (data (i32.const 64) "\01\00\00")
                (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 1024)
                (func (export "init") (param i32 i32) (result i32) i32.const 0)
                (func (export "process") (param i32 i32) (result i32) i32.const 16)
                (func (export "tick") (param i64) (result i32) i32.const 16))
            (core instance $i (instantiate $m))
            (func (export "init") (param "config" string) (result (result (error string)))
                (canon lift (core func $i "init") (memory (core memory $i "memory"))
                    (realloc (core func $i "realloc"))))
            (func (export "process") (param "batch" (list u8))
                (result (result (list u8) (error string)))
                (canon lift (core func $i "process") (memory (core memory $i "memory"))
                    (realloc (core func $i "realloc"))))
            (func (export "tick") (param "now-ms" u64)
                (result (result (list u8) (error string)))
                (canon lift (core func $i "tick") (memory (core memory $i "memory")))))"#,
    );
    let mut p = Plugin::load(engine(), "bad", &bad, "{}", PluginLimits::default()).unwrap();
    for err in [
        p.process(vec![Event::new(1, "t", &b"x"[..])]).unwrap_err(),
        p.tick(0).unwrap_err(),
    ] {
        assert!(matches!(err, PluginError::BadOutput { .. }), "{err:?}");
        assert!(!err.is_fatal_to_instance());
        assert!(err.to_string().contains("malformed batch"), "{err}");
    }
}

#[test]
fn plugin_moves_between_threads() {
    let Some(p) = load("route", json!({"field": "site"}), PluginLimits::default()) else {
        return;
    };
    let mut p = p.unwrap();
    let out =
        std::thread::spawn(move || p.process(vec![json_event("t", 1, json!({"site": "n 1"}))]))
            .join()
            .unwrap()
            .unwrap();
    assert_eq!(out[0].attribute("site"), Some("n_1"));
}

#[test]
fn cli_runs_process_then_tick() {
    let Some(path) = wasm("downsample") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    std::fs::write(
        &input,
        "{\"topic\":\"t\",\"ts_ms\":1000,\"payload\":{\"id\":\"a\",\"v\":1}}\n\
         \n\
         {\"topic\":\"t\",\"ts_ms\":2000,\"payload_b64\":\"bm90IGpzb24=\"}\n",
    )
    .unwrap();
    let mut out = Vec::new();
    cli::plugin_test(&path, r#"{"sensor":"id"}"#, Some(&input), &mut out).unwrap();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["payload_b64"], "bm90IGpzb24=");
    assert_eq!(lines[1]["payload"]["count"], 1);

    let err = cli::plugin_test(&path, "[]", Some(&input), &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("JSON object"), "{err}");
    std::fs::write(&input, "{\"topic\":\"t\"}\n").unwrap();
    let err = cli::plugin_test(&path, "{}", Some(&input), &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
}

/// A `MakeWriter` collecting log output in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn guest_panics_reach_the_log_with_the_plugin_name() {
    let Some(path) = wasm("test-trap") else {
        return;
    };
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let mut p = Plugin::load(engine(), "trappy", &path, "{}", PluginLimits::default()).unwrap();
        assert!(p.process(vec![json_event("t", 1, json!({}))]).is_err());
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("ERROR")
            && text.contains("plugin=\"trappy\"")
            && text.contains("configured to panic in process"),
        "{text}"
    );
}

/// The sandbox in `mod.rs` holds against a plugin that tries: `test-sandbox`
/// reads a host file, lists directories, writes a file, reads the
/// environment and arguments (plain `std`), connects to a listening TCP
/// port, binds UDP and looks up a name (`wasi:sockets`), and reports each
/// real result. The host checks every attempt failed or saw nothing, and
/// that nothing happened on the host side (no file written, no connection
/// accepted).
#[test]
fn plugins_cannot_reach_files_env_or_network() {
    let dir = tempfile::tempdir().unwrap();
    let secret_text = "silt-sandbox-secret-4f1c9a";
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, secret_text).unwrap();
    let written = dir.path().join("written-by-plugin.txt");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    // A variable the host process has, so "not visible" means hidden.
    let host_path = std::env::var("PATH").expect("the test needs PATH set");
    let config = json!({
        "file": secret,
        "write": written,
        "env": "PATH",
        "port": listener.local_addr().unwrap().port(),
    });
    let Some(p) = load("test-sandbox", config, PluginLimits::default()) else {
        return;
    };
    let mut p = p.unwrap();
    let out = p.process(vec![json_event("t", 1, json!({}))]).unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    let text = String::from_utf8(out[0].payload.to_vec()).unwrap();
    eprintln!("test-sandbox report: {text}");
    let report: Value = serde_json::from_str(&text).unwrap();

    for probe in [
        "file",
        "read_dir_root",
        "read_dir_cwd",
        "write",
        "env_var",
        "tcp_connect",
        "udp_bind",
        "lookup",
    ] {
        let outcome = report[probe].as_str().unwrap_or_default();
        assert!(
            outcome.starts_with("error: "),
            "{probe} was not refused: {outcome:?} (report: {text})"
        );
    }
    assert_eq!(report["preopens"], json!([]), "{text}");
    assert_eq!(report["env_count"], json!(0), "{text}");
    assert_eq!(report["env_names"], json!([]), "{text}");
    assert_eq!(report["args_count"], json!(0), "{text}");
    assert!(!text.contains(secret_text), "{text}");
    assert!(!text.contains(&host_path), "{text}");
    assert!(!written.exists(), "the plugin wrote {}", written.display());
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the listener saw a connection: {other:?}"),
    }
}
