//! Compression (plugins/quantize in the compressor slot): INT8 and top-k update coding, INT8 and
//! pruning passes on ONNX models checked by ONNX Runtime, `nereid model compress`, and a
//! federated job whose updates travel compressed.
use std::path::Path;
use std::process::Command;

use nereid::inference::compress;
use nereid::inference::wire::{self, f32_tensor, f32_values};
use nereid::inference::NativeModel;
use nereid::model_io::NamedTensors;
use nereid::runtime::nn::{Models, NnBackend};
use nereid::runtime::{CompressorPlugin, Limits, RoundContext, Runtime};
use nereid::tensor::Tensor;
use nereid::train::{self, Dataset, ModelSpec, OptimizerKind, TrainParams};
use nereid_onnx::proto::{data_type, ModelProto, TensorProto};
use nereid_onnx::Message;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::cluster::*;
use crate::common::*;

fn runtime_with_nn() -> (Runtime, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let models = Models::for_guest_models(NnBackend::Onnxruntime).expect("ONNX Runtime");
    (Runtime::with_models(Some(dir.path().to_path_buf()), models).expect("runtime"), dir)
}

fn quantize(runtime: &Runtime, cfg: &[(&str, toml::Value)]) -> CompressorPlugin {
    let limits = Limits { call_timeout: std::time::Duration::from_secs(120), ..Limits::default() };
    CompressorPlugin::load(runtime, &plugin("quantize"), limits, &config(cfg)).expect("quantize loads")
}

fn text(s: &str) -> toml::Value {
    toml::Value::String(s.into())
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_f64_vec()
}

fn normal(rng: &mut rand_chacha::ChaCha8Rng, n: usize, sd: f64) -> Vec<f32> {
    let d = Normal::new(0.0, sd).expect("normal");
    (0..n).map(|_| d.sample(rng) as f32).collect()
}

const CTX: RoundContext = RoundContext { job: String::new(), round: 3, seed: 11 };

#[test]
fn int8_updates_round_trip_within_one_step_per_tensor() {
    let (rt, _d) = runtime();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut big = normal(&mut rng, 1000, 0.01);
    big[17] = 0.5; // an outlier sets the scale
    let update: NamedTensors = vec![
        ("dense.0.weight".into(), f32s(&[64, 32], &normal(&mut rng, 2048, 1e-3))),
        ("dense.0.bias".into(), f32s(&[10], &normal(&mut rng, 10, 1.0))),
        ("outlier".into(), f32s(&[1000], &big)),
        ("zeros".into(), f32s(&[4], &[0.0; 4])),
    ];
    for (rounding, bound) in [("nearest", 0.5), ("stochastic", 1.0)] {
        let mut p = quantize(&rt, &[("update", text("int8")), ("rounding", text(rounding))]);
        let payload = p.encode(&CTX, &update).expect("encode");
        let q = get(&payload, "dense.0.weight#int8");
        assert_eq!((q.dtype(), q.shape()), (nereid::tensor::DType::I8, &[64u64, 32][..]), "INT8 values travel");
        let sent: usize = payload.iter().map(|(_, t)| t.byte_len()).sum();
        let raw: usize = update.iter().map(|(_, t)| t.byte_len()).sum();
        assert!(raw as f64 / sent as f64 > 3.9, "{raw} -> {sent} bytes");
        let back = p.decode(&CTX, &payload, "test").expect("decode");
        for (name, original) in &update {
            let x = values(original);
            let step = x.iter().fold(0f64, |m, v| m.max(v.abs())) / 127.0;
            let y = values(get(&back, name));
            let worst = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(
                worst <= bound * step * (1.0 + 1e-5) + 1e-12,
                "{rounding} {name}: error {worst} > {bound} x step {step}"
            );
            if rounding == "stochastic" && x.len() >= 1000 {
                // Unbiased: the mean error is within 4 standard errors of 0.
                let mean = x.iter().zip(&y).map(|(a, b)| b - a).sum::<f64>() / x.len() as f64;
                assert!(mean.abs() < 4.0 * step / (x.len() as f64).sqrt(), "{name}: mean error {mean}");
            }
        }
    }
}

