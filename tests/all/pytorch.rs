//! The PyTorch example (`examples/pytorch-digits`): a CNN trained federated across three edge
//! processes through the trainer protocol on a non-IID split of the digits, then exported with
//! `torch.onnx.export` and served through wasi-nn.
use std::path::PathBuf;
use std::process::Command;

use nereid::model_io;
use nereid::runtime::nn::{Models, NnBackend};
use nereid::runtime::Runtime;

use crate::cluster::Cluster;
use crate::common::{plugin, root, venv_python};

/// The PyTorch environment `cargo xtask test` makes (torch, onnx, clients/python).
pub(crate) fn python() -> PathBuf {
    venv_python("py-torch", "torch, onnx, clients/python")
}

pub(crate) fn example(file: &str) -> String {
    root().join("examples/pytorch-digits").join(file).display().to_string()
}

/// Rounds of the job, and the accuracy the global model must reach (measured here: see
/// docs/bring-your-own-model.md).
const ROUNDS: u32 = 6;
const ACCURACY: f64 = 0.94;

#[test]
fn the_pytorch_example_trains_federated_then_serves_through_wasi_nn() {
    let mut c = Cluster::new(3, "");
    c.add_trainer(
        &[python().display().to_string(), example("trainer.py")],
        "start_timeout_secs = 120
task_timeout_secs = 300",
    );
    let out = Command::new(python()).arg(example("init.py")).arg(c.path("init.safetensors")).output().expect("python");
    assert!(out.status.success(), "init.py: {}", String::from_utf8_lossy(&out.stderr));
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    let job = format!(
        "[job]\nname = \"torch-digits\"\nseed = 3\n\n[rounds]\nmin_clients = 3\ndeadline_secs = 300\n\n\
         [stop]\nrounds = {ROUNDS}\n\n[model]\nkind = \"external\"\ninit = \"init.safetensors\"\n\n\
         [training]\nepochs = 2\nbatch_size = 16\nlearning_rate = 0.005\noptimizer = \"adam\"\n\n[aggregator]\nplugin = {:?}\n",
        plugin("fedavg").display().to_string()
    );
    c.apply("job", &job);
    let s = c.wait_done("torch-digits");
    let acc: Vec<f64> = s.history.iter().map(|h| h.accuracy.expect("accuracy")).collect();
    assert!(s.history.iter().all(|h| h.participants.len() == 3), "{s:?}");
    // Round r's accuracy is the model of round r-1 on the nodes' test splits; the final model's
    // is measured below on all of them.
    assert!(acc[ROUNDS as usize - 1] > acc[0] + 0.4, "the model learns: {acc:?}");

    // The final model, exported by PyTorch and run through wasi-nn.
    let weights = c.path("final.safetensors");
    std::fs::write(&weights, model_io::encode(&c.model("torch-digits", ROUNDS), None).expect("encode")).expect("write");
    let test = c.path("test.csv");
    let all: String = c
        .nodes
        .iter()
        .map(|(n, _)| std::fs::read_to_string(c.path(&format!("{n}/data/test.csv"))).expect("test"))
        .collect();
    std::fs::write(&test, &all).expect("test.csv");
    let store = c.path("models");
    std::fs::create_dir_all(store.join("digits-cnn")).expect("mkdir");
    let onnx = store.join("digits-cnn/model.onnx");
    let out =
        Command::new(python()).arg(example("export.py")).arg(&weights).arg(&onnx).arg(&test).output().expect("python");
    assert!(out.status.success(), "export.py: {}", String::from_utf8_lossy(&out.stderr));
    let torch: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let torch_accuracy = torch["accuracy"].as_f64().expect("accuracy");
    assert!(torch_accuracy >= ACCURACY, "the federated PyTorch model reaches {ACCURACY}: {torch_accuracy} ({acc:?})");

    let models = Models::load_dir(&store, NnBackend::Onnxruntime).expect("the model store loads");
    let cache = tempfile::tempdir().expect("tmp");
    let runtime = Runtime::with_models(Some(cache.path().to_path_buf()), models).expect("runtime");
    let (mut wasm, probe) = crate::nn::probe(&runtime);
    let (mut correct, mut rows) = (0, 0);
    for (i, line) in all.lines().enumerate() {
        let values: Vec<f32> = line.split(',').map(|v| v.trim().parse().expect("number")).collect();
        let (x, label) = values.split_at(64);
        let logits = probe.call_run(&mut wasm, "digits-cnn", "input", &[1, 64], x).expect("call").expect("inference");
        let predicted = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(k, _)| k).expect("10 logits");
        correct += usize::from(predicted == label[0] as usize);
        rows += 1;
        if let Some(expected) = torch["logits"].get(i) {
            for (got, want) in logits.iter().zip(expected.as_array().expect("row")) {
                let want = want.as_f64().expect("f64") as f32;
                assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "row {i}: wasi-nn {got} vs PyTorch {want}");
            }
        }
    }
    let served = correct as f64 / rows as f64;
    eprintln!("pytorch example: accuracy by round {acc:?}; final model on every test split: PyTorch {torch_accuracy:.4}, through wasi-nn {served:.4} ({rows} examples)");
    assert!((served - torch_accuracy).abs() <= 1.0 / rows as f64, "served {served} vs PyTorch {torch_accuracy}");
}
