//! The subcommands of the `nereid` binary.
pub mod api;
pub mod bench;
pub mod bench_compress;
pub mod bench_forgetting;
pub mod bench_infer;
pub mod bench_round;
pub mod bench_split;
pub mod bench_swap;
pub mod demo;
pub mod fleet;
pub mod model;
pub mod oci;
pub mod plugin;
pub mod plugin_demo;
pub mod serve;

use std::path::PathBuf;

/// Where the plugins built by `cargo xtask plugins` are: `$NEREID_PLUGIN_DIR`, else
/// `wasm32-wasip2/plugin` beside the directory of this executable (the workspace's target dir).
pub fn default_plugin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NEREID_PLUGIN_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(|p| p.parent()).map(|target| target.join("wasm32-wasip2").join("plugin")))
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip2/plugin"))
}

/// The built component of plugin crate `name` (e.g. "fedavg" -> nereid_fedavg.wasm).
pub fn plugin_path(dir: &std::path::Path, name: &str) -> PathBuf {
    dir.join(format!("nereid_{}.wasm", name.replace('-', "_")))
}

/// A job loader's fetcher: files relative to the job, `oci://` references through the registry
/// cache under `cache_dir`.
pub fn fetcher(
    rt: &tokio::runtime::Runtime,
    components: &nereid::components::Components,
    source: &str,
    base: &std::path::Path,
) -> Result<nereid::components::Fetched, nereid::components::ComponentError> {
    rt.block_on(components.fetch(source, base, None))
}

/// The components fetcher of a CLI command (registry settings from the file and environment).
pub fn components(cache_dir: Option<&std::path::Path>) -> anyhow::Result<nereid::components::Components> {
    Ok(nereid::components::Components::new(
        nereid::components::Components::cache_root(cache_dir),
        &std::collections::BTreeMap::new(),
    )?)
}
