//! Every file the user writes: cloud.toml ([`cloud`]), edge.toml ([`edge`]), job files
//! ([`job`]), pipeline files ([`pipeline`]), registries.toml ([`registries`]) and a plugin
//! project's plugin.toml ([`project`]), as serde types
//! with `deny_unknown_fields`; the one reader that gives file:line:key errors for all of them
//! ([`reader`]); the small languages of triggers and deploy conditions ([`trigger`]). Names
//! follow [`crate::names`]. The CLI and the servers check through the same functions.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod cloud;
pub mod edge;
pub mod job;
pub mod pipeline;
pub mod project;
pub mod reader;
pub mod registries;
pub mod secret;
pub mod trigger;

pub use cloud::CloudConfig;
pub use edge::{EdgeConfig, IoScheduling};
pub use reader::{parse_checked_file, parse_file, parse_str, CheckConfig, ConfigError, FieldError};

/// A service's plugin: a `.wasm` path (relative to the config file) or an `oci://` reference,
/// and its options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePlugin {
    pub plugin: String,
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    pub timeout_ms: Option<u64>,
    pub memory_mib: Option<usize>,
}

pub(crate) fn limits_error(table: &str, e: nereid_net::LimitsError) -> FieldError {
    let message = e.to_string();
    let key = message.split('`').nth(1).unwrap_or("").to_string();
    FieldError { key: format!("{table}.{key}"), message }
}

pub(crate) fn plugin_limits(key: &str, p: &ServicePlugin) -> Result<(), FieldError> {
    crate::runtime::Limits::with_overrides(p.timeout_ms, p.memory_mib)
        .validate()
        .map_err(|(k, message)| FieldError { key: format!("{key}.{k}"), message })
}

pub(crate) fn name(kind: crate::names::Kind, key: String, value: &str) -> Result<(), FieldError> {
    crate::names::check(kind, value).map_err(|e| FieldError { key, message: e.to_string() })
}

/// Reads a node's config file (cloud.toml, edge.toml) into `T` and checks it, with errors
/// naming the file, the line and the key; relative paths in it are resolved by the caller
/// against the returned directory.
pub fn read_config<T: serde::de::DeserializeOwned + CheckConfig>(path: &Path) -> Result<(T, PathBuf), ConfigError> {
    let value = parse_checked_file(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((value, base))
}
