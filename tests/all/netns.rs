//! A fleet on separate hosts: the cloud, a registry and three edges each in a network namespace
//! of its own, with its own address on one bridge (itself in a namespace: the test's host
//! networking is left alone but for one link to reach the cloud as an operator). Mutual TLS
//! everywhere; the job's plugin comes from the registry over HTTPS; an edge's link is cut in the
//! middle of a round and restored; strangers are refused across the network.
use std::process::Command;
use std::time::{Duration, Instant};

use nereid_net::tls::ClientTls;

use crate::cluster::*;
use crate::common::*;
use crate::federated::job_toml;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (Debian's iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Namespaces on one bridge, deleted when dropped.
struct Network {
    prefix: String,
    subnet: String,
    switch: String,
    namespaces: Vec<String>,
}

impl Network {
    /// The switch (a namespace with a bridge) and a link from the test's own namespace to it,
    /// at `<subnet>.100`.
    fn new() -> Network {
        let pid = std::process::id();
        let prefix = format!("nr{}", pid % 100_000);
        let subnet = format!("10.213.{}", 20 + pid % 200);
        let switch = format!("{prefix}-sw");
        let mut net = Network { prefix, subnet, switch: switch.clone(), namespaces: Vec::new() };
        ip(&["netns", "add", &switch]);
        net.namespaces.push(switch.clone());
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        let outer = format!("{}o", net.prefix);
        net.cable(&outer, "operator");
        ip(&["addr", "add", &format!("{}.100/24", net.subnet), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        net
    }

    /// A host `name` at `<subnet>.<last>`, plugged into the switch on port `v-<name>`; returns
    /// its namespace.
    fn host(&mut self, name: &str, last: u8) -> (String, String) {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let inner = format!("{}{last}i", self.prefix);
        self.cable(&inner, name);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
        let addr = format!("{}.{last}", self.subnet);
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        (ns, addr)
    }

    /// A veth pair: `end` stays in the test's namespace (for the caller to place), its peer is
    /// the switch's port `v-<name>` on the bridge.
    fn cable(&self, end: &str, name: &str) {
        let port = format!("{end}p");
        ip(&["link", "add", end, "type", "veth", "peer", "name", &port]);
        ip(&["link", "set", &port, "netns", &self.switch]);
        ip(&["-n", &self.switch, "link", "set", &port, "name", &format!("v-{name}"), "master", "br0", "up"]);
    }

    /// Cuts (or restores) host `name`'s link at the switch: its packets go nowhere.
    fn link(&self, name: &str, up: bool) {
        ip(&["-n", &self.switch, "link", "set", &format!("v-{name}"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links and their peers (the operator's link too).
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn a_fleet_on_separate_hosts_over_mutual_tls_loses_nothing_when_a_link_is_cut_mid_round() {
    let rounds = 3;
    let reference = crate::federated::reference_run(rounds);

    let mut net = Network::new();
    let (cloud_ns, cloud_ip) = net.host("cloud", 1);
    let (registry_ns, registry_ip) = net.host("registry", 2);
    let edges: Vec<(String, String)> = (1..=3).map(|i| net.host(&format!("edge{i}"), 10 + i)).collect();

    let mut c = Cluster::new(3, "");
    c.use_tls();
    let pki = c.path("pki");
    let pki_str = pki.display().to_string();
    let operator_cache = c.path("operator-cache");
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nereid"))
            .args(args)
            .envs(env.iter().copied())
            .env("NEREID_CACHE_DIR", &operator_cache)
            .output()
            .expect("nereid");
        assert!(out.status.success(), "nereid {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    cli(&["cert", "issue", "cloud", "--ca", &pki_str, "--san", &cloud_ip], &[]);
    cli(&["cert", "issue", "registry", "--ca", &pki_str, "--san", &registry_ip], &[]);

    // The registry on its host, users from an htpasswd file; the operator pushes the aggregator.
    let registry = format!("{registry_ip}:5000");
    let htpasswd = c.path("htpasswd");
    std::fs::write(&htpasswd, format!("ops:{}\n", crate::oci::htpasswd_bcrypt("ops", "s3cret"))).expect("htpasswd");
    let registry_log = c.path("registry.log");
    let _registry = Killed(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &registry_ns,
                env!("CARGO_BIN_EXE_nereid"),
                "registry",
                "serve",
                "--addr",
                &registry,
            ])
            .arg("--root")
            .arg(c.path("registry"))
            .arg("--htpasswd")
            .arg(&htpasswd)
            .args(["--tls-cert", &format!("{pki_str}/registry.pem"), "--tls-key", &format!("{pki_str}/registry.key")])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&registry_log).expect("log"))
            .spawn()
            .expect("registry"),
    );
    let registries = format!(
        "\n[registries.\"{registry}\"]\nca = \"{pki_str}/ca.pem\"\nusername = \"ops\"\npassword = \"s3cret\"\n"
    );
    let settings = c.path("registries.toml");
    std::fs::write(&settings, &registries).expect("registries.toml");
    let settings_str = settings.display().to_string();
    let creds = [("NEREID_REGISTRY_CONFIG", settings_str.as_str())];
    let fedavg = format!("oci://{registry}/fleet/fedavg:1");
    let t = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_nereid"))
            .args(["push", &plugin("fedavg").display().to_string(), &fedavg])
            .envs(creds)
            .env("NEREID_CACHE_DIR", &operator_cache)
            .output()
            .expect("push");
        if out.status.success() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "push: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&registry_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The cloud on its host with its certificate for its address; edges reach it there.
    let port = c.port;
    let cloud_toml = std::fs::read_to_string(c.path("cloud.toml"))
        .expect("cloud.toml")
        .replace(&format!("listen = \"127.0.0.1:{port}\""), &format!("listen = \"{cloud_ip}:{port}\""))
        .replace(&format!("{pki_str}/localhost."), &format!("{pki_str}/cloud."));
    std::fs::write(c.path("cloud.toml"), format!("{cloud_toml}{registries}")).expect("cloud.toml");
    for (name, _) in &c.nodes {
        let path = c.path(&format!("{name}/edge.toml"));
        let text = std::fs::read_to_string(&path)
            .expect("edge.toml")
            .replace(&format!("https://localhost:{port}"), &format!("https://{cloud_ip}:{port}"));
        // Top-level keys first: the registries table goes last.
        std::fs::write(&path, format!("{text}{registries}")).expect("edge.toml");
    }
    c.cloud_host = Some(cloud_ip.clone());
    let bin = env!("CARGO_BIN_EXE_nereid").to_string();
    let hosts: Vec<String> = edges.iter().map(|(ns, _)| ns.clone()).collect();
    c.command = Box::new(move |who| {
        let ns = who.map_or(cloud_ns.clone(), |i| hosts[i].clone());
        vec!["ip".into(), "netns".into(), "exec".into(), ns, bin.clone()]
    });
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    c.hold_edge_once_online(1);
    let job = job_toml("digits", "fedavg", rounds, 3, 60.0).replace(&plugin("fedavg").display().to_string(), &fedavg);
    let path = c.path("job.toml");
    std::fs::write(&path, job).expect("job.toml");
    let ca = format!("{pki_str}/ca.pem");
    let url = c.url("");
    cli(
        &["job", "apply", &path.display().to_string()],
        &[creds[0], ("NEREID_CA", &ca), ("NEREID_CLOUD", &url), ("NEREID_TOKEN", &c.admin)],
    );

    // Rounds take milliseconds here (a held poll hands out each task the moment its round
    // opens): edge-2 is held (SIGSTOP) once online, so round 1 selects it and sends its task
    // while it cannot act; then its link is cut, it resumes, and the link is restored 4 s later.
    c.wait_until("digits", "round 1 with the other two updates", |s| {
        s.current.as_ref().is_some_and(|r| r.round == 1 && r.received == ["edge-1", "edge-3"])
    });
    net.link("edge2", false);
    c.signal_edge(1, "-CONT");
    std::thread::sleep(Duration::from_secs(4));
    let during = c.status("digits");
    let open = during.current.as_ref().expect("round 1 is still open without edge-2");
    assert_eq!(open.round, 1);
    assert!(!open.received.iter().any(|n| n == "edge-2"), "nothing crossed the cut link: {open:?}");
    net.link("edge2", true);
    let s = c.wait_done("digits");
    assert!(s.history.iter().all(|h| h.participants.len() == 3), "no update lost: {:?}", s.history);
    assert_eq!(c.model("digits", rounds), reference, "the same model as on loopback without a cut");

    // Across the network, the cloud refuses a certificate of another CA and a node without one.
    let task = c.url("/v1/task");
    let other = c.path("other-ca");
    cli(&["cert", "ca", "--out", &other.display().to_string()], &[]);
    cli(&["cert", "issue", "edge-1", "--ca", &other.display().to_string()], &[]);
    let get = |tls: ClientTls| {
        let client = tls.http_client().expect("client").timeout(Duration::from_secs(10)).build().expect("client");
        block(async { client.get(&task).bearer_auth(&c.nodes[0].1).send().await.ok().map(|r| r.status().as_u16()) })
    };
    let foreign = ClientTls {
        ca: Some(pki.join("ca.pem")),
        cert: Some(other.join("edge-1.pem")),
        key: Some(other.join("edge-1.key")),
    };
    assert_eq!(get(foreign), None, "a certificate of another CA: no TLS session");
    assert_eq!(get(ClientTls { ca: Some(pki.join("ca.pem")), cert: None, key: None }), Some(401), "no certificate");
    let own = ClientTls {
        ca: Some(pki.join("ca.pem")),
        cert: Some(pki.join("edge-1.pem")),
        key: Some(pki.join("edge-1.key")),
    };
    assert_eq!(get(own), Some(200), "edge-1 itself");
}

/// A process killed when dropped, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
