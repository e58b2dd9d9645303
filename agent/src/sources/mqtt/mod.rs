//! MQTT source: subscribe with a persistent session and acknowledge each
//! QoS 1 message only after it is committed to the spool.
//!
//! Two tasks: the event loop task keeps the connection alive and forwards
//! publishes; the committer groups them, commits, then acks. Until the ack
//! the broker owns the message, so a crash or a full spool loses nothing: it
//! is redelivered on the next session.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

mod committer;
mod link;
mod redelivery;

use crate::config::MqttSourceConfig;
use crate::metrics::Metrics;
use crate::transform::Ingest;
use committer::{Committer, Incoming};
use link::{Ack, Client, EventLoop, Message, Polled};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot read TLS file {path}: {source}; it must exist and be readable by silt's user")]
    TlsFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid broker url: {0}")]
    Url(String),
}

/// Host, port and whether TLS is used, from `mqtt://host:port` / `mqtts://`.
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let tls = match parsed.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => {
            return Err(format!(
                "scheme `{other}` is not supported: use mqtt:// or mqtts://"
            ));
        }
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("`{url}` has no host"))?;
    let port = parsed.port().unwrap_or(if tls { 8883 } else { 1883 });
    Ok((host.trim_matches(['[', ']']).to_string(), port, tls))
}

pub struct MqttSource {
    name: String,
    config: MqttSourceConfig,
    client: Client,
    eventloop: EventLoop,
    ingest: Ingest,
    metrics: Arc<Metrics>,
}

/// Publishes committed in one spool append, at most.
const COMMIT_GROUP: usize = 2048;

impl MqttSource {
    /// Prepares the connection (reads the CA file) without connecting, so a
    /// start fails before anything runs.
    pub fn new(
        name: &str,
        config: MqttSourceConfig,
        agent: &str,
        ingest: Ingest,
        metrics: Arc<Metrics>,
    ) -> Result<MqttSource, MqttError> {
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("silt-{agent}-{name}"));
        // Acks for everything the broker may have in flight must fit, or
        // the committer would wait on the event loop it feeds.
        let (client, eventloop) =
            link::build(&config, &client_id, u16::MAX as usize + COMMIT_GROUP)?;
        Ok(MqttSource {
            name: name.to_string(),
            client,
            eventloop,
            config,
            ingest,
            metrics,
        })
    }

    /// Runs until `shutdown`; then commits and acks what was received and
    /// disconnects, leaving the rest with the broker. A group the spool
    /// cannot take (full, failed disk) is given up at `shutdown` unacked.
    pub async fn run(self, shutdown: CancellationToken) {
        let client = self.client;
        let (tx, rx) = mpsc::channel(COMMIT_GROUP * 2);
        // Unbounded so the committer never waits on the connection task,
        // which may be waiting on it; the in-flight byte budget bounds it.
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let committer_done = CancellationToken::new();
        let committer = Committer {
            source: self.name.clone(),
            topic_fields: self.config.topic_fields.clone(),
            ingest: self.ingest.clone(),
            acks: acks_tx,
            stop: shutdown.clone(),
        };
        let committer = tokio::spawn(committer.run(rx, committer_done.clone()));
        let qos = if self.config.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let budget = self.config.max_inflight_bytes.as_u64() as usize;
        let conn = Connection {
            name: &self.name,
            budget: Arc::new(Semaphore::new(budget)),
            budget_max: budget,
            topics: &self.config.topics,
            qos,
            reconnect_max: self.config.reconnect_max,
            client: &client,
            metrics: &self.metrics,
        };
        conn.drive(self.eventloop, tx, acks, &shutdown, committer_done)
            .await;
        let _ = committer.await;
    }
}

struct Connection<'a> {
    name: &'a str,
    /// Bytes of received messages the committer may hold (`max_inflight_bytes`).
    budget: Arc<Semaphore>,
    budget_max: usize,
    topics: &'a [String],
    qos: QoS,
    reconnect_max: Duration,
    client: &'a Client,
    metrics: &'a Metrics,
}