#[test]
fn top_k_error_feedback_makes_the_sent_sum_converge_to_the_true_sum() {
    let (rt, _d) = runtime();
    let n = 2000;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    // Updates with a steady direction plus noise, as gradients of successive rounds are.
    let direction = normal(&mut rng, n, 1.0);
    let updates: Vec<Vec<f32>> = (0..200)
        .map(|_| direction.iter().zip(normal(&mut rng, n, 1.0)).map(|(d, e)| 0.1 * d + 0.1 * e).collect())
        .collect();
    let relative_error = |feedback: bool, rounds: usize| {
        let mut p = quantize(
            &rt,
            &[
                ("update", text("top-k")),
                ("top_k_fraction", toml::Value::Float(0.1)),
                ("error_feedback", toml::Value::Boolean(feedback)),
            ],
        );
        let (mut truth, mut sent) = (vec![0f64; n], vec![0f64; n]);
        for u in &updates[..rounds] {
            let payload = p.encode(&CTX, &[("w".to_string(), f32s(&[n as u64], u))]).expect("encode");
            assert_eq!(get(&payload, "w#values").numel(), (n / 10) as u64, "10% of the elements travel");
            let back = p.decode(&CTX, &payload, "test").expect("decode");
            truth.iter_mut().zip(u).for_each(|(t, v)| *t += *v as f64);
            sent.iter_mut().zip(values(get(&back, "w"))).for_each(|(s, v)| *s += v);
        }
        let diff: f64 = truth.iter().zip(&sent).map(|(t, s)| (t - s).powi(2)).sum::<f64>().sqrt();
        diff / truth.iter().map(|t| t * t).sum::<f64>().sqrt()
    };
    let (early, late, without) = (relative_error(true, 20), relative_error(true, 200), relative_error(false, 200));
    println!("top-k 10%: relative error of the sent sum {early} after 20 rounds, {late} after 200; {without} without feedback");
    assert!(late < 0.05 && late < early / 4.0, "with error feedback: {early} after 20 rounds, {late} after 200");
    assert!(without > 0.5, "without it the unsent 90% never arrives: {without}");
}

#[test]
fn a_payload_missing_its_scale_or_an_update_with_a_nan_is_rejected_naming_the_tensor() {
    let (rt, _d) = runtime();
    let mut p = quantize(&rt, &[]);
    let payload = vec![("w#int8".to_string(), Tensor::zeros(nereid::tensor::DType::I8, vec![3]).expect("zeros"))];
    let err = p.decode(&CTX, &payload, "update from `edge-9`").expect_err("no scale").to_string();
    assert!(err.contains("edge-9") && err.contains("`w#scale`"), "{err}");
    // A NaN would come out as 0 (INT8) or travel unnoticed: refused, naming the tensor.
    let diverged = vec![("dense.1.bias".to_string(), f32s(&[3], &[0.5, f32::NAN, 1.0]))];
    let err = p.encode(&CTX, &diverged).expect_err("NaN").to_string();
    assert!(err.contains("`dense.1.bias`") && err.contains("NaN"), "{err}");
}

/// The digits MLP of the demo's shape (64-128-10), trained for a few epochs, as ONNX.
fn trained_mlp() -> (Vec<u8>, Dataset, Dataset) {
    let (train_set, test_set) = Dataset::digits().holdout(0.2, 3);
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![128], classes: 10 };
    let params = TrainParams { epochs: 10, batch_size: 16, learning_rate: 0.1, optimizer: OptimizerKind::Sgd };
    let trained = train::train(&spec, &spec.init(3), &train_set, &params, 3, None, |_, _| {}).expect("training");
    let onnx = nereid::inference::export::to_onnx(&spec, &trained.model).expect("export").encode_to_vec();
    (onnx, train_set, test_set)
}

