//! Turning a batch of events into one Parquet file, one row per event, with
//! columns inferred from the batch's JSON payloads.
//!
//! Like the NDJSON encoder the output is a pure function of the events, the
//! agent id and the options, so a batch re-uploaded after a crash is
//! byte-identical. A field whose values have different types in one batch
//! is written as text, not dropped: strings as they are, anything else as
//! its JSON text (ints and floats together widen to float instead). An
//! empty batch still encodes, to a file with the fixed
//! columns and no rows, so callers need no special case for it.

mod columns;

use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow_schema::{ArrowError, DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use crate::event::Event;

pub const PARQUET_CONTENT_TYPE: &str = "application/vnd.apache.parquet";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParquetCompression {
    None,
    Snappy,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetOptions {
    pub compression: ParquetCompression,
    /// Most rows in one row group; at least 1.
    pub row_group_size: usize,
}

impl Default for ParquetOptions {
    fn default() -> Self {
        ParquetOptions {
            compression: ParquetCompression::Zstd,
            row_group_size: 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    #[error("parquet row_group_size must be at least 1")]
    ZeroRowGroupSize,
    #[error("building the Arrow record batch: {0}")]
    Arrow(#[from] ArrowError),
    #[error("writing Parquet: {0}")]
    Write(#[from] parquet::errors::ParquetError),
}

impl ParquetError {
    /// Encoding depends only on the batch and the options, so a retry would
    /// fail the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Columns `ts`, `topic`, `agent`, then one per flattened payload field in
/// name order, then `payload_raw` for payloads that are not JSON objects.
pub fn encode_parquet(
    events: &[Event],
    agent: &str,
    options: &ParquetOptions,
) -> Result<Vec<u8>, ParquetError> {
    if options.row_group_size == 0 {
        return Err(ParquetError::ZeroRowGroupSize);
    }
    let (schema, arrays) = columns_of(events, agent);
    let schema = Arc::new(schema);
    let mut writer = ArrowWriter::try_new(
        Vec::new(),
        schema.clone(),
        Some(writer_properties(options)?),
    )?;
    if !events.is_empty() {
        writer.write(&RecordBatch::try_new(schema, arrays)?)?;
    }
    Ok(writer.into_inner()?)
}

pub fn writer_properties(options: &ParquetOptions) -> Result<WriterProperties, ParquetError> {
    let compression = match options.compression {
        ParquetCompression::None => Compression::UNCOMPRESSED,
        ParquetCompression::Snappy => Compression::SNAPPY,
        // The level the NDJSON sink uses too.
        ParquetCompression::Zstd => Compression::ZSTD(ZstdLevel::try_new(3)?),
    };
    // The defaults hold nothing time- or host-dependent (created_by is the
    // crate version), which keeps the bytes reproducible.
    Ok(WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(options.row_group_size))
        .build())
}

/// The batch's columns, as [`encode_parquet`] writes them.
pub fn columns_of(events: &[Event], agent: &str) -> (Schema, Vec<ArrayRef>) {
    let mut rows: Vec<Option<Map<String, Value>>> = events
        .iter()
        .map(|e| match serde_json::from_slice(&e.payload) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        })
        .collect();
    let objects = columns::object_names(&mut rows);
    let columns = columns::payload_columns(&rows, &objects);

    let mut fields = vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("topic", DataType::Utf8, false),
        Field::new("agent", DataType::Utf8, false),
    ];
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondArray::from_iter_values(events.iter().map(|e| e.ts_ms))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            events.iter().map(|e| e.topic.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(events.iter().map(|_| agent))),
    ];
    for (name, column) in &columns {
        let (data_type, array) = column.to_array();
        fields.push(Field::new(name, data_type, true));
        arrays.push(array);
    }
    if rows.iter().any(Option::is_none) {
        fields.push(Field::new("payload_raw", DataType::Binary, true));
        arrays.push(Arc::new(
            events
                .iter()
                .zip(&rows)
                .map(|(e, row)| row.is_none().then_some(&e.payload[..]))
                .collect::<BinaryArray>(),
        ));
    }

    (Schema::new(fields), arrays)
}

#[cfg(test)]
mod tests {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    fn ev(payload: &[u8]) -> Event {
        Event::new(1_795_496_858_123, "sensors/a", payload.to_vec())
    }

    fn opts(compression: ParquetCompression, row_group_size: usize) -> ParquetOptions {
        ParquetOptions {
            compression,
            row_group_size,
        }
    }

    /// The file's rows as one batch, and its number of row groups.
    fn read(file: Vec<u8>) -> (RecordBatch, usize) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(file)).unwrap();
        let groups = builder.metadata().num_row_groups();
        let schema = builder.schema().clone();
        let batches: Vec<RecordBatch> = builder
            .with_batch_size(1 << 16)
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(batches.len() <= 1);
        let batch = batches
            .into_iter()
            .next()
            .unwrap_or_else(|| RecordBatch::new_empty(schema));
        (batch, groups)
    }

    fn encode(payloads: &[&[u8]]) -> RecordBatch {
        let events: Vec<Event> = payloads.iter().map(|p| ev(p)).collect();
        let file = encode_parquet(&events, "gw-01", &ParquetOptions::default()).unwrap();
        read(file).0
    }

    fn names(batch: &RecordBatch) -> Vec<String> {
        let schema = batch.schema();
        schema.fields().iter().map(|f| f.name().clone()).collect()
    }

    fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
        let column = batch.column_by_name(name).unwrap().as_string::<i32>();
        column.iter().map(|v| v.map(str::to_owned)).collect()
    }

    fn ints(batch: &RecordBatch, name: &str) -> Vec<Option<i64>> {
        let column = batch.column_by_name(name).unwrap();
        column.as_primitive::<Int64Type>().iter().collect()
    }

    #[test]
    fn fields_become_typed_columns_in_name_order() {
        let batch = encode(&[
            br#"{"t":21.5,"ok":true,"n":3,"s":"x","arr":[1,{"k":2}],"deep":{"a":{"b":1}},"ts":5,"none":null}"#,
            br#"{"n":4,"topic":"own"}"#,
        ]);
        assert_eq!(
            names(&batch),
            [
                "ts",
                "topic",
                "agent",
                "arr",
                "deep.a.b",
                "n",
                "none",
                "ok",
                "payload.topic",
                "payload.ts",
                "s",
                "t"
            ]
        );
        let schema = batch.schema();
        let field = |name: &str| schema.field_with_name(name).unwrap().clone();
        assert_eq!(
            field("ts").data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
        );
        assert!(!field("ts").is_nullable() && !field("topic").is_nullable());
        assert!(field("n").is_nullable());
        let types = ["ok", "n", "t", "s", "arr", "none"].map(|n| field(n).data_type().clone());
        use DataType::*;
        assert_eq!(types, [Boolean, Int64, Float64, Utf8, Utf8, Utf8]);

        let ts = batch.column(0).as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(1), 1_795_496_858_123);
        assert_eq!(strings(&batch, "topic"), vec![Some("sensors/a".into()); 2]);
        assert_eq!(strings(&batch, "agent"), vec![Some("gw-01".into()); 2]);
        assert_eq!(ints(&batch, "n"), [Some(3), Some(4)]);
        assert_eq!(ints(&batch, "deep.a.b"), [Some(1), None]);
        assert_eq!(ints(&batch, "payload.ts"), [Some(5), None]);
        assert_eq!(strings(&batch, "payload.topic"), [None, Some("own".into())]);
        assert_eq!(
            strings(&batch, "arr"),
            [Some(r#"[1,{"k":2}]"#.into()), None]
        );
        assert_eq!(strings(&batch, "s"), [Some("x".into()), None]);
        assert_eq!(batch.column_by_name("none").unwrap().null_count(), 2);
        assert!(batch.column_by_name("ok").unwrap().as_boolean().value(0));
    }

    #[test]
    fn ints_widen_to_floats_and_other_mixes_become_text() {
        let batch = encode(&[
            br#"{"v":1,"w":21,"o":{"x":1},"p":{"q":1}}"#,
            br#"{"v":2.5,"w":"21","o":5,"p":null}"#,
            br#"{"v":null,"w":null,"o":null}"#,
        ]);
        assert_eq!(
            names(&batch),
            ["ts", "topic", "agent", "o", "p.q", "v", "w"]
        );
        let v = batch
            .column_by_name("v")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert_eq!(v.iter().collect::<Vec<_>>(), [Some(1.0), Some(2.5), None]);
        assert_eq!(
            strings(&batch, "w"),
            [Some("21".into()), Some("21".into()), None]
        );
        assert_eq!(
            strings(&batch, "o"),
            [Some(r#"{"x":1}"#.into()), Some("5".into()), None]
        );
        assert_eq!(ints(&batch, "p.q"), [Some(1), None, None]);
    }

    #[test]
    fn payloads_that_are_not_objects_are_kept_raw() {
        let raw: [&[u8]; 6] = [
            b"\x00\xffbinary",
            b"[1,2]",
            b"42",
            b"{\"broken\":",
            // Two fields with one column name: neither may be lost.
            br#"{"a.b":1,"a":{"b":2}}"#,
            br#"{"payload.ts":1,"ts":2}"#,
        ];
        let mut payloads = vec![&br#"{"a":{"b":7}}"#[..]];
        payloads.extend(raw);
        let batch = encode(&payloads);
        assert_eq!(
            names(&batch),
            ["ts", "topic", "agent", "a.b", "payload_raw"]
        );
        assert_eq!(
            ints(&batch, "a.b"),
            [Some(7), None, None, None, None, None, None]
        );
        let column = batch
            .column_by_name("payload_raw")
            .unwrap()
            .as_binary::<i32>();
        assert!(column.is_null(0));
        for (i, bytes) in raw.iter().enumerate() {
            assert_eq!(column.value(i + 1), *bytes);
        }
    }

    #[test]
    fn row_groups_follow_the_option() {
        let events: Vec<Event> = (0..10)
            .map(|i| ev(format!(r#"{{"i":{i}}}"#).as_bytes()))
            .collect();
        let file = encode_parquet(&events, "a", &opts(ParquetCompression::None, 3)).unwrap();
        let (batch, groups) = read(file);
        assert_eq!(groups, 4);
        assert_eq!(ints(&batch, "i"), (0..10).map(Some).collect::<Vec<_>>());
    }

    #[test]
    fn every_compression_reads_back_and_encoding_is_deterministic() {
        let events: Vec<Event> = (0..500)
            .map(|i| ev(format!(r#"{{"i":{i},"s":"reading","x":{{"y":{}}}}}"#, i % 7).as_bytes()))
            .chain([ev(b"\x01raw")])
            .collect();
        let mut sizes = Vec::new();
        for c in [
            ParquetCompression::None,
            ParquetCompression::Snappy,
            ParquetCompression::Zstd,
        ] {
            let file = encode_parquet(&events, "gw", &opts(c, 100)).unwrap();
            assert_eq!(file, encode_parquet(&events, "gw", &opts(c, 100)).unwrap());
            sizes.push(file.len());
            let (batch, groups) = read(file);
            assert_eq!((batch.num_rows(), groups), (501, 6));
            assert_eq!(ints(&batch, "x.y")[8], Some(1));
        }
        assert!(sizes[1] < sizes[0] && sizes[2] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn an_empty_batch_is_a_file_with_the_fixed_columns() {
        let file = encode_parquet(&[], "a", &ParquetOptions::default()).unwrap();
        let (batch, groups) = read(file);
        assert_eq!((batch.num_rows(), groups), (0, 0));
        assert_eq!(names(&batch), ["ts", "topic", "agent"]);
    }

    #[test]
    fn a_zero_row_group_size_is_refused() {
        let err = encode_parquet(&[], "a", &opts(ParquetCompression::None, 0)).unwrap_err();
        assert!(matches!(err, ParquetError::ZeroRowGroupSize) && !err.is_retryable());
    }
}
