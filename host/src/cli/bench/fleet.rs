//! `nereid bench fleet`: the cloud's control plane with N edges. The edges are simulated in
//! this process, each with its own token (enrolled in bulk with `nereid token create --count`),
//! its own loopback address and its own HTTP/1.1 connection, asking for work the way an edge
//! does: plain polling every `--poll-ms` (idle, then with a round open that selects every edge),
//! then long polling (idle, then a round whose task reaches each edge through its held request,
//! then the job stopped, which ends each edge's held round-state request). Reported per phase:
//! requests, errors, latency p50/p99/max, the cloud's CPU (cores) and RSS, RSS per connected edge.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use serde::Serialize;

use crate::cli::demo::fleet::{free_port, start_cloud};
use nereid::client::CloudClient as Api;
use nereid::protocol::{new_token, routes, RoundState, TaskResponse};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Modes {
    /// Plain polling, then long polling.
    Both,
    Poll,
    LongPoll,
}

#[derive(Args)]
pub struct FleetBench {
    /// Simulated edges.
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// Seconds each phase is measured.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// How often a polling edge asks for work (the edge's `poll_ms`).
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// How long a long poll may be held (the edge's `long_poll_secs`).
    #[arg(long, default_value_t = 25)]
    long_poll_secs: u32,
    #[arg(long, value_enum, default_value_t = Modes::Both)]
    modes: Modes,
    /// Directory of the built plugins [default: $NEREID_PLUGIN_DIR, else target/wasm32-wasip2/plugin].
    #[arg(long, value_name = "DIR")]
    plugins_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// Most simulated edges: each takes a descriptor here and one in the cloud.
const MAX_EDGES: usize = 60_000;

#[derive(Serialize)]
pub struct Report {
    pub edges: usize,
    /// `nereid token create --count`: all the edges' tokens in one transaction.
    pub enrol_ms: f64,
    pub cloud_rss_before_edges_bytes: u64,
    pub phases: Vec<Phase>,
}

#[derive(Serialize)]
pub struct Phase {
    pub name: String,
    pub secs: f64,
    pub requests: u64,
    /// Requests that failed: a transport error or any status but 200.
    pub errors: u64,
    /// Requests answered per second, and what the edges would have asked for.
    pub requests_per_sec: f64,
    pub wanted_per_sec: Option<f64>,
    /// Latency of the requests (plain polling) or of what the phase waits for (long polling:
    /// from the job's apply or stop to each edge's answer), in milliseconds.
    pub latency: Latency,
    /// Edges that got what the phase waits for (a task, a round's end).
    pub edges_answered: usize,
    pub cloud_cpu_cores: f64,
    pub cloud_rss_bytes: u64,
    /// (the cloud's RSS now - before any edge connected) / edges.
    pub cloud_rss_per_edge_bytes: f64,
    /// This process (the simulated edges), for scale: it shares the machine.
    pub load_generator_cpu_cores: f64,
}

#[derive(Serialize, Default)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub(super) fn of(mut micros: Vec<u32>) -> Latency {
        if micros.is_empty() {
            return Latency::default();
        }
        micros.sort_unstable();
        let at = |q: f64| f64::from(micros[((micros.len() - 1) as f64 * q).round() as usize]) / 1e3;
        Latency { count: micros.len(), p50_ms: at(0.5), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

/// What the simulated edges do now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Poll,
    LongPoll,
    Done,
}

/// What the edges measured since the last [`Recorder::take`].
#[derive(Default)]
struct Recorder {
    micros: Mutex<Vec<u32>>,
    requests: AtomicU64,
    errors: AtomicU64,
    answered: AtomicUsize,
}

impl Recorder {
    fn request(&self, took: Duration, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.sample(took);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sample(&self, took: Duration) {
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        lock(&self.micros).push(micros);
    }

    fn take(&self) -> (Vec<u32>, u64, u64, usize) {
        (
            std::mem::take(&mut *lock(&self.micros)),
            self.requests.swap(0, Ordering::Relaxed),
            self.errors.swap(0, Ordering::Relaxed),
            self.answered.swap(0, Ordering::Relaxed),
        )
    }
}

/// A lock a panicked edge task left poisoned still holds consistent figures.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shared by the simulated edges.
struct Shared {
    cloud: SocketAddr,
    mode: tokio::sync::watch::Sender<Mode>,
    record: Recorder,
    /// When the job a long-polling phase waits on was applied or stopped.
    since: Mutex<Instant>,
    poll: Duration,
    long_poll_secs: u32,
}

/// The loopback address of edge `i`: 127.1.0.1, 127.1.0.2, ... (the cloud bounds connections
/// per address, as it would for real edges on their own hosts).
fn edge_address(i: usize) -> Ipv4Addr {
    let n = i + 1;
    Ipv4Addr::new(127, 1 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

type Conn = SendRequest<Empty<Bytes>>;

async fn connect(cloud: SocketAddr, local: Ipv4Addr) -> anyhow::Result<Conn> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local.into(), 0))?;
    let tcp = socket.connect(cloud).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get(conn: &mut Conn, path: &str, auth: &str) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    conn.ready().await?;
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "127.0.0.1")
        .header(hyper::header::AUTHORIZATION, auth)
        .body(Empty::new())?;
    let resp = conn.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// One simulated edge, until the mode is `Done`.
async fn edge(shared: Arc<Shared>, index: usize, token: String) {
    let auth = format!("Bearer {token}");
    let local = edge_address(index);
    let mut modes = shared.mode.subscribe();
    let mut conn: Option<Conn> = None;
    // Spread the edges' polls over the interval, as real edges started at different times are.
    let offset = shared.poll.mul_f64((index as f64 * 0.618_034) % 1.0);
    let mut next = tokio::time::Instant::now() + offset;
    loop {
        let mode = *modes.borrow_and_update();
        if conn.as_ref().is_none_or(SendRequest::is_closed) {
            match connect(shared.cloud, local).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    shared.record.request(Duration::ZERO, false);
                    tokio::time::sleep(shared.poll).await;
                    continue;
                }
            }
        }
        let Some(live) = conn.as_mut() else { continue };
        match mode {
            Mode::Done => return,
            Mode::Poll => {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    _ = modes.changed() => continue,
                }
                next += shared.poll;
                let t0 = Instant::now();
                let ok = matches!(get(live, routes::TASK, &auth).await, Ok((s, _)) if s.is_success());
                shared.record.request(t0.elapsed(), ok);
            }
            Mode::LongPoll => {
                let path = routes::waiting(routes::TASK, shared.long_poll_secs);
                let answer = get(live, &path, &auth).await;
                let task = match answer {
                    Ok((s, body)) if s.is_success() => {
                        serde_json::from_slice::<TaskResponse>(&body).ok().and_then(|t| t.task)
                    }
                    _ => {
                        shared.record.request(Duration::ZERO, false);
                        tokio::time::sleep(shared.poll).await;
                        continue;
                    }
                };
                shared.record.requests.fetch_add(1, Ordering::Relaxed);
                let Some(task) = task else { continue };
                shared.record.sample(lock(&shared.since).elapsed());
                shared.record.answered.fetch_add(1, Ordering::Relaxed);
                // "Training": held on the round's state until the round stops waiting for it.
                let path = routes::waiting(&routes::round(&task.job, task.round), shared.long_poll_secs);
                while let Some(live) = conn.as_mut().filter(|c| !c.is_closed()) {
                    match get(live, &path, &auth).await {
                        Ok((s, body)) if s.is_success() => {
                            shared.record.requests.fetch_add(1, Ordering::Relaxed);
                            let waits =
                                serde_json::from_slice::<RoundState>(&body).map_or(true, |s| s.waits_for_caller);
                            if !waits {
                                shared.record.sample(lock(&shared.since).elapsed());
                                shared.record.answered.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                        _ => {
                            shared.record.request(Duration::ZERO, false);
                            tokio::time::sleep(shared.poll).await;
                        }
                    }
                }
                // Then back to asking for work, as an edge does.
            }
        }
    }
}

