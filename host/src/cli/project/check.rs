//! The slot checks `nereid plugin test` runs on a built component (and `plugin build` after
//! building): every call of the slot made with small generated inputs, and the answers held to
//! the contract's rules (the layout of a model kept, no NaN produced, evictions only of held
//! samples, draws only of held ones, a tensor per model input, ...). They know nothing of the
//! plugin's algorithm, so any correct plugin of the slot passes and a broken one fails, naming
//! the call and what was wrong.
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use nereid::inference::export::to_onnx;
use nereid::inference::native::NativeModel;
use nereid::inference::profile;
use nereid::runtime::bindings::types::{ConfigEntry, ConfigValue, Dtype};
use nereid::runtime::config::ConfigTable;
use nereid::runtime::nn::Models;
use nereid::runtime::{
    AdapterPlugin, Admission, AggregatorPlugin, ClientUpdate, CompressorPlugin, InputSpec, Limits, LoadedComponent,
    ObjectivePlugin, RoundContext, RouterPlugin, Runtime, SampleRef, SamplerPlugin, Slot, SplitterPlugin, TensorData,
    UpdateKind,
};
use nereid::tensor::Tensor;
use nereid::train::ModelSpec;
use nereid_onnx::Message;

/// One check that passed, for the report.
pub struct Passed {
    pub name: &'static str,
    pub millis: f64,
}

/// A payload for the adapter check: its content type and bytes (from `[test]` in plugin.toml).
pub type AdapterInput = (String, Vec<u8>);

