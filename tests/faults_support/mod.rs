//! Helpers for `tests/faults.rs` on top of the shared harness: a stack with a
//! configurable spool, a lake tally that tells lost and duplicated events
//! apart by cause, a publisher that survives broker restarts, and a
//! sequential HTTP sender that keeps every reply.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::harness::http::{HttpClient, IngestReq, Reply};
use crate::harness::lake::Snapshot;
use crate::harness::mqtt::Msg;
use crate::harness::payload::Rng;
pub use crate::harness::proxy::{Proxy, Trap};
use crate::harness::{self, Agent, Mosquitto, S3Lake, S3Server, Scratch, TOKEN, config, note};

/// Env var as a number, or `default`.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seeded RNG; the seed comes from `SILT_FAULTS_SEED` or the clock and is
/// printed so a failing run can be replayed.
pub fn rng(test: &str) -> (Rng, String) {
    let seed = std::env::var("SILT_FAULTS_SEED").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            .to_string()
    });
    (Rng::seeded(&format!("{test}-{seed}")), seed)
}

/// `[agent]` and `[spool]` sections.
pub fn agent_section(id: &str, max_bytes: &str, when_full: &str) -> String {
    format!(
        "[agent]\nid = \"{id}\"\ndata_dir = \"{{data_dir}}\"\nshutdown_timeout = \"30s\"\n\n\
         [spool]\nmax_bytes = \"{max_bytes}\"\nwhen_full = \"{when_full}\"\nmin_free = \"0B\"\n\n"
    )
}

/// MQTT QoS 1 source that reconnects quickly (1 s backoff cap).
pub fn mqtt_source(name: &str, broker_url: &str, topics: &[&str]) -> String {
    config::mqtt_source(name, broker_url, topics)
        .trim_end()
        .to_string()
        + "\nreconnect_max = \"1s\"\nkeep_alive = \"5s\"\n\n"
}

pub struct StackOpts<'a> {
    pub agent_id: &'a str,
    pub max_bytes: &'a str,
    pub when_full: &'a str,
    pub batch: String,
    pub mqtt_topics: &'a [&'a str],
    /// Stop s3s-fs before the agent starts.
    pub s3_down: bool,
    /// Put [`Proxy`]s between the agent and s3s-fs / mosquitto.
    pub proxies: bool,
}

/// mosquitto + s3s-fs + `silt run` (MQTT source `sensors`, HTTP source
/// `api`, S3 sink `lake`), like `harness::Stack` but with the spool settings
/// under test. Fields drop in order: agent, servers, scratch dir.
pub struct FStack {
    pub agent: Agent,
    pub broker: Mosquitto,
    pub s3: S3Server,
    /// (S3, MQTT) proxies, with `StackOpts::proxies`.
    pub proxy: Option<(Proxy, Proxy)>,
    pub http_port: u16,
    pub agent_id: String,
    pub t0: Instant,
    pub scratch: Scratch,
}

impl FStack {
    pub async fn start(name: &str, o: StackOpts<'_>) -> FStack {
        let t0 = Instant::now();
        let scratch = Scratch::new(name);
        let broker = Mosquitto::start(&scratch.join("mosquitto"));
        let mut s3 = S3Server::start(scratch.path(), "telemetry");
        if o.s3_down {
            s3.stop();
        }
        let http_port = harness::free_port();
        let proxy = if o.proxies {
            Some((
                Proxy::start(s3.port, Trap::S3Ok).await,
                Proxy::start(broker.port, Trap::MqttPuback).await,
            ))
        } else {
            None
        };
        let mut sink = config::s3_sink("lake", &["sensors", "api"], &s3, "gzip", &o.batch);
        let mut broker_url = broker.url();
        if let Some((s3p, mqttp)) = &proxy {
            sink = sink.replace(&s3.endpoint(), &format!("http://127.0.0.1:{}", s3p.port));
            broker_url = format!("mqtt://127.0.0.1:{}", mqttp.port);
        }
        let cfg = agent_section(o.agent_id, o.max_bytes, o.when_full)
            + &mqtt_source("sensors", &broker_url, o.mqtt_topics)
            + &config::http_source("api", http_port, Some(TOKEN), "16MiB")
            + &sink;
        let mut agent = Agent::start(&scratch.join("agent"), &cfg);
        agent.wait_stack_up().await;
        note(
            t0,
            format!(
                "stack up: mqtt :{}, s3 :{}{}, http :{}",
                broker.port,
                s3.port,
                if o.s3_down { " (down)" } else { "" },
                http_port
            ),
        );
        FStack {
            agent,
            broker,
            s3,
            proxy,
            http_port,
            agent_id: o.agent_id.to_string(),
            t0,
            scratch,
        }
    }

