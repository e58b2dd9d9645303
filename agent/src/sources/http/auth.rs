//! Bearer tokens: the config's `auth_token` and the lines of
//! `auth_tokens_file`, which is re-read when it changes so tokens rotate
//! without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{HttpSourceConfig, Secret};

/// How often a request may look at the tokens file for a change.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

pub struct Tokens {
    inline: Option<Secret>,
    file: Option<TokenFile>,
}

struct TokenFile {
    path: PathBuf,
    current: Mutex<FileTokens>,
}

struct FileTokens {
    tokens: Arc<Vec<Secret>>,
    stamp: (Option<SystemTime>, u64),
    checked: Instant,
}

impl Tokens {
    /// Reads the tokens file now, so an unreadable one fails the start.
    pub fn new(config: &HttpSourceConfig) -> std::io::Result<Tokens> {
        let file = match &config.auth_tokens_file {
            Some(path) => Some(TokenFile {
                path: path.clone(),
                current: Mutex::new(FileTokens {
                    stamp: stamp(path),
                    tokens: Arc::new(read_tokens(path)?),
                    checked: Instant::now(),
                }),
            }),
            None => None,
        };
        Ok(Tokens {
            // An empty token is warned about by `silt check` and at start.
            inline: config.auth_token.clone().filter(|t| !t.is_empty()),
            file,
        })
    }

    /// Whether requests must carry a token at all.
    pub fn required(&self) -> bool {
        self.inline.is_some() || self.file.is_some()
    }

    /// Compares against every token without an early exit, so response
    /// time does not reveal which token or how much of one was right.
    pub fn accepts(&self, given: &str) -> bool {
        let mut ok = self
            .inline
            .as_ref()
            .is_some_and(|t| constant_time_eq(given.as_bytes(), t.expose().as_bytes()));
        if let Some(file) = &self.file {
            for token in file.tokens().iter() {
                ok |= constant_time_eq(given.as_bytes(), token.expose().as_bytes());
            }
        }
        ok
    }
}

impl TokenFile {
    /// The tokens, read again first if the file changed. A file that cannot
    /// be read keeps the previous tokens (an editor may be replacing it).
    fn tokens(&self) -> Arc<Vec<Secret>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.checked.elapsed() >= RECHECK_EVERY {
            current.checked = Instant::now();
            let now = stamp(&self.path);
            if now != current.stamp {
                match read_tokens(&self.path) {
                    Ok(tokens) => {
                        tracing::info!(file = %self.path.display(), tokens = tokens.len(), "auth tokens file changed; using its tokens");
                        current.tokens = Arc::new(tokens);
                        current.stamp = now;
                    }
                    Err(e) => {
                        tracing::warn!(file = %self.path.display(), error = %e, "auth tokens file changed but cannot be read; keeping the previous tokens");
                    }
                }
            }
        }
        current.tokens.clone()
    }
}

fn stamp(path: &Path) -> (Option<SystemTime>, u64) {
    match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    }
}

/// One token per line; blank lines and `#` comments are skipped.
fn read_tokens(path: &Path) -> std::io::Result<Vec<Secret>> {
    let text = Secret::new(std::fs::read_to_string(path)?);
    Ok(text
        .expose()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(Secret::new)
        .collect())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(token: Option<&str>, file: Option<&Path>) -> HttpSourceConfig {
        let mut text = String::from("listen = \"127.0.0.1:0\"\n");
        if let Some(t) = token {
            text.push_str(&format!("auth_token = \"{t}\"\n"));
        }
        if let Some(f) = file {
            text.push_str(&format!("auth_tokens_file = \"{}\"\n", f.display()));
        }
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn file_tokens_rotate_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# fleet tokens\nold-token\n\n").unwrap();
        let tokens = Tokens::new(&config(Some("inline"), Some(&path))).unwrap();
        assert!(tokens.required());
        assert!(tokens.accepts("inline") && tokens.accepts("old-token"));
        assert!(!tokens.accepts("# fleet tokens") && !tokens.accepts(""));

        std::fs::write(&path, "old-token\nnew-token-longer\n").unwrap();
        std::thread::sleep(RECHECK_EVERY + Duration::from_millis(50));
        assert!(tokens.accepts("new-token-longer") && tokens.accepts("old-token"));
        std::fs::write(&path, "new-token-longer\n").unwrap();
        std::thread::sleep(RECHECK_EVERY + Duration::from_millis(50));
        assert!(!tokens.accepts("old-token"), "a removed token is refused");

        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(RECHECK_EVERY + Duration::from_millis(50));
        assert!(
            tokens.accepts("new-token-longer"),
            "an unreadable file keeps the last tokens"
        );
    }

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn an_empty_token_is_no_token() {
        let tokens = Tokens::new(&config(Some(""), None)).unwrap();
        assert!(!tokens.required());
    }
}
