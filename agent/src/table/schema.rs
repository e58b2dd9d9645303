//! From a batch's inferred columns to the table's schema and back: which
//! columns a batch adds, the partition spec a key template implies, and the
//! batch's rows in the table's current column types.

use std::collections::HashSet;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray, new_null_array};
use arrow_schema::{DataType, Field, Schema as ArrowSchema, TimeUnit};
use iceberg::spec::{NestedField, PrimitiveType, Schema, Transform, Type, UnboundPartitionSpec};

use crate::batch::{TemplatePart, columns_of};
use crate::event::Event;

/// The column that keeps a row's payload whole when a value does not fit
/// the table's column type (or the payload is not a JSON object).
pub const PAYLOAD_RAW: &str = "payload_raw";

/// The batch's columns, plus a string column for each `{attr.NAME}` of the
/// key template that no payload field fills (attributes are partition
/// values, so the table needs them as columns).
pub fn batch_columns(
    events: &[Event],
    agent: &str,
    attrs: &[String],
) -> (ArrowSchema, Vec<ArrayRef>) {
    let (schema, mut arrays) = columns_of(events, agent);
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| (**f).clone()).collect();
    for name in attrs {
        if fields.iter().any(|f| f.name() == name) {
            continue;
        }
        fields.push(Field::new(name, DataType::Utf8, true));
        arrays.push(Arc::new(
            events
                .iter()
                .map(|e| e.attribute(name))
                .collect::<StringArray>(),
        ));
    }
    (ArrowSchema::new(fields), arrays)
}

/// The Iceberg type a batch column is stored as.
pub fn iceberg_type(data_type: &DataType) -> Type {
    Type::Primitive(match data_type {
        DataType::Boolean => PrimitiveType::Boolean,
        DataType::Int64 => PrimitiveType::Long,
        DataType::Float64 => PrimitiveType::Double,
        DataType::Binary => PrimitiveType::Binary,
        DataType::Timestamp(..) => PrimitiveType::Timestamptz,
        _ => PrimitiveType::String,
    })
}

/// The schema of a table created from its first batch: field ids from 1 in
/// column order, `ts` required, and always a `payload_raw` column.
pub fn initial_schema(batch: &ArrowSchema) -> Result<Schema, iceberg::Error> {
    let mut fields = Vec::new();
    for (i, field) in batch.fields().iter().enumerate() {
        let id = i as i32 + 1;
        let t = iceberg_type(field.data_type());
        fields.push(Arc::new(if field.name() == "ts" {
            NestedField::required(id, field.name(), t)
        } else {
            NestedField::optional(id, field.name(), t)
        }));
    }
    if batch.field_with_name(PAYLOAD_RAW).is_err() {
        let id = fields.len() as i32 + 1;
        fields.push(Arc::new(NestedField::optional(
            id,
            PAYLOAD_RAW,
            Type::Primitive(PrimitiveType::Binary),
        )));
    }
    Schema::builder().with_fields(fields).build()
}

/// Columns of the batch the table does not have yet, with their types.
pub fn new_columns(batch: &ArrowSchema, table: &Schema) -> Vec<(String, Type)> {
    batch
        .fields()
        .iter()
        .filter(|f| table.field_by_name(f.name()).is_none())
        .map(|f| (f.name().clone(), iceberg_type(f.data_type())))
        .collect()
}

/// The partition spec of the key template: the finest time placeholder on
/// `ts`, and identity on each `{attr.X}` / `{field.X}` the schema has.
pub fn partition_spec(
    parts: &[TemplatePart],
    schema: &Schema,
) -> Result<UnboundPartitionSpec, iceberg::Error> {
    let ts = schema.field_by_name("ts").map(|f| f.id);
    let time = [
        (TemplatePart::Hour, Transform::Hour, "ts_hour"),
        (TemplatePart::Day, Transform::Day, "ts_day"),
        (TemplatePart::Month, Transform::Month, "ts_month"),
        (TemplatePart::Year, Transform::Year, "ts_year"),
    ]
    .into_iter()
    .find(|(part, ..)| parts.contains(part));
    let mut spec = UnboundPartitionSpec::builder();
    if let (Some(id), Some((_, transform, name))) = (ts, time) {
        spec = spec.add_partition_field(id, name, transform)?;
    }
    let mut seen = HashSet::new();
    for part in parts {
        let name = match part {
            TemplatePart::Attr(n) | TemplatePart::Field(n) => n,
            _ => continue,
        };
        if let Some(field) = schema.field_by_name(name)
            && seen.insert(name.clone())
        {
            spec = spec.add_partition_field(field.id, name, Transform::Identity)?;
        }
    }
    Ok(spec.build())
}