/// CPU seconds of the cloud and of this process.
fn cpu(pid: u32) -> anyhow::Result<(f64, f64)> {
    Ok((nereid_harness::cpu_seconds(pid)?, nereid_harness::cpu_seconds(std::process::id())?))
}

struct Measure {
    started: Instant,
    cpu: (f64, f64),
}

impl Measure {
    fn start(pid: u32, shared: &Shared) -> anyhow::Result<Measure> {
        shared.record.take();
        Ok(Measure { started: Instant::now(), cpu: cpu(pid)? })
    }

    fn finish(
        self,
        name: &str,
        pid: u32,
        shared: &Shared,
        base_rss: u64,
        edges: usize,
        wanted: Option<f64>,
    ) -> anyhow::Result<Phase> {
        let secs = self.started.elapsed().as_secs_f64();
        let (cloud_cpu, own_cpu) = cpu(pid)?;
        let (micros, requests, errors, answered) = shared.record.take();
        let rss = super::round::rss_kib(pid, "VmRSS:")? * 1024;
        Ok(Phase {
            name: name.to_string(),
            secs,
            requests,
            errors,
            requests_per_sec: requests as f64 / secs,
            wanted_per_sec: wanted,
            latency: Latency::of(micros),
            edges_answered: answered,
            cloud_cpu_cores: (cloud_cpu - self.cpu.0) / secs,
            cloud_rss_bytes: rss,
            cloud_rss_per_edge_bytes: (rss as f64 - base_rss as f64) / edges as f64,
            load_generator_cpu_cores: (own_cpu - self.cpu.1) / secs,
        })
    }
}

