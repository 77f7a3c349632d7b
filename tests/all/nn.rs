//! Inference through wasi-nn: a plugin runs a model from the node's store (`load-by-name`) on
//! ONNX Runtime, and gets what ONNX Runtime itself computes on the same model and input.
use std::path::Path;
use std::process::Command;

use nereid::runtime::nn::{init_onnxruntime, Models};
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

#[test]
fn wasi_nn_output_equals_onnx_runtime_output() {
    let store_dir = tempfile::tempdir().expect("tmp");
    write_mlp(&store_dir.path().join("mlp"));
    let models = Models::load_dir(store_dir.path()).expect("the model store loads");
    assert_eq!(models.names(), ["mlp"]);
    let cache = tempfile::tempdir().expect("tmp");
    let runtime = Runtime::with_models(Some(cache.path().to_path_buf()), models).expect("runtime");
    let loaded = runtime.load_file(&plugin("test-nn-probe")).expect("the probe loads");
    let mut store = runtime.store("nn-probe".into(), &Limits::default());
    store.set_epoch_deadline(u64::MAX / 2);
    let probe = Probe::instantiate(&mut store, &loaded.component, runtime.linker()).expect("instantiate");

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
