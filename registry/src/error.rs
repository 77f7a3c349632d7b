use std::path::PathBuf;

use crate::ReferenceError;

/// What went wrong talking to a registry or the local cache; every variant names the reference,
/// file or registry at fault.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Tls(#[from] nereid_net::tls::TlsError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{reference}: the registry refused the credentials or asked for some: {message}")]
    Unauthorized { reference: String, message: String },
    #[error("{reference}: not found in the registry")]
    NotFound { reference: String },
    #[error("{reference}: cannot reach registry {registry}: {message}")]
    Unreachable { reference: String, registry: String, message: String },
    #[error("{reference}: blob {expected} arrived with digest {actual}; refused")]
    DigestMismatch { reference: String, expected: String, actual: String },
    #[error("{reference}: not a Wasm component artifact: {reason}")]
    NotAComponent { reference: String, reason: String },
    #[error("{reference}: {message}")]
    Protocol { reference: String, message: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Settings { path: PathBuf, message: String },
}

impl RegistryError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RegistryError {
        let path = path.into();
        move |source| RegistryError::Io { path, source }
    }

    /// Whether the registry could not be reached at all (the case a cached copy may stand in for).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RegistryError::Unreachable { .. })
    }
}
