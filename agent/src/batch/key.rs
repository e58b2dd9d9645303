//! Object key templates: `{sink}/year={yyyy}/.../{agent}-{batch}.ndjson.gz`.

use time::OffsetDateTime;

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
}

/// A parsed key template. Time placeholders use the batch's first event
/// (UTC), so a batch lands in the partition its data belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
}

pub const PLACEHOLDERS: &str = "{agent} {sink} {yyyy} {MM} {dd} {HH} {mm} {batch}";

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

    pub fn render(&self, agent: &str, sink: &str, ts_ms: i64, batch: u64) -> String {
        let t = OffsetDateTime::from_unix_timestamp_nanos(ts_ms as i128 * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Agent => out.push_str(agent),
                Part::Sink => out.push_str(sink),
                Part::Year => out.push_str(&format!("{:04}", t.year())),
                Part::Month => out.push_str(&format!("{:02}", u8::from(t.month()))),
                Part::Day => out.push_str(&format!("{:02}", t.day())),
                Part::Hour => out.push_str(&format!("{:02}", t.hour())),
                Part::Minute => out.push_str(&format!("{:02}", t.minute())),
                Part::Batch => out.push_str(&format!("{batch:010}")),
            }
        }
        out
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
        let key = t.render("gw-01", "lake", 1_795_496_858_123, 42);
        assert_eq!(
            key,
            "lake/y=2026/m=11/d=24/h=05/07/gw-01-0000000042.ndjson.gz"
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
