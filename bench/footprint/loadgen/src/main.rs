//! Load generator and report formatter for `bench/footprint/run.sh`.
//!
//! ```text
//! loadgen free-port
//! loadgen http --url URL --n N --size S --batch B --clients C [--format ndjson|json] [--seq-from K]
//! loadgen mqtt --port P --n N --size S --topic T [--inflight 1000] [--publishers 1]
//!              [--metrics URL --metric NAME [--target N]]
//! loadgen sub --port P --filter F --n N [--ready-file PATH]
//! loadgen wait --url URL --metric NAME (--ge X | --le X) [--timeout SECS] [--interval-ms MS]
//! loadgen metric --url URL --metric NAME
//! loadgen report --in ROWS.ndjson --json OUT.json [--set KEY=VALUE ...]
//! ```
//!
//! Every measuring command prints one JSON object on stdout; progress and
//! errors go to stderr, and a failure exits non-zero.
//!
//! Events are JSON objects of exactly `--size` bytes (an id, a sequence
//! number, a device, a temperature and a pseudo-random alphanumeric pad, so
//! gzip has realistic work to do). `payload_bytes` counts event bytes only,
//! not NDJSON newlines or HTTP framing.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Map, Value, json};

type Res<T> = Result<T, String>;

// ------------------------------------------------------------------ args

struct Args {
    map: HashMap<String, String>,
    multi: Vec<(String, String)>,
}

impl Args {
    fn parse(raw: &[String]) -> Res<Args> {
        let mut map = HashMap::new();
        let mut multi = Vec::new();
        let mut it = raw.iter();
        while let Some(k) = it.next() {
            let Some(k) = k.strip_prefix("--") else {
                return Err(format!("unexpected argument {k}"));
            };
            let v = it.next().ok_or_else(|| format!("--{k} needs a value"))?;
            multi.push((k.to_string(), v.clone()));
            map.insert(k.to_string(), v.clone());
        }
        Ok(Args { map, multi })
    }

    fn opt(&self, k: &str) -> Option<&str> {
        self.map.get(k).map(String::as_str)
    }

    fn req(&self, k: &str) -> Res<&str> {
        self.opt(k).ok_or_else(|| format!("missing --{k}"))
    }

    fn num<T: std::str::FromStr>(&self, k: &str, default: Option<T>) -> Res<T> {
        match self.opt(k) {
            Some(v) => v.parse().map_err(|_| format!("--{k}: bad number {v:?}")),
            None => default.ok_or_else(|| format!("missing --{k}")),
        }
    }
}

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------- events

/// xorshift64*: deterministic, cheap.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545F4914F6CDD1D)
    }
}

/// Smallest `--size` (the fixed fields with a 10-digit sequence number).
const MIN_SIZE: usize = 80;

fn size_arg(a: &Args) -> Res<usize> {
    let size: usize = a.num("size", Some(256))?;
    if size < MIN_SIZE {
        return Err(format!("--size {size}: at least {MIN_SIZE} bytes"));
    }
    Ok(size)
}

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// Appends event `seq` to `out`: a JSON object of exactly `size` bytes
/// (or the bare minimum if `size` is smaller). Returns its length.
fn event(out: &mut Vec<u8>, seq: u64, size: usize) -> usize {
    use std::io::Write;
    let start = out.len();
    let mut rng = Rng::new(seq);
    let temp = (rng.next() % 10_000) as f64 / 100.0 - 20.0;
    write!(
        out,
        "{{\"id\":\"ev-{seq}\",\"seq\":{seq},\"device\":\"dev-{:02}\",\"temp\":{temp:.2},\"pad\":\"",
        seq % 64
    )
    .unwrap();
    let used = out.len() - start + 2; // + `"}`
    for _ in used..size {
        out.push(ALNUM[(rng.next() % ALNUM.len() as u64) as usize]);
    }
    out.extend_from_slice(b"\"}");
    out.len() - start
}

// ----------------------------------------------------------------- metrics

/// Sum of every sample of metric `name` (all label sets) in Prometheus or
/// OpenMetrics text.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(i) => &r[i + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue; // another metric with this prefix
        };
        if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

fn http_client() -> Res<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| e.to_string())
}

