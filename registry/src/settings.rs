//! Which registries may be spoken to in plain HTTP, and with which credentials.
//!
//! Sources, later ones filling in what earlier ones left unset:
//! 1. tables given by the caller (`[registries."host:port"]` in `cloud.toml` / `edge.toml`);
//! 2. a settings file with the same tables, which the caller reads (nereid's
//!    `config::registries`: `$NEREID_REGISTRY_CONFIG`, else `registries.toml` in the user's
//!    config directory);
//! 3. the environment: `NEREID_INSECURE_REGISTRIES` (comma-separated hosts), and
//!    `NEREID_REGISTRY_USERNAME` + `NEREID_REGISTRY_PASSWORD` or `NEREID_REGISTRY_TOKEN` for hosts
//!    with no credentials of their own.
//!
//! `localhost`, `127.0.0.0/8` and `[::1]` are always plain HTTP, like Docker treats them.
use std::collections::BTreeMap;

use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Settings per registry host (`host` or `host:port`).
    #[serde(default)]
    pub registries: BTreeMap<String, HostSettings>,
}

/// One registry's settings. `password_env` / `token_env` name environment variables holding the
/// secret, so it need not be written in the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSettings {
    /// Speak plain HTTP to this registry.
    #[serde(default)]
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<String>,
    /// A bearer token sent as is (e.g. a registry access token).
    pub token: Option<String>,
    pub token_env: Option<String>,
    /// A PEM file of CA certificates to trust for this registry's HTTPS (besides the system's);
    /// with it, a loopback registry is spoken to over HTTPS too.
    pub ca: Option<std::path::PathBuf>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl HostSettings {
    fn merge(&mut self, other: &HostSettings) {
        self.insecure |= other.insecure;
        if self.ca.is_none() {
            self.ca = other.ca.clone();
        }
        if !self.has_credentials() {
            self.username = other.username.clone();
            self.password = other.password.clone();
            self.password_env = other.password_env.clone();
            self.token = other.token.clone();
            self.token_env = other.token_env.clone();
        }
    }

    fn has_credentials(&self) -> bool {
        self.username.is_some() || self.token.is_some() || self.token_env.is_some()
    }

    fn auth(&self) -> RegistryAuth {
        let token = self.token.clone().or_else(|| self.token_env.as_deref().and_then(env));
        if let Some(t) = token {
            return RegistryAuth::Bearer(t);
        }
        match &self.username {
            Some(user) => {
                let password =
                    self.password.clone().or_else(|| self.password_env.as_deref().and_then(env)).unwrap_or_default();
                RegistryAuth::Basic(user.clone(), password)
            }
            None => RegistryAuth::Anonymous,
        }
    }
}

/// Whether `registry` (`host[:port]`) is this machine.
pub use nereid_net::tls::is_loopback;

impl RegistrySettings {
    /// `given` completed by `file` (the settings file's tables, which the caller read) and the
    /// environment.
    pub fn complete(given: &BTreeMap<String, HostSettings>, file: Option<&RegistrySettings>) -> RegistrySettings {
        let mut settings = RegistrySettings { registries: given.clone() };
        if let Some(file) = file {
            settings.merge(file);
        }
        settings.merge_env();
        settings
    }

    pub fn merge(&mut self, other: &RegistrySettings) {
        for (host, s) in &other.registries {
            self.registries.entry(host.clone()).or_default().merge(s);
        }
    }

    fn merge_env(&mut self) {
        if let Some(list) = env("NEREID_INSECURE_REGISTRIES") {
            for host in list.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                self.registries.entry(host.to_string()).or_default().insecure = true;
            }
        }
    }

    /// Whether `registry` is spoken to in plain HTTP: one marked `insecure`, or a loopback one
    /// without a `ca`.
    pub fn is_insecure(&self, registry: &str) -> bool {
        let host = self.registries.get(registry);
        host.is_some_and(|s| s.insecure) || (is_loopback(registry) && host.is_none_or(|s| s.ca.is_none()))
    }

    /// The CA file to trust for `registry`, if one is set.
    pub fn ca(&self, registry: &str) -> Option<&std::path::Path> {
        self.registries.get(registry).and_then(|s| s.ca.as_deref())
    }

    /// The credentials for `registry`.
    pub fn auth(&self, registry: &str) -> RegistryAuth {
        if let Some(s) = self.registries.get(registry).filter(|s| s.has_credentials()) {
            return s.auth();
        }
        if let Some(token) = env("NEREID_REGISTRY_TOKEN") {
            return RegistryAuth::Bearer(token);
        }
        match env("NEREID_REGISTRY_USERNAME") {
            Some(user) => RegistryAuth::Basic(user, env("NEREID_REGISTRY_PASSWORD").unwrap_or_default()),
            None => RegistryAuth::Anonymous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_plain_http() {
        for h in ["localhost", "localhost:5000", "127.0.0.1:80", "127.1.2.3", "[::1]:5000"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["ghcr.io", "10.0.0.1:5000", "localhost.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
        let s: RegistrySettings =
            toml::from_str("[registries.\"reg.lan:5000\"]\ninsecure = true\n").expect("valid settings");
        assert!(s.is_insecure("reg.lan:5000") && !s.is_insecure("reg.lan"));
    }

    #[test]
    fn credentials_by_host() {
        let s: RegistrySettings = toml::from_str(
            "[registries.\"a.io\"]\nusername = \"u\"\npassword = \"p\"\n[registries.\"b.io\"]\ntoken = \"t\"\n",
        )
        .expect("valid settings");
        assert!(matches!(s.auth("a.io"), RegistryAuth::Basic(u, p) if u == "u" && p == "p"));
        assert!(matches!(s.auth("b.io"), RegistryAuth::Bearer(t) if t == "t"));
        let bad = toml::from_str::<RegistrySettings>("[registries.\"a.io\"]\nuser = \"u\"\n");
        assert!(bad.expect_err("unknown key").to_string().contains("unknown field `user`"));
    }
}
