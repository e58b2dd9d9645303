//! Media-upload helpers (`tests/media.rs`): config snippets for a raw sink,
//! a streaming HTTP/1.1 PUT client whose body is generated and hashed chunk
//! by chunk (never whole in memory, never on disk), a throttling TCP proxy,
//! memory figures from /proc, and S3 read-back by streaming.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::{Attribute, GetOptions, ObjectStore, ObjectStoreExt};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::procs::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, S3Server};

pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------- config

/// An HTTP source as [`super::config::http_source`] makes it, plus
/// `max_media` when given.
pub fn media_source(name: &str, port: u16, token: Option<&str>, max_media: Option<&str>) -> String {
    let mut s = super::config::http_source(name, port, token, "16MiB");
    if let Some(m) = max_media {
        s.pop(); // the blank line that ends the table
        s.push_str(&format!("max_media = \"{m}\"\n\n"));
    }
    s
}

/// A `format = "raw"` S3 sink writing to `endpoint` (s3s-fs, or a proxy in
/// front of it), in parts of `part_size`, with index lines for `sidecar`.
pub fn raw_sink(
    name: &str,
    inputs: &[&str],
    endpoint: &str,
    bucket: &str,
    part_size: &str,
    sidecar: &[&str],
) -> String {
    let list = |xs: &[&str]| {
        xs.iter()
            .map(|x| format!("\"{x}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[sinks.{name}]\ntype = \"s3\"\nformat = \"raw\"\ninputs = [{}]\nbucket = \"{bucket}\"\n\
         endpoint = \"{endpoint}\"\nregion = \"{S3_REGION}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\n\
         secret_access_key = \"{S3_SECRET_KEY}\"\npart_size = \"{part_size}\"\nsidecar_sinks = [{}]\n\
         retry_max = \"1s\"\n\n",
        list(inputs),
        list(sidecar)
    )
}

// ---------------------------------------------------------------- bodies

/// Deterministic pseudo-random bytes (xorshift64*), produced chunk by chunk.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Fills `buf` with the next bytes of the sequence (`buf.len()` must be
    /// a multiple of 8).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            word.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
    }
}

const CHUNK: usize = 256 * 1024;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- HTTP client

/// What a PUT got back.
#[derive(Debug)]
pub struct PutReply {
    /// Status of the reply, if one was read before the connection ended.
    pub status: Option<u16>,
    pub body: String,
    /// Body bytes the client wrote, and their sha256.
    pub sent: u64,
    pub sha256: String,
    /// Why writing the body stopped early, if it did.
    pub write_error: Option<String>,
    /// Why reading the reply failed, if it did.
    pub read_error: Option<String>,
    pub took: Duration,
}

impl PutReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn request_head(port: u16, token: Option<&str>, target: &str, framing: &str) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: video/mp4\r\n\
         {framing}\r\nConnection: close\r\n\r\n"
    )
}

/// PUTs `len` bytes of [`Pattern`]`(seed)` to `target` (path and query) with
/// a Content-Length, streaming, then reads the reply (until `reply_within`).
pub async fn put_stream(
    port: u16,
    token: Option<&str>,
    target: &str,
    len: u64,
    seed: u64,
    reply_within: Duration,
) -> PutReply {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the agent");
    s.set_nodelay(true).unwrap();
    let head = request_head(port, token, target, &format!("Content-Length: {len}"));
    let mut write_error = s
        .write_all(head.as_bytes())
        .await
        .err()
        .map(|e| e.to_string());
    let (mut pattern, mut hasher) = (Pattern::new(seed), sha2::Sha256::new());
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while write_error.is_none() && sent < len {
        let n = (len - sent).min(CHUNK as u64) as usize;
        pattern.fill(&mut buf);
        hasher.update(&buf[..n]);
        match s.write_all(&buf[..n]).await {
            Ok(()) => sent += n as u64,
            Err(e) => write_error = Some(format!("after {sent} bytes: {e}")),
        }
    }
    let (status, body, read_error) = read_reply(&mut s, reply_within).await;
    PutReply {
        status,
        body,
        sent,
        sha256: hex(&hasher.finalize()),
        write_error,
        read_error,
        took: t.elapsed(),
    }
}

/// PUTs `len` bytes with `Transfer-Encoding: chunked` (no declared length).
pub async fn put_chunked(
    port: u16,
    token: Option<&str>,
    target: &str,
    len: u64,
    seed: u64,
    reply_within: Duration,
) -> PutReply {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the agent");
    s.set_nodelay(true).unwrap();
    let head = request_head(port, token, target, "Transfer-Encoding: chunked");
    let mut write_error = s
        .write_all(head.as_bytes())
        .await
        .err()
        .map(|e| e.to_string());
    let (mut pattern, mut hasher) = (Pattern::new(seed), sha2::Sha256::new());
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while write_error.is_none() && sent < len {
        let n = (len - sent).min(CHUNK as u64) as usize;
        pattern.fill(&mut buf);
        hasher.update(&buf[..n]);
        let mut frame = format!("{n:x}\r\n").into_bytes();
        frame.extend_from_slice(&buf[..n]);
        frame.extend_from_slice(b"\r\n");
        match s.write_all(&frame).await {
            Ok(()) => sent += n as u64,
            Err(e) => write_error = Some(format!("after {sent} bytes: {e}")),
        }
    }
    if write_error.is_none()
        && let Err(e) = s.write_all(b"0\r\n\r\n").await
    {
        write_error = Some(format!("writing the last chunk: {e}"));
    }
    let (status, body, read_error) = read_reply(&mut s, reply_within).await;
    PutReply {
        status,
        body,
        sent,
        sha256: hex(&hasher.finalize()),
        write_error,
        read_error,
        took: t.elapsed(),
    }
}

