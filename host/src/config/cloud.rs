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
    /// Makes this cloud a regional aggregator of an upper cloud (see
    /// docs/federated-learning.md#hierarchical-aggregation).
    pub upstream: Option<UpstreamConfig>,
    /// Global model versions kept per job: the newest N (and the newest aggregator state); every
    /// version without it. A job closes a round every few seconds for as long as it runs, and each
    /// round's model is kept otherwise.
    pub keep_model_versions: Option<u32>,
}

/// `[upstream]` of cloud.toml: the upper cloud whose rounds this cloud runs with its own nodes,
/// sending each round's result up as one update.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The upper cloud's URL, e.g. "https://cloud.example:7000".
    pub url: String,
    /// This cloud's node token at the upper cloud: `token`, `token_file` or `token_env`.
    #[serde(default)]
    pub token: Secret,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    /// How this cloud reaches an `https://` upper cloud: `ca`, and `cert` and `key` for mutual TLS.
    #[serde(default)]
    pub tls: nereid_net::tls::ClientTls,
    /// Plain HTTP to an upper cloud that is not on loopback (logged as a warning).
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Updates of this region's nodes a round needs: with fewer at its deadline, the region
    /// reports the round failed upstream instead of sending a result.
    #[serde(default = "one")]
    pub min_clients: usize,
    /// The region's round closes this many seconds before the upper round's deadline, so that
    /// its result arrives in time.
    #[serde(default = "default_margin_secs")]
    pub deadline_margin_secs: f64,
    /// How long the upper cloud holds this cloud's request for a task (a long poll).
    #[serde(default = "default_long_poll_secs")]
    pub long_poll_secs: u32,
}

fn one() -> usize {
    1
}

fn default_margin_secs() -> f64 {
    5.0
}

fn default_long_poll_secs() -> u32 {
    25
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
        if let Some(up) = &mut self.upstream {
            secret::resolve("upstream.token", &mut up.token, up.token_file.as_ref(), up.token_env.as_ref(), base)?;
            up.tls = up.tls.relative_to(base);
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
        if self.keep_model_versions == Some(0) {
            return Err(FieldError {
                key: "keep_model_versions".into(),
                message: "must be at least 1: a round starts from the newest version".into(),
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
        if let Some(up) = &self.upstream {
            up.check()?;
        }
        self.http.validate().map_err(|e| limits_error("http", e))
    }
}

impl UpstreamConfig {
    fn check(&self) -> Result<(), FieldError> {
        let bad = |key: &str, message: String| FieldError { key: format!("upstream.{key}"), message };
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(bad("url", format!("{:?} is not an http:// or https:// URL", self.url)));
        }
        if self.token.is_empty() && self.tls.cert.is_none() {
            return Err(bad(
                "token",
                "the upper cloud needs this region's node token (or `tls.cert` and `tls.key`)".into(),
            ));
        }
        if !self.token.is_empty() && self.token.len() < 8 {
            return Err(bad("token", "must be at least 8 characters".into()));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(bad("tls", "`cert` and `key` go together".into()));
        }
        if !(1..=super::job::caps::MIN_CLIENTS).contains(&self.min_clients) {
            return Err(bad("min_clients", format!("must be between 1 and {}", super::job::caps::MIN_CLIENTS)));
        }
        if !(self.deadline_margin_secs.is_finite() && (0.0..=3600.0).contains(&self.deadline_margin_secs)) {
            return Err(bad("deadline_margin_secs", "must be between 0 and 3600 seconds".into()));
        }
        if self.long_poll_secs == 0 || self.long_poll_secs > super::edge::MAX_LONG_POLL_SECS {
            return Err(bad(
                "long_poll_secs",
                format!("must be between 1 and {} seconds", super::edge::MAX_LONG_POLL_SECS),
            ));
        }
        Ok(())
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
    /// The node is a regional aggregator (a cloud with `[upstream]`): its tasks carry the job's
    /// spec, and its updates may stand for more examples than `[rounds] max_examples`.
    #[serde(default)]
    pub region: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_checked_and_its_token_resolved_from_a_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cloud.toml");
        let head = "listen = \"127.0.0.1:7100\"\nstate = \"c.db\"\nadmin_token = \"admin-token-1\"\n[upstream]\n";
        std::fs::write(dir.path().join("up.token"), "token-of-region-a\n").expect("write");
        let good = format!("{head}url = \"http://127.0.0.1:7000\"\ntoken_file = \"up.token\"\n");
        std::fs::write(&path, &good).expect("write");
        let (config, _) = super::super::read_config::<CloudConfig>(&path).expect("valid");
        let up = config.upstream.expect("upstream");
        assert_eq!(up.token.expose(), "token-of-region-a");
        assert_eq!((up.min_clients, up.long_poll_secs), (1, 25));
        for (body, says) in [
            (format!("{head}url = \"ftp://x\"\ntoken = \"token-of-a\"\n"), "upstream.url"),
            (format!("{head}url = \"http://127.0.0.1:7000\"\n"), "upstream.token"),
            (format!("{good}min_clients = 0\n"), "upstream.min_clients"),
            (format!("{good}deadline_margin_secs = -1.0\n"), "upstream.deadline_margin_secs"),
            (format!("{good}long_poll_secs = 0\n"), "upstream.long_poll_secs"),
            (format!("{good}mystery = 1\n"), "mystery"),
        ] {
            std::fs::write(&path, &body).expect("write");
            let e = super::super::read_config::<CloudConfig>(&path).expect_err(says).to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn keep_model_versions_takes_a_positive_count() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cloud.toml");
        let head = "listen = \"127.0.0.1:7100\"\nstate = \"c.db\"\nadmin_token = \"admin-token-1\"\n";
        std::fs::write(&path, format!("{head}keep_model_versions = 50\n")).expect("write");
        let (config, _) = super::super::read_config::<CloudConfig>(&path).expect("valid");
        assert_eq!(config.keep_model_versions, Some(50));
        std::fs::write(&path, format!("{head}keep_model_versions = 0\n")).expect("write");
        let e = super::super::read_config::<CloudConfig>(&path).expect_err("zero").to_string();
        assert!(e.contains("keep_model_versions") && e.contains("at least 1"), "{e}");
    }
}
