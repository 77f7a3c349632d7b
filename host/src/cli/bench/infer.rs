//! `nereid bench infer`: what running a model through a plugin and wasi-nn costs over calling
//! ONNX Runtime directly (the `ort` crate, same library, same optimisation level), on the same
//! model and input, timed alternately in one run.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::median;

use nereid::inference::wire::f32_values;
use nereid::inference::{profile, NativeModel};
use nereid::runtime::nn::{Models, NnBackend};
use nereid::runtime::{Limits, Runtime, SplitterPlugin, TensorData};

#[derive(Args)]
pub struct InferBench {
    /// The ONNX model, e.g. the test CNN: `python3 tests/fixtures/models/cnn.py cnn.onnx`.
    model: PathBuf,
    /// Batch size of the input (open batch dimensions).
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Timed calls of each kind, after a warm-up; medians are reported.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// What wasi-nn runs the model on.
    #[arg(long, value_enum, default_value_t = NnBackend::Onnxruntime)]
    backend: NnBackend,
    /// The plugin that runs the model [default: split-infer from the plugin directory].
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct InferReport {
    model: String,
    backend: NnBackend,
    batch: u64,
    calls: usize,
    native_median_ms: f64,
    plugin_median_ms: f64,
    /// plugin / native.
    ratio: f64,
    /// Per-call cost of the plugin path over the native one, ms.
    overhead_ms: f64,
    max_abs_diff: f64,
}

pub fn run(args: InferBench, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    if args.calls < 2 || args.batch == 0 {
        bail!("--calls must be at least 2 and --batch at least 1");
    }
    let plugin = args
        .plugin
        .clone()
        .unwrap_or_else(|| crate::cli::plugin_path(&crate::cli::default_plugin_dir(), "split-infer"));
    let onnx = std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let x = profile::patterned_inputs(&nereid_onnx::Model::decode(onnx.as_slice())?, args.batch)?;
    let native = NativeModel::new(&onnx)?;
    let runtime = Runtime::with_models(cache_dir, Models::new(args.backend))?;
    runtime.models().insert("bench", &onnx)?;
    let component = runtime.load_file(&plugin).with_context(|| format!("{}", plugin.display()))?;
    let mut through_plugin = SplitterPlugin::new(&runtime, component, Limits::default(), &Default::default())?;

    let flat = |outs: &[TensorData]| -> anyhow::Result<Vec<f32>> {
        Ok(outs.iter().map(f32_values).collect::<Result<Vec<_>, _>>()?.concat())
    };
    let want = flat(&native.run(&x)?)?;
    let got = flat(&through_plugin.run("bench", &x)?)?;
    if want.len() != got.len() {
        bail!("the plugin's answer has {} values, ONNX Runtime's {}", got.len(), want.len());
    }
    let max_abs_diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);

    let progress = indicatif::ProgressBar::new(args.calls as u64);
    let (mut native_ms, mut plugin_ms) = (Vec::new(), Vec::new());
    for i in 0..args.calls + 5 {
        let t = Instant::now();
        native.run(&x)?;
        let n = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        through_plugin.run("bench", &x)?;
        let p = t.elapsed().as_secs_f64() * 1e3;
        if i >= 5 {
            native_ms.push(n);
            plugin_ms.push(p);
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let (native_median_ms, plugin_median_ms) = (median(native_ms), median(plugin_ms));
    let report = InferReport {
        model: args.model.display().to_string(),
        backend: args.backend,
        batch: args.batch,
        calls: args.calls,
        native_median_ms,
        plugin_median_ms,
        ratio: plugin_median_ms / native_median_ms,
        overhead_ms: plugin_median_ms - native_median_ms,
        max_abs_diff,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} (batch {}), median of {} calls: ONNX Runtime directly {:.3} ms, through the plugin and wasi-nn ({:?}) {:.3} ms: {:.3}x ({:+.3} ms per call); outputs within {:.1e}",
            report.model,
            report.batch,
            report.calls,
            report.native_median_ms,
            report.backend,
            report.plugin_median_ms,
            report.ratio,
            report.overhead_ms,
            report.max_abs_diff
        );
    }
    Ok(())
}
