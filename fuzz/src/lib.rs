//! What the fuzz targets share: an embedded registry on a temporary directory, served in-process
//! (its axum router, no socket) on a single-threaded runtime, one per fuzzing process.
use std::sync::{Arc, OnceLock};

pub struct Registry {
    pub rt: tokio::runtime::Runtime,
    pub router: axum::Router,
    _dir: tempfile::TempDir,
}

/// The process's registry; `max_blob_bytes` applies to the first call's registry.
pub fn registry(max_blob_bytes: u64) -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut options = nereid_registry::server::ServerOptions::open(dir.path().join("root"));
        options.max_blob_bytes = max_blob_bytes;
        let registry = nereid_registry::server::Registry::new(options).expect("the registry");
        let router = nereid_registry::server::router(Arc::new(registry));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        Registry { rt, router, _dir: dir }
    })
}

/// A plugin component as `cargo xtask plugins` builds it (`fuzz/run` does), or from
/// `NEREID_PLUGIN_DIR`.
pub fn plugin(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("NEREID_PLUGIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/plugin"));
    let path = dir.join(format!("nereid_{}.wasm", name.replace('-', "_")));
    assert!(path.is_file(), "{} is missing: build the plugins with `cargo xtask plugins`", path.display());
    path
}
