//! On-disk cache of compiled components, keyed by the component's content digest and by the
//! engine's compatibility hash (wasmtime version, target, settings), so a second load of the same
//! bytes deserializes native code instead of compiling it again.
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::error::PluginError;

/// Whether a load compiled the component or found it compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheOutcome {
    Hit,
    Compiled,
}

/// Feeds `Hash` output into SHA-256 so the engine hash is stable across processes.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

pub fn engine_key(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(&h.0.finalize()[..8])
}

pub fn content_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Compiled components on disk, keyed by the component's digest and the engine (not to be
/// confused with the registry's content-addressed cache of pulled components,
/// [`nereid_registry::ComponentCache`]).
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: Option<PathBuf>,
}

impl CompileCache {
    /// A cache under `dir`, or none (compile every time).
    pub fn new(dir: Option<PathBuf>) -> Self {
        CompileCache { dir }
    }

    /// `$NEREID_CACHE_DIR`, else `$XDG_CACHE_HOME/nereid`, else `~/.cache/nereid`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("NEREID_CACHE_DIR") {
            return Some(PathBuf::from(dir));
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(dir).join("nereid"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("nereid"))
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn entry(&self, engine: &Engine, digest: &str) -> Option<PathBuf> {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.as_ref().map(|d| d.join("compiled").join(format!("{hex}-{}.cwasm", engine_key(engine))))
    }

    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
        digest: &str,
        origin: &str,
    ) -> Result<(Component, CacheOutcome), PluginError> {
        let entry = self.entry(engine, digest);
        if let Some(path) = entry.as_ref().filter(|p| p.is_file()) {
            // SAFETY: the file was written by `precompile_component` of an engine with the same
            // compatibility hash (it is in the name), into the user's own cache directory;
            // wasmtime re-checks the header and refuses artifacts of another engine.
            match unsafe { Component::deserialize_file(engine, path) } {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(e) => tracing::warn!(path = %path.display(), "ignoring unreadable compiled component: {e}"),
            }
        }
        let compile =
            |e: wasmtime::Error| PluginError::Compile { origin: origin.to_string(), message: format!("{e:#}") };
        let compiled = engine.precompile_component(bytes).map_err(compile)?;
        if let Some(path) = entry {
            let io = |source| PluginError::Cache { path: path.clone(), source };
            let dir = path.parent().expect("cache entries live in a directory");
            std::fs::create_dir_all(dir).map_err(io)?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &compiled).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        // SAFETY: `compiled` was produced just above by this very engine.
        let component = unsafe { Component::deserialize(engine, &compiled) }.map_err(compile)?;
        Ok((component, CacheOutcome::Compiled))
    }
}
