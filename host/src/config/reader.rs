//! The one reader of every TOML file a user writes (cloud.toml, edge.toml, job files, pipeline
//! files, registries.toml): syntax, unknown keys and types checked by serde, then the file's
//! own checks ([`CheckConfig`]), with every error naming the file, the line and the key.
use std::fmt;
use std::path::{Path, PathBuf};

/// A file's error: where, which key, what.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column of byte `offset` in `source`.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

/// The dotted key written on the line holding `offset` (with its table header), if any. Only
/// what looks like a TOML key is returned: an error about a file that is not TOML must not
/// echo its lines.
fn key_at(source: &str, offset: usize) -> Option<String> {
    let key = key_at_unchecked(source, offset)?;
    let plausible = key.len() <= 128
        && !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | ' '));
    plausible.then_some(key)
}

fn key_at_unchecked(source: &str, offset: usize) -> Option<String> {
    let offset = offset.min(source.len());
    let start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = source[start..].lines().next().unwrap_or("");
    if line.trim().starts_with('[') {
        return Some(line.trim().trim_matches(|c| c == '[' || c == ']').trim().to_string());
    }
    let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string());
    let table = source[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(_), None) if line.trim().starts_with('[') => {
            Some(line.trim().trim_matches(|c| c == '[' || c == ']').to_string())
        }
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

pub(crate) struct Source<'a> {
    pub(crate) path: &'a Path,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    pub(crate) fn error(&self, offset: usize, key: Option<String>, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_col(self.text, offset);
        ConfigError { file: self.path.to_path_buf(), line, column, key, message: message.into() }
    }

    /// An error at the first line that sets `key` (a dotted path), else at the header of the
    /// table `key` is or is in, else at the start.
    pub(crate) fn error_at_key(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
        let mut current = String::new();
        let mut offset = 0;
        let mut header = None;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim();
            let at = offset + (line.len() - line.trim_start().len());
            if t.starts_with('[') {
                current = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
                if header.is_none() && (current == key || current == table) {
                    header = Some(at);
                }
            } else if current == table && t.split_once('=').is_some_and(|(k, _)| k.trim().trim_matches('"') == leaf) {
                return self.error(at, Some(key.to_string()), message);
            }
            offset += line.len();
        }
        self.error(header.unwrap_or(0), Some(key.to_string()), message)
    }
}

/// Where a file's content is wrong: the dotted key (as the file spells it) and what.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("key `{key}`: {message}")]
pub struct FieldError {
    pub key: String,
    pub message: String,
}

pub(crate) fn bad(key: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { key: key.into(), message: message.into() }
}

pub(crate) fn read(path: &Path) -> Result<String, ConfigError> {
    crate::files::read_text_limited(path, crate::files::MAX_CONFIG_BYTES).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        key: None,
        message: e.to_string(),
    })
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(src: &Source) -> Result<T, ConfigError> {
    toml::from_str(src.text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        src.error(offset, key_at(src.text, offset), e.message().trim().to_string())
    })
}

/// Reads a TOML file into `T` (syntax, unknown keys and types checked), with errors naming the
/// file, the line and the key.
pub fn parse_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = read(path)?;
    parse_str(path, &text)
}

/// As [`parse_file`], on text already read (`path` names it in errors).
pub fn parse_str<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    parse(&Source { path, text })
}

/// A file's own checks beyond its types (ranges, names): the error's key is the dotted path of
/// the offending entry, which the reader turns into a line.
pub trait CheckConfig {
    fn check(&self) -> Result<(), FieldError>;

    /// Reads what the file points at before it is checked (secrets from their files or
    /// variables; `base` is the file's directory).
    fn resolve(&mut self, _base: &Path) -> Result<(), FieldError> {
        Ok(())
    }
}

/// As [`parse_file`], then the type's own [`CheckConfig`], its error pointing at the line of
/// the key at fault.
pub fn parse_checked_file<T: serde::de::DeserializeOwned + CheckConfig>(path: &Path) -> Result<T, ConfigError> {
    let text = read(path)?;
    let src = Source { path, text: &text };
    let mut value: T = parse(&src)?;
    let base = path.parent().unwrap_or(Path::new(""));
    value.resolve(base).map_err(|e| src.error_at_key(&e.key, e.message))?;
    value.check().map_err(|e| src.error_at_key(&e.key, e.message))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_keys() {
        let src = "[job]\nname = \"a\"\n\n[rounds]\nfraction = 2\n";
        assert_eq!(line_col(src, src.find("fraction").expect("present")), (5, 1));
        assert_eq!(key_at(src, src.find("2").expect("present")).as_deref(), Some("rounds.fraction"));
        assert_eq!(key_at(src, 0).as_deref(), Some("job"));
    }
}
