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
struct Registry {
    child: Child,
    host: String,
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
fn embedded(users: Option<&str>, anonymous_pull: bool) -> Registry {
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

/// `nereid <args>` with its own cache directory and extra environment.
fn nereid(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
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

fn ok_json(out: Output) -> Value {
    assert!(out.status.success(), "nereid failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json output")
}

fn failure(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure, got: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wkg() -> PathBuf {
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
    let users = format!("[users.ops]\npassword_sha256 = \"{}\"\n", hex::encode(sha2::Sha256::digest(b"s3cret")));
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
