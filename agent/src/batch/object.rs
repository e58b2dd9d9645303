//! What a sealed batch becomes: the bytes of one object (NDJSON, Parquet,
//! or a raw payload), or a media file to stream from disk.
//!
//! A pure function of the events and the sink's settings, so a batch
//! re-uploaded after a crash produces the same object.

use bytes::Bytes;

use super::encode::{content_headers, encode_ndjson};
use super::parquet::{PARQUET_CONTENT_TYPE, ParquetCompression, ParquetOptions, encode_parquet};
use crate::config::{Compression, Format, SinkConfig};
use crate::event::{Event, RESERVED_ATTRIBUTE_PREFIX};
use crate::media::MediaRef;
use crate::sinks::ObjectInfo;

/// The attribute a source or plugin sets to give a raw object its type.
pub const CONTENT_TYPE_ATTRIBUTE: &str = "content_type";

/// The longest metadata value written (S3 takes 2 KB of user metadata).
pub const MAX_METADATA_VALUE: usize = 256;

const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// How a sink turns batches into objects.
#[derive(Debug, Clone)]
pub struct Encoding {
    pub format: Format,
    pub compression: Compression,
    pub compression_level: u32,
    pub row_group_size: usize,
    pub metadata_attributes: Vec<String>,
}

impl Encoding {
    pub fn of(config: &SinkConfig) -> Encoding {
        Encoding {
            format: config.format,
            compression: config.compression(),
            compression_level: config.compression_level(),
            row_group_size: config.row_group_size,
            metadata_attributes: config.metadata_attributes.clone(),
        }
    }
}

pub enum Object {
    Bytes {
        body: Bytes,
        info: ObjectInfo,
    },
    /// A media file; `event` is the reference event, for the sidecar index.
    File {
        media: MediaRef,
        info: ObjectInfo,
        event: Box<Event>,
    },
}

impl Object {
    /// The bytes an upload of this object moves.
    pub fn size(&self) -> u64 {
        match self {
            Object::Bytes { body, .. } => body.len() as u64,
            Object::File { media, .. } => media.size,
        }
    }
}

/// The object for a batch (`events` is never empty), or why there is none:
/// a media reference that cannot be read.
pub fn build(events: &[Event], agent: &str, encoding: &Encoding) -> Result<Object, String> {
    let metadata = metadata(&events[0], &encoding.metadata_attributes);
    Ok(match encoding.format {
        Format::Ndjson => ndjson(
            events,
            agent,
            (encoding.compression, encoding.compression_level),
            metadata,
        ),
        Format::Parquet => {
            let options = parquet_options(encoding.compression, encoding.row_group_size);
            match encode_parquet(events, agent, &options) {
                Ok(body) => Object::Bytes {
                    body: body.into(),
                    info: ObjectInfo {
                        content_type: PARQUET_CONTENT_TYPE.to_string(),
                        content_encoding: None,
                        metadata,
                    },
                },
                Err(e) => {
                    // Keep the data flowing in a form the lake can still read.
                    tracing::error!(error = %e, retryable = e.is_retryable(), records = events.len(), "parquet encoding failed; writing this batch as NDJSON under the same key");
                    ndjson(events, agent, (Compression::None, 0), metadata)
                }
            }
        }
        Format::Raw => raw(&events[0], metadata)?,
    })
}

pub(super) fn parquet_options(compression: Compression, row_group_size: usize) -> ParquetOptions {
    ParquetOptions {
        compression: match compression {
            Compression::Snappy => ParquetCompression::Snappy,
            Compression::None => ParquetCompression::None,
            _ => ParquetCompression::Zstd,
        },
        row_group_size,
    }
}

fn ndjson(
    events: &[Event],
    agent: &str,
    (compression, level): (Compression, u32),
    metadata: Vec<(String, String)>,
) -> Object {
    let (content_type, content_encoding) = content_headers(compression);
    Object::Bytes {
        body: encode_ndjson(events, agent, compression, level).into(),
        info: ObjectInfo {
            content_type: content_type.to_string(),
            content_encoding,
            metadata,
        },
    }
}

fn raw(event: &Event, metadata: Vec<(String, String)>) -> Result<Object, String> {
    Ok(match MediaRef::of(event) {
        Some(Ok(media)) => Object::File {
            info: ObjectInfo {
                content_type: content_type(Some(&media.content_type)),
                content_encoding: None,
                metadata,
            },
            media,
            event: Box::new(event.clone()),
        },
        Some(Err(e)) => return Err(format!("corrupt media reference: {e}")),
        None => Object::Bytes {
            body: event.payload.clone(),
            info: ObjectInfo {
                content_type: content_type(event.attribute(CONTENT_TYPE_ATTRIBUTE)),
                content_encoding: None,
                metadata,
            },
        },
    })
}

