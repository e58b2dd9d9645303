//! Reading config files: `${VAR}` substitution, merging a directory of
//! `*.toml` in name order, and errors that point at a file, line and key.

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
pub(super) struct Origins(HashMap<String, (PathBuf, usize)>);

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
            file: found.map(|(f, _)| f.clone()),
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

/// Loads a config file, or every `*.toml` in a directory merged in name order.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let files = config_files(path)?;
    let mut merged = toml::Table::new();
    let mut origins = Origins::default();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        let table = parse_file(&text, Some(file), &mut origins)?;
        merge(&mut merged, table);
    }
    finish(merged, &origins)
}

/// Loads config from a string, as if it were one file called `name`.
pub fn load_str(text: &str, name: &str) -> Result<Config, ConfigError> {
    let mut origins = Origins::default();
    let table = parse_file(text, Some(Path::new(name)), &mut origins)?;
    finish(table, &origins)
}

fn finish(merged: toml::Table, origins: &Origins) -> Result<Config, ConfigError> {
    let config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged.clone()))
        .map_err(|e| deserialize_error(e, &merged, origins))?;
    super::validate::validate(&config, origins)?;
    Ok(config)
}

fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(read_err)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::NoFiles(path.to_path_buf()));
    }
    Ok(files)
}

fn parse_file(
    text: &str,
    file: Option<&Path>,
    origins: &mut Origins,
) -> Result<toml::Table, ConfigError> {
    let text = substitute_env(text, file, |name| std::env::var(name).ok())?;
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
