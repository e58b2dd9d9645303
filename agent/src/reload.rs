//! When to reload: SIGHUP, or a change to the config files or a plugin file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, Config, ConfigError};

/// Editors write a file in several steps; changes closer together than this
/// make one reload.
const SETTLE: Duration = Duration::from_millis(300);

pub struct Reloader {
    path: PathBuf,
    tx: mpsc::UnboundedSender<&'static str>,
    rx: mpsc::UnboundedReceiver<&'static str>,
    watcher: Option<notify::RecommendedWatcher>,
}

impl Reloader {
    /// Reloads from `path` (a file or a directory of configs).
    pub fn new(path: &Path) -> Reloader {
        let (tx, rx) = mpsc::unbounded_channel();
        Reloader {
            path: path.to_path_buf(),
            tx,
            rx,
            watcher: None,
        }
    }

    /// Starts listening for SIGHUP. Needs a tokio runtime.
    pub fn listen_for_sighup(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send("SIGHUP").is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Watches the config path and the plugin files `config` uses; replaces
    /// any earlier watch. A failing watch only costs automatic reloads.
    pub fn watch(&mut self, config: &Config) {
        let tx = self.tx.clone();
        let watched = move |event: notify::Result<notify::Event>| {
            let relevant = event.is_ok_and(|e| {
                (e.kind.is_modify() || e.kind.is_create() || e.kind.is_remove())
                    && e.paths.iter().any(|p| is_config_or_plugin(p))
            });
            if relevant {
                let _ = tx.send("file change");
            }
        };
        let mut paths = vec![self.path.clone()];
        paths.extend(config.transforms.values().map(|t| t.plugin.clone()));
        let result = notify::recommended_watcher(watched).and_then(|mut w| {
            for path in &paths {
                w.watch(path, RecursiveMode::Recursive)?;
            }
            Ok(w)
        });
        match result {
            Ok(w) => self.watcher = Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch config and plugin files; reload with SIGHUP");
                self.watcher = None;
            }
        }
    }

    /// Waits for the next reload request; returns what asked for it.
    pub async fn requested(&mut self) -> &'static str {
        let Some(why) = self.rx.recv().await else {
            return std::future::pending().await;
        };
        tokio::time::sleep(SETTLE).await;
        while self.rx.try_recv().is_ok() {}
        why
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        config::load(&self.path)
    }
}

/// Only these files change the pipeline; a data_dir below a watched config
/// directory must not trigger reloads with every write.
fn is_config_or_plugin(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml" || e == "wasm")
        || path.file_name().is_some_and(|n| n == "env")
}
