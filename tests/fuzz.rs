//! Property fuzzing of the two parsers that read untrusted bytes: the spool
//! record decoder (disk) and the config loader (operators' files).
//!
//! `PROPTEST_CASES` sets the cases per property (proptest's default: 256),
//! e.g. `PROPTEST_CASES=20000 cargo test -p silt-agent --test fuzz -- --nocapture`.
//! Each property prints its case count and time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use silt::event::Event;
use silt::spool::{decode_chunk, encode_chunk};

/// A chunk of one event, the unit these properties are stated for.
fn encode(e: &Event) -> Vec<u8> {
    encode_chunk(std::slice::from_ref(e))
}

fn decode(raw: &[u8]) -> Result<Event, silt::spool::DecodeError> {
    let mut events = decode_chunk(raw)?;
    match events.len() {
        1 => Ok(events.pop().expect("one")),
        _ => Err(silt::spool::DecodeError::Truncated("event count")),
    }
}

const FILE: &str = "fuzz/silt.toml";

fn config() -> Config {
    // Config::default() reads PROPTEST_CASES.
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs one property with `config()` and prints how long it took.
fn run<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let cfg = config();
    let cases = cfg.cases;
    let t = Instant::now();
    let mut runner = TestRunner::new(cfg);
    let result = runner.run(&strategy, test);
    println!(
        "fuzz {name}: {cases} cases in {:.2?} ({:.0} cases/s)",
        t.elapsed(),
        cases as f64 / t.elapsed().as_secs_f64().max(1e-9)
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

fn event() -> impl Strategy<Value = Event> {
    (
        any::<i64>(),
        ".{0,40}",
        prop::collection::vec((".{0,12}", ".{0,24}"), 0..4),
        prop::collection::vec(any::<u8>(), 0..1_500),
    )
        .prop_map(|(ts_ms, topic, attributes, payload)| Event {
            ts_ms,
            topic,
            attributes,
            payload: Bytes::from(payload),
        })
}

#[test]
fn decode_never_panics_on_arbitrary_bytes() {
    run(
        "spool decode(arbitrary bytes)",
        prop::collection::vec(any::<u8>(), 0..600),
        |raw| {
            let _ = decode(&raw);
            Ok(())
        },
    );
}

/// Random bytes behind a correct checksum, so the decoder's length and
/// UTF-8 handling is reached (plain random bytes stop at the checksum).
#[test]
fn decode_never_panics_behind_a_valid_checksum() {
    let parsed = AtomicU64::new(0);
    run(
        "spool decode(valid crc + arbitrary body)",
        (
            prop::collection::vec(any::<u8>(), 0..400),
            prop::bool::weighted(0.8),
            // The chunk layouts silt reads: 2 (fixed-width) and 3 (varints).
            2u8..=3,
        ),
        |(mut body, version_ok, version)| {
            if version_ok && body.len() >= 5 {
                body[0] = version;
                body[1..5].copy_from_slice(&1u32.to_le_bytes());
            }
            let mut raw = crc32fast::hash(&body).to_le_bytes().to_vec();
            raw.extend_from_slice(&body);
            if decode(&raw).is_ok() {
                parsed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        },
    );
    println!(
        "  ({} of them decoded to an event)",
        parsed.load(Ordering::Relaxed)
    );
}

/// An encoded event with its body mutated and the checksum fixed up: the
/// decoder meets near-valid length fields. Whatever decodes must encode
/// back to the same bytes (the format has one encoding per event).
#[test]
fn decode_mutated_records_behind_a_valid_checksum() {
    let parsed = AtomicU64::new(0);
    run(
        "spool decode(mutated record, crc fixed)",
        (
            event(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
        ),
        |(e, edits)| {
            let mut raw = encode(&e);
            for (at, byte, op) in &edits {
                let i = 4 + at.index(raw.len() - 3);
                match op {
                    0 if i < raw.len() => raw[i] = *byte,
                    1 => raw.insert(i, *byte),
                    _ if i < raw.len() => {
                        raw.remove(i);
                    }
                    _ => raw.push(*byte),
                }
            }
            let crc = crc32fast::hash(&raw[4..]);
            raw[..4].copy_from_slice(&crc.to_le_bytes());
            if let Ok(back) = decode(&raw) {
                parsed.fetch_add(1, Ordering::Relaxed);
                prop_assert_eq!(encode(&back), raw, "decoded {:?}", back);
            }
            Ok(())
        },
    );
    println!(
        "  ({} of them still decoded, and re-encoded to the same bytes)",
        parsed.load(Ordering::Relaxed)
    );
}

#[test]
fn encode_roundtrips_and_bit_flips_are_detected() {
    run(
        "spool encode -> 1..=3 bit flips -> decode",
        (
            event(),
            prop::collection::vec(any::<prop::sample::Index>(), 1..=3),
        ),
        |(e, flips)| {
            let raw = encode(&e);
            let back = decode(&raw);
            prop_assert_eq!(back, Ok(e.clone()));
            let bits = raw.len() * 8;
            let mut positions: Vec<usize> = flips.iter().map(|i| i.index(bits)).collect();
            positions.sort_unstable();
            positions.dedup();
            let mut bad = raw.clone();
            for p in &positions {
                bad[p / 8] ^= 1 << (p % 8);
            }
            prop_assert!(
                decode(&bad).is_err(),
                "flipping bits {:?} of a {}-byte record went unnoticed",
                positions,
                raw.len()
            );
            Ok(())
        },
    );
}

#[test]
fn truncated_records_are_detected() {
    run(
        "spool encode -> truncate -> decode",
        (event(), any::<prop::sample::Index>()),
        |(e, cut)| {
            let raw = encode(&e);
            let len = cut.index(raw.len());
            prop_assert!(
                decode(&raw[..len]).is_err(),
                "truncation to {len} went unnoticed"
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- config

const SEEDS: &[&str] = &[
    include_str!("../configs/mqtt-s3.toml"),
    include_str!("../configs/quickstart.toml"),
    r#"[agent]
id = "gw"
data_dir = "/tmp/x"
[spool]
max_bytes = "1MiB"
when_full = "drop_oldest"
min_free = "0B"
[sources.m]
type = "mqtt"
url = "mqtt://127.0.0.1:1883"
topics = ["a/#"]
[sources.h]
type = "http"
listen = "127.0.0.1:8080"
[transforms.t]
plugin = "/nonexistent.wasm"
inputs = ["m"]
config = { a = 1 }
[sinks.f]
type = "file"
inputs = ["t", "h"]
path = "/tmp/lake"
batch = { max_records = 10, max_bytes = "1KiB", max_age = "1s" }
"#,
];

/// Pieces that mutations splice in: section headers, keys, values and
/// TOML syntax that the loader must reject with a located error.
const TOKENS: &[&str] = &[
    "[agent]",
    "[spool]",
    "[sources.x]",
    "[sinks.y]",
    "[transforms.z]",
    "[[sinks]]",
    "[sources]",
    "type = \"mqtt\"",
    "type = \"http\"",
    "type = \"s3\"",
    "type = \"file\"",
    "type = 7",
    "inputs = [\"x\"]",
    "inputs = []",
    "max_bytes = \"-1B\"",
    "max_bytes = \"99999999999999999999GiB\"",
    "max_age = \"forever\"",
    "timeout = \"0s\"",
    "qos = 2",
    "qos = -1",
    "url = \"mqtt://\"",
    "listen = \"nope\"",
    "key = \"{batch\"",
    "key = \"{nope}\"",
    "batch = { max_records = 0 }",
    "id = \"\"",
    "${UNSET_FUZZ_VAR}",
    "${FUZZ VAR}",
    "${",
    "$$",
    "\"",
    "'''",
    "\"\"\"",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "#",
    "\n",
    "\r\n",
    "\t",
    "\u{0}",
    "é",
    "🦀",
    "1e999",
    "0x",
    "1979-05-27T07:32:00Z",
    "true",
    "nan",
    "a.b.c = 1",
];

#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    SwapLines(prop::sample::Index, prop::sample::Index),
    InsertToken(prop::sample::Index, prop::sample::Index),
    ReplaceByte(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::DeleteLine),
        any::<prop::sample::Index>().prop_map(Mutation::DuplicateLine),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Mutation::InsertToken(a, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(a, b)| Mutation::ReplaceByte(a, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    match m {
        Mutation::DeleteLine(i) => {
            lines.remove(i.index(lines.len()));
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i.index(lines.len())].clone();
            lines.insert(i.index(lines.len()), l);
        }
        Mutation::SwapLines(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
        }
        Mutation::InsertToken(at, tok) => {
            let tok = TOKENS[tok.index(TOKENS.len())];
            let mut s = lines.join("\n");
            let mut pos = at.index(s.len() + 1);
            while !s.is_char_boundary(pos) {
                pos -= 1;
            }
            s.insert_str(pos, tok);
            return s;
        }
        Mutation::ReplaceByte(at, b) => {
            let mut bytes = lines.join("\n").into_bytes();
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        Mutation::Truncate(at) => {
            let s = lines.join("\n");
            let mut pos = at.index(s.len() + 1);
            while !s.is_char_boundary(pos) {
                pos -= 1;
            }
            return s[..pos].to_string();
        }
    }
    lines.join("\n")
}

/// Errors seen without the file name in front: message shape -> example.
type Unlocated = Mutex<BTreeMap<String, (String, String)>>;

/// `load_str` must not panic (proptest reports a panic as a failure with
/// its minimal input); an error must start with the file name. Errors that
/// do not are collected, so one run lists every kind.
fn check_config(text: &str, unlocated: &Unlocated) -> Result<(), TestCaseError> {
    if let Err(e) = silt::config::load_str(text, FILE) {
        let msg = e.to_string();
        if !msg.starts_with(FILE) {
            // Shape: the message without quoted parts, which vary.
            let shape: String = msg
                .split('`')
                .enumerate()
                .map(|(i, p)| if i % 2 == 1 { "`_`" } else { p })
                .collect();
            unlocated
                .lock()
                .unwrap()
                .entry(shape)
                .or_insert_with(|| (msg, text.to_string()));
        }
    }
    Ok(())
}

fn assert_located(name: &str, unlocated: Unlocated) {
    let found = unlocated.into_inner().unwrap();
    if !found.is_empty() {
        let list: Vec<String> = found
            .values()
            .map(|(msg, text)| format!("  {msg:?}\n    from config {:?}", shorten(text)))
            .collect();
        panic!(
            "{name}: {} kinds of config errors do not start with the file name {FILE:?}:\n{}",
            found.len(),
            list.join("\n")
        );
    }
}

fn shorten(s: &str) -> String {
    if s.len() <= 160 {
        return s.to_string();
    }
    let mut end = 160;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[test]
fn config_loader_on_mutated_configs() {
    let oks = AtomicU64::new(0);
    let unlocated = Unlocated::default();
    run(
        "config load_str(mutated config)",
        (0..SEEDS.len(), prop::collection::vec(mutation(), 1..6)),
        |(seed, muts)| {
            let mut text = SEEDS[seed].to_string();
            for m in &muts {
                text = apply(&text, m);
            }
            if silt::config::load_str(&text, FILE).is_ok() {
                oks.fetch_add(1, Ordering::Relaxed);
            }
            check_config(&text, &unlocated)
        },
    );
    println!(
        "  ({} mutated configs still loaded)",
        oks.load(Ordering::Relaxed)
    );
    assert_located("mutated configs", unlocated);
}

#[test]
fn config_loader_on_token_soup() {
    let unlocated = Unlocated::default();
    run(
        "config load_str(token soup)",
        prop::collection::vec(
            prop_oneof![
                4 => prop::sample::select(TOKENS).prop_map(str::to_string),
                1 => ".{0,8}",
            ],
            0..40,
        ),
        |toks| check_config(&toks.join(" "), &unlocated),
    );
    assert_located("token soup", unlocated);
}

#[test]
fn config_loader_on_arbitrary_text() {
    let unlocated = Unlocated::default();
    run("config load_str(arbitrary text)", ".{0,300}", |text| {
        check_config(&text, &unlocated)
    });
    assert_located("arbitrary text", unlocated);
}
