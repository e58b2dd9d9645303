//! Power cuts, simulated with LazyFS under the spool: every acknowledged
//! event must survive them and reach S3 exactly once.
//!
//! Each trial mounts LazyFS over a fresh directory, runs `silt run` with
//! `data_dir` on it, drives HTTP ingest and MQTT QoS 1 load, and cuts the
//! power: SIGSTOP silt, drop everything not fsynced (`lazyfs::clear-cache`,
//! or a torn write that makes LazyFS crash), SIGKILL silt, unmount, mount a
//! new LazyFS over the same directory, restart silt with S3 up, and wait for
//! the sink to drain. Then every object is read back from S3:
//!
//! - every acknowledged event is present exactly once: an HTTP event whose
//!   request was answered 202, or an MQTT message whose PUBACK (from the
//!   broker, which then holds it in silt's persistent session until silt
//!   PUBACKs it after its own commit) arrived, before the SIGSTOP;
//! - no event is present twice (unacknowledged ones may be missing).
//!
//! Kinds of trial (one test each; they run one at a time):
//! 1. `power_cut_while_sink_down`: clear-cache with S3 down during the load,
//!    so sealed batches wait in the spool;
//! 2. `power_cut_while_uploading`: clear-cache with S3 up, batches being
//!    uploaded and completed around the cut;
//! 3. `torn_write_to_spool_log`: `lazyfs::torn-op` (odd trials: the next
//!    write in 3 parts, parts 1 and 3 persisted) or `lazyfs::torn-seq` (even
//!    trials: of two writes between fsyncs only the second persisted) on
//!    sled's log `<data_dir>/spool/db`; the crash LazyFS inflicts on itself
//!    is the cut. A fault that does not fire within 5 s (torn-seq needs two
//!    writes without an fsync between them) is replaced by a clear-cache cut,
//!    and the trial line says so;
//! 4. `power_cut_with_large_events`: like 2, with a 150 KB HTTP event in
//!    every 12th request (sled stores values this big as separate blobs);
//! 5. `power_cut_with_file_sink`: like 2, with a `file` sink instead of S3,
//!    its directory on the same LazyFS mount: the spool forgets a batch once
//!    its object is written, so the object must be fsynced by then. The cut
//!    comes once objects are visible; the objects are read back from the
//!    LazyFS root (what a further cut would leave), and an object file
//!    holding unsynced data at the cut fails the trial by itself.
//!
//! Each trial prints one line: kind, acked, found, lost, duplicated.
//! Knobs: `SILT_POWERLOSS_TRIALS` (trials per kind, default 2; a long run
//! uses 50), `SILT_POWERLOSS_SEED` (replays the cut moments), `SILT_LAZYFS`
//! (the binary; default where `../shared/tools/lazyfs/build.sh` puts it).
//! Without LazyFS (not root, no /dev/fuse, no ../shared/tools/lazyfs) the
//! tests print SKIP, except under `CI=true`, where they fail.

mod harness;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::http::{IngestReq, mixed_requests, spawn_load};
use harness::lake::Snapshot;
use harness::lazyfs::{self, LazyFs};
use harness::mqtt::{PubOpts, messages, spawn_publisher};
use harness::payload::{Rng, json_event};
use harness::*;

const AGENT_ID: &str = "gw-powerloss";
/// sled's log, relative to the LazyFS mount (`data_dir` is `<mnt>/data`).
const SPOOL_LOG: &str = "data/spool/db";
/// The file sink's directory of kind 5, relative to the LazyFS mount.
const FILE_LAKE: &str = "lake";
const HTTP_RATE: u32 = 300;
const MQTT_RATE: u32 = 300;
/// Load is generated for this long at most; the cut comes well before.
const LOAD_SECS: usize = 25;
/// Every `LARGE_EVERY`-th HTTP request of kind 4 is one event of `LARGE_SIZE` bytes.
const LARGE_EVERY: usize = 12;
const LARGE_SIZE: usize = 150_000;

