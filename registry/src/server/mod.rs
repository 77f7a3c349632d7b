//! The embedded registry: the OCI distribution spec's pull, push (monolithic, chunked, cross-repo
//! mount) and content discovery (tags list, catalog) on a directory, so a fleet needs no external
//! registry. Errors use the spec's bodies (`{"errors":[{"code","message","detail"}]}`).
//!
//! Layout under the root:
//! - `blobs/sha256/<hex>`: every blob and manifest, content-addressed, written once verified;
//! - `repositories/<name>/_layers/<hex>`: blobs linked into a repository;
//! - `repositories/<name>/_manifests/<hex>`: manifests of a repository (the file holds the media type);
//! - `repositories/<name>/_tags/<tag>`: the manifest digest of a tag;
//! - `uploads/<id>`: upload sessions in progress (see [`uploads`]), and files being written.
//!
//! With users configured, every request needs credentials: HTTP basic, or a bearer token from the
//! token endpoint `/token` (the registry token flow real registries use: a 401 names the realm,
//! the client trades its basic credentials there for a token). Each user may pull, push and
//! delete where `users.toml` says ([`UsersFile`]); `anonymous_pull` lets anyone pull.
//! Blobs are at most `max_blob_bytes`; manifests at most 4 MiB with a valid media type.
// Handlers return the error response itself; boxing it would only add an allocation per error.
#![allow(clippy::result_large_err)]

mod auth;
mod discovery;
mod uploads;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use sha2::{Digest, Sha256};

use crate::reference::{is_path_component, is_tag};
use crate::{sha256_hex, RegistryError};
pub use auth::{Action, Identity, UserEntry, UsersFile};

/// Largest manifest accepted (the distribution registry's limit).
const MAX_MANIFEST: usize = 4 << 20;
/// Longest media type kept for a manifest (RFC 6838 names are at most 127 + 1 + 127).
const MAX_MEDIA_TYPE: usize = 255;

pub struct ServerOptions {
    pub root: PathBuf,
    pub users: UsersFile,
    pub anonymous_pull: bool,
    /// Largest blob an upload may make.
    pub max_blob_bytes: u64,
    /// An upload session nobody touched for this long is dropped.
    pub upload_ttl: Duration,
    pub limits: nereid_net::ServerLimits,
    /// Serve HTTPS with this certificate and key (the token realm is then https too).
    pub tls: Option<nereid_net::tls::ServerTls>,
}

impl ServerOptions {
    /// A registry on `root` with no users and the default limits.
    pub fn open(root: PathBuf) -> ServerOptions {
        ServerOptions {
            root,
            users: UsersFile::default(),
            anonymous_pull: false,
            max_blob_bytes: DEFAULT_MAX_BLOB,
            upload_ttl: DEFAULT_UPLOAD_TTL,
            limits: nereid_net::ServerLimits::default(),
            tls: None,
        }
    }
}

/// Default largest blob: 1 GiB.
pub const DEFAULT_MAX_BLOB: u64 = 1 << 30;
/// Default time an idle upload session is kept.
pub const DEFAULT_UPLOAD_TTL: Duration = Duration::from_secs(600);

pub struct Registry {
    root: PathBuf,
    auth: auth::Auth,
    uploads: uploads::Uploads,
}

type Reply = Result<Response, Response>;

fn oci_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message.into(), "detail": null }] });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(is_path_component)
}

/// A media type as RFC 6838 allows it (`type/subtype`, restricted-name characters, no
/// parameters): what may be stored and sent back in a `Content-Type` header.
fn valid_media_type(m: &str) -> bool {
    let name = |s: &str| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 127
            && b[0].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(c))
    };
    m.len() <= MAX_MEDIA_TYPE && m.split_once('/').is_some_and(|(t, s)| name(t) && name(s))
}

/// The API endpoints under `/v2/`, parsed from the right (a repository name may contain `/`).
enum Route {
    Catalog,
    Tags { name: String },
    Manifest { name: String, reference: String },
    Upload { name: String, id: Option<String> },
    Blob { name: String, digest: String },
}