/// The batch in the table's column types and order (`target` is the
/// table schema as Arrow, field ids included).
///
/// A value that no cast keeps (a float for a `long` column, text for a
/// `boolean` one) leaves its column null in that row, and the row's whole
/// payload goes to `payload_raw`, so nothing is lost.
pub fn conform(
    events: &[Event],
    batch: (&ArrowSchema, &[ArrayRef]),
    target: Arc<ArrowSchema>,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let (schema, arrays) = batch;
    let rows = events.len();
    let mut misfit = vec![false; rows];
    let mut out: Vec<Option<ArrayRef>> = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let Ok(index) = schema.index_of(field.name()) else {
            out.push(Some(new_null_array(field.data_type(), rows)));
            continue;
        };
        let source = &arrays[index];
        if field.name() == PAYLOAD_RAW {
            // Filled below, once every misfit row is known.
            out.push(None);
            continue;
        }
        out.push(Some(if source.data_type() == field.data_type() {
            source.clone()
        } else if lossless(source.data_type(), field.data_type()) {
            arrow_cast::cast(source, field.data_type())?
        } else {
            for (row, flag) in misfit.iter_mut().enumerate() {
                *flag |= source.is_valid(row);
            }
            new_null_array(field.data_type(), rows)
        }));
    }
    let raw_index = target.index_of(PAYLOAD_RAW).ok();
    let earlier_raw = schema.index_of(PAYLOAD_RAW).ok().map(|i| arrays[i].clone());
    if let Some(i) = raw_index {
        let raw: BinaryArray = events
            .iter()
            .enumerate()
            .map(|(row, e)| {
                let kept = earlier_raw.as_ref().is_some_and(|a| a.is_valid(row));
                (kept || misfit[row]).then_some(&e.payload[..])
            })
            .collect();
        let raw: ArrayRef = Arc::new(raw);
        out[i] = Some(arrow_cast::cast(&raw, target.field(i).data_type())?);
    }
    let columns = out
        .into_iter()
        .map(|a| a.expect("every column is filled"))
        .collect();
    RecordBatch::try_new(target, columns)
}

