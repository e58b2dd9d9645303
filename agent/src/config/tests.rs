use std::path::{Path, PathBuf};

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const MINIMAL: &str = r#"
[sources.api]
type = "http"
listen = "127.0.0.1:8080"

[sinks.lake]
type = "file"
inputs = ["api"]
path = "./lake"
"#;

#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            load(&path).unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected quickstart.toml and mqtt-s3.toml in {}",
        dir.display()
    );
}

#[test]
fn defaults_fill_what_is_left_out() {
    let config = load_str(MINIMAL, "m.toml").unwrap();
    let sink = &config.sinks["lake"];
    assert_eq!(sink.batch.max_records, 10_000);
    assert_eq!(sink.batch.max_age, std::time::Duration::from_secs(30));
    assert_eq!(sink.compression, Compression::Gzip);
    assert_eq!(config.spool.when_full, WhenFull::Block);
    assert!(!config.agent.id.is_empty());
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = MINIMAL.replace(
        "path = \"./lake\"",
        "path = \"./lake\"\nbatch = { max_recs = 5 }",
    );
    let err = load_str(&text, "bad.toml").unwrap_err().to_string();
    assert!(
        err.starts_with("bad.toml:10: key `sinks.lake.batch"),
        "{err}"
    );
    assert!(err.contains("unknown field `max_recs`"), "{err}");
}

#[test]
fn unknown_key_inside_a_tagged_source_is_located() {
    let text = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nlisten_port = 9",
    );
    let err = load_str(&text, "bad.toml").unwrap_err().to_string();
    assert!(
        err.starts_with("bad.toml:5: key `sources.api.listen_port`"),
        "{err}"
    );
}

#[test]
fn bad_values_inside_a_source_name_the_key_and_its_line() {
    let text = MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nmax_body = -5",
    );
    let err = load_str(&text, "bad.toml").unwrap_err().to_string();
    assert!(
        err.starts_with("bad.toml:5: key `sources.api.max_body`"),
        "{err}"
    );
    let text = format!(
        "{MINIMAL}\n[sources.m]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nqos = 7\n"
    );
    let err = load_str(
        &text.replace("inputs = [\"api\"]", "inputs = [\"api\", \"m\"]"),
        "bad.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("bad.toml:15: key `sources.m.qos`"), "{err}");
}

#[test]
fn wrong_type_names_the_key() {
    let text = MINIMAL.replace("path = \"./lake\"", "path = \"./lake\"\nretry_max = 5");
    let err = load_str(&text, "bad.toml").unwrap_err().to_string();
    assert!(
        err.contains("bad.toml:10: key `sinks.lake.retry_max`"),
        "{err}"
    );
}

#[test]
fn syntax_error_names_the_line() {
    let err = load_str("[agent]\nid = \"x\"\nnot toml at all\n", "bad.toml")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("bad.toml:3: "), "{err}");
}

#[test]
fn graph_errors_name_the_component() {
    let cases = [
        (
            MINIMAL.replace("inputs = [\"api\"]", "inputs = [\"nope\"]"),
            "input `nope`",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                "path = \"./lake\"\nkey = \"{agent}.ndjson\"",
            ),
            "{batch}",
        ),
        (
            MINIMAL.replace("path = \"./lake\"", "path = \"./lake\"\nbucket = \"b\""),
            "`bucket` belongs to `s3`",
        ),
        (
            MINIMAL
                .replace("type = \"file\"", "type = \"s3\"")
                .replace("path = \"./lake\"", "bucket = \"b\"\npath = \"x\""),
            "`path` belongs",
        ),
        (
            format!("{MINIMAL}\n[sources.idle]\ntype = \"http\"\nlisten = \"127.0.0.1:1\"\n"),
            "feeds no sink",
        ),
        (
            format!(
                "{MINIMAL}\n[sources.m]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nqos = 2\n"
            ),
            "qos 2 is not supported",
        ),
    ];
    for (text, expect) in cases {
        let err = load_str(&text, "c.toml").unwrap_err().to_string();
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
    }
}

#[test]
fn a_directory_merges_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-base.toml", MINIMAL);
    write(
        dir.path(),
        "20-device.toml",
        "[agent]\nid = \"dev-7\"\n[sinks.lake]\ncompression = \"zstd\"\n",
    );
    write(dir.path(), "ignored.txt", "not toml");
    let config = load(dir.path()).unwrap();
    assert_eq!(config.agent.id, "dev-7");
    assert_eq!(config.sinks["lake"].compression, Compression::Zstd);
    assert_eq!(config.sinks["lake"].inputs, ["api"]);
}

#[test]
fn error_in_a_later_file_names_that_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-base.toml", MINIMAL);
    let bad = write(
        dir.path(),
        "20-device.toml",
        "[agent]\nid = \"d\"\ncolour = 1\n",
    );
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:3: key `agent.colour`", bad.display())),
        "{err}"
    );
}

#[test]
fn empty_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(load(dir.path()), Err(ConfigError::NoFiles(_))));
}

#[test]
fn api_defaults_and_checks() {
    let config = load_str(MINIMAL, "m.toml").unwrap();
    assert_eq!(config.api.listen, "127.0.0.1:8686".parse().unwrap());
    assert_eq!(
        config.api.ready_max_backlog_age,
        std::time::Duration::from_secs(300)
    );
    let text =
        format!("{MINIMAL}\n[api]\nlisten = \"0.0.0.0:9100\"\nready_max_backlog_age = \"30s\"\n");
    let config = load_str(&text, "m.toml").unwrap();
    assert_eq!(config.api.listen.port(), 9100);
    for (bad, says) in [
        ("[api]\nlistne = \"127.0.0.1:1\"\n", "listne"),
        (
            "[api]\nready_max_backlog_age = \"0s\"\n",
            "ready_max_backlog_age",
        ),
        ("[api]\nlisten = \"127.0.0.1:8080\"\n", "http source `api`"),
    ] {
        let err = load_str(&format!("{MINIMAL}\n{bad}"), "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{bad:?} gave: {err}");
    }
}
