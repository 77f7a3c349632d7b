//! `nereid bench forgetting`: class-incremental learning on the digits, with and without a
//! replay buffer. A 64-128-10 MLP learns classes 0-4, then only samples of 5-9 arrive; it is
//! fine-tuned on them alone, or on them plus a draw from the replay buffer (the replay-buffer
//! plugin deciding what to keep of the first phase's samples, their bytes in an edge store).
//! Reported: accuracy on the old classes and on all classes after the second phase.
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use serde::Serialize;

use nereid::edge::replay::{batch_of, to_dataset, ReplayBuffer};

use nereid::model_io::NamedTensors;
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{Limits, RoundContext, Runtime, SamplerPlugin};
use nereid::store::EdgeStore;
use nereid::train::{self, Dataset, ModelSpec, OptimizerKind, TrainParams};

#[derive(Args)]
pub struct ForgettingBench {
    /// Places in the replay buffer.
    #[arg(long, default_value_t = 200)]
    capacity: u64,
    /// The buffer's policy: reservoir or class-balanced.
    #[arg(long, default_value = "class-balanced")]
    policy: String,
    /// Epochs of each phase.
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    /// Runs with seeds seed, seed+1, ...; figures are their means.
    #[arg(long, default_value_t = 5)]
    runs: u64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The sampler [default: replay-buffer from the plugin directory].
    #[arg(long, value_name = "WASM")]
    plugin: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Default, Clone, Copy)]
struct Accuracies {
    /// On the test samples of classes 0-4.
    old: f64,
    /// On the test samples of classes 5-9.
    new: f64,
    all: f64,
}

#[derive(Serialize)]
struct Report {
    runs: u64,
    capacity: u64,
    policy: String,
    /// After learning classes 0-4.
    first_phase: Accuracies,
    without_replay: Accuracies,
    with_replay: Accuracies,
    /// Replayed samples per class in the second phase (first run).
    replayed_per_class: Vec<u64>,
}

fn accuracies(spec: &ModelSpec, model: &NamedTensors, test: &Dataset) -> anyhow::Result<Accuracies> {
    Ok(Accuracies {
        old: train::evaluate(spec, model, &test.of_classes(0..5))?.accuracy,
        new: train::evaluate(spec, model, &test.of_classes(5..10))?.accuracy,
        all: train::evaluate(spec, model, test)?.accuracy,
    })
}

fn run_once(args: &ForgettingBench, runtime: &Runtime, plugin: &std::path::Path, seed: u64) -> anyhow::Result<Report> {
    let (train_set, test_set) = Dataset::digits().holdout(0.2, seed);
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![crate::cli::demo::DIGITS_MLP_HIDDEN], classes: 10 };
    let params =
        TrainParams { epochs: args.epochs, batch_size: 16, learning_rate: 0.05, optimizer: OptimizerKind::Sgd };
    let (old, new) = (train_set.of_classes(0..5), train_set.of_classes(5..10));
    let first = train::train(&spec, &spec.init(seed), &old, &params, seed, None, |_, _| {})?.model;

    // The first phase's samples went through the replay buffer as they arrived.
    let dir = tempfile::tempdir()?;
    let store = Arc::new(EdgeStore::open(&dir.path().join("edge.db"))?);
    let mut config = ConfigTable::new();
    config.insert("policy".into(), toml::Value::String(args.policy.clone()));
    config.insert("capacity".into(), toml::Value::Integer(args.capacity as i64));
    config.insert("seed".into(), toml::Value::Integer(seed as i64));
    let sampler = SamplerPlugin::load(runtime, plugin, Limits::default(), &config)?;
    let buffer = ReplayBuffer::new(sampler, store)?;
    let (x, y) = batch_of(&old);
    buffer.offer(&x, &y, nereid::edge::replay::Origin::Unnamed)?;
    let ctx = RoundContext { job: "forgetting".into(), round: 1, seed };
    let replay = to_dataset(&buffer.draw(&ctx, args.capacity as u32)?, 64)?;
    let mut with = new.clone();
    with.x.extend_from_slice(&replay.x);
    with.y.extend_from_slice(&replay.y);

    let without_model = train::train(&spec, &first, &new, &params, seed + 1, None, |_, _| {})?.model;
    let with_model = train::train(&spec, &first, &with, &params, seed + 1, None, |_, _| {})?.model;
    Ok(Report {
        runs: 1,
        capacity: args.capacity,
        policy: args.policy.clone(),
        first_phase: accuracies(&spec, &first, &test_set)?,
        without_replay: accuracies(&spec, &without_model, &test_set)?,
        with_replay: accuracies(&spec, &with_model, &test_set)?,
        replayed_per_class: (0..10).map(|c| replay.y.iter().filter(|&&y| y == c).count() as u64).collect(),
    })
}

pub fn run(args: ForgettingBench, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let plugin = args
        .plugin
        .clone()
        .unwrap_or_else(|| crate::cli::plugin_path(&crate::cli::default_plugin_dir(), "replay-buffer"));
    let runtime = Runtime::new(cache_dir)?;
    let reports: Vec<Report> = (args.seed..args.seed + args.runs.max(1))
        .map(|s| run_once(&args, &runtime, &plugin, s))
        .collect::<anyhow::Result<_>>()?;
    let n = reports.len() as f64;
    let mean = |f: &dyn Fn(&Report) -> Accuracies| {
        let sum = reports.iter().map(f).fold(Accuracies::default(), |a, b| Accuracies {
            old: a.old + b.old,
            new: a.new + b.new,
            all: a.all + b.all,
        });
        Accuracies { old: sum.old / n, new: sum.new / n, all: sum.all / n }
    };
    let report = Report {
        runs: reports.len() as u64,
        capacity: args.capacity,
        policy: args.policy.clone(),
        first_phase: mean(&|r| r.first_phase),
        without_replay: mean(&|r| r.without_replay),
        with_replay: mean(&|r| r.with_replay),
        replayed_per_class: reports[0].replayed_per_class.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "class-incremental digits: classes 0-4, then 5-9; replay buffer {} ({} places); mean of {} runs",
        report.policy, report.capacity, report.runs
    );
    println!("{:<34} {:>12} {:>12} {:>12}", "", "old (0-4)", "new (5-9)", "all");
    for (label, a) in [
        ("after 0-4", report.first_phase),
        ("after 5-9, new samples only", report.without_replay),
        ("after 5-9, new + replay buffer", report.with_replay),
    ] {
        println!("{label:<34} {:>12.4} {:>12.4} {:>12.4}", a.old, a.new, a.all);
    }
    println!("replayed per class (first run): {:?}", report.replayed_per_class);
    Ok(())
}