fn test_cnn(dir: &Path) -> Vec<u8> {
    let path = dir.join("cnn.onnx");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/cnn.py");
    let out = Command::new("python3").arg(&script).arg(&path).args(["--size", "32"]).output().expect("python3");
    assert!(out.status.success(), "building the test CNN: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&path).expect("cnn")
}

fn initializer<'a>(model: &'a ModelProto, name: &str) -> &'a TensorProto {
    let graph = model.graph.as_ref().expect("graph");
    graph.initializer.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no initializer `{name}`"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Seeded inputs for a model with one float input [1, ...].
fn inputs(onnx: &[u8], count: usize) -> Vec<nereid::runtime::TensorData> {
    let native = NativeModel::new(onnx).expect("float model loads");
    let dims: Vec<u64> = native.input_dims[0].iter().map(|&d| if d < 0 { 1 } else { d as u64 }).collect();
    let n: u64 = dims.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    (0..count)
        .map(|_| f32_tensor(&native.inputs[0], dims.clone(), &(0..n).map(|_| rng.gen::<f32>()).collect::<Vec<_>>()))
        .collect()
}

fn calibration(samples: &[nereid::runtime::TensorData]) -> Vec<NamedTensors> {
    samples.iter().map(|t| vec![(t.name.clone(), wire::to_tensor(t).expect("tensor"))]).collect()
}

#[test]
fn int8_models_stay_close_to_float_and_run_through_wasi_nn() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (rt, _d) = runtime_with_nn();
    let (mlp, _, _) = trained_mlp();
    // Tolerances on the class probabilities, on fixed inputs the calibration never saw.
    for (label, float, tolerance) in [("digits MLP", mlp, 0.02f32), ("test CNN", test_cnn(dir.path()), 0.02)] {
        let calib = calibration(&inputs(&float, 16));
        let fixed = inputs(&float, 8);
        let reference = NativeModel::new(&float).expect("float model");
        for pass in ["int8-weight-only", "int8-dynamic", "int8-static"] {
            let mut p = quantize(&rt, &[("model_pass", text(pass))]);
            let out = p.rewrite_model(&float, &calib).unwrap_or_else(|e| panic!("{label} {pass}: {e}"));
            // ONNX Runtime loads and runs it: natively, and through a plugin and wasi-nn.
            let native =
                NativeModel::new(&out).unwrap_or_else(|e| panic!("{label} {pass}: ONNX Runtime refuses it: {e}"));
            let models = Models::new(NnBackend::Onnxruntime);
            models.insert("quantized", &out).unwrap_or_else(|e| panic!("{label} {pass}: wasi-nn refuses it: {e}"));
            let nn_rt = Runtime::with_models(None, models).expect("runtime");
            let mut router = nereid::runtime::RouterPlugin::load(
                &nn_rt,
                &plugin("hard-example-mining"),
                Limits::default(),
                &Default::default(),
            )
            .expect("router");
            let size = compress::model_size(&out).expect("size");
            assert!(
                size.bytes * 100 <= compress::model_size(&float).expect("size").bytes * 31,
                "{label} {pass}: {size:?}"
            );
            let mut worst = 0f32;
            for x in &fixed {
                let want = f32_values(&reference.run(std::slice::from_ref(x)).expect("float run")[0]).expect("f32");
                let got = f32_values(&native.run(std::slice::from_ref(x)).expect("int8 run")[0]).expect("f32");
                let via_plugin = f32_values(&router.run("quantized", std::slice::from_ref(x)).expect("wasi-nn run")[0])
                    .expect("f32");
                assert!(max_abs_diff(&got, &via_plugin) < 1e-6, "{label} {pass}: wasi-nn and ONNX Runtime differ");
                worst = worst.max(max_abs_diff(&want, &got));
            }
            println!("{label} {pass}: max |p_int8 - p_float| = {worst}");
            assert!(worst <= tolerance, "{label} {pass}: probabilities differ by {worst} > {tolerance}");
        }
    }
}

