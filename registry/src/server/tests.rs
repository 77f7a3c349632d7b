//! The embedded registry against hostile clients, over real HTTP.
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;

struct Server {
    base: String,
    _dir: tempfile::TempDir,
}

/// The bcrypt hash of "pw" (cost 4: these tests check permissions, not hashing).
fn pw() -> String {
    bcrypt::hash("pw", 4).expect("bcrypt")
}

fn users() -> UsersFile {
    let h = pw();
    toml::from_str(&format!(
        "[users.victim]\npassword_bcrypt = \"{h}\"\npull = [\"*\"]\npush = [\"victim/*\"]\n\
         [users.attacker]\npassword_bcrypt = \"{h}\"\npull = [\"*\"]\npush = [\"attacker/*\"]\n\
         [users.admin]\npassword_bcrypt = \"{h}\"\n"
    ))
    .expect("users")
}

async fn start(tweak: impl FnOnce(&mut ServerOptions)) -> Server {
    let dir = tempfile::tempdir().expect("tmp");
    let mut options = ServerOptions::open(dir.path().join("root"));
    options.users = users();
    tweak(&mut options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(serve(listener, options));
    Server { base, _dir: dir }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Server {
    fn req(&self, method: &str, path: &str, user: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") { path.to_string() } else { format!("{}{path}", self.base) };
        reqwest::Client::new().request(method.parse().expect("method"), url).basic_auth(user, Some("pw"))
    }

    /// Opens an upload session on `repo` as `user`; returns its URL.
    async fn open(&self, repo: &str, user: &str) -> String {
        let resp = self.req("POST", &format!("/v2/{repo}/blobs/uploads/"), user).send().await.expect("POST");
        assert_eq!(resp.status(), 202);
        format!("{}{}", self.base, resp.headers()["location"].to_str().expect("ascii"))
    }

    /// Pushes `bytes` as a blob of `repo` as `user` (monolithic).
    async fn push_blob(&self, repo: &str, user: &str, bytes: &[u8]) -> String {
        let d = digest(bytes);
        let url = format!("{}?digest={d}", self.open(repo, user).await);
        let resp = self.req("PUT", &url, user).body(bytes.to_vec()).send().await.expect("PUT");
        assert_eq!(resp.status(), 201);
        d
    }

    async fn blob(&self, repo: &str, d: &str) -> Vec<u8> {
        let resp = self.req("GET", &format!("/v2/{repo}/blobs/{d}"), "victim").send().await.expect("GET");
        assert_eq!(resp.status(), 200);
        resp.bytes().await.expect("body").to_vec()
    }
}

async fn code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    (status, body["errors"][0]["code"].as_str().unwrap_or_default().to_string())
}

/// A stream body the test feeds by hand, kept open until the sender is dropped.
fn open_body() -> (tokio::sync::mpsc::Sender<Vec<u8>>, reqwest::Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    (tx, reqwest::Body::wrap_stream(stream))
}

#[tokio::test]
async fn an_open_session_cannot_reach_another_users_stored_blob() {
    let reg = start(|_| {}).await;
    let secret = b"the victim's component".to_vec();
    let d = reg.push_blob("victim/app", "victim", &secret).await;

    // The attacker streams the same bytes into a session of its own and keeps the body open.
    let url = reg.open("attacker/x", "attacker").await;
    let (tx, body) = open_body();
    let patch = tokio::spawn(reg.req("PATCH", &url, "attacker").body(body).send());
    tx.send(secret.clone()).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Finishing the session while the PATCH is still writing is refused...
    let put = reg.req("PUT", &format!("{url}?digest={d}"), "attacker").send().await.expect("PUT");
    assert_eq!(code(put).await, (409, "BLOB_UPLOAD_INVALID".to_string()));
    tx.send(b" and more".to_vec()).await.expect("send");
    drop(tx);
    assert_eq!(patch.await.expect("join").expect("PATCH").status(), 202);
    // ...and after it, the session's bytes (which no longer match) become nothing.
    let put = reg.req("PUT", &format!("{url}?digest={d}"), "attacker").send().await.expect("PUT");
    assert_eq!(code(put).await, (400, "DIGEST_INVALID".to_string()));
    let again = reg.req("PATCH", &url, "attacker").body("x").send().await.expect("PATCH");
    assert_eq!(code(again).await, (404, "BLOB_UPLOAD_UNKNOWN".to_string()), "a finished session is gone");

    // A session whose bytes do match the stored blob finishes without touching it.
    let url = reg.open("attacker/x", "attacker").await;
    let (tx, body) = open_body();
    let patch = tokio::spawn(reg.req("PATCH", &url, "attacker").body(body).send());
    tx.send(secret.clone()).await.expect("send");
    drop(tx);
    assert_eq!(patch.await.expect("join").expect("PATCH").status(), 202);
    let put = reg.req("PUT", &format!("{url}?digest={d}"), "attacker").send().await.expect("PUT");
    assert_eq!(put.status(), 201);
    let late = reg.req("PATCH", &url, "attacker").body("appended").send().await.expect("PATCH");
    assert_eq!(code(late).await.0, 404);
    let stored = reg.blob("victim/app", &d).await;
    assert_eq!((stored.len(), digest(&stored)), (secret.len(), d), "the victim's blob is intact");
}

#[tokio::test]
async fn sessions_belong_to_their_repository_and_user_and_expire() {
    let reg = start(|o| o.upload_ttl = Duration::from_secs(2)).await;
    let url = reg.open("victim/a", "victim").await;
    let other_user = reg.req("PATCH", &url, "admin").body("x").send().await.expect("PATCH");
    assert_eq!(code(other_user).await, (404, "BLOB_UPLOAD_UNKNOWN".to_string()));
    let other_repo = url.replace("victim/a", "victim/b");
    let moved = reg.req("PATCH", &other_repo, "victim").body("x").send().await.expect("PATCH");
    assert_eq!(code(moved).await, (404, "BLOB_UPLOAD_UNKNOWN".to_string()));
    assert_eq!(reg.req("PATCH", &url, "victim").body("x").send().await.expect("PATCH").status(), 202);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let expired = reg.req("PATCH", &url, "victim").body("y").send().await.expect("PATCH");
    assert_eq!(code(expired).await, (404, "BLOB_UPLOAD_UNKNOWN".to_string()), "idle past the ttl");
}

#[tokio::test]
async fn blobs_past_the_size_limit_are_refused() {
    let reg = start(|o| o.max_blob_bytes = 1000).await;
    let url = reg.open("victim/a", "victim").await;
    assert_eq!(reg.req("PATCH", &url, "victim").body(vec![1u8; 600]).send().await.expect("PATCH").status(), 202);
    let over = reg.req("PATCH", &url, "victim").body(vec![1u8; 600]).send().await.expect("PATCH");
    assert_eq!(code(over).await, (413, "SIZE_INVALID".to_string()));
    let gone = reg.req("PATCH", &url, "victim").body("x").send().await.expect("PATCH");
    assert_eq!(code(gone).await.0, 404, "the session ends at the limit");
    let monolithic = vec![2u8; 1001];
    let url = format!("{}?digest={}", reg.open("victim/a", "victim").await, digest(&monolithic));
    let put = reg.req("PUT", &url, "victim").body(monolithic).send().await.expect("PUT");
    assert_eq!(code(put).await, (413, "SIZE_INVALID".to_string()));
}

#[tokio::test]
async fn a_media_type_that_is_not_one_is_refused() {
    let reg = start(|_| {}).await;
    let config = reg.push_blob("victim/a", "victim", b"{}").await;
    for media_type in ["application/vnd.oci.image.manifest.v1+json\nX-Injected: 1", "no-slash", &"a/".repeat(200)] {
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": media_type,
            "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": config, "size": 2},
            "layers": [],
        });
        let put = reg.req("PUT", "/v2/victim/a/manifests/v1", "victim").body(manifest.to_string()).send().await;
        assert_eq!(code(put.expect("PUT")).await, (400, "MANIFEST_INVALID".to_string()), "{media_type:?}");
    }
    let get = reg.req("GET", "/v2/victim/a/manifests/v1", "victim").send().await.expect("GET");
    assert_eq!(code(get).await, (404, "MANIFEST_UNKNOWN".to_string()), "nothing was stored");
}