fn route(path: &str) -> Option<Route> {
    if path == "_catalog" {
        return Some(Route::Catalog);
    }
    let r = if let Some(name) = path.strip_suffix("/tags/list") {
        Route::Tags { name: name.into() }
    } else if let Some((name, reference)) = path.rsplit_once("/manifests/") {
        Route::Manifest { name: name.into(), reference: reference.into() }
    } else if let Some(name) = path.strip_suffix("/blobs/uploads/").or_else(|| path.strip_suffix("/blobs/uploads")) {
        Route::Upload { name: name.into(), id: None }
    } else if let Some((name, id)) = path.rsplit_once("/blobs/uploads/") {
        Route::Upload { name: name.into(), id: Some(id.into()) }
    } else if let Some((name, digest)) = path.rsplit_once("/blobs/") {
        Route::Blob { name: name.into(), digest: digest.into() }
    } else {
        return None;
    };
    Some(r)
}

impl Registry {
    pub fn new(options: ServerOptions) -> Result<Registry, RegistryError> {
        for dir in ["blobs/sha256", "repositories"] {
            let d = options.root.join(dir);
            std::fs::create_dir_all(&d).map_err(RegistryError::io(&d))?;
        }
        let dir = options.root.join("uploads");
        let uploads = uploads::Uploads::new(dir.clone(), options.upload_ttl, options.max_blob_bytes)
            .map_err(RegistryError::io(dir))?;
        let scheme = if options.tls.is_some() { "https" } else { "http" };
        Ok(Registry {
            root: options.root,
            auth: auth::Auth::new(options.users, options.anonymous_pull, scheme),
            uploads,
        })
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|h| self.root.join("blobs/sha256").join(h))
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.root.join("repositories").join(name)
    }

    fn layer_link(&self, name: &str, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|h| self.repo(name).join("_layers").join(h))
    }

    fn manifest_link(&self, name: &str, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|h| self.repo(name).join("_manifests").join(h))
    }

    fn tag_path(&self, name: &str, tag: &str) -> PathBuf {
        self.repo(name).join("_tags").join(tag)
    }
}

/// Serves the registry on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, options: ServerOptions) -> Result<(), RegistryError> {
    serve_until(listener, options, std::future::pending()).await
}

/// Serves the registry on `listener` until `stop` completes (then as [`nereid_net::serve_until`]:
/// uploads in flight get the grace period; an upload cut short is resumed or restarted by its
/// client, and a blob is only ever stored whole).
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    options: ServerOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RegistryError> {
    let root = options.root.clone();
    let limits = options.limits.clone();
    let tls = options.tls.as_ref().map(nereid_net::tls::ServerTls::acceptor).transpose()?;
    let registry = Arc::new(Registry::new(options)?);
    let ready = nereid_net::Readiness::default();
    nereid_net::serve_until(listener, router(registry), limits, tls, &ready, stop)
        .await
        .map_err(RegistryError::io(root))
}

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v2", get(base))
        .route("/v2/", get(base))
        .route("/token", get(token))
        .route("/v2/{*path}", any(dispatch))
        .with_state(registry)
}

fn api_version(mut resp: Response) -> Response {
    resp.headers_mut().insert("Docker-Distribution-API-Version", HeaderValue::from_static("registry/2.0"));
    resp
}

/// The version check. With users configured it always asks for credentials (even when anyone
/// may pull), as real registries do: that 401 is how clients learn the token realm.
async fn base(State(reg): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let anonymous = !headers.contains_key(header::AUTHORIZATION);
    let checked = if anonymous && reg.auth.enabled() {
        Err(reg.auth.challenge(&headers, "registry:catalog:*"))
    } else {
        reg.auth.authorize(&headers, Action::Pull, None).map(drop)
    };
    api_version(match checked {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
        Err(e) => e,
    })
}