#[test]
fn int8_weights_are_per_channel_within_half_a_step() {
    let (rt, _d) = runtime_with_nn();
    let (mlp, _, _) = trained_mlp();
    let float = ModelProto::decode(&mlp[..]).expect("onnx");
    let out = quantize(&rt, &[]).rewrite_model(&mlp, &[]).expect("weight-only needs no calibration");
    let q = ModelProto::decode(&out[..]).expect("onnx");
    for name in ["dense.0.weight", "dense.1.weight"] {
        let w = initializer(&float, name).f32_values().expect("f32");
        let codes = initializer(&q, &format!("{name}_q"));
        assert_eq!(codes.data_type, data_type::INT8);
        let scales = initializer(&q, &format!("{name}_s")).f32_values().expect("f32");
        let (rows, cols) = (codes.dims[0] as usize, codes.dims[1] as usize);
        assert_eq!(scales.len(), rows, "{name}: one scale per output channel (Gemm transB: axis 0)");
        let raw = codes.raw_data.as_ref().expect("raw");
        for r in 0..rows {
            let channel = &w[r * cols..(r + 1) * cols];
            let max = channel.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((scales[r] - max / 127.0).abs() <= 1e-7 * max, "{name} channel {r}: symmetric scale");
            for (c, &x) in channel.iter().enumerate() {
                let back = raw[r * cols + c] as i8 as f32 * scales[r];
                assert!((back - x).abs() <= scales[r] / 2.0 * 1.0001, "{name}[{r},{c}]: {x} -> {back}");
            }
        }
    }
    assert!(initializer(&q, "dense.0.bias").data_type == data_type::FLOAT, "biases stay float");
}

#[test]
fn pruning_reaches_exactly_the_target_sparsity() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (rt, _d) = runtime_with_nn();
    let cnn = test_cnn(dir.path());
    let float = ModelProto::decode(&cnn[..]).expect("onnx");
    for sparsity in [0.3, 0.5, 0.9] {
        let mut p = quantize(&rt, &[("model_pass", text("prune")), ("sparsity", toml::Value::Float(sparsity))]);
        let out = p.rewrite_model(&cnn, &[]).expect("prune");
        NativeModel::new(&out).expect("ONNX Runtime loads the pruned model");
        let pruned = ModelProto::decode(&out[..]).expect("onnx");
        for name in ["conv1.w", "conv4.w", "conv6.w", "fc1.w", "fc2.w"] {
            let (before, after) = (
                initializer(&float, name).f32_values().expect("f32"),
                initializer(&pruned, name).f32_values().expect("f32"),
            );
            let zeros = after.iter().filter(|v| **v == 0.0).count();
            assert_eq!(zeros, (sparsity * before.len() as f64).round() as usize, "{name} at {sparsity}");
            let kept_min = after.iter().filter(|v| **v != 0.0).fold(f32::INFINITY, |m, v| m.min(v.abs()));
            let pruned_max =
                before.iter().zip(&after).filter(|(_, a)| **a == 0.0).fold(0f32, |m, (b, _)| m.max(b.abs()));
            assert!(pruned_max <= kept_min, "{name}: the smallest magnitudes go first");
            assert!(before.iter().zip(&after).all(|(b, a)| *a == 0.0 || a == b), "{name}: the rest is untouched");
        }
        assert_eq!(
            initializer(&pruned, "fc1.b").f32_values().expect("f32"),
            initializer(&float, "fc1.b").f32_values().expect("f32"),
            "biases are not pruned"
        );
    }
}

