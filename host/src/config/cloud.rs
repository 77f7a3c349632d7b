//! `cloud.toml`: the cloud host's configuration.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::{self, Secret};
use super::{limits_error, name, plugin_limits, CheckConfig, FieldError, ServicePlugin};
use crate::names::Kind;

fn default_upload_mib() -> usize {
    64
}

fn default_online_secs() -> f64 {
    10.0
}

/// `cloud.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Address to listen on, e.g. "127.0.0.1:7000".
    pub listen: String,
    /// SQLite database of the cloud's state (relative to the config file).
    pub state: PathBuf,
    /// Bearer token of operators (`nereid job ...`): `admin_token`, or `admin_token_file` (a
    /// file holding it, relative to the config file), or `admin_token_env` (a variable).
    #[serde(default)]
    pub admin_token: Secret,
    pub admin_token_file: Option<PathBuf>,
    pub admin_token_env: Option<String>,
    /// Largest upload body, in MiB.
    #[serde(default = "default_upload_mib")]
    pub max_upload_mib: usize,
    /// A node counts as available for selection if it polled within this many seconds.
    #[serde(default = "default_online_secs")]
    pub online_secs: f64,
    /// Nodes and their tokens (more with `nereid token create`).
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeEntry>,
    /// Registries of `oci://` plugins: `[registries."host:port"]` with `insecure`, `username`,
    /// `password` / `password_env`, `token` / `token_env`.
    #[serde(default)]
    pub registries: BTreeMap<String, nereid_registry::HostSettings>,
    /// Directory of the cloud's models, `<dir>/<name>/model.onnx` (relative to the config file).
    pub models: Option<PathBuf>,
    /// Inference services edges call: hard examples of joint inference, tails of split inference.
    #[serde(default)]
    pub services: BTreeMap<String, CloudServiceConfig>,
    /// Time limits and connection bounds of the API's server.
    #[serde(default)]
    pub http: nereid_net::ServerLimits,
    /// TLS of the API: `cert`, `key` (PEM, relative to the config file); `client_ca` and
    /// `client_auth` ("optional" or "required") for edges' certificates (mutual TLS).
    pub tls: Option<nereid_net::tls::ServerTls>,
    /// How a node proves who it is: "token" (default), "certificate" (the name in a client
    /// certificate `tls.client_ca` signed) or "token-and-certificate" (both, for the same node).
    #[serde(default)]
    pub node_auth: NodeAuth,
    /// Serve plain HTTP on an address that is not loopback (logged as a warning). Without
    /// `[tls]`, only loopback addresses are served otherwise.
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// `node_auth` of cloud.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeAuth {
    #[default]
    Token,
    Certificate,
    TokenAndCertificate,
}

/// Largest `max_upload_mib`.
pub const MAX_UPLOAD_MIB: usize = 1 << 16;

impl CheckConfig for CloudConfig {
    fn resolve(&mut self, base: &std::path::Path) -> Result<(), FieldError> {
        secret::resolve(
            "admin_token",
            &mut self.admin_token,
            self.admin_token_file.as_ref(),
            self.admin_token_env.as_ref(),
            base,
        )?;
        for (node, entry) in &mut self.nodes {
            secret::resolve(
                &format!("nodes.{node}.token"),
                &mut entry.token,
                entry.token_file.as_ref(),
                entry.token_env.as_ref(),
                base,
            )?;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), FieldError> {
        if !(1..=MAX_UPLOAD_MIB).contains(&self.max_upload_mib) {
            return Err(FieldError {
                key: "max_upload_mib".into(),
                message: format!("must be between 1 and {MAX_UPLOAD_MIB}"),
            });
        }
        if !(self.online_secs.is_finite() && self.online_secs > 0.0 && self.online_secs <= 86_400.0) {
            return Err(FieldError {
                key: "online_secs".into(),
                message: "must be a positive number of seconds, at most a day".into(),
            });
        }
        if self.admin_token.len() < 8 {
            return Err(FieldError { key: "admin_token".into(), message: "must be at least 8 characters".into() });
        }
        for (node, entry) in &self.nodes {
            name(Kind::Node, format!("nodes.{node}"), node)?;
            if entry.token.is_empty() && self.node_auth == NodeAuth::Certificate {
                continue;
            }
            if entry.token.len() < 8 {
                return Err(FieldError {
                    key: format!("nodes.{node}.token"),
                    message: "must be at least 8 characters".into(),
                });
            }
        }
        for (service, cfg) in &self.services {
            name(Kind::Service, format!("services.{service}"), service)?;
            name(Kind::Model, format!("services.{service}.model"), &cfg.model)?;
            if let Some(c) = &cfg.compressor {
                plugin_limits(&format!("services.{service}.compressor"), c)?;
            }
        }
        if self.node_auth != NodeAuth::Token && self.tls.as_ref().and_then(|t| t.client_ca.as_ref()).is_none() {
            return Err(FieldError {
                key: "node_auth".into(),
                message: "knowing nodes by their certificates needs [tls] with `client_ca`".into(),
            });
        }
        self.http.validate().map_err(|e| limits_error("http", e))
    }
}

/// `[services.<name>]` of cloud.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudServiceConfig {
    /// The model (a name in `models`): the big model of joint inference, or the model split
    /// inference cuts (the edge must have the same one).
    pub model: String,
    /// Decodes the cut tensors of split requests that edges encoded with this same component.
    pub compressor: Option<ServicePlugin>,
}

/// `[nodes.<name>]`: the node's token, `token`, `token_file` or `token_env` (none when the cloud
/// knows nodes by certificate only).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    #[serde(default)]
    pub token: Secret,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
}
