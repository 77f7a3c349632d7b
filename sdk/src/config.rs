//! Plugin descriptions and typed access to configuration values.
use std::collections::BTreeMap;

use crate::{ConfigEntry, ConfigField, ConfigKind, ConfigValue, PluginError, PluginInfo};

/// Builder for what `describe()` returns.
#[derive(Debug, Clone)]
pub struct Info {
    info: PluginInfo,
}

impl Info {
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        Info {
            info: PluginInfo {
                name: name.to_string(),
                version: version.to_string(),
                description: description.to_string(),
                config_schema: Vec::new(),
            },
        }
    }

    fn field(mut self, key: &str, kind: ConfigKind, default: Option<ConfigValue>, doc: &str) -> Self {
        self.info.config_schema.push(ConfigField {
            key: key.to_string(),
            kind,
            required: default.is_none(),
            default_value: default,
            description: doc.to_string(),
        });
        self
    }

    /// A float option; `default` None makes it required.
    pub fn float(self, key: &str, default: Option<f64>, doc: &str) -> Self {
        self.field(key, ConfigKind::Float, default.map(ConfigValue::Float), doc)
    }

    /// An integer option; `default` None makes it required.
    pub fn integer(self, key: &str, default: Option<i64>, doc: &str) -> Self {
        self.field(key, ConfigKind::Integer, default.map(ConfigValue::Integer), doc)
    }

    /// A boolean option; `default` None makes it required.
    pub fn boolean(self, key: &str, default: Option<bool>, doc: &str) -> Self {
        self.field(key, ConfigKind::Boolean, default.map(ConfigValue::Boolean), doc)
    }

    /// A text option; `default` None makes it required.
    pub fn text(self, key: &str, default: Option<&str>, doc: &str) -> Self {
        self.field(key, ConfigKind::Text, default.map(|d| ConfigValue::Text(d.to_string())), doc)
    }

    pub fn into_inner(self) -> PluginInfo {
        self.info
    }

    pub fn schema(&self) -> &[ConfigField] {
        &self.info.config_schema
    }
}

/// A plugin's configuration: the values given, with the schema's defaults filled in.
#[derive(Debug, Clone, Default)]
pub struct Config {
    values: BTreeMap<String, ConfigValue>,
}

impl Config {
    /// Values as given, with defaults from `schema` for keys that were not.
    pub fn with_defaults(entries: Vec<ConfigEntry>, schema: &[ConfigField]) -> Self {
        let mut values: BTreeMap<String, ConfigValue> = entries.into_iter().map(|e| (e.key, e.value)).collect();
        for field in schema {
            if let Some(default) = &field.default_value {
                values.entry(field.key.clone()).or_insert_with(|| default.clone());
            }
        }
        Config { values }
    }

    pub fn get(&self, key: &str) -> Option<&ConfigValue> {
        self.values.get(key)
    }

    fn require(&self, key: &str) -> Result<&ConfigValue, PluginError> {
        self.values.get(key).ok_or_else(|| PluginError::invalid_config(key, "missing"))
    }

    /// A number (an integer is accepted where a float is asked for).
    pub fn f64(&self, key: &str) -> Result<f64, PluginError> {
        match self.require(key)? {
            ConfigValue::Float(v) => Ok(*v),
            ConfigValue::Integer(v) => Ok(*v as f64),
            other => Err(PluginError::invalid_config(key, format!("expected a number, got {other:?}"))),
        }
    }

    pub fn i64(&self, key: &str) -> Result<i64, PluginError> {
        match self.require(key)? {
            ConfigValue::Integer(v) => Ok(*v),
            other => Err(PluginError::invalid_config(key, format!("expected an integer, got {other:?}"))),
        }
    }

    /// A count: an integer option that must be >= 0.
    pub fn count(&self, key: &str) -> Result<usize, PluginError> {
        let v = self.i64(key)?;
        usize::try_from(v).map_err(|_| PluginError::invalid_config(key, format!("must be >= 0, got {v}")))
    }

    pub fn bool(&self, key: &str) -> Result<bool, PluginError> {
        match self.require(key)? {
            ConfigValue::Boolean(v) => Ok(*v),
            other => Err(PluginError::invalid_config(key, format!("expected a boolean, got {other:?}"))),
        }
    }

    pub fn text(&self, key: &str) -> Result<&str, PluginError> {
        match self.require(key)? {
            ConfigValue::Text(v) => Ok(v),
            other => Err(PluginError::invalid_config(key, format!("expected text, got {other:?}"))),
        }
    }
}
