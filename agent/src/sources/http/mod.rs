//! HTTP source: `POST /v1/ingest/{stream}` answers 202 only after the
//! events are committed to the spool; `PUT /v1/media/{stream}/{name}`
//! (see [`media`]) answers 201 once the upload is on disk and referenced.

mod auth;
mod idempotency;
mod limits;
mod media;
mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSourceConfig;
use crate::event::{Event, now_ms};
use crate::transform::Ingest;
use auth::Tokens;
use idempotency::{Begin, Idempotency};
use limits::{BodyError, Limits};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http source {source_name} cannot read its idempotency keys from the spool: {error}")]
    Idempotency {
        source_name: String,
        error: crate::spool::SpoolError,
    },
    #[error(
        "http source {source_name} cannot listen on {addr}: {error}; is another process using the port?"
    )]
    Bind {
        source_name: String,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("http source {source_name}: tls: {error}")]
    Tls {
        source_name: String,
        error: tls::TlsError,
    },
    #[error("http source {source_name} cannot read auth_tokens_file: {error}")]
    Tokens {
        source_name: String,
        error: std::io::Error,
    },
}

/// The verified subject of a client certificate, set on each request of
/// the connection that presented it.
#[derive(Clone)]
struct ClientId(std::sync::Arc<str>);

/// The event attribute a verified client certificate's subject goes to.
pub const CLIENT_ID_ATTRIBUTE: &str = "client_id";

struct Handler {
    name: String,
    tokens: Tokens,
    max_body: u64,
    max_media: u64,
    limits: Limits,
    idempotency: Idempotency,
    ingest: Ingest,
}

pub struct HttpSource {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: std::sync::Arc<Handler>,
}

type Reply = Response<Full<Bytes>>;

