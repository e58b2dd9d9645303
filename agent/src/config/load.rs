//! Reading config files: `${VAR}` substitution (from the environment, then
//! an optional `env` file), merging a directory of `*.toml` (plain: name
//! order; fleet: `base.toml`, `site/*.toml`, the rest, `device.toml`), errors
//! that point at a file, line and key, and the merged config annotated with
//! where each key came from (`silt check --print`).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::Config;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config directory {0} holds no *.toml file; add one or point -c at a file")]
    NoFiles(PathBuf),
    #[error("{at}{message}")]
    Invalid { at: Location, message: String },
}

impl ConfigError {
    pub(super) fn invalid(at: Location, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            at,
            message: message.into(),
        }
    }
}

/// Where a config value came from. Any part may be unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub key: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        Ok(())
    }
}

/// Dotted key path -> the file and line that set it last.
#[derive(Debug, Default)]
pub(super) struct Origins(
    HashMap<String, (PathBuf, usize)>,
    /// What to name when a key is set nowhere (e.g. a required table is missing).
    Option<PathBuf>,
);

impl Origins {
    pub(super) fn locate(&self, key: &str) -> Location {
        let found = self.0.get(key).or_else(|| {
            // A key inside a table we know: point at the table.
            let mut parent = key;
            while let Some((p, _)) = parent.rsplit_once('.') {
                parent = p;
                if let Some(hit) = self.0.get(parent) {
                    return Some(hit);
                }
            }
            None
        });
        Location {
            file: found.map(|(f, _)| f.clone()).or_else(|| self.1.clone()),
            line: found.map(|(_, l)| *l),
            key: Some(key.to_string()),
        }
    }

    /// The first recorded key below `prefix` whose last segment is `name`.
    fn find_below(&self, prefix: &str, name: &str) -> Option<String> {
        let mut hits: Vec<&String> = self
            .0
            .keys()
            .filter(|k| {
                (prefix.is_empty() || k.starts_with(&format!("{prefix}.")))
                    && k.rsplit('.').next() == Some(name)
            })
            .collect();
        hits.sort();
        hits.first().map(|k| k.to_string())
    }
}

/// A directory holding this file is a fleet layout (see [`config_files`]).
pub const FLEET_BASE: &str = "base.toml";
/// In a fleet layout, merged last.
pub const FLEET_DEVICE: &str = "device.toml";
/// In a fleet layout, overlays merged right after `base.toml`.
pub const FLEET_SITE_DIR: &str = "site";
/// `NAME=value` lines next to the `*.toml` of a config directory, used for
/// `${NAME}` when the environment does not set `NAME`.
pub const ENV_FILE: &str = "env";

/// Loads a config file, or a directory of `*.toml` merged in the order of
/// [`config_files`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_merged(path, &|name| std::env::var(name).ok()).map(|(config, _, _)| config)
}

/// [`load`] with `env` standing in for the process environment.
#[cfg(test)]
pub(super) fn load_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    load_merged(path, env).map(|(config, _, _)| config)
}

/// Loads like [`load`], and also renders the merged config as TOML, each key
/// followed by `# FILE:LINE` of the file that set it last (paths relative to
/// a config directory). Secrets (`password`, `secret_access_key`,
/// `auth_token`) are shown as `"<redacted>"`.
pub fn load_annotated(path: &Path) -> Result<(Config, String), ConfigError> {
    let (config, merged, origins) = load_merged(path, &|name| std::env::var(name).ok())?;
    let base = path.is_dir().then_some(path);
    Ok((config, render(&merged, &origins, base)))
}

fn load_merged(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, toml::Table, Origins), ConfigError> {
    let files = config_files(path)?;
    let vars = if path.is_dir() {
        read_env_file(&path.join(ENV_FILE))?
    } else {
        HashMap::new()
    };
    // The real environment wins over the env file.
    let lookup = |name: &str| env(name).or_else(|| vars.get(name).cloned());
    let mut merged = toml::Table::new();
    let mut origins = Origins(HashMap::new(), Some(path.to_path_buf()));
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        let table = parse_file(&text, Some(file), &lookup, &mut origins)?;
        merge(&mut merged, table);
    }
    let config = finish(&merged, &origins)?;
    Ok((config, merged, origins))
}

/// Loads config from a string, as if it were one file called `name`.
pub fn load_str(text: &str, name: &str) -> Result<Config, ConfigError> {
    let mut origins = Origins(HashMap::new(), Some(PathBuf::from(name)));
    let lookup = |name: &str| std::env::var(name).ok();
    let table = parse_file(text, Some(Path::new(name)), &lookup, &mut origins)?;
    finish(&table, &origins)
}

fn finish(merged: &toml::Table, origins: &Origins) -> Result<Config, ConfigError> {
    let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged.clone()))
        .map_err(|e| deserialize_error(e, merged, origins))?;
    super::validate::validate(&config, origins)?;
    super::secret::read_secret_files(&mut config, origins)?;
    Ok(config)
}

