//! MQTT source: subscribe with a persistent session and acknowledge each
//! QoS 1 message only after it is committed to the spool.
//!
//! Two tasks: the event loop task keeps the connection alive and forwards
//! publishes; the committer groups them, commits, then acks. Until the ack
//! the broker owns the message, so a crash or a full spool loses nothing: it
//! is redelivered on the next session.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod redelivery;

use crate::config::MqttSourceConfig;
use crate::event::{Event, now_ms};
use crate::metrics::Metrics;
use crate::spool::{Mark, SpoolError};
use crate::transform::Ingest;
use crate::transform::IngestError;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
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

/// Connection options for `config`; reads the CA file when TLS is used.
fn options(config: &MqttSourceConfig, client_id: &str) -> Result<MqttOptions, MqttError> {
    let (host, port, tls) = parse_broker_url(&config.url).map_err(MqttError::Url)?;
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(config.keep_alive)
        // Acks for everything the broker may have in flight must fit, or
        // the committer would wait on the event loop it feeds.
        .set_request_channel_capacity(u16::MAX as usize + COMMIT_GROUP);
    let max_packet = config.max_packet_size.as_u64() as usize;
    options.set_max_packet_size(max_packet, max_packet);
    if let Some(user) = &config.username {
        options.set_credentials(user, config.password.clone().unwrap_or_default());
    }
    if tls {
        let transport = match &config.ca_file {
            Some(path) => {
                let ca = std::fs::read(path).map_err(|source| MqttError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                Transport::tls(ca, None, None)
            }
            None => Transport::tls_with_default_config(),
        };
        options.set_transport(transport);
    }
    Ok(options)
}

pub struct MqttSource {
    name: String,
    config: MqttSourceConfig,
    options: MqttOptions,
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
        Ok(MqttSource {
            name: name.to_string(),
            options: options(&config, &client_id)?,
            config,
            ingest,
            metrics,
        })
    }

    /// Runs until `shutdown`; then commits and acks what was received and
    /// disconnects, leaving the rest with the broker. A group the spool
    /// cannot take (full, failed disk) is given up at `shutdown` unacked.
    pub async fn run(self, shutdown: CancellationToken) {
        let (client, eventloop) = AsyncClient::new(self.options, u16::MAX as usize + COMMIT_GROUP);
        let (tx, rx) = mpsc::channel(COMMIT_GROUP * 2);
        let committer_done = CancellationToken::new();
        let committer = tokio::spawn(commit_loop(
            self.name.clone(),
            self.config.topic_fields.clone(),
            self.ingest.clone(),
            client.clone(),
            rx,
            shutdown.clone(),
            committer_done.clone(),
        ));
        let qos = if self.config.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let conn = Connection {
            name: &self.name,
            topics: &self.config.topics,
            qos,
            reconnect_max: self.config.reconnect_max,
            client: &client,
            metrics: &self.metrics,
        };
        conn.drive(eventloop, tx, &shutdown, committer_done).await;
        let _ = committer.await;
    }
}

struct Connection<'a> {
    name: &'a str,
    topics: &'a [String],
    qos: QoS,
    reconnect_max: Duration,
    client: &'a AsyncClient,
    metrics: &'a Metrics,
}

impl Connection<'_> {
    async fn drive(
        &self,
        mut eventloop: EventLoop,
        tx: mpsc::Sender<Publish>,
        shutdown: &CancellationToken,
        committer_done: CancellationToken,
    ) {
        let mut tx = Some(tx);
        let mut failures = 0u32;
        loop {
            let polled = tokio::select! {
                polled = eventloop.poll() => polled,
                _ = shutdown.cancelled(), if tx.is_some() => {
                    // Closing the channel lets the committer finish its last
                    // group; we keep polling so its acks reach the broker.
                    tx = None;
                    continue;
                }
                _ = committer_done.cancelled(), if tx.is_none() => break,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    self.metrics.mqtt_connected(self.name, true);
                    tracing::info!(
                        source = self.name,
                        session_present = ack.session_present,
                        "mqtt connected"
                    );
                    let filters = self
                        .topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), self.qos));
                    if let Err(e) = self.client.try_subscribe_many(filters) {
                        tracing::error!(source = self.name, error = %e, "mqtt subscribe request failed");
                    }
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        tracing::error!(source = self.name, topics = ?self.topics, "broker refused a subscription; check the topic filters and ACLs");
                    } else {
                        tracing::info!(source = self.name, topics = ?self.topics, "mqtt subscribed");
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                    // After shutdown began, unacked messages stay with the broker.
                    if let Some(tx) = &tx
                        && tx.send(publish).await.is_err()
                    {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
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
        self.metrics.mqtt_connected(self.name, false);
        let _ = self.client.try_disconnect();
        let flush = async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    }
}

