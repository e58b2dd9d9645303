//! Object key templates: `{sink}/site={attr.site}/year={yyyy}/.../{agent}-{batch}.ndjson.gz`.
//!
//! Everything but `{batch}` is the event's *partition*: the batcher keeps
//! one open batch per partition, so an object never mixes partitions.
//!
//! A key is valid by construction, whatever the data: a value renders as one
//! path segment of safe characters, at most [`MAX_VALUE_LEN`] of them (a
//! longer one renders as [`TOO_LONG`]), and when a key would still pass
//! S3's 1,024-byte limit every data placeholder renders as [`TOO_LONG`].
//! A key S3 refuses would be retried forever and hold up the whole sink.

use std::fmt::Write;

use time::OffsetDateTime;

use crate::event::Event;

/// What a placeholder renders to when its attribute or field is absent.
pub const MISSING: &str = "__missing__";

/// What a data placeholder renders to when its value is longer than
/// [`MAX_VALUE_LEN`], or when the whole key would be too long for S3.
pub const TOO_LONG: &str = "__too_long__";

/// The longest value an `{attr.*}` or `{field.*}` placeholder renders.
pub const MAX_VALUE_LEN: usize = 128;

/// S3's limit on a key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// What a key may grow by after rendering: `{batch}` is counted as its 10
/// digits, and a conflict moves a batch to a key with `-r{ms}-{n}` added.
const KEY_RESERVE: usize = 10 + 24;

