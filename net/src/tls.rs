//! TLS for nereid's servers and clients, with rustls (ring): a server's certificate and key, the
//! CA whose certificates its clients may (or must) present — mutual TLS, where the server then
//! knows a client by the names in its certificate — and a client's trusted CA and own
//! certificate. Plain HTTP is for loopback, or where an operator allows it explicitly.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {message}")]
    Pem { what: &'static str, path: PathBuf, message: String },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the TLS configuration is refused: {0}")]
    Config(String),
    #[error(
        "{what} would use plain HTTP with {addr}, which is not a loopback address: configure TLS, or allow plain \
         HTTP explicitly ({allow})"
    )]
    Plaintext { what: String, addr: String, allow: &'static str },
}

/// Whether a server asks its clients for a certificate signed by `client_ca`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client may present one; one that does not is served as without `client_ca`.
    #[default]
    Optional,
    /// The handshake fails for a client without one.
    Required,
}

/// A server's TLS: `[tls]` of cloud.toml and edge.toml, flags of `nereid registry serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain the server presents, its own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign clients' certificates (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: "optional" (default) or "required".
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// A client's TLS: the CA it trusts (else the system's), and its own certificate for mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The names a verified client certificate gives: its DNS subject alternative names, then its
/// subject's common name. Requests of a connection that presented one carry it as an extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub names: Vec<String>,
}

impl PeerCertificate {
    /// The name the certificate is for: its first DNS name, else its common name.
    pub fn name(&self) -> Option<&str> {
        self.names.first().map(String::as_str)
    }

    /// The names of a DER certificate (one the handshake verified).
    pub fn from_der(der: &[u8]) -> PeerCertificate {
        let mut names = Vec::new();
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                for n in &san.value.general_names {
                    if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                        names.push(d.to_string());
                    }
                }
            }
            if let Some(cn) = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
                if !names.iter().any(|n| n == cn) {
                    names.push(cn.to_string());
                }
            }
        }
        PeerCertificate { names }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |message: String| TlsError::Pem { what, path: path.to_path_buf(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "the private key",
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates("CA certificates", path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: "CA certificates",
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

impl ServerTls {
    /// The same settings with relative paths taken from `base` (a config file's directory).
    pub fn relative_to(&self, base: &Path) -> ServerTls {
        ServerTls {
            cert: base.join(&self.cert),
            key: base.join(&self.key),
            client_ca: self.client_ca.as_ref().map(|c| base.join(c)),
            client_auth: self.client_auth,
        }
    }

    /// Reads the files: the acceptor a server hands to [`crate::serve`].
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let certs = certificates("the certificate chain", &self.cert)?;
        let key = private_key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
                let verifier = match self.client_auth {
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                    ClientAuth::Required => verifier,
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Config(e.to_string()))?)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("{} and {}: {e}", self.cert.display(), self.key.display())))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ClientTls {
    /// The same settings with relative paths taken from `base`.
    pub fn relative_to(&self, base: &Path) -> ClientTls {
        ClientTls {
            ca: self.ca.as_ref().map(|p| base.join(p)),
            cert: self.cert.as_ref().map(|p| base.join(p)),
            key: self.key.as_ref().map(|p| base.join(p)),
        }
    }

    /// The rustls configuration: trusts `ca` (else the system's CA certificates) and presents
    /// `cert` and `key` when the server asks for a certificate.
    pub fn config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let roots = match &self.ca {
            Some(ca) => roots(ca)?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                roots
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates("the certificate chain", cert)?, private_key(key)?)
                .map_err(|e| TlsError::Config(format!("{} and {}: {e}", cert.display(), key.display())))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::Config("a client certificate needs both `cert` and `key`".into())),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// A reqwest client builder that uses this TLS configuration (rustls).
    pub fn http_client(&self) -> Result<reqwest::ClientBuilder, TlsError> {
        Ok(reqwest::Client::builder().tls_backend_preconfigured(self.config()?))
    }
}

