//! OCI distribution of components: round-trips against a real registry (Debian's
//! `docker-registry`, the CNCF distribution registry) and the embedded one, interop with `wkg`
//! both ways, tampering, auth, the offline cache, and hot swap in a live job.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest;

use crate::cluster::*;
use crate::common::*;

/// A registry process started by the test, killed when dropped.
pub(crate) struct Registry {
    child: Child,
    pub(crate) host: String,
    dir: tempfile::TempDir,
    /// Where the registry keeps blobs: `<root>/<hex>` gives a blob's file.
    blob_file: fn(&Path, &str) -> PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

fn wait_for_registry(host: &str, child: &mut Child, log: &Path) {
    let t = Instant::now();
    loop {
        let (code, _) = http("GET", &format!("http://{host}/v2/"), None, Vec::new());
        if code == 200 || code == 401 {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the registry exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the registry on {host} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nereid registry serve`, with `users` (a users.toml body) if given.
pub(crate) fn embedded(users: Option<&str>, anonymous_pull: bool) -> Registry {
    let dir = tempfile::tempdir().expect("tmp");
    let host = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("registry.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nereid"));
    cmd.args(["registry", "serve", "--root"]).arg(dir.path().join("root")).args(["--addr", &host]);
    if let Some(u) = users {
        std::fs::write(dir.path().join("users.toml"), u).expect("users.toml");
        cmd.arg("--users").arg(dir.path().join("users.toml"));
    }
    if anonymous_pull {
        cmd.arg("--anonymous-pull");
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn nereid registry serve");
    wait_for_registry(&host, &mut child, &log);
    Registry { child, host, dir, blob_file: |root, hex| root.join("root/blobs/sha256").join(hex) }
}

/// Debian's `docker-registry` (distribution 2.8), with htpasswd basic auth if `user` is given.
fn distribution(user: Option<(&str, &str)>) -> Registry {
    let bin = Path::new("/usr/bin/docker-registry");
    assert!(
        bin.exists(),
        "docker-registry is not installed: `cargo xtask setup` installs it (apt-get install docker-registry)"
    );
    let dir = tempfile::tempdir().expect("tmp");
    let host = format!("127.0.0.1:{}", free_port());
    let mut auth = String::new();
    if let Some((name, password)) = user {
        let htpasswd = dir.path().join("htpasswd");
        let out = Command::new("htpasswd")
            .args(["-Bbn", name, password])
            .output()
            .expect("htpasswd (apache2-utils; `cargo xtask setup` installs it)");
        assert!(out.status.success());
        std::fs::write(&htpasswd, out.stdout).expect("htpasswd file");
        auth = format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", htpasswd.display());
    }
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{auth}",
        dir.path().join("root").display()
    );
    std::fs::write(dir.path().join("config.yml"), config).expect("config.yml");
    let log = dir.path().join("registry.log");
    let mut child = Command::new(bin)
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn docker-registry");
    wait_for_registry(&host, &mut child, &log);
    Registry {
        child,
        host,
        dir,
        blob_file: |root, hex| root.join("root/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data"),
    }
}

/// The bcrypt hash Apache's `htpasswd -nbB` makes for `user` (what distribution reads too).
pub(crate) fn htpasswd_bcrypt(user: &str, password: &str) -> String {
    let out = Command::new("htpasswd")
        .args(["-nbB", user, password])
        .output()
        .expect("htpasswd (apache2-utils; `cargo xtask setup` installs it)");
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).expect("utf-8");
    line.trim().split_once(':').expect("user:hash").1.to_string()
}

/// `nereid <args>` with its own cache directory and extra environment.
pub(crate) fn nereid(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nereid"));
    cmd.args(args)
        .env("NEREID_CACHE_DIR", cache)
        .env_remove("NEREID_REGISTRY_USERNAME")
        .env_remove("NEREID_REGISTRY_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run nereid")
}

pub(crate) fn ok_json(out: Output) -> Value {
    assert!(out.status.success(), "nereid failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json output")
}

fn failure(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure, got: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub(crate) fn wkg() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("wkg")).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/wkg")));
    let found: Option<PathBuf> = candidates.into_iter().find(|p| p.is_file());
    found.expect("wkg is not installed: `cargo xtask setup` installs it (cargo install wkg --locked)")
}

fn wkg_run(args: &[&str]) -> String {
    let out = Command::new(wkg()).args(args).output().expect("run wkg");
    assert!(out.status.success(), "wkg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn sha256_file(path: &Path) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("read"))))
}

/// The digest the registry reports for a manifest (HEAD, Docker-Content-Digest).
fn registry_digest(host: &str, repo: &str, reference: &str) -> String {
    block(async {
        let resp = reqwest::Client::new()
            .head(format!("http://{host}/v2/{repo}/manifests/{reference}"))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("HEAD manifest");
        assert_eq!(resp.status().as_u16(), 200);
        resp.headers()["Docker-Content-Digest"].to_str().expect("ascii").to_string()
    })
}

/// Push, pull by tag and digest, inspect, tags, and wkg in both directions, same digests.
fn round_trips(reg: &Registry) {
    let cache = tempfile::tempdir().expect("tmp");
    let h = &reg.host;
    let fedavg = plugin("fedavg");
    let r = format!("oci://{h}/nereid/fedavg:0.1.0");
    let pushed = ok_json(nereid(cache.path(), &["push", fedavg.to_str().expect("utf-8"), &r, "--json"], &[]));
    let manifest = pushed["manifest_digest"].as_str().expect("digest").to_string();
    assert_eq!(pushed["layer_digest"], sha256_file(&fedavg));
    assert_eq!(registry_digest(h, "nereid/fedavg", "0.1.0"), manifest);
    let again = ok_json(nereid(cache.path(), &["push", fedavg.to_str().expect("utf-8"), &r, "--json"], &[]));
    assert_eq!(again["layer_existed"], true, "a second push sends no layer");
    // The config records its creation time, so the tag now names the second manifest.
    let manifest = again["manifest_digest"].as_str().expect("digest").to_string();
    assert_eq!(registry_digest(h, "nereid/fedavg", "0.1.0"), manifest);

    for reference in [r.clone(), format!("oci://{h}/nereid/fedavg@{manifest}")] {
        let fresh = tempfile::tempdir().expect("tmp");
        let out = fresh.path().join("out.wasm");
        let pulled =
            ok_json(nereid(fresh.path(), &["pull", &reference, "-o", out.to_str().expect("utf-8"), "--json"], &[]));
        assert_eq!(pulled["manifest_digest"], manifest.as_str());
        assert_eq!(pulled["from_cache"], false);
        assert_eq!(std::fs::read(&out).expect("out"), std::fs::read(&fedavg).expect("fedavg"));
        assert_eq!(pulled["config"]["architecture"], "wasm");
        assert_eq!(pulled["config"]["os"], "wasip2");
        let exports = pulled["config"]["component"]["exports"].to_string();
        assert!(exports.contains("nereid:plugin/aggregator"), "{exports}");
    }
    let inspect = ok_json(nereid(cache.path(), &["plugin", "inspect", &r, "--json"], &[]));
    assert_eq!(inspect["name"], "fedavg");
    assert_eq!(inspect["pinned"], format!("oci://{h}/nereid/fedavg@{manifest}"));
    let tags = ok_json(nereid(cache.path(), &["registry", "tags", &format!("oci://{h}/nereid/fedavg"), "--json"], &[]));
    assert_eq!(tags, serde_json::json!(["0.1.0"]));

    // Pushed by nereid, pulled by wkg.
    let wkg_out = cache.path().join("wkg-pulled.wasm");
    wkg_run(&[
        "oci",
        "pull",
        "--insecure",
        h,
        &format!("{h}/nereid/fedavg:0.1.0"),
        "-o",
        wkg_out.to_str().expect("utf-8"),
    ]);
    assert_eq!(sha256_file(&wkg_out), sha256_file(&fedavg));
    // Pushed by wkg, pulled by nereid: the digest wkg prints is the one nereid pulls.
    let clipped = plugin("clipped-mean");
    let printed = wkg_run(&[
        "oci",
        "push",
        "--insecure",
        h,
        &format!("{h}/by-wkg/clipped:1.0.0"),
        clipped.to_str().expect("utf-8"),
    ]);
    let wkg_digest = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("digest: "))
        .unwrap_or_else(|| panic!("wkg printed no digest: {printed}"))
        .trim()
        .to_string();
    let out = cache.path().join("clipped.wasm");
    let pulled = ok_json(nereid(
        cache.path(),
        &["pull", &format!("oci://{h}/by-wkg/clipped:1.0.0"), "-o", out.to_str().expect("utf-8"), "--json"],
        &[],
    ));
    assert_eq!(pulled["manifest_digest"], wkg_digest.as_str());
    assert_eq!(registry_digest(h, "by-wkg/clipped", "1.0.0"), wkg_digest);
    assert_eq!(sha256_file(&out), sha256_file(&clipped));
}

#[test]
fn components_round_trip_through_the_distribution_registry_and_wkg() {
    round_trips(&distribution(None));
}

#[test]
fn components_round_trip_through_the_embedded_registry_and_wkg() {
    round_trips(&embedded(None, false));
}

fn tampered_blob_is_refused(reg: &Registry) {
    let cache = tempfile::tempdir().expect("tmp");
    let fedavg = plugin("fedavg");
    let r = format!("oci://{}/t/fedavg:1", reg.host);
    let pushed = ok_json(nereid(cache.path(), &["push", fedavg.to_str().expect("utf-8"), &r, "--json"], &[]));
    let layer = pushed["layer_digest"].as_str().expect("digest").trim_start_matches("sha256:").to_string();
    let file = (reg.blob_file)(reg.dir.path(), &layer);
    let mut bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).expect("tamper");
    let fresh = tempfile::tempdir().expect("tmp");
    let out = fresh.path().join("out.wasm");
    let err = failure(nereid(fresh.path(), &["pull", &r, "-o", out.to_str().expect("utf-8")], &[]));
    assert!(err.contains("refused") && err.contains(&layer), "{err}");
    assert!(!out.exists(), "nothing is written");
    let blobs = fresh.path().join("oci/blobs/sha256").join(&layer);
    assert!(!blobs.exists(), "the tampered blob is not cached");
}

#[test]
fn a_tampered_blob_is_refused_by_digest() {
    tampered_blob_is_refused(&distribution(None));
    tampered_blob_is_refused(&embedded(None, false));
}

/// Pushing and pulling need the right credentials; `env` gives them.
fn auth_checks(reg: &Registry, good: &[(&str, &str)], bad: &[(&str, &str)]) {
    let cache = tempfile::tempdir().expect("tmp");
    let fedavg = plugin("fedavg");
    let f = fedavg.to_str().expect("utf-8");
    let r = format!("oci://{}/secure/fedavg:1", reg.host);
    let err = failure(nereid(cache.path(), &["push", f, &r], &[]));
    assert!(err.contains("credentials"), "anonymous push: {err}");
    let err = failure(nereid(cache.path(), &["push", f, &r], bad));
    assert!(err.contains("credentials"), "wrong password: {err}");
    ok_json(nereid(cache.path(), &["push", f, &r, "--json"], good));
    let out = cache.path().join("out.wasm");
    let o = out.to_str().expect("utf-8");
    let err = failure(nereid(cache.path(), &["pull", &r, "-o", o], &[]));
    assert!(err.contains("credentials"), "anonymous pull: {err}");
    ok_json(nereid(cache.path(), &["pull", &r, "-o", o, "--json"], good));
    assert_eq!(std::fs::read(&out).expect("out"), std::fs::read(&fedavg).expect("fedavg"));
}

#[test]
fn auth_is_required_and_refused_without_credentials() {
    let good = [("NEREID_REGISTRY_USERNAME", "ops"), ("NEREID_REGISTRY_PASSWORD", "s3cret")];
    let bad = [("NEREID_REGISTRY_USERNAME", "ops"), ("NEREID_REGISTRY_PASSWORD", "guess")];
    // Basic auth (htpasswd) on the distribution registry.
    auth_checks(&distribution(Some(("ops", "s3cret"))), &good, &bad);
    // The token flow on the embedded registry: 401 names the realm, the client trades its
    // credentials there for a bearer token.
    let users = format!("[users.ops]\npassword_bcrypt = \"{}\"\n", htpasswd_bcrypt("ops", "s3cret"));
    let reg = embedded(Some(&users), false);
    auth_checks(&reg, &good, &bad);
    // A bearer token given as such (a registry access token).
    let token: Value = block(async {
        let resp = reqwest::Client::new()
            .get(format!("http://{}/token?scope=repository:secure/fedavg:pull", reg.host))
            .basic_auth("ops", Some("s3cret"))
            .send()
            .await
            .expect("token");
        resp.json().await.expect("token json")
    });
    let cache = tempfile::tempdir().expect("tmp");
    let out = cache.path().join("out.wasm");
    let token = token["token"].as_str().expect("token");
    let r = format!("oci://{}/secure/fedavg:1", reg.host);
    ok_json(nereid(
        cache.path(),
        &["pull", &r, "-o", out.to_str().expect("utf-8"), "--json"],
        &[("NEREID_REGISTRY_TOKEN", token)],
    ));
    // Anonymous pull when the registry allows it; pushing still needs a user.
    let open = embedded(Some(&users), true);
    let f = plugin("fedavg");
    let r = format!("oci://{}/open/fedavg:1", open.host);
    assert!(failure(nereid(cache.path(), &["push", f.to_str().expect("utf-8"), &r], &[])).contains("credentials"));
    ok_json(nereid(cache.path(), &["push", f.to_str().expect("utf-8"), &r, "--json"], &good));
    ok_json(nereid(
        tempfile::tempdir().expect("tmp").path(),
        &["pull", &r, "-o", out.to_str().expect("utf-8"), "--json"],
        &[],
    ));
}

#[test]
fn a_pulled_component_keeps_working_offline_until_gc() {
    let reg = embedded(None, false);
    let cache = tempfile::tempdir().expect("tmp");
    let c = cache.path();
    let fedavg = plugin("fedavg");
    let r = format!("oci://{}/off/fedavg:stable", reg.host);
    let pushed = ok_json(nereid(c, &["push", fedavg.to_str().expect("utf-8"), &r, "--json"], &[]));
    let digest = pushed["manifest_digest"].as_str().expect("digest").to_string();
    let out = c.join("out.wasm");
    let o = out.to_str().expect("utf-8");
    assert_eq!(ok_json(nereid(c, &["pull", &r, "-o", o, "--json"], &[]))["from_cache"], false);
    drop(reg);
    let by_tag = ok_json(nereid(c, &["pull", &r, "-o", o, "--json"], &[]));
    assert_eq!(
        (by_tag["from_cache"].as_bool(), by_tag["manifest_digest"].as_str()),
        (Some(true), Some(digest.as_str()))
    );
    let pinned = by_tag["reference"].as_str().expect("reference").to_string();
    assert_eq!(ok_json(nereid(c, &["pull", &pinned, "-o", o, "--json"], &[]))["from_cache"], true);
    let inspect = ok_json(nereid(c, &["plugin", "inspect", &r, "--json"], &[]));
    assert_eq!(inspect["name"], "fedavg");
    let ls = ok_json(nereid(c, &["cache", "ls", "--json"], &[]));
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    assert_eq!(ls[0]["manifest_digest"], digest.as_str());
    assert_eq!(ls[0]["tags"], serde_json::json!(["stable"]));
    // gc without a duration keeps what is in use; with 0s it removes everything.
    let kept = ok_json(nereid(c, &["cache", "gc", "--json"], &[]));
    assert_eq!(kept["manifests"], serde_json::json!([]));
    let dry = ok_json(nereid(c, &["cache", "gc", "--unused-for", "0s", "--dry-run", "--json"], &[]));
    assert_eq!(dry["manifests"], serde_json::json!([digest]));
    assert_eq!(ok_json(nereid(c, &["cache", "ls", "--json"], &[])).as_array().map(Vec::len), Some(1));
    let gone = ok_json(nereid(c, &["cache", "gc", "--unused-for", "0s", "--json"], &[]));
    assert_eq!(gone["blobs"].as_array().map(Vec::len), Some(2), "layer and config: {gone}");
    assert!(gone["freed_bytes"].as_u64().unwrap_or(0) > 100_000);
    assert_eq!(ok_json(nereid(c, &["cache", "ls", "--json"], &[])), serde_json::json!([]));
    let err = failure(nereid(c, &["pull", &r, "-o", o], &[]));
    assert!(err.contains("cannot reach registry"), "{err}");
}

/// (status, headers, body) of a raw request.
fn raw(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    block(async {
        let mut req = reqwest::Client::new().request(method.parse().expect("method"), url).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request");
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
    })
}

fn error_code(body: &[u8]) -> String {
    let v: Value =
        serde_json::from_slice(body).unwrap_or_else(|_| panic!("not an error body: {}", String::from_utf8_lossy(body)));
    v["errors"][0]["code"].as_str().expect("errors[0].code").to_string()
}

fn location(host: &str, headers: &reqwest::header::HeaderMap) -> String {
    let l = headers["location"].to_str().expect("ascii");
    if l.starts_with("http") {
        l.to_string()
    } else {
        format!("http://{host}{l}")
    }
}

fn with_query(url: &str, q: &str) -> String {
    format!("{url}{}{q}", if url.contains('?') { '&' } else { '?' })
}

/// The distribution spec's push paths, HEAD, errors and discovery, by raw HTTP; run against the
/// distribution registry too, so the test itself is checked against the reference.
fn spec_checks(reg: &Registry, strict: bool) {
    let h = &reg.host;
    let v2 = format!("http://{h}/v2");
    let blob = b"a monolithic blob".to_vec();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)));
    // Monolithic: POST then one PUT ?digest= with the whole body.
    let (s, hd, _) = raw("POST", &format!("{v2}/spec/a/blobs/uploads/"), &[], Vec::new());
    assert_eq!(s, 202);
    let octets = [("content-type", "application/octet-stream")];
    let (s, hd, _) = raw("PUT", &with_query(&location(h, &hd), &format!("digest={digest}")), &octets, blob.clone());
    assert_eq!(s, 201);
    assert_eq!(hd["docker-content-digest"], digest.as_str());
    // The single-POST form (POST ?digest= with the body) is optional in the spec: a registry
    // without it answers 202 and the client finishes with a PUT.
    let (s, hd, _) = raw("POST", &format!("{v2}/spec/e/blobs/uploads/?digest={digest}"), &octets, blob.clone());
    match s {
        201 => assert_eq!(hd["docker-content-digest"], digest.as_str()),
        202 => {
            let url = with_query(&location(h, &hd), &format!("digest={digest}"));
            assert_eq!(raw("PUT", &url, &octets, blob.clone()).0, 201);
        }
        other => panic!("POST ?digest=: {other}"),
    }
    assert_eq!(raw("HEAD", &format!("{v2}/spec/e/blobs/{digest}"), &[], Vec::new()).0, 200);
    let (s, hd, body) = raw("HEAD", &format!("{v2}/spec/a/blobs/{digest}"), &[], Vec::new());
    assert_eq!((s, hd["content-length"].to_str().expect("len")), (200, blob.len().to_string().as_str()));
    assert!(body.is_empty());
    let (s, _, body) = raw("GET", &format!("{v2}/spec/a/blobs/{digest}"), &[], Vec::new());
    assert_eq!((s, body), (200, blob.clone()));

    // Chunked: POST, PATCH with Content-Range, a chunk out of order is refused (416), PUT ?digest=.
    let chunks: [&[u8]; 2] = [b"first half, ", b"second half"];
    let whole: Vec<u8> = chunks.concat();
    let whole_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&whole)));
    let (s, hd, _) = raw("POST", &format!("{v2}/spec/b/blobs/uploads/"), &[], Vec::new());
    assert_eq!(s, 202);
    let mut url = location(h, &hd);
    let (s, hd, _) = raw(
        "PATCH",
        &url,
        &[("content-type", "application/octet-stream"), ("content-range", &format!("0-{}", chunks[0].len() - 1))],
        chunks[0].to_vec(),
    );
    assert_eq!(s, 202);
    assert_eq!(hd["range"], format!("0-{}", chunks[0].len() - 1).as_str());
    url = location(h, &hd);
    if strict {
        // The spec's 416 for a chunk that does not continue the upload (distribution 2.8 does
        // not check), on a session of its own.
        let (_, other, _) = raw("POST", &format!("{v2}/spec/b/blobs/uploads/"), &[], Vec::new());
        let range = [("content-type", "application/octet-stream"), ("content-range", "100-110")];
        let (s, _, body) = raw("PATCH", &location(h, &other), &range, chunks[1].to_vec());
        assert_eq!((s, error_code(&body)), (416, "BLOB_UPLOAD_INVALID".to_string()));
    }
    let start = chunks[0].len();
    let range = format!("{start}-{}", whole.len() - 1);
    let (s, hd, _) = raw(
        "PATCH",
        &url,
        &[("content-type", "application/octet-stream"), ("content-range", &range)],
        chunks[1].to_vec(),
    );
    assert_eq!(s, 202);
    url = location(h, &hd);
    let (s, _, _) = raw("PUT", &with_query(&url, &format!("digest={whole_digest}")), &[], Vec::new());
    assert_eq!(s, 201);
    let (s, _, body) = raw("GET", &format!("{v2}/spec/b/blobs/{whole_digest}"), &[], Vec::new());
    assert_eq!((s, body), (200, whole.clone()));

    // A wrong digest is refused and stores nothing.
    let (_, hd, _) = raw("POST", &format!("{v2}/spec/c/blobs/uploads/"), &[], Vec::new());
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (s, _, body) = raw(
        "PUT",
        &with_query(&location(h, &hd), &format!("digest={wrong}")),
        &[("content-type", "application/octet-stream")],
        b"x".to_vec(),
    );
    assert_eq!((s, error_code(&body)), (400, "DIGEST_INVALID".to_string()));
    let (s, _, body) = raw("GET", &format!("{v2}/spec/c/blobs/{wrong}"), &[], Vec::new());
    assert_eq!((s, error_code(&body)), (404, "BLOB_UNKNOWN".to_string()));

    // Cross-repository mount.
    let (s, _, _) = raw("POST", &format!("{v2}/spec/d/blobs/uploads/?mount={digest}&from=spec/a"), &[], Vec::new());
    assert_eq!(s, 201);
    assert_eq!(raw("HEAD", &format!("{v2}/spec/d/blobs/{digest}"), &[], Vec::new()).0, 200);

    // Manifests: unknown blobs are refused, then tags and pagination.
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let manifest = |config: &str, layer: &str| {
        serde_json::json!({
            "schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": config, "size": blob.len()},
            "layers": [{"mediaType": "application/wasm", "digest": layer, "size": whole.len()}],
        })
        .to_string()
        .into_bytes()
    };
    let (s, _, body) =
        raw("PUT", &format!("{v2}/spec/a/manifests/v1"), &[("content-type", mt)], manifest(&digest, &whole_digest));
    assert_eq!((s, error_code(&body)), (400, "MANIFEST_BLOB_UNKNOWN".to_string()), "spec/a has no {whole_digest}");
    let (_, hd, _) =
        raw("POST", &format!("{v2}/spec/a/blobs/uploads/?mount={whole_digest}&from=spec/b"), &[], Vec::new());
    let _ = hd;
    let m = manifest(&digest, &whole_digest);
    let m_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&m)));
    for tag in ["v1", "v2", "v3"] {
        let (s, hd, _) = raw("PUT", &format!("{v2}/spec/a/manifests/{tag}"), &[("content-type", mt)], m.clone());
        assert_eq!(s, 201);
        assert_eq!(hd["docker-content-digest"], m_digest.as_str());
    }
    let (s, hd, body) = raw("GET", &format!("{v2}/spec/a/manifests/v2"), &[("accept", mt)], Vec::new());
    assert_eq!((s, hd["content-type"].to_str().expect("ascii"), body), (200, mt, m.clone()));
    assert_eq!(raw("HEAD", &format!("{v2}/spec/a/manifests/{m_digest}"), &[("accept", mt)], Vec::new()).0, 200);
    let (s, _, body) = raw("GET", &format!("{v2}/spec/a/manifests/nope"), &[("accept", mt)], Vec::new());
    assert_eq!((s, error_code(&body)), (404, "MANIFEST_UNKNOWN".to_string()));
    let (s, _, body) = raw("GET", &format!("{v2}/spec/a/tags/list"), &[], Vec::new());
    let all: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!((s, all["name"].as_str(), &all["tags"]), (200, Some("spec/a"), &serde_json::json!(["v1", "v2", "v3"])));
    if strict {
        // Pagination with `n` and `last` (distribution 2.8 ignores `n`).
        let (s, hd, body) = raw("GET", &format!("{v2}/spec/a/tags/list?n=2"), &[], Vec::new());
        let page: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!((s, &page["tags"]), (200, &serde_json::json!(["v1", "v2"])));
        assert!(hd["link"].to_str().expect("ascii").contains("last=v2"), "{:?}", hd["link"]);
        let (_, _, body) = raw("GET", &format!("{v2}/spec/a/tags/list?n=2&last=v2"), &[], Vec::new());
        assert_eq!(serde_json::from_slice::<Value>(&body).expect("json")["tags"], serde_json::json!(["v3"]));
    }
    let (s, _, body) = raw("GET", &format!("{v2}/spec/none/tags/list"), &[], Vec::new());
    assert_eq!((s, error_code(&body)), (404, "NAME_UNKNOWN".to_string()));
    let (s, _, _) = raw("DELETE", &format!("{v2}/spec/a/manifests/{m_digest}"), &[], Vec::new());
    assert_eq!(s, 202);
    assert_eq!(raw("GET", &format!("{v2}/spec/a/manifests/v1"), &[("accept", mt)], Vec::new()).0, 404);
}

#[test]
fn the_embedded_registry_speaks_the_distribution_spec_like_the_reference() {
    spec_checks(&distribution(None), false);
    spec_checks(&embedded(None, false), true);
}

pub(crate) fn swap_job(name: &str, aggregator: &str, follow_tag: bool, objective: Option<(&str, f64)>) -> String {
    let objective = objective
        .map(|(r, mu)| format!("\n[client_objective]\nplugin = \"{r}\"\n[client_objective.config]\nmu = {mu}\n"))
        .unwrap_or_default();
    format!(
        "[job]\nname = \"{name}\"\nseed = 3\n\n[rounds]\nmin_clients = 2\ndeadline_secs = 30\n\n[stop]\nrounds = 1000000\n\n\
         [model]\nkind = \"mlp\"\ninputs = 64\nhidden = [8]\nclasses = 10\n\n[training]\nepochs = 1\nbatch_size = 64\n\n\
         [aggregator]\nplugin = \"{aggregator}\"\nfollow_tag = {follow_tag}\n{objective}"
    )
}

/// The labels (pinned aggregator references) of the rounds closed so far.
pub(crate) fn aggregators(s: &nereid::protocol::JobStatus) -> Vec<String> {
    s.history.iter().map(|h| h.aggregator.clone()).collect()
}

/// Waits for `more` rounds folded by `label` after the ones there are now.
pub(crate) fn wait_rounds_by(c: &Cluster, job: &str, label: &str, more: usize) -> nereid::protocol::JobStatus {
    let before = aggregators(&c.status(job)).iter().filter(|l| *l == label).count();
    c.wait_until(job, &format!("{more} more rounds by {label}"), |s| {
        aggregators(s).iter().filter(|l| *l == label).count() >= before + more
    })
}

pub(crate) fn push(cache: &Path, component: &Path, reference: &str) -> String {
    let pushed = ok_json(nereid(cache, &["push", component.to_str().expect("utf-8"), reference, "--json"], &[]));
    pushed["reference"].as_str().expect("pinned reference").to_string()
}

/// Pushes, by raw HTTP, an artifact that looks like a component but is not one.
fn push_garbage(host: &str, repo: &str, tag: &str) -> String {
    let v2 = format!("http://{host}/v2/{repo}");
    let put = |bytes: &[u8]| {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        let (s, hd, _) = raw("POST", &format!("{v2}/blobs/uploads/"), &[], Vec::new());
        assert_eq!(s, 202);
        let url = with_query(&location(host, &hd), &format!("digest={digest}"));
        assert_eq!(raw("PUT", &url, &[("content-type", "application/octet-stream")], bytes.to_vec()).0, 201);
        (digest, bytes.len())
    };
    let layer = put(b"\0asm but not really a component");
    let config = put(
        format!(
            "{{\"created\":\"2026-01-01T00:00:00Z\",\"author\":null,\"architecture\":\"wasm\",\"os\":\"wasip2\",\"layerDigests\":[\"{}\"],\"component\":null}}",
            layer.0
        )
        .as_bytes(),
    );
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": config.0, "size": config.1},
        "layers": [{"mediaType": "application/wasm", "digest": layer.0, "size": layer.1}],
    })
    .to_string();
    let (s, hd, _) = raw("PUT", &format!("{v2}/manifests/{tag}"), &[("content-type", mt)], manifest.into_bytes());
    assert_eq!(s, 201);
    format!("oci://{host}/{repo}@{}", hd["docker-content-digest"].to_str().expect("ascii"))
}

#[test]
fn a_live_job_swaps_plugins_at_round_boundaries_and_keeps_the_old_one_when_the_new_is_bad() {
    let reg = embedded(None, false);
    let h = reg.host.clone();
    let c = Cluster::running(2);
    let cli_cache = c.path("cache");
    let v1 = push(&cli_cache, &plugin("fedavg"), &format!("oci://{h}/ns/agg:v1"));
    let v2 = push(&cli_cache, &plugin("clipped-mean"), &format!("oci://{h}/ns/agg:v2"));
    let fedprox = format!("oci://{h}/ns/fedprox:1");
    push(&cli_cache, &plugin("fedprox"), &fedprox);

    // 1. Re-applying a running job with another aggregator and objective config.
    c.apply("swap", &swap_job("swap", &format!("oci://{h}/ns/agg:v1"), false, Some((&fedprox, 0.01))));
    c.wait_until("swap", "two rounds", |s| s.rounds_done >= 2);
    let path = c.path("swap-v2.toml");
    std::fs::write(&path, swap_job("swap", &format!("oci://{h}/ns/agg:v2"), false, Some((&fedprox, 0.02))))
        .expect("job");
    let out = c.nereid(&["job", "apply", path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("next round boundary"));
    let s = wait_rounds_by(&c, "swap", &v2, 2);
    let labels = aggregators(&s);
    let first_new = labels.iter().position(|l| *l == v2).expect("a round by the new plugin");
    assert!(first_new >= 2, "{labels:?}");
    assert!(labels[..first_new].iter().all(|l| *l == v1) && labels[first_new..].iter().all(|l| *l == v2), "{labels:?}");
    assert_eq!(s.aggregator, v2);
    let swapped: Vec<(&str, &str, &str)> =
        s.swaps.iter().map(|w| (w.slot.as_str(), w.from.as_str(), w.to.as_str())).collect();
    assert!(swapped.contains(&("aggregator", v1.as_str(), v2.as_str())), "{swapped:?}");
    assert!(s.swaps.iter().any(|w| w.slot == "client_objective" && w.error.is_none()), "{:?}", s.swaps);
    // Every edge pulled the objective from the registry itself and swapped it.
    for (name, _) in &c.nodes {
        let cached = c.path(&format!("{name}/cache/oci/manifests/{h}/ns/fedprox"));
        assert!(cached.is_dir(), "{name} pulled nothing into {}", cached.display());
        c.wait_until("swap", "the edges to train with the new objective", |_| {
            std::fs::read_to_string(c.path(&format!("{name}.log")))
                .unwrap_or_default()
                .contains("client objective swapped")
        });
    }

    // 2. A new aggregator that refuses its config (sent straight to the cloud's API): the cloud
    // says why and the running plugin stays.
    let (runtime, _dir) = runtime();
    let components = nereid::components::Components::new(c.path("api-cache"), &Default::default()).expect("components");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let mut loaded = nereid::config::job::load(&path, &runtime, &|s, b| Ok(rt.block_on(components.fetch(s, b, None))?))
        .expect("job");
    loaded.spec.aggregator.source = Some(format!("oci://{h}/ns/agg:v1"));
    loaded.spec.aggregator.config.insert("max_norm".into(), toml::Value::Float(1.0));
    let body = serde_json::to_vec(&nereid::protocol::SubmitJob { spec: loaded.spec }).expect("json");
    let (code, reply) = block(async {
        let resp = reqwest::Client::new()
            .post(c.url("/v1/jobs"))
            .bearer_auth(&c.admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("apply");
        (resp.status().as_u16(), resp.text().await.unwrap_or_default())
    });
    assert_eq!(code, 400, "{reply}");
    assert!(reply.contains("max_norm") && reply.contains("unchanged"), "{reply}");
    let s = wait_rounds_by(&c, "swap", &v2, 2);
    assert!(!s.swap_pending && s.swaps.iter().all(|w| w.to != v1));
    // The swapped-out instance is gone: one aggregator instance for one job.
    assert_eq!(c.metric("nereid_plugin_instances "), 1.0);
    let out = c.nereid(&["job", "stop", "swap"]);
    assert!(out.status.success());

    // 3. A job following a tag: a moved tag swaps; a tag moved to something that is not a
    // component is refused, reported, and the old plugin keeps running.
    let live = format!("oci://{h}/ns/live:stable");
    let first = push(&cli_cache, &plugin("fedavg"), &live);
    c.apply("follow", &swap_job("follow", &live, true, None));
    c.wait_until("follow", "two rounds", |s| s.rounds_done >= 2);
    let second = push(&cli_cache, &plugin("clipped-mean"), &live);
    let s = wait_rounds_by(&c, "follow", &second, 2);
    assert!(aggregators(&s).starts_with(&[first.clone(), first.clone()]), "{:?}", aggregators(&s));
    let bad = push_garbage(&h, "ns/live", "stable");
    let s = c.wait_until("follow", "the refusal to be reported", |s| s.swaps.iter().any(|w| w.error.is_some()));
    let refusal = s.swaps.iter().find(|w| w.error.is_some()).expect("refusal");
    assert_eq!((refusal.from.as_str(), refusal.to.as_str()), (second.as_str(), bad.as_str()));
    let s = wait_rounds_by(&c, "follow", &second, 3);
    assert!(aggregators(&s).iter().all(|l| *l != bad));
    assert_eq!(s.swaps.iter().filter(|w| w.error.is_some()).count(), 1, "a refusal is reported once: {:?}", s.swaps);
    assert_eq!(c.metric("nereid_plugin_instances "), 1.0);
    assert!(c.nereid(&["job", "stop", "follow"]).status.success());
}