async fn token(State(reg): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let identity = match reg.auth.basic_user(&headers) {
        Some(Ok(user)) => Identity::User(user),
        Some(Err(())) => return oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "wrong user name or password"),
        None if reg.auth.anonymous_pull() || !reg.auth.enabled() => Identity::Anonymous,
        None => return oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "credentials required"),
    };
    let token = reg.auth.issue_token(identity);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": auth::TOKEN_LIFETIME.as_secs(),
        "issued_at": chrono::Utc::now().to_rfc3339(),
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn dispatch(
    State(reg): State<Arc<Registry>>,
    method: Method,
    axum::extract::Path(path): axum::extract::Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let reply = match route(&path) {
        None => Err(oci_error(StatusCode::NOT_FOUND, "UNSUPPORTED", format!("no endpoint /v2/{path}"))),
        Some(r) => handle(&reg, method, r, &query, &headers, body).await,
    };
    api_version(reply.unwrap_or_else(|e| e))
}

async fn handle(
    reg: &Registry,
    method: Method,
    route: Route,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Reply {
    let action = match method {
        Method::GET | Method::HEAD => Action::Pull,
        Method::DELETE if !matches!(route, Route::Upload { .. }) => Action::Delete,
        _ => Action::Push,
    };
    let name = match &route {
        Route::Catalog => {
            let identity = reg.auth.authorize(headers, Action::Pull, None)?;
            return discovery::catalog(reg, &identity, query);
        }
        Route::Tags { name } | Route::Manifest { name, .. } | Route::Upload { name, .. } | Route::Blob { name, .. } => {
            name.clone()
        }
    };
    if !valid_name(&name) {
        return Err(oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID", format!("invalid repository name `{name}`")));
    }
    let identity = reg.auth.authorize(headers, action, Some(&name))?;
    match (route, method) {
        (Route::Tags { name }, Method::GET) => discovery::tags(reg, &name, query),
        (Route::Manifest { name, reference }, m @ (Method::GET | Method::HEAD)) => {
            get_manifest(reg, &name, &reference, m == Method::HEAD).await
        }
        (Route::Manifest { name, reference }, Method::PUT) => put_manifest(reg, &name, &reference, headers, body).await,
        (Route::Manifest { name, reference }, Method::DELETE) => delete_manifest(reg, &name, &reference),
        (Route::Blob { name, digest }, m @ (Method::GET | Method::HEAD)) => {
            get_blob(reg, &name, &digest, m == Method::HEAD).await
        }
        (Route::Blob { name, digest }, Method::DELETE) => {
            let link = reg.layer_link(&name, &digest).filter(|l| l.exists()).ok_or_else(|| blob_unknown(&digest))?;
            std::fs::remove_file(link).map_err(internal)?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::Upload { name, id: None }, Method::POST) => {
            start_upload(reg, &name, &identity, headers, query, body).await
        }
        (Route::Upload { name, id: Some(id) }, Method::PATCH) => {
            patch_upload(reg, &name, &id, &identity, headers, body).await
        }
        (Route::Upload { name, id: Some(id) }, Method::PUT) => {
            let taken = reg.uploads.take(&id, &name, &identity)?;
            finish_upload(reg, &name, taken, query, body).await
        }
        (Route::Upload { name, id: Some(id) }, Method::GET) => {
            let size = reg.uploads.take(&id, &name, &identity)?.size;
            Ok(upload_accepted(&name, &id, size, StatusCode::NO_CONTENT))
        }
        (Route::Upload { name, id: Some(id) }, Method::DELETE) => {
            let taken = reg.uploads.take(&id, &name, &identity)?;
            reg.uploads.close(taken);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (_, m) => Err(oci_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", format!("{m} is not supported here"))),
    }
}

fn blob_unknown(digest: &str) -> Response {
    oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", format!("blob {digest} is unknown to this repository"))
}

fn manifest_unknown(reference: &str) -> Response {
    oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", format!("manifest {reference} is unknown"))
}

/// The manifest digest `reference` (a tag or a digest) names in repository `name`.
fn manifest_digest(reg: &Registry, name: &str, reference: &str) -> Result<String, Response> {
    if reference.starts_with("sha256:") {
        let link = reg.manifest_link(name, reference).ok_or_else(|| {
            oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", format!("unsupported digest {reference}"))
        })?;
        return if link.exists() { Ok(reference.to_string()) } else { Err(manifest_unknown(reference)) };
    }
    if !is_tag(reference) {
        return Err(oci_error(StatusCode::BAD_REQUEST, "TAG_INVALID", format!("invalid tag `{reference}`")));
    }
    std::fs::read_to_string(reg.tag_path(name, reference))
        .map(|d| d.trim().to_string())
        .map_err(|_| manifest_unknown(reference))
}

async fn get_manifest(reg: &Registry, name: &str, reference: &str, head: bool) -> Reply {
    let digest = manifest_digest(reg, name, reference)?;
    let media_type = reg
        .manifest_link(name, &digest)
        .and_then(|l| std::fs::read_to_string(l).ok())
        .ok_or_else(|| manifest_unknown(reference))?;
    let path = reg.blob_path(&digest).ok_or_else(|| manifest_unknown(reference))?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| manifest_unknown(reference))?;
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type.trim())
        .header(header::CONTENT_LENGTH, bytes.len())
        .header("Docker-Content-Digest", &digest);
    if !head {
        return resp.body(Body::from(bytes)).map_err(internal);
    }
    resp = resp.header(header::ETAG, format!("\"{digest}\""));
    resp.body(Body::empty()).map_err(internal)
}

/// Writes `bytes` as blob `digest` (known to match) unless it is there already: a stored blob
/// is never written again.
fn store_blob(reg: &Registry, digest: &str, bytes: &[u8]) -> Result<(), Response> {
    let path = reg.blob_path(digest).ok_or_else(|| internal("bad digest"))?;
    if path.exists() {
        return Ok(());
    }
    let tmp = reg.uploads.temp_path();
    std::fs::write(&tmp, bytes).map_err(internal)?;
    std::fs::rename(&tmp, &path).map_err(internal)
}

fn write_file(path: &Path, content: &str) -> Result<(), Response> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(internal)?;
    }
    let tmp = path.with_extension(format!("{}.tmp", new_id()));
    std::fs::write(&tmp, content).map_err(internal)?;
    std::fs::rename(&tmp, path).map_err(internal)
}

