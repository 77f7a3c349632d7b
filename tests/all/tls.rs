//! TLS and mutual TLS: a federated job between a cloud and edges that know each other by
//! certificates (`nereid cert`), the connections the cloud refuses, and plain HTTP refused off
//! loopback.
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nereid_net::tls::ClientTls;

use crate::cluster::*;
use crate::federated::job_toml;

/// (status, body) of GET `url` with `tls` and `token`; None when no HTTP exchange happened
/// (the TLS handshake failed).
fn get(url: &str, tls: &ClientTls, token: &str) -> Option<(u16, String)> {
    let client = tls.http_client().expect("client").timeout(Duration::from_secs(20)).build().expect("client");
    block(async {
        let resp = client.get(url).bearer_auth(token).send().await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.unwrap_or_default()))
    })
}

#[test]
fn a_job_over_mutual_tls_ends_as_in_plaintext_and_the_cloud_refuses_strangers() {
    let rounds = 3;
    let plain = crate::federated::reference_run(rounds);

    let mut c = Cluster::new(3, "");
    c.use_tls();
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    c.apply("job", &job_toml("digits", "fedavg", rounds, 3, 60.0));
    let s = c.wait_done("digits");
    assert!(s.history.iter().all(|h| h.participants.len() == 3), "every edge in every round: {:?}", s.history);
    assert_eq!(c.model("digits", rounds), plain, "TLS changes nothing in the result");

    let pki = c.path("pki");
    let task = c.url("/v1/task");
    let (edge1_token, edge2_token) = (c.nodes[0].1.clone(), c.nodes[1].1.clone());
    let identity = |dir: &Path, name: &str| ClientTls {
        ca: Some(pki.join("ca.pem")),
        cert: Some(dir.join(format!("{name}.pem"))),
        key: Some(dir.join(format!("{name}.key"))),
    };
    let edge1 = identity(&pki, "edge-1");
    assert_eq!(get(&task, &edge1, &edge1_token).map(|r| r.0), Some(200), "edge-1 with its certificate and token");

    // Its token with another node's certificate: refused, naming both.
    let (status, body) = get(&task, &identity(&pki, "edge-2"), &edge1_token).expect("an HTTP answer");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("edge-1") && body.contains("edge-2"), "{body}");
    let (status, _) = get(&task, &edge1, &edge2_token).expect("an HTTP answer");
    assert_eq!(status, 401);

    // A certificate for edge-1 from another CA: no TLS session at all; none: a node is refused.
    let other = c.path("other-ca");
    let other_str = other.to_str().expect("utf-8");
    for args in [vec!["cert", "ca", "--out", other_str], vec!["cert", "issue", "edge-1", "--ca", other_str]] {
        let out = c.nereid(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(get(&task, &identity(&other, "edge-1"), &edge1_token), None, "a certificate of another CA");
    let no_cert = ClientTls { ca: Some(pki.join("ca.pem")), cert: None, key: None };
    let (status, body) = get(&task, &no_cert, &edge1_token).expect("an HTTP answer");
    assert_eq!(status, 401, "a node without a certificate: {body}");
    assert!(body.contains("certificate"), "{body}");
    // The operator needs none: its token is enough.
    assert_eq!(get(&c.url("/v1/jobs"), &no_cert, &c.admin).map(|r| r.0), Some(200));
    // Plain HTTP to the TLS port gets no answer either.
    let (status, _) = http("GET", &format!("http://127.0.0.1:{}/v1/health", c.port), None, Vec::new());
    assert_ne!(status, 200);

    // An edge whose certificate another CA signed never joins: its polls fail in the handshake.
    let text = std::fs::read_to_string(c.path("edge-1/edge.toml"))
        .expect("edge.toml")
        .replace(&format!("{}/edge-1.", pki.display()), &format!("{other_str}/edge-1."));
    std::fs::write(c.path("edge-1/edge.toml"), text).expect("edge.toml");
    c.kill_edge(0);
    c.start_edge(0);
    let log = c.path("edge-1.log");
    wait_for_edge_start(&log);
    std::thread::sleep(Duration::from_secs(1));
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let polls: Vec<&str> = log_text.lines().filter(|l| l.contains("/v1/task")).collect();
    // Every poll fails; the TLS alert is what they fail on (hyper may first report the
    // connection it was handed as not ready, the same refusal seen earlier).
    assert!(
        polls.iter().all(|l| l.contains("error sending request")) && polls.iter().any(|l| l.contains("fatal alert")),
        "every poll of the intruder ends in the handshake: {log_text}"
    );
}

/// Runs `nereid args` and waits for it to exit (20 s at most); returns its stderr.
fn exits_with_error(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("log");
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(args)
        .env("NEREID_CACHE_DIR", dir.path().join("cache"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("nereid {args:?} kept running: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "nereid {args:?} should refuse to start");
    std::fs::read_to_string(&log).expect("log")
}

#[test]
fn plain_http_off_loopback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().expect("tmp");
    let cloud = dir.path().join("cloud.toml");
    std::fs::write(&cloud, "listen = \"0.0.0.0:0\"\nstate = \"cloud.db\"\nadmin_token = \"admin-secret\"\n")
        .expect("cloud.toml");
    let err = exits_with_error(&["cloud", "--config", cloud.to_str().expect("utf-8")]);
    assert!(err.contains("0.0.0.0:0") && err.contains("allow_plaintext = true"), "{err}");

    let edge = dir.path().join("edge.toml");
    std::fs::write(
        &edge,
        "name = \"edge-1\"\ncloud = \"http://192.0.2.1:7000\"\ntoken = \"token-of-edge-1\"\nstate = \"edge.db\"\n\
         data = \"data\"\n",
    )
    .expect("edge.toml");
    let err = exits_with_error(&["edge", "--config", edge.to_str().expect("utf-8")]);
    assert!(err.contains("192.0.2.1:7000") && err.contains("allow_plaintext"), "{err}");

    let root = dir.path().join("registry");
    let err = exits_with_error(&["registry", "serve", "--root", root.to_str().expect("utf-8"), "--addr", "0.0.0.0:0"]);
    assert!(err.contains("--allow-plaintext"), "{err}");

    // Allowed explicitly, the cloud serves (and warns).
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    std::fs::write(
        &cloud,
        format!("listen = \"0.0.0.0:{port}\"\nstate = \"cloud.db\"\nadmin_token = \"admin-secret\"\nallow_plaintext = true\n"),
    )
    .expect("cloud.toml");
    let log = dir.path().join("allowed.log");
    let mut child = spawn(&["cloud"], &cloud, &log, &dir.path().join("cache"));
    let t = Instant::now();
    while http("GET", &format!("http://127.0.0.1:{port}/v1/health"), None, Vec::new()).0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(std::fs::read_to_string(&log).expect("log").contains("plain HTTP"), "a warning is logged");
}

#[test]
fn the_embedded_registry_serves_https_and_its_token_realm_is_https() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dir.path().join("pki");
    let pki_str = pki.to_str().expect("utf-8");
    let run = |args: &[&str]| {
        let out = crate::common::nereid(args);
        assert!(out.status.success(), "nereid {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["cert", "ca", "--out", pki_str]);
    run(&["cert", "issue", "localhost", "--ca", pki_str, "--san", "127.0.0.1"]);
    // Users from an htpasswd file as Apache's `htpasswd -B` writes it.
    let line = format!("ops:{}\n", crate::oci::htpasswd_bcrypt("ops", "s3cret"));
    std::fs::write(dir.path().join("htpasswd"), line).expect("htpasswd");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let host = format!("localhost:{port}");
    let log = dir.path().join("registry.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(["registry", "serve", "--addr", &format!("127.0.0.1:{port}")])
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--htpasswd")
        .arg(dir.path().join("htpasswd"))
        .arg("--tls-cert")
        .arg(pki.join("localhost.pem"))
        .arg("--tls-key")
        .arg(pki.join("localhost.key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let trusting = ClientTls { ca: Some(pki.join("ca.pem")), cert: None, key: None };
    let client = trusting.http_client().expect("client").build().expect("client");
    let t = Instant::now();
    let challenge = loop {
        let resp = block(async { client.get(format!("https://{host}/v2/")).send().await });
        if let Ok(resp) = resp {
            break resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or_default().to_string());
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    };
    let challenge = challenge.expect("a 401 with a challenge");
    assert!(challenge.contains(&format!("realm=\"https://{host}/token\"")), "{challenge}");

    // Push and pull through it with the CA in registries.toml; without it the push fails.
    let cache = dir.path().join("cache");
    let fedavg = crate::common::plugin("fedavg");
    let reference = format!("oci://{host}/secure/fedavg:1");
    let creds = [("NEREID_REGISTRY_USERNAME", "ops"), ("NEREID_REGISTRY_PASSWORD", "s3cret")];
    let untrusted = crate::oci::nereid(&cache, &["push", fedavg.to_str().expect("utf-8"), &reference], &creds);
    assert!(!untrusted.status.success(), "a registry whose CA is not trusted is refused");
    let settings = dir.path().join("registries.toml");
    std::fs::write(&settings, format!("[registries.\"{host}\"]\nca = {:?}\n", pki.join("ca.pem"))).expect("toml");
    let settings_str = settings.to_str().expect("utf-8");
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut env: Vec<(&str, &str)> = vec![("NEREID_REGISTRY_CONFIG", settings_str)];
        env.extend_from_slice(extra);
        env
    };
    crate::oci::ok_json(crate::oci::nereid(
        &cache,
        &["push", fedavg.to_str().expect("utf-8"), &reference, "--json"],
        &with(&creds),
    ));
    let out = dir.path().join("out.wasm");
    crate::oci::ok_json(crate::oci::nereid(
        &dir.path().join("cache-2"),
        &["pull", &reference, "-o", out.to_str().expect("utf-8"), "--json"],
        &with(&creds),
    ));
    assert_eq!(std::fs::read(&out).expect("pulled"), std::fs::read(&fedavg).expect("fedavg"));
    let _ = child.kill();
    let _ = child.wait();
}
