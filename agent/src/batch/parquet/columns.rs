//! Which columns a batch's payloads make, and their values.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow_schema::DataType;
use serde_json::{Map, Value};

/// Top-level payload fields that would clash with the fixed columns; they
/// are written as `payload.<name>`.
const RESERVED: [&str; 4] = ["ts", "topic", "agent", "payload_raw"];

/// Visits every field of a payload object, nested ones too, with its column
/// name; descends into an object field only if `visit` returns true.
fn walk<'a>(
    map: &'a Map<String, Value>,
    prefix: Option<&str>,
    visit: &mut impl FnMut(&str, &'a Value) -> bool,
) {
    for (key, value) in map {
        let name = match prefix {
            Some(prefix) => format!("{prefix}.{key}"),
            None if RESERVED.contains(&key.as_str()) => format!("payload.{key}"),
            None => key.clone(),
        };
        if visit(&name, value)
            && let Value::Object(inner) = value
        {
            walk(inner, Some(&name), visit);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    Null,
    Object,
    Value,
}

/// Every name that holds an object in some payload, mapped to whether it
/// also holds a value in another. Such objects are flattened, except at
/// names that also hold values: there the column keeps them whole as JSON
/// text, so it can hold both.
///
/// Also moves to `payload_raw` any object in which two fields get the same
/// name (keys with dots in them, or a literal `payload.ts` next to `ts`):
/// no set of columns could hold both values.
pub(super) fn object_names(rows: &mut [Option<Map<String, Value>>]) -> HashMap<String, bool> {
    let mut seen: HashMap<String, (bool, bool)> = HashMap::new();
    let mut names: Vec<(String, Shape)> = Vec::new();
    for row in rows.iter_mut() {
        let Some(map) = row else { continue };
        names.clear();
        walk(map, None, &mut |name, value| {
            let shape = match value {
                Value::Null => Shape::Null,
                Value::Object(_) => Shape::Object,
                _ => Shape::Value,
            };
            names.push((name.to_owned(), shape));
            true
        });
        names.sort_unstable();
        if names.windows(2).any(|w| w[0].0 == w[1].0) {
            *row = None;
            continue;
        }
        for (name, shape) in names.drain(..) {
            let (object, value) = seen.entry(name).or_default();
            *object |= shape == Shape::Object;
            *value |= shape == Shape::Value;
        }
    }
    seen.into_iter()
        .filter(|(_, (object, _))| *object)
        .map(|(name, (_, value))| (name, value))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Int,
    Float,
    Str,
    /// Any mix that no one type holds, and arrays: text (strings as they
    /// are, other values as JSON).
    Json,
}

impl Kind {
    fn of(value: &Value) -> Kind {
        match value {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Bool,
            Value::Number(n) if n.is_i64() => Kind::Int,
            // Including integers above i64::MAX: only Float64 holds those.
            Value::Number(_) => Kind::Float,
            Value::String(_) => Kind::Str,
            Value::Array(_) | Value::Object(_) => Kind::Json,
        }
    }

    fn widen(self, other: Kind) -> Kind {
        match (self, other) {
            (a, b) if a == b => a,
            (Kind::Null, k) | (k, Kind::Null) => k,
            (Kind::Int, Kind::Float) | (Kind::Float, Kind::Int) => Kind::Float,
            _ => Kind::Json,
        }
    }
}

/// One payload column: its type so far and each row's value (`None` for
/// missing or JSON null).
pub(super) struct Column<'a> {
    kind: Kind,
    values: Vec<Option<&'a Value>>,
}

pub(super) fn payload_columns<'a>(
    rows: &'a [Option<Map<String, Value>>],
    objects: &HashMap<String, bool>,
) -> BTreeMap<String, Column<'a>> {
    let mut columns: BTreeMap<String, Column<'a>> = BTreeMap::new();
    for (row, map) in rows.iter().enumerate() {
        let Some(map) = map else { continue };
        walk(map, None, &mut |name, value| {
            match (value, objects.get(name)) {
                (_, Some(true)) => {}
                (Value::Object(_), _) => return true,
                // The flattened columns already say "no value" here.
                (Value::Null, Some(false)) => return false,
                _ => {}
            }
            if !columns.contains_key(name) {
                let values = vec![None; rows.len()];
                let column = Column {
                    kind: Kind::Null,
                    values,
                };
                columns.insert(name.to_owned(), column);
            }
            let column = columns.get_mut(name).expect("inserted above");
            column.kind = column.kind.widen(Kind::of(value));
            if !value.is_null() {
                column.values[row] = Some(value);
            }
            false
        });
    }
    columns
}

impl Column<'_> {
    pub(super) fn to_array(&self) -> (DataType, ArrayRef) {
        let values = self.values.iter().copied();
        match self.kind {
            Kind::Bool => (
                DataType::Boolean,
                Arc::new(values.map(|v| v?.as_bool()).collect::<BooleanArray>()),
            ),
            Kind::Int => (
                DataType::Int64,
                Arc::new(values.map(|v| v?.as_i64()).collect::<Int64Array>()),
            ),
            Kind::Float => (
                DataType::Float64,
                Arc::new(values.map(|v| v?.as_f64()).collect::<Float64Array>()),
            ),
            Kind::Str => (
                DataType::Utf8,
                Arc::new(values.map(|v| v?.as_str()).collect::<StringArray>()),
            ),
            // A field that is null everywhere still gets a column, of the
            // type any reader accepts. Strings stay as they are, so the
            // column matches a plain string column of another batch, and a
            // number reads as the text a reader's int/float -> string cast
            // gives.
            Kind::Json | Kind::Null => (
                DataType::Utf8,
                Arc::new(
                    values
                        .map(|v| {
                            v.map(|v| match v {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                        })
                        .collect::<StringArray>(),
                ),
            ),
        }
    }
}
