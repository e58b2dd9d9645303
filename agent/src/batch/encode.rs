//! Turning a batch of events into the bytes of one object.
//!
//! The output is a pure function of the events, the agent id and the
//! compression and its level, so a batch re-uploaded after a crash is byte-identical.

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
    out.extend_from_slice(&rfc3339_ms_bytes(event.ts_ms));
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
    String::from_utf8(rfc3339_ms_bytes(ts_ms).to_vec()).expect("ASCII digits and separators")
}

/// [`rfc3339_ms`] without an allocation or `fmt`: it runs once per event.
fn rfc3339_ms_bytes(ts_ms: i64) -> [u8; 24] {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ts_ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, t.year().clamp(0, 9999) as u32);
    put(5, 2, u8::from(t.month()).into());
    put(8, 2, t.day().into());
    put(11, 2, t.hour().into());
    put(14, 2, t.minute().into());
    put(17, 2, t.second().into());
    put(20, 3, t.millisecond().into());
    out
}

fn compress(plain: Vec<u8>, compression: Compression, level: u32) -> Vec<u8> {
    match compression {
        // Validation keeps snappy to Parquet sinks.
        Compression::None | Compression::Snappy => plain,
        Compression::Gzip => {
            // libdeflate compresses a whole buffer (our batches are one) at
            // about half zlib-rs's CPU for the same level, and writes mtime
            // 0, keeping the output deterministic.
            let level = libdeflater::CompressionLvl::new(level as i32)
                .expect("config validation keeps gzip levels in 1-9");
            let mut compressor = libdeflater::Compressor::new(level);
            let mut out = vec![0; compressor.gzip_compress_bound(plain.len())];
            let len = compressor
                .gzip_compress(&plain, &mut out)
                .expect("the output buffer has the bound's size");
            out.truncate(len);
            out
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
    fn timestamps_render_as_rfc3339_with_milliseconds() {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let mut ts: i64 = 0;
        for step in [1, 7, 999, 86_399_999, 1_000_003_001] {
            for _ in 0..500 {
                let t = time::OffsetDateTime::from_unix_timestamp_nanos(ts as i128 * 1_000_000)
                    .unwrap();
                assert_eq!(rfc3339_ms(ts), t.format(&fmt).unwrap(), "ts_ms {ts}");
                ts += step;
            }
        }
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_496_858_005), "2026-11-24T05:07:38.005Z");
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