async fn scrape(client: &reqwest::Client, url: &str, name: &str) -> Res<f64> {
    let r = client.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let text = r.text().await.map_err(|e| format!("GET {url}: {e}"))?;
    Ok(metric_sum(&text, name).unwrap_or(0.0))
}

// -------------------------------------------------------------------- http

async fn cmd_http(a: &Args) -> Res<Value> {
    let url = a.req("url")?.to_string();
    let n: u64 = a.num("n", None)?;
    let size = size_arg(a)?;
    let batch: u64 = a.num("batch", Some(500))?;
    let clients: usize = a.num("clients", Some(4))?;
    let seq_from: u64 = a.num("seq-from", Some(0))?;
    let ndjson = match a.opt("format").unwrap_or("ndjson") {
        "ndjson" => true,
        "json" => false,
        f => return Err(format!("--format {f}: ndjson or json")),
    };
    let token = a.opt("token").map(str::to_string);
    let client = http_client()?;
    let nreq = n.div_ceil(batch.max(1));

    let next = Arc::new(AtomicU64::new(0));
    let done_events = Arc::new(AtomicU64::new(0));
    let payload = Arc::new(AtomicU64::new(0));
    let body_bytes = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));

    // Progress on stderr for long runs (the drain backlog).
    let prog = {
        let done = done_events.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let d = done.load(Ordering::Relaxed);
                eprintln!(
                    "    ... {d}/{n} events accepted after {:.0}s ({:.0}/s)",
                    t0.elapsed().as_secs_f64(),
                    d as f64 / t0.elapsed().as_secs_f64()
                );
            }
        })
    };

    let t_start = epoch();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        let (next, done_events, payload, body_bytes, retries, failed) = (
            next.clone(),
            done_events.clone(),
            payload.clone(),
            body_bytes.clone(),
            retries.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut body = Vec::with_capacity((batch as usize) * (size + 2) + 2);
            loop {
                if failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= nreq {
                    return Ok(());
                }
                let first = r * batch;
                let last = ((r + 1) * batch).min(n);
                body.clear();
                let mut pbytes = 0;
                if !ndjson {
                    body.push(b'[');
                }
                for i in first..last {
                    if !ndjson && i > first {
                        body.push(b',');
                    }
                    pbytes += event(&mut body, seq_from + i, size) as u64;
                    if ndjson {
                        body.push(b'\n');
                    }
                }
                if !ndjson {
                    body.push(b']');
                }
                let k = last - first;
                let ctype = if ndjson { "application/x-ndjson" } else { "application/json" };
                loop {
                    let mut req = client
                        .post(&url)
                        .header("content-type", ctype)
                        .body(body.clone());
                    if let Some(t) = &token {
                        req = req.header("authorization", format!("Bearer {t}"));
                    }
                    let resp = match req.send().await {
                        Ok(r) => r,
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            return Err(format!("POST {url}: {e}"));
                        }
                    };
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok());
                    let text = resp.text().await.unwrap_or_default();
                    match status {
                        202 => {
                            let acc = serde_json::from_str::<Value>(&text)
                                .ok()
                                .and_then(|v| v["accepted"].as_u64());
                            if acc != Some(k) {
                                failed.store(true, Ordering::Relaxed);
                                return Err(format!("202 for {k} events but body {text:?}"));
                            }
                            break;
                        }
                        503 => {
                            // Spool full (block policy): wait as told and resend.
                            retries.fetch_add(1, Ordering::Relaxed);
                            let s = retry_after.unwrap_or(0.2).clamp(0.05, 5.0);
                            tokio::time::sleep(Duration::from_secs_f64(s)).await;
                        }
                        _ => {
                            failed.store(true, Ordering::Relaxed);
                            return Err(format!("POST {url}: {status} {text}"));
                        }
                    }
                }
                done_events.fetch_add(k, Ordering::Relaxed);
                payload.fetch_add(pbytes, Ordering::Relaxed);
                body_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let mut err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => err = err.or(Some(e)),
            Err(e) => err = err.or(Some(e.to_string())),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let t_end = epoch();
    prog.abort();
    if let Some(e) = err {
        return Err(e);
    }
    let events = done_events.load(Ordering::Relaxed);
    Ok(json!({
        "events": events,
        "payload_bytes": payload.load(Ordering::Relaxed),
        "body_bytes": body_bytes.load(Ordering::Relaxed),
        "requests": nreq,
        "retries_503": retries.load(Ordering::Relaxed),
        "secs": secs,
        "rate": events as f64 / secs,
        "t_start": t_start,
        "t_end": t_end,
    }))
}

