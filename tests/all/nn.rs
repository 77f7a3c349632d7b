//! Inference through wasi-nn: a plugin runs a model from the node's store (`load-by-name`) on
//! ONNX Runtime, and gets what ONNX Runtime itself computes on the same model and input.
use std::path::Path;
use std::process::Command;

use nereid::inference::wire::{f32_tensor, f32_values};
use nereid::inference::NativeModel;
use nereid::runtime::nn::{init_onnxruntime, Models, NnBackend};
use nereid::runtime::SplitterPlugin;
use nereid::runtime::{Limits, Runtime};

use crate::common::*;

wasmtime::component::bindgen!({
    inline: "package nereid:nn-probe@0.1.0;
             world probe {
                 export run: func(model: string, input-name: string, dims: list<u32>, input: list<f32>) -> result<list<f32>, string>;
             }",
});

/// A 64-32-10 MLP with softmax (seeded weights), written with the `onnx` Python package.
fn write_mlp(dir: &Path) {
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
rng = np.random.default_rng(7)
w1 = (rng.standard_normal((64, 32)) * 0.2).astype(np.float32)
b1 = (rng.standard_normal(32) * 0.1).astype(np.float32)
w2 = (rng.standard_normal((32, 10)) * 0.2).astype(np.float32)
b2 = (rng.standard_normal(10) * 0.1).astype(np.float32)
nodes = [
    helper.make_node("MatMul", ["x", "w1"], ["h"]),
    helper.make_node("Add", ["h", "b1"], ["hb"]),
    helper.make_node("Relu", ["hb"], ["a"]),
    helper.make_node("MatMul", ["a", "w2"], ["o"]),
    helper.make_node("Add", ["o", "b2"], ["logits"]),
    helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
]
graph = helper.make_graph(
    nodes, "mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
    [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
"#;
    std::fs::create_dir_all(dir).expect("model dir");
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(dir.join("model.onnx"))
        .output()
        .expect("python3 (the `onnx` package: `cargo xtask test` installs it)");
    assert!(out.status.success(), "building the ONNX model: {}", String::from_utf8_lossy(&out.stderr));
}

/// ONNX Runtime's own output, through the `ort` crate.
fn onnxruntime_output(model: &Path, input: &[f32]) -> Vec<f32> {
    init_onnxruntime().expect("ONNX Runtime");
    let mut session = ort::session::Session::builder()
        .expect("builder")
        .commit_from_file(model)
        .expect("ONNX Runtime loads the model");
    let x = ort::value::Tensor::from_array(([1usize, 64], input.to_vec())).expect("tensor");
    let outputs = session.run(ort::inputs!["x" => x]).expect("run");
    let (_, probs) = outputs["probs"].try_extract_tensor::<f32>().expect("f32 output");
    probs.to_vec()
}

/// The nn-probe fixture, instantiated on `runtime` (its models are the runtime's).
pub fn probe(runtime: &Runtime) -> (wasmtime::Store<nereid::runtime::state::PluginState>, Probe) {
    let loaded = runtime.load_file(&plugin("test-nn-probe")).expect("the probe loads");
    let mut store = runtime.store("nn-probe".into(), &Limits::default());
    store.set_epoch_deadline(u64::MAX / 2);
    let probe = Probe::instantiate(&mut store, &loaded.component, runtime.linker()).expect("instantiate");
    (store, probe)
}

#[test]
fn wasi_nn_output_equals_onnx_runtime_output() {
    let store_dir = tempfile::tempdir().expect("tmp");
    write_mlp(&store_dir.path().join("mlp"));
    let models = Models::load_dir(store_dir.path(), NnBackend::Onnxruntime).expect("the model store loads");
    assert_eq!(models.names(), ["mlp"]);
    let cache = tempfile::tempdir().expect("tmp");
    let runtime = Runtime::with_models(Some(cache.path().to_path_buf()), models).expect("runtime");
    let (mut store, probe) = probe(&runtime);

    for seed in 0..3u32 {
        let input: Vec<f32> = (0..64).map(|i| ((i * 7 + seed * 13) % 17) as f32).collect();
        let through_plugin =
            probe.call_run(&mut store, "mlp", "x", &[1, 64], &input).expect("call").expect("inference");
        let direct = onnxruntime_output(&store_dir.path().join("mlp/model.onnx"), &input);
        assert_eq!(through_plugin.len(), 10);
        assert_eq!(through_plugin, direct, "seed {seed}");
        assert!((through_plugin.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let missing = probe.call_run(&mut store, "nope", "x", &[1, 64], &[0.0; 64]).expect("call");
    assert!(missing.expect_err("unknown model").contains("load-by-name nope"));
}

/// The same store on OpenVINO (from the `openvino` wheel the setup fetches): the MLP through
/// the probe, and the test CNN (convolutions, pooling, a residual add) through the split-infer
/// plugin's runner, against ONNX Runtime's own answers. Different kernels, so within 1e-5.
#[test]
fn wasi_nn_on_openvino_computes_what_onnx_runtime_computes() {
    let store_dir = tempfile::tempdir().expect("tmp");
    write_mlp(&store_dir.path().join("mlp"));
    std::fs::create_dir_all(store_dir.path().join("cnn")).expect("mkdir");
    crate::inference::write_cnn(&store_dir.path().join("cnn/model.onnx"));
    let models = Models::load_dir(store_dir.path(), NnBackend::Openvino).expect("OpenVINO loads the store");
    assert_eq!(models.names(), ["cnn", "mlp"]);
    let cache = tempfile::tempdir().expect("tmp");
    let runtime = Runtime::with_models(Some(cache.path().to_path_buf()), models).expect("runtime");

    let (mut store, probe) = probe(&runtime);
    let close = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5);
    for seed in 0..3u32 {
        let input: Vec<f32> = (0..64).map(|i| ((i * 7 + seed * 13) % 17) as f32).collect();
        let openvino = probe.call_run(&mut store, "mlp", "x", &[1, 64], &input).expect("call").expect("inference");
        let direct = onnxruntime_output(&store_dir.path().join("mlp/model.onnx"), &input);
        assert!(close(&openvino, &direct), "seed {seed}: {openvino:?} vs {direct:?}");
    }

    let splitter = runtime.load_file(&plugin("split-infer")).expect("split-infer loads");
    let mut runner = SplitterPlugin::new(&runtime, splitter, Limits::default(), &Default::default()).expect("splitter");
    let cnn = NativeModel::new(&std::fs::read(store_dir.path().join("cnn/model.onnx")).expect("cnn")).expect("ORT");
    for seed in 0..2u32 {
        let values: Vec<f32> =
            (0..2 * 3 * 64 * 64).map(|i| ((i as u32 * 31 + seed * 7) % 255) as f32 / 127.0 - 1.0).collect();
        let x = [f32_tensor("image", vec![2, 3, 64, 64], &values)];
        let openvino = f32_values(&runner.run("cnn", &x).expect("OpenVINO runs the CNN")[0]).expect("f32");
        let direct = f32_values(&cnn.run(&x).expect("ORT runs the CNN")[0]).expect("f32");
        let worst = openvino.iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(openvino.len() == direct.len() && worst <= 1e-5, "seed {seed}: worst {worst}");
    }

    // A head of split inference on OpenVINO: its outputs carry the cut's names (the tail is fed
    // by name) and equal ONNX Runtime's intermediate tensors.
    let typed =
        nereid::inference::profile::typed(&std::fs::read(store_dir.path().join("cnn/model.onnx")).expect("cnn"))
            .expect("typed")
            .model
            .encode();
    let cut = ["pool1".to_string(), "conv4".to_string()];
    let (head, _) = runner.partition(&typed, &cut).expect("partition");
    runtime.models().insert("cnn.head", &head.expect("a head")).expect("OpenVINO compiles the head");
    let splitter = runtime.load_file(&plugin("split-infer")).expect("split-infer loads");
    let mut runner = SplitterPlugin::new(&runtime, splitter, Limits::default(), &Default::default()).expect("splitter");
    let values: Vec<f32> = (0..3 * 64 * 64).map(|i| (i % 97) as f32 / 48.0 - 1.0).collect();
    let x = [f32_tensor("image", vec![1, 3, 64, 64], &values)];
    let mut got = runner.run("cnn.head", &x).expect("the head runs on OpenVINO");
    got.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["conv4", "pool1"]);
    let head_ort = NativeModel::new(&runner.partition(&typed, &cut).expect("partition").0.expect("head")).expect("ORT");
    let mut want = head_ort.run(&x).expect("ORT runs the head");
    want.sort_by(|a, b| a.name.cmp(&b.name));
    for (g, w) in got.iter().zip(&want) {
        let (g, w) = (f32_values(g).expect("f32"), f32_values(w).expect("f32"));
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(g.len() == w.len() && worst <= 1e-4, "worst {worst}");
    }
}
