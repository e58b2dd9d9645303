//! The packed batch buffer of `wit/silt-plugin-0.2.0` (layout in its
//! `plugin.wit`): the guest's half of the codec, the agent has the other.

use crate::{Error, Event};

/// Smallest encoded event: empty topic, ts, no attributes, empty payload.
/// Bounds the up-front reservation so a bogus count cannot allocate much.
const MIN_EVENT_LEN: usize = 4 + 8 + 4 + 4;

/// Encode `events` into one freshly allocated buffer of exactly the right size.
pub(crate) fn encode(events: &[Event]) -> Result<Vec<u8>, Error> {
    let mut len = 4usize;
    for e in events {
        len += 4 + e.topic.len() + 8 + 4 + 4 + e.payload.len();
        for (k, v) in &e.attributes {
            len += 8 + k.len() + v.len();
        }
    }
    let mut buf = Vec::with_capacity(len);
    put_len(&mut buf, events.len(), "event count")?;
    for e in events {
        put_bytes(&mut buf, e.topic.as_bytes(), "topic")?;
        buf.extend_from_slice(&e.ts_ms.to_le_bytes());
        put_len(&mut buf, e.attributes.len(), "attribute count")?;
        for (k, v) in &e.attributes {
            put_bytes(&mut buf, k.as_bytes(), "attribute name")?;
            put_bytes(&mut buf, v.as_bytes(), "attribute value")?;
        }
        put_bytes(&mut buf, &e.payload, "payload")?;
    }
    Ok(buf)
}

/// Decode a whole buffer; anything but exactly one well-formed batch is an error.
pub(crate) fn decode(buf: &[u8]) -> Result<Vec<Event>, Error> {
    let mut r = Reader {
        rest: buf,
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
        let payload = r.bytes("payload")?.to_vec();
        events.push(Event {
            topic,
            ts_ms,
            attributes,
            payload,
        });
    }
    if !r.rest.is_empty() {
        return Err(Error::new(format!(
            "batch buffer has {} bytes after its last event",
            r.rest.len()
        )));
    }
    Ok(events)
}

fn put_len(buf: &mut Vec<u8>, n: usize, what: &str) -> Result<(), Error> {
    let n = u32::try_from(n)
        .map_err(|_| Error::new(format!("{what} {n} does not fit the batch buffer's u32")))?;
    buf.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8], what: &str) -> Result<(), Error> {
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
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        let Some((head, rest)) = self.rest.split_at_checked(n) else {
            return Err(Error::new(format!(
                "batch buffer ends inside a {what} (needs {n} bytes at offset {} of {})",
                self.len - self.rest.len(),
                self.len
            )));
        };
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        let bytes = self.take(N, what)?;
        Ok(bytes.try_into().expect("take returns exactly N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], Error> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    fn string(&mut self, what: &str) -> Result<String, Error> {
        let at = self.len - self.rest.len();
        let bytes = self.bytes(what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| Error::new(format!("{what} at offset {at} is not UTF-8: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Event> {
        let mut tagged = Event::new("plant/1/temp", -5, b"{\"t\":21.5}".to_vec());
        tagged.set_attr("site", "north");
        tagged.set_attr("unit", "\u{b0}C");
        vec![
            tagged,
            Event::new("", i64::MAX, Vec::new()),
            Event::new("bin", 0, vec![0, 255, 10, 13]),
        ]
    }

    #[test]
    fn round_trip() {
        let events = sample();
        assert_eq!(decode(&encode(&events).unwrap()).unwrap(), events);
        assert_eq!(decode(&encode(&[]).unwrap()).unwrap(), Vec::new());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = encode(&sample()).unwrap();
        for cut in 0..buf.len() {
            let err = decode(&buf[..cut]).unwrap_err();
            assert!(err.message().contains("ends inside"), "cut {cut}: {err}");
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = encode(&sample()).unwrap();
        buf.push(0);
        assert!(
            decode(&buf)
                .unwrap_err()
                .message()
                .contains("after its last event")
        );
    }

    #[test]
    fn bad_utf8_and_huge_counts_are_errors() {
        let mut buf = encode(&[Event::new("ab", 0, Vec::new())]).unwrap();
        buf[8] = 0xff;
        assert!(decode(&buf).unwrap_err().message().contains("not UTF-8"));

        let err = decode(&u32::MAX.to_le_bytes()).unwrap_err();
        assert!(err.message().contains("ends inside"), "{err}");
    }
}