#[test]
fn model_compress_runs_a_pipeline_and_reports_size_and_accuracy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mlp, train_set, test_set) = trained_mlp();
    std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
    train_set.write_csv(&dir.path().join("data/train.csv")).expect("train csv");
    test_set.write_csv(&dir.path().join("data/test.csv")).expect("test csv");
    std::fs::write(dir.path().join("mlp.onnx"), &mlp).expect("model");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        "eval = \"data\"\ncalibration = \"data\"\ncalibration_samples = 32\n\n\
         [[pass]]\nplugin = \"quantize\"\n[pass.config]\nmodel_pass = \"prune\"\nsparsity = 0.5\n\n\
         [[pass]]\nplugin = \"quantize\"\n[pass.config]\nmodel_pass = \"int8-static\"\n",
    )
    .expect("pipeline");
    let (model, out) = (dir.path().join("mlp.onnx"), dir.path().join("out.onnx"));
    let run = |extra: &[&str]| {
        let mut args = vec!["model", "compress", model.to_str().expect("utf-8"), "--pipeline"];
        args.extend([pipeline.to_str().expect("utf-8"), "-o", out.to_str().expect("utf-8")]);
        args.extend(extra);
        nereid(&args)
    };
    let o = run(&["--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let (before, after) = (&v["before"], &v["after"]);
    let bytes = |s: &serde_json::Value| s["size"]["bytes"].as_f64().expect("bytes");
    assert!(bytes(after) <= 0.31 * bytes(before), "{v}");
    assert_eq!(after["size"]["int8_weights"].as_u64(), Some(64 * 128 + 128 * 10), "{v}");
    assert_eq!(v["calibration_samples"].as_u64(), Some(32));
    let (a0, a1) =
        (before["accuracy"]["accuracy"].as_f64().expect("acc"), after["accuracy"]["accuracy"].as_f64().expect("acc"));
    assert!(a0 > 0.9 && a1 > a0 - 0.03, "accuracy {a0} -> {a1}");
    // What it wrote is the model it measured.
    let written = std::fs::read(&out).expect("output");
    assert_eq!(compress::model_size(&written).expect("size").bytes as f64, bytes(after));
    let text = String::from_utf8_lossy(&run(&[]).stdout).to_string();
    assert!(text.contains("before") && text.contains("after") && text.contains("accuracy"), "{text}");

    // A key the pipeline does not know, at its line; a value the plugin refuses, named.
    std::fs::write(&pipeline, "eval = \"data\"\npasses = 2\n").expect("pipeline");
    let err = String::from_utf8_lossy(&run(&[]).stderr).to_string();
    assert!(err.contains("pipeline.toml:2") && err.contains("passes"), "{err}");
    std::fs::write(&pipeline, "[[pass]]\nplugin = \"quantize\"\n[pass.config]\nmodel_pass = \"int4\"\n")
        .expect("pipeline");
    let err = String::from_utf8_lossy(&run(&[]).stderr).to_string();
    assert!(err.contains("pass 1") && err.contains("model_pass") && err.contains("int4"), "{err}");
}

fn job_with_compressor(name: &str, coding: &str) -> String {
    let fedavg = plugin("fedavg").display().to_string();
    let quantize = plugin("quantize").display().to_string();
    format!(
        "[job]\nname = \"{name}\"\nseed = 7\n\n[rounds]\nmin_clients = 3\n\n[stop]\nrounds = 4\n\n\
         [model]\nkind = \"mlp\"\ninputs = 64\nhidden = [128]\nclasses = 10\n\n\
         [training]\nepochs = 1\nbatch_size = 16\nlearning_rate = 0.1\n\n[aggregator]\nplugin = {fedavg:?}\n\n\
         [compressor]\nplugin = {quantize:?}\n[compressor.config]\nupdate = {coding:?}\ntop_k_fraction = 0.1\n"
    )
}

#[test]
fn a_federated_job_with_compressed_updates_runs_end_to_end() {
    let c = Cluster::running(3);
    // One float32 update of this model: its parameters, 4 bytes each.
    let float_bytes = ((64 * 128 + 128 + 128 * 10 + 10) * 4) as f64;
    for (job, coding, fewer) in [("int8", "int8", 3.5), ("topk", "top-k", 4.0)] {
        c.apply(job, &job_with_compressor(job, coding));
        let s = c.wait_done(job);
        assert_eq!(s.rounds_done, 4, "{job}");
        assert!(s.compressor.is_some(), "{job}: the status names the compressor");
        let total: u64 = s.history.iter().map(|h| h.bytes_up).sum();
        assert_eq!(s.bytes_up_total, total);
        for h in &s.history {
            assert_eq!(h.participants.len(), 3, "{job} round {}: every compressed update was accepted", h.round);
            let ratio = 3.0 * float_bytes / h.bytes_up as f64;
            assert!(ratio >= fewer, "{job} round {}: {} bytes up, {ratio:.2}x fewer than float32", h.round, h.bytes_up);
        }
        let acc: Vec<f64> = s.history.iter().map(|h| h.accuracy.expect("accuracy")).collect();
        assert!(acc[3] > acc[0] + 0.2, "{job}: the global model learns from decoded updates: {acc:?}");
        let out = c.nereid(&["job", "status", job]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("compressor") && text.contains(&format!("uploaded   {total} bytes")), "{text}");
    }
}

#[test]
fn float_inputs_keep_a_layers_activation_float_and_unknown_names_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (rt, _d) = runtime_with_nn();
    let cnn = test_cnn(dir.path());
    let calib = calibration(&inputs(&cnn, 8));
    let static_with = |float_inputs: &str| {
        quantize(&rt, &[("model_pass", text("int8-static")), ("float_inputs", text(float_inputs))])
            .rewrite_model(&cnn, &calib)
    };
    let all = ModelProto::decode(&static_with("").expect("static")[..]).expect("onnx");
    let kept = ModelProto::decode(&static_with("fc1").expect("static, fc1 float")[..]).expect("onnx");
    let has = |m: &ModelProto, name: &str| m.graph.as_ref().expect("graph").initializer.iter().any(|t| t.name == name);
    assert!(has(&all, "flat_s") && !has(&kept, "flat_s"), "fc1's input `flat` is quantized only without float_inputs");
    assert!(has(&kept, "fc1.w_q") && has(&kept, "relu7_s"), "fc1's weight and fc2's input are still INT8");
    let err = static_with("fc9").expect_err("no such node").to_string();
    assert!(err.contains("float_inputs") && err.contains("`fc9`"), "{err}");
}

