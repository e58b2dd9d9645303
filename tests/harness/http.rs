//! HTTP ingest client and load generator recording which events got a 202.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::payload::{Body, Rng, binary_event, json_event};

pub const JSON: &str = "application/json";
pub const NDJSON: &str = "application/x-ndjson";
pub const BINARY: &str = "application/octet-stream";

/// One POST /v1/ingest/{stream} and the events it carries.
#[derive(Debug, Clone)]
pub struct IngestReq {
    pub stream: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// (id, expected lake body) for each event in the request, in order.
    pub events: Vec<(String, Body)>,
}

impl IngestReq {
    pub fn single(stream: &str, v: Value) -> IngestReq {
        let id = v["id"].as_str().unwrap().to_string();
        IngestReq {
            stream: stream.into(),
            content_type: JSON,
            body: serde_json::to_vec(&v).unwrap(),
            events: vec![(id, Body::Json(v))],
        }
    }

    pub fn array(stream: &str, vs: Vec<Value>) -> IngestReq {
        let body = serde_json::to_vec_pretty(&Value::Array(vs.clone())).unwrap();
        let events = vs
            .into_iter()
            .map(|v| (v["id"].as_str().unwrap().to_string(), Body::Json(v)))
            .collect();
        IngestReq {
            stream: stream.into(),
            content_type: JSON,
            body,
            events,
        }
    }

    pub fn ndjson(stream: &str, vs: Vec<Value>) -> IngestReq {
        let mut body = Vec::new();
        for v in &vs {
            serde_json::to_writer(&mut body, v).unwrap();
            body.push(b'\n');
        }
        let events = vs
            .into_iter()
            .map(|v| (v["id"].as_str().unwrap().to_string(), Body::Json(v)))
            .collect();
        IngestReq {
            stream: stream.into(),
            content_type: NDJSON,
            body,
            events,
        }
    }

    pub fn binary(stream: &str, id: &str, size: usize) -> IngestReq {
        let b = binary_event(id, size);
        IngestReq {
            stream: stream.into(),
            content_type: BINARY,
            body: b.clone(),
            events: vec![(id.to_string(), Body::Binary(b))],
        }
    }
}

/// Requests carrying exactly `n` events with ids `{prefix}-{i}`: a mix of
/// single objects, pretty-printed arrays, NDJSON bodies (1..=40 events each)
/// and binary bodies, spread over `streams`.
pub fn mixed_requests(prefix: &str, n: usize, streams: &[&str], size: usize) -> Vec<IngestReq> {
    let mut rng = Rng::seeded(prefix);
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let stream = streams[out.len() % streams.len()];
        let kind = rng.below(10);
        let k = if kind < 3 || kind == 9 {
            1
        } else {
            (1 + rng.below(40) as usize).min(n - i)
        };
        let vs = || -> Vec<Value> {
            let v: Vec<Value> = (i..i + k)
                .map(|j| json_event(&format!("{prefix}-{j}"), j as u64, size))
                .collect();
            v
        };
        let req = match kind {
            0..=2 => IngestReq::single(stream, vs().pop().unwrap()),
            3..=5 => IngestReq::array(stream, vs()),
            6..=8 => IngestReq::ndjson(stream, vs()),
            _ => IngestReq::binary(stream, &format!("{prefix}-{i}"), size),
        };
        i += req.events.len();
        out.push(req);
    }
    out
}

#[derive(Clone)]
pub struct HttpClient {
    pub base: String,
    pub token: Option<String>,
    client: reqwest::Client,
}

/// Status and body of a reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<String>,
    /// `Idempotent-Replayed: true`: the reply of an earlier request with
    /// the same key.
    pub replayed: bool,
    /// `Connection: close`: the server will not take another request on
    /// this connection, so a client must not reuse it.
    pub closes: bool,
}

