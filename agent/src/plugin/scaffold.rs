//! `silt plugin new NAME [--dir DIR]`: write a ready-to-build plugin crate.
//!
//! The crate has `Cargo.toml`, `src/lib.rs` (a pass-through that sets an
//! attribute, with host unit tests), `fixture/{input.ndjson, config.json,
//! expected.ndjson}` for `silt plugin test`, and a `README.md` with the build
//! and test commands. Templates are the files in `templates/`, compiled in.
//!
//! It needs a silt checkout (found from the working directory upwards, else
//! from the `silt` binary's location) for the SDK and `plugins/build.sh`.
//! Two layouts, picked by where the crate goes:
//!
//! * `plugins/NAME` (the default): a member of the plugins workspace, added
//!   to `members` in `plugins/Cargo.toml` like `cargo new` does; plain
//!   `plugins/build.sh` builds it with the examples.
//! * anywhere else (`--dir`): a standalone crate with its own `[workspace]`
//!   and a path dependency on `sdk/` (relative inside the checkout, else
//!   absolute); `plugins/build.sh DIR` builds it to `DIR/target/wasm/`.
//!
//! Existing directories are never touched; on failure the half-written
//! crate is removed again.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};

const CARGO_MEMBER: &str = include_str!("templates/Cargo.toml.member.tmpl");
const CARGO_STANDALONE: &str = include_str!("templates/Cargo.toml.standalone.tmpl");
const LIB_RS: &str = include_str!("templates/lib.rs.tmpl");
const README: &str = include_str!("templates/README.md.tmpl");
const FIXTURE_INPUT: &str = include_str!("templates/fixture/input.ndjson");
const FIXTURE_CONFIG: &str = include_str!("templates/fixture/config.json");
const FIXTURE_EXPECTED: &str = include_str!("templates/fixture/expected.ndjson");

/// What [`plugin_new`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPlugin {
    /// The crate directory (absolute).
    pub dir: PathBuf,
    /// True when added to the plugins workspace, false for a standalone crate.
    pub member: bool,
    /// Where the build writes the component (absolute).
    pub wasm: PathBuf,
    /// Shell commands to build and test it, run in `dir`.
    pub next_steps: String,
}

