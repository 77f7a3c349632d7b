//! `nereid bench aggregate`: FedAvg through the plugin against a native loop doing the same math
//! (f64 accumulation, one f32 result), and optionally Flower's `aggregate` (numpy), in one run.
pub mod compress;
pub mod fleet;
pub mod forgetting;
pub mod infer;
pub mod round;
pub mod serve;
pub mod split;
pub mod strategies;
pub mod swap;
pub mod trainer;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use nereid::model_io;
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{AggregatorPlugin, ClientUpdate, Limits, RoundContext, Runtime, UpdateKind};
use nereid::tensor::Tensor;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// FedAvg of N updates x M f32: plugin vs native loop (vs Flower, with --flower).
    Aggregate(AggregateBench),
    /// The cloud's cost of a round with many simulated clients (no training), and its peak RSS.
    Round(round::RoundBench),
    /// The control plane with N simulated edges (each its own token, address and connection):
    /// plain and long polling, idle and with a round open; the cloud's CPU, RSS and latency.
    Fleet(fleet::FleetBench),
    /// Every shipped aggregation strategy's round time and added peak RSS for n updates.
    Strategies(strategies::StrategiesBench),
    /// A plugin swap with the component cached and compiled, against a cold pull and first
    /// instantiation from the embedded registry.
    Swap(swap::SwapBench),
    /// A model run through a plugin and wasi-nn against ONNX Runtime called directly.
    Infer(infer::InferBench),
    /// A joint inference service under concurrent HTTP clients (one instance, a pool, JSON,
    /// batching) against ONNX Runtime called natively from as many threads, in one run.
    Serve(serve::ServeBench),
    /// Split inference through a shaped link: edge-only, cloud-only and the chosen cut at each
    /// bandwidth, against the best cut found by measuring every cut.
    Split(split::SplitBench),
    /// Model size and accuracy of the compression passes (INT8, pruning) on the digits MLP and
    /// optionally another classifier.
    Compress(compress::CompressBench),
    /// Class-incremental learning on the digits (0-4, then 5-9) with and without a replay buffer.
    Forgetting(forgetting::ForgettingBench),
    /// The trainer protocol: a model's hand-over to an external trainer and back, and a round's
    /// overhead against the same training run standalone.
    Trainer(trainer::TrainerBench),
}

#[derive(Args)]
pub struct AggregateBench {
    /// Number of client updates.
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// f32 elements per update.
    #[arg(long, default_value_t = 10_000_000)]
    elements: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// The aggregator component [default: fedavg from the plugin directory].
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Also time Flower's `flwr.server.strategy.aggregate.aggregate` (needs python3 with flwr).
    #[arg(long)]
    flower: bool,
    /// The Python with `flwr` for --flower.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Timing {
    name: String,
    median_ms: f64,
    input_gb_per_s: f64,
    ratio_to_native: f64,
}

#[derive(Serialize)]
struct Report {
    updates: usize,
    elements: usize,
    repeat: usize,
    input_bytes: usize,
    max_abs_diff_plugin_vs_native: f64,
    /// Largest |result - exact| / |exact| over elements, exact = the mean in f64.
    max_relative_error_plugin: f64,
    max_relative_error_flower: Option<f64>,
    /// The plugin's time over the time to read every input once (the memory-speed floor).
    plugin_over_read_once: f64,
    /// Flower's time over the plugin's (how many times faster the plugin is).
    flower_over_plugin: Option<f64>,
    timings: Vec<Timing>,
    flower: Option<String>,
}

/// The middle value (of a non-empty list; a NaN sorts as equal to anything).
fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// sum_k n_k * w_k in f64, and sum_k n_k: FedAvg's accumulation, in a plain loop.
fn weighted_sum(updates: &[(Vec<f32>, u64)]) -> (Vec<f64>, f64) {
    let len = updates.first().map_or(0, |u| u.0.len());
    let mut acc = vec![0f64; len];
    let mut total = 0f64;
    for (w, n) in updates {
        let n = *n as f64;
        for (a, x) in acc.iter_mut().zip(w) {
            *a += n * *x as f64;
        }
        total += n;
    }
    (acc, total)
}

/// The baseline: the same computation as the fedavg plugin, in a plain loop.
fn native_fedavg(updates: &[(Vec<f32>, u64)]) -> Vec<f32> {
    let (acc, total) = weighted_sum(updates);
    let scale = 1.0 / total;
    acc.iter().map(|a| (a * scale) as f32).collect()
}

