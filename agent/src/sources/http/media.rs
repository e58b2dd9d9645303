//! `PUT /v1/media/{stream}/{name}[?attr=value...]`: a media upload streamed
//! to a file (never whole in memory), fsynced, then referenced in the spool
//! for every raw sink reading this source; 201 only after both.
//!
//! A client that disconnects midway gets nothing stored: the partial file
//! is removed and no reference is committed.

use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};

use super::{Handler, Reply, error_reply, idempotency, idempotency_key, stored_reply};
use crate::event::{Event, MEDIA_ATTRIBUTE, RESERVED_ATTRIBUTE_PREFIX, now_ms};
use crate::media::{MediaRef, ReceiveError};

impl Handler {
    pub(super) async fn handle_media(&self, req: Request<Incoming>, path: &str) -> Reply {
        let Some((stream, name)) = path
            .split_once('/')
            .filter(|(s, n)| segment_ok(s) && segment_ok(n))
        else {
            return error_reply(
                StatusCode::NOT_FOUND,
                "PUT media to /v1/media/{stream}/{name}, each one non-empty path segment",
            );
        };
        let (stream, name) = (stream.to_string(), name.to_string());
        if let Some(refused) = self.refuse(&req, Method::PUT) {
            return refused;
        }
        let targets = self.ingest.media_sinks(&self.name).to_vec();
        if targets.is_empty() {
            return error_reply(
                StatusCode::NOT_FOUND,
                format!(
                    "no raw sink reads source `{}`: add it to the inputs of a sink with format = \"raw\"",
                    self.name
                ),
            );
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_media) {
            return self.media_error(&ReceiveError::TooLarge {
                max: self.max_media,
            });
        }
        // The file lands beside the spool: keep the same free-disk floor.
        if self.ingest.refuses_appends() || self.ingest.disk_short(declared.unwrap_or(0)) {
            return self.not_committed(&crate::spool::SpoolError::Full.into());
        }
        let key = match idempotency_key(&req) {
            Ok(key) => key,
            Err(refused) => return *refused,
        };
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        let mut attributes: Vec<(String, String)> = req
            .uri()
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let query = req.uri().query().unwrap_or("").to_string();
        attributes.retain(|(k, _)| !k.starts_with(RESERVED_ATTRIBUTE_PREFIX));
        // A verified certificate's subject wins over a query parameter of
        // the same name, so a client cannot claim another's identity.
        if let Some(id) = super::client_id(&req) {
            attributes.retain(|(k, _)| k != super::CLIENT_ID_ATTRIBUTE);
            attributes.push((super::CLIENT_ID_ATTRIBUTE.into(), id));
        }

        let body = self.limits.pace(req.into_body()).into_stream();
        let dir = self.ingest.media_dir();
        let floor = |more: u64| !self.ingest.disk_short(more);
        let received = match dir.receive(body, self.max_media, floor).await {
            Ok(received) => received,
            Err(e) => return self.media_error(&e),
        };
        // A repeat is known only once its bytes are: the digest covers them.
        let pending = match key {
            Some(key) => {
                let request: [&[u8]; 5] = [
                    stream.as_bytes(),
                    name.as_bytes(),
                    query.as_bytes(),
                    content_type.as_bytes(),
                    received.sha256.as_bytes(),
                ];
                match self.begin_keyed(&key, &request) {
                    Ok(pending) => Some(pending),
                    Err(reply) => {
                        let _ = std::fs::remove_file(&received.path);
                        return *reply;
                    }
                }
            }
            None => None,
        };
        let sink_names: Vec<&str> = targets.iter().map(|(_, n)| n.as_str()).collect();
        let files = match dir.commit(&received, &sink_names) {
            Ok(files) => files,
            Err(source) => {
                let _ = std::fs::remove_file(&received.path);
                return self.media_error(&ReceiveError::Disk {
                    path: received.path.clone(),
                    source,
                });
            }
        };
        let ts_ms = now_ms();
        let groups = targets
            .iter()
            .zip(&files)
            .map(|((sink, _), file)| {
                let media = MediaRef {
                    file: file.clone(),
                    size: received.size,
                    sha256: received.sha256.clone(),
                    content_type: content_type.clone(),
                };
                let mut event = Event::new(
                    ts_ms,
                    stream.clone(),
                    serde_json::to_vec(&media).expect("serialisable"),
                );
                event.attributes = attributes.clone();
                event.attributes.extend([
                    ("stream".to_string(), stream.clone()),
                    ("name".to_string(), name.clone()),
                    ("content_type".to_string(), content_type.clone()),
                    (MEDIA_ATTRIBUTE.to_string(), "1".to_string()),
                ]);
                (vec![*sink], vec![event])
            })
            .collect();
        let mut body = serde_json::json!({
            "stream": stream, "name": name,
            "size": received.size, "sha256": received.sha256,
        });
        let created = idempotency::Reply {
            status: StatusCode::CREATED.as_u16(),
            body: body.to_string(),
        };
        let marks = pending.as_ref().map_or(Vec::new(), |p| p.marks(&created));
        let committed = self.ingest.ingest_media(&self.name, groups, marks).await;
        let dropped = committed.as_ref().is_ok_and(|o| o.dropped_new > 0);
        if committed.is_err() || dropped {
            for file in &files {
                dir.remove(file);
            }
        }
        match committed {
            Ok(_) if dropped => {
                body["dropped"] = true.into();
                super::json_reply(StatusCode::CREATED, body)
            }
            Ok(_) => {
                if let Some(pending) = pending {
                    pending.committed(&created);
                }
                stored_reply(&created, false)
            }
            Err(e) => self.not_committed(&e),
        }
    }

    fn media_error(&self, e: &ReceiveError) -> Reply {
        let status = match e {
            ReceiveError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ReceiveError::Body { .. } => {
                tracing::info!(source = %self.name, error = %e, "media upload broke off; nothing stored");
                StatusCode::BAD_REQUEST
            }
            ReceiveError::DiskShort { .. } => {
                tracing::warn!(source = %self.name, error = %e, "media upload refused midway");
                StatusCode::INSUFFICIENT_STORAGE
            }
            ReceiveError::Disk { .. } => {
                tracing::error!(source = %self.name, error = %e, "media upload not stored");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut resp = error_reply(status, e.to_string());
        if e.is_retryable() {
            resp.headers_mut()
                .insert(RETRY_AFTER, "1".parse().expect("static header"));
        }
        resp
    }
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && s != "." && s != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments() {
        assert!(segment_ok("cam-1"));
        assert!(!segment_ok(""));
        assert!(!segment_ok(".."));
        assert!(!segment_ok("a/b"));
    }
}
