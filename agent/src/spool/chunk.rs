//! The on-disk encodings of the spool: chunks of events, and the small
//! index entry sled keeps for each.
//!
//! A chunk holds the events one group commit added to one partition of one
//! sink, with one checksum (little endian): `crc32 u32 | version u8 |
//! count u32 | event*`, each event `ts_ms i64 | topic | attribute count u32
//! | (key, value)* | payload`, where each string or byte field is a `u32`
//! length followed by the bytes. The checksum covers everything after it,
//! so a torn or bit-flipped chunk is detected instead of uploaded as garbage.
//!
//! Version 1 was one event per sled value (`crc32 | 1 | event`); spools
//! written that way are migrated on open (see `legacy`).

use bytes::Bytes;

use crate::event::Event;

const VERSION: u8 = 2;
const LEGACY_VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("chunk is {0} bytes, shorter than any valid chunk")]
    TooShort(usize),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("version {0} is not known to this silt; upgrade silt or export the spool")]
    Version(u8),
    #[error("truncated inside its {0} field")]
    Truncated(&'static str),
    #[error("{0} field is not UTF-8")]
    NotUtf8(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Bytes one event takes inside a chunk: what the spool counts against
/// `spool.max_bytes` and batch limits.
pub fn encoded_len(event: &Event) -> u64 {
    let attrs: usize = event
        .attributes
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    (8 + 4 + event.topic.len() + 4 + attrs + 4 + event.payload.len()) as u64
}

/// Starts a chunk; add events with [`put_event`], close with [`seal_chunk`].
pub fn start_chunk(out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    out.push(VERSION);
    out.extend_from_slice(&0u32.to_le_bytes());
}

pub fn put_event(out: &mut Vec<u8>, event: &Event) {
    out.extend_from_slice(&event.ts_ms.to_le_bytes());
    put_bytes(out, event.topic.as_bytes());
    out.extend_from_slice(&(event.attributes.len() as u32).to_le_bytes());
    for (k, v) in &event.attributes {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    put_bytes(out, &event.payload);
}

/// Writes the event count and the checksum of a chunk begun with [`start_chunk`].
pub fn seal_chunk(out: &mut [u8], count: u32) {
    out[5..9].copy_from_slice(&count.to_le_bytes());
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
}

pub fn encode_chunk(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + events.iter().map(encoded_len).sum::<u64>() as usize);
    start_chunk(&mut out);
    for e in events {
        put_event(&mut out, e);
    }
    seal_chunk(&mut out, events.len() as u32);
    out
}

pub fn decode_chunk(raw: &[u8]) -> Result<Vec<Event>, DecodeError> {
    decode(raw, None)
}

/// [`decode_chunk`] whose payloads are slices of `raw`, not copies.
pub fn decode_chunk_shared(raw: &Bytes) -> Result<Vec<Event>, DecodeError> {
    decode(raw, Some(raw))
}

fn decode(raw: &[u8], owner: Option<&Bytes>) -> Result<Vec<Event>, DecodeError> {
    let body = checked(raw, VERSION)?;
    let (count, body) = body.split_at(4);
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes"));
    let mut r = Reader { buf: body, owner };
    // Every event takes at least 24 bytes: a count beyond that is damage.
    let mut events = Vec::with_capacity((count as usize).min(body.len() / 24));
    for _ in 0..count {
        events.push(r.event()?);
    }
    r.done()?;
    Ok(events)
}

/// One event in the version 1 layout, as spools before chunks stored it.
pub fn decode_legacy(raw: &[u8]) -> Result<Event, DecodeError> {
    let mut r = Reader {
        buf: checked(raw, LEGACY_VERSION)?,
        owner: None,
    };
    let event = r.event()?;
    r.done()?;
    Ok(event)
}

/// The body after checksum and version, once both are right.
fn checked(raw: &[u8], version: u8) -> Result<&[u8], DecodeError> {
    let min = if version == VERSION { HEADER } else { 5 };
    if raw.len() < min {
        return Err(DecodeError::TooShort(raw.len()));
    }
    let stored = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&raw[4..]);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    if raw[4] != version {
        return Err(DecodeError::Version(raw[4]));
    }
    Ok(&raw[5..])
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    buf: &'a [u8],
    /// The buffer `buf` lies in, when payloads may share it.
    owner: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self
            .buf
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated(field))?;
        self.buf = rest;
        Ok(head)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4, field)?.try_into().expect("4 bytes"),
        ))
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        self.take(len, field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8(field))
    }

    fn event(&mut self) -> Result<Event, DecodeError> {
        let ts = self.take(8, "timestamp")?;
        let ts_ms = i64::from_le_bytes(ts.try_into().expect("8 bytes"));
        let topic = self.string("topic")?;
        let count = self.u32("attribute count")?;
        let mut attributes = Vec::with_capacity(count.min(64) as usize);
        for _ in 0..count {
            attributes.push((
                self.string("attribute key")?,
                self.string("attribute value")?,
            ));
        }
        let payload = self.bytes("payload")?;
        let payload = match self.owner {
            Some(owner) => owner.slice_ref(payload),
            None => Bytes::copy_from_slice(payload),
        };
        Ok(Event {
            ts_ms,
            topic,
            attributes,
            payload,
        })
    }

    fn done(&self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Where a run of a chunk's events lives: sled's value for a chunk key.
/// `skip` and `count` select events of the stored chunk, so sealing a batch
/// that ends inside a chunk splits only this entry, never the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub skip: u32,
    pub count: u32,
    /// Encoded bytes of the selected events.
    pub bytes: u64,
    /// Timestamp of the first selected event.
    pub first_ts: i64,
}

