//! Golden tests for the example plugins through the real CLI:
//! `silt plugin test plugins/target/wasm/<p>.wasm --config "$(cat config.json)"
//! --input input.ndjson` must print `expected.ndjson` for every directory in
//! tests/golden/.
//!
//! Lines are compared as JSON values (so formatting of the expectation file
//! does not matter), in order. Plugins come from `plugins/build.sh`; when one
//! is missing the test skips with a message, except under CI (`CI` set),
//! where that is a failure.
//!
//! To update an expectation after an intended behaviour change, run the
//! command above, check the diff by hand, and commit the new file.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parse_lines(text: &str, what: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{what} line {}: not JSON ({e}): {l}", i + 1))
        })
        .collect()
}

fn check(plugin: &str) -> bool {
    let dir = repo().join("tests/golden").join(plugin);
    let wasm = repo()
        .join("plugins/target/wasm")
        .join(format!("{plugin}.wasm"));
    if !wasm.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: CI must run plugins/build.sh before cargo test",
            wasm.display()
        );
        eprintln!(
            "SKIPPED golden {plugin}: {} missing; run plugins/build.sh",
            wasm.display()
        );
        return false;
    }
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_silt"))
        .args(["plugin", "test"])
        .arg(&wasm)
        .arg("--config")
        .arg(config.trim())
        .arg("--input")
        .arg(dir.join("input.ndjson"))
        .output()
        .expect("run silt");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "silt plugin test {plugin} failed: {stderr}"
    );

    let got = parse_lines(&String::from_utf8(output.stdout).unwrap(), "output");
    let expected_text = std::fs::read_to_string(dir.join("expected.ndjson")).unwrap();
    let expected = parse_lines(&expected_text, "expected.ndjson");
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g,
            e,
            "golden {plugin}: line {} differs\nstderr: {stderr}",
            i + 1
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "golden {plugin}: {} output lines, expected {}",
        got.len(),
        expected.len()
    );
    true
}

#[test]
fn golden_json_clean() {
    check("json-clean");
}

#[test]
fn golden_dedup() {
    check("dedup");
}

#[test]
fn golden_downsample() {
    check("downsample");
}

#[test]
fn golden_route() {
    check("route");
}

/// Every golden directory has a test above, so a new one cannot be
/// forgotten.
#[test]
fn every_golden_dir_is_covered() {
    let covered = ["dedup", "downsample", "json-clean", "route"];
    let mut dirs: Vec<String> = std::fs::read_dir(repo().join("tests/golden"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, covered);
}
