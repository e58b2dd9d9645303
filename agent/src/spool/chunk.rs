//! The on-disk encodings of the spool: chunks of events, and the small
//! index entry sled keeps for each.
//!
//! A chunk holds the events one group commit added to one partition of one
//! sink, with one checksum (little endian): `crc32 u32 | version u8 |
//! count u32 | event*`. The checksum covers everything after it, so a torn
//! or bit-flipped chunk is detected instead of uploaded as garbage.
//!
//! Version 3 writes each event as `ts | topic | attributes | payload` in
//! LEB128 varints: `ts` is the zigzag difference from the previous event's
//! (0 before the first), the topic `0` for the previous event's topic or
//! `len + 1` and the bytes, the attributes `0` for the previous event's or
//! `count + 1` and each key and value as `len` and bytes, the payload `len`
//! and bytes. The events of one chunk share a partition, so they mostly
//! share topic and attributes: at 256-byte payloads this is 6 bytes of
//! framing per event where version 2 took 34 and the topic.
//!
//! Version 2 (`ts_ms i64 | topic | attribute count u32 | (key, value)* |
//! payload`, each string a `u32` length and the bytes) is still read, so a
//! spool written before version 3 drains after an upgrade. Version 1 was
//! one event per sled value (`crc32 | 1 | event`); spools written that way
//! are migrated on open (see `legacy`).

use bytes::Bytes;

use crate::event::Event;

const VERSION: u8 = 3;
const FIXED_VERSION: u8 = 2;
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
    #[error("{0} field is not in the form silt writes")]
    NotCanonical(&'static str),
}

/// What one event counts against `spool.max_bytes` and batch limits: its
/// size in the version 2 layout, at least what it takes in a chunk, and
/// independent of the events around it.
pub fn encoded_len(event: &Event) -> u64 {
    let attrs: usize = event
        .attributes
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    (8 + 4 + event.topic.len() + 4 + attrs + 4 + event.payload.len()) as u64
}

/// Builds one chunk, an event at a time.
pub struct ChunkBuilder {
    buf: Vec<u8>,
    count: u32,
    prev_ts: i64,
    prev_topic: String,
    prev_attributes: Vec<(String, String)>,
}

impl ChunkBuilder {
    pub fn new() -> ChunkBuilder {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(&[0; 4]);
        buf.push(VERSION);
        buf.extend_from_slice(&0u32.to_le_bytes());
        ChunkBuilder {
            buf,
            count: 0,
            prev_ts: 0,
            prev_topic: String::new(),
            prev_attributes: Vec::new(),
        }
    }

    pub fn push(&mut self, event: &Event) {
        let out = &mut self.buf;
        put_varint(out, zigzag(event.ts_ms.wrapping_sub(self.prev_ts)));
        self.prev_ts = event.ts_ms;
        if event.topic == self.prev_topic {
            put_varint(out, 0);
        } else {
            put_varint(out, event.topic.len() as u64 + 1);
            out.extend_from_slice(event.topic.as_bytes());
            self.prev_topic.clone_from(&event.topic);
        }
        if event.attributes == self.prev_attributes {
            put_varint(out, 0);
        } else {
            put_varint(out, event.attributes.len() as u64 + 1);
            for (k, v) in &event.attributes {
                put_varint_bytes(out, k.as_bytes());
                put_varint_bytes(out, v.as_bytes());
            }
            self.prev_attributes.clone_from(&event.attributes);
        }
        put_varint_bytes(out, &event.payload);
        self.count += 1;
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The chunk, with its event count and checksum.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[5..9].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[4..]);
        self.buf[..4].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

pub fn encode_chunk(events: &[Event]) -> Vec<u8> {
    let mut chunk = ChunkBuilder::new();
    for e in events {
        chunk.push(e);
    }
    chunk.finish()
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_varint_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub fn decode_chunk(raw: &[u8]) -> Result<Vec<Event>, DecodeError> {
    decode(raw, None)
}

/// [`decode_chunk`] whose payloads are slices of `raw`, not copies.
pub fn decode_chunk_shared(raw: &Bytes) -> Result<Vec<Event>, DecodeError> {
    decode(raw, Some(raw))
}

fn decode(raw: &[u8], owner: Option<&Bytes>) -> Result<Vec<Event>, DecodeError> {
    if raw.len() < HEADER {
        return Err(DecodeError::TooShort(raw.len()));
    }
    let (version, body) = checked(raw, &[VERSION, FIXED_VERSION])?;
    let (count, body) = body.split_at(4);
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes"));
    let mut r = Reader::new(body, owner);
    // Every event takes at least 4 bytes: a count beyond that is damage.
    let mut events = Vec::with_capacity((count as usize).min(body.len() / 4));
    for _ in 0..count {
        events.push(match version {
            VERSION => r.event()?,
            _ => r.fixed_event()?,
        });
    }
    r.done()?;
    Ok(events)
}

/// One event in the version 1 layout, as spools before chunks stored it.
pub fn decode_legacy(raw: &[u8]) -> Result<Event, DecodeError> {
    let mut r = Reader::new(checked(raw, &[LEGACY_VERSION])?.1, None);
    let event = r.fixed_event()?;
    r.done()?;
    Ok(event)
}

/// The version and the body after it, once the checksum is right and the
/// version one of `versions`.
fn checked<'a>(raw: &'a [u8], versions: &[u8]) -> Result<(u8, &'a [u8]), DecodeError> {
    if raw.len() < 5 {
        return Err(DecodeError::TooShort(raw.len()));
    }
    let stored = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&raw[4..]);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    if !versions.contains(&raw[4]) {
        return Err(DecodeError::Version(raw[4]));
    }
    Ok((raw[4], &raw[5..]))
}

