//! Ledger of sent events and the comparison with what reached the lake.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use super::lake::Snapshot;
use super::payload::Body;

#[derive(Debug, Clone)]
pub struct ExpectedEvent {
    pub topic: String,
    pub body: Body,
}

/// Every event a test sent (acknowledged or not), by id.
#[derive(Debug, Default)]
pub struct Expected {
    pub events: HashMap<String, ExpectedEvent>,
    /// Agent id every record must carry.
    pub agent: String,
}

impl Expected {
    pub fn new(agent: &str) -> Expected {
        Expected {
            events: HashMap::new(),
            agent: agent.to_string(),
        }
    }

    pub fn add(&mut self, id: &str, topic: &str, body: Body) {
        let prev = self.events.insert(
            id.to_string(),
            ExpectedEvent {
                topic: topic.to_string(),
                body,
            },
        );
        assert!(prev.is_none(), "test bug: id {id} used twice");
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }
}

/// Outcome of comparing a lake snapshot with the ledger.
#[derive(Debug, Default)]
pub struct Verdict {
    pub records: usize,
    pub objects: usize,
    pub distinct: usize,
    pub must: usize,
    /// Ids that had to be present and are not.
    pub missing: Vec<String>,
    /// Ids present more than once, with their count.
    pub duplicated: Vec<(String, usize)>,
    /// Records whose id is unknown to the ledger (or that carry no id).
    pub unknown: Vec<String>,
    /// Records whose topic, agent, ts or payload differ from what was sent.
    pub mismatched: Vec<String>,
    pub problems: Vec<(String, String)>,
}

fn ts_ok(ts: &str) -> bool {
    // 2026-11-24T05:46:38.123Z
    let b = ts.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && ts.chars().filter(|c| c.is_ascii_digit()).count() == 17
}

impl Verdict {
    /// `must`: ids that have to be in the lake (at least once).
    pub fn compute<'a>(
        expected: &Expected,
        must: impl IntoIterator<Item = &'a String>,
        snap: &Snapshot,
    ) -> Verdict {
        let mut v = Verdict {
            records: snap.records.len(),
            objects: snap.objects,
            ..Default::default()
        };
        v.problems = snap.problems.clone();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in &snap.records {
            let Some(id) = r.id() else {
                v.unknown
                    .push(format!("<no id> in {}: {:?}", r.object, short(&r.body)));
                continue;
            };
            let Some(exp) = expected.events.get(&id) else {
                v.unknown.push(format!("{id} (in {})", r.object));
                continue;
            };
            *counts.entry(id.clone()).or_default() += 1;
            if counts[&id] > 1 {
                continue; // compare content once
            }
            let mut why = Vec::new();
            if r.topic.as_deref() != Some(exp.topic.as_str()) {
                why.push(format!("topic {:?} != {:?}", r.topic, exp.topic));
            }
            if r.agent.as_deref() != Some(expected.agent.as_str()) {
                why.push(format!("agent {:?} != {:?}", r.agent, expected.agent));
            }
            match r.ts.as_deref() {
                Some(ts) if ts_ok(ts) => {}
                other => why.push(format!("ts {other:?} is not like 2026-11-24T05:46:38.123Z")),
            }
            if r.body != exp.body {
                why.push(match (&r.body, &exp.body) {
                    (Body::Binary(_), Body::Json(_)) => {
                        "JSON payload came back as payload_b64".to_string()
                    }
                    (Body::Json(_), Body::Binary(_)) => {
                        "binary payload came back as JSON".to_string()
                    }
                    (Body::Binary(a), Body::Binary(b)) => {
                        format!("binary payload differs (len {} vs {})", a.len(), b.len())
                    }
                    (Body::Json(a), Body::Json(b)) => {
                        format!("JSON payload differs: {}", json_diff(a, b, "payload"))
                    }
                });
            }
            if !why.is_empty() {
                v.mismatched
                    .push(format!("{id} (in {}): {}", r.object, why.join("; ")));
            }
        }
        v.distinct = counts.len();
        let mut must_n = 0;
        for id in must {
            must_n += 1;
            if !counts.contains_key(id) {
                v.missing.push(id.clone());
            }
        }
        v.must = must_n;
        v.duplicated = counts.into_iter().filter(|(_, c)| *c > 1).collect();
        v.missing.sort();
        v.duplicated.sort();
        v
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let dup_extra: usize = self.duplicated.iter().map(|(_, c)| c - 1).sum();
        writeln!(
            s,
            "lake: {} objects, {} records, {} distinct ids; required {}: missing {}, duplicated ids {} ({} extra copies), unknown {}, mismatched {}, unreadable {}",
            self.objects,
            self.records,
            self.distinct,
            self.must,
            self.missing.len(),
            self.duplicated.len(),
            dup_extra,
            self.unknown.len(),
            self.mismatched.len(),
            self.problems.len()
        )
        .unwrap();
        let list = |s: &mut String, name: &str, items: Vec<String>| {
            if !items.is_empty() {
                let n = items.len();
                let head: Vec<_> = items.into_iter().take(12).collect();
                writeln!(
                    s,
                    "  {name} (first {} of {n}): {}",
                    head.len(),
                    head.join(", ")
                )
                .unwrap();
            }
        };
        list(&mut s, "missing", group_missing(&self.missing));
        list(
            &mut s,
            "duplicated",
            self.duplicated
                .iter()
                .map(|(i, c)| format!("{i} x{c}"))
                .collect(),
        );
        list(&mut s, "unknown", self.unknown.clone());
        list(&mut s, "mismatched", self.mismatched.clone());
        list(
            &mut s,
            "unreadable",
            self.problems
                .iter()
                .map(|(o, p)| format!("{o}: {p}"))
                .collect(),
        );
        s
    }

    pub fn is_exactly_once(&self) -> bool {
        self.is_at_least_once() && self.duplicated.is_empty()
    }

    pub fn is_at_least_once(&self) -> bool {
        self.missing.is_empty()
            && self.unknown.is_empty()
            && self.mismatched.is_empty()
            && self.problems.is_empty()
    }

    pub fn assert_exactly_once(&self) {
        assert!(
            self.is_exactly_once(),
            "lake is not exactly-once:\n{}",
            self.summary()
        );
    }

    pub fn assert_at_least_once(&self) {
        assert!(
            self.is_at_least_once(),
            "lake is missing acknowledged events or has bad records:\n{}",
            self.summary()
        );
    }
}

