//! The NDJSON form of events shared by dead-letter files and
//! `silt plugin test`, so a dead-lettered batch can be replayed with
//! `silt plugin test PLUGIN.wasm --input FILE`. One event per line:
//!
//! ```json
//! {"ts_ms":1700000000000,"topic":"sensors/a","attributes":{"site":"north"},"payload":{"t":21.5}}
//! {"ts_ms":1700000000001,"topic":"cam/1","payload_b64":"/9j/4AAQ"}
//! ```
//!
//! * `payload` holds the payload verbatim when it is exactly one JSON value
//!   without surrounding whitespace or line breaks; any other payload is
//!   written as standard base64 in `payload_b64`. Either way the bytes round
//!   trip exactly.
//! * `attributes` keeps order and is left out when empty.
//! * On input `ts_ms` and `attributes` are optional, and lines that are
//!   blank or carry a `dead_letter` key (dead-letter headers) are skipped.

use std::fmt;
use std::io::{self, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::event::Event;

#[derive(Serialize)]
struct LineOut<'a> {
    ts_ms: i64,
    topic: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty", serialize_with = "ser_pairs")]
    attributes: &'a [(String, String)],
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn {
    topic: String,
    #[serde(default)]
    ts_ms: Option<i64>,
    #[serde(default, deserialize_with = "de_pairs")]
    attributes: Vec<(String, String)>,
    // `default` + a non-Option deserializer keeps a literal `null` payload
    // instead of reading it as "absent".
    #[serde(default, deserialize_with = "de_raw")]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    payload_b64: Option<String>,
}

#[derive(Deserialize)]
struct HeaderProbe {
    #[serde(default)]
    dead_letter: Option<IgnoredAny>,
}

/// Write `event` as one line, newline included.
pub(crate) fn write_event(out: &mut dyn Write, event: &Event) -> io::Result<()> {
    let raw = verbatim_json(&event.payload);
    let line = LineOut {
        ts_ms: event.ts_ms,
        topic: &event.topic,
        attributes: &event.attributes,
        payload: raw,
        payload_b64: raw.is_none().then(|| B64.encode(&event.payload)),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

/// Parse one input line. `Ok(None)` for lines to skip; events without
/// `ts_ms` get `default_ts`.
pub(crate) fn parse_line(line: &str, default_ts: i64) -> Result<Option<Event>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let probe: HeaderProbe = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if probe.dead_letter.is_some() {
        return Ok(None);
    }
    let l: LineIn = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let payload = match (l.payload, l.payload_b64) {
        (Some(raw), None) => Bytes::copy_from_slice(raw.get().as_bytes()),
        (None, Some(b64)) => B64
            .decode(b64.trim())
            .map(Bytes::from)
            .map_err(|e| format!("payload_b64 is not valid base64: {e}"))?,
        (Some(_), Some(_)) => return Err("give either payload or payload_b64, not both".into()),
        (None, None) => return Err("missing payload (JSON) or payload_b64 (base64)".into()),
    };
    Ok(Some(Event {
        ts_ms: l.ts_ms.unwrap_or(default_ts),
        topic: l.topic,
        attributes: l.attributes,
        payload,
    }))
}

fn verbatim_json(payload: &[u8]) -> Option<&RawValue> {
    if payload.contains(&b'\n') || payload.contains(&b'\r') {
        return None;
    }
    let raw: &RawValue = serde_json::from_slice(payload).ok()?;
    (raw.get().len() == payload.len()).then_some(raw)
}

fn ser_pairs<S: Serializer>(pairs: &&[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs.iter() {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

fn de_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Pairs;
    impl<'de> Visitor<'de> for Pairs {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of string values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(pair) = map.next_entry::<String, String>()? {
                out.push(pair);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Pairs)
}

fn de_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(e: &Event) -> String {
        let mut buf = Vec::new();
        write_event(&mut buf, e).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn json_payload_is_inline_and_round_trips() {
        let mut e = Event::new(5, "a/b", &br#"{"z":1,"a":[true,null]}"#[..]);
        e.attributes = vec![("z".into(), "1".into()), ("a".into(), "2".into())];
        let l = line(&e);
        assert_eq!(
            l,
            "{\"ts_ms\":5,\"topic\":\"a/b\",\"attributes\":{\"z\":\"1\",\"a\":\"2\"},\"payload\":{\"z\":1,\"a\":[true,null]}}\n"
        );
        assert_eq!(parse_line(&l, 0).unwrap(), Some(e));
    }

    #[test]
    fn other_payloads_use_base64_and_round_trip() {
        for payload in [
            &b"\xff\x00binary"[..],
            b"{\"a\":1}\n",
            b" 1",
            b"",
            b"not json",
        ] {
            let e = Event::new(1, "t", payload.to_vec());
            let l = line(&e);
            assert!(l.contains("payload_b64"), "{l}");
            assert_eq!(parse_line(&l, 0).unwrap(), Some(e));
        }
    }

    #[test]
    fn input_defaults_and_skips() {
        let e = parse_line(r#"{"topic":"t","payload":null}"#, 42)
            .unwrap()
            .unwrap();
        assert_eq!((e.ts_ms, &e.payload[..]), (42, &b"null"[..]));
        assert_eq!(parse_line("   ", 0).unwrap(), None);
        assert_eq!(
            parse_line(r#"{"dead_letter":{"plugin":"x"}}"#, 0).unwrap(),
            None
        );
    }

    #[test]
    fn input_errors_are_specific() {
        let err = parse_line(r#"{"topic":"t"}"#, 0).unwrap_err();
        assert!(err.contains("missing payload"), "{err}");
        let err = parse_line(r#"{"topic":"t","payload":1,"extra":2}"#, 0).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let err = parse_line(r#"{"topic":"t","payload_b64":"!!"}"#, 0).unwrap_err();
        assert!(err.contains("base64"), "{err}");
    }
}
