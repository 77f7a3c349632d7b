//! Pushing and pulling components in the CNCF Wasm OCI artifact layout, through `oci-client`
//! (the client `wkg` is built on) with `oci-wasm`'s artifact types.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::RegistryOperation;
use oci_wasm::{ToConfig, WasmConfig};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::{
    sha256_digest, ComponentCache, Reference, RegistryError, RegistrySettings, WASM_LAYER_MEDIA_TYPE,
    WASM_MANIFEST_CONFIG_MEDIA_TYPE, WASM_MANIFEST_MEDIA_TYPE,
};

/// Called as a transfer goes: (bytes done, bytes in all).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// Bytes per request when pushing a layer (and per progress step).
const PUSH_CHUNK: usize = 1 << 20;

/// Time to connect to a registry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next bytes of an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a registry operation without a blob transfer may take in all (resolving a tag,
/// fetching a manifest, listing tags): a registry that trickles fails it in seconds.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Slowest a blob may travel: a transfer gets [`REQUEST_TIMEOUT`] plus its size at this rate.
const MIN_TRANSFER_RATE: u64 = 256 << 10;

fn transfer_timeout(size: u64) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(size / MIN_TRANSFER_RATE)
}

/// `f`, or an `Unreachable` error naming `what` if it takes longer than `limit`.
async fn within<T>(
    reference: &Reference,
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(reference, format!("{what} took longer than {} s", limit.as_secs()))),
    }
}

/// Largest artifact config pulled (a Wasm config lists the component's imports and exports).
const MAX_CONFIG_BYTES: i64 = 4 << 20;

/// A component available locally after a pull.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    /// The reference pinned to the manifest digest.
    pub reference: String,
    pub manifest_digest: String,
    /// The component's own digest (its layer's).
    pub layer_digest: String,
    pub size: u64,
    /// The verified component bytes in the cache.
    pub path: PathBuf,
    /// Whether the cache already had it (no transfer).
    pub from_cache: bool,
    /// The artifact's config (architecture, os, the component's imports and exports).
    pub config: Option<serde_json::Value>,
}

/// What a push wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub reference: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub size: u64,
    /// Whether the registry already had the layer (nothing sent).
    pub layer_existed: bool,
}

pub struct RegistryClient {
    settings: RegistrySettings,
    cache: ComponentCache,
    /// One client per registry host: each keeps its own bearer tokens.
    clients: Mutex<HashMap<String, oci_client::Client>>,
}

fn unreachable(reference: &Reference, message: String) -> RegistryError {
    RegistryError::Unreachable { reference: reference.to_string(), registry: reference.registry.clone(), message }
}

/// Turns `oci-client`'s errors into ours, naming the reference.
fn classify(reference: &Reference, e: OciDistributionError) -> RegistryError {
    let r = reference.to_string();
    match e {
        OciDistributionError::AuthenticationFailure(message) => RegistryError::Unauthorized { reference: r, message },
        OciDistributionError::UnauthorizedError { url } => {
            RegistryError::Unauthorized { reference: r, message: format!("401 from {url}") }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound { reference: r },
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let message = format!("{url}: {envelope}");
            if codes.iter().any(|c| {
                matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::BlobUnknown | OciErrorCode::NameUnknown)
            }) {
                RegistryError::NotFound { reference: r }
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                RegistryError::Unauthorized { reference: r, message }
            } else {
                RegistryError::Protocol { reference: r, message }
            }
        }
        OciDistributionError::ServerError { code, url, message } => match code {
            404 => RegistryError::NotFound { reference: r },
            401 | 403 => RegistryError::Unauthorized { reference: r, message: format!("{code} from {url}: {message}") },
            _ => RegistryError::Protocol { reference: r, message: format!("{code} from {url}: {message}") },
        },
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            RegistryError::DigestMismatch { reference: r, expected, actual }
        }
        OciDistributionError::RequestError(e)
            if e.status()
                .is_some_and(|s| s == reqwest::StatusCode::UNAUTHORIZED || s == reqwest::StatusCode::FORBIDDEN) =>
        {
            RegistryError::Unauthorized { reference: r, message: e.to_string() }
        }
        OciDistributionError::RequestError(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {
            RegistryError::NotFound { reference: r }
        }
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            unreachable(reference, with_causes(&e))
        }
        other => RegistryError::Protocol { reference: r, message: other.to_string() },
    }
}

