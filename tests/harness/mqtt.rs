//! QoS 1 MQTT publisher (rumqttc) that records exactly which messages the
//! broker PUBACKed.
//!
//! rumqttc hands out packet ids 1..=inflight and reuses an id only after its
//! PUBACK, emitting `Outgoing::Publish(pkid)` in request order; so a FIFO of
//! queued message indexes maps each pkid to its message, and a PUBACK to the
//! message it acknowledges. The publisher never reconnects: whatever was not
//! PUBACKed when the connection ends counts as not acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use super::payload::{Body, binary_event, json_event};

#[derive(Debug, Clone)]
pub struct Msg {
    pub id: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Msg {
    /// What the lake must hold for this message.
    pub fn body(&self) -> Body {
        match serde_json::from_slice::<serde_json::Value>(&self.payload) {
            Ok(v) => Body::Json(v),
            Err(_) => Body::Binary(self.payload.clone()),
        }
    }
}

/// `n` messages with ids `{prefix}-{i}`, round-robin over `topics`, every
/// `binary_every`-th one binary (0 = none), ~`size` bytes each.
pub fn messages(
    prefix: &str,
    n: usize,
    topics: &[&str],
    binary_every: usize,
    size: usize,
) -> Vec<Msg> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let topic = topics[i % topics.len()].to_string();
            let payload = if binary_every > 0 && i % binary_every == binary_every - 1 {
                binary_event(&id, size)
            } else {
                serde_json::to_vec(&json_event(&id, i as u64, size)).unwrap()
            };
            Msg { id, topic, payload }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct PubOpts {
    /// Max unacknowledged QoS 1 publishes (rumqttc inflight window).
    pub inflight: u16,
    /// Messages per second; None = as fast as the broker acks.
    pub rate: Option<u32>,
    /// How long to wait for outstanding PUBACKs after the last publish.
    pub ack_wait: Duration,
}

impl Default for PubOpts {
    fn default() -> Self {
        PubOpts {
            inflight: 500,
            rate: None,
            ack_wait: Duration::from_secs(60),
        }
    }
}

/// Live counters, readable while the publisher runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicUsize,
    pub acked: AtomicUsize,
    pub stop: AtomicBool,
}

#[derive(Debug)]
pub struct PubReport {
    /// Ids of the messages the broker PUBACKed.
    pub acked: Vec<String>,
    /// When the PUBACK of each of `acked` arrived, in the same order.
    pub acked_at: Vec<Instant>,
    /// Messages handed to the client.
    pub sent: usize,
    /// Why the connection ended early, if it did.
    pub error: Option<String>,
    pub elapsed: Duration,
}

impl PubReport {
    /// Ids whose PUBACK arrived before `t`.
    pub fn acked_before(&self, t: Instant) -> Vec<String> {
        self.acked
            .iter()
            .zip(&self.acked_at)
            .filter(|(_, at)| **at < t)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn rate(&self) -> f64 {
        self.acked.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Default)]
struct State {
    fifo: VecDeque<usize>,
    inflight: HashMap<u16, usize>,
    /// When each message's PUBACK was processed.
    acked: Vec<Option<Instant>>,
    error: Option<String>,
    ended: bool,
}

/// Starts publishing `msgs` in a task; returns the live counters and the
/// handle yielding the report.
pub fn spawn_publisher(
    port: u16,
    client_id: &str,
    msgs: Vec<Msg>,
    opts: PubOpts,
) -> (Arc<Progress>, tokio::task::JoinHandle<PubReport>) {
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    let cid = client_id.to_string();
    let h = tokio::spawn(async move { publish(port, &cid, msgs, opts, p).await });
    (progress, h)
}

pub async fn publish(
    port: u16,
    client_id: &str,
    msgs: Vec<Msg>,
    opts: PubOpts,
    progress: Arc<Progress>,
) -> PubReport {
    let t0 = Instant::now();
    let mut mo = MqttOptions::new(client_id, "127.0.0.1", port);
    mo.set_keep_alive(Duration::from_secs(30));
    mo.set_clean_session(true);
    mo.set_inflight(opts.inflight.max(1));
    mo.set_max_packet_size(32 << 20, 32 << 20);
    let (client, mut el) = AsyncClient::new(mo, 256);
    let st = Arc::new(Mutex::new(State {
        acked: vec![None; msgs.len()],
        ..Default::default()
    }));

    let st2 = st.clone();
    let prog2 = progress.clone();
    let el_task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut s = st2.lock().unwrap();
                    if let Some(i) = s.fifo.pop_front() {
                        s.inflight.insert(pkid, i);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    let now = Instant::now();
                    let mut s = st2.lock().unwrap();
                    if let Some(i) = s.inflight.remove(&a.pkid)
                        && s.acked[i].is_none()
                    {
                        s.acked[i] = Some(now);
                        prog2.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    st2.lock().unwrap().error = Some(e.to_string());
                    break;
                }
            }
        }
        st2.lock().unwrap().ended = true;
        drop(el); // closes the request channel: pending publish() calls fail
    });

    let mut sent = 0usize;
    for (i, m) in msgs.iter().enumerate() {
        if progress.stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(rate) = opts.rate {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
            if Instant::now() < due {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        st.lock().unwrap().fifo.push_back(i);
        if client
            .publish(m.topic.clone(), QoS::AtLeastOnce, false, m.payload.clone())
            .await
            .is_err()
        {
            st.lock().unwrap().fifo.pop_back();
            break;
        }
        sent += 1;
        progress.sent.fetch_add(1, Ordering::Relaxed);
    }

    // Wait for every PUBACK (or the connection to end, or ack_wait).
    let end = Instant::now() + opts.ack_wait;
    loop {
        {
            let s = st.lock().unwrap();
            if s.ended || progress.acked.load(Ordering::Relaxed) >= sent {
                break;
            }
        }
        if Instant::now() >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    // If the event loop is stuck, leave it: the counters are final.
    let _ = tokio::time::timeout(Duration::from_secs(5), el_task).await;
    let s = st.lock().unwrap();
    let (acked, acked_at): (Vec<String>, Vec<Instant>) = msgs
        .iter()
        .zip(&s.acked)
        .filter_map(|(m, a)| Some((m.id.clone(), (*a)?)))
        .unzip();
    let mut error = s.error.clone();
    if error.is_none() && acked.len() < sent {
        error = Some(format!(
            "{} of {sent} publishes not acked within {:?}",
            sent - acked.len(),
            opts.ack_wait
        ));
    }
    PubReport {
        acked,
        acked_at,
        sent,
        error,
        elapsed: t0.elapsed(),
    }
}
