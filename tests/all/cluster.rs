//! A cloud and edge hosts (this package's binary) on loopback, for the end-to-end tests.
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nereid::client::CloudClient;
use nereid::model_io;
use nereid::protocol::{JobStatus, JobSummary, RoundSummary};
use nereid::train::Dataset;

pub fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio").block_on(f)
}

/// (status, body) of an HTTP request.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Vec<u8>) {
    block(async {
        let client = reqwest::Client::new();
        let mut req = client.request(method.parse().expect("method"), url).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) => (r.status().as_u16(), r.bytes().await.map(|b| b.to_vec()).unwrap_or_default()),
            Err(_) => (0, Vec::new()),
        }
    })
}

/// The token edges started by [`Cluster::start_serving_edge`] take on their API.
pub const EDGE_TOKEN: &str = "edge-api-token";

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin: String,
    pub nodes: Vec<(String, String)>,
    pub cloud: Option<Child>,
    pub edges: Vec<Option<Child>>,
    /// The CA the cloud's certificate is signed by, once [`Cluster::use_tls`] made one.
    pub ca: Option<PathBuf>,
    /// The command that runs `nereid` for the cloud (None) or edge `i`: this package's binary,
    /// or the binary inside a container image or a network namespace.
    pub command: Box<dyn Fn(Option<usize>) -> Vec<String>>,
    /// The cloud's address as the operator reaches it, when not loopback.
    pub cloud_host: Option<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.cloud.iter_mut().chain(self.edges.iter_mut().flatten()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test's logs and state are what explains it.
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("the cluster's logs and state are kept in {}", self.dir.path().display());
        }
    }
}

/// Everything the cloud processes started in `dir` logged (`cloud-*.log`: one per start).
pub fn cloud_logs(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).expect("log dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("cloud-") && name.ends_with(".log") {
            text += &std::fs::read_to_string(entry.path()).unwrap_or_default();
        }
    }
    text
}

/// Waits (30 s at most) until what `read` returns contains `text`; `what` names the wait in the
/// failure, which shows the text read last.
pub fn wait_for_text(what: &str, text: &str, read: impl Fn() -> String) {
    let t = Instant::now();
    loop {
        let now = read();
        if now.contains(text) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: no `{text}` in 30 s:\n{now}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the log file `log` says `edge started`.
pub fn wait_for_edge_start(log: &Path) {
    wait_for_text(&format!("{} did not start", log.display()), "edge started", || {
        std::fs::read_to_string(log).unwrap_or_default()
    });
}

/// Sends `signal` (`-STOP`, `-CONT`, `-TERM`, ...) to `child`.
pub fn signal(child: &Child, signal: &str) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().expect("kill").success(), "kill {signal} {pid}");
}

pub fn spawn(args: &[&str], config: &Path, log: &Path, cache: &Path) -> Child {
    spawn_with(&[env!("CARGO_BIN_EXE_nereid").to_string()], args, config, log, cache)
}

/// As [`spawn`], with `command` (a program and its first arguments) running `nereid`.
pub fn spawn_with(command: &[String], args: &[&str], config: &Path, log: &Path, cache: &Path) -> Child {
    let (program, first) = command.split_first().expect("a command");
    Command::new(program)
        .args(first)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NEREID_CACHE_DIR", cache)
        // Logs without colour codes, so that tests can match a line's fields.
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"))
}

impl Cluster {
    /// A cloud config and `edges` nodes with the digits split non-IID among them (fixed seeds).
    pub fn new(edges: usize, cloud_extra: &str) -> Cluster {
        Cluster::new_in(&std::env::temp_dir(), edges, cloud_extra)
    }