async fn commit_loop(
    source: String,
    topic_fields: Vec<String>,
    ingest: Ingest,
    client: AsyncClient,
    mut rx: mpsc::Receiver<Publish>,
    stop: CancellationToken,
    done: CancellationToken,
) {
    let mut group = Vec::with_capacity(COMMIT_GROUP);
    let mut redelivery = load_marks(&source, &ingest);
    while rx.recv_many(&mut group, COMMIT_GROUP).await > 0 {
        let filtered = redelivery.filter(&group, now_ms());
        if filtered.redelivered > 0 {
            tracing::info!(
                source,
                messages = filtered.redelivered,
                "mqtt redeliveries of messages already committed; acked, not stored again"
            );
        }
        let mut events = filtered.events;
        for event in &mut events {
            event
                .attributes
                .extend(topic_attributes(&topic_fields, &event.topic));
        }
        if !commit(&source, &ingest, events, filtered.marks, &stop).await {
            tracing::warn!(
                source,
                messages = group.len(),
                "stopping with mqtt messages the spool did not take; left unacked with the broker"
            );
            break;
        }
        if let (Some(first), Some(last)) = (group.first(), group.last()) {
            tracing::debug!(
                source,
                messages = group.len(),
                first_pkid = first.pkid,
                last_pkid = last.pkid,
                "mqtt group committed; acking"
            );
        }
        for publish in group.drain(..) {
            if publish.qos != QoS::AtMostOnce
                && let Err(e) = client.ack(&publish).await
            {
                tracing::warn!(source, error = %e, "mqtt ack not sent; the broker will redeliver");
            }
        }
    }
    done.cancel();
}

/// The redelivery marks a previous run committed. Without them a
/// redelivery would be stored twice, never lost, so a spool that cannot be
/// read here is logged and the source goes on.
fn load_marks(source: &str, ingest: &Ingest) -> redelivery::Redelivery {
    let read = |tree: String| {
        ingest.marks(&tree).unwrap_or_else(|e| {
            tracing::error!(source, tree, error = %e, "cannot read mqtt redelivery marks; redeliveries of messages committed before the restart may be stored twice");
            Vec::new()
        })
    };
    redelivery::Redelivery::new(
        source,
        read(redelivery::page_tree(source)),
        read(redelivery::legacy_tree(source)),
    )
}

/// Attributes named by `topic_fields` from the topic's segments, in order.
fn topic_attributes(topic_fields: &[String], topic: &str) -> Vec<(String, String)> {
    topic_fields
        .iter()
        .zip(topic.split('/'))
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, segment)| (name.clone(), segment.to_string()))
        .collect()
}

/// Commits one group, waiting out a full spool or a failing disk: the
/// broker keeps the messages meanwhile because they are not acked. False
/// when `stop` came first: nothing of the group was stored.
async fn commit(
    source: &str,
    ingest: &Ingest,
    events: Vec<Event>,
    marks: Vec<Mark>,
    stop: &CancellationToken,
) -> bool {
    let mut waited = false;
    loop {
        if waited && stop.is_cancelled() {
            return false;
        }
        match ingest
            .ingest_marked(source, events.clone(), marks.clone())
            .await
        {
            Ok(_) => {
                if waited {
                    tracing::info!(source, "spool accepts events again; mqtt acks resume");
                }
                return true;
            }
            Err(IngestError::Spool(SpoolError::Full)) => {
                if !waited {
                    tracing::warn!(
                        source,
                        "spool full: holding mqtt acks, the broker keeps the messages"
                    );
                }
                tokio::select! {
                    _ = ingest.space_freed(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => {}
                }
            }
            Err(e) => {
                tracing::error!(source, error = %e, "cannot commit mqtt messages; retrying in 1s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
        waited = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_fields_name_segments() {
        let fields = ["site".to_string(), "".to_string(), "metric".to_string()];
        assert_eq!(
            topic_attributes(&fields, "plant-1/pump-7/temp/extra"),
            [
                ("site".to_string(), "plant-1".to_string()),
                ("metric".to_string(), "temp".to_string())
            ]
        );
        assert_eq!(topic_attributes(&fields, "plant-1").len(), 1);
    }

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
