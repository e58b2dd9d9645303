//! The on-disk encoding of one spooled event.
//!
//! Layout (little endian): `crc32 u32 | version u8 | ts_ms i64 | topic |
//! attribute count u32 | (key, value)* | payload`, where each string or byte
//! field is a `u32` length followed by the bytes. The checksum covers
//! everything after it, so a torn or bit-flipped record is detected instead
//! of being uploaded as garbage.

use bytes::Bytes;

use crate::event::Event;

const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {0} bytes, shorter than any valid record")]
    TooShort(usize),
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record version {0} is not known to this silt; upgrade silt or export the spool")]
    Version(u8),
    #[error("record is truncated inside its {0} field")]
    Truncated(&'static str),
    #[error("record {0} field is not UTF-8")]
    NotUtf8(&'static str),
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
}

pub fn encode(event: &Event) -> Vec<u8> {
    let attrs_len: usize = event
        .attributes
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    let mut out =
        Vec::with_capacity(HEADER + 12 + event.topic.len() + attrs_len + event.payload.len());
    out.extend_from_slice(&[0; 4]);
    out.push(VERSION);
    out.extend_from_slice(&event.ts_ms.to_le_bytes());
    put_bytes(&mut out, event.topic.as_bytes());
    out.extend_from_slice(&(event.attributes.len() as u32).to_le_bytes());
    for (k, v) in &event.attributes {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    put_bytes(&mut out, &event.payload);
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

pub fn decode(raw: &[u8]) -> Result<Event, DecodeError> {
    if raw.len() < HEADER {
        return Err(DecodeError::TooShort(raw.len()));
    }
    let stored = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&raw[4..]);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    if raw[4] != VERSION {
        return Err(DecodeError::Version(raw[4]));
    }
    let ts_ms = i64::from_le_bytes(raw[5..13].try_into().expect("8 bytes"));
    let mut r = Reader {
        buf: &raw[HEADER..],
    };
    let topic = r.string("topic")?;
    let count = r.u32("attribute count")?;
    let mut attributes = Vec::with_capacity(count.min(1024) as usize);
    for _ in 0..count {
        attributes.push((r.string("attribute key")?, r.string("attribute value")?));
    }
    let payload = Bytes::copy_from_slice(r.bytes("payload")?);
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing(r.buf.len()));
    }
    Ok(Event {
        ts_ms,
        topic,
        attributes,
        payload,
    })
}

/// The timestamp of an encoded record, without decoding the rest.
pub fn timestamp(raw: &[u8]) -> Option<i64> {
    raw.get(5..13)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let (head, rest) = self
            .buf
            .split_at_checked(4)
            .ok_or(DecodeError::Truncated(field))?;
        self.buf = rest;
        Ok(u32::from_le_bytes(head.try_into().expect("4 bytes")))
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        let (head, rest) = self
            .buf
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated(field))?;
        self.buf = rest;
        Ok(head)
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event {
            ts_ms: 1_764_000_000_123,
            topic: "sensors/a/temp".into(),
            attributes: vec![
                ("site".into(), "berlin".into()),
                ("k".into(), String::new()),
            ],
            payload: Bytes::from_static(b"\x00\xff{\"t\":1}"),
        }
    }

    #[test]
    fn roundtrip() {
        let e = sample();
        let raw = encode(&e);
        assert_eq!(decode(&raw).unwrap(), e);
        assert_eq!(timestamp(&raw), Some(e.ts_ms));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let raw = encode(&sample());
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let raw = encode(&sample());
        for len in 0..raw.len() {
            assert!(
                decode(&raw[..len]).is_err(),
                "truncation to {len} went unnoticed"
            );
        }
    }
}