/// Groups missing ids by prefix (the part before the last '-') with counts,
/// so a failure shows at a glance which kind of event was lost.
fn group_missing(ids: &[String]) -> Vec<String> {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        let p = id.rsplit_once('-').map(|(p, _)| p).unwrap_or(id);
        *by.entry(p).or_default() += 1;
    }
    let mut out: Vec<String> = by
        .into_iter()
        .map(|(p, n)| format!("[{p}-*: {n}]"))
        .collect();
    out.extend(ids.iter().take(12).cloned());
    out
}

/// First difference between two JSON values, as `path: got vs want`.
fn json_diff(got: &serde_json::Value, want: &serde_json::Value, path: &str) -> String {
    use serde_json::Value;
    match (got, want) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, wv) in b {
                match a.get(k) {
                    None => return format!("{path}.{k} missing"),
                    Some(gv) if gv != wv => return json_diff(gv, wv, &format!("{path}.{k}")),
                    _ => {}
                }
            }
            if let Some(k) = a.keys().find(|k| !b.contains_key(*k)) {
                return format!("{path}.{k} unexpected");
            }
            format!("{path}: {} vs {}", trunc(got), trunc(want))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if x != y {
                    return json_diff(x, y, &format!("{path}[{i}]"));
                }
            }
            format!("{path}: {} vs {}", trunc(got), trunc(want))
        }
        _ => format!("{path}: got {} want {}", trunc(got), trunc(want)),
    }
}

fn short(b: &Body) -> String {
    match b {
        Body::Json(v) => trunc(v),
        Body::Binary(x) => format!("{} bytes", x.len()),
    }
}

fn trunc(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!(
            "{}...",
            &s[..s
                .char_indices()
                .take_while(|(i, _)| *i < 120)
                .last()
                .map(|(i, _)| i)
                .unwrap_or(0)]
        )
    } else {
        s
    }
}

/// Ids as a set of owned strings.
pub fn id_set<'a>(ids: impl IntoIterator<Item = &'a String>) -> HashSet<String> {
    ids.into_iter().cloned().collect()
}
