//! `nereid demo`: federated learning on loopback. One cloud and three edge hosts (separate
//! processes of this binary) train an MLP on the UCI digits split non-IID among the edges: with
//! FedAvg, with FedAvg and updates compressed to INT8, with FedAvg and top-k 10% updates, then
//! with FedProx; every committed global model is evaluated on a held-out test set the edges
//! never see. The plugins are pushed to the embedded OCI registry first, and the
//! jobs name them by `oci://` reference: the cloud pins each to a digest, every edge pulls it.
pub mod fleet;
pub mod plugins;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use nereid::model_io;
use nereid::protocol::new_token;
use nereid::runtime::Runtime;
use nereid::train::{self, Dataset, ModelSpec};

use fleet::{free_port, spawn, start_cloud, start_registry};
use nereid::client::CloudClient as Api;

/// Hidden units of the demo's digits MLP (64 -> 128 -> 10): large enough that an INT8 model or
/// update is not dominated by its fixed overhead (names, scales, biases).
pub const DIGITS_MLP_HIDDEN: usize = 128;

#[derive(Args)]
pub struct DemoArgs {
    /// Rounds per strategy.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Dirichlet concentration of the non-IID split (smaller: more skewed).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// FedProx's mu.
    #[arg(long, default_value_t = 0.01)]
    mu: f64,
    /// Seed of the split, the initial model and the training.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of edge hosts.
    #[arg(long, default_value_t = 3)]
    edges: usize,
    /// Directory for the configs, data, state and logs [default: a temporary directory].
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Directory of the built plugins [default: $NEREID_PLUGIN_DIR, else target/wasm32-wasip2/plugin].
    #[arg(long, value_name = "DIR")]
    plugins_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct NodeData {
    name: String,
    train: usize,
    test: usize,
    class_counts: Vec<usize>,
}

#[derive(Serialize)]
struct RoundRow {
    round: u32,
    accuracy: f64,
    loss: f64,
    participants: usize,
    bytes_up: u64,
    bytes_down: u64,
}

#[derive(Serialize)]
struct StrategyRun {
    strategy: String,
    rounds: Vec<RoundRow>,
    final_accuracy: f64,
    seconds: f64,
    status: String,
}

#[derive(Serialize)]
struct Report {
    /// The embedded registry's address, and the pinned reference of each plugin pushed to it.
    registry: String,
    components: Vec<String>,
    alpha: f64,
    held_out_test_examples: usize,
    nodes: Vec<NodeData>,
    runs: Vec<StrategyRun>,
}

pub fn run(args: DemoArgs, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let work = args.workdir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let plugins = args.plugins_dir.clone().unwrap_or_else(crate::cli::default_plugin_dir);
    let cache = cache_dir.unwrap_or_else(|| work.join("cache"));

    // Data: 20% of the digits held out for evaluation; the rest split non-IID among the edges,
    // each edge keeping 20% of its share as its local test split.
    let (pool, held_out) = Dataset::digits().holdout(0.2, args.seed);
    let mut nodes = Vec::new();
    for (i, part) in pool.dirichlet_split(args.edges, args.alpha, args.seed).into_iter().enumerate() {
        let name = format!("edge-{}", i + 1);
        let (train_set, test_set) = part.holdout(0.2, args.seed + i as u64);
        let dir = work.join(&name).join("data");
        std::fs::create_dir_all(&dir)?;
        train_set.write_csv(&dir.join("train.csv"))?;
        test_set.write_csv(&dir.join("test.csv"))?;
        let class_counts = (0..10).map(|c| part.y.iter().filter(|y| **y == c).count()).collect();
        nodes.push(NodeData { name, train: train_set.len(), test: test_set.len(), class_counts });
    }

    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let admin = new_token();
    let mut cloud_toml =
        format!("listen = \"127.0.0.1:{port}\"\nstate = \"cloud.db\"\nadmin_token = \"{admin}\"\nonline_secs = 5\n");
    let mut edge_configs = Vec::new();
    for n in &nodes {
        let token = new_token();
        cloud_toml.push_str(&format!("\n[nodes.{}]\ntoken = \"{token}\"\n", n.name));
        let path = work.join(&n.name).join("edge.toml");
        // Each edge has caches of its own, as on separate machines: it pulls the plugins itself.
        std::fs::write(
            &path,
            format!("name = \"{}\"\ncloud = \"{url}\"\ntoken = \"{token}\"\ndata = \"data\"\nstate = \"edge.db\"\npoll_ms = 100\n", n.name),
        )?;
        edge_configs.push(path);
    }
    std::fs::write(work.join("cloud.toml"), cloud_toml)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let api = Api::new(&url, &admin, std::time::Duration::from_secs(120))?;
    let (registry, host) = start_registry(&work.join("registry"), &work.join("registry.log"))?;
    let mut fleet = start_cloud(&work, &cache, &api, &rt)?;
    fleet.0.push(registry);
    for (n, cfg) in nodes.iter().zip(&edge_configs) {
        let edge_cache = work.join(&n.name).join("cache");
        fleet.0.push(spawn("edge", cfg, &work.join(format!("{}.log", n.name)), &edge_cache)?);
    }
    let components = crate::cli::components(Some(&cache))?;
    let mut pushed = Vec::new();
    for plugin_name in ["fedavg", "fedprox", "quantize"] {
        let bytes = std::fs::read(crate::cli::plugin_path(&plugins, plugin_name))
            .map_err(|e| anyhow::anyhow!("{plugin_name}: {e}; build the plugins with `cargo xtask plugins`"))?;
        let reference = nereid_registry::Reference::parse(&format!("oci://{host}/nereid/{plugin_name}:0.1.0"))?;
        let p = rt.block_on(components.client().push(bytes, &reference, None))?;
        pushed.push(p.reference);
    }

    if !args.json {
        println!(
            "nereid demo: 1 cloud + {} edges on {url}, UCI digits split non-IID (Dirichlet alpha {})",
            nodes.len(),
            args.alpha
        );
        for n in &nodes {
            println!("  {}: {} train / {} test examples, per class {:?}", n.name, n.train, n.test, n.class_counts);
        }
        println!("  held-out test set: {} examples; work directory {}", held_out.len(), work.display());
        println!("  plugins pushed to the embedded OCI registry on {host}; each edge pulls them itself:");
        for p in &pushed {
            println!("    {p}");
        }
    }

    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![DIGITS_MLP_HIDDEN], classes: 10 };
    let runtime = Runtime::new(Some(cache.clone()))?;
    let mut runs = Vec::new();
    // (run name, strategy, the compressor's `update` coding)
    let plan = [
        ("fedavg", "fedavg", None),
        ("fedavg+int8", "fedavg", Some("int8")),
        ("fedavg+top-k", "fedavg", Some("top-k")),
        ("fedprox", "fedprox", None),
    ];
    for (run, strategy, coding) in plan {
        let plugin = format!("oci://{host}/nereid/{strategy}:0.1.0");
        let objective =
            if strategy == "fedprox" { format!("\n[client_objective]\nplugin = {plugin:?}\n") } else { String::new() };
        let config =
            if strategy == "fedprox" { format!("\n[aggregator.config]\nmu = {}\n", args.mu) } else { String::new() };
        let compressor = match coding {
            Some(c) => format!(
                "\n[compressor]\nplugin = \"oci://{host}/nereid/quantize:0.1.0\"\n[compressor.config]\nupdate = {c:?}\ntop_k_fraction = 0.1\n"
            ),
            None => String::new(),
        };
        let job = format!(
            "[job]\nname = \"digits-{name}\"\nseed = {seed}\n\n[rounds]\nmin_clients = {n}\nfraction = 1.0\ndeadline_secs = 60\n\n\
             [stop]\nrounds = {rounds}\n\n[model]\nkind = \"mlp\"\ninputs = 64\nhidden = [{hidden}]\nclasses = 10\n\n\
             [training]\nepochs = 2\nbatch_size = 16\nlearning_rate = 0.1\noptimizer = \"sgd\"\n\n\
             [aggregator]\nplugin = {plugin:?}\n{config}{objective}{compressor}",
            name = run.replace('+', "-"),
            seed = args.seed,
            n = nodes.len(),
            rounds = args.rounds,
            hidden = DIGITS_MLP_HIDDEN,
        );
        let strategy = run;
        let job_path = work.join(format!("{}.toml", strategy.replace('+', "-")));
        std::fs::write(&job_path, job)?;
        let loaded =
            nereid::config::job::load(&job_path, &runtime, &|s, b| crate::cli::fetcher(&rt, &components, s, b))?;
        let name = loaded.spec.name.clone();
        let t0 = Instant::now();
        rt.block_on(api.apply(loaded))?;
        if !args.json {
            println!("\n{strategy}: round  accuracy  loss    participants  bytes up  bytes down");
        }
        let mut rows: Vec<RoundRow> = Vec::new();
        let status = loop {
            let status = rt.block_on(api.status(&name))?;
            let seen = rows.len();
            for h in status.history.iter().filter(|h| h.round as usize > seen) {
                let bytes = rt.block_on(api.model(&name, h.round))?;
                let model = model_io::decode(&bytes, Path::new("global model"))?;
                let eval = train::evaluate(&spec, &model, &held_out)?;
                let row = RoundRow {
                    round: h.round,
                    accuracy: eval.accuracy,
                    loss: eval.loss,
                    participants: h.participants.len(),
                    bytes_up: h.bytes_up,
                    bytes_down: h.bytes_down,
                };
                if !args.json {
                    println!(
                        "{:>15} {:>9.4} {:>7.4} {:>13} {:>9} {:>11}",
                        row.round, row.accuracy, row.loss, row.participants, row.bytes_up, row.bytes_down
                    );
                }
                rows.push(row);
            }
            if status.status != "running" && rows.len() as u32 >= status.rounds_done {
                break status;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("job {name} did not finish in 10 minutes; see the logs in {}", work.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if status.status != "done" {
            bail!("job {name} ended {}: {}", status.status, status.reason.unwrap_or_default());
        }
        runs.push(StrategyRun {
            strategy: strategy.into(),
            final_accuracy: rows.last().map_or(0.0, |r| r.accuracy),
            seconds: t0.elapsed().as_secs_f64(),
            rounds: rows,
            status: status.status,
        });
    }
    drop(fleet);

    let report = Report {
        registry: host,
        components: pushed,
        alpha: args.alpha,
        held_out_test_examples: held_out.len(),
        nodes,
        runs,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "\n{:<13} {:>7} {:>15} {:>9} {:>14} {:>12}",
        "run", "rounds", "final accuracy", "seconds", "KB uploaded", "vs fedavg"
    );
    let uploaded = |r: &StrategyRun| r.rounds.iter().map(|x| x.bytes_up).sum::<u64>();
    let baseline = report.runs.first().map_or(1, uploaded).max(1);
    for r in &report.runs {
        let up = uploaded(r);
        println!(
            "{:<13} {:>7} {:>15.4} {:>9.1} {:>14.1} {:>11.2}x",
            r.strategy,
            r.rounds.len(),
            r.final_accuracy,
            r.seconds,
            up as f64 / 1e3,
            baseline as f64 / up.max(1) as f64
        );
    }
    Ok(())
}
