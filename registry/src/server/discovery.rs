//! Content discovery: the repositories a caller may pull (`/v2/_catalog`) and a repository's
//! tags (`/v2/<name>/tags/list`), both paginated as the distribution spec says (`n`, `last`,
//! a `Link` header when cut short).
use std::collections::HashMap;
use std::path::Path;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{oci_error, Identity, Registry, Reply};

pub(super) fn catalog(reg: &Registry, identity: &Identity, query: &HashMap<String, String>) -> Reply {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('_') || !e.path().is_dir() {
                continue;
            }
            let name = if prefix.is_empty() { n.clone() } else { format!("{prefix}/{n}") };
            if e.path().join("_manifests").is_dir() {
                out.push(name.clone());
            }
            walk(&e.path(), &name, out);
        }
    }
    let mut repos = Vec::new();
    walk(&reg.root.join("repositories"), "", &mut repos);
    repos.retain(|r| reg.auth.may_pull(identity, r));
    repos.sort();
    Ok(paginate("repositories", None, repos, query, "/v2/_catalog"))
}

/// A sorted list, after `last` and at most `n` long, with the spec's `Link` header if cut short.
fn paginate(
    key: &str,
    name: Option<&str>,
    items: Vec<String>,
    query: &HashMap<String, String>,
    path: &str,
) -> Response {
    let mut items: Vec<String> = match query.get("last") {
        Some(last) => items.into_iter().filter(|t| t > last).collect(),
        None => items,
    };
    let mut link = None;
    if let Some(n) = query.get("n").and_then(|n| n.parse::<usize>().ok()) {
        if items.len() > n {
            items.truncate(n);
            if let Some(last) = items.last() {
                link = Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""));
            }
        }
    }
    let mut body = serde_json::Map::new();
    if let Some(name) = name {
        body.insert("name".into(), name.into());
    }
    body.insert(key.into(), items.into());
    let mut resp =
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], serde_json::Value::Object(body).to_string())
            .into_response();
    if let Some(l) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert(header::LINK, l);
    }
    resp
}

pub(super) fn tags(reg: &Registry, name: &str, query: &HashMap<String, String>) -> Reply {
    let dir = reg.repo(name).join("_tags");
    if !reg.repo(name).join("_manifests").is_dir() {
        return Err(oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", format!("repository `{name}` is unknown")));
    }
    let mut tags: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    tags.retain(|t| !t.starts_with('.'));
    tags.sort();
    Ok(paginate("tags", Some(name), tags, query, &format!("/v2/{name}/tags/list")))
}
