//! `configs/silt.service` is a well-formed systemd unit with the keys the
//! README promises; `systemd-analyze verify` checks it too where installed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

type Unit = BTreeMap<String, Vec<(String, String)>>;

fn unit_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/silt.service")
}

/// Sections of `key=value` lines, in file order; comments and blanks skipped.
fn parse(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !raw.ends_with('\\'),
            "line {}: no continuations here",
            n + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(
                !unit.contains_key(name),
                "line {}: section [{name}] twice",
                n + 1
            );
            unit.insert(name.to_string(), Vec::new());
            section = Some(name.to_string());
            continue;
        }
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("line {}: key outside a section: {raw}", n + 1));
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {raw}", n + 1));
        let key = key.trim();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "line {}: bad key `{key}`",
            n + 1
        );
        unit.get_mut(section)
            .unwrap()
            .push((key.to_string(), value.trim().to_string()));
    }
    unit
}

fn get<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .unwrap_or_else(|| panic!("no [{section}]"))
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    match get(unit, section, key).as_slice() {
        [value] => value,
        other => panic!("[{section}] {key}: expected one value, got {other:?}"),
    }
}

#[test]
fn unit_has_the_documented_shape() {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    let unit = parse(&text);
    assert_eq!(
        unit.keys().collect::<Vec<_>>(),
        ["Install", "Service", "Unit"]
    );
    let service = "Service";
    assert_eq!(one(&unit, service, "Type"), "notify");
    assert_eq!(
        one(&unit, service, "ExecStart"),
        "/usr/local/bin/silt run -c /etc/silt"
    );
    assert_eq!(one(&unit, service, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one(&unit, service, "Restart"), "always");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/silt"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(&unit, service, key), value, "[Service] {key}");
    }
    // wasmtime writes machine code: W^X enforcement would break plugins.
    assert!(get(&unit, service, "MemoryDenyWriteExecute").is_empty());
    assert_eq!(one(&unit, "Install", "WantedBy"), "multi-user.target");
    assert!(one(&unit, "Unit", "After").contains("network-online.target"));
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("systemd-analyze not installed; skipping `verify`");
        return;
    }
    // verify wants ExecStart's binary to exist: point it at the one just built.
    let text = std::fs::read_to_string(unit_path())
        .unwrap()
        .replace("/usr/local/bin/silt", env!("CARGO_BIN_EXE_silt"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silt.service");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Outside a booted systemd (containers, CI) verify may also complain about
    // the host; only lines about our unit count.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("silt.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
}
