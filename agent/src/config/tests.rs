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
    assert_eq!(sink.compression(), Compression::Gzip);
    assert_eq!(sink.compression_level(), 6);
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
        (
            format!(
                "{MINIMAL}\n[sources.m]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nprotocol = 4\n"
            ),
            "protocol 4 is not supported: use 3 (MQTT 3.1.1) or 5",
        ),
        (
            format!(
                "{MINIMAL}\n[sources.m]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nreceive_maximum = 10\n"
            ),
            "is an MQTT 5 property: set `protocol = 5`",
        ),
        (
            format!(
                "{MINIMAL}\n[sources.m]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nprotocol = 5\nreceive_maximum = 0\n"
            ),
            "MQTT 5 forbids 0",
        ),
        (
            format!(
                "{MINIMAL}\n[sources.m]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nkeep_alive = \"2s\"\n"
            ),
            "must be at least 5s",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                "path = \"./lake\"\nformat = \"parquet\"\ncompression = \"gzip\"",
            ),
            "take compression zstd, snappy, none",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                "path = \"./lake\"\ncompression_level = 10",
            ),
            "10 is out of range: gzip takes 1 to 9",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                "path = \"./lake\"\nformat = \"parquet\"\ncompression_level = 3",
            ),
            "applies to NDJSON sinks with gzip or zstd",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                "path = \"./lake\"\nstorage_class = \"STANDARD_IA\"",
            ),
            "`storage_class` belongs to s3",
        ),
        (
            MINIMAL.replace("type = \"file\"", "type = \"s3\"").replace(
                "path = \"./lake\"",
                "bucket = \"b\"\nstorage_class = \"COLD\"",
            ),
            "unknown storage class `COLD`",
        ),
        (
            MINIMAL.replace("type = \"file\"", "type = \"s3\"").replace(
                "path = \"./lake\"",
                "bucket = \"b\"\nformat = \"raw\"\npart_size = \"1MiB\"",
            ),
            "at least 5MiB",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                "path = \"./lake\"\nformat = \"raw\"\nsidecar_sinks = [\"lake\"]",
            ),
            "must be another sink",
        ),
        (
            format!(
                "{MINIMAL}\n[sources.m]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\ntopic_fields = [\"silt.media\"]\n"
            ),
            "reserved",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                "path = \"./lake\"\nkey = \"{attr.}/{batch}\"",
            ),
            "unknown placeholder",
        ),
        (
            MINIMAL.replace(
                "path = \"./lake\"",
                &format!(
                    "path = \"./lake\"\nkey = \"{}/{{batch}}\"",
                    "d".repeat(1_000)
                ),
            ),
            "over S3's 1024-byte limit",
        ),
    ];
    for (text, expect) in cases {
        let err = load_str(&text, "c.toml").unwrap_err().to_string();
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
    }
}

#[test]
fn keys_that_can_pass_the_s3_limit_are_warned_about() {
    let quiet = MINIMAL.replace("8080\"", "8080\"\nauth = \"none\"");
    let ok = load_str(&quiet, "c.toml").unwrap();
    assert!(warnings(&ok).is_empty());
    let key = (0..8).map(|i| format!("{{attr.a{i}}}")).collect::<Vec<_>>();
    let text = quiet.replace(
        "path = \"./lake\"",
        &format!("path = \"./lake\"\nkey = \"{}/{{batch}}\"", key.join("/")),
    );
    let warned = warnings(&load_str(&text, "c.toml").unwrap());
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].starts_with("sinks.lake.key") && warned[0].contains("__too_long__"));
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
    assert_eq!(config.sinks["lake"].compression(), Compression::Zstd);
    assert_eq!(config.sinks["lake"].compression_level(), 3);
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

// ------------------------------------------------------------ fleet layout

const FLEET_BASE_TOML: &str = r#"[agent]
id = "base"

[sources.m]
type = "mqtt"
url = "mqtt://base:1883"
topics = ["a/#", "b/#"]

[sinks.lake]
type = "file"
inputs = ["m"]
path = "./lake"
batch = { max_records = 10, max_age = "30s" }
"#;