#[tokio::test]
async fn users_act_only_where_their_permissions_say() {
    let reg = start(|_| {}).await;
    reg.push_blob("victim/app", "victim", b"mine").await;
    let d = reg.push_blob("attacker/app", "attacker", b"theirs").await;
    let push = reg.req("POST", "/v2/victim/app/blobs/uploads/", "attacker").send().await.expect("POST");
    assert_eq!(code(push).await, (403, "DENIED".to_string()));
    let delete = reg.req("DELETE", &format!("/v2/attacker/app/blobs/{d}"), "attacker").send().await.expect("DELETE");
    assert_eq!(code(delete).await, (403, "DENIED".to_string()), "no delete permission");
    let delete = reg.req("DELETE", &format!("/v2/attacker/app/blobs/{d}"), "admin").send().await.expect("DELETE");
    assert_eq!(delete.status(), 202, "a user without lists may do everything");
    // Mounting needs pull rights on the source repository.
    let h = pw();
    let narrow: UsersFile = toml::from_str(&format!(
        "[users.a]\npassword_bcrypt = \"{h}\"\npull = [\"a/*\"]\npush = [\"a/*\"]\n\
         [users.b]\npassword_bcrypt = \"{h}\"\npush = [\"b/*\"]\npull = [\"b/*\"]\n"
    ))
    .expect("users");
    let reg = start(move |o| o.users = narrow).await;
    let d = reg.push_blob("b/secret", "b", b"b's bytes").await;
    let mount = reg.req("POST", &format!("/v2/a/x/blobs/uploads/?mount={d}&from=b/secret"), "a").send().await;
    assert_eq!(mount.expect("POST").status(), 202, "no mount: a new session instead");
    let get = reg.req("GET", &format!("/v2/a/x/blobs/{d}"), "a").send().await.expect("GET");
    assert_eq!(get.status(), 404);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": d, "size": 9},
        "layers": [],
    });
    let put = reg.req("PUT", "/v2/b/secret/manifests/v1", "b").body(manifest.to_string()).send().await;
    assert_eq!(put.expect("PUT").status(), 201);
    let catalog = |user: &'static str| {
        let req = reg.req("GET", "/v2/_catalog", user);
        async move { req.send().await.expect("GET").json::<serde_json::Value>().await.expect("json") }
    };
    assert_eq!(catalog("b").await["repositories"], serde_json::json!(["b/secret"]));
    assert_eq!(catalog("a").await["repositories"], serde_json::json!([]), "only what the caller may pull");
}