// -------------------------------------------------------------------- mqtt

fn mqtt_options(id: &str, port: u16, inflight: u16) -> MqttOptions {
    let mut mo = MqttOptions::new(id, "127.0.0.1", port);
    mo.set_keep_alive(Duration::from_secs(60));
    mo.set_clean_session(true);
    mo.set_inflight(inflight.max(1));
    mo.set_max_packet_size(1 << 20, 1 << 20);
    mo
}

/// Publishes `count` events (sequence numbers from `first`) at QoS 1 and
/// returns once the broker has PUBACKed every one.
async fn publisher(
    port: u16,
    id: String,
    topic: String,
    first: u64,
    count: u64,
    size: usize,
    inflight: u16,
) -> Res<u64> {
    let (client, mut el) = AsyncClient::new(mqtt_options(&id, port, inflight), 1024);
    let acked = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicBool::new(false));
    let (acked2, ended2) = (acked.clone(), ended.clone());
    let el_task = tokio::spawn(async move {
        let r = loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(format!("publisher {}: {e}", "mqtt")),
            }
        };
        ended2.store(true, Ordering::Relaxed);
        r
    });
    let mut payload = Vec::with_capacity(size + 64);
    let mut bytes = 0u64;
    for i in first..first + count {
        payload.clear();
        bytes += event(&mut payload, i, size) as u64;
        if client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .is_err()
        {
            break;
        }
    }
    while acked.load(Ordering::Relaxed) < count && !ended.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let got = acked.load(Ordering::Relaxed);
    let _ = client.disconnect().await;
    match tokio::time::timeout(Duration::from_secs(5), el_task).await {
        Ok(Ok(Err(e))) if got < count => return Err(e),
        _ => {}
    }
    if got < count {
        return Err(format!("{id}: only {got} of {count} publishes acknowledged"));
    }
    Ok(bytes)
}

/// The broker alone: a QoS 1 subscriber (rumqttc acks each message as it
/// arrives) in its own process, as silt is. Writes `--ready-file` once the
/// broker has SUBACKed; exits when `--n` messages have arrived.
async fn cmd_sub(a: &Args) -> Res<Value> {
    let port: u16 = a.num("port", None)?;
    let n: u64 = a.num("n", None)?;
    let filter = a.req("filter")?;
    let timeout: f64 = a.num("timeout", Some(600.0))?;
    let (client, mut el) = AsyncClient::new(
        mqtt_options(&format!("footprint-sub-{}", std::process::id()), port, 100),
        1024,
    );
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), el.poll())
            .await
            .map_err(|_| "no SUBACK within 10s".to_string())?
            .map_err(|e| format!("subscriber: {e}"))?;
        if let Event::Incoming(Packet::SubAck(_)) = ev {
            break;
        }
    }
    if let Some(f) = a.opt("ready-file") {
        std::fs::write(f, b"ready\n").map_err(|e| format!("{f}: {e}"))?;
    }
    let t0 = Instant::now();
    let mut got = 0u64;
    let mut bytes = 0u64;
    let mut t_first = None;
    while got < n {
        let left = timeout - t0.elapsed().as_secs_f64();
        if left <= 0.0 {
            return Err(format!("timeout: {got} of {n} messages arrived"));
        }
        let ev = tokio::time::timeout(Duration::from_secs_f64(left), el.poll())
            .await
            .map_err(|_| format!("timeout: {got} of {n} messages arrived"))?
            .map_err(|e| format!("subscriber: {e}"))?;
        if let Event::Incoming(Packet::Publish(p)) = ev {
            t_first.get_or_insert_with(epoch);
            got += 1;
            bytes += p.payload.len() as u64;
        }
    }
    let t_end = epoch();
    // Let the last PUBACKs go out before disconnecting.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    Ok(json!({
        "received": got,
        "payload_bytes": bytes,
        "t_first": t_first.unwrap_or(t_end),
        "t_end": t_end,
    }))
}

