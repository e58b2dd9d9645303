//! The AWS credential chain of an S3 sink without keys in its config, as
//! object_store 0.14 resolves it, against s3s-fs (which checks every SigV4
//! signature against its one key pair and answers 403 otherwise). Each
//! credentials source is a loopback server in this file that hands out
//! s3s-fs's key pair with a session token; the S3 requests go through a tap
//! that records them, so a test sees that the token it served signed the
//! uploads.
//!
//! - `keys_from_the_environment`: `AWS_ACCESS_KEY_ID` /
//!   `AWS_SECRET_ACCESS_KEY`: every event reaches the bucket; with a wrong
//!   secret nothing does and the log names `SignatureDoesNotMatch`.
//! - `keys_from_a_container_credentials_endpoint`:
//!   `AWS_CONTAINER_CREDENTIALS_FULL_URI` +
//!   `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (EKS Pod Identity, or ECS
//!   with a full URI): the endpoint is asked with the file's token in
//!   `Authorization`, its keys and token sign the uploads. A full URI
//!   without the token file is not used (object_store goes on to instance
//!   metadata).
//! - `keys_from_web_identity`: `AWS_WEB_IDENTITY_TOKEN_FILE` +
//!   `AWS_ROLE_ARN` + `AWS_ROLE_SESSION_NAME`, with `AWS_ENDPOINT_URL_STS`
//!   pointing at an HTTPS STS stand-in (object_store refuses plain HTTP for
//!   STS; the sink's `ca_file` makes its certificate trusted): one
//!   `AssumeRoleWithWebIdentity` carrying the file's token, the role and the
//!   session name; its credentials sign the uploads.
//! - `keys_from_instance_metadata`: IMDSv2 at `AWS_METADATA_ENDPOINT`: a
//!   PUT for a session token, then the role and its credentials fetched with
//!   that token (the stand-in refuses them without it).
//!
//! Not covered: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, which object_store
//! always resolves against the fixed ECS agent address 169.254.170.2.

mod harness;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::http::{HttpClient, IngestReq};
use harness::pki::{self, Ca};
use harness::procs::{S3_ACCESS_KEY, S3_SECRET_KEY};
use harness::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Variables that would make object_store pick another credentials source
/// (or another endpoint) than the one a test sets up.
const AMBIENT: [&str; 12] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SKIP_SIGNATURE",
];

fn no_ambient_credentials() {
    let set: Vec<&str> = AMBIENT
        .iter()
        .copied()
        .filter(|v| std::env::var_os(v).is_some())
        .collect();
    assert!(
        set.is_empty(),
        "{set:?} set in the test's environment would reach the agent and change the chain under test; unset them"
    );
}

