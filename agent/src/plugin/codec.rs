//! The packed batch buffer of `wit/silt-plugin-0.2.0` (layout in its
//! `plugin.wit`): the host's half of the codec, `sdk/src/codec.rs` has the
//! guest's. Decoded payloads are slices of the guest's output buffer, so
//! lifting a batch out of a plugin copies each payload byte once.

use bytes::Bytes;

use crate::event::Event;

/// Smallest encoded event: empty topic, ts, no attributes, empty payload.
/// Bounds the up-front reservation so a bogus count cannot allocate much.
const MIN_EVENT_LEN: usize = 4 + 8 + 4 + 4;

/// A batch that cannot cross the boundary. Not retryable: the same batch
/// (or the same plugin output) fails the same way every time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("{what} of {len} does not fit the batch buffer's u32 length")]
    TooLarge { what: &'static str, len: usize },

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
    buf.clear();
    buf.reserve(len);
    put_len(buf, events.len(), "event count")?;
    for e in events {
        put_bytes(buf, e.topic.as_bytes(), "topic")?;
        buf.extend_from_slice(&e.ts_ms.to_le_bytes());
        put_len(buf, e.attributes.len(), "attribute count")?;
        for (k, v) in &e.attributes {
            put_bytes(buf, k.as_bytes(), "attribute name")?;
            put_bytes(buf, v.as_bytes(), "attribute value")?;
        }
        put_bytes(buf, &e.payload, "payload")?;
    }
    Ok(())
}

/// Decode a whole buffer; anything but exactly one well-formed batch is an
/// error. Payloads share `buf`'s allocation.
pub fn decode(buf: Bytes) -> Result<Vec<Event>, CodecError> {
    let mut r = Reader {
        rest: &buf,
        len: buf.len(),
    };
    let count = r.u32("event count")? as usize;
    let mut events = Vec::with_capacity(count.min(r.rest.len() / MIN_EVENT_LEN));
    for _ in 0..count {
        let topic = r.string("topic")?;
        let ts_ms = i64::from_le_bytes(r.array("timestamp")?);
        let n_attrs = r.u32("attribute count")? as usize;
        let mut attributes = Vec::with_capacity(n_attrs.min(r.rest.len() / 8));
        for _ in 0..n_attrs {
            let k = r.string("attribute name")?;
            let v = r.string("attribute value")?;
            attributes.push((k, v));
        }
        let payload = buf.slice_ref(r.bytes("payload")?);
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

fn put_len(buf: &mut Vec<u8>, len: usize, what: &'static str) -> Result<(), CodecError> {
    let n = u32::try_from(len).map_err(|_| CodecError::TooLarge { what, len })?;
    buf.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8], what: &'static str) -> Result<(), CodecError> {
    put_len(buf, bytes.len(), what)?;
    buf.extend_from_slice(bytes);
    Ok(())
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

    fn string(&mut self, what: &'static str) -> Result<String, CodecError> {
        let at = self.len - self.rest.len();
        let bytes = self.bytes(what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| CodecError::NotUtf8 { what, at })
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
        assert_eq!(decode(encode(&events)).unwrap(), events);
        assert_eq!(decode(encode(&[])).unwrap(), Vec::new());
    }

    #[test]
    fn payloads_share_the_buffer() {
        let buf = encode(&sample());
        let range = buf.as_ptr_range();
        for e in decode(buf.clone()).unwrap() {
            assert!(range.contains(&e.payload.as_ptr()) || e.payload.is_empty());
        }
    }

    #[test]
    fn reused_buffer_holds_only_the_new_batch() {
        let mut buf = Vec::new();
        encode_into(&sample(), &mut buf).unwrap();
        let one = vec![Event::new(1, "t", &b"x"[..])];
        encode_into(&one, &mut buf).unwrap();
        assert_eq!(decode(Bytes::from(buf)).unwrap(), one);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = encode(&sample());
        for cut in 0..buf.len() {
            let err = decode(buf.slice(..cut)).unwrap_err();
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
            decode(Bytes::from(buf)).unwrap_err(),
            CodecError::Trailing { extra: 2 }
        );
    }

    #[test]
    fn bad_utf8_is_an_error() {
        let mut buf = encode(&[Event::new(0, "ab", Bytes::new())]).to_vec();
        buf[8] = 0xff;
        assert_eq!(
            decode(Bytes::from(buf)).unwrap_err(),
            CodecError::NotUtf8 {
                what: "topic",
                at: 4
            }
        );
    }

    #[test]
    fn huge_count_is_an_error_not_an_allocation() {
        let err = decode(Bytes::copy_from_slice(&u32::MAX.to_le_bytes())).unwrap_err();
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
            prop_assert_eq!(decode(encode(&events)).unwrap(), events);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(Bytes::from(bytes));
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
            let _ = decode(Bytes::from(buf));
        }
    }
}
