//! Errors of loading and calling plugins. Every variant names the plugin (or the file) and,
//! for calls, the call.
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: not a valid WebAssembly component: {message}")]
    Compile { origin: String, message: String },
    #[error("{origin}: wrong slot: expected world `{expected}`, but the component implements {actual}")]
    WrongSlot { origin: String, expected: &'static str, actual: String },
    #[error(
        "{origin}: built against the plugin contract nereid:plugin@{built}; this host speaks nereid:plugin@{host} \
         (rebuild the plugin against wit/nereid.wit of this version)"
    )]
    Contract { origin: String, built: String, host: &'static str },
    #[error("{origin}: cannot be instantiated: {message}")]
    Instantiate { origin: String, message: String },
    #[error("plugin `{plugin}`: `{call}` exceeded its time limit of {limit:?} and was stopped")]
    Timeout { plugin: String, call: &'static str, limit: Duration },
    #[error("plugin `{plugin}`: `{call}` exceeded its memory limit of {limit} bytes and was stopped")]
    OutOfMemory { plugin: String, call: &'static str, limit: usize },
    #[error("plugin `{plugin}` trapped in `{call}`: {message}")]
    Trap { plugin: String, call: &'static str, message: String },
    #[error("plugin `{plugin}`: invalid configuration: key `{key}`: {message}")]
    InvalidConfig { plugin: String, key: String, message: String },
    #[error("plugin `{plugin}` rejected {subject}: {message}")]
    Rejected { plugin: String, subject: String, message: String },
    #[error("plugin `{plugin}`: `{call}` came at the wrong moment: {message}")]
    BadState { plugin: String, call: &'static str, message: String },
    #[error("plugin `{plugin}` failed in `{call}`: {message}")]
    Internal { plugin: String, call: &'static str, message: String },
    #[error("component cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
}

impl PluginError {
    /// True when the plugin instance was lost (trap, timeout, out of memory): the next call runs
    /// on a fresh instance with no state from before.
    pub fn instance_lost(&self) -> bool {
        matches!(self, PluginError::Timeout { .. } | PluginError::OutOfMemory { .. } | PluginError::Trap { .. })
    }
}