async fn put_manifest(reg: &Registry, name: &str, reference: &str, headers: &HeaderMap, body: Body) -> Reply {
    let bytes = axum::body::to_bytes(body, MAX_MANIFEST).await.map_err(|_| {
        oci_error(StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID", format!("a manifest is at most {MAX_MANIFEST} bytes"))
    })?;
    let digest = digest_of(&bytes);
    let is_digest = reference.starts_with("sha256:");
    if is_digest && reference != digest {
        return Err(oci_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("the manifest's digest is {digest}, not {reference}"),
        ));
    }
    if !is_digest && !is_tag(reference) {
        return Err(oci_error(StatusCode::BAD_REQUEST, "TAG_INVALID", format!("invalid tag `{reference}`")));
    }
    let invalid = |m: String| oci_error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", m);
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("the manifest is not JSON: {e}")))?;
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| json.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
        .ok_or_else(|| invalid("no Content-Type and no mediaType".into()))?;
    if !valid_media_type(&media_type) {
        return Err(invalid(format!(
            "the media type {:?} is not a `type/subtype` name (RFC 6838, at most {MAX_MEDIA_TYPE} characters)",
            media_type.chars().take(80).collect::<String>()
        )));
    }
    if let Some(declared) = json.get("mediaType") {
        if declared.as_str().is_none_or(|d| !valid_media_type(d)) {
            return Err(invalid("the manifest's `mediaType` is not a `type/subtype` name (RFC 6838)".into()));
        }
    }
    // Every blob an image manifest names, and every manifest an index names, must be here.
    let descriptors = |key: &str| -> Vec<String> {
        json.get(key)
            .map(|v| match v {
                serde_json::Value::Array(a) => a.iter().collect::<Vec<_>>(),
                other => vec![other],
            })
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.get("digest").and_then(|d| d.as_str()).map(str::to_string))
            .collect()
    };
    for d in descriptors("config").into_iter().chain(descriptors("layers")) {
        if !reg.layer_link(name, &d).is_some_and(|l| l.exists()) {
            return Err(oci_error(
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                format!("blob {d} is not in repository `{name}`"),
            ));
        }
    }
    for d in descriptors("manifests") {
        if !reg.manifest_link(name, &d).is_some_and(|l| l.exists()) {
            return Err(oci_error(
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
                format!("manifest {d} is not in repository `{name}`"),
            ));
        }
    }
    store_blob(reg, &digest, &bytes)?;
    let link = reg.manifest_link(name, &digest).ok_or_else(|| internal("bad digest"))?;
    write_file(&link, &media_type)?;
    if !is_digest {
        write_file(&reg.tag_path(name, reference), &digest)?;
    }
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, format!("/v2/{name}/manifests/{digest}"))
        .header("Docker-Content-Digest", &digest)
        .body(Body::empty())
        .map_err(internal)
}