impl Connection<'_> {
    /// Asks for the configured subscriptions on the current connection
    /// (again on every connect: a broker without the session forgot them).
    fn subscribe(&self) {
        if let Err(e) = self.client.subscribe(self.topics, self.qos) {
            tracing::error!(source = self.name, error = %e, "mqtt subscribe request failed");
        }
    }

    /// Takes `message`'s share of the in-flight byte budget. While the
    /// committer holds the rest this waits, and so reads nothing more from
    /// the broker, which keeps the messages. `None` once nothing is acked
    /// any more (the source stops).
    async fn hold(
        &self,
        message: &Message,
        paused_at: &mut Option<std::time::Instant>,
    ) -> Option<OwnedSemaphorePermit> {
        let cost = (message.payload.len() + message.topic.len()).clamp(1, self.budget_max) as u32;
        if let Ok(held) = self.budget.clone().try_acquire_many_owned(cost) {
            return Some(held);
        }
        if paused_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *paused_at = Some(std::time::Instant::now());
            tracing::info!(
                source = self.name,
                budget = self.budget_max,
                "mqtt in-flight byte budget used up: reading from the broker paused until the spool takes what was received"
            );
        }
        self.budget.clone().acquire_many_owned(cost).await.ok()
    }

    /// Sends `owed` and every ack already waiting behind it.
    async fn send_acks(
        &self,
        eventloop: &mut EventLoop,
        mut owed: Vec<Ack>,
        acks: &mut mpsc::UnboundedReceiver<Vec<Ack>>,
    ) {
        while let Ok(more) = acks.try_recv() {
            owed.extend(more);
        }
        if let Err(e) = eventloop.send_acks(&owed).await {
            tracing::warn!(source = self.name, acks = owed.len(), error = %e, "mqtt acks not sent; the broker will redeliver");
        }
    }

    async fn drive(
        &self,
        mut eventloop: EventLoop,
        tx: mpsc::Sender<Incoming>,
        mut acks: mpsc::UnboundedReceiver<Vec<Ack>>,
        shutdown: &CancellationToken,
        committer_done: CancellationToken,
    ) {
        let mut tx = Some(tx);
        let mut failures = 0u32;
        let mut connected = false;
        let mut subscribe = false;
        // While the committer removes the marks of a lost broker session,
        // nothing is subscribed: no message of the new session can arrive.
        let mut forgetting: Option<oneshot::Receiver<()>> = None;
        let mut paused_at = None;
        loop {
            if connected && subscribe && forgetting.is_none() {
                subscribe = false;
                self.subscribe();
            }
            let polled = tokio::select! {
                polled = eventloop.poll() => polled,
                forgotten = async { forgetting.as_mut().expect("guarded").await }, if forgetting.is_some() => {
                    forgetting = None;
                    // Without a committer nothing could be acked.
                    subscribe &= forgotten.is_ok();
                    continue;
                }
                Some(owed) = acks.recv() => {
                    self.send_acks(&mut eventloop, owed, &mut acks).await;
                    continue;
                }
                _ = shutdown.cancelled(), if tx.is_some() => {
                    // Closing the channel lets the committer finish its last
                    // group; we keep polling so its acks reach the broker.
                    tx = None;
                    continue;
                }
                _ = committer_done.cancelled(), if tx.is_none() => break,
            };
            match polled {
                Ok(Polled::Connected { session_present }) => {
                    failures = 0;
                    connected = true;
                    self.metrics.mqtt_connected(self.name, true);
                    tracing::info!(source = self.name, session_present, "mqtt connected");
                    let Some(tx) = &tx else { continue };
                    subscribe = true;
                    if !session_present {
                        let (done, forgotten) = oneshot::channel();
                        if tx
                            .send(Incoming::NewSession { forgotten: done })
                            .await
                            .is_err()
                        {
                            break;
                        }
                        forgetting = Some(forgotten);
                    }
                }
                Ok(Polled::Subscribed { refused }) => {
                    if refused {
                        tracing::error!(source = self.name, topics = ?self.topics, "broker refused a subscription; check the topic filters and ACLs");
                    } else {
                        tracing::info!(source = self.name, topics = ?self.topics, "mqtt subscribed");
                    }
                }
                Ok(Polled::Message(message)) => {
                    // After shutdown began, unacked messages stay with the broker.
                    let Some(tx) = &tx else { continue };
                    let Some(held) = self.hold(&message, &mut paused_at).await else {
                        break;
                    };
                    if tx.send(Incoming::Message(message, held)).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    connected = false;
                    self.metrics.mqtt_connected(self.name, false);
                    if tx.is_none() {
                        break;
                    }
                    let delay = Duration::from_millis(100)
                        .saturating_mul(1 << failures.min(10))
                        .min(self.reconnect_max);
                    failures += 1;
                    tracing::warn!(source = self.name, error = %e, retry_in = ?delay, "mqtt connection lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => { tx = None; }
                    }
                }
            }
        }
        if let Ok(owed) = acks.try_recv() {
            self.send_acks(&mut eventloop, owed, &mut acks).await;
        }
        self.metrics.mqtt_connected(self.name, false);
        self.client.disconnect();
        let flush = async {
            while let Ok(polled) = eventloop.poll().await {
                if matches!(polled, Polled::Disconnected) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.example").unwrap(),
            ("broker.example".into(), 8883, true)
        );
        assert!(
            parse_broker_url("http://x:1")
                .unwrap_err()
                .contains("mqtt://")
        );
        assert!(parse_broker_url("nonsense").is_err());
    }
}