/// Runs the checks of `slot` on `loaded` (configured with `config`). An adapter decodes
/// `adapter_input`, by default two rows of four f32 as raw little-endian bytes
/// (`application/octet-stream`).
pub fn run(
    runtime: &Runtime,
    models: &Models,
    loaded: &LoadedComponent,
    slot: Slot,
    limits: Limits,
    config: &ConfigTable,
    adapter_input: Option<AdapterInput>,
) -> anyhow::Result<Vec<Passed>> {
    let mut passed = Vec::new();
    let mut check = |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        let started = Instant::now();
        f().with_context(|| format!("check `{name}` failed"))?;
        passed.push(Passed { name, millis: started.elapsed().as_secs_f64() * 1e3 });
        Ok(())
    };
    let ctx = |round| RoundContext { job: "plugin-test".into(), round, seed: 42 };
    match slot {
        Slot::Aggregator => {
            let mut p = AggregatorPlugin::new(runtime, loaded.clone(), limits, config)?;
            check("a round of weights keeps the model's layout", &mut || {
                p.begin_round(&ctx(1), None)?;
                for (k, n) in [(0, 10), (1, 20), (2, 30)] {
                    p.accumulate(&update(k, n, UpdateKind::Weights, model(k as f32)))?;
                }
                same_layout("the aggregate", &p.finish()?.tensors, &model(0.0))
            })?;
            check("a round of deltas over a global model keeps its layout", &mut || {
                let global = model(5.0);
                p.begin_round(&ctx(2), Some(&global))?;
                for (k, n) in [(0, 1), (1, 3)] {
                    p.accumulate(&update(k, n, UpdateKind::Delta, model(0.1 * k as f32)))?;
                }
                same_layout("the aggregate", &p.finish()?.tensors, &global)
            })?;
            check("an update with NaN does not poison the model", &mut || {
                p.begin_round(&ctx(3), None)?;
                p.accumulate(&update(0, 5, UpdateKind::Weights, model(1.0)))?;
                let mut bad = model(2.0);
                bad[0].1 = Tensor::from_f32(vec![4, 3], vec![f32::NAN; 12]).context("a tensor")?;
                // Refusing it is right; accepting it is right only if the result stays finite.
                let _ = p.accumulate(&update(1, 5, UpdateKind::Weights, bad));
                let out = p.finish()?;
                ensure!(out.tensors.iter().all(|(_, t)| t.all_finite()), "the aggregate contains NaN or Inf");
                Ok(())
            })?;
        }
        Slot::ClientObjective => {
            let mut p = ObjectivePlugin::new(runtime, loaded.clone(), limits, config)?;
            check("penalty and gradient are finite and keep the shape", &mut || {
                let global = model(1.0);
                let server = [ConfigEntry { key: "mu".into(), value: ConfigValue::Float(0.1) }];
                p.begin_round(&ctx(1), &global, &server)?;
                for (name, weight) in model(1.5) {
                    let penalty = p.penalty(&name, &weight)?;
                    ensure!(penalty.is_finite(), "penalty of `{name}` is {penalty}");
                    let mut gradient = weight.clone();
                    p.adjust_gradient(&name, &weight, &mut gradient)?;
                    ensure!(gradient.shape() == weight.shape(), "the gradient of `{name}` changed shape");
                    ensure!(gradient.all_finite(), "the gradient of `{name}` has NaN or Inf");
                }
                Ok(())
            })?;
        }
        Slot::Sampler => {
            let mut p = SamplerPlugin::new(runtime, loaded.clone(), limits, config)?;
            check("evicts only held samples and draws only held ones", &mut || {
                p.restore(&[], 0)?;
                let mut held = Vec::new();
                for id in 0..2000u64 {
                    match p.offer(SampleRef { id, label: (id % 10) as i64 })? {
                        Admission::Keep(None) => held.push(id),
                        Admission::Keep(Some(evicted)) => {
                            let at = held.iter().position(|h| *h == evicted);
                            let at = at.with_context(|| format!("offer {id}: evicted {evicted}, which is not held"))?;
                            held[at] = id;
                        }
                        Admission::Discard => {}
                    }
                }
                ensure!(!held.is_empty(), "kept none of 2,000 samples");
                let drawn = p.draw(&ctx(1), 16)?;
                ensure!(drawn.len() <= 16, "drew {} ids for a batch of 16", drawn.len());
                if let Some(id) = drawn.iter().find(|id| !held.contains(id)) {
                    bail!("drew {id}, which is not held");
                }
                Ok(())
            })?;
            check("restores from what a buffer holds", &mut || {
                let held: Vec<SampleRef> = (0..5).map(|id| SampleRef { id, label: 0 }).collect();
                p.restore(&held, 5)?;
                let drawn = p.draw(&ctx(2), 3)?;
                if let Some(id) = drawn.iter().find(|id| **id >= 5) {
                    bail!("after a restore with ids 0..5 it drew {id}");
                }
                Ok(())
            })?;
        }
        Slot::Compressor => {
            let mut p = CompressorPlugin::new(runtime, loaded.clone(), limits, config)?;
            check("decode(encode(update)) has the update's layout and is finite", &mut || {
                let update = model(0.25);
                let payload = p.encode(&ctx(1), &update)?;
                let back = p.decode(&ctx(1), &payload, "the encoded update")?;
                same_layout("the decoded update", &back, &update)
            })?;
        }
        Slot::Router => {
            // A small MLP with a softmax output, registered for the plugin's wasi-nn.
            models.insert(TEST_MODEL, &test_mlp(4)?)?;
            let mut p = RouterPlugin::new(runtime, loaded.clone(), limits, config)?;
            check("runs a model through wasi-nn", &mut || {
                let input: Vec<u8> = (0..16).flat_map(|i| (i as f32 * 0.1).to_le_bytes()).collect();
                let inputs = [TensorData { name: "input".into(), dtype: Dtype::F32, shape: vec![2, 8], data: input }];
                let out = p.run(TEST_MODEL, &inputs)?;
                ensure!(out.len() == 1, "the model has one output, the runner gave {}", out.len());
                ensure!(
                    out[0].shape == [2, 4] && out[0].dtype == Dtype::F32,
                    "output {:?} {:?}",
                    out[0].dtype,
                    out[0].shape
                );
                let probs = Tensor::new(
                    vec![2, 4],
                    nereid::tensor::Buffer::from_le_bytes(nereid::tensor::DType::F32, &out[0].data)
                        .context("f32 bytes")?,
                )
                .context("shape")?;
                let d = p.decide(&probs)?;
                ensure!(d.score.is_finite(), "score {}", d.score);
                Ok(())
            })?;
            check("decides on class probabilities with a finite score", &mut || {
                for probs in [vec![0.97f32, 0.01, 0.01, 0.01], vec![0.25; 4]] {
                    let output = Tensor::from_f32(vec![1, 4], probs).context("a tensor")?;
                    let d = p.decide(&output)?;
                    ensure!(d.score.is_finite(), "score {}", d.score);
                }
                Ok(())
            })?;
        }
        Slot::Adapter => {
            let mut p = AdapterPlugin::new(runtime, loaded.clone(), limits, config)?;
            check("gives one tensor per model input, of its type and shape", &mut || {
                let (content_type, payload) = adapter_input.clone().unwrap_or_else(|| {
                    let rows = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
                    ("application/octet-stream".into(), rows.iter().flat_map(|v| v.to_le_bytes()).collect())
                });
                let inputs = [InputSpec { name: "input".into(), dtype: Dtype::F32, shape: vec![None, Some(4)] }];
                let out = p.decode(&content_type, &payload, &inputs)?;
                ensure!(out.len() == 1 && out[0].name == "input", "expected one tensor `input`, got {}", out.len());
                let t = &out[0];
                ensure!(t.dtype == Dtype::F32, "`input` is not f32");
                ensure!(t.shape.len() == 2 && t.shape[1] == 4, "`input` has shape {:?}, expected [n, 4]", t.shape);
                let elements = t.shape.iter().product::<u64>();
                ensure!(t.data.len() as u64 == elements * 4, "`input` has {} bytes for {elements} f32", t.data.len());
                Ok(())
            })?;
        }
        Slot::Splitter => {
            let mut p = SplitterPlugin::new(runtime, loaded.clone(), limits, config)?;
            // A small MLP, profiled by ONNX Runtime as `nereid model plan` does.
            let profiled = profile::profile(&test_mlp(3)?, 3)?;
            let split = profiled.split_profile(profiled.node_ms.clone());
            let typed = profiled.model.encode();
            let mut cuts = Vec::new();
            check("plans cuts of the model's own tensors", &mut || {
                cuts = p.plan(&typed, &split, 10.0, 5.0)?;
                ensure!(!cuts.is_empty(), "no cut planned");
                for c in &cuts {
                    ensure!(
                        c.predicted_ms.is_finite() && c.predicted_ms >= 0.0,
                        "cut {:?}: {} ms",
                        c.tensors,
                        c.predicted_ms
                    );
                    if let Some(t) = c.tensors.iter().find(|t| !split.tensor_bytes.contains_key(*t)) {
                        bail!("cut {:?} names `{t}`, which is not a tensor of the model", c.tensors);
                    }
                }
                Ok(())
            })?;
            check("the head then the tail compute what the whole model computes, at every cut", &mut || {
                let x: Vec<u8> = (0..16).flat_map(|i| (i as f32 * 0.3 - 2.0).to_le_bytes()).collect();
                let x = TensorData { name: "input".into(), dtype: Dtype::F32, shape: vec![2, 8], data: x };
                let whole = NativeModel::new(&typed)?.run(std::slice::from_ref(&x))?;
                for c in &cuts {
                    let (head, tail) = p.partition(&typed, &c.tensors)?;
                    let mut at_cut = vec![x.clone()];
                    if let Some(head) = head {
                        at_cut = NativeModel::new(&head)
                            .with_context(|| format!("cut {:?}: the head", c.tensors))?
                            .run(std::slice::from_ref(&x))?;
                        at_cut.extend(c.tensors.iter().filter(|t| *t == &x.name).map(|_| x.clone()));
                    }
                    let out = match tail {
                        Some(tail) => NativeModel::new(&tail)
                            .with_context(|| format!("cut {:?}: the tail", c.tensors))?
                            .run(&at_cut)?,
                        None => at_cut,
                    };
                    let same = out.len() == whole.len()
                        && out
                            .iter()
                            .zip(&whole)
                            .all(|(a, b)| a.name == b.name && a.shape == b.shape && close(&a.data, &b.data));
                    ensure!(same, "cut {:?}: the halves' outputs differ from the whole model's", c.tensors);
                }
                Ok(())
            })?;
        }
    }
    Ok(passed)
}

