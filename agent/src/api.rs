//! The admin listener (`[api] listen`): `GET /metrics` (Prometheus text),
//! `GET /healthz` (200 while the process runs) and `GET /readyz` (200 when
//! every MQTT source is connected and no sink's backlog is older than
//! `api.ready_max_backlog_age`, else 503 with the reasons as JSON).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ApiConfig;
use crate::metrics::Metrics;
use crate::spool::Spool;

type Reply = Response<Full<Bytes>>;

struct State {
    metrics: Arc<Metrics>,
    spool: Spool,
    max_backlog_age: Duration,
}

pub struct ApiServer {
    listener: TcpListener,
    state: Arc<State>,
}

impl ApiServer {
    pub async fn bind(
        config: &ApiConfig,
        metrics: Arc<Metrics>,
        spool: Spool,
    ) -> std::io::Result<ApiServer> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(ApiServer {
            listener,
            state: Arc::new(State {
                metrics,
                spool,
                max_backlog_age: config.ready_max_backlog_age,
            }),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown`; requests are short, so open connections are
    /// cut rather than drained. On return none is left holding the spool.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(addr = ?self.local_addr(), "admin api listening (/metrics, /healthz, /readyz)");
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, _) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin api accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                _ = shutdown.cancelled() => break,
            };
            let state = self.state.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.handle(&req)) }
            });
            connections.spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
        connections.shutdown().await;
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, content_type.parse().expect("static header"));
    resp
}

fn json(status: StatusCode, body: serde_json::Value) -> Reply {
    reply(status, "application/json", body.to_string())
}

impl State {
    fn handle(&self, req: &Request<Incoming>) -> Reply {
        let path = req.uri().path();
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "unknown path; try /metrics, /healthz or /readyz" }),
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "use GET" }),
            );
            resp.headers_mut()
                .insert(ALLOW, "GET, HEAD".parse().expect("static header"));
            return resp;
        }
        match path {
            "/metrics" => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.render(&self.spool),
            ),
            "/healthz" => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
            _ => {
                let reasons = self.metrics.not_ready(&self.spool, self.max_backlog_age);
                if reasons.is_empty() {
                    json(StatusCode::OK, serde_json::json!({ "ready": true }))
                } else {
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({ "ready": false, "reasons": reasons }),
                    )
                }
            }
        }
    }
}
