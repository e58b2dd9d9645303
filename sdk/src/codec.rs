//! The packed batch buffer of `wit/silt-plugin-0.2.0` (layout in its
//! `plugin.wit`): the guest's half of the codec, the agent has the other.

use crate::pool::Pool;
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
    // Every count and length is at most the whole buffer's length, so this
    // one check makes the `as u32` casts below lossless.
    if u32::try_from(len).is_err() {
        return Err(Error::new(format!(
            "the output batch encodes to {len} bytes, more than the 4 GiB a batch can hold"
        )));
    }
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        put_bytes(&mut buf, e.topic.as_bytes());
        buf.extend_from_slice(&e.ts_ms.to_le_bytes());
        buf.extend_from_slice(&(e.attributes.len() as u32).to_le_bytes());
        for (k, v) in &e.attributes {
            put_bytes(&mut buf, k.as_bytes());
            put_bytes(&mut buf, v.as_bytes());
        }
        put_bytes(&mut buf, &e.payload);
    }
    Ok(buf)
}

#[inline(always)]
fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// Decode a whole buffer; anything but exactly one well-formed batch is an
/// error. Topic and payload buffers come from `pool` where it has some.
pub(crate) fn decode(buf: &[u8], pool: &mut Pool) -> Result<Vec<Event>, Error> {
    let mut r = Reader {
        buf,
        pos: 0,
        failure: Failure::Truncated(""),
    };
    let at = |r: &Reader| format!("at offset {} of {}", r.pos, buf.len());
    match r.batch(pool) {
        Some(events) if r.pos == buf.len() => Ok(events),
        Some(_) => Err(Error::new(format!(
            "batch buffer has {} bytes after its last event",
            buf.len() - r.pos
        ))),
        None => Err(Error::new(match r.failure {
            Failure::Truncated(what) => format!("batch buffer ends inside a {what} {}", at(&r)),
            Failure::NotUtf8(what) => format!("batch buffer's {what} {} is not UTF-8", at(&r)),
        })),
    }
}

/// Why decoding stopped. The hot path only passes `Option`s around (cheap
/// in wasm, where a `Result` carrying a message goes through memory); the
/// reader notes the reason for the error message on the way out.
enum Failure {
    Truncated(&'static str),
    NotUtf8(&'static str),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    failure: Failure,
}

impl<'a> Reader<'a> {
    fn batch(&mut self, pool: &mut Pool) -> Option<Vec<Event>> {
        let count = self.u32("event count")? as usize;
        let room = (self.buf.len() - self.pos) / MIN_EVENT_LEN;
        let mut events = Vec::with_capacity(count.min(room));
        for _ in 0..count {
            let topic = self.string("topic", pool.topic())?;
            let ts_ms = i64::from_le_bytes(self.array("timestamp")?);
            let n_attrs = self.u32("attribute count")? as usize;
            let mut attributes = Vec::with_capacity(n_attrs.min((self.buf.len() - self.pos) / 8));
            for _ in 0..n_attrs {
                let k = self.string("attribute name", Vec::new())?;
                let v = self.string("attribute value", Vec::new())?;
                attributes.push((k, v));
            }
            let mut payload = pool.payload();
            payload.extend_from_slice(self.bytes("payload")?);
            events.push(Event {
                topic,
                ts_ms,
                attributes,
                payload,
            });
        }
        Some(events)
    }

    #[inline(always)]
    fn take(&mut self, n: usize, what: &'static str) -> Option<&'a [u8]> {
        match self.buf[self.pos..].get(..n) {
            Some(bytes) => {
                self.pos += n;
                Some(bytes)
            }
            None => {
                self.failure = Failure::Truncated(what);
                None
            }
        }
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self, what: &'static str) -> Option<[u8; N]> {
        self.take(N, what)?.try_into().ok()
    }

    #[inline(always)]
    fn u32(&mut self, what: &'static str) -> Option<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    #[inline(always)]
    fn bytes(&mut self, what: &'static str) -> Option<&'a [u8]> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    #[inline(always)]
    fn string(&mut self, what: &'static str, mut buf: Vec<u8>) -> Option<String> {
        let start = self.pos;
        buf.extend_from_slice(self.bytes(what)?);
        match String::from_utf8(buf) {
            Ok(s) => Some(s),
            Err(_) => {
                self.pos = start;
                self.failure = Failure::NotUtf8(what);
                None
            }
        }
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
        assert_eq!(
            decode(&encode(&events).unwrap(), &mut Pool::new()).unwrap(),
            events
        );
        assert_eq!(
            decode(&encode(&[]).unwrap(), &mut Pool::new()).unwrap(),
            Vec::new()
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = encode(&sample()).unwrap();
        for cut in 0..buf.len() {
            let err = decode(&buf[..cut], &mut Pool::new()).unwrap_err();
            assert!(err.message().contains("ends inside"), "cut {cut}: {err}");
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = encode(&sample()).unwrap();
        buf.push(0);
        assert!(
            decode(&buf, &mut Pool::new())
                .unwrap_err()
                .message()
                .contains("after its last event")
        );
    }

    #[test]
    fn bad_utf8_and_huge_counts_are_errors() {
        let mut buf = encode(&[Event::new("ab", 0, Vec::new())]).unwrap();
        buf[8] = 0xff;
        assert!(
            decode(&buf, &mut Pool::new())
                .unwrap_err()
                .message()
                .contains("not UTF-8")
        );

        let err = decode(&u32::MAX.to_le_bytes(), &mut Pool::new()).unwrap_err();
        assert!(err.message().contains("ends inside"), "{err}");
    }
}