/// f32 values within 1e-5 (relative) of each other.
fn close(a: &[u8], b: &[u8]) -> bool {
    let f = |d: &[u8]| d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
    let (a, b) = (f(a), f(b));
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
}

/// The checks' model: an MLP of 8 inputs, 6 hidden units and `classes` softmax outputs (input
/// `input`), as ONNX.
fn test_mlp(classes: usize) -> anyhow::Result<Vec<u8>> {
    let spec = ModelSpec::Mlp { inputs: 8, hidden: vec![6], classes };
    Ok(to_onnx(&spec, &spec.init(1))?.encode_to_vec())
}

/// The name the router check registers its model under.
const TEST_MODEL: &str = "plugin-test-mlp";

/// A small model: two f32 tensors, every element `v` (plus a ramp, so elements differ).
fn model(v: f32) -> Vec<(String, Tensor)> {
    let ramp = |n: usize| (0..n).map(|i| v + i as f32 * 0.01).collect::<Vec<_>>();
    vec![
        ("layer.weight".into(), Tensor::from_f32(vec![4, 3], ramp(12)).expect("12 elements")),
        ("layer.bias".into(), Tensor::from_f32(vec![4], ramp(4)).expect("4 elements")),
    ]
}

fn update(k: usize, examples: u64, kind: UpdateKind, tensors: Vec<(String, Tensor)>) -> ClientUpdate {
    ClientUpdate {
        client: format!("client-{k}"),
        kind,
        tensors,
        num_examples: examples,
        metrics: Vec::new(),
        file: None,
    }
}

fn same_layout(what: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) -> anyhow::Result<()> {
    for (name, w) in want {
        let t = got.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let t = t.with_context(|| format!("{what} has no tensor `{name}`"))?;
        ensure!(t.dtype() == w.dtype(), "{what}: `{name}` is {:?}, expected {:?}", t.dtype(), w.dtype());
        ensure!(t.shape() == w.shape(), "{what}: `{name}` has shape {:?}, expected {:?}", t.shape(), w.shape());
        ensure!(t.all_finite(), "{what}: `{name}` has NaN or Inf");
    }
    ensure!(got.len() == want.len(), "{what} has {} tensors, expected {}", got.len(), want.len());
    Ok(())
}