/// Whether every value of `from` has the same meaning as a `to`.
fn lossless(from: &DataType, to: &DataType) -> bool {
    matches!(
        (from, to),
        (DataType::Int64, DataType::Float64)
            | (DataType::Binary, DataType::LargeBinary)
            | (_, DataType::Utf8)
            | (
                DataType::Timestamp(_, _),
                DataType::Timestamp(TimeUnit::Microsecond, _)
            )
    )
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float64Type;

    use super::*;
    use crate::batch::KeyTemplate;

    fn ev(payload: &str, site: Option<&str>) -> Event {
        let mut e = Event::new(1_795_496_858_123, "t", payload.as_bytes().to_vec());
        if let Some(site) = site {
            e.attributes.push(("site".into(), site.into()));
        }
        e
    }

    fn first_schema(events: &[Event]) -> Schema {
        let (schema, _) = batch_columns(events, "gw", &[]);
        initial_schema(&schema).unwrap()
    }

    #[test]
    fn the_first_batch_makes_the_schema_with_payload_raw() {
        let schema = first_schema(&[ev(r#"{"id":1,"temp":1.5,"ok":true,"name":"a"}"#, None)]);
        let types: Vec<(String, String, bool)> = schema
            .as_struct()
            .fields()
            .iter()
            .map(|f| (f.name.clone(), f.field_type.to_string(), f.required))
            .collect();
        let want = [
            ("ts", "timestamptz", true),
            ("topic", "string", false),
            ("agent", "string", false),
            ("id", "long", false),
            ("name", "string", false),
            ("ok", "boolean", false),
            ("temp", "double", false),
            ("payload_raw", "binary", false),
        ];
        let want: Vec<(String, String, bool)> = want
            .iter()
            .map(|(n, t, r)| (n.to_string(), t.to_string(), *r))
            .collect();
        assert_eq!(types, want);
    }

    #[test]
    fn attributes_in_the_key_become_columns_and_partitions() {
        let template =
            KeyTemplate::parse("x/site={attr.site}/{yyyy}/{MM}/{dd}/{agent}-{batch}.parquet")
                .unwrap();
        let events = [ev(r#"{"id":1}"#, Some("oslo"))];
        let (batch, arrays) = batch_columns(&events, "gw", &["site".to_string()]);
        assert_eq!(
            arrays[batch.index_of("site").unwrap()]
                .as_string::<i32>()
                .value(0),
            "oslo"
        );
        let schema = initial_schema(&batch).unwrap();
        let spec = partition_spec(template.parts(), &schema).unwrap();
        let fields: Vec<String> = spec
            .fields()
            .iter()
            .map(|f| format!("{}:{}", f.name, f.transform))
            .collect();
        assert_eq!(fields, ["ts_day:day", "site:identity"]);
    }

    #[test]
    fn values_that_no_cast_keeps_go_whole_to_payload_raw() {
        let table = first_schema(&[ev(r#"{"id":1,"temp":1.5,"ok":true}"#, None)]);
        let target = Arc::new(iceberg::arrow::schema_to_arrow_schema(&table).unwrap());
        // `id` is long in the table: 2.5 does not fit. `temp` is double: 3
        // fits. `ok` is boolean: "yes" does not fit.
        let events = [
            ev(r#"{"id":2.5,"temp":3,"ok":true}"#, None),
            ev(r#"{"id":3,"temp":4,"ok":"yes"}"#, None),
            ev(r#"{"id":4,"temp":5,"ok":false}"#, None),
            ev("not json", None),
        ];
        // One batch per row keeps each row's own inferred types.
        let rows: Vec<RecordBatch> = events
            .iter()
            .map(|e| {
                let (schema, arrays) = batch_columns(std::slice::from_ref(e), "gw", &[]);
                conform(std::slice::from_ref(e), (&schema, &arrays), target.clone()).unwrap()
            })
            .collect();
        let raw = |b: &RecordBatch| {
            let a = b.column_by_name(PAYLOAD_RAW).unwrap().as_binary::<i64>();
            a.is_valid(0)
                .then(|| String::from_utf8(a.value(0).to_vec()).unwrap())
        };
        assert_eq!(
            raw(&rows[0]).as_deref(),
            Some(r#"{"id":2.5,"temp":3,"ok":true}"#)
        );
        assert!(rows[0].column_by_name("id").unwrap().is_null(0));
        assert_eq!(
            rows[0]
                .column_by_name("temp")
                .unwrap()
                .as_primitive::<Float64Type>()
                .value(0),
            3.0
        );
        assert_eq!(
            raw(&rows[1]).as_deref(),
            Some(r#"{"id":3,"temp":4,"ok":"yes"}"#)
        );
        assert!(rows[1].column_by_name("ok").unwrap().is_null(0));
        assert_eq!(raw(&rows[2]), None);
        assert_eq!(raw(&rows[3]).as_deref(), Some("not json"));
        for row in &rows {
            assert_eq!(row.schema(), target);
        }
    }

    #[test]
    fn new_fields_are_new_columns() {
        let table = first_schema(&[ev(r#"{"id":1}"#, None)]);
        let (batch, _) = batch_columns(&[ev(r#"{"id":1,"humidity":40}"#, None)], "gw", &[]);
        let added: Vec<(String, String)> = new_columns(&batch, &table)
            .into_iter()
            .map(|(n, t)| (n, t.to_string()))
            .collect();
        assert_eq!(added, [("humidity".to_string(), "long".to_string())]);
    }
}