/// The files behind `-c PATH`, in merge order.
///
/// - A file: just that file.
/// - A directory with `base.toml` (fleet layout): `base.toml`, then
///   `site/*.toml` in name order, then the other top-level `*.toml` in name
///   order, then `device.toml` last.
/// - Any other directory: its top-level `*.toml` in name order.
pub fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    if !path.is_dir() {
        std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        return Ok(vec![path.to_path_buf()]);
    }
    let top = toml_files_in(path)?;
    let base = path.join(FLEET_BASE);
    if !top.contains(&base) {
        if top.is_empty() {
            return Err(ConfigError::NoFiles(path.to_path_buf()));
        }
        return Ok(top);
    }
    let device = path.join(FLEET_DEVICE);
    let site = path.join(FLEET_SITE_DIR);
    let mut files = vec![base.clone()];
    if site.is_dir() {
        files.extend(toml_files_in(&site)?);
    }
    files.extend(top.iter().filter(|f| **f != base && **f != device).cloned());
    if top.contains(&device) {
        files.push(device);
    }
    Ok(files)
}

/// The `*.toml` files directly in `dir`, in name order.
fn toml_files_in(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads `NAME=value` lines; a missing file is empty. Blank lines and `#`
/// comments are skipped, `export ` before a name is allowed, and a value in
/// matching single or double quotes loses them (no escapes).
fn read_env_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse_env(&text, path)
}

fn parse_env(text: &str, path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let mut vars = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let at = || Location {
            file: Some(path.to_path_buf()),
            line: Some(index + 1),
            key: None,
        };
        let Some((name, value)) = line.split_once('=') else {
            return Err(ConfigError::invalid(at(), "expected NAME=value"));
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ConfigError::invalid(
                at(),
                format!("`{name}` is not a valid variable name"),
            ));
        }
        let value = value.trim();
        let value = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(open, close)| {
                value
                    .strip_prefix(*open)
                    .and_then(|v| v.strip_suffix(*close))
            })
            .unwrap_or(value);
        vars.insert(name.to_string(), value.to_string());
    }
    Ok(vars)
}

/// Keys whose values `--print` hides.
const SECRET_KEYS: [&str; 3] = ["password", "secret_access_key", "auth_token"];

fn render(merged: &toml::Table, origins: &Origins, base: Option<&Path>) -> String {
    let mut out = String::new();
    render_table(merged, "", "", origins, base, &mut out);
    out
}

fn render_table(
    table: &toml::Table,
    path: &str,
    header: &str,
    origins: &Origins,
    base: Option<&Path>,
    out: &mut String,
) {
    let join = |prefix: &str, key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    let annotate = |out: &mut String, line: String, key: &str| {
        match origins.0.get(key) {
            Some((file, at)) => {
                let file = base.and_then(|b| file.strip_prefix(b).ok()).unwrap_or(file);
                out.push_str(&format!("{line:<40}  # {}:{at}\n", file.display()));
            }
            None => out.push_str(&format!("{line}\n")),
        };
    };
    let (tables, values): (Vec<_>, Vec<_>) = table.iter().partition(|(_, v)| v.is_table());
    if !header.is_empty() && (!values.is_empty() || tables.is_empty()) {
        if !out.is_empty() {
            out.push('\n');
        }
        annotate(out, format!("[{header}]"), path);
    }
    for (key, value) in values {
        let shown = match value {
            toml::Value::String(s) if !s.is_empty() && SECRET_KEYS.contains(&key.as_str()) => {
                format!("\"{}\"", super::REDACTED)
            }
            _ => value.to_string(),
        };
        annotate(
            out,
            format!("{} = {shown}", toml_key(key)),
            &join(path, key),
        );
    }
    for (key, value) in tables {
        if let toml::Value::Table(inner) = value {
            render_table(
                inner,
                &join(path, key),
                &join(header, &toml_key(key)),
                origins,
                base,
                out,
            );
        }
    }
}

/// A key as TOML writes it: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        toml::Value::String(key.to_string()).to_string()
    }
}

fn parse_file(
    text: &str,
    file: Option<&Path>,
    lookup: &dyn Fn(&str) -> Option<String>,
    origins: &mut Origins,
) -> Result<toml::Table, ConfigError> {
    let text = substitute_env(text, file, lookup)?;
    let located = |span: Option<std::ops::Range<usize>>| Location {
        file: file.map(Path::to_path_buf),
        line: span.map(|s| line_of(&text, s.start)),
        key: None,
    };
    let spanned = DeTable::parse(&text)
        .map_err(|e| ConfigError::invalid(located(e.span()), e.message().trim()))?;
    if let Some(file) = file {
        record_origins(spanned.get_ref(), "", &text, file, origins);
    }
    toml::from_str(&text).map_err(|e| ConfigError::invalid(located(e.span()), e.message().trim()))
}

