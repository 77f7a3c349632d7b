//! `nereid cloud`, `nereid edge`, `nereid job ...` and `nereid token create`.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use nereid::config::{read_config, CloudConfig, EdgeConfig, IoScheduling};
use nereid::protocol::{new_token, token_sha256, JobStatus};
use nereid::runtime::Runtime;
use nereid::store::CloudStore;

use nereid::client::CloudClient as Api;

fn tokio() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// The edge's runtime: `io_threads` workers (else one per core), run under `io_scheduling`.
fn edge_tokio(cfg: &EdgeConfig) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.io_threads {
        builder.worker_threads(n);
    }
    // Other systems are refused when edge.toml is read.
    if cfg.io_scheduling == IoScheduling::Batch {
        builder.on_thread_start(batch_scheduling);
    }
    Ok(builder.enable_all().build()?)
}

/// Puts the calling thread under SCHED_BATCH: woken, it waits for the scheduler's tick instead
/// of preempting a running model.
fn batch_scheduling() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: changes only the calling thread's (pid 0's) scheduling policy; `param` outlives
        // the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            tracing::warn!("io_scheduling = \"batch\": {}", std::io::Error::last_os_error());
        }
    }
}

pub fn cloud(config: PathBuf, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (cfg, base): (CloudConfig, _) = read_config(&config)?;
    let registry_cache = nereid::components::Components::cache_root(cache_dir.as_deref());
    tokio()?.block_on(nereid::cloud::serve(cfg, &base, cache_dir, registry_cache))
}

pub fn edge(config: PathBuf, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (cfg, base): (EdgeConfig, _) = read_config(&config)?;
    let registry_cache = nereid::components::Components::cache_root(cache_dir.as_deref());
    edge_tokio(&cfg)?.block_on(nereid::edge::run(cfg, &base, cache_dir, registry_cache))
}

#[derive(Args)]
pub struct CloudArgs {
    /// The cloud's base URL.
    #[arg(long, env = "NEREID_CLOUD", default_value = "http://127.0.0.1:7000")]
    cloud: String,
    /// The operator (admin) token.
    #[arg(long, env = "NEREID_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM CA certificates to trust for an https:// cloud (else the system's).
    #[arg(long, env = "NEREID_CA", value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Plain HTTP to a cloud that is not on loopback (refused otherwise).
    #[arg(long, env = "NEREID_ALLOW_PLAINTEXT")]
    allow_plaintext: bool,
}

impl CloudArgs {
    fn api(&self) -> anyhow::Result<Api> {
        let tls = nereid_net::tls::ClientTls { ca: self.ca.clone(), cert: None, key: None };
        Ok(Api::connect(&self.cloud, &self.token, std::time::Duration::from_secs(120), &tls, self.allow_plaintext)?)
    }
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// Validate a job file (keys, types, ranges, plugins and their configs) and start it; for a
    /// running job of that name, swap in its new plugins at the next round boundary.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        cloud: CloudArgs,
        /// Only validate; do not contact the cloud.
        #[arg(long)]
        dry_run: bool,
    },
    /// The jobs on the cloud.
    List {
        #[command(flatten)]
        cloud: CloudArgs,
        #[arg(long)]
        json: bool,
    },
    /// A job's round, participants, per-node state and metric history (the newest 1,000 rounds
    /// unless --from / --limit ask for another page).
    Status {
        name: String,
        #[command(flatten)]
        cloud: CloudArgs,
        #[arg(long)]
        json: bool,
        /// The history from this round on (oldest first).
        #[arg(long)]
        from: Option<u32>,
        /// At most this many rounds of history (1 to 10,000; default 1,000).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Stop a job after its current round.
    Stop {
        name: String,
        #[command(flatten)]
        cloud: CloudArgs,
    },
}