#[test]
fn fleet_directory_merges_base_site_others_then_device() {
    let dir = tempfile::tempdir().unwrap();
    // Written so that plain name order would differ from the fleet order.
    write(dir.path(), "device.toml", "[agent]\nid = \"dev\"\n");
    write(dir.path(), "base.toml", FLEET_BASE_TOML);
    write(dir.path(), "zz-local.toml", "[agent]\nid = \"local\"\n");
    write(
        dir.path(),
        "aa-local.toml",
        "[sinks.lake]\ncompression = \"none\"\n",
    );
    std::fs::create_dir(dir.path().join("site")).unwrap();
    write(
        &dir.path().join("site"),
        "b.toml",
        "[sources.m]\nurl = \"mqtt://site-b:1883\"\n",
    );
    write(
        &dir.path().join("site"),
        "a.toml",
        "[agent]\nid = \"site\"\n[sources.m]\nurl = \"mqtt://site-a:1883\"\n",
    );
    write(&dir.path().join("site"), "notes.txt", "ignored");
    let names: Vec<String> = config_files(dir.path())
        .unwrap()
        .iter()
        .map(|p| {
            p.strip_prefix(dir.path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "base.toml",
            "site/a.toml",
            "site/b.toml",
            "aa-local.toml",
            "zz-local.toml",
            "device.toml"
        ]
    );
    let config = load(dir.path()).unwrap();
    assert_eq!(config.agent.id, "dev");
    assert_eq!(config.sinks["lake"].compression(), Compression::None);
    let SourceConfig::Mqtt(m) = &config.sources["m"] else {
        panic!("mqtt source expected")
    };
    assert_eq!(m.url, "mqtt://site-b:1883");

    // Without device.toml, the last other top-level file wins.
    std::fs::remove_file(dir.path().join("device.toml")).unwrap();
    assert_eq!(load(dir.path()).unwrap().agent.id, "local");
}

#[test]
fn without_base_toml_a_directory_keeps_name_order_and_ignores_site() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", MINIMAL);
    write(dir.path(), "device.toml", "[agent]\nid = \"dev\"\n");
    write(dir.path(), "z.toml", "[agent]\nid = \"z\"\n");
    std::fs::create_dir(dir.path().join("site")).unwrap();
    write(
        &dir.path().join("site"),
        "s.toml",
        "[agent]\nid = \"site\"\n",
    );
    assert_eq!(load(dir.path()).unwrap().agent.id, "z");
}

#[test]
fn overlay_arrays_replace_and_inline_tables_merge() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", FLEET_BASE_TOML);
    std::fs::create_dir(dir.path().join("site")).unwrap();
    write(
        &dir.path().join("site"),
        "x.toml",
        "[sources.m]\ntopics = [\"c/#\"]\n[sinks.lake]\nbatch = { max_age = \"5s\" }\n",
    );
    let config = load(dir.path()).unwrap();
    let SourceConfig::Mqtt(m) = &config.sources["m"] else {
        panic!("mqtt source expected")
    };
    assert_eq!(m.topics, ["c/#"]);
    let batch = &config.sinks["lake"].batch;
    assert_eq!(batch.max_records, 10);
    assert_eq!(batch.max_age, std::time::Duration::from_secs(5));
}

#[test]
fn env_file_fills_variables_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base.toml",
        &FLEET_BASE_TOML
            .replace("id = \"base\"", "id = \"${SILT_T_ENVFILE_ID}\"")
            .replace("./lake", "${SILT_T_ENVFILE_PATH}")
            .replace("mqtt://base:1883", "${SILT_T_ENVFILE_URL:-mqtt://d:1}"),
    );
    write(
        dir.path(),
        ENV_FILE,
        "# comment\n\nSILT_T_ENVFILE_ID=from-file\nexport SILT_T_ENVFILE_PATH=\"/srv/lake\"\n\
         SILT_T_ENVFILE_URL='mqtt://file:1883'\n",
    );
    let environment =
        |name: &str| (name == "SILT_T_ENVFILE_URL").then(|| "mqtt://env:1883".to_string());
    let config = load::load_with_env(dir.path(), &environment).unwrap();
    assert_eq!(config.agent.id, "from-file");
    assert_eq!(
        config.sinks["lake"].path.as_deref(),
        Some(Path::new("/srv/lake"))
    );
    let SourceConfig::Mqtt(m) = &config.sources["m"] else {
        panic!("mqtt source expected")
    };
    assert_eq!(m.url, "mqtt://env:1883");

    // Without the file the variable is missing, named with file and line.
    std::fs::remove_file(dir.path().join(ENV_FILE)).unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("base.toml:2: "), "{err}");
    assert!(err.contains("SILT_T_ENVFILE_ID is not set"), "{err}");

    // A malformed line in the env file names the file and line.
    write(dir.path(), ENV_FILE, "A=1\nnot a var line\n");
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:2: ", dir.path().join(ENV_FILE).display())),
        "{err}"
    );
}

