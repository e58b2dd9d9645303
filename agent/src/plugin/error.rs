use std::path::PathBuf;
use std::time::Duration;

use super::codec::CodecError;

/// Why a plugin could not be loaded or run. Every message names the plugin
/// and the call that failed, and says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin engine: {message}")]
    Engine { message: String },

    #[error(
        "plugin `{plugin}`: cannot load {}: {message}; check the path and that it is a \
         wasm32-wasip2 component built against wit/silt-plugin-0.2.0 (see plugins/build.sh)",
        path.display()
    )]
    Load {
        plugin: String,
        path: PathBuf,
        message: String,
    },

    #[error(
        "plugin `{plugin}`: cannot load {}: it was built against silt:plugin@{found}, but this \
         agent speaks silt:plugin@{expected}; rebuild it against the current silt-sdk with \
         plugins/build.sh (a plugin written with silt-sdk needs no source change)",
        path.display()
    )]
    Contract {
        plugin: String,
        path: PathBuf,
        found: String,
        expected: &'static str,
    },

    #[error(
        "plugin `{plugin}`: init rejected its config: {message}; fix the plugin's config table"
    )]
    Init { plugin: String, message: String },

    #[error(
        "plugin `{plugin}`: trapped in {call}: {message}; the plugin has a bug (a panic is \
         logged just before this); its state is lost and it restarts on the next call"
    )]
    Trap {
        plugin: String,
        call: &'static str,
        message: String,
    },

    #[error(
        "plugin `{plugin}`: {call} ran longer than its {timeout:?} limit and was stopped; \
         raise the plugin's timeout or fix a slow or endless loop; it restarts on the next call"
    )]
    Timeout {
        plugin: String,
        call: &'static str,
        timeout: Duration,
    },

    #[error(
        "plugin `{plugin}`: {call} needed more than its {limit} byte memory limit and was \
         stopped; raise the plugin's max_memory or send smaller batches; it restarts on the next call"
    )]
    MemoryLimit {
        plugin: String,
        call: &'static str,
        limit: u64,
    },

    #[error(
        "plugin `{plugin}`: {call} used up its fuel budget of {fuel} and was stopped; raise \
         the plugin's fuel or send smaller batches; it restarts on the next call"
    )]
    FuelExhausted {
        plugin: String,
        call: &'static str,
        fuel: u64,
    },

    #[error("plugin `{plugin}`: {call} returned an error: {message}")]
    Failed {
        plugin: String,
        call: &'static str,
        message: String,
    },

    #[error(
        "plugin `{plugin}`: {call} returned a malformed batch: {source}; the plugin (or the \
         SDK it was built with) has a bug; rebuild it against the current silt-sdk"
    )]
    BadOutput {
        plugin: String,
        call: &'static str,
        source: CodecError,
    },

    #[error("plugin `{plugin}`: cannot pass the batch to {call}: {source}; send smaller batches")]
    BadInput {
        plugin: String,
        call: &'static str,
        source: CodecError,
    },
}

impl PluginError {
    /// True when the instance is unusable and the next call starts a fresh one.
    pub fn is_fatal_to_instance(&self) -> bool {
        matches!(
            self,
            PluginError::Trap { .. }
                | PluginError::Timeout { .. }
                | PluginError::MemoryLimit { .. }
                | PluginError::FuelExhausted { .. }
        )
    }

    /// Short machine-friendly kind, e.g. for metrics labels and dead-letter
    /// headers.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Engine { .. } => "engine",
            PluginError::Load { .. } => "load",
            PluginError::Contract { .. } => "contract",
            PluginError::Init { .. } => "init",
            PluginError::Trap { .. } => "trap",
            PluginError::Timeout { .. } => "timeout",
            PluginError::MemoryLimit { .. } => "memory_limit",
            PluginError::FuelExhausted { .. } => "fuel_exhausted",
            PluginError::Failed { .. } => "failed",
            PluginError::BadOutput { .. } => "bad_output",
            PluginError::BadInput { .. } => "bad_input",
        }
    }
}