/// Static quantization calibrated on what an edge's replay buffer holds (`calibration_replay`).
#[test]
fn model_compress_calibrates_on_an_edges_replay_buffer() {
    let (mlp, train_set, _) = trained_mlp();
    let mut c = Cluster::new(1, "");
    let section = format!(
        "[replay]\nplugin = {:?}\nconfig = {{ policy = \"reservoir\", capacity = 100, seed = 1 }}\n",
        plugin("replay-buffer").display().to_string()
    );
    let edge = c.start_serving_edge(0, &section);
    let n = 300;
    let x = f32_tensor("x", vec![n as u64, 64], &train_set.x[..n * 64]);
    let y = nereid::runtime::TensorData {
        name: "y".into(),
        dtype: nereid::runtime::bindings::types::Dtype::I64,
        shape: vec![n as u64],
        data: train_set.y[..n].iter().flat_map(|&l| (l as i64).to_le_bytes()).collect(),
    };
    let body = nereid::inference::wire::to_safetensors(&[x, y]).expect("safetensors");
    let (code, out) = http("POST", &format!("{edge}/v1/samples"), Some(EDGE_TOKEN), body);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    let dir = tempfile::tempdir().expect("temp dir");
    let (model, out) = (dir.path().join("mlp.onnx"), dir.path().join("out.onnx"));
    std::fs::write(&model, &mlp).expect("model");
    let pipeline = dir.path().join("pipeline.toml");
    let db = c.path("edge-1/edge.db");
    std::fs::write(
        &pipeline,
        format!(
            "calibration_replay = {:?}\n[[pass]]\nplugin = \"quantize\"\n[pass.config]\nmodel_pass = \"int8-static\"\n",
            db.display().to_string()
        ),
    )
    .expect("pipeline");
    let run = nereid(&[
        "model",
        "compress",
        model.to_str().expect("utf-8"),
        "--pipeline",
        pipeline.to_str().expect("utf-8"),
        "-o",
        out.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).expect("json");
    assert_eq!(v["calibration_samples"].as_u64(), Some(64), "{v}");
    let q = ModelProto::decode(&std::fs::read(&out).expect("out")[..]).expect("onnx");
    assert!(
        q.graph.as_ref().expect("graph").initializer.iter().any(|t| t.name == "input_s"),
        "the input is calibrated"
    );
}