    pub fn http(&self) -> HttpClient {
        HttpClient::new(self.http_port, Some(TOKEN))
    }

    pub fn lake(&self) -> S3Lake {
        S3Lake::new(&self.s3)
    }

    pub fn note(&self, msg: impl AsRef<str>) {
        note(self.t0, msg)
    }

    /// Restarts the agent on the same data dir and waits until it serves.
    pub async fn restart_agent(&mut self, secs: u64) {
        self.agent.spawn();
        self.agent
            .wait_ready(&[("mqtt subscribed", 1), ("http listening", 1)], secs)
            .await;
    }

    /// SIGTERM the agent and require exit status 0.
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

// ------------------------------------------------------------------ tally

/// One id's copies in the lake.
#[derive(Debug, Default, Clone)]
struct Copies {
    objects: Vec<String>,
    ts: Vec<Option<String>>,
}

/// What the lake holds compared with what was acknowledged, with every
/// duplicate put in exactly one class.
#[derive(Debug, Default)]
pub struct Tally {
    pub acked: usize,
    pub records: usize,
    pub objects: usize,
    pub distinct: usize,
    /// Acknowledged ids that are not in the lake.
    pub lost: Vec<String>,
    /// Ids in the lake that were never sent (or records without an id).
    pub unknown: Vec<String>,
    pub unreadable: Vec<(String, String)>,
    /// Ids present more than once (extra copies counted per id).
    pub dup_ids: usize,
    pub dup_extra: usize,
    /// ... of which some copies sit in different objects.
    pub dup_across_objects: usize,
    /// Same id and same receive timestamp twice: one spool record uploaded
    /// twice (batching / upload bug).
    pub dup_same_record: Vec<String>,
    /// MQTT ids received twice (different receive timestamps): the broker
    /// redelivered a message the agent had committed but not PUBACKed.
    pub dup_mqtt_redelivered: Vec<String>,
    /// Ids the client itself sent twice (publisher resend after reconnect).
    pub dup_client_resent: Vec<String>,
    /// HTTP ids received twice with different timestamps: nobody retried
    /// them, so the agent stored one request twice.
    pub dup_http: Vec<String>,
}

impl Tally {
    /// `is_mqtt(id)` tells MQTT ids from HTTP ids; `resent` are ids the
    /// client sent more than once.
    pub fn compute(
        snap: &Snapshot,
        sent: &HashSet<String>,
        acked: &HashSet<String>,
        resent: &HashSet<String>,
        is_mqtt: impl Fn(&str) -> bool,
    ) -> Tally {
        let mut t = Tally {
            acked: acked.len(),
            records: snap.records.len(),
            objects: snap.objects,
            unreadable: snap.problems.clone(),
            ..Tally::default()
        };
        let mut copies: HashMap<String, Copies> = HashMap::new();
        for r in &snap.records {
            let Some(id) = r.id() else {
                t.unknown.push(format!("<no id> in {}", r.object));
                continue;
            };
            if !sent.contains(&id) {
                t.unknown.push(format!("{id} (in {})", r.object));
                continue;
            }
            let c = copies.entry(id).or_default();
            c.objects.push(r.object.to_string());
            c.ts.push(r.ts.clone());
        }
        t.distinct = copies.len();
        for id in acked {
            if !copies.contains_key(id) {
                t.lost.push(id.clone());
            }
        }
        t.lost.sort();
        let mut dups: Vec<_> = copies.iter().filter(|(_, c)| c.objects.len() > 1).collect();
        dups.sort_by(|a, b| a.0.cmp(b.0));
        for (id, c) in dups {
            t.dup_ids += 1;
            t.dup_extra += c.objects.len() - 1;
            let objs: HashSet<&String> = c.objects.iter().collect();
            if objs.len() > 1 {
                t.dup_across_objects += 1;
            }
            let ts: HashSet<&Option<String>> = c.ts.iter().collect();
            let desc = format!("{id} x{} in {:?} ts {:?}", c.objects.len(), c.objects, c.ts);
            if ts.len() < c.ts.len() {
                t.dup_same_record.push(desc);
            } else if resent.contains(id) {
                t.dup_client_resent.push(desc);
            } else if is_mqtt(id) {
                t.dup_mqtt_redelivered.push(desc);
            } else {
                t.dup_http.push(desc);
            }
        }
        t
    }