    /// As [`Cluster::new`], its files in a new directory under `parent`.
    pub fn new_in(parent: &Path, edges: usize, cloud_extra: &str) -> Cluster {
        let dir = tempfile::tempdir_in(parent).expect("tmp");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let admin = "admin-secret".to_string();
        let mut cloud = format!("listen = \"127.0.0.1:{port}\"\nstate = \"cloud.db\"\nadmin_token = \"{admin}\"\nonline_secs = 5\n{cloud_extra}\n");
        let (pool, _) = Dataset::digits().holdout(0.2, 1);
        let mut nodes = Vec::new();
        for (i, part) in pool.dirichlet_split(edges, 1.0, 5).into_iter().enumerate() {
            let name = format!("edge-{}", i + 1);
            let token = format!("token-of-{name}");
            let data = dir.path().join(&name).join("data");
            std::fs::create_dir_all(&data).expect("mkdir");
            let (tr, te) = part.holdout(0.2, i as u64);
            tr.write_csv(&data.join("train.csv")).expect("csv");
            te.write_csv(&data.join("test.csv")).expect("csv");
            cloud.push_str(&format!("[nodes.{name}]\ntoken = \"{token}\"\n"));
            std::fs::write(
                dir.path().join(&name).join("edge.toml"),
                format!("name = \"{name}\"\ncloud = \"http://127.0.0.1:{port}\"\ntoken = \"{token}\"\ndata = \"data\"\nstate = \"edge.db\"\npoll_ms = 50\n"),
            )
            .expect("edge.toml");
            nodes.push((name, token));
        }
        std::fs::write(dir.path().join("cloud.toml"), cloud).expect("cloud.toml");
        Cluster {
            dir,
            port,
            admin,
            nodes,
            cloud: None,
            edges: (0..edges).map(|_| None).collect(),
            ca: None,
            command: Box::new(|_| vec![env!("CARGO_BIN_EXE_nereid").to_string()]),
            cloud_host: None,
        }
    }

    /// A cluster with its cloud and every edge started.
    pub fn running(edges: usize) -> Cluster {
        let mut c = Cluster::new(edges, "");
        c.start_cloud();
        (0..edges).for_each(|i| c.start_edge(i));
        c
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        let host = self.cloud_host.as_deref().unwrap_or(if self.ca.is_some() { "localhost" } else { "127.0.0.1" });
        format!("{scheme}://{host}:{}{path}", self.port)
    }

    /// The client TLS of the operator: the cluster's CA, once it has one.
    pub fn client_tls(&self) -> nereid_net::tls::ClientTls {
        nereid_net::tls::ClientTls { ca: self.ca.clone(), cert: None, key: None }
    }