/// Trials share two cores and their timing matters: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    SinkDown,
    Uploading,
    Torn,
    Large,
    FileSink,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::SinkDown => "clear-cache/sink-down",
            Kind::Uploading => "clear-cache/sink-up",
            Kind::Torn => "torn-write",
            Kind::Large => "large-events",
            Kind::FileSink => "clear-cache/file-sink",
        }
    }

    fn num(self) -> u8 {
        match self {
            Kind::SinkDown => 1,
            Kind::Uploading => 2,
            Kind::Torn => 3,
            Kind::Large => 4,
            Kind::FileSink => 5,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_while_sink_down() {
    run_kind(Kind::SinkDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_while_uploading() {
    run_kind(Kind::Uploading).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_write_to_spool_log() {
    run_kind(Kind::Torn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_with_large_events() {
    run_kind(Kind::Large).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_with_file_sink() {
    run_kind(Kind::FileSink).await;
}

/// A result line, written to stderr directly: past the test harness's
/// capture, so it shows in every `cargo test` run.
fn shout(line: &str) {
    use std::io::Write;
    // One write, so lines of tests running side by side do not mix.
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run_kind(kind: Kind) {
    let test = format!("powerloss {}", kind.name());
    let Some(bin) = lazyfs::binary_or_skip(&test) else {
        return;
    };
    let _one_at_a_time = SERIAL.lock().await;
    let trials: usize = env_num("SILT_POWERLOSS_TRIALS", 2);
    let seed = std::env::var("SILT_POWERLOSS_SEED").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            .to_string()
    });
    let t0 = Instant::now();
    note(
        t0,
        format!(
            "{test}: {trials} trials (SILT_POWERLOSS_TRIALS), seed {seed} (SILT_POWERLOSS_SEED), LazyFS {}",
            bin.display()
        ),
    );
    let mut results = Vec::new();
    // Scratch dirs of failed trials, kept (and printed) by the final panic.
    let mut kept = Vec::new();
    for trial in 1..=trials {
        let mut rng = Rng::seeded(&format!("{}-{seed}-{trial}", kind.name()));
        let scratch = Scratch::new(&format!("pl{}-{trial}", kind.num()));
        let r = run_trial(kind, trial, trials, &bin, &scratch, &mut rng).await;
        shout(&r.line());
        if !r.passed() {
            eprintln!("{}", r.details);
            kept.push(scratch);
        }
        results.push(r);
    }
    let failed: Vec<&TrialResult> = results.iter().filter(|r| !r.passed()).collect();
    let sum = |f: fn(&TrialResult) -> usize| results.iter().map(f).sum::<usize>();
    shout(&format!(
        "powerloss {}: {trials} trials in {:.1?}, {} failed; acked {}, found {}, lost {}, duplicated {}",
        kind.name(),
        t0.elapsed(),
        failed.len(),
        sum(|r| r.acked()),
        sum(|r| r.found),
        sum(|r| r.lost()),
        sum(|r| r.dup_ids),
    ));
    assert!(
        failed.is_empty(),
        "{test}: {} of {trials} trials broke the durability promise (seed {seed}):\n{}",
        failed.len(),
        failed
            .iter()
            .map(|r| format!("{}\n{}", r.line(), r.details))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(kept);
}

/// What one trial saw.
#[derive(Default)]
struct TrialResult {
    kind: &'static str,
    trial: usize,
    trials: usize,
    /// How the power was cut.
    how: String,
    acked_http: usize,
    acked_mqtt: usize,
    /// Acknowledged events present in the lake.
    found: usize,
    lost_http: usize,
    lost_mqtt: usize,
    lost_large: usize,
    /// Ids present more than once, and their extra copies.
    dup_ids: usize,
    dup_extra: usize,
    /// Unacknowledged events that made it anyway.
    unacked_present: usize,
    /// Bytes LazyFS held unsynced at the cut (all files).
    unsynced: Option<u64>,
    /// Anything else that went wrong (restart, drain, bad records).
    problems: Vec<String>,
    secs: f64,
    /// Verdict summary (missing and duplicated ids) for failures.
    details: String,
}

impl TrialResult {
    fn acked(&self) -> usize {
        self.acked_http + self.acked_mqtt
    }

    fn lost(&self) -> usize {
        self.lost_http + self.lost_mqtt
    }

    fn passed(&self) -> bool {
        self.lost() == 0 && self.dup_ids == 0 && self.problems.is_empty()
    }

    fn line(&self) -> String {
        let large = if self.kind == Kind::Large.name() {
            format!(", {} of them large", self.lost_large)
        } else {
            String::new()
        };
        format!(
            "powerloss {} trial {}/{}: {}: acked {} (http {}, mqtt {}), found {}, lost {} (http {}, mqtt {}{large}), \
             duplicated {} ({} extra copies); unacked present {}; unsynced at cut {}; {:.1}s{}{}",
            self.kind,
            self.trial,
            self.trials,
            if self.passed() { "ok" } else { "FAIL" },
            self.acked(),
            self.acked_http,
            self.acked_mqtt,
            self.found,
            self.lost(),
            self.lost_http,
            self.lost_mqtt,
            self.dup_ids,
            self.dup_extra,
            self.unacked_present,
            self.unsynced
                .map(|b| format!("{b} B"))
                .unwrap_or_else(|| "?".into()),
            self.secs,
            if self.how.is_empty() {
                String::new()
            } else {
                format!("; {}", self.how)
            },
            if self.problems.is_empty() {
                String::new()
            } else {
                format!("; problems: {}", self.problems.join("; "))
            },
        )
    }
}

/// The agent of every kind; `sink` is the `[sinks.lake]` table.
fn agent_config(
    data_dir: &Path,
    api_port: u16,
    http_port: u16,
    broker_url: &str,
    sink: &str,
) -> String {
    // LazyFS has no statfs (free space reads as 0): no free-space floor.
    format!(
        "[agent]\nid = \"{AGENT_ID}\"\ndata_dir = \"{}\"\nshutdown_timeout = \"30s\"\n\n\
         [spool]\nmax_bytes = \"1GiB\"\nwhen_full = \"block\"\nmin_free = \"0B\"\n\n\
         [api]\nlisten = \"127.0.0.1:{api_port}\"\n\n",
        data_dir.display()
    ) + config::mqtt_source("sensors", broker_url, &["power/#"]).trim_end()
        + "\nreconnect_max = \"1s\"\nkeep_alive = \"5s\"\n\n"
        + &config::http_source("api", http_port, Some(TOKEN), "16MiB")
        + sink
}

const SINK_INPUTS: &[&str] = &["sensors", "api"];

fn sink_batch() -> String {
    config::batch(500, "8MiB", "1s")
}

/// Where the sink writes, read back: S3 through its API, or the file sink's
/// directory under the LazyFS root, where only what was fsynced is.
enum Lake {
    S3(S3Lake),
    File(FileLake),
}

impl Lake {
    async fn objects(&self) -> Result<usize, String> {
        match self {
            Lake::S3(l) => l.keys().await.map(|k| k.len()),
            Lake::File(l) => Ok(l.files().len()),
        }
    }

    async fn snapshot(&mut self) -> Result<Snapshot, String> {
        match self {
            Lake::S3(l) => l.snapshot().await,
            Lake::File(l) => Ok(l.snapshot()),
        }
    }
}

/// Random duration in `lo..hi` milliseconds.
fn ms(rng: &mut Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rng.below(hi - lo))
}

async fn run_trial(
    kind: Kind,
    trial: usize,
    trials: usize,
    bin: &Path,
    scratch: &Scratch,
    rng: &mut Rng,
) -> TrialResult {
    let t0 = Instant::now();
    let mut r = TrialResult {
        kind: kind.name(),
        trial,
        trials,
        ..Default::default()
    };
    if let Err(e) = trial_inner(kind, trial, bin, scratch, rng, &mut r, t0).await {
        r.problems.push(e);
    }
    r.secs = t0.elapsed().as_secs_f64();
    r
}

#[allow(clippy::too_many_arguments)]
async fn trial_inner(
    kind: Kind,
    trial: usize,
    bin: &Path,
    scratch: &Scratch,
    rng: &mut Rng,
    r: &mut TrialResult,
    t0: Instant,
) -> Result<(), String> {
    let say = |m: String| note(t0, format!("[{} #{trial}] {m}", kind.name()));
    // Declared in this order so they drop the other way round: silt first,
    // then the mount, then the servers.
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let mut s3 = (kind != Kind::FileSink).then(|| S3Server::start(scratch.path(), "telemetry"));
    let mut fs = LazyFs::mount(bin, &scratch.join("l"))?;
    let (http_port, api_port) = (free_port(), free_port());
    let data_dir = fs.mnt.join("data");
    let sink = match &s3 {
        Some(s3) => config::s3_sink("lake", SINK_INPUTS, s3, "gzip", &sink_batch()),
        None => config::file_sink(
            "lake",
            SINK_INPUTS,
            &fs.mnt.join(FILE_LAKE),
            "gzip",
            &sink_batch(),
        ),
    };
    let cfg = agent_config(&data_dir, api_port, http_port, &broker.url(), &sink);
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    wait_up(&mut agent, 60).await?;
    say(format!(
        "stack up: LazyFS {} over {}, mqtt :{}, sink {}, http :{}",
        fs.mnt.display(),
        fs.root.display(),
        broker.port,
        match &s3 {
            Some(s3) => format!("s3 :{}", s3.port),
            None => format!("file {}", fs.mnt.join(FILE_LAKE).display()),
        },
        http_port
    ));
    if kind == Kind::SinkDown
        && let Some(s3) = s3.as_mut()
    {
        s3.stop();
    }

    // The load: every event carries a unique id, recorded in the ledger.
    let pfx = format!("k{}t{trial}", kind.num());
    let mut exp = Expected::new(AGENT_ID);
    let msgs = messages(
        &format!("{pfx}m"),
        MQTT_RATE as usize * LOAD_SECS,
        &["power/a", "power/b/c"],
        4,
        200,
    );
    for m in &msgs {
        exp.add(&m.id, &m.topic, m.body());
    }
    let mqtt_ids: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    let mut reqs = mixed_requests(
        &format!("{pfx}h"),
        HTTP_RATE as usize * LOAD_SECS,
        &["power"],
        200,
    );
    if kind == Kind::Large {
        let mut with_large = Vec::with_capacity(reqs.len() + reqs.len() / LARGE_EVERY);
        for (i, q) in reqs.into_iter().enumerate() {
            if i % LARGE_EVERY == LARGE_EVERY / 2 {
                let id = format!("{pfx}h-big-{i}");
                with_large.push(IngestReq::single(
                    "power",
                    json_event(&id, i as u64, LARGE_SIZE),
                ));
            }
            with_large.push(q);
        }
        reqs = with_large;
    }
    for q in &reqs {
        for (id, body) in &q.events {
            exp.add(id, &q.stream, body.clone());
        }
    }
    let t_load = Instant::now();
    // The broker acks the rest quickly after the cut; those acks do not count.
    let (mprogress, mh) = spawn_publisher(
        broker.port,
        &format!("powerloss-pub-{pfx}"),
        msgs,
        PubOpts {
            inflight: 100,
            rate: Some(MQTT_RATE),
            ack_wait: Duration::from_secs(10),
        },
    );
    let (hp, hh) = spawn_load(
        http::HttpClient::new(http_port, Some(TOKEN)),
        reqs,
        4,
        Some(HTTP_RATE),
    );

    // Choose the moment, then cut.
    let dl = deadline(20);
    let lazyfs_crashed = match kind {
        Kind::SinkDown => {
            agent.wait_log("sink unreachable", dl).await?;
            tokio::time::sleep(ms(rng, 200, 4_000)).await;
            r.how = format!("cut {:.1?} into the load, S3 down", t_load.elapsed());
            false
        }
        Kind::Uploading | Kind::Large | Kind::FileSink => {
            agent.wait_log("uploaded object", dl).await?;
            tokio::time::sleep(ms(rng, 0, 4_000)).await;
            r.how = format!(
                "cut {:.1?} into the load, {} objects uploaded",
                t_load.elapsed(),
                agent.count_log("uploaded object")
            );
            false
        }
        Kind::Torn => {
            tokio::time::sleep(ms(rng, 1_000, 5_000)).await;
            let fault = if trial % 2 == 1 {
                fs.torn_op(SPOOL_LOG, 3, &[1, 3])?;
                "torn-op (next write to spool/db in 3 parts, 1 and 3 persisted)"
            } else {
                fs.torn_seq(SPOOL_LOG, &[2])?;
                "torn-seq (of the next two writes to spool/db between fsyncs, only the second persisted)"
            };
            let armed = Instant::now();
            let end = armed + Duration::from_secs(5);
            while fs.try_exit().is_none() && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let crashed = fs.try_exit().is_some();
            r.how = if crashed {
                format!(
                    "{fault} armed {:.1?} into the load; LazyFS crashed {:.0?} later",
                    armed - t_load,
                    armed.elapsed()
                )
            } else {
                format!(
                    "{fault} armed {:.1?} into the load did not fire within 5 s; clear-cache instead",
                    armed - t_load
                )
            };
            crashed
        }
    };
    // SIGSTOP: from here silt writes and answers nothing.
    let t_stop = Instant::now();
    let pid = agent.pid().ok_or("silt is not running at the cut")?;
    // SAFETY: kill(2) on the PID of our child, not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGSTOP);
    }
    mprogress.stop.store(true, Ordering::Relaxed);
    hp.stop.store(true, Ordering::Relaxed);
    if !lazyfs_crashed {
        let report = fs.unsynced_report().ok();
        r.unsynced = report.as_deref().and_then(unsynced_bytes);
        if kind == Kind::FileSink {
            let objects = FileLake::new(&fs.mnt.join(FILE_LAKE)).files().len();
            r.how.push_str(&format!(", {objects} objects visible"));
            if objects == 0 {
                r.problems
                    .push("no object of the file sink was visible at the cut".into());
            }
            // The staging file (`<key>#<n>`) is fsynced before it is linked
            // to the key, so a key with unsynced data was never fsynced.
            let report = report.ok_or("no unsynced-data report from LazyFS")?;
            let lake = fs.fault_path(FILE_LAKE);
            let unsynced: Vec<&str> = unsynced_files(&report)
                .into_iter()
                .filter(|f| f.starts_with(&lake) && !f.contains('#'))
                .collect();
            if !unsynced.is_empty() {
                r.problems.push(format!(
                    "objects of the file sink held unsynced data at the cut: {unsynced:?}"
                ));
            }
        }
        fs.clear_cache()?;
    }
    agent.kill9();
    say(format!("power cut: {}", r.how));
    let hrep = hh.await.map_err(|e| format!("http load task: {e}"))?;
    let mrep = mh.await.map_err(|e| format!("mqtt publisher task: {e}"))?;
    let acked_mqtt = mrep.acked_before(t_stop);
    r.acked_http = hrep.acked.len();
    r.acked_mqtt = acked_mqtt.len();
    say(format!(
        "acked before the cut: http {} ({}), mqtt {} of {} published ({} PUBACKed in all, error {:?})",
        hrep.acked.len(),
        hrep.summary(),
        acked_mqtt.len(),
        mrep.sent,
        mrep.acked.len(),
        mrep.error
    ));

    // Reboot: unmount (drops what LazyFS still cached), mount a new LazyFS
    // over the same root.
    fs.remount()?;
    let mut lake = match s3.as_mut() {
        Some(s3) => {
            if !s3.is_running() {
                s3.start_again();
            }
            Lake::S3(S3Lake::new(s3))
        }
        None => Lake::File(FileLake::new(&fs.root.join(FILE_LAKE))),
    };
    agent.spawn();
    match wait_up(&mut agent, 60).await {
        Err(e) => r.problems.push(format!("after the cut: {e}")),
        Ok(()) => {
            let moved = agent.count_log("damaged beyond recovery");
            if moved > 0 {
                r.problems
                    .push("silt moved the damaged spool aside at restart".to_string());
            }
            match wait_drained(api_port, &mut lake, &mut agent, deadline(120)).await {
                Ok(took) => say(format!("drained {took:.1?} after the restart")),
                Err(e) => r.problems.push(e),
            }
        }
    }
    if agent.is_running() {
        let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
        if !st.success() {
            r.problems
                .push(format!("silt exited with {st} after SIGTERM"));
        }
    }

    // Read everything back.
    let snap = lake.snapshot().await?;
    let acked: HashSet<String> = hrep.acked.iter().chain(&acked_mqtt).cloned().collect();
    let v = Verdict::compute(&exp, &acked, &snap);
    r.found = acked.len() - v.missing.len();
    for id in &v.missing {
        if mqtt_ids.contains(id) {
            r.lost_mqtt += 1;
        } else {
            r.lost_http += 1;
            if id.contains("-big-") {
                r.lost_large += 1;
            }
        }
    }
    r.dup_ids = v.duplicated.len();
    r.dup_extra = v.duplicated.iter().map(|(_, c)| c - 1).sum();
    r.unacked_present = v.distinct.saturating_sub(r.found);
    for (what, n) in [
        ("unknown records", v.unknown.len()),
        ("mismatched records", v.mismatched.len()),
        ("unreadable objects or lines", v.problems.len()),
    ] {
        if n > 0 {
            r.problems.push(format!("{n} {what}"));
        }
    }
    r.details = format!(
        "  {}\n  scratch: {}",
        v.summary().trim_end().replace('\n', "\n  "),
        scratch.path().display()
    );
    say(v.summary().trim_end().to_string());
    Ok(())
}

/// Waits for the usual start-up lines of the current run.
async fn wait_up(agent: &mut Agent, secs: u64) -> Result<(), String> {
    let dl = deadline(secs);
    for needle in ["mqtt subscribed", "http listening", "silt running"] {
        agent.wait_log(needle, dl).await?;
    }
    Ok(())
}

/// `total number of bytes un-fsynced: N bytes` of an unsynced-data report.
fn unsynced_bytes(report: &str) -> Option<u64> {
    if report.contains("all data blocks are synced") {
        return Some(0);
    }
    let at = report.find("un-fsynced: ")? + "un-fsynced: ".len();
    report[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Files an unsynced-data report names (`=> file: '<path>'`), as LazyFS
/// names them: under its root.
fn unsynced_files(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter_map(|l| l.split_once("=> file: '")?.1.trim_end().strip_suffix('\''))
        .collect()
}

/// Sum of every series of metric `name` in a Prometheus text page.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            found = true;
            sum += v;
        }
    }
    found.then_some(sum)
}

async fn scrape(port: u16) -> Result<String, String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let client = harness::http::client_builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    resp.text().await.map_err(|e| format!("GET {url}: {e}"))
}

/// Waits until the sink has drained: the spool holds no unsealed record and
/// no sealed batch, the MQTT source is connected, and for 3 s neither the
/// events taken in nor the objects in the lake have changed (the broker has handed
/// over what it queued for silt's session).
async fn wait_drained(
    api_port: u16,
    lake: &mut Lake,
    agent: &mut Agent,
    deadline: Instant,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut stable: Option<((u64, usize), Instant)> = None;
    loop {
        if let Some(st) = agent.try_exit() {
            return Err(format!("silt exited ({st}) while draining"));
        }
        let text = scrape(api_port).await.unwrap_or_default();
        let backlog = metric_sum(&text, "silt_spool_unsealed_records")
            .zip(metric_sum(&text, "silt_spool_sealed_batches"))
            .map(|(a, b)| a + b);
        let connected = metric_sum(&text, "silt_mqtt_connected");
        let events_in = metric_sum(&text, "silt_events_in_total").unwrap_or(0.0) as u64;
        let objects = lake.objects().await.ok();
        match (backlog, connected, objects) {
            (Some(b), Some(c), Some(o)) if b == 0.0 && c >= 1.0 => {
                let sig = (events_in, o);
                match stable {
                    Some((s, since)) if s == sig => {
                        if since.elapsed() >= Duration::from_secs(3) {
                            return Ok(start.elapsed());
                        }
                    }
                    _ => stable = Some((sig, Instant::now())),
                }
            }
            _ => stable = None,
        }
        if Instant::now() > deadline {
            return Err(format!(
                "sink not drained {:.0?} after the restart: spool backlog {backlog:?} \
                 (unsealed records + sealed batches), mqtt connected {connected:?}, \
                 events in {events_in}, objects {objects:?}",
                start.elapsed()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
