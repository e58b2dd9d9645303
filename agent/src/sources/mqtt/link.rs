//! The broker connection, over MQTT 3.1.1 or MQTT 5 (rumqttc's two
//! clients), seen by the rest of the source as one thing: a client that
//! subscribes and acks, an event loop that yields what the source acts on,
//! and [`Message`], a received publish in one shape for both protocols.

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{MqttOptions, QoS, SubscribeReasonCode, Transport};

use super::MqttError;
use crate::config::MqttSourceConfig;
use crate::event::RESERVED_ATTRIBUTE_PREFIX;

/// A received publish.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub pkid: u16,
    pub qos: QoS,
    pub dup: bool,
    /// MQTT 5 user properties, which become event attributes (names
    /// starting with `silt.` are reserved and left out).
    pub properties: Vec<(String, String)>,
    /// Which connection of the event loop it came in on.
    pub connection: u64,
}

/// The PUBACK owed to one committed QoS 1 message.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ack {
    pkid: u16,
    connection: u64,
}

impl Message {
    /// What the broker is owed once this message is committed: nothing at
    /// QoS 0 (a QoS 1 subscription never receives QoS 2).
    pub fn ack(&self) -> Option<Ack> {
        (self.qos == QoS::AtLeastOnce).then_some(Ack {
            pkid: self.pkid,
            connection: self.connection,
        })
    }
}

/// What the source acts on from one poll of the event loop.
pub(super) enum Polled {
    Connected {
        session_present: bool,
    },
    /// A SUBACK; `refused` when the broker refused any of the filters.
    Subscribed {
        refused: bool,
    },
    Message(Message),
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

#[derive(Clone)]
pub(super) enum Client {
    V3(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

pub(super) struct EventLoop {
    inner: Inner,
    /// Counts the connections made; a PUBACK goes only on the connection
    /// its PUBLISH came in on.
    connection: u64,
}

enum Inner {
    V3(Box<rumqttc::EventLoop>),
    /// rumqttc's v5 event loop keeps its connection private: acks go
    /// through the client.
    V5(Box<v5::EventLoop>, v5::AsyncClient),
}

/// The client and its event loop for `config`. Nothing connects until the
/// event loop is polled; the TLS files are read here, so a bad one fails
/// the start.
pub(super) fn build(
    config: &MqttSourceConfig,
    client_id: &str,
    capacity: usize,
) -> Result<(Client, EventLoop), MqttError> {
    let (host, port, tls) = super::parse_broker_url(&config.url).map_err(MqttError::Url)?;
    let transport = if tls { Some(transport(config)?) } else { None };
    let max_packet = config.max_packet_size.as_u64();
    let password = config.password.as_ref().map_or("", |p| p.expose());
    if config.protocol == 5 {
        let mut options = v5::MqttOptions::new(client_id, host, port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(
                u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
            ))
            .set_receive_maximum(config.receive_maximum)
            .set_manual_acks(true)
            .set_keep_alive(config.keep_alive)
            .set_request_channel_capacity(capacity)
            .set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)));
        if let Some(user) = &config.username {
            options.set_credentials(user, password);
        }
        if let Some(transport) = transport {
            options.set_transport(transport);
        }
        let (client, eventloop) = v5::AsyncClient::new(options, capacity);
        let inner = Inner::V5(Box::new(eventloop), client.clone());
        return Ok((Client::V5(client), EventLoop::new(inner)));
    }
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(config.keep_alive)
        .set_request_channel_capacity(capacity);
    options.set_max_packet_size(max_packet as usize, max_packet as usize);
    if let Some(user) = &config.username {
        options.set_credentials(user, password);
    }
    if let Some(transport) = transport {
        options.set_transport(transport);
    }
    let (client, eventloop) = rumqttc::AsyncClient::new(options, capacity);
    Ok((
        Client::V3(client),
        EventLoop::new(Inner::V3(Box::new(eventloop))),
    ))
}

