//! Reading the lake back: S3 objects (through the S3 API) or files of a file
//! sink; decompression by magic bytes; NDJSON records -> event ids.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use serde_json::Value;

use super::payload::{Body, binary_id};
use super::procs::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, S3Server};

/// One NDJSON line of a lake object.
#[derive(Debug, Clone)]
pub struct LakeRecord {
    pub object: Arc<str>,
    pub ts: Option<String>,
    pub topic: Option<String>,
    pub agent: Option<String>,
    pub body: Body,
    /// Whether the record had `payload` (JSON) or `payload_b64`.
    pub had_b64: bool,
}

impl LakeRecord {
    pub fn id(&self) -> Option<String> {
        match &self.body {
            Body::Json(v) => v.get("id").and_then(|v| v.as_str()).map(str::to_string),
            Body::Binary(b) => binary_id(b),
        }
    }
}

/// Everything read from a lake, plus the problems met while reading it.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub records: Vec<LakeRecord>,
    pub objects: usize,
    pub bytes: u64,
    /// Unparseable objects/lines: (object, problem).
    pub problems: Vec<(String, String)>,
}

/// Decompresses by magic bytes: gzip (possibly multi-member), zstd, or plain.
pub fn decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .map_err(|e| format!("gunzip: {e}"))?;
        Ok(out)
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::decode_all(data).map_err(|e| format!("zstd: {e}"))
    } else {
        Ok(data.to_vec())
    }
}

/// Parses one lake object into records; problems are appended to `problems`.
pub fn parse_object(
    name: &str,
    data: &[u8],
    problems: &mut Vec<(String, String)>,
) -> Vec<LakeRecord> {
    let obj: Arc<str> = Arc::from(name);
    let text = match decompress(data) {
        Ok(t) => t,
        Err(e) => {
            problems.push((name.to_string(), e));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                problems.push((name.to_string(), format!("line {}: not JSON: {e}", i + 1)));
                continue;
            }
        };
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (body, had_b64) = match (v.get("payload"), v.get("payload_b64")) {
            (Some(p), None) => (Body::Json(p.clone()), false),
            (None, Some(Value::String(b))) => {
                match base64::engine::general_purpose::STANDARD.decode(b) {
                    Ok(bytes) => (Body::Binary(bytes), true),
                    Err(e) => {
                        problems.push((
                            name.to_string(),
                            format!("line {}: bad payload_b64: {e}", i + 1),
                        ));
                        continue;
                    }
                }
            }
            _ => {
                problems.push((
                    name.to_string(),
                    format!("line {}: need exactly one of payload / payload_b64", i + 1),
                ));
                continue;
            }
        };
        out.push(LakeRecord {
            object: obj.clone(),
            ts: s("ts"),
            topic: s("topic"),
            agent: s("agent"),
            body,
            had_b64,
        });
    }
    out
}

/// An object already read: its size, records, and the attributes it was stored with.
type CachedObject = (u64, Vec<LakeRecord>, Vec<(String, String)>);

/// Reads a bucket through the S3 API. Objects are immutable, so ones already
/// downloaded are cached and polling only fetches new keys.
/// An object_store client for the test server's bucket.
pub fn s3_client(s3: &S3Server, timeout: Duration) -> AmazonS3 {
    silt::tls::provider();
    AmazonS3Builder::new()
        // Client options first: with_client_options replaces allow_http.
        .with_client_options(ClientOptions::new().with_timeout(timeout))
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region(S3_REGION)
        .with_access_key_id(S3_ACCESS_KEY)
        .with_secret_access_key(S3_SECRET_KEY)
        .with_bucket_name(&s3.bucket)
        .with_retry(RetryConfig {
            max_retries: 2,
            ..Default::default()
        })
        .build()
        .expect("build S3 client")
}

pub struct S3Lake {
    store: AmazonS3,
    cache: HashMap<String, CachedObject>,
}

impl S3Lake {
    pub fn new(s3: &S3Server) -> S3Lake {
        let store = s3_client(s3, Duration::from_secs(30));
        S3Lake {
            store,
            cache: HashMap::new(),
        }
    }