/// `e` and what caused it (reqwest's own message leaves out why a request failed).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn not_a_component(reference: &Reference, reason: impl Into<String>) -> RegistryError {
    RegistryError::NotAComponent { reference: reference.to_string(), reason: reason.into() }
}

/// Checks that `manifest` is a Wasm component artifact; returns its layer.
fn component_layer<'m>(
    reference: &Reference,
    manifest: &'m OciImageManifest,
) -> Result<&'m OciDescriptor, RegistryError> {
    if manifest.config.media_type != WASM_MANIFEST_CONFIG_MEDIA_TYPE {
        return Err(not_a_component(
            reference,
            format!("config media type is `{}`, not `{WASM_MANIFEST_CONFIG_MEDIA_TYPE}`", manifest.config.media_type),
        ));
    }
    match manifest.layers.as_slice() {
        [layer] if layer.media_type == WASM_LAYER_MEDIA_TYPE => Ok(layer),
        [layer] => Err(not_a_component(
            reference,
            format!("layer media type is `{}`, not `{WASM_LAYER_MEDIA_TYPE}`", layer.media_type),
        )),
        layers => {
            Err(not_a_component(reference, format!("{} layers, where a component has exactly one", layers.len())))
        }
    }
}

impl RegistryClient {
    pub fn new(settings: RegistrySettings, cache: ComponentCache) -> RegistryClient {
        RegistryClient { settings, cache, clients: Mutex::new(HashMap::new()) }
    }

    pub fn cache(&self) -> &ComponentCache {
        &self.cache
    }

    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    fn oci(&self, registry: &str) -> oci_client::Client {
        let make = || {
            let protocol =
                if self.settings.is_insecure(registry) { ClientProtocol::Http } else { ClientProtocol::Https };
            // A CA file that cannot be read leaves the system's trust: the TLS error then says
            // which certificate was not trusted.
            let extra_root_certificates = self
                .settings
                .ca(registry)
                .and_then(|path| match std::fs::read(path) {
                    Ok(data) => Some(vec![oci_client::client::Certificate {
                        encoding: oci_client::client::CertificateEncoding::Pem,
                        data,
                    }]),
                    Err(e) => {
                        tracing::warn!("reading the CA file {} of registry {registry}: {e}", path.display());
                        None
                    }
                })
                .unwrap_or_default();
            oci_client::Client::new(ClientConfig {
                protocol,
                connect_timeout: Some(CONNECT_TIMEOUT),
                read_timeout: Some(READ_TIMEOUT),
                extra_root_certificates,
                ..Default::default()
            })
        };
        match self.clients.lock() {
            Ok(mut map) => map.entry(registry.to_string()).or_insert_with(make).clone(),
            Err(_) => make(),
        }
    }

    /// The manifest digest `reference` names now (asks the registry unless it is pinned).
    pub async fn resolve(&self, reference: &Reference) -> Result<String, RegistryError> {
        if let Some(d) = &reference.digest {
            return Ok(d.clone());
        }
        let auth = self.settings.auth(&reference.registry);
        let oci = self.oci(&reference.registry);
        let ask =
            async { oci.fetch_manifest_digest(&reference.to_oci(), &auth).await.map_err(|e| classify(reference, e)) };
        within(reference, "resolving the tag", REQUEST_TIMEOUT, ask).await
    }