fn transport(config: &MqttSourceConfig) -> Result<Transport, MqttError> {
    crate::tls::provider();
    let Some(ca) = &config.ca_file else {
        return Ok(Transport::tls_with_default_config());
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| MqttError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let client_auth = match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    Ok(Transport::tls(read(ca)?, client_auth, None))
}

impl Client {
    pub fn subscribe(&self, topics: &[String], qos: QoS) -> Result<(), String> {
        match self {
            Client::V3(c) => c
                .try_subscribe_many(
                    topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), qos)),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(
                    topics
                        .iter()
                        .map(|t| v5::mqttbytes::v5::Filter::new(t.clone(), qos5(qos))),
                )
                .map_err(|e| e.to_string()),
        }
    }

    pub fn disconnect(&self) {
        let _ = match self {
            Client::V3(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

fn qos5(qos: QoS) -> QoS5 {
    match qos {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn qos3(qos: QoS5) -> QoS {
    match qos {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl EventLoop {
    fn new(inner: Inner) -> EventLoop {
        EventLoop {
            inner,
            connection: 0,
        }
    }

    /// The next event; an error is a lost connection, to be retried.
    pub async fn poll(&mut self) -> Result<Polled, String> {
        let mut polled = self.poll_inner().await?;
        match &mut polled {
            Polled::Connected { .. } => self.connection += 1,
            Polled::Message(message) => message.connection = self.connection,
            _ => {}
        }
        Ok(polled)
    }

    async fn poll_inner(&mut self) -> Result<Polled, String> {
        match &mut self.inner {
            Inner::V3(el) => {
                use rumqttc::{Event, Outgoing, Packet};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(ack)) => Polled::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::SubAck(ack)) => Polled::Subscribed {
                        refused: ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, SubscribeReasonCode::Failure)),
                    },
                    Event::Incoming(Packet::Publish(p)) => Polled::Message(Message {
                        topic: p.topic,
                        payload: p.payload,
                        pkid: p.pkid,
                        qos: p.qos,
                        dup: p.dup,
                        properties: Vec::new(),
                        connection: 0,
                    }),
                    Event::Outgoing(Outgoing::Disconnect) => Polled::Disconnected,
                    _ => Polled::Other,
                })
            }
            Inner::V5(el, _) => {
                use rumqttc::Outgoing;
                use v5::Event;
                use v5::mqttbytes::v5::{Packet, SubscribeReasonCode as Code};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(ack)) => Polled::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::SubAck(ack)) => Polled::Subscribed {
                        refused: ack
                            .return_codes
                            .iter()
                            .any(|c| !matches!(c, Code::Success(_))),
                    },
                    Event::Incoming(Packet::Publish(p)) => Polled::Message(message5(p)),
                    Event::Outgoing(Outgoing::Disconnect) => Polled::Disconnected,
                    _ => Polled::Other,
                })
            }
        }
    }

    /// Sends the PUBACKs of committed messages, in order, with one write:
    /// rumqttc's manual acks write and flush each on its own, a syscall and
    /// an event loop turn per message. PUBACKs owed on an earlier
    /// connection are not sent: the broker redelivers those messages and
    /// the redelivery marks ack them without storing them again.
    pub async fn send_acks(&mut self, acks: &[Ack]) -> Result<(), String> {
        let mut current = acks.iter().filter(|a| a.connection == self.connection);
        match &mut self.inner {
            Inner::V3(el) => {
                let Some(network) = el.network.as_mut() else {
                    return Ok(());
                };
                for ack in current {
                    let puback = rumqttc::Packet::PubAck(rumqttc::PubAck::new(ack.pkid));
                    network.write(puback).await.map_err(|e| e.to_string())?;
                }
                network.flush().await.map_err(|e| e.to_string())
            }
            Inner::V5(_, client) => current.try_for_each(|ack| {
                let mut publish =
                    v5::mqttbytes::v5::Publish::new("", QoS5::AtLeastOnce, Vec::new(), None);
                publish.pkid = ack.pkid;
                client.try_ack(&publish).map_err(|e| e.to_string())
            }),
        }
    }
}

fn message5(p: v5::mqttbytes::v5::Publish) -> Message {
    let properties = p
        .properties
        .map(|props| props.user_properties)
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| !name.starts_with(RESERVED_ATTRIBUTE_PREFIX))
        .collect();
    Message {
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload,
        pkid: p.pkid,
        qos: qos3(p.qos),
        dup: p.dup,
        properties,
        connection: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v5::mqttbytes::v5::{Publish, PublishProperties};

    #[test]
    fn user_properties_become_attributes_except_reserved_names() {
        let mut publish = Publish::new(
            "plant/7/telemetry",
            QoS5::AtLeastOnce,
            b"{}".to_vec(),
            Some(PublishProperties {
                user_properties: vec![
                    ("site".into(), "plant-7".into()),
                    ("silt.batch".into(), "forged".into()),
                ],
                ..PublishProperties::default()
            }),
        );
        publish.pkid = 9;
        publish.dup = true;
        let m = message5(publish);
        assert_eq!(m.topic, "plant/7/telemetry");
        assert_eq!((m.pkid, m.qos, m.dup), (9, QoS::AtLeastOnce, true));
        assert_eq!(m.properties, [("site".to_string(), "plant-7".to_string())]);
    }
}
