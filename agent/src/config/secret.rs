//! A config value that must never reach a log, an error chain or `check
//! --print`: passwords, secret keys, tokens.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer};
use zeroize::Zeroizing;

use super::load::{ConfigError, Origins};
use super::{Config, SourceConfig};

/// Shown as `<redacted>` by Debug and Display; the value is wiped from
/// memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

pub const REDACTED: &str = "<redacted>";

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(Zeroizing::new(value.into()))
    }

    /// The value, for the one call that needs it (a header, a signer).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The whole file, without the line break editors leave at its end.
    pub fn read_file(path: &Path) -> std::io::Result<Secret> {
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Reads every `*_file` secret into its value, so the runtime sees one
/// field, and an unreadable file fails `silt check` and the start rather
/// than the first connection.
pub(super) fn read_secret_files(config: &mut Config, origins: &Origins) -> Result<(), ConfigError> {
    let read = |key: String, path: &Path| {
        Secret::read_file(path).map_err(|e| {
            ConfigError::invalid(
                origins.locate(&key),
                format!(
                    "cannot read {}: {e}; the file must exist and be readable by silt's user",
                    path.display()
                ),
            )
        })
    };
    for (name, source) in &mut config.sources {
        match source {
            SourceConfig::Mqtt(mqtt) => {
                if let Some(path) = &mqtt.password_file {
                    mqtt.password = Some(read(format!("sources.{name}.password_file"), path)?);
                }
            }
            SourceConfig::Http(http) => {
                if let Some(path) = &http.auth_tokens_file {
                    read(format!("sources.{name}.auth_tokens_file"), path)?;
                }
            }
        }
    }
    for (name, sink) in &mut config.sinks {
        if let Some(path) = &sink.secret_access_key_file {
            sink.secret_access_key =
                Some(read(format!("sinks.{name}.secret_access_key_file"), path)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(
            format!("{:?}", Some(s.clone())),
            "Some(<redacted>)",
            "inside other Debug output too"
        );
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_value_loses_its_final_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        assert_eq!(Secret::read_file(&path).unwrap().expose(), "s3cr3t");
    }
}
