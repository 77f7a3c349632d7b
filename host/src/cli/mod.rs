//! The subcommands of the `nereid` binary.
pub mod bench;
pub mod cert;
pub mod demo;
pub mod model;
pub mod oci;
pub mod plugin;
pub mod project;
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
) -> Result<nereid::runtime::Fetched, Box<dyn std::error::Error + Send + Sync>> {
    Ok(rt.block_on(components.fetch(source, base, None))?)
}

/// The components fetcher of a CLI command (registry settings from the file and environment).
pub fn components(cache_dir: Option<&std::path::Path>) -> anyhow::Result<nereid::components::Components> {
    Ok(nereid::components::Components::new(
        nereid::components::Components::cache_root(cache_dir),
        &std::collections::BTreeMap::new(),
    )?)
}

/// The limits a server puts on its callers, as flags (cloud.toml and edge.toml have `[http]`).
#[derive(clap::Args, Debug, Clone)]
pub struct HttpLimitArgs {
    /// Seconds a client has to send a request's headers (also how long an idle connection stays).
    #[arg(long, default_value_t = nereid_net::ServerLimits::default().header_timeout_secs)]
    header_timeout_secs: f64,
    /// Seconds a request body may go without a byte arriving.
    #[arg(long, default_value_t = nereid_net::ServerLimits::default().body_idle_secs)]
    body_idle_secs: f64,
    /// Seconds a whole request body may take.
    #[arg(long, default_value_t = nereid_net::ServerLimits::default().body_timeout_secs)]
    body_timeout_secs: f64,
    /// Connections open at once, in all.
    #[arg(long, default_value_t = nereid_net::ServerLimits::default().max_connections)]
    max_connections: usize,
    /// Connections open at once from one address.
    #[arg(long, default_value_t = nereid_net::ServerLimits::default().max_connections_per_peer)]
    max_connections_per_peer: usize,
    /// Seconds requests in flight may take to finish after SIGTERM.
    #[arg(long, default_value_t = nereid_net::ServerLimits::default().shutdown_grace_secs)]
    shutdown_grace_secs: f64,
}

impl HttpLimitArgs {
    pub fn limits(&self) -> anyhow::Result<nereid_net::ServerLimits> {
        let limits = nereid_net::ServerLimits {
            header_timeout_secs: self.header_timeout_secs,
            body_idle_secs: self.body_idle_secs,
            body_timeout_secs: self.body_timeout_secs,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            shutdown_grace_secs: self.shutdown_grace_secs,
        };
        // The error names the key; as flags, keys are spelled with dashes.
        limits.validate().map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('`', "").replace('_', "-")))?;
        Ok(limits)
    }
}

/// The limits of one plugin, as flags (`plugin aggregate`, `plugin build`, `plugin test`).
#[derive(clap::Args)]
pub struct LimitArgs {
    /// Time limit of one plugin call, in milliseconds.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub timeout_ms: u64,
    /// Memory limit of the plugin's linear memory, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory_mib: usize,
    /// Limit of host tensors the plugin may create, in MiB.
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    pub tensor_mib: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> nereid::runtime::Limits {
        nereid::runtime::Limits {
            call_timeout: std::time::Duration::from_millis(self.timeout_ms),
            memory_bytes: self.memory_mib << 20,
            tensor_bytes: self.tensor_mib << 20,
        }
    }
}