pub fn run(args: FleetBench, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let report = measure(&args, cache_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} simulated edges (enrolled in {:.0} ms), cloud RSS before they connect {:.1} MB",
        report.edges,
        report.enrol_ms,
        report.cloud_rss_before_edges_bytes as f64 / 1e6
    );
    println!(
        "{:<24} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>10}",
        "phase", "requests", "errors", "req/s", "p50 ms", "p99 ms", "max ms", "cloud CPU", "RSS MB", "KB/edge"
    );
    for p in &report.phases {
        println!(
            "{:<24} {:>9} {:>7} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>9.1} {:>10.1}",
            p.name,
            p.requests,
            p.errors,
            p.requests_per_sec,
            p.latency.p50_ms,
            p.latency.p99_ms,
            p.latency.max_ms,
            p.cloud_cpu_cores,
            p.cloud_rss_bytes as f64 / 1e6,
            p.cloud_rss_per_edge_bytes / 1e3
        );
    }
    Ok(())
}

pub fn measure(args: &FleetBench, cache_dir: Option<PathBuf>) -> anyhow::Result<Report> {
    if args.edges == 0 || args.edges > MAX_EDGES {
        bail!("--edges must be 1 to {MAX_EDGES}");
    }
    if !(args.secs.is_finite() && args.secs > 0.0) || args.poll_ms == 0 {
        bail!("--secs and --poll-ms must be positive");
    }
    if args.long_poll_secs == 0 || args.long_poll_secs > nereid::protocol::MAX_WAIT_SECS {
        bail!("--long-poll-secs must be 1 to {}", nereid::protocol::MAX_WAIT_SECS);
    }
    let files = nereid::raise_open_files_limit()?;
    if (files as usize) < args.edges + 256 {
        bail!("this process may open {files} files; {} edges need about {}", args.edges, args.edges + 256);
    }
    let work = tempfile::tempdir()?;
    match measure_in(args, cache_dir, work.path()) {
        Ok(report) => Ok(report),
        Err(e) => {
            // The cloud's log tells what went wrong: kept.
            let kept = work.keep();
            Err(e.context(format!("the run's files are kept in {}", kept.display())))
        }
    }
}

