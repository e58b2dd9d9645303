//! The packed batch buffer of `wit/silt-plugin-0.2.0` (layout in its
//! `plugin.wit`): the host's half of the codec, `sdk/src/codec.rs` has the
//! guest's.
//!
//! Decoding avoids new allocations per event where it can: a payload the
//! plugin passed through unchanged reuses the input event's `Bytes` (and its
//! topic `String`), any other payload is a slice of the guest's output
//! buffer. Pass-through is the common case (filters, routers, dedup), and
//! it lets the whole output buffer be freed right after decoding instead of
//! being pinned by the batch's events.

use bytes::Bytes;

use crate::event::Event;

/// How many input events past the last reused one to compare against: enough
/// to step over events a filter dropped, few enough that a plugin rewriting
/// every payload pays only a handful of length checks per event.
const LOOKAHEAD: usize = 4;

/// Smallest encoded event: empty topic, ts, no attributes, empty payload.
/// Bounds the up-front reservation so a bogus count cannot allocate much.
const MIN_EVENT_LEN: usize = 4 + 8 + 4 + 4;

/// A batch that cannot cross the boundary. Not retryable: the same batch
/// (or the same plugin output) fails the same way every time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("the batch encodes to {len} bytes, more than the 4 GiB a batch buffer can hold")]
    TooLarge { len: usize },

    #[error("batch buffer ends inside a {what} (needs {need} bytes at offset {at} of {len})")]
    Truncated {
        what: &'static str,
        need: usize,
        at: usize,
        len: usize,
    },

    #[error("{what} at offset {at} is not UTF-8")]
    NotUtf8 { what: &'static str, at: usize },

    #[error("batch buffer has {extra} bytes after its last event")]
    Trailing { extra: usize },
}

/// Encode `events` into `buf` (cleared first; reusing it across calls saves
/// allocating and faulting in a fresh buffer per batch).
pub fn encode_into(events: &[Event], buf: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut len = 4usize;
    for e in events {
        len += 4 + e.topic.len() + 8 + 4 + 4 + e.payload.len();
        for (k, v) in &e.attributes {
            len += 8 + k.len() + v.len();
        }
    }
    // Every count and length is at most the whole buffer's length, so this
    // one check makes the `as u32` casts below lossless.
    if u32::try_from(len).is_err() {
        return Err(CodecError::TooLarge { len });
    }
    buf.clear();
    buf.reserve(len);
    buf.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        put_bytes(buf, e.topic.as_bytes());
        buf.extend_from_slice(&e.ts_ms.to_le_bytes());
        buf.extend_from_slice(&(e.attributes.len() as u32).to_le_bytes());
        for (k, v) in &e.attributes {
            put_bytes(buf, k.as_bytes());
            put_bytes(buf, v.as_bytes());
        }
        put_bytes(buf, &e.payload);
    }
    Ok(())
}

/// Decode a whole buffer; anything but exactly one well-formed batch is an
/// error. `input` is the batch the plugin was given (empty for `tick`); its
/// payloads and topics are reused where the output repeats them.
pub fn decode(buf: Bytes, mut input: Vec<Event>) -> Result<Vec<Event>, CodecError> {
    let mut r = Reader {
        rest: &buf,
        len: buf.len(),
    };
    let count = r.u32("event count")? as usize;
    let mut events = Vec::with_capacity(count.min(r.rest.len() / MIN_EVENT_LEN));
    // Input events before `next` have been reused or skipped over.
    let mut next = 0;
    for _ in 0..count {
        let topic = r.str("topic")?;
        let ts_ms = i64::from_le_bytes(r.array("timestamp")?);
        let n_attrs = r.u32("attribute count")? as usize;
        let mut attributes = Vec::with_capacity(n_attrs.min(r.rest.len() / 8));
        for _ in 0..n_attrs {
            let k = r.str("attribute name")?.to_owned();
            let v = r.str("attribute value")?.to_owned();
            attributes.push((k, v));
        }
        let payload = r.bytes("payload")?;
        let (topic, payload) = match unchanged(&input[next..], payload) {
            Some(i) => {
                let reused = &mut input[next + i];
                next += i + 1;
                let topic = if reused.topic == topic {
                    std::mem::take(&mut reused.topic)
                } else {
                    topic.to_owned()
                };
                (topic, std::mem::take(&mut reused.payload))
            }
            None => (topic.to_owned(), buf.slice_ref(payload)),
        };
        events.push(Event {
            ts_ms,
            topic,
            attributes,
            payload,
        });
    }
    if !r.rest.is_empty() {
        return Err(CodecError::Trailing {
            extra: r.rest.len(),
        });
    }
    Ok(events)
}

/// Position among the next few `input` events of one whose payload equals `payload`.
fn unchanged(input: &[Event], payload: &[u8]) -> Option<usize> {
    input
        .iter()
        .take(LOOKAHEAD)
        .position(|e| e.payload.len() == payload.len() && e.payload[..] == *payload)
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
}

