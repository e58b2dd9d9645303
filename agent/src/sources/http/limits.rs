//! What one client may hold: a connection slot, time to send a request's
//! head, and a body that keeps moving. A slow or silent client is cut, so a
//! few hundred of them cannot take every file descriptor of the agent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::HttpSourceConfig;

/// The smallest read buffer hyper accepts.
const MIN_READ_BUFFER: usize = 8 * 1024;
/// Largest read buffer per connection: room for a request's head and a
/// few body frames; a body beyond it waits in the socket, not in memory.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// The reply to a client over `max_connections`, written straight to the
/// socket: no hyper connection, no task, no buffer is spent on it.
const BUSY_REPLY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: 63\r\n\r\n{\"error\":\"too many connections open; retry in a second or two\"}";

#[derive(Debug, Clone)]
pub(super) struct Limits {
    pub header_timeout: Duration,
    body_idle: Duration,
    min_rate: u64,
    /// hyper's read buffer cap: at most `max_body`, within hyper's bounds.
    pub read_buffer: usize,
    slots: Arc<Semaphore>,
}

impl Limits {
    pub fn new(config: &HttpSourceConfig) -> Limits {
        let max_body = usize::try_from(config.max_body.as_u64()).unwrap_or(usize::MAX);
        Limits {
            header_timeout: config.header_timeout,
            body_idle: config.body_idle_timeout,
            min_rate: config.min_body_rate.as_u64().max(1),
            read_buffer: max_body.clamp(MIN_READ_BUFFER, MAX_READ_BUFFER),
            slots: Arc::new(Semaphore::new(config.max_connections)),
        }
    }

    /// A connection slot, held for the connection's life; None when all
    /// are taken.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Answers a connection over the cap with 503 and closes it. The reply
    /// fits an empty socket buffer, so one non-blocking write sends it; if
    /// it does not, the close alone tells the client.
    pub fn refuse(stream: tokio::net::TcpStream) {
        let _ = stream.try_write(BUSY_REPLY);
    }

    pub fn pace(&self, body: Incoming) -> PacedBody {
        PacedBody {
            body,
            started: Instant::now(),
            received: 0,
            idle: self.body_idle,
            min_rate: self.min_rate,
        }
    }
}

/// Why a body was not read to its end.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("the body is larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error(
        "the body sent {received} bytes in {elapsed:?}: below the source's min_body_rate or silent for body_idle_timeout; nothing was stored"
    )]
    TooSlow { received: u64, elapsed: Duration },
    #[error("reading the body failed after {received} bytes: {message}")]
    Broken { received: u64, message: String },
}

/// A request body that must keep moving: each frame has to arrive within
/// `body_idle_timeout`, and the body as a whole must average `min_body_rate`
/// after a first `body_idle_timeout` of grace.
pub(super) struct PacedBody {
    body: Incoming,
    started: Instant,
    received: u64,
    idle: Duration,
    min_rate: u64,
}

impl PacedBody {
    /// The next data frame; None at the end of the body.
    pub async fn next_data(&mut self) -> Option<Result<Bytes, BodyError>> {
        loop {
            let frame = match tokio::time::timeout_at(self.deadline(), self.body.frame()).await {
                Err(_) => {
                    return Some(Err(BodyError::TooSlow {
                        received: self.received,
                        elapsed: self.started.elapsed(),
                    }));
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    return Some(Err(BodyError::Broken {
                        received: self.received,
                        message: e.to_string(),
                    }));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            // Trailers carry nothing silt keeps.
            if let Ok(data) = frame.into_data() {
                self.received += data.len() as u64;
                return Some(Ok(data));
            }
        }
    }

    /// The whole body, refused past `max` bytes.
    pub async fn collect(mut self, max: u64) -> Result<Bytes, BodyError> {
        let mut parts = Vec::new();
        while let Some(data) = self.next_data().await {
            parts.push(data?);
            if self.received > max {
                return Err(BodyError::TooLarge { max });
            }
        }
        Ok(match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Bytes::from(parts.concat()),
        })
    }

    /// The body as a stream of data frames, for bodies written to disk.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, BodyError>> + Unpin {
        Box::pin(futures::stream::unfold(self, |mut body| async move {
            body.next_data().await.map(|data| (data, body))
        }))
    }

    fn deadline(&self) -> Instant {
        let next_frame = Instant::now() + self.idle;
        let average = self.started
            + self.idle
            + Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        next_frame.min(average)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn busy_reply_declares_its_length() {
        let reply = std::str::from_utf8(super::BUSY_REPLY).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