    /// Serves the cloud over mutual TLS: makes a CA (`nereid cert`), a certificate for the cloud
    /// (localhost) and one per edge, and points every config at them; the cloud knows nodes by
    /// token and certificate together (client certificates optional in the handshake, so that
    /// operators and probes need none). Call before starting anything.
    pub fn use_tls(&mut self) {
        let pki = self.path("pki");
        let pki_str = pki.to_str().expect("utf-8").to_string();
        let cert = |args: &[&str]| {
            let out = self.nereid(args);
            assert!(out.status.success(), "nereid {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        cert(&["cert", "ca", "--out", &pki_str]);
        cert(&["cert", "issue", "localhost", "--ca", &pki_str, "--san", "127.0.0.1"]);
        let cloud = self.path("cloud.toml");
        let text = std::fs::read_to_string(&cloud).expect("cloud.toml");
        let tls = format!(
            "node_auth = \"token-and-certificate\"\n[tls]\ncert = \"{pki_str}/localhost.pem\"\nkey = \"{pki_str}/localhost.key\"\n\
             client_ca = \"{pki_str}/ca.pem\"\n"
        );
        // Top-level keys and [tls] before the [nodes.*] tables.
        let text = match text.find("[nodes.") {
            Some(at) => format!("{}{tls}{}", &text[..at], &text[at..]),
            None => format!("{text}{tls}"),
        };
        std::fs::write(&cloud, text).expect("cloud.toml");
        for (name, _) in &self.nodes {
            cert(&["cert", "issue", name, "--ca", &pki_str]);
            let edge = self.path(&format!("{name}/edge.toml"));
            let text = std::fs::read_to_string(&edge).expect("edge.toml").replace(
                &format!("cloud = \"http://127.0.0.1:{}\"", self.port),
                &format!("cloud = \"https://localhost:{}\"", self.port),
            );
            let text = format!(
                "{text}\n[cloud_tls]\nca = \"{pki_str}/ca.pem\"\ncert = \"{pki_str}/{name}.pem\"\nkey = \"{pki_str}/{name}.key\"\n"
            );
            std::fs::write(&edge, text).expect("edge.toml");
        }
        self.ca = Some(pki.join("ca.pem"));
    }

    /// Whether the cloud answers its health check.
    pub fn cloud_healthy(&self) -> bool {
        let client = self.client_tls().http_client().expect("client").build().expect("client");
        block(async { client.get(self.url("/v1/health")).send().await.is_ok_and(|r| r.status().is_success()) })
    }

    pub fn start_cloud(&mut self) {
        let log = self.path(&format!("cloud-{}.log", Instant::now().elapsed().as_nanos()));
        self.cloud =
            Some(spawn_with(&(self.command)(None), &["cloud"], &self.path("cloud.toml"), &log, &self.path("cache")));
        let t = Instant::now();
        while !self.cloud_healthy() {
            assert!(t.elapsed() < Duration::from_secs(30), "the cloud did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill_cloud(&mut self) {
        let mut c = self.cloud.take().expect("cloud running");
        c.kill().expect("kill -9");
        c.wait().expect("reap");
    }

    pub fn start_edge(&mut self, i: usize) {
        let name = &self.nodes[i].0;
        let cfg = self.path(&format!("{name}/edge.toml"));
        let log = self.path(&format!("{name}.log"));
        // Each node has its own caches, as on separate machines.
        let cache = self.path(&format!("{name}/cache"));
        self.edges[i] = Some(spawn_with(&(self.command)(Some(i)), &["edge"], &cfg, &log, &cache));
    }

    pub fn kill_edge(&mut self, i: usize) {
        let mut c = self.edges[i].take().expect("edge running");
        c.kill().expect("kill -9");
        c.wait().expect("reap");
    }

    pub fn edge_pid(&self, i: usize) -> u32 {
        self.edges[i].as_ref().expect("edge running").id()
    }

    pub fn signal_edge(&self, i: usize, sig: &str) {
        signal(self.edges[i].as_ref().expect("edge running"), sig);
    }

    /// Gives every edge a `[trainer]` running `command` (`extra`: more keys of the table).
    pub fn add_trainer(&self, command: &[String], extra: &str) {
        for (name, _) in &self.nodes {
            let toml = self.path(&format!("{name}/edge.toml"));
            let mut text = std::fs::read_to_string(&toml).expect("edge.toml");
            text.push_str(&format!("\n[trainer]\ncommand = {command:?}\n{extra}\n"));
            std::fs::write(&toml, text).expect("edge.toml");
        }
    }

    /// Stops edge `i` (SIGSTOP) once it has asked for work, so that it counts as online and a
    /// round selects it, but sends nothing until [`Cluster::signal_edge`] `-CONT`.
    pub fn hold_edge_once_online(&self, i: usize) {
        wait_for_edge_start(&self.path(&format!("{}.log", self.nodes[i].0)));
        // Past its first poll (it polls at once, then every poll_ms).
        std::thread::sleep(Duration::from_millis(300));
        self.signal_edge(i, "-STOP");
    }

    pub fn nereid(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nereid"));
        if let Some(ca) = &self.ca {
            cmd.env("NEREID_CA", ca);
        }
        cmd.args(args)
            .env("NEREID_CLOUD", self.url(""))
            .env("NEREID_TOKEN", &self.admin)
            .env("NEREID_EDGE_TOKEN", EDGE_TOKEN)
            .env("NEREID_CACHE_DIR", self.path("cache"))
            .output()
            .expect("run nereid")
    }

    pub fn apply(&self, name: &str, job: &str) {
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, job).expect("job file");
        let out = self.nereid(&["job", "apply", path.to_str().expect("utf-8")]);
        assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The operator's client of the cloud.
    pub fn client(&self) -> CloudClient {
        CloudClient::connect(&self.url(""), &self.admin, Duration::from_secs(60), &self.client_tls(), false)
            .expect("client")
    }

    pub fn status(&self, job: &str) -> JobStatus {
        block(self.client().status(job)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every closed round's summary (a status carries one page of them).
    pub fn history(&self, job: &str) -> Vec<RoundSummary> {
        block(self.client().history(job)).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn wait_until(&self, job: &str, what: &str, done: impl Fn(&JobStatus) -> bool) -> JobStatus {
        poll(Duration::from_secs(120), what, || self.status(job), done)
    }

    pub fn wait_done(&self, job: &str) -> JobStatus {
        self.wait_done_within(Duration::from_secs(120), job)
    }

    /// [`Cluster::wait_done`], failing after `limit`.
    pub fn wait_done_within(&self, limit: Duration, job: &str) -> JobStatus {
        self.wait_listed_within(limit, job, "the job to end", |s| s.status != "running");
        let s = self.status(job);
        assert_eq!(s.status, "done", "{s:?}");
        s
    }

    /// The job as the job list shows it: unlike [`Cluster::status`], without every round's
    /// summary, so that polling a job of thousands of rounds stays cheap.
    pub fn listed(&self, job: &str) -> JobSummary {
        let jobs = block(self.client().jobs()).unwrap_or_else(|e| panic!("{e}"));
        jobs.into_iter().find(|j| j.name == job).unwrap_or_else(|| panic!("no job `{job}` in the list"))
    }

    /// [`Cluster::wait_until`] polling [`Cluster::listed`], failing after `limit`.
    pub fn wait_listed_within(
        &self,
        limit: Duration,
        job: &str,
        what: &str,
        done: impl Fn(&JobSummary) -> bool,
    ) -> JobSummary {
        poll(limit, what, || self.listed(job), done)
    }

    pub fn model(&self, job: &str, version: u32) -> model_io::NamedTensors {
        let body = block(self.client().model(job, version)).unwrap_or_else(|e| panic!("{e}"));
        model_io::decode(&body, Path::new("model")).expect("model")
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.url("/metrics"), name)
    }

    /// Writes edge `i`'s edge.toml (its name, cloud, token and state, a free listen port, then
    /// `rest`, and unless `rest` has an `[api]` of its own, an API client with [`EDGE_TOKEN`]),
    /// starts it and waits until it serves; returns its base URL.
    pub fn start_serving_edge(&mut self, i: usize, rest: &str) -> String {
        self.start_serving_edge_on(i, Path::new("edge.db"), rest)
    }

    /// [`Cluster::start_serving_edge`] with its state database at `state`.
    pub fn start_serving_edge_on(&mut self, i: usize, state: &Path, rest: &str) -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let (name, token) = self.nodes[i].clone();
        let api = if rest.contains("[api") {
            String::new()
        } else {
            format!("\n[api.clients.tests]\ntoken = {EDGE_TOKEN:?}\n")
        };
        std::fs::write(
            self.path(&format!("{name}/edge.toml")),
            format!(
                "name = \"{name}\"\ncloud = \"http://127.0.0.1:{}\"\ntoken = \"{token}\"\nstate = {:?}\n\
                 listen = \"127.0.0.1:{port}\"\n{rest}{api}",
                self.port,
                state.display().to_string()
            ),
        )
        .expect("edge.toml");
        self.start_edge(i);
        let edge = format!("http://127.0.0.1:{port}");
        self.wait_for_edge(i, &edge);
        edge
    }

    /// Waits until edge `i`'s API at `edge` answers (30 s at most, then fails with its log).
    pub fn wait_for_edge(&self, i: usize, edge: &str) {
        let t = Instant::now();
        while http("GET", &format!("{edge}/v1/health"), None, Vec::new()).0 != 200 {
            let log = std::fs::read_to_string(self.path(&format!("{}.log", self.nodes[i].0))).unwrap_or_default();
            assert!(t.elapsed() < Duration::from_secs(30), "the edge did not start: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The value of one Prometheus sample (`name` with its labels) at `url`.
pub fn metric(url: &str, name: &str) -> f64 {
    let (_, body) = http("GET", url, None, Vec::new());
    let text = String::from_utf8(body).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// Calls `fetch` every 25 ms until `done` holds for what it returns; fails after `limit`.
fn poll<T: std::fmt::Debug>(limit: Duration, what: &str, fetch: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let t = Instant::now();
    loop {
        let s = fetch();
        if done(&s) {
            return s;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}
