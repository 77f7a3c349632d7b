//! Manifests pushed to the embedded registry (`PUT /v2/<name>/manifests/<reference>`) with each
//! media type, then read back by tag and listed: the body, media type and tag come from the input.
#![no_main]
use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const MEDIA_TYPES: [&str; 5] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/json",
    "text/plain",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let (tag, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) if i < 140 => (String::from_utf8_lossy(&rest[..i]).into_owned(), &rest[i + 1..]),
        _ => ("t".to_string(), rest),
    };
    let f = nereid_fuzz::registry(nereid_registry::server::DEFAULT_MAX_BLOB);
    f.rt.block_on(async {
        let request = |method: Method, uri: String, body: Vec<u8>| {
            let mut r = Request::builder().method(method).uri(uri);
            r = r.header("content-type", MEDIA_TYPES[pick as usize % MEDIA_TYPES.len()]);
            r.body(Body::from(body))
        };
        let uri = |what: &str| format!("/v2/fuzz/{what}");
        let Ok(put) = request(Method::PUT, uri(&format!("manifests/{tag}")), body.to_vec()) else { return };
        let _ = f.router.clone().oneshot(put).await;
        if let Ok(get) = request(Method::GET, uri(&format!("manifests/{tag}")), Vec::new()) {
            let _ = f.router.clone().oneshot(get).await;
        }
        if let Ok(list) = request(Method::GET, uri("tags/list"), Vec::new()) {
            let _ = f.router.clone().oneshot(list).await;
        }
    });
});