/// Opens a PUT declaring `declared` bytes, sends the first `send` of them,
/// and returns the still-open socket: the caller decides when to drop it.
/// Fails if the server answered anything before the body was complete.
pub async fn put_partial(
    port: u16,
    token: Option<&str>,
    target: &str,
    declared: u64,
    send: u64,
    seed: u64,
) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the agent");
    s.set_nodelay(true).unwrap();
    let head = request_head(port, token, target, &format!("Content-Length: {declared}"));
    s.write_all(head.as_bytes()).await.expect("write head");
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < send {
        let n = (send - sent).min(CHUNK as u64) as usize;
        pattern.fill(&mut buf);
        s.write_all(&buf[..n]).await.expect("write partial body");
        sent += n as u64;
    }
    s.flush().await.unwrap();
    s
}

/// Reads an HTTP/1.1 reply on a `Connection: close` request: status and
/// body (everything after the head, up to EOF or Content-Length).
pub async fn read_reply(
    s: &mut TcpStream,
    within: Duration,
) -> (Option<u16>, String, Option<String>) {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let end = tokio::time::Instant::now() + within;
    let mut error = None;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => {
                error = Some(format!("no complete reply within {within:?}"));
                break;
            }
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                error = Some(e.to_string());
                break;
            }
        }
        if let Some(done) = complete_reply(&raw) {
            raw.truncate(done);
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok());
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body, error)
}

/// Length of the reply in `raw` once its head and Content-Length body are in.
fn complete_reply(raw: &[u8]) -> Option<usize> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    (raw.len() >= head_end + len).then_some(head_end + len)
}

// ---------------------------------------------------------------- memory

/// A `Vm*` figure of /proc/<pid>/status in bytes (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

// ---------------------------------------------------------------- files

/// Every file (not directory) under `<data_dir>/media`, `incoming/` included.
pub fn media_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![data_dir.join("media")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Multipart uploads s3s-fs has open: it keeps one `.upload-<id>.json`
/// under its root per upload it created and has not completed or aborted.
pub fn open_uploads(s3: &S3Server) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(&s3.root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.strip_prefix(".upload-")?
                        .strip_suffix(".json")
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

// ---------------------------------------------------------------- S3 read-back

/// A bucket read through the S3 API, objects streamed (never whole in memory).
pub struct Bucket {
    store: AmazonS3,
}

impl Bucket {
    pub fn new(s3: &S3Server) -> Bucket {
        let store = super::lake::s3_client(s3, Duration::from_secs(120));
        Bucket { store }
    }

    /// Keys under `prefix` with their sizes.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, String> {
        let prefix = ObjectPath::from(prefix);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| format!("S3 list: {e}"))?;
        let mut out: Vec<_> = metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Size and sha256 of an object, read as a stream.
    pub async fn sha256(&self, key: &str) -> Result<(u64, String), String> {
        let mut stream = self
            .store
            .get(&ObjectPath::from(key))
            .await
            .map_err(|e| format!("S3 get {key}: {e}"))?
            .into_stream();
        let (mut size, mut hasher) = (0u64, sha2::Sha256::new());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("S3 read {key}: {e}"))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((size, hex(&hasher.finalize())))
    }

    /// The NDJSON records of every object under `prefix` (small objects
    /// only: each is read whole), and the problems met parsing them.
    pub async fn ndjson(
        &self,
        prefix: &str,
    ) -> Result<(Vec<super::lake::LakeRecord>, Vec<(String, String)>), String> {
        let (mut records, mut problems) = (Vec::new(), Vec::new());
        for (key, _) in self.list(prefix).await? {
            let data = self
                .store
                .get(&ObjectPath::from(key.as_str()))
                .await
                .map_err(|e| format!("S3 get {key}: {e}"))?
                .bytes()
                .await
                .map_err(|e| format!("S3 read {key}: {e}"))?;
            records.extend(super::lake::parse_object(&key, &data, &mut problems));
        }
        Ok((records, problems))
    }

    /// The user metadata entry `name` (`x-amz-meta-NAME`) of an object.
    pub async fn metadata(&self, key: &str, name: &str) -> Result<Option<String>, String> {
        let head = GetOptions {
            head: true,
            ..Default::default()
        };
        let found = self
            .store
            .get_opts(&ObjectPath::from(key), head)
            .await
            .map_err(|e| format!("S3 head {key}: {e}"))?;
        Ok(found
            .attributes
            .get(&Attribute::Metadata(name.to_string().into()))
            .map(|v| v.as_ref().to_string()))
    }
}

// ---------------------------------------------------------------- proxy

/// TCP proxy that limits the client -> upstream direction to a byte rate
/// (shared by all connections; 0 = unlimited, changeable while running), so
/// a multipart upload takes long enough to be interrupted in the middle.
pub struct ThrottleProxy {
    pub port: u16,
    rate: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ThrottleProxy {
    pub async fn start(upstream: u16, bytes_per_sec: u64) -> ThrottleProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let rate = Arc::new(AtomicU64::new(bytes_per_sec));
        // When the next byte may go, over all connections.
        let clock = Arc::new(Mutex::new(tokio::time::Instant::now()));
        let r = rate.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (rate, clock) = (r.clone(), clock.clone());
                conns.spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let bps = rate.load(Ordering::Relaxed);
                            if bps > 0 {
                                let at = {
                                    let mut next = clock.lock().unwrap();
                                    let now = tokio::time::Instant::now();
                                    *next = (*next).max(now)
                                        + Duration::from_secs_f64(n as f64 / bps as f64);
                                    *next
                                };
                                tokio::time::sleep_until(at).await;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    });
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    up.abort();
                });
            }
        });
        ThrottleProxy { port, rate, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts the
        // connections it spawned.
        self.task.abort();
    }
}