/// Credentials that expire in an hour, as RFC 3339.
fn in_an_hour() -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The ECS / EKS / IMDS credentials document (object_store reads
/// AccessKeyId, SecretAccessKey, Token and Expiration).
fn credentials_json(token: &str) -> String {
    serde_json::json!({
        "Code": "Success",
        "Type": "AWS-HMAC",
        "AccessKeyId": S3_ACCESS_KEY,
        "SecretAccessKey": S3_SECRET_KEY,
        "Token": token,
        "Expiration": in_an_hour(),
    })
    .to_string()
}

// ------------------------------------------------------ loopback endpoints

/// One request a stand-in endpoint received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query.
    target: String,
    /// Names in lower case.
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// A query parameter, percent-decoded.
    fn param(&self, name: &str) -> Option<String> {
        let query = self.target.split_once('?')?.1;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// Status, content type, body.
type Reply = (u16, &'static str, String);

/// An HTTP/1.1 server on 127.0.0.1:0 (HTTPS with `tls`) that records each
/// request and answers it with `handler`, one request per connection.
struct Endpoint {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    async fn start<H>(tls: Option<&pki::Issued>, handler: H) -> Endpoint
    where
        H: Fn(&Seen) -> Reply + Send + Sync + 'static,
    {
        let acceptor = tls.map(pki::acceptor);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, handler, log) = (acceptor.clone(), handler.clone(), log.clone());
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                serve(tls, &*handler, &log).await;
                            }
                        }
                        None => serve(tcp, &*handler, &log).await,
                    }
                });
            }
        });
        Endpoint { port, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S, H>(mut conn: S, handler: &H, log: &Mutex<Vec<Seen>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Fn(&Seen) -> Reply,
{
    let Some(req) = read_request(&mut conn).await else {
        return;
    };
    let (status, content_type, body) = handler(&req);
    log.lock().unwrap().push(req);
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

async fn read_request<S: AsyncRead + Unpin>(conn: &mut S) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - (head_end + 4);
    while have < len {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        have += n;
    }
    Some(Seen {
        method,
        target,
        headers,
    })
}

/// A TCP relay in front of s3s-fs that keeps every byte the agent sent, to
/// see which credentials signed its requests.
struct Tap {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(upstream: u16) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let forward = async move {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = uw.shutdown().await;
                    };
                    let back = async move {
                        let _ = tokio::io::copy(&mut ur, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(forward, back);
                });
            }
        });
        Tap { port, sent, task }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests (PUTs and POSTs) whose head holds `header: value`.
    fn requests_with(&self, header: &str, value: &str) -> usize {
        let text = String::from_utf8_lossy(&self.sent.lock().unwrap()).to_ascii_lowercase();
        let needle = format!("\r\n{header}: {value}\r\n").to_ascii_lowercase();
        text.matches(&needle).count()
    }

    /// Requests signed with `key_id`'s credentials.
    fn signed_by(&self, key_id: &str) -> usize {
        let text = String::from_utf8_lossy(&self.sent.lock().unwrap()).to_ascii_lowercase();
        let needle = format!("aws4-hmac-sha256 credential={key_id}/").to_ascii_lowercase();
        text.matches(&needle).count()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------ agent

/// The harness's S3 sink (gzip, 1 s batches) with its keys taken out and
/// its endpoint moved to `endpoint`; `extra` is appended inside the table.
fn keyless_sink(s3: &S3Server, endpoint: &str, extra: &str) -> String {
    let sink = config::s3_sink(
        "lake",
        &["api"],
        s3,
        "gzip",
        &config::batch(1_000, "8MiB", "1s"),
    )
    .replace(&format!("access_key_id = \"{S3_ACCESS_KEY}\"\n"), "")
    .replace(&format!("secret_access_key = \"{S3_SECRET_KEY}\"\n"), "")
    .replace(&s3.endpoint(), endpoint);
    assert!(
        !sink.contains("access_key") && sink.contains(endpoint),
        "{sink}"
    );
    format!("{}\n{extra}\n\n", sink.trim_end())
}

async fn start_agent(s: &Scratch, name: &str, sink: &str, env: &[(&str, &str)]) -> (Agent, u16) {
    let port = free_port();
    let cfg = config::agent(name) + &config::http_source("api", port, Some(TOKEN), "1MiB") + sink;
    let mut agent = Agent::start_with_env(&s.join(name), &cfg, env);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    (agent, port)
}

/// Posts `n` events `{prefix}-{i}` in one request; their ids.
async fn post(port: u16, prefix: &str, n: usize) -> HashSet<String> {
    let events: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"id": format!("{prefix}-{i}"), "n": i}))
        .collect();
    let reply = HttpClient::new(port, Some(TOKEN))
        .ingest(&IngestReq::array("t", events))
        .await
        .unwrap();
    assert_eq!(reply.status, 202, "{reply:?}");
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Posts two rounds of events (so at least two uploads, the second with
/// cached credentials) and waits for all of them in the bucket.
async fn events_reach_the_bucket(s3: &S3Server, agent: &Agent, port: u16, t0: Instant) {
    let mut lake = S3Lake::new(s3);
    let mut ids = post(port, "first", 20).await;
    let snap = lake.wait_for(&ids, deadline(60), t0).await;
    snap.unwrap_or_else(|e| panic!("{e}\n{}", agent.log_run()));
    ids.extend(post(port, "second", 20).await);
    let snap = lake.wait_for(&ids, deadline(60), t0).await;
    let snap = snap.unwrap_or_else(|e| panic!("{e}\n{}", agent.log_run()));
    assert_eq!(snap.records.len(), 40, "each event once");
    assert!(snap.objects >= 2, "two uploads: {} objects", snap.objects);
    note(
        t0,
        format!("{} objects, 40 events in the bucket", snap.objects),
    );
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_environment() {
    no_ambient_credentials();
    let t0 = Instant::now();
    let s = Scratch::new("creds-env");
    let s3 = S3Server::start(s.path(), "env");
    let sink = keyless_sink(&s3, &s3.endpoint(), "");

    // A wrong secret: s3s-fs refuses the signature, nothing lands.
    let (mut wrong, port) = start_agent(
        &s,
        "gw-env-wrong",
        &sink,
        &[
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
        ],
    )
    .await;
    post(port, "refused", 5).await;
    wrong.wait_log("refuses", deadline(60)).await.unwrap();
    let log = wrong.log_run();
    let line = log.lines().find(|l| l.contains("refuses")).unwrap();
    note(t0, format!("wrong secret: {line}"));
    assert!(
        line.contains("SignatureDoesNotMatch"),
        "the log names the refusal: {line}"
    );
    assert_eq!(wrong.uploaded_records(), 0, "{log}");
    let keys = S3Lake::new(&s3).keys().await.unwrap();
    assert!(keys.is_empty(), "nothing uploaded: {keys:?}");
    // Its batch can never upload: a SIGTERM would wait out shutdown_timeout.
    wrong.kill9();

    // The right pair. An S3 endpoint in the device's environment does not
    // move the sink off the endpoint its config names.
    let (mut agent, port) = start_agent(
        &s,
        "gw-env",
        &sink,
        &[
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9"),
        ],
    )
    .await;
    events_reach_the_bucket(&s3, &agent, port, t0).await;
    assert_eq!(agent.count_log("refuses"), 0, "{}", agent.log_run());
    let st = agent.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_a_container_credentials_endpoint() {
    no_ambient_credentials();
    let t0 = Instant::now();
    let s = Scratch::new("creds-container");
    let s3 = S3Server::start(s.path(), "container");
    let tap = Tap::start(s3.port).await;
    const AUTH: &str = "pod-identity-token-5c1e";
    const SESSION: &str = "container-session-token-8d2f";
    let creds = Endpoint::start(None, |req: &Seen| {
        if req.method == "GET"
            && req.path() == "/creds"
            && req.header("authorization") == Some(AUTH)
        {
            (200, "application/json", credentials_json(SESSION))
        } else {
            (401, "text/plain", "no".into())
        }
    })
    .await;
    // object_store sends the file's content as the header value, unchanged:
    // no trailing newline.
    let token_file = s.join("eks-pod-identity-token");
    std::fs::write(&token_file, AUTH).unwrap();
    let uri = format!("http://127.0.0.1:{}/creds", creds.port);

    // A full URI without the token file is not used: object_store goes on
    // to instance metadata (here a stand-in that is unavailable).
    let imds = Endpoint::start(None, |_: &Seen| (503, "text/plain", String::new())).await;
    let metadata = format!("http://127.0.0.1:{}", imds.port);
    let (mut bare, port) = start_agent(
        &s,
        "gw-container-bare",
        &keyless_sink(&s3, &tap.endpoint(), ""),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            ("AWS_METADATA_ENDPOINT", &metadata),
        ],
    )
    .await;
    post(port, "bare", 5).await;
    wait_until(deadline(60), "a request to instance metadata", || {
        !imds.seen().is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", bare.log_run()));
    bare.wait_log("sink unreachable", deadline(30))
        .await
        .unwrap();
    note(
        t0,
        format!(
            "full URI without a token file: instance metadata asked for {:?}, the full URI {} time(s)",
            imds.seen().first().map(|r| r.target.clone()),
            creds.seen().len()
        ),
    );
    assert!(creds.seen().is_empty(), "the full URI alone is not used");
    assert_eq!(tap.signed_by(S3_ACCESS_KEY), 0, "nothing was signed");
    bare.kill9();

    let (mut agent, port) = start_agent(
        &s,
        "gw-container",
        &keyless_sink(&s3, &tap.endpoint(), ""),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
        ],
    )
    .await;
    events_reach_the_bucket(&s3, &agent, port, t0).await;

    let seen = creds.seen();
    note(
        t0,
        format!("credentials endpoint asked {} time(s)", seen.len()),
    );
    assert!(!seen.is_empty(), "the endpoint was asked");
    for req in &seen {
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("GET", "/creds"),
            "{req:?}"
        );
        assert_eq!(req.header("authorization"), Some(AUTH), "{req:?}");
    }
    let with_token = tap.requests_with("x-amz-security-token", SESSION);
    note(
        t0,
        format!(
            "{with_token} S3 request(s) carried the served session token, {} signed by its key",
            tap.signed_by(S3_ACCESS_KEY)
        ),
    );
    assert!(with_token >= 2, "the served token went with every upload");
    assert_eq!(
        with_token,
        tap.signed_by(S3_ACCESS_KEY),
        "every signed request carried it"
    );
    let st = agent.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_web_identity() {
    no_ambient_credentials();
    let t0 = Instant::now();
    let s = Scratch::new("creds-web-identity");
    let ca = Ca::new(s.path(), "sts-ca");
    let cert = ca.server("sts");
    let s3 = S3Server::start(s.path(), "webid");
    let tap = Tap::start(s3.port).await;
    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzaWx0In0.c2lnbmF0dXJl";
    const ROLE: &str = "arn:aws:iam::123456789012:role/silt-edge";
    const SESSION_NAME: &str = "gw-webid";
    const SESSION: &str = "sts-session-token-41b7";
    let sts = Endpoint::start(Some(&cert), |req: &Seen| {
        let ok = req.method == "POST"
            && req.param("Action").as_deref() == Some("AssumeRoleWithWebIdentity")
            && req.param("RoleArn").as_deref() == Some(ROLE)
            && req.param("WebIdentityToken").as_deref() == Some(JWT);
        if !ok {
            return (
                403,
                "text/xml",
                "<ErrorResponse><Error><Code>AccessDenied</Code></Error></ErrorResponse>".into(),
            );
        }
        let xml = format!(
            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
             <AssumeRoleWithWebIdentityResult>\
             <SubjectFromWebIdentityToken>silt</SubjectFromWebIdentityToken>\
             <Credentials>\
             <SessionToken>{SESSION}</SessionToken>\
             <SecretAccessKey>{S3_SECRET_KEY}</SecretAccessKey>\
             <Expiration>{}</Expiration>\
             <AccessKeyId>{S3_ACCESS_KEY}</AccessKeyId>\
             </Credentials>\
             </AssumeRoleWithWebIdentityResult>\
             </AssumeRoleWithWebIdentityResponse>",
            in_an_hour()
        );
        (200, "text/xml", xml)
    })
    .await;
    let token_file = s.join("web-identity-token");
    std::fs::write(&token_file, JWT).unwrap();
    let sts_url = format!("https://localhost:{}/", sts.port);
    // The STS client shares the sink's client options, so `ca_file` makes
    // the stand-in's certificate trusted.
    let ca_file = format!("ca_file = \"{}\"", ca.cert_file.display());
    let (mut agent, port) = start_agent(
        &s,
        "gw-webid",
        &keyless_sink(&s3, &tap.endpoint(), &ca_file),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", ROLE),
            ("AWS_ROLE_SESSION_NAME", SESSION_NAME),
            ("AWS_ENDPOINT_URL_STS", &sts_url),
        ],
    )
    .await;
    events_reach_the_bucket(&s3, &agent, port, t0).await;

    let seen = sts.seen();
    note(t0, format!("STS asked {} time(s)", seen.len()));
    assert!(!seen.is_empty(), "STS was asked");
    for req in &seen {
        assert_eq!(req.method, "POST", "{req:?}");
        assert_eq!(
            req.param("Action").as_deref(),
            Some("AssumeRoleWithWebIdentity")
        );
        assert_eq!(req.param("RoleArn").as_deref(), Some(ROLE));
        assert_eq!(req.param("RoleSessionName").as_deref(), Some(SESSION_NAME));
        assert_eq!(
            req.param("WebIdentityToken").as_deref(),
            Some(JWT),
            "the token file's content"
        );
    }
    let with_token = tap.requests_with("x-amz-security-token", SESSION);
    note(
        t0,
        format!("{with_token} S3 request(s) carried the STS session token"),
    );
    assert!(with_token >= 2, "the STS token went with every upload");
    assert_eq!(with_token, tap.signed_by(S3_ACCESS_KEY));
    let st = agent.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_instance_metadata() {
    no_ambient_credentials();
    let t0 = Instant::now();
    let s = Scratch::new("creds-imds");
    let s3 = S3Server::start(s.path(), "imds");
    let tap = Tap::start(s3.port).await;
    const IMDS_TOKEN: &str = "imds-v2-session-9a0c";
    const ROLE: &str = "silt-edge-role";
    const SESSION: &str = "instance-session-token-77e1";
    const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
    let imds = Endpoint::start(None, |req: &Seen| {
        let token_ok = req.header("x-aws-ec2-metadata-token") == Some(IMDS_TOKEN);
        match (req.method.as_str(), req.path()) {
            ("PUT", "/latest/api/token")
                if req.header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
            {
                (200, "text/plain", IMDS_TOKEN.into())
            }
            // IMDSv2 only: no session token, no answer.
            ("GET", _) if !token_ok => (401, "text/plain", String::new()),
            ("GET", CREDS) => (200, "text/plain", ROLE.into()),
            ("GET", p) if p == format!("{CREDS}{ROLE}") => {
                (200, "application/json", credentials_json(SESSION))
            }
            _ => (404, "text/plain", String::new()),
        }
    })
    .await;
    let endpoint = format!("http://127.0.0.1:{}", imds.port);
    let (mut agent, port) = start_agent(
        &s,
        "gw-imds",
        &keyless_sink(&s3, &tap.endpoint(), ""),
        &[("AWS_METADATA_ENDPOINT", &endpoint)],
    )
    .await;
    events_reach_the_bucket(&s3, &agent, port, t0).await;

    let seen = imds.seen();
    let flow: Vec<String> = seen
        .iter()
        .map(|r| format!("{} {}", r.method, r.path()))
        .collect();
    note(t0, format!("metadata requests: {flow:?}"));
    let first = [
        "PUT /latest/api/token".to_string(),
        format!("GET {CREDS}"),
        format!("GET {CREDS}{ROLE}"),
    ];
    assert!(flow.starts_with(&first), "the IMDSv2 sequence: {flow:?}");
    for req in seen.iter().filter(|r| r.method == "GET") {
        assert_eq!(
            req.header("x-aws-ec2-metadata-token"),
            Some(IMDS_TOKEN),
            "{req:?}"
        );
    }
    let with_token = tap.requests_with("x-amz-security-token", SESSION);
    note(
        t0,
        format!("{with_token} S3 request(s) carried the instance session token"),
    );
    assert!(with_token >= 2, "the instance token went with every upload");
    assert_eq!(with_token, tap.signed_by(S3_ACCESS_KEY));
    let st = agent.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
}

/// An instance with no role attached answers 404 for its credentials, as
/// does a container endpoint that does not know the task: that says nothing
/// about the batch, so it is held and retried, never dead-lettered, and
/// goes out once a role is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_role_holds_batches_until_one_is_attached() {
    no_ambient_credentials();
    let t0 = Instant::now();
    let s = Scratch::new("creds-no-role");
    let s3 = S3Server::start(s.path(), "norole");
    const IMDS_TOKEN: &str = "imds-v2-session-41b7";
    const ROLE: &str = "silt-late-role";
    const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
    let attached = Arc::new(AtomicBool::new(false));
    let role = attached.clone();
    let imds = Endpoint::start(None, move |req: &Seen| {
        match (req.method.as_str(), req.path()) {
            ("PUT", "/latest/api/token") => (200, "text/plain", IMDS_TOKEN.into()),
            _ if !role.load(Ordering::SeqCst) => (404, "text/plain", String::new()),
            ("GET", CREDS) => (200, "text/plain", ROLE.into()),
            ("GET", p) if p == format!("{CREDS}{ROLE}") => {
                (200, "application/json", credentials_json("late-session-3c"))
            }
            _ => (404, "text/plain", String::new()),
        }
    })
    .await;
    let endpoint = format!("http://127.0.0.1:{}", imds.port);
    let (mut agent, port) = start_agent(
        &s,
        "gw-no-role",
        &keyless_sink(&s3, &s3.endpoint(), ""),
        &[("AWS_METADATA_ENDPOINT", &endpoint)],
    )
    .await;
    let ids = post(port, "held", 10).await;
    wait_until(deadline(60), "two refused credential requests", || {
        imds.seen()
            .iter()
            .filter(|r| r.method == "GET" && r.path() == CREDS)
            .count()
            >= 2
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_run()));
    let log = agent.log_run();
    assert!(
        !log.contains("went to dead-letter"),
        "a missing role dead-lettered the batch:\n{log}"
    );
    attached.store(true, Ordering::SeqCst);
    let snap = S3Lake::new(&s3).wait_for(&ids, deadline(60), t0).await;
    let snap = snap.unwrap_or_else(|e| panic!("{e}\n{}", agent.log_run()));
    assert_eq!(snap.records.len(), 10, "each event once");
    note(
        t0,
        format!(
            "role attached after {} metadata requests; 10 events in the bucket",
            imds.seen().len()
        ),
    );
    let st = agent.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
}