impl HttpSource {
    /// Binds the listener now, so a taken port fails start-up instead of
    /// surfacing later.
    pub async fn bind(
        name: &str,
        config: &HttpSourceConfig,
        ingest: Ingest,
    ) -> Result<HttpSource, HttpError> {
        let tls = match &config.tls {
            Some(tls) => Some(tls::acceptor(tls).map_err(|error| HttpError::Tls {
                source_name: name.to_string(),
                error,
            })?),
            None => None,
        };
        let tokens = Tokens::new(config).map_err(|error| HttpError::Tokens {
            source_name: name.to_string(),
            error,
        })?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|error| HttpError::Bind {
                source_name: name.to_string(),
                addr: config.listen,
                error,
            })?;
        let stored =
            ingest
                .marks(&idempotency::tree(name))
                .map_err(|error| HttpError::Idempotency {
                    source_name: name.to_string(),
                    error,
                })?;
        let retention = idempotency::Retention {
            window: config.idempotency_window,
            max_keys: config.idempotency_max_keys,
            max_bytes: config.idempotency_max_bytes.as_u64(),
        };
        let handler = Handler {
            idempotency: Idempotency::new(name, retention, stored),
            name: name.to_string(),
            tokens,
            max_body: config.max_body.as_u64(),
            max_media: config.max_media.as_u64(),
            limits: Limits::new(config),
            ingest,
        };
        Ok(HttpSource {
            listener,
            tls,
            handler: std::sync::Arc::new(handler),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown`, lets requests in flight finish for up to
    /// [`DRAIN_GRACE`], then cuts what is left. On return no connection
    /// task is alive, so none holds the spool open after a stop or reload.
    pub async fn run(self, shutdown: CancellationToken) {
        let addr = self.local_addr();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(source = %self.handler.name, addr = ?addr, scheme, "http listening");
        let graceful = GracefulShutdown::new();
        let mut connections = tokio::task::JoinSet::new();
        let limits = &self.handler.limits;
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.read_buffer);
        loop {
            let (stream, _) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(source = %self.handler.name, error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                _ = shutdown.cancelled() => break,
            };
            let Some(slot) = limits.admit() else {
                self.handler
                    .ingest
                    .metrics()
                    .http_connection_refused(&self.handler.name);
                Limits::refuse(stream);
                continue;
            };
            let handler = self.handler.clone();
            let tls = self.tls.clone();
            let http1 = http1.clone();
            let watcher = graceful.watcher();
            let handshake_timeout = limits.header_timeout;
            connections.spawn(async move {
                let _slot = slot;
                let Some(tls) = tls else {
                    let conn = http1.serve_connection(TokioIo::new(stream), service(handler, None));
                    return watcher.watch(conn).await;
                };
                // The handshake gets the header timeout too, so a client
                // that never finishes it cannot hold a connection slot.
                let stream = match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::info!(source = %handler.name, error = %e, "tls handshake refused");
                        return Ok(());
                    }
                    Err(_) => return Ok(()),
                };
                let client_id = tls::client_id(stream.get_ref().1).map(|id| ClientId(id.into()));
                let conn =
                    http1.serve_connection(TokioIo::new(stream), service(handler, client_id));
                watcher.watch(conn).await
            });
        }
        drop(self.listener);
        if tokio::time::timeout(DRAIN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            while connections.try_join_next().is_some() {}
            let open = connections.len();
            tracing::warn!(source = %self.handler.name, open, grace = ?DRAIN_GRACE, "http requests still running after the grace; closing their connections unanswered (clients retry)");
        }
        connections.shutdown().await;
    }
}

/// The request handler of one connection; `client_id` is the verified
/// client certificate's subject, if the connection presented one.
fn service(
    handler: std::sync::Arc<Handler>,
    client_id: Option<ClientId>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Reply,
    Error = Infallible,
    Future = impl Future<Output = Result<Reply, Infallible>> + Send,
> + Clone {
    service_fn(move |mut req: Request<Incoming>| {
        let handler = handler.clone();
        if let Some(id) = &client_id {
            req.extensions_mut().insert(id.clone());
        }
        async move {
            let has_body = !req.body().is_end_stream();
            let mut resp = handler.handle(req).await;
            // A refused request's body may be unread; hyper then closes
            // the connection, and a client that was not told reuses it and
            // loses its next request.
            if has_body && !resp.status().is_success() {
                resp.headers_mut()
                    .insert(CONNECTION, "close".parse().expect("static header"));
            }
            Ok::<_, Infallible>(resp)
        }
    })
}

/// How long a stopping source lets requests in flight finish. Idle
/// keep-alive connections close at once; a request waiting on the spool
/// gives up when the sources stop, so only slow bodies are cut.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

fn json_reply(status: StatusCode, body: serde_json::Value) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    resp
}

/// A reply kept for `Idempotency-Key` repeats; `replayed` marks a repeat.
fn stored_reply(reply: &idempotency::Reply, replayed: bool) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(reply.body.clone())));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    if replayed {
        headers.insert(
            idempotency::REPLAYED,
            "true".parse().expect("static header"),
        );
    }
    resp
}

/// The request's `Idempotency-Key`, if any; a malformed one is refused.
/// The error is boxed: a reply is large and this is the rare path.
fn idempotency_key(req: &Request<Incoming>) -> Result<Option<String>, Box<Reply>> {
    let Some(value) = req.headers().get(idempotency::HEADER) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if idempotency::valid_key(key) => Ok(Some(key.to_string())),
        _ => Err(Box::new(error_reply(
            StatusCode::BAD_REQUEST,
            format!(
                "Idempotency-Key must be 1 to {} visible ASCII characters (a UUID is a good key)",
                idempotency::MAX_KEY_LEN
            ),
        ))),
    }
}

fn error_reply(status: StatusCode, message: impl Into<String>) -> Reply {
    json_reply(status, serde_json::json!({ "error": message.into() }))
}

impl Handler {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        if let Some(rest) = req.uri().path().strip_prefix("/v1/media/") {
            let rest = rest.to_string();
            return self.handle_media(req, &rest).await;
        }
        let Some(stream) = req
            .uri()
            .path()
            .strip_prefix("/v1/ingest/")
            .map(str::to_string)
        else {
            return error_reply(
                StatusCode::NOT_FOUND,
                "unknown path; POST events to /v1/ingest/{stream}, PUT media to /v1/media/{stream}/{name}",
            );
        };
        if stream.is_empty() || stream.contains('/') {
            return error_reply(
                StatusCode::NOT_FOUND,
                "the stream name must be one non-empty path segment",
            );
        }
        if let Some(refused) = self.refuse(&req, Method::POST) {
            return refused;
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body) {
            return self.too_large();
        }
        let key = match idempotency_key(&req) {
            Ok(key) => key,
            Err(refused) => return *refused,
        };
        let client_id = client_id(&req);
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let body = match self
            .limits
            .pace(req.into_body())
            .collect(self.max_body)
            .await
        {
            Ok(body) => body,
            Err(e) => return self.body_error(&e),
        };
        let pending = match key {
            Some(key) => {
                let parts: [&[u8]; 3] = [stream.as_bytes(), content_type.as_bytes(), &body];
                match self.begin_keyed(&key, &parts) {
                    Ok(pending) => Some(pending),
                    Err(reply) => return *reply,
                }
            }
            None => None,
        };
        let mut events = match parse_body(&stream, &content_type, body, now_ms()) {
            Ok(events) => events,
            Err(message) => return error_reply(StatusCode::BAD_REQUEST, message),
        };
        if let Some(id) = client_id {
            for event in &mut events {
                event
                    .attributes
                    .push((CLIENT_ID_ATTRIBUTE.into(), id.clone()));
            }
        }
        let received = events.len();
        let accepted = idempotency::Reply {
            status: StatusCode::ACCEPTED.as_u16(),
            body: serde_json::json!({ "accepted": received }).to_string(),
        };
        let marks = pending.as_ref().map_or(Vec::new(), |p| p.marks(&accepted));
        match self.ingest.ingest_marked(&self.name, events, marks).await {
            // A full spool under `drop_newest` stored neither the events nor
            // the key: a retry may store them.
            Ok(outcome) if outcome.dropped_new > 0 => json_reply(
                StatusCode::ACCEPTED,
                serde_json::json!({ "accepted": 0, "dropped": received }),
            ),
            // Accepted means silt answers for the events now: stored, or
            // (after a plugin failure) in dead-letter, or dropped by a
            // plugin on purpose. Only the full-spool policy refuses them.
            Ok(_) => {
                if let Some(pending) = pending {
                    pending.committed(&accepted);
                }
                stored_reply(&accepted, false)
            }
            Err(e) => self.not_committed(&e),
        }
    }

    /// Looks `key` up: the pending entry to commit with the events, or the
    /// reply to send at once (the first reply again, 422, or 409).
    fn begin_keyed(
        &self,
        key: &str,
        request: &[&[u8]],
    ) -> Result<idempotency::Pending, Box<Reply>> {
        let reply = match self.idempotency.begin(
            key,
            idempotency::request_digest(request),
            now_ms(),
        ) {
            Begin::New(pending) => return Ok(pending),
            Begin::Replay(reply) => stored_reply(&reply, true),
            Begin::Mismatch => error_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was used for a different request; use a new key for new data",
            ),
            Begin::InFlight => {
                let mut resp = error_reply(
                    StatusCode::CONFLICT,
                    "a request with this Idempotency-Key is still being handled; retry shortly",
                );
                resp.headers_mut()
                    .insert(RETRY_AFTER, "1".parse().expect("static header"));
                resp
            }
        };
        Err(Box::new(reply))
    }

    /// A full spool or a failing disk are both "try again later".
    fn not_committed(&self, e: &crate::transform::IngestError) -> Reply {
        let status = if e.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(source = %self.name, error = %e, "http events not committed");
        }
        let mut resp = error_reply(status, e.to_string());
        if e.is_retryable() {
            resp.headers_mut()
                .insert(RETRY_AFTER, "1".parse().expect("static header"));
        }
        resp
    }

    /// The reply for a wrong method or a missing token, if any.
    fn refuse(&self, req: &Request<Incoming>, method: Method) -> Option<Reply> {
        if req.method() != method {
            let mut resp = error_reply(StatusCode::METHOD_NOT_ALLOWED, format!("use {method}"));
            resp.headers_mut()
                .insert("allow", method.as_str().parse().expect("static header"));
            return Some(resp);
        }
        if !self.authorized(req) {
            let mut resp = error_reply(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send `Authorization: Bearer <token>`",
            );
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, "Bearer".parse().expect("static header"));
            return Some(resp);
        }
        None
    }

    fn body_error(&self, e: &BodyError) -> Reply {
        match e {
            BodyError::TooLarge { .. } => self.too_large(),
            BodyError::TooSlow { .. } => {
                tracing::info!(source = %self.name, error = %e, "http body too slow; request cut");
                error_reply(StatusCode::REQUEST_TIMEOUT, e.to_string())
            }
            BodyError::Broken { .. } => error_reply(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }

    fn too_large(&self) -> Reply {
        error_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than max_body ({} bytes)", self.max_body),
        )
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        if !self.tokens.required() {
            return true;
        }
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        self.tokens.accepts(given)
    }
}

/// The verified client certificate's subject, if the request came over a
/// connection that presented one.
fn client_id(req: &Request<Incoming>) -> Option<String> {
    req.extensions()
        .get::<ClientId>()
        .map(|id| id.0.to_string())
}

fn is_json(content_type: &str) -> bool {
    content_type == "application/json" || content_type.ends_with("+json")
}

fn is_ndjson(content_type: &str) -> bool {
    matches!(
        content_type,
        "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
    )
}

/// One event per JSON object, or one binary event for other content types.
/// Any bad part rejects the whole body, so a client never has to guess what
/// was kept.
fn parse_body(
    stream: &str,
    content_type: &str,
    body: Bytes,
    ts_ms: i64,
) -> Result<Vec<Event>, String> {
    let event = |payload: Bytes| Event::new(ts_ms, stream, payload);
    if is_ndjson(content_type) {
        let mut events = Vec::new();
        let mut offset = 0;
        for (index, line) in body.split(|b| *b == b'\n').enumerate() {
            let start = offset;
            offset += line.len() + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let raw: &RawValue = serde_json::from_slice(line).map_err(|e| {
                format!(
                    "line {}: invalid JSON at column {}: {e}",
                    index + 1,
                    e.column()
                )
            })?;
            if !raw.get().starts_with('{') {
                return Err(format!("line {}: expected a JSON object", index + 1));
            }
            events.push(event(
                body.slice(start..start + line.len()).trim_ascii_bytes(),
            ));
        }
        return Ok(events);
    }
    if is_json(content_type) {
        let raw: &RawValue = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "invalid JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            )
        })?;
        let text = raw.get();
        if text.starts_with('{') {
            return Ok(vec![event(Bytes::copy_from_slice(text.as_bytes()))]);
        }
        if text.starts_with('[') {
            let items: Vec<&RawValue> =
                serde_json::from_str(text).map_err(|e| format!("invalid JSON array: {e}"))?;
            return items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    if item.get().starts_with('{') {
                        Ok(event(Bytes::copy_from_slice(item.get().as_bytes())))
                    } else {
                        Err(format!("array element {i} is not a JSON object"))
                    }
                })
                .collect();
        }
        return Err("expected a JSON object or an array of objects".into());
    }
    let mut e = event(body);
    if !content_type.is_empty() {
        e.attributes
            .push(("content_type".into(), content_type.to_string()));
    }
    Ok(vec![e])
}

trait TrimBytes {
    fn trim_ascii_bytes(self) -> Bytes;
}

impl TrimBytes for Bytes {
    fn trim_ascii_bytes(self) -> Bytes {
        let trimmed = self.trim_ascii();
        let start = trimmed.as_ptr() as usize - self.as_ptr() as usize;
        self.slice(start..start + trimmed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(ct: &str, body: &str) -> Result<Vec<String>, String> {
        parse_body("s", ct, Bytes::from(body.to_string()), 0).map(|evs| {
            evs.iter()
                .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
                .collect()
        })
    }

    #[test]
    fn json_object_array_and_ndjson() {
        assert_eq!(
            parse("application/json", r#" {"a":1} "#).unwrap(),
            [r#"{"a":1}"#]
        );
        assert_eq!(
            parse("application/json", r#"[{"a":1}, {"b":2}]"#).unwrap(),
            [r#"{"a":1}"#, r#"{"b":2}"#]
        );
        assert_eq!(
            parse("application/x-ndjson", "{\"a\":1}\r\n\n  {\"b\":2}\n").unwrap(),
            [r#"{"a":1}"#, r#"{"b":2}"#]
        );
    }

    #[test]
    fn bad_json_names_the_line() {
        let err = parse("application/x-ndjson", "{\"a\":1}\n{\"b\":2}\n{\"c\":\n").unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
        let err = parse("application/json", "{\n\"a\": 1,\n\"b\": nope\n}").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(
            parse("application/json", "[1]")
                .unwrap_err()
                .contains("element 0")
        );
        assert!(parse("application/json", "42").is_err());
    }

    #[test]
    fn other_content_is_one_binary_event() {
        let evs = parse_body("cam", "image/jpeg", Bytes::from_static(b"\xff\xd8\xff"), 5).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].payload.as_ref(), b"\xff\xd8\xff");
        assert_eq!(evs[0].attribute("content_type"), Some("image/jpeg"));
        assert_eq!(evs[0].topic, "cam");
    }
}