    pub fn summary(&self) -> String {
        let head = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        let mut s = format!(
            "lake: {} objects, {} records, {} distinct ids; acked {}, lost {}, duplicated ids {} \
             ({} extra copies, {} across objects): same spool record twice {}, mqtt redelivery {}, \
             client resend {}, http {}; unknown {}, unreadable {}",
            self.objects,
            self.records,
            self.distinct,
            self.acked,
            self.lost.len(),
            self.dup_ids,
            self.dup_extra,
            self.dup_across_objects,
            self.dup_same_record.len(),
            self.dup_mqtt_redelivered.len(),
            self.dup_client_resent.len(),
            self.dup_http.len(),
            self.unknown.len(),
            self.unreadable.len()
        );
        for (name, v) in [
            ("lost", &self.lost),
            ("same spool record twice", &self.dup_same_record),
            ("mqtt redelivered", &self.dup_mqtt_redelivered),
            ("client resent", &self.dup_client_resent),
            ("http duplicated", &self.dup_http),
            ("unknown", &self.unknown),
        ] {
            if !v.is_empty() {
                s.push_str(&format!("\n  {name} (first of {}): {}", v.len(), head(v)));
            }
        }
        if !self.unreadable.is_empty() {
            s.push_str(&format!("\n  unreadable: {:?}", &self.unreadable[..1]));
        }
        s
    }

