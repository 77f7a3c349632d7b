//! `plugin.toml`: a plugin author's project, as `nereid plugin new` writes it and `nereid plugin
//! build` / `plugin test` read it.
use std::path::PathBuf;

use serde::Deserialize;

use super::reader::{bad, CheckConfig, FieldError};
use crate::runtime::config::ConfigTable;
use crate::runtime::Slot;

/// The languages a project can be written in, and the toolchain that builds each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// cargo, for wasm32-wasip2, with the nereid SDK crate.
    Rust,
    /// componentize-py with `nereid_plugin`.
    Python,
    /// componentize-js with `nereid-plugin.js`.
    Javascript,
}

impl Language {
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::Javascript => "javascript",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginProject {
    /// The plugin's name: the Rust package, the component file (`<name>.wasm`).
    pub name: String,
    /// The slot, as `nereid plugin inspect` names it (`aggregator`, `client-objective`, ...).
    #[serde(deserialize_with = "slot_by_name")]
    pub slot: Slot,
    pub language: Language,
    /// The WIT world; it follows from the slot (kept in the file for the tools that read it).
    #[serde(default)]
    pub world: Option<String>,
    /// The plugin's options for the slot checks, as a job would give them.
    #[serde(default)]
    pub config: ConfigTable,
    /// The adapter check's payload, when the adapter takes something else than raw f32.
    #[serde(default)]
    pub test: Option<AdapterTest>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterTest {
    pub content_type: String,
    /// A file, relative to the project.
    pub payload: PathBuf,
}

fn slot_by_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Slot, D::Error> {
    let name = String::deserialize(d)?;
    Slot::named(&name)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown slot `{name}`: one of {}", slot_names())))
}

/// The slots, as a sentence for messages.
pub fn slot_names() -> String {
    Slot::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
}

impl CheckConfig for PluginProject {
    fn check(&self) -> Result<(), FieldError> {
        crate::names::check(crate::names::Kind::Plugin, &self.name).map_err(|e| bad("name", e.to_string()))?;
        let slot = self.slot;
        if let Some(world) = &self.world {
            if world != slot.world() {
                return Err(bad("world", format!("slot {} is world `{}`, not `{world}`", slot.name(), slot.world())));
            }
        }
        if self.test.is_some() && slot != Slot::Adapter {
            return Err(bad("test", "only an adapter's checks take a payload"));
        }
        Ok(())
    }
}
