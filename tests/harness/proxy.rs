//! A TCP proxy that, once armed, swallows one reply or ack (see [`Trap`])
//! and reports it, so a test can SIGKILL the agent exactly inside a window:
//! the server did the work, the agent was never told.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// What a [`Proxy`] swallows once armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// In front of s3s-fs: the first reply starting with `HTTP/1.1 200`;
    /// the object is written but the agent never hears so (the window
    /// between upload and complete). The connection is dropped.
    S3Ok,
    /// In front of mosquitto: the first PUBACK the agent sends, and all it
    /// sends after it; the message is committed but the broker still owns it
    /// (the window between commit and ack).
    MqttPuback,
    /// In front of an HTTP server: the reply to the first request whose
    /// request line starts with this prefix, e.g. an Iceberg REST commit
    /// (`POST /v1/namespaces/ns/tables/t`). The server has applied the
    /// request; the agent waits for a reply that never comes.
    HttpReplyTo(&'static str),
}

type Armed = Arc<Mutex<Option<oneshot::Sender<()>>>>;

pub struct Proxy {
    pub port: u16,
    trap: Armed,
}

/// Length of the first complete MQTT packet in `buf`, if there is one.
fn mqtt_packet_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let total = 1 + i + 1 + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

impl Proxy {
    pub async fn start(upstream: u16, kind: Trap) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let trap: Armed = Arc::default();
        let t = trap.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, kind, t.clone()));
            }
        });
        Proxy { port, trap }
    }

    /// Arms the trap; the receiver fires when it caught something.
    pub fn arm(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        *self.trap.lock().unwrap() = Some(tx);
        rx
    }

    pub fn disarm(&self) {
        self.trap.lock().unwrap().take();
    }
}

fn is_armed(trap: &Armed) -> bool {
    trap.lock().unwrap().is_some()
}

fn spring(trap: &Armed) -> bool {
    match trap.lock().unwrap().take() {
        Some(tx) => {
            let _ = tx.send(());
            true
        }
        None => false,
    }
}

async fn relay(client: tokio::net::TcpStream, upstream: u16, kind: Trap, trap: Armed) {
    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Set by the agent -> upstream side when it forwarded the request whose
    // reply is to be swallowed.
    let reply_wanted = Arc::new(AtomicBool::new(false));
    let (t2, wanted) = (trap.clone(), reply_wanted.clone());
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        let mut swallowing = false;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if kind != Trap::MqttPuback {
                if let Trap::HttpReplyTo(prefix) = kind
                    && buf[..n].starts_with(prefix.as_bytes())
                    && is_armed(&t2)
                {
                    wanted.store(true, Ordering::SeqCst);
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                continue;
            }
            pending.extend_from_slice(&buf[..n]);
            let mut out = Vec::new();
            while let Some(len) = mqtt_packet_len(&pending) {
                let packet: Vec<u8> = pending.drain(..len).collect();
                if !swallowing && packet[0] >> 4 == 4 {
                    swallowing = spring(&t2);
                }
                if !swallowing {
                    out.extend_from_slice(&packet);
                }
            }
            if !out.is_empty() && sw.write_all(&out).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut swallowing = false;
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match kind {
            Trap::S3Ok if buf[..n].starts_with(b"HTTP/1.1 200") && spring(&trap) => {
                break; // swallow the reply, drop the connection
            }
            Trap::HttpReplyTo(_)
                if !swallowing && reply_wanted.load(Ordering::SeqCst) && spring(&trap) =>
            {
                // Keep the connection open and silent: the agent waits.
                swallowing = true;
            }
            _ => {}
        }
        if !swallowing && cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if swallowing {
        // The upstream closed after its reply; hold the agent's side open
        // until it gives up or is killed.
        let _ = up.await;
    } else {
        up.abort();
    }
}