fn record_origins(table: &DeTable<'_>, prefix: &str, text: &str, file: &Path, out: &mut Origins) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        let line = line_of(text, key.span().start);
        out.0.insert(path.clone(), (file.to_path_buf(), line));
        if let DeValue::Table(inner) = value.get_ref() {
            record_origins(inner, &path, text, file, out);
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Tables merge key by key; anything else set later replaces what came before.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Replaces `${NAME}` and `${NAME:-default}`; `$$` is a literal `$`.
/// Comment lines are left alone so documentation may mention variables.
fn substitute_env(
    text: &str,
    file: Option<&Path>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut table = String::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            out.push_str(line);
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            table = header.trim_matches(['[', ']', ' ']).to_string();
        }
        let key = trimmed.split_once('=').map(|(k, _)| match table.as_str() {
            "" => k.trim().to_string(),
            t => format!("{t}.{}", k.trim()),
        });
        let err = |message: String| {
            let at = Location {
                file: file.map(Path::to_path_buf),
                line: Some(index + 1),
                key: key.clone(),
            };
            ConfigError::invalid(at, message)
        };
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let end = body.find('}').ok_or_else(|| {
                    err("unclosed `${`: write `${NAME}` or `$$` for a literal `$`".into())
                })?;
                let expr = &body[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (expr, None),
                };
                let valid =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(err(format!("`${{{expr}}}` is not a valid variable name")));
                }
                match (lookup(name), default) {
                    (Some(value), _) => out.push_str(&value),
                    (None, Some(default)) => out.push_str(default),
                    (None, None) => {
                        return Err(err(format!(
                            "environment variable {name} is not set; set it or write ${{{name}:-default}}"
                        )));
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

fn deserialize_error(
    err: serde_path_to_error::Error<toml::de::Error>,
    merged: &toml::Table,
    origins: &Origins,
) -> ConfigError {
    let path = err.path().to_string();
    let path = if path == "." { String::new() } else { path };
    if let Some(inner) = source_error(&path, merged) {
        return inner_error(inner, &path, origins);
    }
    let message = err.inner().message().trim().to_string();
    let key = unknown_field_name(&message)
        .and_then(|name| origins.find_below(&path, name))
        .unwrap_or(path);
    ConfigError::invalid(origins.locate(&key), message)
}

/// Sources are a tagged enum, and serde buffers their table, losing the
/// path inside it. Deserialising the table as its own type finds the key.
fn source_error(
    path: &str,
    merged: &toml::Table,
) -> Option<serde_path_to_error::Error<toml::de::Error>> {
    use super::{HttpSourceConfig, MqttSourceConfig};
    let name = path.strip_prefix("sources.")?;
    let mut table = merged.get("sources")?.get(name)?.as_table()?.clone();
    let kind = table.remove("type")?;
    let value = toml::Value::Table(table);
    match kind.as_str()? {
        "mqtt" => serde_path_to_error::deserialize::<_, MqttSourceConfig>(value).err(),
        "http" => serde_path_to_error::deserialize::<_, HttpSourceConfig>(value).err(),
        _ => None,
    }
}

fn inner_error(
    err: serde_path_to_error::Error<toml::de::Error>,
    prefix: &str,
    origins: &Origins,
) -> ConfigError {
    let inner = err.path().to_string();
    let message = err.inner().message().trim().to_string();
    let key = unknown_field_name(&message)
        .map(|name| format!("{prefix}.{name}"))
        .unwrap_or_else(|| {
            if inner == "." {
                prefix.to_string()
            } else {
                format!("{prefix}.{inner}")
            }
        });
    ConfigError::invalid(origins.locate(&key), message)
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn substitutes_variables_defaults_and_escapes() {
        let text = "a = \"${A}\"\nb = \"${B:-fallback}\"\nc = \"$$x ${C:-}\"\n# ${UNSET}\n";
        let out = substitute_env(text, None, env(&[("A", "one")])).unwrap();
        assert_eq!(
            out,
            "a = \"one\"\nb = \"fallback\"\nc = \"$x \"\n# ${UNSET}\n"
        );
    }

    #[test]
    fn missing_variable_names_line_and_variable() {
        let err = substitute_env(
            "x = 1\ny = \"${NOPE}\"\n",
            Some(Path::new("a.toml")),
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("a.toml:2: "), "{err}");
        assert!(err.contains("NOPE is not set"), "{err}");
    }

    #[test]
    fn merge_overlays_tables_and_replaces_arrays() {
        let mut base: toml::Table = toml::from_str("[a]\nx = 1\nl = [1, 2]\n[b]\ny = 2\n").unwrap();
        let over: toml::Table = toml::from_str("[a]\nz = 3\nl = [9]\n").unwrap();
        merge(&mut base, over);
        let expect: toml::Table =
            toml::from_str("[a]\nx = 1\nz = 3\nl = [9]\n[b]\ny = 2\n").unwrap();
        assert_eq!(base, expect);
    }
}
