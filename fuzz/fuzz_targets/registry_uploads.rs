//! The embedded registry's upload state machine: a sequence of operations read from the input
//! (open a session, append a chunk with or without a Content-Range, close it with the right or a
//! wrong digest, monolithic pushes, status, cancel, read the blob), as a client could send them.
#![no_main]
use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

fuzz_target!(|data: &[u8]| {
    let f = nereid_fuzz::registry(4096);
    f.rt.block_on(async {
        let send = |method: Method, uri: String, headers: Vec<(&'static str, String)>, body: Vec<u8>| {
            let router = f.router.clone();
            async move {
                let mut r = Request::builder().method(method).uri(uri);
                for (k, v) in headers {
                    r = r.header(k, v);
                }
                let Ok(request) = r.body(Body::from(body)) else { return None };
                let response = router.oneshot(request).await.ok()?;
                let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string);
                let _ = axum::body::to_bytes(response.into_body(), 1 << 20).await;
                location
            }
        };
        let mut session: Option<String> = None;
        let mut written: Vec<u8> = Vec::new();
        let mut ops = data;
        while let Some((&op, rest)) = ops.split_first() {
            let len = rest.first().map_or(0, |&n| n as usize % 64).min(rest.len().saturating_sub(1));
            let chunk = rest.get(1..1 + len).unwrap_or(&[]).to_vec();
            ops = &rest[(1 + len).min(rest.len())..];
            let at =
                session.clone().unwrap_or_else(|| "/v2/fuzz/blobs/uploads/0123456789abcdef0123456789abcdef".into());
            match op % 8 {
                0 => {
                    session = send(Method::POST, "/v2/fuzz/blobs/uploads/".into(), vec![], vec![]).await;
                    written.clear();
                }
                1 => {
                    let range = format!("{}-{}", written.len(), written.len() + chunk.len().saturating_sub(1));
                    written.extend_from_slice(&chunk);
                    let _ = send(Method::PATCH, at, vec![("content-range", range)], chunk).await;
                }
                2 => {
                    written.extend_from_slice(&chunk);
                    let _ = send(Method::PATCH, at, vec![], chunk).await;
                }
                3 => {
                    let digest = sha256(&written);
                    let sep = if at.contains('?') { '&' } else { '?' };
                    let _ = send(Method::PUT, format!("{at}{sep}digest={digest}"), vec![], vec![]).await;
                    session = None;
                }
                4 => {
                    let digest = String::from_utf8_lossy(&chunk).into_owned();
                    let _ = send(Method::PUT, format!("{at}?digest={digest}"), vec![], chunk).await;
                }
                5 => {
                    let _ = send(Method::GET, at, vec![], vec![]).await;
                }
                6 => {
                    let _ = send(Method::DELETE, at, vec![], vec![]).await;
                    session = None;
                }
                _ => {
                    let digest = sha256(&chunk);
                    let uri = format!("/v2/fuzz/blobs/uploads/?digest={digest}");
                    let _ = send(Method::POST, uri, vec![], chunk).await;
                    let _ = send(Method::GET, format!("/v2/fuzz/blobs/{digest}"), vec![], vec![]).await;
                }
            }
        }
    });
});
