use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

use super::PluginError;

/// How often the background thread advances the epoch: the granularity of
/// per-call timeouts. 10 ms keeps the ticker's cost negligible while a 1 s
/// timeout still fires within 1%.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Shared wasmtime state: engines, the epoch ticker and the compile cache.
#[derive(Clone)]
pub struct PluginEngine {
    inner: Arc<Inner>,
}

struct Inner {
    /// Fuel metering changes the generated code, so plugins with a fuel
    /// budget get their own engine (and cache entries); the rest don't pay
    /// for metering.
    plain: Engine,
    fueled: Engine,
    cache_dir: PathBuf,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Not joined: the ticker notices within one tick and holds only
        // engine handles, so leaving it to finish on its own is harmless.
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// Create the engines and start the epoch ticker. `cache_dir` is created
    /// if missing; it should be private to the agent (see the module docs).
    pub fn new(cache_dir: &Path) -> Result<Self, PluginError> {
        Self::for_target(cache_dir, None)
    }

    /// [`PluginEngine::new`] for code of another target than the host's
    /// default: `pulley64` runs plugins on wasmtime's Pulley interpreter
    /// (with the `pulley` feature), which is what armv7 devices get because
    /// Cranelift has no 32-bit ARM backend; `benches/plugin_engines.rs`
    /// measures that against native code on one host.
    pub fn for_target(cache_dir: &Path, target: Option<&str>) -> Result<Self, PluginError> {
        fs::create_dir_all(cache_dir).map_err(|e| PluginError::Engine {
            message: format!(
                "cannot create compile cache directory {}: {e}; check permissions or choose another data_dir",
                cache_dir.display()
            ),
        })?;
        let plain = build_engine(false, target)?;
        let fueled = build_engine(true, target)?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (stop, engines) = (stop_ticker.clone(), [plain.clone(), fueled.clone()]);
        thread::Builder::new()
            .name("silt-plugin-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engines.iter().for_each(Engine::increment_epoch);
                }
            })
            .map_err(|e| PluginError::Engine {
                message: format!("cannot start the epoch ticker thread: {e}"),
            })?;
        Ok(PluginEngine {
            inner: Arc::new(Inner {
                plain,
                fueled,
                cache_dir: cache_dir.to_path_buf(),
                stop_ticker,
            }),
        })
    }

    pub(crate) fn engine(&self, fuel: bool) -> &Engine {
        if fuel {
            &self.inner.fueled
        } else {
            &self.inner.plain
        }
    }

    /// Compile `wasm`, or load it from the cache when this exact file was
    /// compiled by a compatible engine before. Cache problems are logged and
    /// fall back to compiling: they must never stop the agent.
    pub(crate) fn component(
        &self,
        plugin: &str,
        wasm: &Path,
        fuel: bool,
    ) -> Result<Component, PluginError> {
        let load_err = |message: String| PluginError::Load {
            plugin: plugin.to_string(),
            path: wasm.to_path_buf(),
            message,
        };
        let bytes = fs::read(wasm).map_err(|e| load_err(format!("cannot read file: {e}")))?;
        let engine = self.engine(fuel);
        let cached = self.inner.cache_dir.join(cache_file_name(engine, &bytes));

        // Read into memory rather than `deserialize_file`: that one mmaps the
        // file, and anything truncating it while the agent runs (a cleanup
        // script, a second agent on the same dir) would then crash the whole
        // process with SIGBUS. A few MiB per plugin is a fair price.
        if let Ok(compiled) = fs::read(&cached) {
            // SAFETY: the file was written by `Component::serialize` below
            // into the agent's private cache dir, keyed by the wasm's hash
            // and the engine's compatibility hash; wasmtime additionally
            // checks the engine config and version on load.
            match unsafe { Component::deserialize(engine, &compiled) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(
                    plugin,
                    cache = %cached.display(),
                    error = %e,
                    "ignoring unusable compiled plugin in cache; recompiling"
                ),
            }
        }

        let started = std::time::Instant::now();
        let component = Component::new(engine, &bytes).map_err(|e| load_err(format!("{e:#}")))?;
        tracing::info!(plugin, wasm = %wasm.display(), elapsed = ?started.elapsed(), "compiled plugin");
        if let Err(e) = store_atomically(&cached, &component) {
            tracing::warn!(plugin, cache = %cached.display(), error = %e, "cannot cache compiled plugin; it will be recompiled on restart");
        }
        Ok(component)
    }
}

fn build_engine(fuel: bool, target: Option<&str>) -> Result<Engine, PluginError> {
    let engine_err = |e: wasmtime::Error| PluginError::Engine {
        message: format!("cannot create wasmtime engine: {e:#}"),
    };
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(fuel);
    if let Some(target) = target {
        config.target(target).map_err(engine_err)?;
    }
    Engine::new(&config).map_err(engine_err)
}

/// Content-addressed: a rebuilt plugin gets a new entry, and a wasmtime
/// upgrade or config change (different compatibility hash) never picks up
/// stale native code.
fn cache_file_name(engine: &Engine, wasm: &[u8]) -> String {
    let hex = crate::media::hex(&Sha256::digest(wasm));
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{hex}-{:016x}.cwasm", h.finish())
}

fn store_atomically(path: &Path, component: &Component) -> anyhow::Result<()> {
    let bytes = component.serialize()?;
    // Unique per process and call: two threads may compile the same plugin.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{seq}", std::process::id()));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    Ok(())
}