    /// Data problems that are never acceptable: loss, garbage, a spool record
    /// uploaded twice, an HTTP event stored twice.
    pub fn hard_failures(&self) -> bool {
        !self.lost.is_empty()
            || !self.unknown.is_empty()
            || !self.unreadable.is_empty()
            || !self.dup_same_record.is_empty()
            || !self.dup_http.is_empty()
    }
}

/// Polls the lake until it holds every id of `ids` (or `deadline`); returns
/// the time it took and the last snapshot.
pub async fn wait_lake(
    lake: &mut S3Lake,
    ids: &HashSet<String>,
    every: Duration,
    deadline: Instant,
    t0: Instant,
) -> (Option<Duration>, Snapshot) {
    let start = Instant::now();
    let mut last_note = Instant::now();
    let mut last = Snapshot::default();
    loop {
        if let Ok(snap) = lake.snapshot().await {
            let have: HashSet<String> = snap.records.iter().filter_map(|r| r.id()).collect();
            let present = ids.iter().filter(|i| have.contains(*i)).count();
            last = snap;
            if present == ids.len() {
                return (Some(start.elapsed()), last);
            }
            if last_note.elapsed() >= Duration::from_secs(10) {
                note(
                    t0,
                    format!(
                        "lake: {present}/{} ids, {} objects",
                        ids.len(),
                        last.objects
                    ),
                );
                last_note = Instant::now();
            }
        }
        if Instant::now() >= deadline {
            return (None, last);
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------- publisher across restarts

#[derive(Debug, Default)]
pub struct RPubProgress {
    pub sent: AtomicUsize,
    pub acked: AtomicUsize,
    pub reconnects: AtomicUsize,
    pub stop: AtomicBool,
}

#[derive(Debug)]
pub struct RPubReport {
    pub acked: Vec<String>,
    /// Ids published more than once (after a connection loss).
    pub resent: Vec<String>,
    pub sent: usize,
    pub reconnects: usize,
    pub unacked: Vec<String>,
    pub elapsed: Duration,
}

#[derive(Default)]
struct RState {
    fifo: std::collections::VecDeque<usize>,
    inflight: HashMap<u16, usize>,
    acked: Vec<bool>,
    ended: bool,
}

/// QoS 1 publisher that survives broker restarts: on a connection loss it
/// reconnects (until `give_up` without a connection) and publishes again
/// every message not PUBACKed yet, remembering those as resent. Paced at
/// `rate` msg/s.
pub fn spawn_resilient_publisher(
    port: u16,
    client_id: &str,
    msgs: Vec<Msg>,
    rate: u32,
    give_up: Duration,
) -> (Arc<RPubProgress>, tokio::task::JoinHandle<RPubReport>) {
    let progress = Arc::new(RPubProgress::default());
    let p = progress.clone();
    let cid = client_id.to_string();
    let h = tokio::spawn(async move {
        let t0 = Instant::now();
        let n = msgs.len();
        let mut acked = vec![false; n];
        let mut resent = vec![false; n];
        let mut published = vec![false; n];
        let mut next = 0usize; // next never-published message
        let mut retry: Vec<usize> = Vec::new();
        let mut attempt_since = Instant::now();
        loop {
            let done = next >= n || p.stop.load(Ordering::Relaxed);
            if done && retry.is_empty() {
                break;
            }
            let mut mo = MqttOptions::new(&cid, "127.0.0.1", port);
            mo.set_keep_alive(Duration::from_secs(5));
            mo.set_clean_session(true);
            mo.set_inflight(200);
            let (client, mut el) = AsyncClient::new(mo, 256);
            // Wait for CONNACK.
            let connected = loop {
                match tokio::time::timeout(Duration::from_secs(2), el.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break true,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break false,
                }
            };
            if !connected {
                assert!(
                    attempt_since.elapsed() < give_up,
                    "publisher could not reach the broker for {give_up:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            attempt_since = Instant::now();
            let st = Arc::new(Mutex::new(RState {
                acked: vec![false; n],
                ..RState::default()
            }));
            let st2 = st.clone();
            let el_task = tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            let mut s = st2.lock().unwrap();
                            if let Some(i) = s.fifo.pop_front() {
                                s.inflight.insert(pkid, i);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(a))) => {
                            let mut s = st2.lock().unwrap();
                            if let Some(i) = s.inflight.remove(&a.pkid) {
                                s.acked[i] = true;
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                st2.lock().unwrap().ended = true;
            });
            // Publish: first what an earlier connection left unacked, then new.
            let mut queue: std::collections::VecDeque<usize> = std::mem::take(&mut retry).into();
            let mut lost_conn = false;
            loop {
                if st.lock().unwrap().ended {
                    lost_conn = true;
                    break;
                }
                let i = if let Some(i) = queue.pop_front() {
                    i
                } else if next < n && !p.stop.load(Ordering::Relaxed) {
                    let due = t0 + Duration::from_secs_f64(next as f64 / rate.max(1) as f64);
                    if Instant::now() < due {
                        tokio::time::sleep_until(due.into()).await;
                        continue;
                    }
                    next += 1;
                    next - 1
                } else {
                    break;
                };
                if published[i] {
                    resent[i] = true;
                }
                published[i] = true;
                st.lock().unwrap().fifo.push_back(i);
                let m = &msgs[i];
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.publish(m.topic.clone(), QoS::AtLeastOnce, false, m.payload.clone()),
                )
                .await;
                if !matches!(r, Ok(Ok(()))) {
                    queue.push_front(i);
                    st.lock().unwrap().fifo.pop_back();
                    lost_conn = true;
                    break;
                }
                p.sent.fetch_add(1, Ordering::Relaxed);
            }
            // Wait for the PUBACKs of this connection (or its end).
            if !lost_conn {
                let end = Instant::now() + Duration::from_secs(30);
                loop {
                    let settled = {
                        let s = st.lock().unwrap();
                        s.ended || (s.fifo.is_empty() && s.inflight.is_empty())
                    };
                    if settled || Instant::now() >= end {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(3), el_task).await;
            let mut unacked: Vec<usize> = {
                let s = st.lock().unwrap();
                for (i, a) in s.acked.iter().enumerate() {
                    if *a && !acked[i] {
                        acked[i] = true;
                        p.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                s.fifo.iter().chain(s.inflight.values()).copied().collect()
            };
            unacked.extend(queue);
            unacked.retain(|&i| !acked[i]);
            unacked.sort_unstable();
            unacked.dedup();
            retry = unacked;
            if lost_conn || !retry.is_empty() {
                p.reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ids = |f: &dyn Fn(usize) -> bool| -> Vec<String> {
            (0..n)
                .filter(|&i| f(i))
                .map(|i| msgs[i].id.clone())
                .collect()
        };
        RPubReport {
            acked: ids(&|i| acked[i]),
            resent: ids(&|i| resent[i]),
            sent: published.iter().filter(|p| **p).count(),
            reconnects: p.reconnects.load(Ordering::Relaxed),
            unacked: ids(&|i| published[i] && !acked[i]),
            elapsed: t0.elapsed(),
        }
    });
    (progress, h)
}

// ------------------------------------------------------------ http, cli

/// Sends `reqs` one after another and keeps every reply (no retries).
pub async fn send_each(client: &HttpClient, reqs: &[IngestReq]) -> Vec<Result<Reply, String>> {
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        out.push(client.ingest(r).await);
    }
    out
}

/// Runs `silt ARGS`; returns (success, stdout, stderr).
pub fn silt(args: &[&str]) -> (bool, String, String) {
    let out = crate::harness::agent::silt_output(args, &[("RUST_BACKTRACE", "0")]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Files (recursively) under `dir` with their sizes.
pub fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(m) = e.metadata() {
                out.push((p, m.len()));
            }
        }
    }
    out.sort();
    out
}

/// Waits until a line containing `needle` is appended to `log` after this
/// call (polled every millisecond, reading only the new bytes). Returns
/// false at `deadline`.
pub async fn wait_new_log_line(log: &Path, needle: &str, deadline: Instant) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return false;
    };
    let mut pos = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let mut pending = Vec::new();
    while Instant::now() < deadline {
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(pos)).is_ok()
            && f.read_to_end(&mut buf).is_ok()
            && !buf.is_empty()
        {
            pos += buf.len() as u64;
            pending.extend_from_slice(&buf);
            if let Some(last_nl) = pending.iter().rposition(|&b| b == b'\n') {
                let complete = String::from_utf8_lossy(&pending[..=last_nl]).into_owned();
                pending.drain(..=last_nl);
                if complete.lines().any(|l| l.contains(needle)) {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}