async fn cmd_mqtt(a: &Args) -> Res<Value> {
    let port: u16 = a.num("port", None)?;
    let n: u64 = a.num("n", None)?;
    let size = size_arg(a)?;
    let topic = a.req("topic")?.to_string();
    let inflight: u16 = a.num("inflight", Some(1000))?;
    let pubs: u64 = a.num::<u64>("publishers", Some(1))?.max(1);
    let timeout: f64 = a.num("timeout", Some(600.0))?;
    let target: f64 = a.num("target", Some(n as f64))?;
    let metrics = match (a.opt("metrics"), a.opt("metric")) {
        (Some(u), Some(m)) => Some((u.to_string(), m.to_string())),
        (None, None) => None,
        _ => return Err("--metrics and --metric go together".into()),
    };
    let scraper = http_client()?;

    let t_start = epoch();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..pubs {
        let first = n * p / pubs;
        let count = n * (p + 1) / pubs - first;
        let id = format!("footprint-pub-{}-{p}", std::process::id());
        tasks.push(tokio::spawn(publisher(
            port,
            id,
            topic.clone(),
            first,
            count,
            size,
            inflight,
        )));
    }
    let pub_done = Arc::new(AtomicUsize::new(0));
    let pub_secs = Arc::new(std::sync::Mutex::new(None::<f64>));
    let pub_err = Arc::new(std::sync::Mutex::new(None::<String>));
    let payload = Arc::new(AtomicU64::new(0));
    {
        let (pub_done, pub_secs, pub_err, payload) =
            (pub_done.clone(), pub_secs.clone(), pub_err.clone(), payload.clone());
        tokio::spawn(async move {
            for t in tasks {
                match t.await {
                    Ok(Ok(b)) => {
                        payload.fetch_add(b, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        pub_err.lock().unwrap().get_or_insert(e);
                    }
                    Err(e) => {
                        pub_err.lock().unwrap().get_or_insert(e.to_string());
                    }
                }
            }
            *pub_secs.lock().unwrap() = Some(t0.elapsed().as_secs_f64());
            pub_done.store(1, Ordering::Relaxed);
        });
    }

    // Done when the agent's counter has all of them (without --metrics: when
    // every publish is acknowledged).
    let mut last_value = 0.0;
    let secs = loop {
        if let Some(e) = pub_err.lock().unwrap().clone() {
            return Err(e);
        }
        let published = pub_done.load(Ordering::Relaxed) == 1;
        if let Some((url, name)) = &metrics {
            last_value = scrape(&scraper, url, name).await?;
            if last_value >= target {
                break t0.elapsed().as_secs_f64();
            }
        } else if published {
            break t0.elapsed().as_secs_f64();
        }
        if t0.elapsed().as_secs_f64() > timeout {
            return Err(format!(
                "timeout after {timeout}s: {last_value} of {target} arrived"
            ));
        }
        tokio::time::sleep(Duration::from_millis(if metrics.is_some() { 10 } else { 1 })).await;
    };
    let t_end = epoch();
    // The publishers' own completion (normally well before `secs` for silt).
    while pub_done.load(Ordering::Relaxed) == 0 {
        if let Some(e) = pub_err.lock().unwrap().clone() {
            return Err(e);
        }
        if t0.elapsed().as_secs_f64() > timeout {
            return Err("timeout waiting for PUBACKs".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pub_secs = pub_secs.lock().unwrap().unwrap_or(secs);
    Ok(json!({
        "events": n,
        "payload_bytes": payload.load(Ordering::Relaxed),
        "secs": secs,
        "pub_secs": pub_secs,
        "rate": n as f64 / secs,
        "received": last_value,
        "t_start": t_start,
        "t_end": t_end,
    }))
}

// ------------------------------------------------------------- wait/metric

async fn cmd_wait(a: &Args) -> Res<Value> {
    let url = a.req("url")?;
    let name = a.req("metric")?;
    let ge: Option<f64> = a.opt("ge").map(|v| v.parse()).transpose().map_err(|_| "--ge")?;
    let le: Option<f64> = a.opt("le").map(|v| v.parse()).transpose().map_err(|_| "--le")?;
    if ge.is_none() == le.is_none() {
        return Err("give one of --ge or --le".into());
    }
    let timeout: f64 = a.num("timeout", Some(3600.0))?;
    let every: u64 = a.num("interval-ms", Some(20))?;
    let client = http_client()?;
    let t_start = epoch();
    let t0 = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let v = scrape(&client, url, name).await?;
        if ge.is_some_and(|g| v >= g) || le.is_some_and(|l| v <= l) {
            return Ok(json!({
                "secs": t0.elapsed().as_secs_f64(),
                "value": v,
                "t_start": t_start,
                "t_end": epoch(),
            }));
        }
        if t0.elapsed().as_secs_f64() > timeout {
            return Err(format!("timeout after {timeout}s: {name} = {v}"));
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("    ... {name} = {v} after {:.0}s", t0.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
}

async fn cmd_metric(a: &Args) -> Res<Value> {
    let client = http_client()?;
    Ok(json!(scrape(&client, a.req("url")?, a.req("metric")?).await?))
}

// ------------------------------------------------------------------ report

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

/// Derived figures of one measurement row (see run.sh for the raw fields).
fn derive(row: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            m.insert(k.into(), json!(v));
        }
    };
    let events = f(row, "events");
    let secs = f(row, "secs");
    let payload = f(row, "payload_bytes");
    put("events", events);
    put("events_per_s", events.zip(secs).map(|(e, s)| e / s));
    put(
        "mib_per_s",
        payload.zip(secs).map(|(b, s)| b / s / 1048576.0),
    );
    if let (Some(t), Some(hz), Some(e)) = (f(row, "cpu_ticks"), f(row, "clk_tck"), events) {
        put("cpu_us_per_event", Some(t / hz * 1e6 / e));
        put("cpu_secs", Some(t / hz));
    }
    put(
        "disk_write_per_byte",
        f(row, "write_bytes").zip(payload).map(|(w, b)| w / b),
    );
    put(
        "spool_disk_per_byte",
        f(row, "spool_du_bytes")
            .zip(f(row, "held_bytes"))
            .map(|(d, b)| d / b),
    );
    put(
        "spool_apparent_per_byte",
        f(row, "spool_apparent_bytes")
            .zip(f(row, "held_bytes"))
            .map(|(d, b)| d / b),
    );
    put("peak_rss_mib", f(row, "hwm_kib").map(|k| k / 1024.0));
    put("e2e_secs", f(row, "e2e_secs"));
    put("secs", secs);
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn cmd_report(a: &Args) -> Res<Value> {
    let input = std::fs::read_to_string(a.req("in")?).map_err(|e| e.to_string())?;
    let rows: Vec<Value> = input
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}")))
        .collect::<Res<_>>()?;
    // Per-row derived figures, plus the ratio to the baseline row of the same run.
    let mut derived: Vec<(String, Value, Map<String, Value>)> = Vec::new();
    for r in &rows {
        let name = r["scenario"].as_str().unwrap_or("?").to_string();
        derived.push((name, r.clone(), derive(r)));
    }
    for i in 0..derived.len() {
        let Some(base) = derived[i].1["baseline"].as_str().map(str::to_string) else {
            continue;
        };
        let run = derived[i].1["run"].clone();
        let base_rate = derived
            .iter()
            .find(|(n, r, _)| *n == base && r["run"] == run)
            .and_then(|(_, _, d)| d.get("events_per_s").and_then(Value::as_f64));
        if let (Some(b), Some(s)) = (base_rate, derived[i].2.get("events_per_s").and_then(Value::as_f64)) {
            derived[i].2.insert("ratio_to_baseline".into(), json!(s / b));
        }
    }
    let mut order: Vec<String> = Vec::new();
    for (n, _, _) in &derived {
        if !order.contains(n) {
            order.push(n.clone());
        }
    }
    let mut scenarios = Vec::new();
    for name in &order {
        let runs: Vec<&(String, Value, Map<String, Value>)> =
            derived.iter().filter(|(n, _, _)| n == name).collect();
        let mut keys: Vec<String> = Vec::new();
        for (_, _, d) in &runs {
            for k in d.keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        let mut med = Map::new();
        for k in &keys {
            let vals: Vec<f64> = runs.iter().filter_map(|(_, _, d)| d.get(k).and_then(Value::as_f64)).collect();
            if !vals.is_empty() {
                med.insert(k.clone(), json!(median(vals)));
            }
        }
        scenarios.push(json!({
            "scenario": name,
            "runs": runs.len(),
            "median": med,
            "per_run": runs.iter().map(|(_, raw, d)| json!({"raw": raw, "derived": d})).collect::<Vec<_>>(),
        }));
    }
    let mut meta = Map::new();
    for (k, v) in &a.multi {
        if k == "set"
            && let Some((mk, mv)) = v.split_once('=')
        {
            meta.insert(mk.to_string(), json!(mv));
        }
    }
    let out = json!({ "meta": meta, "scenarios": scenarios });
    if let Some(path) = a.opt("json") {
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap() + "\n")
            .map_err(|e| format!("{path}: {e}"))?;
    }

    // The table (medians over runs).
    let cell = |m: &Value, k: &str, prec: usize| -> String {
        match m.get(k).and_then(Value::as_f64) {
            Some(v) => format!("{v:.prec$}"),
            None => "-".into(),
        }
    };
    let w = order.iter().map(String::len).max().unwrap_or(8).max(8);
    println!(
        "{:<w$} {:>4} {:>9} {:>9} {:>7} {:>6} {:>9} {:>8} {:>7} {:>7}",
        "scenario", "runs", "events", "events/s", "MiB/s", "x mosq", "CPU us/ev", "disk W/B", "spool/B", "RSS MiB"
    );
    for s in &scenarios {
        let m = &s["median"];
        println!(
            "{:<w$} {:>4} {:>9} {:>9} {:>7} {:>6} {:>9} {:>8} {:>7} {:>7}",
            s["scenario"].as_str().unwrap(),
            s["runs"].as_u64().unwrap_or(0),
            cell(m, "events", 0),
            cell(m, "events_per_s", 0),
            cell(m, "mib_per_s", 1),
            cell(m, "ratio_to_baseline", 2),
            cell(m, "cpu_us_per_event", 2),
            cell(m, "disk_write_per_byte", 2),
            cell(m, "spool_disk_per_byte", 2),
            cell(m, "peak_rss_mib", 1),
        );
    }
    Ok(Value::Null)
}

// -------------------------------------------------------------------- main

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprintln!("usage: loadgen free-port|http|mqtt|sub|wait|metric|report [--key value ...]");
        return ExitCode::from(2);
    };
    let args = match Args::parse(&argv[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen {cmd}: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match cmd.as_str() {
        "free-port" => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| json!(a.port()))
            .map_err(|e| e.to_string()),
        "http" => cmd_http(&args).await,
        "mqtt" => cmd_mqtt(&args).await,
        "sub" => cmd_sub(&args).await,
        "wait" => cmd_wait(&args).await,
        "metric" => cmd_metric(&args).await,
        "report" => cmd_report(&args),
        _ => Err(format!("unknown command {cmd}")),
    };
    match r {
        Ok(Value::Null) => ExitCode::SUCCESS,
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_exact_size_and_are_json() {
        for size in [MIN_SIZE, 100, 256, 1000] {
            for seq in [0u64, 7, 123_456_789, 9_999_999_999] {
                let mut b = Vec::new();
                assert_eq!(event(&mut b, seq, size), size);
                assert_eq!(b.len(), size);
                let v: Value = serde_json::from_slice(&b).unwrap();
                assert_eq!(v["seq"], seq);
            }
        }
    }

    #[test]
    fn metric_sum_adds_label_sets_only_of_that_name() {
        let t = "# TYPE silt_events_in_total counter\n\
                 silt_events_in_total{source=\"a\"} 3\n\
                 silt_events_in_total{source=\"b\"} 4\n\
                 silt_events_in_total_x 100\n\
                 silt_spool_bytes{sink=\"lake\"} 12 # {a=\"b\"} 1\n# EOF\n";
        assert_eq!(metric_sum(t, "silt_events_in_total"), Some(7.0));
        assert_eq!(metric_sum(t, "silt_spool_bytes"), Some(12.0));
        assert_eq!(metric_sum(t, "nope"), None);
    }
}
