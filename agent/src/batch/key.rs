//! Object key templates: `{sink}/site={attr.site}/year={yyyy}/.../{agent}-{batch}.ndjson.gz`.
//!
//! Everything but `{batch}` is the event's *partition*: the batcher keeps
//! one open batch per partition, so an object never mixes partitions.

use std::fmt::Write;

use time::OffsetDateTime;

use crate::event::Event;

/// What a placeholder renders to when its attribute or field is absent.
pub const MISSING: &str = "__missing__";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Agent,
    Sink,
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Batch,
    Attr(String),
    Field(String),
}

/// A parsed key template. Time placeholders use the event's receive time
/// (UTC), so data lands in the partition it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
}

pub const PLACEHOLDERS: &str =
    "{agent} {sink} {yyyy} {MM} {dd} {HH} {mm} {batch} {attr.NAME} {field.NAME}";

impl KeyTemplate {
    pub fn parse(template: &str) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in key template `{template}`"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "agent" => Part::Agent,
                "sink" => Part::Sink,
                "yyyy" => Part::Year,
                "MM" => Part::Month,
                "dd" => Part::Day,
                "HH" => Part::Hour,
                "mm" => Part::Minute,
                "batch" => Part::Batch,
                other if other.starts_with("attr.") && other.len() > 5 => {
                    Part::Attr(other[5..].to_string())
                }
                other if other.starts_with("field.") && other.len() > 6 => {
                    Part::Field(other[6..].to_string())
                }
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in key template; known: {PLACEHOLDERS}"
                    ));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("stray `}}` in key template `{template}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if !parts.contains(&Part::Batch) {
            return Err(
                "key template must contain {batch}: without it a later batch would overwrite an earlier object"
                    .to_string(),
            );
        }
        if template.starts_with('/') || template.split('/').any(|s| s.is_empty() || s == "..") {
            return Err(format!(
                "key template `{template}` has an empty, leading-slash or `..` path segment"
            ));
        }
        Ok(KeyTemplate { parts })
    }

    /// The full object key of a batch whose events render like `event`.
    pub fn render(&self, agent: &str, sink: &str, event: &Event, batch: u64) -> String {
        self.render_with(agent, sink, event, Some(batch))
    }

    /// The key with `{batch}` left out: events with equal partitions may
    /// share an object.
    pub fn partition(&self, agent: &str, sink: &str, event: &Event) -> String {
        self.render_with(agent, sink, event, None)
    }

    fn render_with(&self, agent: &str, sink: &str, event: &Event, batch: Option<u64>) -> String {
        let t = OffsetDateTime::from_unix_timestamp_nanos(event.ts_ms as i128 * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let fields = self
            .parts
            .iter()
            .any(|p| matches!(p, Part::Field(_)))
            .then(|| top_level_fields(&event.payload))
            .flatten();
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Agent => out.push_str(agent),
                Part::Sink => out.push_str(sink),
                // Runs per event on the spool writer: write in place.
                Part::Year => write!(out, "{:04}", t.year()).expect("to a String"),
                Part::Month => write!(out, "{:02}", u8::from(t.month())).expect("to a String"),
                Part::Day => write!(out, "{:02}", t.day()).expect("to a String"),
                Part::Hour => write!(out, "{:02}", t.hour()).expect("to a String"),
                Part::Minute => write!(out, "{:02}", t.minute()).expect("to a String"),
                Part::Batch => {
                    if let Some(batch) = batch {
                        write!(out, "{batch:010}").expect("to a String")
                    }
                }
                Part::Attr(name) => push_value(&mut out, event.attribute(name)),
                Part::Field(name) => {
                    let value = fields.as_ref().and_then(|f| f.get(name.as_str()));
                    push_value(&mut out, value.and_then(scalar_text).as_deref())
                }
            }
        }
        out
    }
}

/// The payload's top-level fields, if it is a JSON object.
fn top_level_fields(
    payload: &[u8],
) -> Option<std::collections::HashMap<String, serde_json::Value>> {
    serde_json::from_slice(payload).ok()
}

fn scalar_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Appends a data value as one safe path segment: characters that would
/// add segments or need escaping in S3 keys and Hive paths become `_`.
fn push_value(out: &mut String, value: Option<&str>) {
    match value {
        None | Some("") | Some(".") | Some("..") => out.push_str(MISSING),
        Some(v) => out.extend(v.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@') {
                c
            } else {
                '_'
            }
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder() {
        let t = KeyTemplate::parse(
            "{sink}/y={yyyy}/m={MM}/d={dd}/h={HH}/{mm}/{agent}-{batch}.ndjson.gz",
        )
        .unwrap();
        // 2026-11-24T05:07:38.123Z
        let key = t.render(
            "gw-01",
            "lake",
            &Event::new(1_795_496_858_123, "t", Vec::new()),
            42,
        );
        assert_eq!(
            key,
            "lake/y=2026/m=11/d=24/h=05/07/gw-01-0000000042.ndjson.gz"
        );
    }

    #[test]
    fn attributes_and_fields_render_as_safe_segments() {
        let t = KeyTemplate::parse("{attr.site}/m={field.metric}/{field.n}/{batch}").unwrap();
        let mut e = Event::new(0, "t", br#"{"metric":"temp/c","n":7,"o":{}}"#.to_vec());
        e.attributes.push(("site".into(), "berlin 1".into()));
        assert_eq!(t.render("a", "s", &e, 1), "berlin_1/m=temp_c/7/0000000001");
        assert_eq!(t.partition("a", "s", &e), "berlin_1/m=temp_c/7/");
        let bare = Event::new(0, "t", b"not json".to_vec());
        assert_eq!(
            t.partition("a", "s", &bare),
            "__missing__/m=__missing__/__missing__/"
        );
        let t = KeyTemplate::parse("{field.o}/{attr.x}/{batch}").unwrap();
        assert_eq!(t.partition("a", "s", &e), "__missing__/__missing__/");
        assert!(KeyTemplate::parse("{attr.}/{batch}").is_err());
    }

    #[test]
    fn rejects_templates_that_would_overwrite_or_escape() {
        assert!(
            KeyTemplate::parse("{sink}/{agent}.ndjson")
                .unwrap_err()
                .contains("{batch}")
        );
        assert!(
            KeyTemplate::parse("{sink}/{bogus}/{batch}")
                .unwrap_err()
                .contains("bogus")
        );
        assert!(
            KeyTemplate::parse("{sink}/{batch")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(KeyTemplate::parse("/{batch}").is_err());
        assert!(KeyTemplate::parse("a/../{batch}").is_err());
        assert!(KeyTemplate::parse("a//{batch}").is_err());
    }
}
