//! Checks a plugin's configuration table against the schema the plugin describes, so unknown
//! keys, wrong types and missing values are reported by the host with the key at fault.
use std::collections::BTreeMap;

use super::bindings::types::{ConfigEntry, ConfigField, ConfigKind, ConfigValue};

/// A plugin's table from TOML (or `--config key=value` pairs).
pub type ConfigTable = BTreeMap<String, toml::Value>;

/// A configuration problem: the key at fault and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

fn kind_name(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Boolean => "a boolean",
        ConfigKind::Integer => "an integer",
        ConfigKind::Float => "a number",
        ConfigKind::Text => "a string",
    }
}

/// The kind name of a config-kind, as `plugin inspect` prints it.
pub fn kind_label(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Boolean => "boolean",
        ConfigKind::Integer => "integer",
        ConfigKind::Float => "float",
        ConfigKind::Text => "string",
    }
}

/// A config value as TOML would write it.
pub fn value_label(value: &ConfigValue) -> String {
    match value {
        ConfigValue::Boolean(b) => b.to_string(),
        ConfigValue::Integer(i) => i.to_string(),
        ConfigValue::Float(f) => format!("{f:?}"),
        ConfigValue::Text(t) => format!("{t:?}"),
    }
}

/// Checks `table` against `schema` and converts it to what `configure` takes.
pub fn check(schema: &[ConfigField], table: &ConfigTable) -> Result<Vec<ConfigEntry>, ConfigProblem> {
    let mut entries = Vec::new();
    for (key, value) in table {
        let Some(field) = schema.iter().find(|f| &f.key == key) else {
            let known: Vec<&str> = schema.iter().map(|f| f.key.as_str()).collect();
            let message = if known.is_empty() {
                "unknown option: this plugin takes no options".to_string()
            } else {
                format!("unknown option; this plugin accepts: {}", known.join(", "))
            };
            return Err(ConfigProblem { key: key.clone(), message });
        };
        let converted = match (field.kind, value) {
            (ConfigKind::Boolean, toml::Value::Boolean(b)) => ConfigValue::Boolean(*b),
            (ConfigKind::Integer, toml::Value::Integer(i)) => ConfigValue::Integer(*i),
            (ConfigKind::Float, toml::Value::Float(f)) => ConfigValue::Float(*f),
            (ConfigKind::Float, toml::Value::Integer(i)) => ConfigValue::Float(*i as f64),
            (ConfigKind::Text, toml::Value::String(s)) => ConfigValue::Text(s.clone()),
            (kind, other) => {
                return Err(ConfigProblem {
                    key: key.clone(),
                    message: format!("expected {}, got {} `{other}`", kind_name(kind), other.type_str()),
                })
            }
        };
        entries.push(ConfigEntry { key: key.clone(), value: converted });
    }
    if let Some(missing) = schema.iter().find(|f| f.required && !table.contains_key(&f.key)) {
        return Err(ConfigProblem {
            key: missing.key.clone(),
            message: format!("required option is missing ({})", missing.description),
        });
    }
    Ok(entries)
}

/// Parses the value of a `key=value` command-line option as a TOML value; bare words are strings.
pub fn parse_cli_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// A plugin's config value as TOML (what the cloud publishes to clients).
pub fn config_value_to_toml(v: &ConfigValue) -> toml::Value {
    match v {
        ConfigValue::Boolean(b) => toml::Value::Boolean(*b),
        ConfigValue::Integer(i) => toml::Value::Integer(*i),
        ConfigValue::Float(f) => toml::Value::Float(*f),
        ConfigValue::Text(t) => toml::Value::String(t.clone()),
    }
}

/// Scalars of a table as plugin config entries (other values are skipped).
pub fn table_to_entries(table: &ConfigTable) -> Vec<ConfigEntry> {
    table
        .iter()
        .filter_map(|(k, v)| {
            let value = match v {
                toml::Value::Boolean(b) => ConfigValue::Boolean(*b),
                toml::Value::Integer(i) => ConfigValue::Integer(*i),
                toml::Value::Float(f) => ConfigValue::Float(*f),
                toml::Value::String(s) => ConfigValue::Text(s.clone()),
                _ => return None,
            };
            Some(ConfigEntry { key: k.clone(), value })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Vec<ConfigField> {
        vec![
            ConfigField {
                key: "mu".into(),
                kind: ConfigKind::Float,
                required: false,
                default_value: Some(ConfigValue::Float(0.01)),
                description: "proximal".into(),
            },
            ConfigField {
                key: "k".into(),
                kind: ConfigKind::Integer,
                required: true,
                default_value: None,
                description: "count".into(),
            },
        ]
    }

    #[test]
    fn accepts_and_converts() {
        let table: ConfigTable =
            [("mu".to_string(), toml::Value::Integer(1)), ("k".to_string(), toml::Value::Integer(3))].into();
        let entries = check(&schema(), &table).expect("valid");
        assert!(matches!(entries[1].value, ConfigValue::Float(v) if v == 1.0));
    }

    #[test]
    fn names_the_key_at_fault() {
        let unknown: ConfigTable =
            [("k".to_string(), toml::Value::Integer(3)), ("nu".to_string(), toml::Value::Float(1.0))].into();
        let e = check(&schema(), &unknown).expect_err("unknown key");
        assert_eq!(e.key, "nu");
        assert!(e.message.contains("accepts: mu, k"), "{}", e.message);

        let wrong: ConfigTable = [("k".to_string(), toml::Value::String("x".into()))].into();
        let e = check(&schema(), &wrong).expect_err("wrong type");
        assert_eq!((e.key.as_str(), e.message.as_str()), ("k", "expected an integer, got string `\"x\"`"));

        let e = check(&schema(), &ConfigTable::new()).expect_err("missing");
        assert_eq!(e.key, "k");
    }

    #[test]
    fn cli_values_parse_as_toml() {
        assert_eq!(parse_cli_value("0.5"), toml::Value::Float(0.5));
        assert_eq!(parse_cli_value("3"), toml::Value::Integer(3));
        assert_eq!(parse_cli_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_cli_value("median"), toml::Value::String("median".into()));
    }
}