#[test]
fn print_annotates_keys_with_their_origin() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", FLEET_BASE_TOML);
    std::fs::create_dir(dir.path().join("site")).unwrap();
    write(
        &dir.path().join("site"),
        "berlin.toml",
        "# Berlin\n\n[sources.m]\nurl = \"mqtt://berlin:1883\"\npassword = \"hunter2\"\nusername = \"u\"\n",
    );
    write(dir.path(), "device.toml", "[agent]\nid = \"gw-7\"\n");
    let (config, text) = load_annotated(dir.path()).unwrap();
    assert_eq!(config.agent.id, "gw-7");
    let line_of = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` line in:\n{text}"))
    };
    assert!(
        line_of("url = ").ends_with("# site/berlin.toml:4"),
        "{text}"
    );
    assert!(
        line_of("url = ").contains("\"mqtt://berlin:1883\""),
        "{text}"
    );
    assert!(line_of("id = ").ends_with("# device.toml:2"), "{text}");
    assert!(
        line_of("type = \"mqtt\"").ends_with("# base.toml:5"),
        "{text}"
    );
    assert!(
        line_of("topics = ").contains("[\"a/#\", \"b/#\"]"),
        "{text}"
    );
    assert!(line_of("password = ").contains("\"<redacted>\""), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(line_of("[sinks.lake]").ends_with("# base.toml:9"), "{text}");
    // The printout is TOML that means the same config.
    let reparsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(reparsed["agent"]["id"].as_str(), Some("gw-7"));
    assert_eq!(
        reparsed["sinks"]["lake"]["batch"]["max_records"].as_integer(),
        Some(10)
    );
}

#[test]
fn bad_site_overlay_names_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base.toml", FLEET_BASE_TOML);
    std::fs::create_dir(dir.path().join("site")).unwrap();
    let bad = write(
        &dir.path().join("site"),
        "berlin.toml",
        "[sources.m]\nurl = \"mqtt://b:1\"\nqos = \"high\"\n",
    );
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:3: key `sources.m.qos`", bad.display())),
        "{err}"
    );
    // A syntax error too.
    write(&dir.path().join("site"), "berlin.toml", "[sources.m\n");
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:1: ", bad.display())), "{err}");
}

#[test]
fn packaged_config_loads_as_installed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/debian/etc");
    let config = load(&dir).unwrap_or_else(|e| panic!("{} does not load: {e}", dir.display()));
    assert_eq!(config.agent.data_dir, Path::new("/var/lib/silt"));
}

#[test]
fn shipped_fleet_example_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/fleet");
    let (config, text) =
        load_annotated(&dir).unwrap_or_else(|e| panic!("{} does not load: {e}", dir.display()));
    assert_eq!(config.agent.id, "gw-berlin-07");
    assert!(text.contains("# site/berlin.toml:"), "{text}");
}

#[test]
fn a_missing_section_names_the_file() {
    let err = load_str("", "empty.toml").unwrap_err().to_string();
    assert!(err.starts_with("empty.toml: key `sources`"), "{err}");
}

#[test]
fn a_source_open_to_anyone_is_warned_about() {
    let warned = |extra: &str| {
        let text = MINIMAL.replace("8080\"", &format!("8080\"\n{extra}"));
        warnings(&load_str(&text, "c.toml").unwrap())
    };
    let empty = warned("auth_token = \"${SILT_UNSET_TOKEN_FOR_TEST:-}\"");
    assert!(
        empty.len() == 1 && empty[0].contains("auth_token is empty"),
        "{empty:?}"
    );
    let missing = warned("");
    assert!(
        missing.len() == 1 && missing[0].contains("takes requests from anyone"),
        "{missing:?}"
    );
    assert!(warned("auth = \"none\"").is_empty());
    assert!(warned("auth_token = \"s3cret\"").is_empty());
    let both = MINIMAL.replace("8080\"", "8080\"\nauth = \"none\"\nauth_token = \"x\"");
    let err = load_str(&both, "c.toml").unwrap_err().to_string();
    assert!(err.contains("auth = \"none\""), "{err}");
}

#[test]
fn secrets_are_redacted_and_read_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("s3-secret");
    std::fs::write(&key_file, "file-secret-value\n").unwrap();
    let text = format!(
        "{MINIMAL}\n[sinks.cloud]\ntype = \"s3\"\ninputs = [\"api\"]\nbucket = \"b\"\naccess_key_id = \"AKID\"\nsecret_access_key_file = \"{}\"\n",
        key_file.display()
    );
    let config = load_str(&text, "c.toml").unwrap();
    let secret = config.sinks["cloud"].secret_access_key.as_ref().unwrap();
    assert_eq!(secret.expose(), "file-secret-value");
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("file-secret-value") && shown.contains(REDACTED),
        "{shown}"
    );

    let both = format!("{text}secret_access_key = \"inline\"\n");
    assert!(
        load_str(&both, "c.toml")
            .unwrap_err()
            .to_string()
            .contains("not both")
    );
    let missing = text.replace("s3-secret", "no-such-file");
    let err = load_str(&missing, "c.toml").unwrap_err().to_string();
    assert!(err.contains("no-such-file"), "{err}");
}
