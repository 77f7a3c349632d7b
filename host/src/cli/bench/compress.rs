//! `nereid bench compress`: model size and accuracy of the quantize plugin's passes (float32,
//! INT8 weight-only / dynamic / static, 50% / 90% magnitude pruning) on the digits MLP trained
//! here, and on the test CNN of split inference (`tests/fixtures/models/cnn.py`): its seeded
//! convolutions are kept as they are and its classifier head (fc1, fc2) is fitted here to the
//! digits, upscaled to its input size, so it too has an accuracy to lose.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use nereid_onnx::Message;
use serde::Serialize;

use nereid::inference::compress::{self, ModelSize};
use nereid::inference::NativeModel;
use nereid::runtime::config::ConfigTable;
use nereid::runtime::nn::{Models, NnBackend};
use nereid::runtime::{CompressorPlugin, Limits, Runtime};
use nereid::train::{self, Dataset, ModelSpec, OptimizerKind, TrainParams};

#[derive(Args)]
pub struct CompressBench {
    /// Also compress the test CNN (`python3 tests/fixtures/models/cnn.py <out.onnx>`), its head
    /// fitted to the digits first.
    #[arg(long)]
    cnn: Option<PathBuf>,
    /// Calibration samples for static quantization.
    #[arg(long, default_value_t = 64)]
    calibration: usize,
    /// Epochs of training the digits MLP.
    #[arg(long, default_value_t = 40)]
    epochs: u32,
    /// Epochs of fitting the CNN's head.
    #[arg(long, default_value_t = 200)]
    head_epochs: u32,
    /// Runs with seeds seed, seed+1, ...: each its own split, training and head; accuracies are
    /// averaged over them.
    #[arg(long, default_value_t = 5)]
    runs: u64,
    /// The compressor [default: quantize from the plugin directory].
    #[arg(long, value_name = "WASM")]
    plugin: Option<PathBuf>,
    /// Seed of the first run's split and training.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Write the digits MLP (mlp.onnx) and its data (data/train.csv, data/test.csv) here.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Clone)]
struct Row {
    variant: String,
    /// Of the first run (sizes differ between runs only in the gzip column).
    size: ModelSize,
    size_ratio: f64,
    /// Means over the runs, and the worst run's change.
    accuracy: f64,
    accuracy_delta_points: f64,
    worst_delta_points: f64,
}

#[derive(Serialize)]
struct Table {
    model: String,
    examples: usize,
    runs: usize,
    rows: Vec<Row>,
}

/// One table per model from the runs' tables (same models, same variants, in the same order).
fn average(runs: Vec<Vec<Table>>) -> Vec<Table> {
    let n = runs.len() as f64;
    let mut iter = runs.into_iter();
    let Some(mut first) = iter.next() else { return Vec::new() };
    let rest: Vec<Vec<Table>> = iter.collect();
    for (t, table) in first.iter_mut().enumerate() {
        table.runs = 1 + rest.len();
        for (r, row) in table.rows.iter_mut().enumerate() {
            let others = || rest.iter().map(|run| &run[t].rows[r]);
            row.accuracy = (row.accuracy + others().map(|o| o.accuracy).sum::<f64>()) / n;
            row.worst_delta_points =
                others().map(|o| o.accuracy_delta_points).fold(row.accuracy_delta_points, f64::min);
            row.accuracy_delta_points =
                (row.accuracy_delta_points + others().map(|o| o.accuracy_delta_points).sum::<f64>()) / n;
        }
    }
    first
}

/// (label, `model_pass`, `sparsity`, `float_inputs`) of each row.
type Variant = (&'static str, &'static str, f64, &'static str);

const VARIANTS: [Variant; 6] = [
    ("float32", "", 0.0, ""),
    ("int8 weight-only", "int8-weight-only", 0.0, ""),
    ("int8 dynamic", "int8-dynamic", 0.0, ""),
    ("int8 static", "int8-static", 0.0, ""),
    ("pruned 50%", "prune", 0.5, ""),
    ("pruned 90%", "prune", 0.9, ""),
];

/// The CNN's extra rows: its pooled features (`flat`, fc1's input) kept float.
const CNN_VARIANTS: [Variant; 2] =
    [("int8 dynamic, fc1 in f32", "int8-dynamic", 0.0, "fc1"), ("int8 static, fc1 in f32", "int8-static", 0.0, "fc1")];

#[allow(clippy::too_many_arguments)]
fn table(
    runtime: &Runtime,
    plugin: &std::path::Path,
    label: &str,
    onnx: &[u8],
    eval: &Dataset,
    calibration: &Dataset,
    samples: usize,
    variants: &[Variant],
) -> anyhow::Result<Table> {
    let samples = compress::calibration_samples(onnx, calibration, samples, label)?;
    let float = compress::evaluate(onnx, eval, label)?;
    let float_size = compress::model_size(onnx)?;
    let mut rows = Vec::new();
    for &(variant, pass, sparsity, float_inputs) in variants {
        let out = if pass.is_empty() {
            onnx.to_vec()
        } else {
            let mut config = ConfigTable::new();
            config.insert("model_pass".into(), toml::Value::String(pass.into()));
            config.insert("sparsity".into(), toml::Value::Float(sparsity));
            config.insert("float_inputs".into(), toml::Value::String(float_inputs.into()));
            let limits = Limits { call_timeout: std::time::Duration::from_secs(300), ..Limits::default() };
            let mut p = CompressorPlugin::load(runtime, plugin, limits, &config)?;
            p.rewrite_model(onnx, &samples).with_context(|| format!("{label}: {variant}"))?
        };
        NativeModel::new(&out).with_context(|| format!("{label}: ONNX Runtime refuses the {variant} model"))?;
        let acc = compress::evaluate(&out, eval, label)?;
        let size = compress::model_size(&out)?;
        rows.push(Row {
            variant: variant.into(),
            size_ratio: size.bytes as f64 / float_size.bytes as f64,
            size,
            accuracy: acc.accuracy,
            accuracy_delta_points: 100.0 * (acc.accuracy - float.accuracy),
            worst_delta_points: 100.0 * (acc.accuracy - float.accuracy),
        });
    }
    Ok(Table { model: label.into(), examples: eval.len(), runs: 1, rows })
}

/// Digits as the CNN's input: each 8x8 image upscaled (nearest) to `size` x `size`, the same
/// in each of `channels` channels.
fn as_images(data: &Dataset, channels: usize, size: usize) -> Dataset {
    let factor = size / 8;
    let mut x = Vec::with_capacity(data.len() * channels * size * size);
    for i in 0..data.len() {
        let row = data.row(i);
        for _ in 0..channels {
            for r in 0..size {
                for c in 0..size {
                    x.push(row[(r / factor).min(7) * 8 + (c / factor).min(7)]);
                }
            }
        }
    }
    Dataset { x, y: data.y.clone(), features: channels * size * size }
}

/// The test CNN's input size: [N, channels, size, size].
fn cnn_input(onnx: &[u8]) -> anyhow::Result<(usize, usize)> {
    match compress::example_input(onnx)?.1[..] {
        [c, h, w] if h == w && h >= 8 => Ok((c as usize, h as usize)),
        _ => anyhow::bail!("the CNN's input must be [N, C, S, S] with S >= 8"),
    }
}

/// The CNN with its head (fc1: Gemm to 64, ReLU, fc2: Gemm to 10) fitted to the digits on the
/// features its convolutions compute (the `flat` tensor).
fn fit_cnn_head(onnx: &[u8], train_set: &Dataset, epochs: u32, seed: u64) -> anyhow::Result<Vec<u8>> {
    use nereid_onnx::proto::{data_type, ModelProto, TensorProto, ValueInfoProto};
    let mut probe = ModelProto::decode(onnx)?;
    let graph = probe.graph.as_mut().context("the CNN has no graph")?;
    anyhow::ensure!(
        ["fc1.w", "fc1.b", "fc2.w", "fc2.b"].iter().all(|n| graph.initializer.iter().any(|t| t.name == *n))
            && graph.node.iter().any(|n| n.output.iter().any(|o| o == "flat")),
        "not the test CNN: no `flat` tensor or no fc1/fc2 weights"
    );
    graph.output.push(ValueInfoProto::tensor_of_any_shape("flat", data_type::FLOAT));
    let native = NativeModel::new(&probe.encode_to_vec())?;
    let flat_index = native.outputs.iter().position(|o| o == "flat").context("no `flat` output")?;
    let name = native.inputs.first().cloned().context("the CNN has no input")?;
    let (channels, size) = cnn_input(onnx)?;
    let images = as_images(train_set, channels, size);
    let mut features = Vec::new();
    let mut width = 0;
    for start in (0..images.len()).step_by(128) {
        let end = (start + 128).min(images.len());
        let x: Vec<f32> = (start..end).flat_map(|i| images.row(i).iter().copied()).collect();
        let input = nereid::inference::wire::f32_tensor(
            &name,
            vec![(end - start) as u64, channels as u64, size as u64, size as u64],
            &x,
        );
        let out = native.run(&[input])?;
        let flat = nereid::inference::wire::f32_values(&out[flat_index])?;
        width = flat.len() / (end - start);
        features.extend(flat);
    }
    let feature_set = Dataset { x: features, y: train_set.y.clone(), features: width };
    let head = ModelSpec::Mlp { inputs: width, hidden: vec![64], classes: 10 };
    let params = TrainParams { epochs, batch_size: 32, learning_rate: 0.003, optimizer: OptimizerKind::Adam };
    let trained = train::train(&head, &head.init(seed), &feature_set, &params, seed, None, |_, _| {})?;
    let mut fitted = ModelProto::decode(onnx)?;
    let graph = fitted.graph.as_mut().context("the CNN has no graph")?;
    for (ours, theirs) in
        [("fc1.w", "dense.0.weight"), ("fc1.b", "dense.0.bias"), ("fc2.w", "dense.1.weight"), ("fc2.b", "dense.1.bias")]
    {
        let (_, t) = trained.model.iter().find(|(n, _)| n == theirs).context("trained head")?;
        let dims: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        let values = t.as_f32().context("trained head is f32")?;
        let slot = graph.initializer.iter_mut().find(|i| i.name == ours).context("head weight")?;
        anyhow::ensure!(slot.dims == dims, "{ours}: the CNN has {:?}, the fitted head {dims:?}", slot.dims);
        *slot = TensorProto::f32(ours, &dims, values);
    }
    Ok(fitted.encode_to_vec())
}

pub fn run(args: CompressBench, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let plugin =
        args.plugin.clone().unwrap_or_else(|| crate::cli::plugin_path(&crate::cli::default_plugin_dir(), "quantize"));
    let runtime = Runtime::with_models(cache_dir, Models::for_guest_models(NnBackend::Onnxruntime)?)?;
    let cnn =
        args.cnn.as_ref().map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display()))).transpose()?;
    let mut runs = Vec::new();
    for seed in args.seed..args.seed + args.runs.max(1) {
        // The digits MLP of the demo's shape, trained centrally on 80% of the digits.
        let (train_set, test_set) = Dataset::digits().holdout(0.2, seed);
        let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![crate::cli::demo::DIGITS_MLP_HIDDEN], classes: 10 };
        let params =
            TrainParams { epochs: args.epochs, batch_size: 16, learning_rate: 0.1, optimizer: OptimizerKind::Sgd };
        let trained = train::train(&spec, &spec.init(seed), &train_set, &params, seed, None, |_, _| {})?;
        let mlp = nereid::inference::export::to_onnx(&spec, &trained.model)?.encode_to_vec();
        if let (Some(dir), true) = (&args.workdir, seed == args.seed) {
            std::fs::create_dir_all(dir.join("data"))?;
            std::fs::write(dir.join("mlp.onnx"), &mlp)?;
            train_set.write_csv(&dir.join("data").join("train.csv"))?;
            test_set.write_csv(&dir.join("data").join("test.csv"))?;
        }
        let mut tables =
            vec![table(&runtime, &plugin, "digits MLP", &mlp, &test_set, &train_set, args.calibration, &VARIANTS)?];
        if let (Some(onnx), Some(path)) = (&cnn, &args.cnn) {
            let fitted = fit_cnn_head(onnx, &train_set, args.head_epochs, seed)?;
            let (channels, size) = cnn_input(&fitted)?;
            let (train_images, test_images) =
                (as_images(&train_set, channels, size), as_images(&test_set, channels, size));
            let label = format!("test CNN, head fitted to the digits ({})", path.display());
            let variants: Vec<Variant> = VARIANTS.iter().chain(&CNN_VARIANTS).copied().collect();
            tables.push(table(
                &runtime,
                &plugin,
                &label,
                &fitted,
                &test_images,
                &train_images,
                args.calibration,
                &variants,
            )?);
        }
        runs.push(tables);
    }
    let tables = average(runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tables)?);
        return Ok(());
    }
    for t in &tables {
        println!("\n{} ({} eval examples; mean of {} runs)", t.model, t.examples, t.runs);
        println!(
            "{:<25} {:>10} {:>9} {:>11} {:>9} {:>10} {:>9} {:>9}",
            "variant", "bytes", "of f32", "gzip bytes", "zero wts", "accuracy", "delta pt", "worst pt"
        );
        for r in &t.rows {
            println!(
                "{:<25} {:>10} {:>8.1}% {:>11} {:>8.1}% {:>10.4} {:>+9.2} {:>+9.2}",
                r.variant,
                r.size.bytes,
                100.0 * r.size_ratio,
                r.size.gzip_bytes,
                100.0 * r.size.zero_weights as f64 / (r.size.float_weights + r.size.int8_weights).max(1) as f64,
                r.accuracy,
                r.accuracy_delta_points,
                r.worst_delta_points
            );
        }
    }
    Ok(())
}