/// The configured attributes the event has, as object metadata. Values
/// come from clients and plugins; a header value S3 refuses would make
/// every retry of the object fail.
pub(super) fn metadata(event: &Event, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .filter(|n| !n.starts_with(RESERVED_ATTRIBUTE_PREFIX))
        .filter_map(|n| Some((n.clone(), header_safe(event.attribute(n)?))))
        .collect()
}

/// `value` as a header value S3 stores unchanged: printable ASCII stays;
/// control characters, non-ASCII bytes, `%` and spaces at either end are
/// percent-encoded (UTF-8); cut after [`MAX_METADATA_VALUE`] bytes.
fn header_safe(value: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(value.len().min(MAX_METADATA_VALUE));
    let last = value.len().saturating_sub(1);
    for (i, b) in value.bytes().enumerate() {
        let inner_space = b == b' ' && i != 0 && i != last;
        let keep = (0x21..=0x7E).contains(&b) && b != b'%' || inner_space;
        if out.len() + if keep { 1 } else { 3 } > MAX_METADATA_VALUE {
            break;
        }
        if keep {
            out.push(char::from(b));
        } else {
            write!(out, "%{b:02X}").expect("to a String");
        }
    }
    out
}

/// A content type from a client or plugin, if it can be sent as a header.
fn content_type(value: Option<&str>) -> String {
    match value {
        Some(v)
            if !v.is_empty()
                && v.len() <= MAX_METADATA_VALUE
                && v.bytes().all(|b| (0x20..=0x7E).contains(&b)) =>
        {
            v.to_string()
        }
        _ => DEFAULT_CONTENT_TYPE.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::MEDIA_ATTRIBUTE;

    fn encoding(format: Format) -> Encoding {
        Encoding {
            format,
            compression: Compression::None,
            compression_level: 0,
            row_group_size: 10,
            metadata_attributes: vec!["site".into(), "absent".into()],
        }
    }

    #[test]
    fn raw_objects_take_type_and_metadata_from_attributes() {
        let mut e = Event::new(0, "cam/1", b"\xff\xd8jpeg".to_vec());
        e.attributes.push(("site".into(), "berlin".into()));
        e.attributes
            .push(("content_type".into(), "image/jpeg".into()));
        let Ok(Object::Bytes { body, info }) = build(&[e], "a", &encoding(Format::Raw)) else {
            panic!("inline payload")
        };
        assert_eq!(&body[..], b"\xff\xd8jpeg");
        assert_eq!(info.content_type, "image/jpeg");
        assert_eq!(info.metadata, [("site".to_string(), "berlin".to_string())]);
    }

    #[test]
    fn media_references_become_files() {
        let media = MediaRef {
            file: "lake-1".into(),
            size: 3,
            sha256: "ab".into(),
            content_type: "video/mp4".into(),
        };
        let mut e = Event::new(0, "cam", serde_json::to_vec(&media).unwrap());
        e.attributes.push((MEDIA_ATTRIBUTE.into(), "1".into()));
        match build(&[e.clone()], "a", &encoding(Format::Raw)) {
            Ok(Object::File { media: m, info, .. }) => {
                assert_eq!(m, media);
                assert_eq!(info.content_type, "video/mp4");
            }
            _ => panic!("expected a file"),
        }
        e.payload = bytes::Bytes::from_static(b"{");
        assert!(build(&[e], "a", &encoding(Format::Raw)).is_err());
    }

    #[test]
    fn parquet_objects_are_typed() {
        let e = Event::new(0, "t", br#"{"x":1}"#.to_vec());
        let Ok(Object::Bytes { body, info }) = build(&[e], "a", &encoding(Format::Parquet)) else {
            panic!("bytes")
        };
        assert_eq!(info.content_type, PARQUET_CONTENT_TYPE);
        assert_eq!(&body[..4], b"PAR1");
    }

    #[test]
    fn metadata_and_content_type_are_valid_header_values() {
        assert_eq!(header_safe("berlin 1"), "berlin 1");
        assert_eq!(header_safe("a\nb"), "a%0Ab");
        assert_eq!(header_safe(" x%y "), "%20x%25y%20");
        assert_eq!(header_safe("Köln\u{7f}"), "K%C3%B6ln%7F");
        let long = header_safe(&"\u{1}".repeat(200));
        assert_eq!(long.len(), MAX_METADATA_VALUE - MAX_METADATA_VALUE % 3);
        assert!(long.bytes().all(|b| (0x21..=0x7E).contains(&b)));
        assert_eq!(header_safe(&"y".repeat(300)).len(), MAX_METADATA_VALUE);

        assert_eq!(content_type(Some("image/jpeg")), "image/jpeg");
        assert_eq!(
            content_type(Some("text/plain\r\nx-evil: 1")),
            DEFAULT_CONTENT_TYPE
        );
        assert_eq!(content_type(Some("")), DEFAULT_CONTENT_TYPE);
        assert_eq!(content_type(None), DEFAULT_CONTENT_TYPE);
    }
}