/// One piece of a key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
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
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

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

    /// How long the partitions of this template stay the same for events
    /// received one after another: the span of its finest time placeholder
    /// (a day for `{MM}` and `{yyyy}`, which change only at midnight UTC),
    /// forever without one, `None` when data placeholders make each event
    /// render on its own.
    fn partition_span_ms(&self) -> Option<i64> {
        let mut span = i64::MAX;
        for part in &self.parts {
            span = span.min(match part {
                Part::Attr(_) | Part::Field(_) => return None,
                Part::Minute => 60_000,
                Part::Hour => 3_600_000,
                Part::Day | Part::Month | Part::Year => 86_400_000,
                Part::Literal(_) | Part::Agent | Part::Sink | Part::Batch => i64::MAX,
            });
        }
        Some(span)
    }

    /// The same key with and without the batch number, so an object's key
    /// always starts with its partition.
    fn render_with(&self, agent: &str, sink: &str, event: &Event, batch: Option<u64>) -> String {
        let key = self.render_parts(agent, sink, event, batch, true);
        let batch_len = batch.map_or(0, |b| format!("{b:010}").len());
        if key.len() - batch_len + KEY_RESERVE > MAX_KEY_LEN {
            return self.render_parts(agent, sink, event, batch, false);
        }
        key
    }

    /// The longest and the shortest key this template renders for `agent`
    /// and `sink` (data values at [`MAX_VALUE_LEN`], or all [`TOO_LONG`]),
    /// counting what [`KEY_RESERVE`] keeps free.
    pub fn len_bounds(&self, agent: &str, sink: &str) -> (usize, usize) {
        let (mut longest, mut shortest) = (KEY_RESERVE, KEY_RESERVE);
        for part in &self.parts {
            let (most, least) = match part {
                Part::Literal(s) => (s.len(), s.len()),
                Part::Agent => (agent.len(), agent.len()),
                Part::Sink => (sink.len(), sink.len()),
                Part::Year => (4, 4),
                Part::Month | Part::Day | Part::Hour | Part::Minute => (2, 2),
                Part::Batch => (0, 0),
                Part::Attr(_) | Part::Field(_) => (MAX_VALUE_LEN, TOO_LONG.len()),
            };
            longest += most;
            shortest += least;
        }
        (longest, shortest)
    }

    fn render_parts(
        &self,
        agent: &str,
        sink: &str,
        event: &Event,
        batch: Option<u64>,
        with_data: bool,
    ) -> String {
        let t = OffsetDateTime::from_unix_timestamp_nanos(event.ts_ms as i128 * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let fields = self
            .parts
            .iter()
            .any(|p| with_data && matches!(p, Part::Field(_)))
            .then(|| top_level_fields(&event.payload))
            .flatten();
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Agent => out.push_str(agent),
                Part::Sink => out.push_str(sink),
                // Runs per event on the spool writer: no `fmt`.
                Part::Year => push_padded(&mut out, t.year().clamp(0, 9999) as u32, 4),
                Part::Month => push_padded(&mut out, u8::from(t.month()).into(), 2),
                Part::Day => push_padded(&mut out, t.day().into(), 2),
                Part::Hour => push_padded(&mut out, t.hour().into(), 2),
                Part::Minute => push_padded(&mut out, t.minute().into(), 2),
                Part::Batch => {
                    if let Some(batch) = batch {
                        write!(out, "{batch:010}").expect("to a String")
                    }
                }
                Part::Attr(_) | Part::Field(_) if !with_data => out.push_str(TOO_LONG),
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

/// Renders partitions for the spool, once per time span for templates
/// without data placeholders: it runs for every event on the spool writer.
pub struct PartitionCache {
    template: KeyTemplate,
    agent: String,
    sink: String,
    span_ms: Option<i64>,
    /// The span and the partition rendered last.
    last: std::sync::Mutex<Option<(i64, String)>>,
}

impl PartitionCache {
    pub fn new(template: KeyTemplate, agent: &str, sink: &str) -> PartitionCache {
        PartitionCache {
            span_ms: template.partition_span_ms(),
            template,
            agent: agent.to_string(),
            sink: sink.to_string(),
            last: std::sync::Mutex::new(None),
        }
    }

    pub fn partition(&self, event: &Event) -> String {
        let Some(span_ms) = self.span_ms else {
            return self.template.partition(&self.agent, &self.sink, event);
        };
        let span = event.ts_ms.div_euclid(span_ms);
        let mut last = self.last.lock().expect("lock");
        match &*last {
            Some((at, partition)) if *at == span => partition.clone(),
            _ => {
                let partition = self.template.partition(&self.agent, &self.sink, event);
                *last = Some((span, partition.clone()));
                partition
            }
        }
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

/// `n` in decimal, zero-padded to `width` digits (`n` has at most `width`).
fn push_padded(out: &mut String, n: u32, width: u32) {
    for i in (0..width).rev() {
        out.push(char::from(b'0' + (n / 10u32.pow(i) % 10) as u8));
    }
}

/// Appends a data value as one safe path segment: characters that would
/// add segments or need escaping in S3 keys and Hive paths become `_`.
fn push_value(out: &mut String, value: Option<&str>) {
    match value {
        None | Some("") | Some(".") | Some("..") => out.push_str(MISSING),
        // Each character renders as one byte.
        Some(v) if v.chars().nth(MAX_VALUE_LEN).is_some() => out.push_str(TOO_LONG),
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
    fn the_partition_cache_renders_what_the_template_does_across_span_edges() {
        let templates = [
            "{sink}/{yyyy}/{MM}/{dd}/{HH}/{mm}/{agent}-{batch}.gz",
            "{sink}/{yyyy}/{MM}/{dd}/{HH}/{batch}.gz",
            "{sink}/year={yyyy}/month={MM}/{batch}.gz",
            "{sink}/{batch}.gz",
            "{sink}/site={attr.site}/{HH}/{batch}.gz",
            "{sink}/{field.device}/{batch}.gz",
        ];
        let minute = 60_000;
        let day = 86_400_000;
        // Around midnight at a month's and a year's end, and before 1970.
        let ts: Vec<i64> = [1_798_761_600_000i64, 1_796_083_200_000, 0, -day]
            .into_iter()
            .flat_map(|edge| {
                [
                    -minute - 1,
                    -minute,
                    -1,
                    0,
                    1,
                    minute - 1,
                    minute,
                    3_600_000,
                ]
                .map(|d| edge + d)
            })
            .collect();
        for template in templates {
            let parsed = KeyTemplate::parse(template).unwrap();
            let cache = PartitionCache::new(parsed.clone(), "gw", "lake");
            for (i, ts) in ts.iter().enumerate() {
                let mut event = Event::new(*ts, "t", format!(r#"{{"device":"d{}"}}"#, i % 3));
                event
                    .attributes
                    .push(("site".into(), format!("s{}", i % 2)));
                assert_eq!(
                    cache.partition(&event),
                    parsed.partition("gw", "lake", &event),
                    "{template} at {ts}"
                );
            }
        }
    }

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
    fn long_values_and_keys_render_as_too_long_and_fit_s3() {
        let t = KeyTemplate::parse("p/site={field.site}/{attr.a}/{batch}.ndjson.gz").unwrap();
        let event = |site: &str, a: &str| {
            let mut e = Event::new(0, "t", format!(r#"{{"site":"{site}"}}"#).into_bytes());
            e.attributes.push(("a".into(), a.into()));
            e
        };
        let at_cap = "s".repeat(MAX_VALUE_LEN);
        let key = t.render("g", "s", &event(&at_cap, "x"), 1);
        assert_eq!(key, format!("p/site={at_cap}/x/0000000001.ndjson.gz"));
        let over = "é".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(
            t.partition("g", "s", &event(&over, "x")),
            "p/site=__too_long__/x/.ndjson.gz"
        );

        let many = KeyTemplate::parse(
            &(0..10)
                .map(|i| format!("{{attr.a}}-{i}"))
                .collect::<Vec<_>>()
                .join("/")
                .replace("-0", "-0/{batch}"),
        )
        .unwrap();
        let (longest, shortest) = many.len_bounds("g", "s");
        assert!(longest > MAX_KEY_LEN && shortest < MAX_KEY_LEN);
        let e = event("x", &at_cap);
        let key = many.render("g", "s", &e, 12_345_678_901);
        assert!(key.len() <= MAX_KEY_LEN - 24, "{} bytes", key.len());
        assert!(key.starts_with("__too_long__-0/12345678901/__too_long__-1"));
        assert!(
            key.starts_with(
                &many
                    .partition("g", "s", &e)
                    .replace("-0/", "-0/12345678901")
            )
        );
        let short = event("x", "short");
        assert!(
            many.render("g", "s", &short, 1)
                .starts_with("short-0/0000000001/short-1")
        );
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