fn delete_manifest(reg: &Registry, name: &str, reference: &str) -> Reply {
    if !reference.starts_with("sha256:") {
        let tag = reg.tag_path(name, reference);
        if !is_tag(reference) || !tag.exists() {
            return Err(manifest_unknown(reference));
        }
        std::fs::remove_file(tag).map_err(internal)?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let digest = manifest_digest(reg, name, reference)?;
    let tags_dir = reg.repo(name).join("_tags");
    for e in std::fs::read_dir(&tags_dir).into_iter().flatten().flatten() {
        if std::fs::read_to_string(e.path()).is_ok_and(|d| d.trim() == digest) {
            std::fs::remove_file(e.path()).map_err(internal)?;
        }
    }
    if let Some(link) = reg.manifest_link(name, &digest) {
        std::fs::remove_file(link).map_err(internal)?;
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn get_blob(reg: &Registry, name: &str, digest: &str, head: bool) -> Reply {
    let linked = reg.layer_link(name, digest).is_some_and(|l| l.exists())
        || reg.manifest_link(name, digest).is_some_and(|l| l.exists());
    let path = reg.blob_path(digest).filter(|p| linked && p.exists()).ok_or_else(|| blob_unknown(digest))?;
    let file = tokio::fs::File::open(&path).await.map_err(internal)?;
    let len = file.metadata().await.map_err(internal)?.len();
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header("Docker-Content-Digest", digest);
    let body = if head { Body::empty() } else { Body::from_stream(tokio_util::io::ReaderStream::new(file)) };
    resp.body(body).map_err(internal)
}

fn upload_accepted(name: &str, id: &str, size: u64, status: StatusCode) -> Response {
    let mut resp = status.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/{name}/blobs/uploads/{id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("0-{}", size.saturating_sub(1))) {
        h.insert(header::RANGE, v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("Docker-Upload-UUID", v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

fn link_blob(reg: &Registry, name: &str, digest: &str) -> Result<(), Response> {
    let link = reg.layer_link(name, digest).ok_or_else(|| internal("bad digest"))?;
    write_file(&link, "")
}

fn blob_created(name: &str, digest: &str) -> Reply {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, format!("/v2/{name}/blobs/{digest}"))
        .header("Docker-Content-Digest", digest)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .map_err(internal)
}

async fn start_upload(
    reg: &Registry,
    name: &str,
    identity: &Identity,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: Body,
) -> Reply {
    // Cross-repository mount: the blob is linked without being sent again, if the caller may
    // pull it from where it is.
    if let (Some(digest), Some(from)) = (query.get("mount"), query.get("from")) {
        let there = valid_name(from)
            && reg.auth.authorize(headers, Action::Pull, Some(from)).is_ok()
            && reg.layer_link(from, digest).is_some_and(|l| l.exists())
            && reg.blob_path(digest).is_some_and(|p| p.exists());
        if there {
            link_blob(reg, name, digest)?;
            return blob_created(name, digest);
        }
    }
    let id = reg.uploads.open(name, identity)?;
    // Monolithic upload: POST with ?digest= and the whole blob.
    if query.contains_key("digest") {
        let taken = reg.uploads.take(&id, name, identity)?;
        return finish_upload(reg, name, taken, query, body).await;
    }
    Ok(upload_accepted(name, &id, 0, StatusCode::ACCEPTED))
}

async fn patch_upload(
    reg: &Registry,
    name: &str,
    id: &str,
    identity: &Identity,
    headers: &HeaderMap,
    body: Body,
) -> Reply {
    let mut taken = reg.uploads.take(id, name, identity)?;
    let size = taken.size;
    if let Some(range) = headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()) {
        let start = range.trim_start_matches("bytes ").split('-').next().and_then(|s| s.trim().parse::<u64>().ok());
        if start != Some(size) {
            let mut resp = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UPLOAD_INVALID",
                format!("chunk starts at {range}, the upload has {size} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("0-{}", size.saturating_sub(1))) {
                resp.headers_mut().insert(header::RANGE, v);
            }
            return Err(resp);
        }
    }
    match reg.uploads.append(&mut taken, body).await {
        Ok(size) => Ok(upload_accepted(name, id, size, StatusCode::ACCEPTED)),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            reg.uploads.close(taken);
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Ends an upload with its last bytes (if any) and `?digest=`: the bytes are copied into a new
/// file while hashed, and that file becomes the blob (unless the blob is there already). The
/// session is closed whatever the outcome, but for a body that broke off.
async fn finish_upload(
    reg: &Registry,
    name: &str,
    mut taken: uploads::Taken<'_>,
    query: &HashMap<String, String>,
    body: Body,
) -> Reply {
    let Some(digest) = query.get("digest").filter(|d| sha256_hex(d).is_some()).cloned() else {
        return Err(oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "a sha256 ?digest= is required"));
    };
    if let Err(e) = reg.uploads.append(&mut taken, body).await {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            reg.uploads.close(taken);
        }
        return Err(e);
    }
    let sealed = reg.uploads.seal(&taken).await;
    reg.uploads.close(taken);
    let (file, actual) = sealed?;
    if actual != digest {
        let _ = std::fs::remove_file(&file);
        return Err(oci_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("the upload's digest is {actual}, not {digest}"),
        ));
    }
    let blob = reg.blob_path(&digest).ok_or_else(|| internal("bad digest"))?;
    if blob.exists() {
        let _ = std::fs::remove_file(&file);
    } else {
        std::fs::rename(&file, &blob).map_err(internal)?;
    }
    link_blob(reg, name, &digest)?;
    blob_created(name, &digest)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn routes_parse_from_the_right() {
        assert!(
            matches!(route("a/blobs/b/manifests/v1"), Some(Route::Manifest { name, reference }) if name == "a/blobs/b" && reference == "v1")
        );
        assert!(matches!(route("ns/x/blobs/uploads/"), Some(Route::Upload { name, id: None }) if name == "ns/x"));
        assert!(matches!(route("ns/x/blobs/uploads/abc"), Some(Route::Upload { id: Some(id), .. }) if id == "abc"));
        assert!(matches!(route("ns/x/blobs/sha256:00"), Some(Route::Blob { digest, .. }) if digest == "sha256:00"));
        assert!(matches!(route("ns/x/tags/list"), Some(Route::Tags { name }) if name == "ns/x"));
        assert!(route("ns/x/other").is_none());
    }
}