/// Implements `silt plugin new`: validates `name`, writes the crate to `dir`
/// (default `<checkout>/plugins/NAME`; relative paths are taken from `cwd`).
pub fn plugin_new(name: &str, dir: Option<&Path>, cwd: &Path) -> anyhow::Result<NewPlugin> {
    validate_name(name)?;
    let exe_dir = std::env::current_exe().ok();
    let checkout = find_checkout(cwd)
        .or_else(|| exe_dir.as_deref().and_then(find_checkout))
        .context(
            "no silt checkout found (a directory with sdk/ and plugins/build.sh) above the \
             working directory or the silt binary; run `silt plugin new` inside one \
             (the crate itself can go anywhere with --dir)",
        )?;
    let checkout = checkout
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", checkout.display()))?;
    let plugins = checkout.join("plugins");

    let dir = match dir {
        Some(d) => cwd.join(d),
        None => plugins.join(name),
    };
    let file_name = match dir.components().next_back() {
        Some(Component::Normal(f)) => f.to_owned(),
        _ => bail!(
            "--dir {} does not name a directory to create",
            dir.display()
        ),
    };
    if dir.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it (pick another NAME or --dir)",
            dir.display()
        );
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let dir = parent
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", parent.display()))?
        .join(file_name);
    let member = dir.parent() == Some(plugins.as_path());

    // Everything that can be checked is checked before the first write.
    let workspace_manifest = plugins.join("Cargo.toml");
    let new_manifest = if member {
        if dir.file_name() != Some(name.as_ref()) {
            bail!(
                "crates in {} are named after their directory (plugins/build.sh relies on it): \
                 use {}",
                plugins.display(),
                plugins.join(name).display()
            );
        }
        let text = std::fs::read_to_string(&workspace_manifest)
            .with_context(|| format!("cannot read {}", workspace_manifest.display()))?;
        Some(add_member(&text, name).with_context(|| {
            format!(
                "cannot add \"{name}\" to members in {}",
                workspace_manifest.display()
            )
        })?)
    } else {
        None
    };

    let sdk = checkout.join("sdk");
    let build_sh = checkout.join("plugins/build.sh");
    let (cargo_toml, build_arg, wasm) = if member {
        (
            render(CARGO_MEMBER, name, &[]),
            "",
            plugins.join("target/wasm").join(format!("{name}.wasm")),
        )
    } else {
        let sdk_path = path_from(&dir, &sdk, &checkout);
        let sdk_path = sdk_path.to_string_lossy();
        let sdk_toml = sdk_path.replace('\\', "\\\\").replace('"', "\\\"");
        (
            render(CARGO_STANDALONE, name, &[("sdk_path", &sdk_toml)]),
            " .",
            dir.join("target/wasm").join(format!("{name}.wasm")),
        )
    };
    let build_rel = path_from(&dir, &build_sh, &checkout);
    let wasm_rel = path_from(&dir, &wasm, &checkout);
    let wasm_in_config = match wasm.strip_prefix(&checkout) {
        Ok(rel) if member => rel.to_path_buf(),
        _ => wasm.clone(),
    };
    let layout = if member {
        "It is a member of the plugins workspace (`members` in `plugins/Cargo.toml`),\n\
         like the example plugins, so `plugins/build.sh` builds it together with them."
            .to_string()
    } else {
        format!(
            "It is a standalone crate (its own `[workspace]`) using the SDK at\n`{}`; \
             keep that path valid when moving the crate.",
            sdk.display()
        )
    };
    let readme = render(
        README,
        name,
        &[
            ("layout", &layout),
            ("build_sh", &build_rel.to_string_lossy()),
            ("build_arg", build_arg),
            ("wasm", &wasm_rel.to_string_lossy()),
            ("wasm_abs", &wasm_in_config.to_string_lossy()),
        ],
    );
    let lib_rs = render(LIB_RS, name, &[("type", &type_name(name))]);
    let files: [(&str, &str); 6] = [
        ("Cargo.toml", &cargo_toml),
        ("src/lib.rs", &lib_rs),
        ("README.md", &readme),
        ("fixture/input.ndjson", FIXTURE_INPUT),
        ("fixture/config.json", FIXTURE_CONFIG),
        ("fixture/expected.ndjson", FIXTURE_EXPECTED),
    ];

    // create_dir (not _all) fails if someone else made it meanwhile.
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let written = (|| -> anyhow::Result<()> {
        for (rel, text) in files {
            let path = dir.join(rel);
            if let Some(p) = path.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        if let Some(text) = &new_manifest {
            std::fs::write(&workspace_manifest, text)
                .with_context(|| format!("cannot write {}", workspace_manifest.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }

    let mut next_steps = String::new();
    let _ = writeln!(next_steps, "bash {}{build_arg}", build_rel.display());
    let _ = writeln!(next_steps, "cargo test");
    let _ = writeln!(
        next_steps,
        "silt plugin test {} --config \"$(cat fixture/config.json)\" --input fixture/input.ndjson",
        wasm_rel.display()
    );
    Ok(NewPlugin {
        dir,
        member,
        wasm,
        next_steps,
    })
}

/// `silt plugin new` as the CLI prints it.
pub fn plugin_new_cli(name: &str, dir: Option<&Path>) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let created = plugin_new(name, dir, &cwd)?;
    let how = if created.member {
        "added to the plugins workspace"
    } else {
        "standalone crate"
    };
    println!(
        "created plugin `{name}` in {} ({how})",
        created.dir.display()
    );
    println!("next, in {}:", created.dir.display());
    for line in created.next_steps.lines() {
        println!("    {line}");
    }
    Ok(())
}

/// Cargo's rules for a package name, plus names that would clash with what
/// the template imports or with the SDK.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    const RESERVED: &[&str] = &[
        // Rust keywords, including reserved ones (cargo refuses them).
        "abstract",
        "as",
        "async",
        "await",
        "become",
        "box",
        "break",
        "const",
        "continue",
        "crate",
        "do",
        "dyn",
        "else",
        "enum",
        "extern",
        "false",
        "final",
        "fn",
        "for",
        "gen",
        "if",
        "impl",
        "in",
        "let",
        "loop",
        "macro",
        "match",
        "mod",
        "move",
        "mut",
        "override",
        "priv",
        "pub",
        "ref",
        "return",
        "self",
        "static",
        "struct",
        "super",
        "trait",
        "true",
        "try",
        "type",
        "typeof",
        "unsafe",
        "unsized",
        "use",
        "virtual",
        "where",
        "while",
        "yield",
        // Standard library crates and cargo's own directory names.
        "alloc",
        "core",
        "std",
        "proc_macro",
        "test",
        "build",
        "deps",
        "examples",
        "incremental",
        // The SDK itself.
        "silt_sdk",
    ];
    let hint =
        "use lowercase letters, digits, '-' and '_', starting with a letter, e.g. `tag-site`";
    if name.is_empty() {
        bail!("plugin name is empty; {hint}");
    }
    if name.len() > 64 {
        bail!("plugin name `{name}` is longer than 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        bail!("invalid plugin name `{name}`: {hint}");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        bail!("invalid character {c:?} in plugin name `{name}`: {hint}");
    }
    if RESERVED.contains(&name.replace('-', "_").as_str()) {
        bail!(
            "`{name}` is a reserved name (a Rust keyword, a standard crate or the SDK); pick another"
        );
    }
    Ok(())
}

/// `tag-site` → `TagSite`; names the template's plugin type. Names that
/// would shadow the template's imports or the prelude get a `Plugin` suffix.
fn type_name(name: &str) -> String {
    const TAKEN: &[&str] = &[
        "Config",
        "Error",
        "Event",
        "Transform",
        "Box",
        "Clone",
        "Default",
        "Err",
        "None",
        "Ok",
        "Option",
        "Result",
        "Self",
        "Some",
        "String",
        "Vec",
        "Send",
        "Sized",
        "Sync",
        "Drop",
        "From",
        "Into",
        "Iterator",
        "ToString",
        "ToOwned",
        "Copy",
        "Eq",
        "Ord",
        "PartialEq",
        "PartialOrd",
        "Extend",
        "Fn",
        "FnMut",
        "FnOnce",
        "AsRef",
        "AsMut",
        "Unpin",
        "TryFrom",
        "TryInto",
    ];
    let mut out = String::new();
    for part in name.split(['-', '_']) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    if TAKEN.contains(&out.as_str()) {
        out.push_str("Plugin");
    }
    out
}

fn render(template: &str, name: &str, vars: &[(&str, &str)]) -> String {
    let mut text = template.replace("{{name}}", name);
    for (key, value) in vars {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    debug_assert!(!text.contains("{{"), "unfilled placeholder in template");
    text
}

/// `to` as seen from directory `from`: relative when `to` is inside `from`
/// or both are inside `root` (so the checkout can move), else absolute.
fn path_from(from: &Path, to: &Path, root: &Path) -> PathBuf {
    if let Ok(inside) = to.strip_prefix(from) {
        return inside.to_path_buf();
    }
    let (Ok(from_rel), Ok(to_rel)) = (from.strip_prefix(root), to.strip_prefix(root)) else {
        return to.to_path_buf();
    };
    let from_parts: Vec<_> = from_rel.components().collect();
    let to_parts: Vec<_> = to_rel.components().collect();
    let common = from_parts
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in common..from_parts.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part);
    }
    out
}

/// The nearest ancestor of `start` (itself included) that is a silt
/// checkout: it has the SDK and the plugin build script.
fn find_checkout(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join("sdk/Cargo.toml").is_file() && d.join("plugins/build.sh").is_file())
        .map(Path::to_path_buf)
}

