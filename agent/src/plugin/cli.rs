//! `silt plugin test PLUGIN.wasm [--config JSON] [--input FILE]`: run a
//! plugin over NDJSON events without an agent, for plugin authors, golden
//! tests and replaying dead-letter files.
//!
//! Input (FILE, or stdin without `--input`): one event per line in the
//! format of `ndjson.rs`, e.g. `{"topic":"t","ts_ms":1000,"payload":{..}}`;
//! `ts_ms` defaults to the current time, `attributes` to none, and
//! dead-letter header lines are skipped.
//!
//! All events go to `process` as one batch; then `tick` is called once with
//! `now_ms` = the largest input `ts_ms` + 1 hour (the current time when
//! there is no input), late enough for windowed plugins with windows and
//! grace up to an hour to flush. Output: the events `process` returned
//! followed by those `tick` returned, one NDJSON line each, same format.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::{Plugin, PluginEngine, PluginLimits, ndjson};
use crate::event::{Event, now_ms};

/// How far past the newest input event the final `tick` is placed.
pub const TICK_AFTER_MS: i64 = 60 * 60 * 1000;

/// Implements `silt plugin test`; see the module docs for the formats.
pub fn plugin_test(
    wasm: &Path,
    config_json: &str,
    input: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match serde_json::from_str::<serde_json::Value>(config_json) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(_) => bail!("--config must be a JSON object, e.g. '{{\"key\":\"id\"}}'"),
        Err(e) => bail!("--config is not valid JSON: {e}"),
    }

    let text = match input {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read input file {}", path.display()))?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read events from stdin")?;
            s
        }
    };
    let source = input.map_or("stdin".to_string(), |p| p.display().to_string());
    let default_ts = now_ms();
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let parsed = ndjson::parse_line(line, default_ts)
            .map_err(|e| anyhow::anyhow!("{source} line {}: {e}", i + 1))?;
        events.extend(parsed);
    }
    let tick_at = events
        .iter()
        .map(|e| e.ts_ms)
        .max()
        .map_or(default_ts, |max| max.saturating_add(TICK_AFTER_MS));

    // A thread of its own keeps wasmtime-wasi's blocking calls out of any
    // async runtime the caller may be inside of.
    let output = std::thread::scope(|s| {
        s.spawn(|| run(wasm, config_json, events, tick_at))
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("plugin runner thread panicked")))
    })?;

    for event in &output {
        ndjson::write_event(out, event).context("cannot write output")?;
    }
    out.flush().context("cannot write output")?;
    Ok(())
}

fn run(wasm: &Path, config: &str, events: Vec<Event>, tick_at: i64) -> anyhow::Result<Vec<Event>> {
    let engine = PluginEngine::new(&cache_dir())?;
    let name = wasm
        .file_stem()
        .map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
    let mut plugin = Plugin::load(&engine, &name, wasm, config, PluginLimits::default())?;
    let mut output = plugin.process(events)?;
    output.extend(plugin.tick(tick_at)?);
    Ok(output)
}

/// Per-user cache so repeated runs skip compilation. Never a shared temp
/// directory: cached files are executed without verification.
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    match base {
        Some(base) => base.join("silt").join("compiled-plugins"),
        None => std::env::temp_dir().join(format!("silt-compiled-plugins-{}", std::process::id())),
    }
}
