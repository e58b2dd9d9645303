//! WebAssembly transform plugins: the host side of `wit/silt-plugin-0.2.0`.
//!
//! ```text
//! PluginEngine::new(cache_dir) -> Result<PluginEngine, PluginError>   // Clone; one per agent
//! Plugin::load(&engine, name, wasm_path, config_json, PluginLimits) -> Result<Plugin, PluginError>
//! plugin.process(Vec<Event>) -> Result<Vec<Event>, PluginError>
//! plugin.tick(now_ms: i64)   -> Result<Vec<Event>, PluginError>
//! plugin.reinstantiate()     -> Result<(), PluginError>
//! plugin.name() -> &str
//! PluginLimits { max_memory: u64, timeout: Duration, fuel: Option<u64> }   // Default: 64 MiB, 1 s, None
//! DeadLetter::new(dir)?.write(plugin, reason, &events) -> io::Result<PathBuf>
//! cli::plugin_test(wasm, config_json, input: Option<&Path>, out: &mut dyn Write) -> anyhow::Result<()>
//! scaffold::plugin_new(name, dir: Option<&Path>, cwd) -> anyhow::Result<NewPlugin>   // `silt plugin new`
//! ```
//!
//! Threading: `Plugin` is `Send` but not `Sync`; calls block the calling
//! thread for up to `timeout`, so async callers run them in
//! `tokio::task::spawn_blocking` (or a dedicated thread). `PluginEngine` is
//! cheap to clone and shared by all plugins.
//!
//! Failure model: a plugin that returns `Err` gives [`PluginError::Failed`]
//! and stays usable. A trap (panic), timeout, memory-limit or fuel hit leaves
//! the instance unusable; the next `process`/`tick` builds a fresh instance
//! (running `init` again) before calling in, and `reinstantiate` does so
//! eagerly. Either way the failed batch is the caller's to dead-letter; its
//! in-plugin state (windows, dedup sets) is lost.
//!
//! Sandbox: WASI preview 2 with no preopened directories, no environment
//! variables or arguments, no sockets or name lookup, empty stdin, stdout
//! discarded; clocks, random and stderr (inherited) only. Guest `log` calls
//! become `tracing` events with a `plugin` field.
//!
//! Compile cache: compiled components are stored in `cache_dir` as
//! `<sha256 of the wasm>-<engine hash>.cwasm`, so restarts skip Cranelift.
//! Those files are native code that is loaded without verification: the
//! directory must be writable only by the agent's user.

pub mod cli;
mod codec;
pub mod dead_letter;
mod engine;
mod error;
mod instance;
pub(crate) mod ndjson;
pub mod scaffold;

pub use dead_letter::DeadLetter;
pub use engine::PluginEngine;
pub use error::PluginError;
pub use instance::{Plugin, PluginLimits};

#[cfg(test)]
mod tests;
