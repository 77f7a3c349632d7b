//! Where plugin components come from: a file next to a job, or an OCI registry (through the
//! node's content-addressed cache, so a node that has a component keeps working offline).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nereid_registry::{ComponentCache, HostSettings, Progress, Reference, RegistryClient, RegistryError};

use crate::config::ServicePlugin;
use crate::runtime::{content_digest, Fetched, Limits, LoadedComponent, Runtime};

/// A plugin a config file names, fetched and compiled, with its limits: what a slot's `new`
/// takes (with the section's `config`).
pub struct ConfiguredPlugin {
    pub loaded: LoadedComponent,
    pub limits: Limits,
    /// The component's content digest.
    pub digest: String,
}

/// Fetches components for one node.
pub struct Components {
    client: RegistryClient,
}

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot read {}: {source}", path.display())]
    File { path: PathBuf, source: std::io::Error },
    #[error("{origin}: expected component {expected}, got {actual}")]
    Digest { origin: String, expected: String, actual: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl Components {
    /// A fetcher whose registry cache is `cache_root`, with `given` registry settings completed
    /// by the settings file and the environment.
    pub fn new(cache_root: PathBuf, given: &BTreeMap<String, HostSettings>) -> Result<Components, ComponentError> {
        let settings = crate::config::registries::settings(given)?;
        Ok(Components { client: RegistryClient::new(settings, ComponentCache::new(cache_root)) })
    }

    /// The registry cache below a node's cache directory.
    pub fn cache_root(cache_dir: Option<&Path>) -> PathBuf {
        cache_dir
            .map(Path::to_path_buf)
            .or_else(crate::runtime::CompileCache::default_dir)
            .unwrap_or_else(|| PathBuf::from(".nereid-cache"))
            .join("oci")
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    /// The manifest digest a reference names now, as a pinned reference.
    pub async fn pin(&self, reference: &Reference) -> Result<Reference, RegistryError> {
        Ok(reference.pinned(&self.client.resolve(reference).await?))
    }

    /// Fetches the plugin a config section names (a path relative to `base`, or an `oci://`
    /// reference) and compiles it with `runtime`; with the section's limits.
    pub async fn load_plugin(
        &self,
        cfg: &ServicePlugin,
        base: &Path,
        runtime: &Runtime,
    ) -> anyhow::Result<ConfiguredPlugin> {
        let fetched = self.fetch(&cfg.plugin, base, None).await?;
        let loaded = runtime.load_bytes(&fetched.bytes, &fetched.origin)?;
        Ok(ConfiguredPlugin {
            loaded,
            limits: Limits::with_overrides(cfg.timeout_ms, cfg.memory_mib),
            digest: fetched.digest,
        })
    }

    /// The component `source` names: an `oci://` reference (through the registry cache), or a
    /// path relative to `base` (a regular file within the size limit).
    pub async fn fetch(
        &self,
        source: &str,
        base: &Path,
        progress: Option<Progress<'_>>,
    ) -> Result<Fetched, ComponentError> {
        if nereid_registry::is_reference(source) {
            let reference = Reference::parse(source).map_err(RegistryError::from)?;
            return self.fetch_reference(&reference, progress).await;
        }
        let path = base.join(source);
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || crate::files::read_limited(&path, crate::files::MAX_COMPONENT_BYTES))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        let bytes = read.map_err(|source| ComponentError::File { path: path.clone(), source })?;
        Ok(Fetched { digest: content_digest(&bytes), bytes, pinned: None, origin: path.display().to_string() })
    }

    pub async fn fetch_reference(
        &self,
        reference: &Reference,
        progress: Option<Progress<'_>>,
    ) -> Result<Fetched, ComponentError> {
        // The registry client verified the layer against its digest (as it arrived, or on the
        // cache hit), and a layer's digest is the component's content digest.
        let pulled = self.client.pull(reference, progress).await?;
        let bytes = tokio::fs::read(&pulled.path)
            .await
            .map_err(|source| ComponentError::File { path: pulled.path.clone(), source })?;
        Ok(Fetched {
            bytes,
            digest: pulled.layer_digest,
            origin: reference.to_string(),
            pinned: Some(pulled.reference),
        })
    }

    /// A pinned component whose content digest must be `digest` (what the cloud tells an edge).
    pub async fn fetch_pinned(&self, pinned: &str, digest: &str) -> Result<Fetched, ComponentError> {
        let reference = Reference::parse(pinned).map_err(RegistryError::from)?;
        let fetched = self.fetch_reference(&reference, None).await?;
        if fetched.digest != digest {
            return Err(ComponentError::Digest {
                origin: pinned.to_string(),
                expected: digest.to_string(),
                actual: fetched.digest,
            });
        }
        Ok(fetched)
    }
}
