//! `nereid bench trainer`: what the trainer protocol costs. (1) The hand-over of a model to an
//! external trainer and back: bytes and time for a model of `--handover-params` f32, the trainer
//! returning what it got. (2) The overhead per round: the same NumPy training work (least-squares
//! SGD on a `--params` weight, calibrated to `--train-secs`) timed standalone in Python and
//! through the protocol (send, decode, train, encode, return, check), in one run.
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::median;

use nereid::config::edge::TrainerConfig;
use nereid::model_io::{self, NamedTensors};
use nereid::tensor::Tensor;
use nereid::trainer::{ExternalTrainer, FitRequest, TaskInfo};

const SCRIPT: &str = include_str!("trainer_bench.py");

#[derive(Args)]
pub struct TrainerBench {
    /// The Python with numpy, safetensors and clients/python installed (`cargo xtask test`
    /// makes target/py).
    #[arg(long, default_value = "target/py/bin/python")]
    python: PathBuf,
    /// Parameters of the model handed over and back.
    #[arg(long, default_value_t = 10_000_000)]
    handover_params: usize,
    /// Parameters of the model trained in the overhead measurement (a square weight).
    #[arg(long, default_value_t = 1_000_000)]
    params: usize,
    /// Seconds of training work per round in the overhead measurement.
    #[arg(long, default_value_t = 1.0)]
    train_secs: f64,
    /// Train with PyTorch instead of NumPy (`--python` must have torch: target/py-torch).
    #[arg(long)]
    torch: bool,
    /// Timed rounds of each kind, after one warm-up; medians are reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    framework: &'static str,
    handover_params: usize,
    /// Bytes of the model each way (safetensors).
    handover_bytes_each_way: usize,
    /// Median time of a fit that returns its input, minus the trainer's own time in it.
    handover_ms: f64,
    params: usize,
    steps: u64,
    standalone_median_s: f64,
    through_protocol_median_s: f64,
    /// through / standalone - 1 (separate processes and times: a few percent of noise).
    overhead_vs_standalone: f64,
    /// Median over the rounds of (the edge's time for the round / the trainer's own time
    /// training in it) - 1: the protocol's cost measured within each round.
    overhead_per_round: f64,
}

fn model(params: usize, rows: usize) -> NamedTensors {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let cols = params / rows;
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-0.1..0.1)).collect();
    vec![
        ("b".to_string(), Tensor::from_f32(vec![rows as u64], vec![0.0; rows]).expect("shape")),
        ("w".to_string(), Tensor::from_f32(vec![rows as u64, cols as u64], w).expect("shape")),
    ]
}

fn task(round: u32) -> TaskInfo {
    TaskInfo {
        job: "bench".into(),
        round,
        node: "bench".into(),
        seed: round as u64,
        epochs: 1,
        batch_size: 64,
        learning_rate: 0.1,
        optimizer: nereid::train::OptimizerKind::Sgd,
        server_config: serde_json::json!({}),
    }
}