pub fn job(cmd: JobCommand, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let rt = tokio()?;
    match cmd {
        JobCommand::Apply { file, cloud, dry_run } => {
            let components = super::components(cache_dir.as_deref())?;
            let runtime = Runtime::new(cache_dir)?;
            let loaded = nereid::config::job::load(&file, &runtime, &|s, b| super::fetcher(&rt, &components, s, b))?;
            if dry_run {
                println!("{}: valid", file.display());
                return Ok(());
            }
            let api = cloud.api()?;
            let s = rt.block_on(api.apply(loaded))?;
            println!("job `{}` applied: {} ({} rounds at most)", s.name, s.status, s.max_rounds);
            if let Some(note) = &s.note {
                println!("{note}");
            }
        }
        JobCommand::List { cloud, json } => {
            let jobs = rt.block_on(cloud.api()?.jobs())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                println!("{:<24} {:<9} {:>7}", "job", "status", "rounds");
                for j in jobs {
                    println!("{:<24} {:<9} {:>3}/{:<3}", j.name, j.status, j.rounds_done, j.max_rounds);
                }
            }
        }
        JobCommand::Status { name, cloud, json, from, limit } => {
            let status = rt.block_on(cloud.api()?.status_page(&name, from, limit))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        JobCommand::Stop { name, cloud } => {
            let s = rt.block_on(cloud.api()?.stop(&name))?;
            println!("job `{}`: {}", s.name, s.status);
        }
    }
    Ok(())
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

pub fn print_status(s: &JobStatus) {
    println!("job        {}", s.name);
    println!("status     {}{}", s.status, s.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default());
    println!("rounds     {}/{}", s.rounds_done, s.max_rounds);
    println!("aggregator {}", s.aggregator);
    if let Some(o) = &s.client_objective {
        println!("objective  {o}");
    }
    if let Some(c) = &s.compressor {
        println!("compressor {c}");
    }
    println!("uploaded   {} bytes of updates in {} closed rounds", s.bytes_up_total, s.rounds_done);
    if let Some(p) = s.history.iter().rev().find_map(|h| h.privacy.as_ref()) {
        println!(
            "privacy    epsilon {:.4} at delta {} (noise multiplier {}, sampling rate {:.3})",
            p.epsilon, p.delta, p.noise_multiplier, p.sampling_rate
        );
    }
    if s.swap_pending {
        println!("swap       new plugins take over at the next round boundary");
    }
    for w in &s.swaps {
        match &w.error {
            None => println!("swapped    {} before round {}: {} -> {}", w.slot, w.round, w.from, w.to),
            Some(e) => println!("refused    {} before round {}: {} (kept {}): {e}", w.slot, w.round, w.to, w.from),
        }
    }
    if let Some(c) = &s.current {
        println!("round {}    selected {}; received {}", c.round, c.selected.join(", "), c.received.join(", "));
    }
    println!("nodes");
    for n in &s.nodes {
        println!("  {:<16} {}", n.name, n.state);
    }
    println!(
        "{:>5} {:>12} {:>9} {:>9} {:>10} {:>10} {:>10}  closed by",
        "round", "participants", "accuracy", "loss", "examples", "bytes up", "bytes down"
    );
    for h in &s.history {
        println!(
            "{:>5} {:>12} {:>9} {:>9} {:>10} {:>10} {:>10}  {}",
            h.round,
            h.participants.len(),
            opt(h.accuracy),
            opt(h.loss),
            h.examples,
            h.bytes_up,
            h.bytes_down,
            h.closed_by
        );
    }
    if let Some(next) = s.history_next {
        println!("(more rounds: --from {next})");
    }
    // The trainers' own metrics of the last round (names checked by the cloud: printable as is).
    if let Some(h) = s.history.last().filter(|h| !h.trainer_metrics.is_empty()) {
        let shown: Vec<String> = h.trainer_metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        println!("trainers   round {}: {}", h.round, shown.join(", "));
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue bearer tokens for nodes (stored hashed in the cloud's state; printed once). One node:
    /// its token. Several (names, or `--count`): one `<node> <token>` line each, all made in one
    /// transaction, which is how a fleet is enrolled.
    Create {
        /// The nodes' names.
        nodes: Vec<String>,
        /// Also nodes PREFIX0001 .. PREFIX<COUNT> (numbered from 1, zero-padded to COUNT's width).
        #[arg(long, requires = "prefix")]
        count: Option<usize>,
        #[arg(long, requires = "count")]
        prefix: Option<String>,
        /// The cloud's configuration (for its state database).
        #[arg(long)]
        config: PathBuf,
        /// Print `[{"node": ..., "token": ...}]`.
        #[arg(long)]
        json: bool,
    },
}

/// Most nodes enrolled by one `nereid token create`.
const MAX_ENROLMENT: usize = 1_000_000;

pub fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { mut nodes, count, prefix, config, json } => {
            if let (Some(count), Some(prefix)) = (count, &prefix) {
                if count == 0 || count > MAX_ENROLMENT {
                    anyhow::bail!("--count must be 1 to {MAX_ENROLMENT}");
                }
                let width = count.to_string().len();
                nodes.extend((1..=count).map(|i| format!("{prefix}{i:0width$}")));
            }
            if nodes.is_empty() {
                anyhow::bail!("name the nodes, or give --prefix and --count");
            }
            if nodes.len() > MAX_ENROLMENT {
                anyhow::bail!("{} nodes: at most {MAX_ENROLMENT} at once", nodes.len());
            }
            let mut seen = std::collections::HashSet::new();
            for node in &nodes {
                nereid::names::check(nereid::names::Kind::Node, node)?;
                if !seen.insert(node.as_str()) {
                    anyhow::bail!("node `{node}` is named twice");
                }
            }
            let (cfg, base): (CloudConfig, _) = read_config(&config)?;
            let store = CloudStore::open(&base.join(&cfg.state)).context("opening the cloud's state")?;
            let tokens: Vec<String> = nodes.iter().map(|_| new_token()).collect();
            let hashed: Vec<(String, String)> =
                nodes.iter().zip(&tokens).map(|(n, t)| (n.clone(), token_sha256(t))).collect();
            store.set_node_tokens(&hashed)?;
            if json {
                let out: Vec<_> =
                    nodes.iter().zip(&tokens).map(|(n, t)| serde_json::json!({ "node": n, "token": t })).collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if nodes.len() == 1 {
                println!("{}", tokens[0]);
            } else {
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for (n, t) in nodes.iter().zip(&tokens) {
                    writeln!(out, "{n} {t}")?;
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}
