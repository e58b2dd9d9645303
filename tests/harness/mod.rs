//! Shared integration-test harness for silt.
//!
//! Every test file includes it with `mod harness;`. Each test gets its own
//! scratch directory and its own loopback ports, so tests in one file can run
//! in parallel threads.
//!
//! Helpers never sleep to wait for a condition: they poll with a deadline and
//! fail with a message that says what was awaited and what was seen.
#![allow(dead_code)]

pub mod agent;
pub mod check;
pub mod config;
pub mod http;
pub mod lake;
pub mod lazyfs;
pub mod media;
pub mod mqtt;
pub mod payload;
pub mod pki;
pub mod postgres;
pub mod procs;
pub mod proxy;
pub mod python;
pub mod tmpfs;

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use agent::Agent;
#[allow(unused_imports)]
pub use check::{Expected, Verdict};
#[allow(unused_imports)]
pub use lake::{FileLake, S3Lake};
#[allow(unused_imports)]
pub use procs::{Mosquitto, S3Server};

/// An example plugin built by `plugins/build.sh`, or `None` (the test skips
/// with a message) when it is missing, except under CI (`CI` set).
pub fn plugin_wasm(name: &str) -> Option<PathBuf> {
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

/// A loopback port that was free a moment ago (bind to :0, read, release).
pub fn free_port() -> u16 {
    // The listener closes on return, so the kernel may hand the same port
    // out again before its user binds it (CI once gave an agent's API and
    // its HTTP source one port); never return a port twice.
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Deadline `secs` seconds from now.
pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Polls `cond` every 50 ms (async-friendly) until it holds or `deadline`
/// passes; on timeout returns Err with `what` and the time waited.
pub async fn wait_until<F: FnMut() -> bool>(
    deadline: Instant,
    what: &str,
    mut cond: F,
) -> Result<(), String> {
    wait_until_async(deadline, Duration::from_millis(50), what, || {
        std::future::ready(cond())
    })
    .await
}

/// Like [`wait_until`] with an async condition polled every `every`.
pub async fn wait_until_async<F, Fut>(
    deadline: Instant,
    every: Duration,
    what: &str,
    mut cond: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {:.1?} waiting for {what}",
                start.elapsed()
            ));
        }
        tokio::time::sleep(every).await;
    }
}

/// Blocking variant used outside async contexts (process start-up).
pub fn wait_until_blocking<F: FnMut() -> bool>(
    deadline: Instant,
    what: &str,
    mut cond: F,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {:.1?} waiting for {what}",
                start.elapsed()
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// True once something accepts TCP connections on 127.0.0.1:port.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Scratch directory for one test. Removed on success; kept (and its path
/// printed) when the test panics or `SILT_TEST_KEEP=1`, so logs and the lake
/// can be inspected.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let base = std::env::var_os("SILT_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("silt-{name}-"))
            .tempdir_in(base)
            .expect("tempdir");
        let path = dir.path().to_path_buf();
        Scratch {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep =
            std::thread::panicking() || std::env::var("SILT_TEST_KEEP").is_ok_and(|v| v == "1");
        if let Some(d) = self.dir.take()
            && keep
        {
            let p = d.keep();
            eprintln!("[harness] kept scratch dir {}", p.display());
        }
    }
}

/// Prints a progress line with the elapsed time since `t0` (shown by
/// `cargo test -- --nocapture`, and on failure).
pub fn note(t0: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:>7.2}s] {}", t0.elapsed().as_secs_f64(), msg.as_ref());
}

/// Strips ANSI colour escapes from a log line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if c2.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

pub const TOKEN: &str = "s3cr3t-token";

/// mosquitto + s3s-fs + `silt run` wired together:
/// MQTT source `sensors` (topics `mqtt_topics`), HTTP source `api` (token
/// [`TOKEN`]), S3 sink `lake` (gzip) fed by both.
/// Fields drop in order: agent, servers, then the scratch dir.
pub struct Stack {
    pub agent: Agent,
    pub broker: Mosquitto,
    pub s3: S3Server,
    pub http_port: u16,
    pub agent_id: String,
    pub t0: Instant,
    pub scratch: Scratch,
}

impl Stack {
    pub async fn start(name: &str, agent_id: &str, batch: &str, mqtt_topics: &[&str]) -> Stack {
        let t0 = Instant::now();
        let scratch = Scratch::new(name);
        let broker = Mosquitto::start(&scratch.join("mosquitto"));
        let s3 = S3Server::start(scratch.path(), "telemetry");
        let http_port = free_port();
        let cfg = config::agent(agent_id)
            + &config::mqtt_source("sensors", &broker.url(), mqtt_topics)
            + &config::http_source("api", http_port, Some(TOKEN), "16MiB")
            + &config::s3_sink("lake", &["sensors", "api"], &s3, "gzip", batch);
        let mut agent = Agent::start(&scratch.join("agent"), &cfg);
        agent.wait_stack_up().await;
        note(
            t0,
            format!(
                "stack up: mqtt :{}, s3 :{}, http :{}",
                broker.port, s3.port, http_port
            ),
        );
        Stack {
            agent,
            broker,
            s3,
            http_port,
            agent_id: agent_id.to_string(),
            t0,
            scratch,
        }
    }

    pub fn http(&self) -> http::HttpClient {
        http::HttpClient::new(self.http_port, Some(TOKEN))
    }

    pub fn lake(&self) -> S3Lake {
        S3Lake::new(&self.s3)
    }

    pub fn note(&self, msg: impl AsRef<str>) {
        note(self.t0, msg)
    }

    /// SIGTERM the agent and require exit status 0 within 60 s.
    pub async fn stop_agent_cleanly(&mut self) {
        let t = Instant::now();
        let st = self.agent.sigterm_and_wait(Duration::from_secs(60)).await;
        self.note(format!(
            "agent exited with {st} {:.2?} after SIGTERM",
            t.elapsed()
        ));
        assert!(
            st.success(),
            "silt run should exit 0 after SIGTERM, got {st}"
        );
    }
}