fn trainer(
    python: &std::path::Path,
    dir: &std::path::Path,
    mode: &str,
    steps: u64,
    framework: &str,
) -> anyhow::Result<ExternalTrainer> {
    let config = TrainerConfig {
        command: vec![python.display().to_string(), dir.join("trainer_bench.py").display().to_string()],
        workdir: Some(dir.to_path_buf()),
        env: [
            ("BENCH_MODE", mode.to_string()),
            ("BENCH_STEPS", steps.to_string()),
            ("OPENBLAS_NUM_THREADS", "1".into()),
            ("BENCH_FRAMEWORK", framework.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        start_timeout_secs: 120.0,
        task_timeout_secs: 600.0,
    };
    Ok(ExternalTrainer::new(config, dir, &dir.join(format!("state-{mode}")), "bench")?)
}

/// Times `repeat` fits after a warm-up: (wall seconds, the trainer's own seconds) of each.
fn fits(t: &mut ExternalTrainer, global: &NamedTensors, repeat: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    let bytes = model_io::encode(global, None)?;
    let never = AtomicBool::new(false);
    let mut out = Vec::new();
    for round in 0..=repeat {
        let start = Instant::now();
        let task = task(round as u32 + 1);
        let request = FitRequest { task: &task, global, global_bytes: &bytes, evaluate_first: false, samples: None };
        let fit = t.fit(&request, None, &never)?;
        let wall = start.elapsed().as_secs_f64();
        let own = fit.metrics.get("fit_seconds").copied().context("the bench trainer reports fit_seconds")?;
        if round > 0 {
            out.push((wall, own));
        }
    }
    Ok(out)
}

pub fn run(b: TrainerBench) -> anyhow::Result<()> {
    if b.repeat == 0 || b.params < 1000 || b.handover_params < 1000 {
        bail!("--repeat must be at least 1, --params and --handover-params at least 1000");
    }
    // Not canonicalized: a virtual environment's python is a symlink that must stay one.
    let python = std::path::absolute(&b.python)?;
    if !python.is_file() {
        bail!("{}: no such Python (`cargo xtask test` makes target/py)", b.python.display());
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("trainer_bench.py"), SCRIPT)?;

    // (1) The hand-over.
    let big = model(b.handover_params, 1000);
    let handover_bytes = model_io::encode(&big, None)?.len();
    let framework = if b.torch { "torch" } else { "numpy" };
    let mut echo = trainer(&python, dir.path(), "echo", 0, framework)?;
    let handover: Vec<f64> = fits(&mut echo, &big, b.repeat)?.into_iter().map(|(wall, own)| wall - own).collect();
    drop(echo);

    // (2) The overhead on a round of real work: calibrate the steps standalone, then compare.
    let rows = (b.params as f64).sqrt() as usize;
    let weights = model(rows * (b.params / rows), rows);
    let weights_file = dir.path().join("weights.safetensors");
    std::fs::write(&weights_file, model_io::encode(&weights, None)?)?;
    // The same weights and the same work as through the protocol (the seeds 1..=repeat too).
    let standalone = |steps: u64, repeat: usize| -> anyhow::Result<Vec<f64>> {
        let out = Command::new(&python)
            .arg(dir.path().join("trainer_bench.py"))
            .args(["--standalone", &steps.to_string(), &repeat.to_string()])
            .arg(&weights_file)
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("BENCH_FRAMEWORK", framework)
            .output()?;
        if !out.status.success() {
            bail!("the standalone run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let probe = median(standalone(20, 3)?) / 20.0;
    let steps = ((b.train_secs / probe).ceil() as u64).max(1);
    let alone = median(standalone(steps, b.repeat)?);
    let mut worker = trainer(&python, dir.path(), "work", steps, framework)?;
    let rounds = fits(&mut worker, &weights, b.repeat)?;
    let through = median(rounds.iter().map(|(wall, _)| *wall).collect());
    let per_round = median(rounds.iter().map(|(wall, own)| wall / own - 1.0).collect());
    let report = Report {
        framework,
        handover_params: b.handover_params,
        handover_bytes_each_way: handover_bytes,
        handover_ms: median(handover) * 1000.0,
        params: rows * (b.params / rows),
        steps,
        standalone_median_s: alone,
        through_protocol_median_s: through,
        overhead_vs_standalone: through / alone - 1.0,
        overhead_per_round: per_round,
    };
    if b.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "hand-over of {} f32 ({} bytes each way): {:.1} ms there and back",
            report.handover_params, report.handover_bytes_each_way, report.handover_ms
        );
        println!(
            "a round of {} {} steps on {} parameters: standalone {:.3} s, through the protocol {:.3} s ({:+.1}%); \
             within each round, the protocol's share {:+.2}%",
            report.steps,
            report.framework,
            report.params,
            report.standalone_median_s,
            report.through_protocol_median_s,
            report.overhead_vs_standalone * 100.0,
            report.overhead_per_round * 100.0
        );
    }
    Ok(())
}