    /// The component `reference` names, from the cache if it has that manifest, else from the
    /// registry (every blob verified against its digest before it is kept). A tag the registry
    /// cannot be asked about (unreachable) falls back to what it last resolved to here.
    pub async fn pull(&self, reference: &Reference, progress: Option<Progress<'_>>) -> Result<Pulled, RegistryError> {
        let digest = match self.resolve(reference).await {
            Ok(d) => d,
            Err(e) if e.is_unreachable() => match self.cache.tag(reference) {
                Some(d) => {
                    tracing::warn!(%reference, digest = %d, "registry unreachable; using the cached resolution of the tag");
                    d
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let pinned = reference.pinned(&digest);
        if let Some((manifest, path)) = self.cache.component(reference, &digest) {
            // The tag's newest resolution is kept even when the bytes were here already.
            self.cache.put_tag(reference, &digest)?;
            let layer = manifest.layers.first().map(|l| (l.digest.clone(), l.size.max(0) as u64)).unwrap_or_default();
            if let Some(p) = progress {
                p(layer.1, layer.1);
            }
            let config = self
                .cache
                .blob_path(&manifest.config.digest)
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|b| serde_json::from_slice(&b).ok());
            return Ok(Pulled {
                reference: pinned.to_string(),
                manifest_digest: digest,
                layer_digest: layer.0,
                size: layer.1,
                path,
                from_cache: true,
                config,
            });
        }
        let oci = self.oci(&reference.registry);
        let image = pinned.to_oci();
        let auth = self.settings.auth(&reference.registry);
        let fetch = async {
            oci.pull_manifest_raw(&image, &auth, &[WASM_MANIFEST_MEDIA_TYPE]).await.map_err(|e| classify(&pinned, e))
        };
        let (manifest_bytes, _) = within(&pinned, "fetching the manifest", REQUEST_TIMEOUT, fetch).await?;
        let actual = sha256_digest(&manifest_bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch { reference: pinned.to_string(), expected: digest, actual });
        }
        let manifest: OciImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| not_a_component(&pinned, format!("not an OCI image manifest: {e}")))?;
        let layer = component_layer(&pinned, &manifest)?.clone();

        if manifest.config.size > MAX_CONFIG_BYTES {
            return Err(not_a_component(&pinned, format!("its config is {} bytes", manifest.config.size)));
        }
        let mut config_bytes = Vec::new();
        let fetch = async {
            oci.pull_blob(&image, &manifest.config, &mut config_bytes).await.map_err(|e| classify(&pinned, e))
        };
        within(&pinned, "fetching the config", REQUEST_TIMEOUT, fetch).await?;
        let config: WasmConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| not_a_component(&pinned, format!("config is not a Wasm config: {e}")))?;
        if config.architecture != oci_wasm::WASM_ARCHITECTURE {
            return Err(not_a_component(&pinned, format!("architecture is `{}`, not `wasm`", config.architecture)));
        }
        let mut config_file = self.cache.temp_file()?;
        std::io::Write::write_all(&mut config_file, &config_bytes).map_err(RegistryError::io(config_file.path()))?;
        self.cache.commit_blob(config_file, &manifest.config.digest)?;