/// `manifest` (the plugins workspace's Cargo.toml) with `name` appended to
/// `[workspace] members`, keeping the rest of the text as it is.
fn add_member(manifest: &str, name: &str) -> anyhow::Result<String> {
    let parsed: toml::Table = toml::from_str(manifest).context("not valid TOML")?;
    let members = parsed
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .context("no [workspace] members array")?;
    if members.iter().any(|m| m.as_str() == Some(name)) {
        bail!("\"{name}\" is already a member");
    }

    let start = manifest
        .find("\nmembers")
        .map(|i| i + 1)
        .context("no `members = [` line")?;
    let open = start
        + manifest[start..]
            .find('[')
            .context("no `[` after members")?;
    let close = open
        + manifest[open..]
            .find(']')
            .context("no `]` closing members")?;
    let before = &manifest[open + 1..close];
    let line_start = manifest[..close].rfind('\n').map_or(0, |i| i + 1);
    let mut out = String::with_capacity(manifest.len() + name.len() + 8);
    if line_start > open && manifest[line_start..close].trim().is_empty() {
        // Multi-line list: a new line before the `]` line.
        let body_end = open + 1 + before.trim_end().len();
        out.push_str(&manifest[..body_end]);
        if !before.trim().is_empty() && !before.trim_end().ends_with(',') {
            out.push(',');
        }
        out.push_str(&manifest[body_end..line_start]);
        let _ = writeln!(out, "    \"{name}\",");
        out.push_str(&manifest[line_start..]);
    } else {
        out.push_str(&manifest[..close]);
        let sep = match before.trim_end().chars().last() {
            None => "",
            Some(',') => " ",
            Some(_) => ", ",
        };
        let _ = write!(out, "{sep}\"{name}\"");
        out.push_str(&manifest[close..]);
    }

    let check: toml::Table = toml::from_str(&out).context("edited manifest is not valid TOML")?;
    let ok = check
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .is_some_and(|m| {
            m.len() == members.len() + 1 && m.iter().any(|v| v.as_str() == Some(name))
        });
    if !ok {
        bail!("could not edit the members list; add \"{name}\" by hand");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["tag-site", "a", "celsius_2", "Upper"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "", "2fast", "-x", "a b", "a/b", "a.b", "self", "test", "std", "silt-sdk", "fn",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert_eq!(type_name("tag-site"), "TagSite");
        assert_eq!(type_name("my_plugin_2"), "MyPlugin2");
        assert_eq!(type_name("event"), "EventPlugin");
        assert_eq!(type_name("result"), "ResultPlugin");
    }

    #[test]
    fn adds_members() {
        let multi = "[workspace]\nresolver = \"3\"\nmembers = [\n    \"a\",\n    \"b\",\n]\n\n[x]\ny = [1]\n";
        assert_eq!(
            add_member(multi, "c").unwrap(),
            "[workspace]\nresolver = \"3\"\nmembers = [\n    \"a\",\n    \"b\",\n    \"c\",\n]\n\n[x]\ny = [1]\n"
        );
        let no_comma = "[workspace]\nmembers = [\n    \"a\",\n    \"b\"\n]\n";
        assert_eq!(
            add_member(no_comma, "c").unwrap(),
            "[workspace]\nmembers = [\n    \"a\",\n    \"b\",\n    \"c\",\n]\n"
        );
        assert_eq!(
            add_member("[workspace]\nmembers = [\"a\"]\n", "c").unwrap(),
            "[workspace]\nmembers = [\"a\", \"c\"]\n"
        );
        assert_eq!(
            add_member("[workspace]\nmembers = []\n", "c").unwrap(),
            "[workspace]\nmembers = [\"c\"]\n"
        );
        assert!(add_member(multi, "a").is_err());
        assert!(add_member("[package]\nname = \"x\"\n", "c").is_err());
    }

    #[test]
    fn relative_paths() {
        let root = Path::new("/r");
        assert_eq!(
            path_from(Path::new("/r/plugins/x"), Path::new("/r/sdk"), root),
            Path::new("../../sdk")
        );
        assert_eq!(
            path_from(
                Path::new("/r/plugins/x"),
                Path::new("/r/plugins/x/target/wasm/x.wasm"),
                root
            ),
            Path::new("target/wasm/x.wasm")
        );
        assert_eq!(
            path_from(Path::new("/tmp/x"), Path::new("/r/sdk"), root),
            Path::new("/r/sdk")
        );
        assert_eq!(
            path_from(Path::new("/tmp/x"), Path::new("/tmp/x/target/x.wasm"), root),
            Path::new("target/x.wasm")
        );
    }

    fn fake_checkout() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sdk")).unwrap();
        std::fs::create_dir_all(root.path().join("plugins")).unwrap();
        std::fs::write(root.path().join("sdk/Cargo.toml"), "").unwrap();
        std::fs::write(root.path().join("plugins/build.sh"), "").unwrap();
        std::fs::write(
            root.path().join("plugins/Cargo.toml"),
            "[workspace]\nmembers = [\n    \"identity\",\n]\n",
        )
        .unwrap();
        root
    }

    #[test]
    fn member_crate() {
        let root = fake_checkout();
        let cwd = root.path().join("plugins");
        let made = plugin_new("tag-site", None, &cwd).unwrap();
        let real = root.path().canonicalize().unwrap();
        assert!(made.member);
        assert_eq!(made.dir, real.join("plugins/tag-site"));
        assert_eq!(made.wasm, real.join("plugins/target/wasm/tag-site.wasm"));
        let ws = std::fs::read_to_string(root.path().join("plugins/Cargo.toml")).unwrap();
        assert!(
            ws.contains("    \"identity\",\n    \"tag-site\",\n]"),
            "{ws}"
        );
        let cargo = std::fs::read_to_string(made.dir.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("silt-sdk.workspace = true"), "{cargo}");
        let lib = std::fs::read_to_string(made.dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("silt_sdk::export!(TagSite);"));
        let readme = std::fs::read_to_string(made.dir.join("README.md")).unwrap();
        assert!(readme.contains("bash ../build.sh\n"), "{readme}");
        assert!(
            readme.contains("silt plugin test ../target/wasm/tag-site.wasm"),
            "{readme}"
        );
        for f in [
            "fixture/input.ndjson",
            "fixture/config.json",
            "fixture/expected.ndjson",
        ] {
            assert!(made.dir.join(f).is_file(), "{f}");
        }

        // Never overwrites, and a failed attempt leaves the workspace alone.
        let err = plugin_new("tag-site", None, &cwd).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            std::fs::read_to_string(root.path().join("plugins/Cargo.toml")).unwrap(),
            ws
        );
        let err = plugin_new("other", Some(Path::new("odd-dir")), &cwd).unwrap_err();
        assert!(
            err.to_string().contains("named after their directory"),
            "{err}"
        );
        assert!(!cwd.join("odd-dir").exists());
    }

    #[test]
    fn standalone_crate() {
        let root = fake_checkout();
        let made = plugin_new("celsius", Some(Path::new("work/celsius")), root.path()).unwrap();
        assert!(!made.member);
        let cargo = std::fs::read_to_string(made.dir.join("Cargo.toml")).unwrap();
        assert!(
            cargo.contains("silt-sdk = { path = \"../../sdk\" }"),
            "{cargo}"
        );
        assert!(cargo.contains("\n[workspace]\n"), "{cargo}");
        let readme = std::fs::read_to_string(made.dir.join("README.md")).unwrap();
        assert!(
            readme.contains("bash ../../plugins/build.sh .\n"),
            "{readme}"
        );
        let ws = std::fs::read_to_string(root.path().join("plugins/Cargo.toml")).unwrap();
        assert!(!ws.contains("celsius"));

        // Outside the checkout the SDK path is absolute.
        let elsewhere = tempfile::tempdir().unwrap();
        let made = plugin_new("far", Some(&elsewhere.path().join("far")), root.path()).unwrap();
        let cargo = std::fs::read_to_string(made.dir.join("Cargo.toml")).unwrap();
        let sdk = root.path().canonicalize().unwrap().join("sdk");
        assert!(
            cargo.contains(&format!("path = \"{}\"", sdk.display())),
            "{cargo}"
        );
    }

    #[test]
    fn no_checkout() {
        let dir = tempfile::tempdir().unwrap();
        // The test binary lives in the real checkout's target/, so only the
        // working-directory lookup is exercised here.
        assert!(find_checkout(dir.path()).is_none());
    }
}
