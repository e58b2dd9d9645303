//! Turning a batch of events into the bytes of one object.
//!
//! The output is a pure function of the events, the agent id and the
//! compression and its level, so a batch re-uploaded after a crash is byte-identical.

use std::io::Write;

use base64::Engine;
use serde_json::value::RawValue;

use crate::config::Compression;
use crate::event::Event;

/// NDJSON, one line per event, then compressed at `level` (gzip 1-9,
/// zstd 1-19; ignored without compression).
pub fn encode_ndjson(
    events: &[Event],
    agent: &str,
    compression: Compression,
    level: u32,
) -> Vec<u8> {
    let mut plain = Vec::with_capacity(events.iter().map(|e| e.payload.len() + 96).sum());
    for event in events {
        write_line(&mut plain, event, agent);
    }
    compress(plain, compression, level)
}

fn write_line(out: &mut Vec<u8>, event: &Event, agent: &str) {
    out.extend_from_slice(b"{\"ts\":\"");
    out.extend_from_slice(rfc3339_ms(event.ts_ms).as_bytes());
    out.extend_from_slice(b"\",\"topic\":");
    serde_json::to_writer(&mut *out, &event.topic).expect("writing to a Vec");
    out.extend_from_slice(b",\"agent\":");
    serde_json::to_writer(&mut *out, agent).expect("writing to a Vec");
    match json_payload(&event.payload) {
        Some(json) => {
            out.extend_from_slice(b",\"payload\":");
            out.extend_from_slice(json.as_bytes());
        }
        None => {
            out.extend_from_slice(b",\"payload_b64\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&event.payload)
                    .as_bytes(),
            );
            out.push(b'"');
        }
    }
    out.extend_from_slice(b"}\n");
}

/// The payload as one line of JSON, if it is JSON at all. Compact payloads
/// are copied as they are; pretty-printed ones are re-serialised so the
/// object stays one event per line.
fn json_payload(payload: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let raw: &RawValue = serde_json::from_slice(payload).ok()?;
    let text = raw.get();
    if text.contains(['\n', '\r']) {
        let value: serde_json::Value = serde_json::from_str(text).ok()?;
        return Some(value.to_string().into());
    }
    Some(text.into())
}

/// `2026-11-24T05:46:38.123Z`
pub fn rfc3339_ms(ts_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ts_ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn compress(plain: Vec<u8>, compression: Compression, level: u32) -> Vec<u8> {
    match compression {
        // Validation keeps snappy to Parquet sinks.
        Compression::None | Compression::Snappy => plain,
        Compression::Gzip => {
            // GzEncoder writes mtime 0, keeping the output deterministic.
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(plain.len() / 4),
                flate2::Compression::new(level),
            );
            enc.write_all(&plain).expect("writing to a Vec");
            enc.finish().expect("writing to a Vec")
        }
        Compression::Zstd => {
            zstd::encode_all(plain.as_slice(), level as i32).expect("writing to a Vec")
        }
    }
}

/// `Content-Type` and `Content-Encoding` of an encoded object.
pub fn content_headers(compression: Compression) -> (&'static str, Option<&'static str>) {
    let encoding = match compression {
        Compression::None | Compression::Snappy => None,
        Compression::Gzip => Some("gzip"),
        Compression::Zstd => Some("zstd"),
    };
    ("application/x-ndjson", encoding)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn ev(payload: &[u8]) -> Event {
        Event::new(1_795_496_858_123, "sensors/a", payload.to_vec())
    }

    #[test]
    fn json_payloads_are_embedded_and_binary_is_base64() {
        let out = encode_ndjson(
            &[
                ev(br#"{"t":21.5}"#),
                ev(b"\x00\xffraw"),
                ev(b"{\n  \"pretty\": true\n}"),
            ],
            "gw-01",
            Compression::None,
            0,
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"ts":"2026-11-24T05:07:38.123Z","topic":"sensors/a","agent":"gw-01","payload":{"t":21.5}}"#
        );
        assert_eq!(
            lines[1],
            r#"{"ts":"2026-11-24T05:07:38.123Z","topic":"sensors/a","agent":"gw-01","payload_b64":"AP9yYXc="}"#
        );
        assert!(
            lines[2].ends_with(r#""payload":{"pretty":true}}"#),
            "{}",
            lines[2]
        );
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn compressed_output_is_deterministic_and_decodes_at_every_level() {
        let events = vec![ev(br#"{"a":1}"#); 100];
        let plain = encode_ndjson(&events, "x", Compression::None, 0);
        for (c, levels) in [(Compression::Gzip, 1..=9), (Compression::Zstd, 1..=19)] {
            for level in levels {
                let a = encode_ndjson(&events, "x", c, level);
                assert_eq!(a, encode_ndjson(&events, "x", c, level));
                let decoded = match c {
                    Compression::Gzip => {
                        let mut s = Vec::new();
                        flate2::read::GzDecoder::new(a.as_slice())
                            .read_to_end(&mut s)
                            .unwrap();
                        s
                    }
                    _ => zstd::decode_all(a.as_slice()).unwrap(),
                };
                assert_eq!(decoded, plain, "{c:?} level {level}");
            }
        }
    }

    #[test]
    fn a_lower_gzip_level_is_a_different_but_equivalent_object() {
        let events: Vec<Event> = (0..500)
            .map(|i| {
                ev(
                    format!(r#"{{"pump":{},"temp_c":{}.{}}}"#, i % 7, 20 + i % 9, i % 10)
                        .as_bytes(),
                )
            })
            .collect();
        let fast = encode_ndjson(&events, "x", Compression::Gzip, 1);
        let small = encode_ndjson(&events, "x", Compression::Gzip, 9);
        assert_ne!(fast, small);
        assert!(
            small.len() <= fast.len(),
            "{} > {}",
            small.len(),
            fast.len()
        );
    }
}