    /// Lists the bucket and returns every record of every object.
    pub async fn snapshot(&mut self) -> Result<Snapshot, String> {
        let metas: Vec<_> = self
            .store
            .list(None)
            .try_collect()
            .await
            .map_err(|e| format!("S3 list: {e}"))?;
        let mut snap = Snapshot::default();
        for m in metas {
            let key = m.location.to_string();
            if !self.cache.contains_key(&key) {
                let data = self
                    .store
                    .get(&m.location)
                    .await
                    .map_err(|e| format!("S3 get {key}: {e}"))?
                    .bytes()
                    .await
                    .map_err(|e| format!("S3 read {key}: {e}"))?;
                let mut problems = Vec::new();
                let recs = parse_object(&key, &data, &mut problems);
                self.cache
                    .insert(key.clone(), (data.len() as u64, recs, problems));
            }
            let (size, recs, problems) = &self.cache[&key];
            snap.objects += 1;
            snap.bytes += size;
            snap.records.extend(recs.iter().cloned());
            snap.problems.extend(problems.iter().cloned());
        }
        Ok(snap)
    }

    /// One object's bytes.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, String> {
        let path = object_store::path::Path::from(key);
        let data = self
            .store
            .get(&path)
            .await
            .map_err(|e| format!("S3 get {key}: {e}"))?
            .bytes()
            .await
            .map_err(|e| format!("S3 read {key}: {e}"))?;
        Ok(data.to_vec())
    }

    /// Object keys currently in the bucket.
    pub async fn keys(&self) -> Result<Vec<String>, String> {
        let metas: Vec<_> = self
            .store
            .list(None)
            .try_collect()
            .await
            .map_err(|e| format!("S3 list: {e}"))?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }
}

/// Reads the objects a file sink wrote under `root` (recursively). Hidden
/// files and `*.tmp` / `*.part` (in-progress writes) are skipped.
pub struct FileLake {
    pub root: PathBuf,
}

impl FileLake {
    pub fn new(root: &Path) -> FileLake {
        FileLake {
            root: root.to_path_buf(),
        }
    }

    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                // `<key>#<n>`: object_store's file being written (and
                // fsynced) before its rename to the key.
                if name.starts_with('.')
                    || name.ends_with(".tmp")
                    || name.ends_with(".part")
                    || name.contains('#')
                {
                    continue;
                }
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

    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for f in self.files() {
            let rel = f
                .strip_prefix(&self.root)
                .unwrap_or(&f)
                .display()
                .to_string();
            match std::fs::read(&f) {
                Ok(data) => {
                    snap.objects += 1;
                    snap.bytes += data.len() as u64;
                    let recs = parse_object(&rel, &data, &mut snap.problems);
                    snap.records.extend(recs);
                }
                Err(e) => snap.problems.push((rel, format!("read: {e}"))),
            }
        }
        snap
    }
}

impl S3Lake {
    /// Polls the bucket (every second) until every id in `ids` is present.
    /// Returns the last snapshot, or Err with what is still missing.
    pub async fn wait_for(
        &mut self,
        ids: &std::collections::HashSet<String>,
        deadline: std::time::Instant,
        t0: std::time::Instant,
    ) -> Result<Snapshot, String> {
        let mut last_note = std::time::Instant::now();
        loop {
            let (present, snap) = match self.snapshot().await {
                Ok(snap) => {
                    let have: std::collections::HashSet<String> =
                        snap.records.iter().filter_map(|r| r.id()).collect();
                    (ids.iter().filter(|i| have.contains(*i)).count(), Some(snap))
                }
                Err(e) => {
                    super::note(t0, format!("lake poll failed: {e}"));
                    (0, None)
                }
            };
            if let Some(snap) = &snap {
                if present == ids.len() {
                    return Ok(snap.clone());
                }
                if last_note.elapsed() >= Duration::from_secs(5) {
                    super::note(
                        t0,
                        format!(
                            "lake: {present}/{} required ids, {} objects",
                            ids.len(),
                            snap.objects
                        ),
                    );
                    last_note = std::time::Instant::now();
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "timed out: lake has {present} of {} required ids",
                    ids.len()
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Number of records currently in the bucket (0 if the listing fails).
    pub async fn count(&mut self) -> usize {
        self.snapshot().await.map(|s| s.records.len()).unwrap_or(0)
    }
}