/// Refuses plain HTTP with a non-loopback `addr` unless `allowed` (then warns): servers check
/// their listening address, clients the address they connect to.
pub fn check_plaintext(what: &str, addr: &str, allowed: bool, allow: &'static str) -> Result<(), TlsError> {
    if is_loopback(addr) {
        return Ok(());
    }
    if allowed {
        tracing::warn!("{what} uses plain HTTP with {addr}: tokens and data cross the network in clear");
        return Ok(());
    }
    Err(TlsError::Plaintext { what: what.to_string(), addr: addr.to_string(), allow })
}

/// Whether `addr` (an address, "host:port", or a URL's host part) is a loopback address or
/// `localhost`.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return a.ip().is_loopback();
    }
    if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host and port of an `http://` URL, or None for any other scheme.
pub fn plain_http_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;
    use axum::routing::get;

    /// Answers with the name of the client's certificate, or "-".
    async fn who(peer: Option<axum::Extension<PeerCertificate>>) -> String {
        peer.and_then(|p| p.0.name().map(str::to_string)).unwrap_or_else(|| "-".into())
    }

    struct Fleet {
        dir: tempfile::TempDir,
    }

    impl Fleet {
        fn new() -> Fleet {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = pki::authority("test CA", 10).expect("ca");
            let other = pki::authority("another CA", 10).expect("other ca");
            let write = |name: &str, issued: &pki::Issued| {
                std::fs::write(dir.path().join(format!("{name}.pem")), &issued.cert_pem).expect("write");
                std::fs::write(dir.path().join(format!("{name}.key")), &issued.key_pem).expect("write");
            };
            write("ca", &ca);
            write("server", &pki::issue(&ca, "localhost", &["127.0.0.1".into()], 10).expect("server"));
            write("edge-1", &pki::issue(&ca, "edge-1", &[], 10).expect("edge"));
            write("intruder", &pki::issue(&other, "edge-1", &[], 10).expect("intruder"));
            let today = chrono::Utc::now().date_naive();
            let past = (today - chrono::Duration::days(30), today - chrono::Duration::days(1));
            write("expired-edge", &pki::issue_between(&ca, "edge-1", &[], past).expect("expired"));
            write(
                "expired-server",
                &pki::issue_between(&ca, "localhost", &["127.0.0.1".into()], past).expect("expired"),
            );
            Fleet { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        async fn serve(&self, client_auth: ClientAuth) -> SocketAddr {
            self.serve_as("server", client_auth).await
        }

        /// A server with the certificate `name`.pem.
        async fn serve_as(&self, name: &str, client_auth: ClientAuth) -> SocketAddr {
            let tls = ServerTls {
                cert: self.path(&format!("{name}.pem")),
                key: self.path(&format!("{name}.key")),
                client_ca: Some(self.path("ca.pem")),
                client_auth,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let router = axum::Router::new().route("/", get(who));
            tokio::spawn(crate::serve(
                listener,
                router,
                crate::ServerLimits::default(),
                Some(tls.acceptor().expect("tls")),
            ));
            addr
        }

        fn client(&self, identity: Option<&str>) -> reqwest::Client {
            ClientTls {
                ca: Some(self.path("ca.pem")),
                cert: identity.map(|n| self.path(&format!("{n}.pem"))),
                key: identity.map(|n| self.path(&format!("{n}.key"))),
            }
            .http_client()
            .expect("client")
            .build()
            .expect("client")
        }
    }

    #[tokio::test]
    async fn a_server_knows_a_client_by_its_certificate_and_refuses_others_when_required() {
        let fleet = Fleet::new();
        let optional = fleet.serve(ClientAuth::Optional).await;
        let url = format!("https://localhost:{}/", optional.port());
        let answer = |c: reqwest::Client| {
            let url = url.clone();
            async move { c.get(&url).send().await.expect("request").text().await.expect("body") }
        };
        assert_eq!(answer(fleet.client(Some("edge-1"))).await, "edge-1");
        assert_eq!(answer(fleet.client(None)).await, "-");

        let required = fleet.serve(ClientAuth::Required).await;
        let url = format!("https://localhost:{}/", required.port());
        let ok = fleet.client(Some("edge-1")).get(&url).send().await.expect("request");
        assert_eq!(ok.text().await.expect("body"), "edge-1");
        // No certificate, or one from another CA (with the same name): the handshake fails.
        assert!(fleet.client(None).get(&url).send().await.is_err());
        assert!(fleet.client(Some("intruder")).get(&url).send().await.is_err());
        // A client that does not trust the server's CA refuses it.
        let stranger = ClientTls::default().http_client().expect("client").build().expect("client");
        assert!(stranger.get(&url).send().await.is_err());
    }

    #[tokio::test]
    async fn expired_certificates_and_a_server_of_another_name_are_refused() {
        let fleet = Fleet::new();
        // An expired client certificate, whether the server requires one or not.
        for auth in [ClientAuth::Required, ClientAuth::Optional] {
            let addr = fleet.serve(auth).await;
            let url = format!("https://localhost:{}/", addr.port());
            assert!(fleet.client(Some("expired-edge")).get(&url).send().await.is_err(), "{auth:?}");
            let ok = fleet.client(Some("edge-1")).get(&url).send().await.expect("a valid one");
            assert_eq!(ok.text().await.expect("body"), "edge-1");
        }
        // An expired server certificate.
        let expired = fleet.serve_as("expired-server", ClientAuth::Optional).await;
        let url = format!("https://localhost:{}/", expired.port());
        assert!(fleet.client(None).get(&url).send().await.is_err(), "an expired server is refused");
        // The server's certificate names localhost and 127.0.0.1, not the name the client dialled.
        let addr = fleet.serve(ClientAuth::Optional).await;
        let other_name = ClientTls { ca: Some(fleet.path("ca.pem")), cert: None, key: None }
            .http_client()
            .expect("client")
            .resolve("cloud.example", addr)
            .build()
            .expect("client");
        let url = format!("https://cloud.example:{}/", addr.port());
        assert!(other_name.get(&url).send().await.is_err(), "a name the certificate does not hold");
        let url = format!("https://localhost:{}/", addr.port());
        assert!(fleet.client(None).get(&url).send().await.is_ok(), "the name it holds");
    }

    #[test]
    fn plain_http_is_for_loopback_unless_allowed() {
        assert!(check_plaintext("the cloud", "127.0.0.1:7000", false, "allow_plaintext").is_ok());
        assert!(check_plaintext("the cloud", "localhost:7000", false, "allow_plaintext").is_ok());
        assert!(check_plaintext("the cloud", "[::1]:7000", false, "allow_plaintext").is_ok());
        let e = check_plaintext("the cloud", "10.0.0.1:7000", false, "allow_plaintext = true").expect_err("refused");
        assert!(e.to_string().contains("10.0.0.1:7000") && e.to_string().contains("allow_plaintext = true"), "{e}");
        assert!(check_plaintext("the cloud", "0.0.0.0:7000", true, "allow_plaintext").is_ok());
        assert_eq!(plain_http_host("http://10.0.0.2:7000/v1/task"), Some("10.0.0.2:7000"));
        assert_eq!(plain_http_host("https://10.0.0.2:7000"), None);
    }

    #[test]
    fn missing_or_wrong_files_are_named() {
        let fleet = Fleet::new();
        let tls = ServerTls {
            cert: fleet.path("nowhere.pem"),
            key: fleet.path("server.key"),
            client_ca: None,
            client_auth: ClientAuth::Optional,
        };
        let Err(e) = tls.acceptor() else { panic!("a missing file is refused") };
        assert!(e.to_string().contains("nowhere.pem"), "{e}");
        let mismatched = ServerTls { cert: fleet.path("server.pem"), key: fleet.path("edge-1.key"), ..tls };
        let Err(e) = mismatched.acceptor() else { panic!("a key of another certificate is refused") };
        assert!(e.to_string().contains("server.pem"), "{e}");
    }
}