impl Reply {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// A reqwest client builder. reqwest takes its TLS from the process's
/// rustls provider, which silt installs (ring); without it, building any
/// client panics, even one that only speaks plain HTTP.
pub fn client_builder() -> reqwest::ClientBuilder {
    silt::tls::provider();
    reqwest::Client::builder()
}

/// GET `url` with a fresh client (what `reqwest::get` does, with silt's
/// crypto provider installed first).
pub async fn get(url: &str) -> reqwest::Result<reqwest::Response> {
    client_builder().build()?.get(url).send().await
}

impl HttpClient {
    pub fn new(port: u16, token: Option<&str>) -> HttpClient {
        let client = client_builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build()
            .expect("reqwest client");
        HttpClient {
            base: format!("http://127.0.0.1:{port}"),
            token: token.map(str::to_string),
            client,
        }
    }

    /// POST with an explicit Authorization header value (None = no header).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        auth: Option<&str>,
    ) -> Result<Reply, String> {
        self.post_keyed(path, content_type, body, auth, None).await
    }

    /// [`HttpClient::post_raw`] with an `Idempotency-Key` header.
    pub async fn post_keyed(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        auth: Option<&str>,
        key: Option<&str>,
    ) -> Result<Reply, String> {
        let mut rb = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body);
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        if let Some(k) = key {
            rb = rb.header("idempotency-key", k);
        }
        let resp = rb.send().await.map_err(|e| format!("POST {path}: {e}"))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let replayed = resp
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let closes = resp
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = resp
            .text()
            .await
            .map_err(|e| format!("POST {path}: reading body: {e}"))?;
        Ok(Reply {
            status,
            body,
            retry_after,
            replayed,
            closes,
        })
    }

    /// POST /v1/ingest/{stream} with the client's token.
    pub async fn ingest(&self, req: &IngestReq) -> Result<Reply, String> {
        self.ingest_keyed(req, None).await
    }

    /// [`HttpClient::ingest`] with an `Idempotency-Key`.
    pub async fn ingest_keyed(&self, req: &IngestReq, key: Option<&str>) -> Result<Reply, String> {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        self.post_keyed(
            &format!("/v1/ingest/{}", req.stream),
            req.content_type,
            req.body.clone(),
            auth.as_deref(),
            key,
        )
        .await
    }
}

/// Live counters of a running load.
#[derive(Debug, Default)]
pub struct Progress {
    pub requests: AtomicUsize,
    pub acked_events: AtomicUsize,
    pub stop: AtomicBool,
}

#[derive(Debug, Default)]
pub struct HttpReport {
    /// Ids of events whose request got 202 with the right `accepted` count.
    pub acked: Vec<String>,
    pub requests: usize,
    pub statuses: BTreeMap<u16, usize>,
    /// Transport errors (connection refused/reset, timeouts).
    pub transport_errors: usize,
    /// Requests sent more than once (retrying load only).
    pub retried: usize,
    /// Replies that repeated an earlier one (`Idempotent-Replayed`).
    pub replayed: usize,
    /// Notable anomalies (wrong `accepted`, unexpected statuses), first few.
    pub anomalies: Vec<String>,
    pub elapsed: Duration,
}

impl HttpReport {
    pub fn summary(&self) -> String {
        format!(
            "{} requests, {} events acked, statuses {:?}, transport errors {}, retried requests {}, \
             replayed replies {}, anomalies {:?}",
            self.requests,
            self.acked.len(),
            self.statuses,
            self.transport_errors,
            self.retried,
            self.replayed,
            self.anomalies
        )
    }
}

/// Sends `reqs` with `concurrency` parallel clients. `rate` paces events per
/// second (None = as fast as possible). 503 replies are retried after
/// Retry-After (up to 20 times); transport errors are not retried (those
/// events simply count as unacknowledged).
pub fn spawn_load(
    client: HttpClient,
    reqs: Vec<IngestReq>,
    concurrency: usize,
    rate: Option<u32>,
) -> (Arc<Progress>, tokio::task::JoinHandle<HttpReport>) {
    spawn_run_load(client, reqs, concurrency, rate, false)
}

/// [`spawn_load`] as a careful client does it: every request carries an
/// `Idempotency-Key` (from its first event id) and is sent again after any
/// transport error, 5xx or 409, for up to [`RETRY_FOR`], so a request
/// whose reply a crash swallowed is answered by the agent's next run.
pub fn spawn_retrying_load(
    client: HttpClient,
    reqs: Vec<IngestReq>,
    concurrency: usize,
    rate: Option<u32>,
) -> (Arc<Progress>, tokio::task::JoinHandle<HttpReport>) {
    spawn_run_load(client, reqs, concurrency, rate, true)
}

