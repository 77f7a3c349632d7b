//! `registries.toml`: registry hosts spoken to in plain HTTP and their credentials, read from
//! `$NEREID_REGISTRY_CONFIG`, else `$XDG_CONFIG_HOME/nereid/registries.toml`, else
//! `~/.config/nereid/registries.toml` (if it exists). The same `[registries."host"]` tables may
//! also stand in cloud.toml and edge.toml; see [`nereid_registry::settings`] for how the sources
//! combine.
use std::collections::BTreeMap;
use std::path::PathBuf;

use nereid_registry::{HostSettings, RegistrySettings};

use super::{parse_file, ConfigError};

/// The settings file, if one is named or exists.
pub fn default_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NEREID_REGISTRY_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let file = dir.join("nereid").join("registries.toml");
    file.exists().then_some(file)
}

/// `given` (a node config's tables) completed by the settings file and the environment.
pub fn settings(given: &BTreeMap<String, HostSettings>) -> Result<RegistrySettings, ConfigError> {
    let file: Option<RegistrySettings> = default_file().map(|f| parse_file(&f)).transpose()?;
    Ok(RegistrySettings::complete(given, file.as_ref()))
}
