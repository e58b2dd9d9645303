//! A REST catalog's requests go through silt's own HTTP client: a loopback
//! forwarder in front of the catalog. iceberg-catalog-rest 0.10 brings its
//! own reqwest 0.12 with no TLS and no way to sign a request, so HTTPS
//! catalogs (with the sink's `ca_file` trusted, as for its S3 endpoint) and
//! catalogs that require AWS SigV4 (AWS Glue's Iceberg endpoint, S3 Tables)
//! are reached through object_store's client and signer instead. The
//! forwarder lives as long as its catalog.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONNECTION, HOST, HeaderName, TRANSFER_ENCODING};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use object_store::ClientOptions;
use object_store::aws::{AwsAuthorizer, AwsCredentialProvider};
use object_store::client::{HttpClient, HttpConnector, HttpRequest, ReqwestConnector};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::Signing;

/// A running forwarder; dropping it stops it.
pub struct Forwarder {
    /// Where the catalog client sends its requests: `http://127.0.0.1:PORT`.
    pub local_uri: String,
    _stop: DropGuard,
}

/// SigV4 for every request: the service and region, and whose keys.
pub struct Signer {
    pub signing: Signing,
    pub credentials: AwsCredentialProvider,
}

struct Upstream {
    base: String,
    signer: Option<Signer>,
    client: HttpClient,
}

impl Forwarder {
    /// Listens on a loopback port and forwards to `upstream` (the catalog's
    /// URI, the part before `/v1/`) with a client built from `options`,
    /// signing every request when there is a `signer`.
    pub async fn start(
        upstream: &str,
        options: ClientOptions,
        signer: Option<Signer>,
    ) -> Result<Forwarder, String> {
        crate::tls::provider();
        let options = options.with_allow_http(upstream.starts_with("http://"));
        let client = ReqwestConnector::default()
            .connect(&options)
            .map_err(|e| format!("HTTP client for {upstream}: {e}"))?;
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .map_err(|e| format!("loopback listener for the catalog's requests: {e}"))?;
        let local_uri = format!(
            "http://{}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let upstream = std::sync::Arc::new(Upstream {
            base: upstream.trim_end_matches('/').to_string(),
            signer,
            client,
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, upstream, stop.clone()));
        Ok(Forwarder {
            local_uri,
            _stop: stop.drop_guard(),
        })
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    upstream: std::sync::Arc<Upstream>,
    stop: CancellationToken,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "REST catalog forwarder: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.cancelled() => break,
        };
        let upstream = upstream.clone();
        let service = service_fn(move |req| {
            let upstream = upstream.clone();
            async move { Ok::<_, Infallible>(upstream.forward(req).await) }
        });
        connections.spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
    connections.shutdown().await;
}

impl Upstream {
    async fn forward(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.try_forward(req).await {
            Ok(response) => response,
            Err(message) => {
                let mut response = Response::new(Full::new(Bytes::from(message)));
                *response.status_mut() = StatusCode::BAD_GATEWAY;
                response
            }
        }
    }

    async fn try_forward(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, String> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading the catalog client's request: {e}"))?
            .to_bytes();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request: HttpRequest = Request::builder()
            .method(parts.method)
            .uri(format!("{}{path}", self.base))
            .body(body.into())
            .map_err(|e| format!("request to {}: {e}", self.base))?;
        for (name, value) in &parts.headers {
            // A signed request carries the signature, not the client's token.
            let replaced = self.signer.is_some() && name == AUTHORIZATION;
            if !is_hop_by_hop(name) && !replaced {
                request.headers_mut().append(name, value.clone());
            }
        }
        if let Some(signer) = &self.signer {
            let credential = signer
                .credentials
                .get_credential()
                .await
                .map_err(|e| format!("AWS credentials for SigV4: {e}"))?;
            AwsAuthorizer::new(&credential, &signer.signing.name, &signer.signing.region)
                .try_authorize(&mut request, None)
                .map_err(|e| format!("SigV4 signing: {e}"))?;
        }
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| format!("{}: {e}", self.base))?;
        let (parts, body) = response.into_parts();
        let body = body
            .bytes()
            .await
            .map_err(|e| format!("reading {}'s reply: {e}", self.base))?;
        let mut reply = Response::new(Full::new(body));
        *reply.status_mut() = parts.status;
        for (name, value) in &parts.headers {
            if !is_hop_by_hop(name) {
                reply.headers_mut().append(name, value.clone());
            }
        }
        Ok(reply)
    }
}

/// Headers that belong to one connection, or that the client sets.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == HOST
        || name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == hyper::header::CONTENT_LENGTH
        || name.as_str() == "keep-alive"
}