fn spawn_run_load(
    client: HttpClient,
    reqs: Vec<IngestReq>,
    concurrency: usize,
    rate: Option<u32>,
    keyed: bool,
) -> (Arc<Progress>, tokio::task::JoinHandle<HttpReport>) {
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let h = tokio::spawn(async move { run_load(client, reqs, concurrency, rate, keyed, p).await });
    (progress, h)
}

/// How long a retrying client keeps sending one request.
pub const RETRY_FOR: Duration = Duration::from_secs(120);

async fn run_load(
    client: HttpClient,
    reqs: Vec<IngestReq>,
    concurrency: usize,
    rate: Option<u32>,
    keyed: bool,
    progress: Arc<Progress>,
) -> HttpReport {
    let t0 = Instant::now();
    // Event offset of each request, for pacing.
    let mut offsets = Vec::with_capacity(reqs.len());
    let mut acc = 0usize;
    for r in &reqs {
        offsets.push(acc);
        acc += r.events.len();
    }
    let reqs = Arc::new(reqs);
    let offsets = Arc::new(offsets);
    let next = Arc::new(AtomicUsize::new(0));
    let report = Arc::new(Mutex::new(HttpReport::default()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, reqs, offsets, next, report, progress) = (
            client.clone(),
            reqs.clone(),
            offsets.clone(),
            next.clone(),
            report.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                if progress.stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reqs.len() {
                    break;
                }
                if let Some(rate) = rate {
                    let due = t0 + Duration::from_secs_f64(offsets[i] as f64 / rate.max(1) as f64);
                    if Instant::now() < due {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                let req = &reqs[i];
                let key = keyed.then(|| format!("req-{}", req.events[0].0));
                let first_sent = Instant::now();
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let res = client.ingest_keyed(req, key.as_deref()).await;
                    progress.requests.fetch_add(1, Ordering::Relaxed);
                    let retrying = keyed && first_sent.elapsed() < RETRY_FOR;
                    let retry_in: Option<f64> = {
                        let mut rep = report.lock().unwrap();
                        rep.requests += 1;
                        if attempts == 2 {
                            rep.retried += 1;
                        }
                        match res {
                            Err(e) => {
                                rep.transport_errors += 1;
                                if rep.transport_errors == 1 {
                                    rep.anomalies.push(format!("first transport error: {e}"));
                                }
                                retrying.then_some(0.2)
                            }
                            Ok(r) => {
                                *rep.statuses.entry(r.status).or_default() += 1;
                                rep.replayed += r.replayed as usize;
                                if r.status == 202 {
                                    let n = r
                                        .json()
                                        .and_then(|v| v.get("accepted").and_then(|a| a.as_u64()));
                                    if n != Some(req.events.len() as u64)
                                        && rep.anomalies.len() < 10
                                    {
                                        rep.anomalies.push(format!(
                                            "202 for {} events said {:?} (body {:?})",
                                            req.events.len(),
                                            n,
                                            r.body
                                        ));
                                    }
                                    rep.acked
                                        .extend(req.events.iter().map(|(id, _)| id.clone()));
                                    progress
                                        .acked_events
                                        .fetch_add(req.events.len(), Ordering::Relaxed);
                                    None
                                } else if (r.status == 503 && attempts < 20)
                                    || (retrying && (r.status >= 500 || r.status == 409))
                                {
                                    Some(
                                        r.retry_after
                                            .as_deref()
                                            .and_then(|s| s.parse::<f64>().ok())
                                            .unwrap_or(1.0),
                                    )
                                } else {
                                    if rep.anomalies.len() < 10 {
                                        rep.anomalies
                                            .push(format!("status {} body {:?}", r.status, r.body));
                                    }
                                    None
                                }
                            }
                        }
                    };
                    match retry_in {
                        Some(secs) => {
                            tokio::time::sleep(Duration::from_secs_f64(secs.clamp(0.1, 5.0))).await
                        }
                        None => break,
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut rep = std::mem::take(&mut *report.lock().unwrap());
    rep.elapsed = t0.elapsed();
    rep
}
