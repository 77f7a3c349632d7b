//! `nereid bench strategies`: every shipped aggregation strategy's round time for n updates of m
//! f32 parameters, read from files as the cloud reads stored uploads, and the peak RSS a round
//! adds (the process's high-water mark reset before each round).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use nereid::aggregate::run_round;
use nereid::model_io;
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{AggregatorPlugin, ClientUpdate, Limits, RoundContext, Runtime, UpdateKind};
use nereid::tensor::Tensor;

#[derive(Args)]
pub struct StrategiesBench {
    /// Update counts to run each strategy with.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    updates: Vec<usize>,
    /// f32 parameters per update.
    #[arg(long, default_value_t = 1_000_000)]
    elements: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    strategy: String,
    updates: usize,
    median_ms: f64,
    /// Peak RSS during a round above the RSS before it, in MB.
    peak_rss_added_mb: f64,
}

/// The strategies and the options they run with (Byzantine tolerance where it applies).
fn strategies(n: usize) -> Vec<(&'static str, Vec<(&'static str, toml::Value)>)> {
    let f = ((n - 3) / 4).min(2) as i64;
    vec![
        ("fedavg", vec![]),
        ("fedavgm", vec![("server_momentum", toml::Value::Float(0.9))]),
        ("fedadagrad", vec![]),
        ("fedadam", vec![]),
        ("fedyogi", vec![]),
        ("fedmedian", vec![]),
        ("fedtrimmedavg", vec![("beta", toml::Value::Float(0.2))]),
        ("krum", vec![("num_malicious_clients", toml::Value::Integer(f))]),
        (
            "krum",
            vec![("num_malicious_clients", toml::Value::Integer(f)), ("num_clients_to_keep", toml::Value::Integer(3))],
        ),
        ("bulyan", vec![("num_malicious_clients", toml::Value::Integer(f))]),
        (
            "dp-fixed-clipping",
            vec![("noise_multiplier", toml::Value::Float(1.0)), ("clipping_norm", toml::Value::Float(1.0))],
        ),
    ]
}

fn rss(field: &str) -> anyhow::Result<u64> {
    super::round::rss_kib(std::process::id(), field).map(|k| k * 1024)
}

pub fn run(args: StrategiesBench, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::new(cache_dir)?;
    let limits = Limits { call_timeout: Duration::from_secs(600), ..Limits::default() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let global = vec![(
        "w".to_string(),
        Tensor::from_f32(vec![args.elements as u64], vec![0.0; args.elements]).context("global")?,
    )];
    let mut rows = Vec::new();
    for &n in &args.updates {
        let files: Vec<(PathBuf, u64)> = (0..n)
            .map(|k| {
                let w: Vec<f32> = (0..args.elements).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let path = dir.path().join(format!("u{k}.safetensors"));
                let t = Tensor::from_f32(vec![args.elements as u64], w).context("update")?;
                model_io::write(&path, &[("w".to_string(), t)], None)?;
                Ok((path, rng.gen_range(10..1000)))
            })
            .collect::<anyhow::Result<_>>()?;
        for (name, config) in strategies(n) {
            let config: ConfigTable = config.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let path = crate::cli::plugin_path(&crate::cli::default_plugin_dir(), name);
            let mut plugin = AggregatorPlugin::load(&runtime, &path, limits, &config)
                .with_context(|| format!("loading {} (build it with `cargo xtask plugins`)", path.display()))?;
            let label = match config.get("num_clients_to_keep") {
                Some(m) => format!("{name} (multi, m = {m})"),
                None => name.to_string(),
            };
            let (mut times, mut peak) = (Vec::new(), 0u64);
            for _ in 0..args.repeat {
                // Resets the high-water mark to the current RSS (Linux).
                std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")?;
                let before = rss("VmRSS:")?;
                let t = Instant::now();
                let load = |i: usize| {
                    let (file, examples) = &files[i];
                    let tensors = model_io::read(file).map_err(|e| nereid::aggregate::Rejection {
                        update: file.display().to_string(),
                        reason: e.to_string(),
                    })?;
                    Ok(ClientUpdate {
                        client: format!("client-{i}"),
                        kind: UpdateKind::Weights,
                        tensors,
                        num_examples: *examples,
                        metrics: Vec::new(),
                        file: Some(file.clone()),
                    })
                };
                let ctx = RoundContext { job: "bench".into(), round: 1, seed: 7 };
                let report = run_round(&mut plugin, &ctx, Some(&global), n, load)?;
                times.push(t.elapsed());
                std::hint::black_box(report);
                peak = peak.max(rss("VmHWM:")?.saturating_sub(before));
            }
            rows.push(Row {
                strategy: label,
                updates: n,
                median_ms: super::median(times).as_secs_f64() * 1e3,
                peak_rss_added_mb: peak as f64 / 1e6,
            });
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("one round of n updates x {} f32 (read from files), median of {}", args.elements, args.repeat);
    println!("{:<28} {:>6} {:>12} {:>18}", "strategy", "n", "ms", "peak RSS added MB");
    for r in &rows {
        println!("{:<28} {:>6} {:>12.1} {:>18.1}", r.strategy, r.updates, r.median_ms, r.peak_rss_added_mb);
    }
    Ok(())
}