struct Reader<'a> {
    buf: &'a [u8],
    /// The buffer `buf` lies in, when payloads may share it.
    owner: Option<&'a Bytes>,
    /// The event read last (version 3 refers to its fields).
    prev_ts: i64,
    prev_topic: String,
    prev_attributes: Vec<(String, String)>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], owner: Option<&'a Bytes>) -> Reader<'a> {
        Reader {
            buf,
            owner,
            prev_ts: 0,
            prev_topic: String::new(),
            prev_attributes: Vec::new(),
        }
    }

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
        utf8(bytes, field)
    }

    /// A LEB128 varint in its shortest form: the encoder writes no other,
    /// so a chunk has exactly one encoding.
    fn varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1, field)?[0];
            let bits = u64::from(byte & 0x7f);
            if (bits << shift) >> shift != bits {
                return Err(DecodeError::NotCanonical(field));
            }
            n |= bits << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err(DecodeError::NotCanonical(field));
                }
                return Ok(n);
            }
        }
        Err(DecodeError::NotCanonical(field))
    }

    fn varint_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len =
            usize::try_from(self.varint(field)?).map_err(|_| DecodeError::Truncated(field))?;
        self.take(len, field)
    }

    fn varint_string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        utf8(self.varint_bytes(field)?, field)
    }

    fn payload(&self, payload: &[u8]) -> Bytes {
        match self.owner {
            Some(owner) => owner.slice_ref(payload),
            None => Bytes::copy_from_slice(payload),
        }
    }

    /// One event of version 3.
    fn event(&mut self) -> Result<Event, DecodeError> {
        let ts_ms = self
            .prev_ts
            .wrapping_add(unzigzag(self.varint("timestamp")?));
        self.prev_ts = ts_ms;
        match self.varint("topic")? {
            0 => {}
            n => {
                let len = usize::try_from(n - 1).map_err(|_| DecodeError::Truncated("topic"))?;
                let topic = utf8(self.take(len, "topic")?, "topic")?;
                if topic == self.prev_topic {
                    return Err(DecodeError::NotCanonical("topic"));
                }
                self.prev_topic = topic;
            }
        }
        match self.varint("attribute count")? {
            0 => {}
            n => {
                let count = n - 1;
                let mut attributes = Vec::with_capacity(count.min(64) as usize);
                for _ in 0..count {
                    attributes.push((
                        self.varint_string("attribute key")?,
                        self.varint_string("attribute value")?,
                    ));
                }
                if attributes == self.prev_attributes {
                    return Err(DecodeError::NotCanonical("attributes"));
                }
                self.prev_attributes = attributes;
            }
        }
        let payload = self.varint_bytes("payload")?;
        Ok(Event {
            ts_ms,
            topic: self.prev_topic.clone(),
            attributes: self.prev_attributes.clone(),
            payload: self.payload(payload),
        })
    }

    /// One event of versions 1 and 2.
    fn fixed_event(&mut self) -> Result<Event, DecodeError> {
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
        Ok(Event {
            ts_ms,
            topic,
            attributes,
            payload: self.payload(payload),
        })
    }

    fn done(&self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

fn utf8(bytes: &[u8], field: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8(field))
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

    /// An event in the layout of versions 1 and 2.
    fn put_fixed_event(out: &mut Vec<u8>, event: &Event) {
        let put_bytes = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        out.extend_from_slice(&event.ts_ms.to_le_bytes());
        put_bytes(out, event.topic.as_bytes());
        out.extend_from_slice(&(event.attributes.len() as u32).to_le_bytes());
        for (k, v) in &event.attributes {
            put_bytes(out, k.as_bytes());
            put_bytes(out, v.as_bytes());
        }
        put_bytes(out, &event.payload);
    }

    fn with_checksum(mut raw: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&raw[4..]);
        raw[..4].copy_from_slice(&crc.to_le_bytes());
        raw
    }

    #[test]
    fn roundtrip_within_the_counted_length() {
        let mut other = sample(-3_000_000_000_000);
        other.topic = "sensors/b".into();
        let mut no_attributes = sample(7);
        no_attributes.attributes.clear();
        let events = vec![
            sample(0),
            sample(1),
            Event::new(5, "", Vec::new()),
            other,
            no_attributes.clone(),
            no_attributes,
            Event::new(i64::MIN, "sensors/a/temp", vec![0; 300]),
            Event::new(i64::MAX, "", Vec::new()),
        ];
        let raw = encode_chunk(&events);
        assert_eq!(decode_chunk(&raw).unwrap(), events);
        assert_eq!(
            decode_chunk_shared(&Bytes::from(raw.clone())).unwrap(),
            events
        );
        let body: u64 = events.iter().map(encoded_len).sum();
        assert!(raw.len() as u64 <= HEADER as u64 + body);
    }

    #[test]
    fn events_sharing_topic_and_attributes_take_a_few_bytes_of_framing() {
        let events: Vec<Event> = (0..100).map(|n| sample(n * 3)).collect();
        let payloads: usize = events.iter().map(|e| e.payload.len()).sum();
        let framing = encode_chunk(&events).len() - HEADER - payloads;
        // The first: its timestamp, topic and two attributes in full; then
        // 1 byte of timestamp, topic, attributes and payload length each.
        let first = 6 + (1 + 14) + (1 + (1 + 4) + (1 + 6) + (1 + 1) + 1) + 1;
        assert_eq!(framing, first + 99 * 4);
    }

    #[test]
    fn only_the_form_silt_writes_decodes() {
        let e = sample(0);
        let raw = encode_chunk(&[e.clone(), e.clone()]);
        // The second event: 1-byte timestamp delta, then topic `0`.
        let second = raw.len() - (1 + 1 + 1 + 1 + e.payload.len());
        let rewrite = |at: usize, with: &[u8]| {
            let mut bad = raw.clone();
            bad.splice(at..at + 1, with.iter().copied());
            with_checksum(bad)
        };
        assert_eq!(
            decode_chunk(&rewrite(second + 1, &[0])).unwrap(),
            [e.clone(), e.clone()]
        );
        let overlong_zero = rewrite(second + 1, &[0x80, 0x00]);
        assert_eq!(
            decode_chunk(&overlong_zero),
            Err(DecodeError::NotCanonical("topic"))
        );
        let mut repeated = vec![15];
        repeated.extend_from_slice(e.topic.as_bytes());
        assert_eq!(
            decode_chunk(&rewrite(second + 1, &repeated)),
            Err(DecodeError::NotCanonical("topic"))
        );
        let too_wide = rewrite(second + 1, &[0xff; 10]);
        assert!(decode_chunk(&too_wide).is_err());
    }

    #[test]
    fn reads_the_version_2_layout() {
        let events = vec![sample(0), Event::new(5, "x", vec![1, 2])];
        let mut raw = vec![0; 4];
        raw.push(FIXED_VERSION);
        raw.extend_from_slice(&2u32.to_le_bytes());
        for e in &events {
            put_fixed_event(&mut raw, e);
        }
        let raw = with_checksum(raw);
        assert_eq!(decode_chunk(&raw).unwrap(), events);
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
        put_fixed_event(&mut raw, &e);
        let raw = with_checksum(raw);
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