struct Reader<'a> {
    rest: &'a [u8],
    /// Whole buffer length, for error messages.
    len: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, need: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let Some((head, rest)) = self.rest.split_at_checked(need) else {
            return Err(CodecError::Truncated {
                what,
                need,
                at: self.len - self.rest.len(),
                len: self.len,
            });
        };
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let bytes = self.take(N, what)?;
        Ok(bytes.try_into().expect("take returns exactly N bytes"))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    fn str(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let at = self.len - self.rest.len();
        let bytes = self.bytes(what)?;
        std::str::from_utf8(bytes).map_err(|_| CodecError::NotUtf8 { what, at })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn encode(events: &[Event]) -> Bytes {
        let mut buf = Vec::new();
        encode_into(events, &mut buf).unwrap();
        Bytes::from(buf)
    }

    fn sample() -> Vec<Event> {
        let mut tagged = Event::new(-5, "plant/1/temp", &b"{\"t\":21.5}"[..]);
        tagged.attributes = vec![
            ("site".into(), "north".into()),
            ("unit".into(), "\u{b0}C".into()),
        ];
        vec![
            tagged,
            Event::new(i64::MAX, "", Bytes::new()),
            Event::new(0, "bin", vec![0u8, 255, 10, 13]),
        ]
    }

    #[test]
    fn round_trip() {
        let events = sample();
        assert_eq!(decode(encode(&events), Vec::new()).unwrap(), events);
        assert_eq!(decode(encode(&[]), Vec::new()).unwrap(), Vec::new());
    }

    #[test]
    fn new_payloads_share_the_output_buffer() {
        let buf = encode(&sample());
        let range = buf.as_ptr_range();
        for e in decode(buf.clone(), Vec::new()).unwrap() {
            assert!(range.contains(&e.payload.as_ptr()) || e.payload.is_empty());
        }
    }

    #[test]
    fn unchanged_payloads_and_topics_reuse_the_input() {
        let input: Vec<Event> = (0..10)
            .map(|i| Event::new(i, format!("t/{i}"), format!("payload {i}").into_bytes()))
            .collect();
        let payload_ptrs: Vec<_> = input.iter().map(|e| e.payload.as_ptr()).collect();
        let topic_ptrs: Vec<_> = input.iter().map(|e| e.topic.as_ptr()).collect();
        // A filter that drops two events, rewrites one and renames one's topic.
        let mut output: Vec<Event> = input
            .iter()
            .filter(|e| e.ts_ms != 2 && e.ts_ms != 3)
            .cloned()
            .collect();
        output[4].payload = Bytes::from_static(b"rewritten");
        output[5].topic = "renamed".into();
        let buf = encode(&output);
        let range = buf.as_ptr_range();

        let decoded = decode(buf, input).unwrap();
        assert_eq!(decoded, output);
        for (e, src) in decoded.iter().zip([0, 1, 4, 5, 6, 7, 8, 9]) {
            if e.ts_ms == 6 {
                assert!(range.contains(&e.payload.as_ptr()));
            } else {
                assert_eq!(e.payload.as_ptr(), payload_ptrs[src], "event {}", e.ts_ms);
            }
            if e.ts_ms != 6 && e.ts_ms != 7 {
                assert_eq!(e.topic.as_ptr(), topic_ptrs[src], "event {}", e.ts_ms);
            }
        }
    }

    #[test]
    fn reused_buffer_holds_only_the_new_batch() {
        let mut buf = Vec::new();
        encode_into(&sample(), &mut buf).unwrap();
        let one = vec![Event::new(1, "t", &b"x"[..])];
        encode_into(&one, &mut buf).unwrap();
        assert_eq!(decode(Bytes::from(buf), Vec::new()).unwrap(), one);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = encode(&sample());
        for cut in 0..buf.len() {
            let err = decode(buf.slice(..cut), sample()).unwrap_err();
            assert!(
                matches!(err, CodecError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = encode(&sample()).to_vec();
        buf.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode(Bytes::from(buf), Vec::new()).unwrap_err(),
            CodecError::Trailing { extra: 2 }
        );
    }

    #[test]
    fn bad_utf8_is_an_error() {
        let mut buf = encode(&[Event::new(0, "ab", Bytes::new())]).to_vec();
        buf[8] = 0xff;
        assert_eq!(
            decode(Bytes::from(buf), Vec::new()).unwrap_err(),
            CodecError::NotUtf8 {
                what: "topic",
                at: 4
            }
        );
    }

    #[test]
    fn huge_count_is_an_error_not_an_allocation() {
        let err = decode(Bytes::copy_from_slice(&u32::MAX.to_le_bytes()), Vec::new()).unwrap_err();
        assert!(
            matches!(err, CodecError::Truncated { what: "topic", .. }),
            "{err}"
        );
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            ".{0,12}",
            any::<i64>(),
            prop::collection::vec((".{0,6}", ".{0,6}"), 0..3),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(topic, ts_ms, attributes, payload)| Event {
                ts_ms,
                topic,
                attributes,
                payload: payload.into(),
            })
    }

    proptest! {
        #[test]
        fn any_batch_round_trips(events in prop::collection::vec(event(), 0..8)) {
            prop_assert_eq!(decode(encode(&events), Vec::new()).unwrap(), events);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(Bytes::from(bytes), Vec::new());
        }

        #[test]
        fn flipped_bytes_never_panic(
            events in prop::collection::vec(event(), 1..4),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut buf = encode(&events).to_vec();
            for (i, b) in flips {
                let i = i.index(buf.len());
                buf[i] = b;
            }
            let _ = decode(Bytes::from(buf), events);
        }
    }
}