        let limit = transfer_timeout(layer.size.max(0) as u64);
        let path =
            within(&pinned, "downloading the component", limit, self.pull_layer(&oci, &pinned, &layer, progress))
                .await?;
        self.cache.put_manifest(reference, &digest, &manifest_bytes)?;
        Ok(Pulled {
            reference: pinned.to_string(),
            manifest_digest: digest,
            layer_digest: layer.digest.clone(),
            size: layer.size.max(0) as u64,
            path,
            from_cache: false,
            config: serde_json::from_slice(&config_bytes).ok(),
        })
    }

    /// Streams `layer` into the cache, hashing as it goes; refuses more bytes than the manifest
    /// declares and anything whose digest differs.
    async fn pull_layer(
        &self,
        oci: &oci_client::Client,
        pinned: &Reference,
        layer: &OciDescriptor,
        progress: Option<Progress<'_>>,
    ) -> Result<PathBuf, RegistryError> {
        let expected = layer.digest.clone();
        let declared = layer.size.max(0) as u64;
        if declared > crate::MAX_COMPONENT_BYTES {
            return Err(not_a_component(
                pinned,
                format!(
                    "its layer is {declared} bytes, more than the {} a component may be",
                    crate::MAX_COMPONENT_BYTES
                ),
            ));
        }
        let mut stream = oci.pull_blob_stream(&pinned.to_oci(), layer).await.map_err(|e| classify(pinned, e))?;
        let tmp = self.cache.temp_file()?;
        let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(RegistryError::io(tmp.path()))?);
        let mut hasher = sha2::Sha256::new();
        let mut done = 0u64;
        let mismatch = |hasher: sha2::Sha256| RegistryError::DigestMismatch {
            reference: pinned.to_string(),
            expected: expected.clone(),
            actual: format!("sha256:{}", hex::encode(hasher.finalize())),
        };
        while let Some(chunk) = stream.stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest at the end of the stream: say which bytes came.
                Err(e) => {
                    let actual = format!("sha256:{}", hex::encode(hasher.clone().finalize()));
                    if actual != expected && done == declared {
                        return Err(mismatch(hasher));
                    }
                    return Err(unreachable(pinned, format!("download of {expected} broke off: {e}")));
                }
            };
            done += chunk.len() as u64;
            if done > declared {
                return Err(RegistryError::Protocol {
                    reference: pinned.to_string(),
                    message: format!("blob {expected} is longer than the {declared} bytes its manifest declares"),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(RegistryError::io(tmp.path()))?;
            if let Some(p) = progress {
                p(done, declared);
            }
        }
        file.flush().await.map_err(RegistryError::io(tmp.path()))?;
        drop(file);
        let actual = format!("sha256:{}", hex::encode(hasher.clone().finalize()));
        if actual != expected {
            return Err(mismatch(hasher));
        }
        self.cache.commit_blob(tmp, &expected)
    }

    /// Pushes component `bytes` as `reference` (a tag; a digest reference must be the manifest's
    /// own digest). Blobs the registry has already are not sent again.
    pub async fn push(
        &self,
        bytes: Vec<u8>,
        reference: &Reference,
        progress: Option<Progress<'_>>,
    ) -> Result<Pushed, RegistryError> {
        let limit = transfer_timeout(bytes.len() as u64);
        within(reference, "pushing the component", limit, self.push_unbounded(bytes, reference, progress)).await
    }

    async fn push_unbounded(
        &self,
        bytes: Vec<u8>,
        reference: &Reference,
        progress: Option<Progress<'_>>,
    ) -> Result<Pushed, RegistryError> {
        let (config, layer) =
            WasmConfig::from_raw_component(bytes, None).map_err(|e| not_a_component(reference, format!("{e:#}")))?;
        let config = config.to_config().map_err(|e| not_a_component(reference, format!("{e:#}")))?;
        let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
        manifest.media_type = Some(WASM_MANIFEST_MEDIA_TYPE.to_string());
        let manifest_bytes = serde_json::to_vec(&manifest)
            .map_err(|e| RegistryError::Protocol { reference: reference.to_string(), message: e.to_string() })?;
        let manifest_digest = sha256_digest(&manifest_bytes);
        if let Some(d) = &reference.digest {
            if *d != manifest_digest {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    expected: d.clone(),
                    actual: manifest_digest,
                });
            }
        }
        let oci = self.oci(&reference.registry);
        let image = reference.to_oci();
        let auth = self.settings.auth(&reference.registry);
        oci.auth(&image, &auth, RegistryOperation::Push).await.map_err(|e| classify(reference, e))?;
        let fail = |e| classify(reference, e);

        let layer_digest = manifest.layers[0].digest.clone();
        let size = layer.data.len() as u64;
        let layer_existed = oci.blob_exists(&image, &layer_digest).await.map_err(fail)?;
        if !layer_existed {
            let data = layer.data.clone();
            let chunks = futures_util::stream::iter((0..data.len()).step_by(PUSH_CHUNK).map(move |start| {
                let end = (start + PUSH_CHUNK).min(data.len());
                if let Some(p) = progress {
                    p(end as u64, size);
                }
                Ok(data.slice(start..end))
            }));
            oci.push_blob_stream(&image, chunks, &layer_digest).await.map_err(fail)?;
        } else if let Some(p) = progress {
            p(size, size);
        }
        if !oci.blob_exists(&image, &manifest.config.digest).await.map_err(fail)? {
            oci.push_blob(&image, config.data.clone(), &manifest.config.digest).await.map_err(fail)?;
        }
        let content_type = reqwest::header::HeaderValue::from_static(WASM_MANIFEST_MEDIA_TYPE);
        oci.push_manifest_raw(&image, manifest_bytes, content_type).await.map_err(fail)?;
        Ok(Pushed {
            reference: reference.pinned(&manifest_digest).to_string(),
            manifest_digest,
            layer_digest,
            size,
            layer_existed,
        })
    }

    /// The repository's tags, sorted.
    pub async fn tags(&self, reference: &Reference) -> Result<Vec<String>, RegistryError> {
        let auth = self.settings.auth(&reference.registry);
        let oci = self.oci(&reference.registry);
        let list =
            async { oci.list_tags(&reference.to_oci(), &auth, None, None).await.map_err(|e| classify(reference, e)) };
        let mut tags = within(reference, "listing the tags", REQUEST_TIMEOUT, list).await?.tags;
        tags.sort();
        Ok(tags)
    }
}