fn measure_in(args: &FleetBench, cache_dir: Option<PathBuf>, work: &std::path::Path) -> anyhow::Result<Report> {
    let plugins = args.plugins_dir.clone().unwrap_or_else(crate::cli::default_plugin_dir);
    let cache = cache_dir.unwrap_or_else(|| work.join("cache"));
    let port = free_port()?;
    let admin = new_token();
    std::fs::write(
        work.join("cloud.toml"),
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate = \"cloud.db\"\nadmin_token = \"{admin}\"\n\
             [http]\nmax_connections = {}\n",
            (args.edges + 256).max(16_384)
        ),
    )?;
    let enrol_started = Instant::now();
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["token", "create", "--prefix", "edge-", "--count", &args.edges.to_string(), "--config"])
        .arg(work.join("cloud.toml"))
        .output()
        .context("running `nereid token create`")?;
    if !out.status.success() {
        bail!("nereid token create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let enrol_ms = enrol_started.elapsed().as_secs_f64() * 1e3;
    let tokens: Vec<String> =
        String::from_utf8(out.stdout)?.lines().filter_map(|l| l.split_once(' ').map(|(_, t)| t.to_string())).collect();
    if tokens.len() != args.edges {
        bail!("nereid token create printed {} tokens for {} edges", tokens.len(), args.edges);
    }

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let url = format!("http://127.0.0.1:{port}");
    let api = Api::connect(&url, &admin, Duration::from_secs(120), &Default::default(), false)?;
    let fleet = start_cloud(work, &cache, &api, &rt)?;
    let pid = fleet.0[0].id();
    std::thread::sleep(Duration::from_millis(300));
    let base_rss = super::round::rss_kib(pid, "VmRSS:")? * 1024;

    let runtime = nereid::runtime::Runtime::new(Some(cache.clone()))?;
    let components = crate::cli::components(Some(&cache))?;
    let fedavg = crate::cli::plugin_path(&plugins, "fedavg");
    let apply = |name: &str| -> anyhow::Result<()> {
        let path = work.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[job]\nname = \"{name}\"\n\n[rounds]\nmin_clients = {n}\nfraction = 1.0\ndeadline_secs = 3600\n\n\
                 [stop]\nrounds = 1\n\n[model]\nkind = \"mlp\"\ninputs = 4\nclasses = 2\n\n[aggregator]\nplugin = {p:?}\n",
                n = args.edges,
                p = fedavg.display().to_string()
            ),
        )?;
        let job = nereid::config::job::load(&path, &runtime, &|s, b| crate::cli::fetcher(&rt, &components, s, b))?;
        rt.block_on(api.apply(job))?;
        Ok(())
    };
    let wait_for = |what: &str, done: &dyn Fn() -> anyhow::Result<bool>| -> anyhow::Result<()> {
        let started = Instant::now();
        while !done()? {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("{what}: not within 120 s; see {}", work.join("cloud.log").display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let round_open = |job: &str| -> anyhow::Result<bool> { Ok(rt.block_on(api.status(job))?.current.is_some()) };

    let start_mode = if args.modes == Modes::LongPoll { Mode::LongPoll } else { Mode::Poll };
    let shared = Arc::new(Shared {
        cloud: SocketAddr::from(([127, 0, 0, 1], port)),
        mode: tokio::sync::watch::Sender::new(start_mode),
        record: Recorder::default(),
        since: Mutex::new(Instant::now()),
        poll: Duration::from_millis(args.poll_ms),
        long_poll_secs: args.long_poll_secs,
    });
    let edges: Vec<_> = tokens.into_iter().enumerate().map(|(i, t)| rt.spawn(edge(shared.clone(), i, t))).collect();
    let progress = indicatif::ProgressBar::new_spinner();
    let phase_secs = Duration::from_secs_f64(args.secs);
    let mut phases = Vec::new();
    let n = args.edges;
    if args.modes != Modes::LongPoll {
        let wanted = Some(n as f64 * 1000.0 / args.poll_ms as f64);
        progress.set_message("plain polling, idle");
        std::thread::sleep(Duration::from_secs(2).max(shared.poll * 3));
        let m = Measure::start(pid, &shared)?;
        std::thread::sleep(phase_secs);
        phases.push(m.finish("poll, idle", pid, &shared, base_rss, n, wanted)?);
        progress.set_message("plain polling, a round open");
        apply("polled")?;
        wait_for("round 1 of job `polled` opening", &|| round_open("polled"))?;
        std::thread::sleep(Duration::from_secs(1));
        let m = Measure::start(pid, &shared)?;
        std::thread::sleep(phase_secs);
        phases.push(m.finish("poll, round open", pid, &shared, base_rss, n, wanted)?);
        rt.block_on(api.stop("polled"))?;
    }
    if args.modes != Modes::Poll {
        shared.mode.send_replace(Mode::LongPoll);
        progress.set_message("long polling, idle");
        std::thread::sleep(Duration::from_secs(2));
        let m = Measure::start(pid, &shared)?;
        std::thread::sleep(phase_secs);
        phases.push(m.finish("long poll, idle", pid, &shared, base_rss, n, None)?);

        progress.set_message("long polling: a round's tasks");
        let m = Measure::start(pid, &shared)?;
        *lock(&shared.since) = Instant::now();
        apply("held")?;
        wait_for("every edge's task", &|| Ok(shared.record.answered.load(Ordering::Relaxed) >= n))?;
        phases.push(m.finish("long poll, task to all", pid, &shared, base_rss, n, None)?);

        progress.set_message("long polling, a round open");
        let m = Measure::start(pid, &shared)?;
        std::thread::sleep(phase_secs);
        phases.push(m.finish("long poll, round open", pid, &shared, base_rss, n, None)?);

        progress.set_message("long polling: the job stopped");
        let m = Measure::start(pid, &shared)?;
        *lock(&shared.since) = Instant::now();
        rt.block_on(api.stop("held"))?;
        wait_for("every edge told the round ended", &|| Ok(shared.record.answered.load(Ordering::Relaxed) >= n))?;
        phases.push(m.finish("long poll, stop to all", pid, &shared, base_rss, n, None)?);
    }
    progress.finish_and_clear();
    shared.mode.send_replace(Mode::Done);
    for e in edges {
        e.abort();
    }
    drop(fleet);
    Ok(Report { edges: n, enrol_ms, cloud_rss_before_edges_bytes: base_rss, phases })
}