/// The floor of any aggregation: every input element read once (summed, so the reads happen),
/// the updates split between the machine's cores.
fn read_once(updates: &[(Vec<f32>, u64)]) -> f32 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                scope.spawn(move || {
                    updates
                        .iter()
                        .map(|(w, _)| {
                            let per = w.len().div_ceil(threads);
                            let part = &w[(k * per).min(w.len())..((k + 1) * per).min(w.len())];
                            // Eight lanes, so the sum is not one long dependency chain.
                            let mut lanes = [0f32; 8];
                            for c in part.chunks_exact(8) {
                                for (l, x) in lanes.iter_mut().zip(c) {
                                    *l += x;
                                }
                            }
                            lanes.iter().sum::<f32>() + part.chunks_exact(8).remainder().iter().sum::<f32>()
                        })
                        .sum::<f32>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}

/// The weighted mean in f64 (no rounding to f32), the reference for both results.
fn exact_mean(updates: &[(Vec<f32>, u64)]) -> Vec<f64> {
    let (acc, total) = weighted_sum(updates);
    acc.iter().map(|a| a / total).collect()
}

/// Largest relative error over elements whose exact value is not tiny (|x| > 1e-3), where a
/// relative error says something.
fn max_relative_error(got: &[f32], exact: &[f64]) -> f64 {
    got.iter()
        .zip(exact)
        .filter(|(_, e)| e.abs() > 1e-3)
        .map(|(g, e)| (*g as f64 - e).abs() / e.abs())
        .fold(0.0, f64::max)
}

pub fn run(cmd: BenchCommand, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Aggregate(args) => aggregate(args, cache_dir),
        BenchCommand::Round(args) => round::run(args, cache_dir),
        BenchCommand::Fleet(args) => fleet::run(args, cache_dir),
        BenchCommand::Strategies(args) => strategies::run(args, cache_dir),
        BenchCommand::Swap(args) => swap::run(args),
        BenchCommand::Split(args) => split::run(args),
        BenchCommand::Infer(args) => infer::run(args, cache_dir),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Compress(args) => compress::run(args, cache_dir),
        BenchCommand::Forgetting(args) => forgetting::run(args, cache_dir),
        BenchCommand::Trainer(args) => trainer::run(args),
    }
}