const REF_LEN: usize = 8 + 8 + 4 + 4 + 4 + 8 + 8;

impl ChunkRef {
    pub fn encode(&self) -> [u8; REF_LEN] {
        let mut out = [0; REF_LEN];
        out[0..8].copy_from_slice(&self.segment.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..20].copy_from_slice(&self.len.to_le_bytes());
        out[20..24].copy_from_slice(&self.skip.to_le_bytes());
        out[24..28].copy_from_slice(&self.count.to_le_bytes());
        out[28..36].copy_from_slice(&self.bytes.to_le_bytes());
        out[36..44].copy_from_slice(&self.first_ts.to_le_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Option<ChunkRef> {
        if raw.len() != REF_LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8"));
        let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4"));
        Some(ChunkRef {
            segment: u64_at(0),
            offset: u64_at(8),
            len: u32_at(16),
            skip: u32_at(20),
            count: u32_at(24),
            bytes: u64_at(28),
            first_ts: u64_at(36) as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: i64) -> Event {
        Event {
            ts_ms: 1_764_000_000_123 + n,
            topic: "sensors/a/temp".into(),
            attributes: vec![
                ("site".into(), "berlin".into()),
                ("k".into(), String::new()),
            ],
            payload: Bytes::from_static(b"\x00\xff{\"t\":1}"),
        }
    }

    #[test]
    fn roundtrip_and_counted_length() {
        let events = vec![sample(0), sample(1), Event::new(5, "", Vec::new())];
        let raw = encode_chunk(&events);
        assert_eq!(decode_chunk(&raw).unwrap(), events);
        assert_eq!(
            decode_chunk_shared(&Bytes::from(raw.clone())).unwrap(),
            events
        );
        let body: u64 = events.iter().map(encoded_len).sum();
        assert_eq!(raw.len() as u64, HEADER as u64 + body);
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_detected() {
        let raw = encode_chunk(&[sample(0), sample(1)]);
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_chunk(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        for len in 0..raw.len() {
            assert!(decode_chunk(&raw[..len]).is_err(), "truncation to {len}");
        }
    }

    #[test]
    fn reads_the_version_1_layout() {
        let e = sample(0);
        let mut raw = vec![0; 4];
        raw.push(LEGACY_VERSION);
        put_event(&mut raw, &e);
        let crc = crc32fast::hash(&raw[4..]);
        raw[..4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_legacy(&raw).unwrap(), e);
        assert!(decode_chunk(&raw).is_err());
    }

    #[test]
    fn chunk_ref_roundtrip() {
        let r = ChunkRef {
            segment: 7,
            offset: 1 << 40,
            len: 9000,
            skip: 3,
            count: 12,
            bytes: 8800,
            first_ts: -5,
        };
        assert_eq!(ChunkRef::decode(&r.encode()), Some(r));
        assert_eq!(ChunkRef::decode(&r.encode()[1..]), None);
    }
}
