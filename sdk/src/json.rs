//! Small JSON helpers shared by plugins that address fields by name.

use serde_json::Value;

/// Look up a dotted path (`"meta.device"`) in a JSON value. Each segment
/// indexes an object by key, or an array by a decimal index. A key that
/// itself contains a dot cannot be addressed; plugins document this.
pub fn get_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, seg| match v {
        Value::Object(map) => map.get(seg),
        Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// Text form of a JSON value for use as a key or attribute: strings without
/// quotes, everything else as compact JSON (`42`, `true`, `{"a":1}`).
pub fn to_key_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        let v = json!({"a": {"b": [10, {"c": "x"}]}, "n": 1});
        assert_eq!(get_path(&v, "n"), Some(&json!(1)));
        assert_eq!(get_path(&v, "a.b.1.c"), Some(&json!("x")));
        assert_eq!(get_path(&v, "a.b.7"), None);
        assert_eq!(get_path(&v, "n.x"), None);
    }

    #[test]
    fn key_strings() {
        assert_eq!(to_key_string(&json!("dev-1")), "dev-1");
        assert_eq!(to_key_string(&json!(42)), "42");
        assert_eq!(to_key_string(&json!({"a": 1})), r#"{"a":1}"#);
    }
}
