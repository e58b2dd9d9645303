//! The `file` sink: objects as files under a local directory.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

use crate::config::SinkConfig;

pub(super) fn build(config: &SinkConfig) -> Result<Arc<dyn ObjectStore>, String> {
    let path = config.path.as_deref().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    // The spool forgets a batch once its object is written: the file and
    // its directory entry must be on disk by then, not in the page cache.
    let store = LocalFileSystem::new_with_prefix(path)
        .map_err(|e| e.to_string())?
        .with_fsync(true);
    Ok(Arc::new(store))
}