fn aggregate(args: AggregateBench, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    if args.updates == 0 || args.elements == 0 || args.repeat == 0 {
        bail!("--updates, --elements and --repeat must be at least 1");
    }
    let plugin_path =
        args.plugin.clone().unwrap_or_else(|| crate::cli::plugin_path(&crate::cli::default_plugin_dir(), "fedavg"));
    let progress = indicatif::ProgressBar::new((args.repeat * 2) as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message("generating updates");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let data: Vec<(Vec<f32>, u64)> = (0..args.updates)
        .map(|_| ((0..args.elements).map(|_| rng.gen_range(-1.0f32..1.0)).collect(), rng.gen_range(10..1000)))
        .collect();
    // Updates reach the cloud as safetensors bytes; decoding them (outside the timings) also
    // finds, in the same pass, whether they are all finite, which the plugin's check then reads.
    progress.set_message("encoding and decoding updates");
    let tensors: Vec<ClientUpdate> = data
        .iter()
        .enumerate()
        .map(|(k, (w, n))| {
            let t = Tensor::from_f32(vec![w.len() as u64], w.clone()).expect("shape matches");
            let bytes = model_io::encode(&[("w".to_string(), t)], None).context("encoding an update")?;
            let client = format!("client-{k}");
            let tensors = model_io::decode(&bytes, std::path::Path::new(&client))?;
            Ok(ClientUpdate {
                client,
                kind: UpdateKind::Weights,
                tensors,
                num_examples: *n,
                metrics: Vec::new(),
                file: None,
            })
        })
        .collect::<anyhow::Result<_>>()?;

    let runtime = Runtime::new(cache_dir)?;
    let limits = Limits { call_timeout: Duration::from_secs(120), ..Limits::default() };
    let mut plugin = AggregatorPlugin::load(&runtime, &plugin_path, limits, &ConfigTable::new())
        .with_context(|| format!("loading {} (build it with `cargo xtask plugins`)", plugin_path.display()))?;

    let (mut native_times, mut plugin_times, mut read_times) = (Vec::new(), Vec::new(), Vec::new());
    let mut native_out = Vec::new();
    let mut plugin_out = None;
    for _ in 0..args.repeat {
        progress.set_message("reading the inputs once");
        let t = Instant::now();
        std::hint::black_box(read_once(&data));
        read_times.push(t.elapsed());

        progress.set_message("native loop");
        let t = Instant::now();
        native_out = native_fedavg(&data);
        native_times.push(t.elapsed());
        progress.inc(1);

        progress.set_message("fedavg plugin");
        let t = Instant::now();
        plugin.begin_round(&RoundContext::default(), None)?;
        for u in &tensors {
            plugin.accumulate(u)?;
        }
        let result = plugin.finish()?;
        plugin_times.push(t.elapsed());
        plugin_out = Some(result);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let plugin_out = plugin_out.context("no repetition ran")?;
    let plugin_w =
        plugin_out.tensors.first().and_then(|(_, t)| t.as_f32()).context("the plugin returned no f32 tensor")?;
    let max_diff = plugin_w.iter().zip(&native_out).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);

    let input_bytes = args.updates * args.elements * 4;
    let native = median(native_times);
    let plugin_t = median(plugin_times);
    let timing = |name: &str, d: Duration| Timing {
        name: name.to_string(),
        median_ms: d.as_secs_f64() * 1e3,
        input_gb_per_s: input_bytes as f64 / d.as_secs_f64() / 1e9,
        ratio_to_native: d.as_secs_f64() / native.as_secs_f64(),
    };
    let read = median(read_times);
    let mut timings = vec![
        timing("reading every input once (all cores)", read),
        timing("native loop (f64 accumulation)", native),
        timing("fedavg plugin (wasm + host tensor ops)", plugin_t),
    ];
    let mut flower = None;
    let mut flower_error = None;
    let mut flower_over_plugin = None;
    if args.flower {
        match time_flower(&args.python, &data, args.repeat) {
            Ok((d, values)) => {
                timings.push(timing("Flower aggregate (Python, numpy)", d));
                flower_over_plugin = Some(d.as_secs_f64() / plugin_t.as_secs_f64());
                flower_error = Some(max_relative_error(&values, &exact_mean(&data)));
            }
            Err(e) => flower = Some(format!("not measured: {e:#}")),
        }
    }
    let plugin_error = max_relative_error(plugin_w, &exact_mean(&data));
    let report = Report {
        updates: args.updates,
        elements: args.elements,
        repeat: args.repeat,
        input_bytes,
        max_abs_diff_plugin_vs_native: max_diff,
        max_relative_error_plugin: plugin_error,
        max_relative_error_flower: flower_error,
        plugin_over_read_once: plugin_t.as_secs_f64() / read.as_secs_f64(),
        flower_over_plugin,
        timings,
        flower,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "FedAvg of {} updates x {} f32 ({:.1} MB of input), median of {} runs",
        report.updates,
        report.elements,
        report.input_bytes as f64 / 1e6,
        report.repeat
    );
    println!("{:<42} {:>10} {:>10} {:>14}", "", "ms", "GB/s", "x native");
    for t in &report.timings {
        println!("{:<42} {:>10.1} {:>10.2} {:>14.3}", t.name, t.median_ms, t.input_gb_per_s, t.ratio_to_native);
    }
    if let Some(f) = &report.flower {
        println!("Flower: {f}");
    }
    println!("plugin / reading the inputs once = {:.2}", report.plugin_over_read_once);
    if let Some(r) = report.flower_over_plugin {
        println!("Flower / plugin = {r:.2}");
    }
    println!("max |plugin - native| = {:e}", report.max_abs_diff_plugin_vs_native);
    println!("max relative error vs the exact (f64) mean: plugin {:.1e}", report.max_relative_error_plugin);
    if let Some(e) = report.max_relative_error_flower {
        println!("max relative error vs the exact (f64) mean: Flower {e:.1e} (it accumulates in float32)");
    }
    Ok(())
}

const FLOWER_SCRIPT: &str = r#"
import sys, time, numpy as np
from flwr.server.strategy.aggregate import aggregate
path, count, elements, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
counts = [int(x) for x in sys.argv[5].split(",")]
raw = np.fromfile(path, dtype="<f4").reshape(count, elements)
results = [([raw[k]], counts[k]) for k in range(count)]
times = []
for _ in range(repeat):
    t = time.perf_counter()
    out = aggregate(results)
    times.append(time.perf_counter() - t)
times.sort()
np.asarray(out[0], dtype="<f4").tofile(path + ".out")
print(times[len(times) // 2])
"#;

/// Times Flower's `aggregate` on the same updates in a Python subprocess; returns the median
/// time and Flower's result.
fn time_flower(
    python: &std::path::Path,
    data: &[(Vec<f32>, u64)],
    repeat: usize,
) -> anyhow::Result<(Duration, Vec<f32>)> {
    let dir = std::env::temp_dir().join(format!("nereid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("updates.f32");
    let mut bytes = Vec::with_capacity(data.iter().map(|d| d.0.len() * 4).sum());
    for (w, _) in data {
        bytes.extend(w.iter().flat_map(|x| x.to_le_bytes()));
    }
    std::fs::write(&path, &bytes)?;
    drop(bytes);
    let counts: Vec<String> = data.iter().map(|d| d.1.to_string()).collect();
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(FLOWER_SCRIPT)
        .arg(&path)
        .arg(data.len().to_string())
        .arg(data.first().map_or(0, |d| d.0.len()).to_string())
        .arg(repeat.to_string())
        .arg(counts.join(","))
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let result = std::fs::read(path.with_extension("f32.out"));
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!("python3 with flwr failed (pip install flwr): {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("reading Flower's timing")?;
    let result = result.context("reading Flower's result")?;
    let values = result.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((Duration::from_secs_f64(secs), values))
}
