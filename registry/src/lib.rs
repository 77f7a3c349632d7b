//! nereid-registry: how nereid distributes plugin components through OCI registries.
//!
//! - references: `oci://host[:port]/repository[:tag][@sha256:<hex>]` ([`Reference`]);
//! - the client ([`RegistryClient`]): push and pull of components in the CNCF Wasm OCI artifact layout (what
//!   `wkg oci push` writes: config `application/vnd.wasm.config.v0+json`, one `application/wasm`
//!   layer), with anonymous, basic and bearer-token auth, every blob verified against its digest;
//! - the content-addressed local store that keeps a node working offline ([`ComponentCache`]);
//! - an embedded registry implementing the OCI distribution spec's pull, push and content
//!   discovery on a directory ([`server`]);
//! - credentials and insecure (plain HTTP) hosts ([`RegistrySettings`]).
pub mod cache;
pub mod client;
mod error;
mod reference;
pub mod server;
pub mod settings;

pub use cache::{CacheEntry, ComponentCache, GcReport};
pub use client::{Progress, Pulled, Pushed, RegistryClient};
pub use error::RegistryError;
pub use oci_wasm::WasmConfig;
pub use reference::{is_reference, Reference, ReferenceError};
pub use settings::{HostSettings, RegistrySettings};

/// Media types of the CNCF Wasm OCI artifact (the `oci-wasm` crate's, which `wkg` uses).
pub use oci_wasm::{WASM_LAYER_MEDIA_TYPE, WASM_MANIFEST_CONFIG_MEDIA_TYPE, WASM_MANIFEST_MEDIA_TYPE};

/// Largest component nereid pulls, loads or stores (128 MiB: a Python plugin with its
/// interpreter is about 40 MiB).
pub const MAX_COMPONENT_BYTES: u64 = 128 << 20;

/// `sha256:<hex>` of `bytes`, the digest form OCI uses.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The hex part of a `sha256:<hex>` digest, if that is what `digest` is.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}
