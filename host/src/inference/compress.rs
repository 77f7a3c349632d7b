//! Model compression pipelines (`nereid model compress`): compressor plugins rewrite an ONNX
//! model pass by pass; the host measures size, sparsity and accuracy before and after.
//!
//! A pipeline file (TOML, paths relative to it):
//! ```toml
//! eval = "data"              # optional: a data directory; its test split is the eval set
//! calibration = "data"       # optional: a data directory; its train split's first rows
//! calibration_samples = 64   #   are the calibration samples (static quantization)
//! # or calibration_replay = "edge.db": the first samples an edge's replay buffer holds
//!
//! [[pass]]
//! plugin = "quantize"        # a built plugin's name, a .wasm path, or an oci:// reference
//! timeout_ms = 60000         # optional limits, as in job files
//! memory_mib = 256
//! [pass.config]
//! model_pass = "int8-static"
//! ```
use std::io::Write;
use std::path::Path;

use nereid_onnx::proto::{data_type, ModelProto};
use nereid_onnx::Message;
use serde::Serialize;

use crate::inference::profile::input_specs;
use crate::inference::wire;
use crate::inference::NativeModel;
use crate::model_io::NamedTensors;
use crate::runtime::bindings::types::Dtype;
use crate::runtime::TensorData;
use crate::tensor::Tensor;
use crate::train::Dataset;

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("{0}")]
    Model(String),
    #[error("{origin}: {message}")]
    Data { origin: String, message: String },
    #[error(transparent)]
    Native(#[from] crate::inference::native::NativeError),
}

/// The single input of a model the compressor evaluates: its name and per-example shape.
pub fn example_input(onnx: &[u8]) -> Result<(String, Vec<u64>), CompressError> {
    let model = nereid_onnx::Model::decode(onnx).map_err(|e| CompressError::Model(e.to_string()))?;
    let specs = input_specs(&model).map_err(|e| CompressError::Model(e.to_string()))?;
    let [spec] = &specs[..] else {
        return Err(CompressError::Model(format!(
            "the model has {} inputs; evaluation and calibration take models with one",
            specs.len()
        )));
    };
    if spec.dtype != Dtype::F32 {
        return Err(CompressError::Model(format!("input `{}` is not float32", spec.name)));
    }
    // The first dimension is the batch; the others must be fixed.
    let dims =
        spec.shape.iter().skip(1).map(|d| d.ok_or(())).collect::<Result<Vec<u64>, ()>>().map_err(|_| {
            CompressError::Model(format!("input `{}` has an open dimension besides the batch", spec.name))
        })?;
    Ok((spec.name.clone(), dims))
}

fn batch(name: &str, dims: &[u64], data: &Dataset, rows: std::ops::Range<usize>) -> TensorData {
    let mut shape = vec![rows.len() as u64];
    shape.extend_from_slice(dims);
    let values: Vec<f32> = rows.flat_map(|r| data.row(r).iter().copied()).collect();
    wire::f32_tensor(name, shape, &values)
}

fn check_features(origin: &str, dims: &[u64], data: &Dataset) -> Result<(), CompressError> {
    let want: u64 = dims.iter().product();
    if data.features as u64 != want {
        return Err(CompressError::Data {
            origin: origin.into(),
            message: format!("examples have {} features, the model's input takes {want} ({dims:?})", data.features),
        });
    }
    Ok(())
}

/// How a classifier does on labelled data, run by ONNX Runtime: the accuracy of the argmax of
/// its first output, and the mean cross-entropy of that output's softmax (the output taken as
/// class scores, logits).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Accuracy {
    pub accuracy: f64,
    pub loss: f64,
    pub examples: usize,
}

pub fn evaluate(onnx: &[u8], data: &Dataset, origin: &str) -> Result<Accuracy, CompressError> {
    let (name, dims) = example_input(onnx)?;
    check_features(origin, &dims, data)?;
    let model = NativeModel::new(onnx)?;
    let (mut correct, mut loss) = (0, 0.0);
    let step = 256;
    for start in (0..data.len()).step_by(step) {
        let end = (start + step).min(data.len());
        let outputs = model.run(&[batch(&name, &dims, data, start..end)])?;
        let first = outputs.first().ok_or_else(|| CompressError::Model("the model has no output".into()))?;
        let values = wire::f32_values(first).map_err(|e| CompressError::Model(e.to_string()))?;
        let classes = values.len() / (end - start).max(1);
        for (i, row) in values.chunks(classes.max(1)).enumerate() {
            let label = data.y[start + i] as usize;
            let predicted = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(c, _)| c);
            correct += usize::from(predicted == label);
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_sum = top + row.iter().map(|&v| (v as f64 - top).exp()).sum::<f64>().ln();
            let score = row.get(label).copied().ok_or_else(|| CompressError::Data {
                origin: origin.into(),
                message: format!("label {label} of example {}: the model gives {classes} classes", start + i),
            })?;
            loss += log_sum - score as f64;
        }
    }
    let n = data.len().max(1) as f64;
    Ok(Accuracy { accuracy: correct as f64 / n, loss: loss / n, examples: data.len() })
}

/// The first `count` examples of `data`, one calibration sample each (batch of 1).
pub fn calibration_samples(
    onnx: &[u8],
    data: &Dataset,
    count: usize,
    origin: &str,
) -> Result<Vec<NamedTensors>, CompressError> {
    let (name, dims) = example_input(onnx)?;
    check_features(origin, &dims, data)?;
    let mut shape = vec![1];
    shape.extend_from_slice(&dims);
    (0..count.min(data.len()))
        .map(|r| {
            let t = Tensor::from_f32(shape.clone(), data.row(r).to_vec())
                .ok_or_else(|| CompressError::Model("calibration sample shape".into()))?;
            Ok(vec![(name.clone(), t)])
        })
        .collect()
}

/// The first `count` samples an edge's replay buffer holds (in `edge_db`), one calibration
/// sample each; they must be float32 with the model's per-example shape.
pub fn replay_calibration_samples(
    onnx: &[u8],
    edge_db: &Path,
    count: usize,
) -> Result<Vec<NamedTensors>, CompressError> {
    let origin = edge_db.display().to_string();
    let data = |message: String| CompressError::Data { origin: origin.clone(), message };
    let (name, dims) = example_input(onnx)?;
    let store = crate::store::EdgeStore::open(edge_db).map_err(|e| data(e.to_string()))?;
    let state = store.replay_state().map_err(|e| data(e.to_string()))?;
    let want = format!("f32[{}]", dims.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
    let flat = format!("f32[{}]", dims.iter().product::<u64>());
    match state.layout.as_deref() {
        Some(l) if l == want || l == flat => {}
        other => {
            return Err(data(format!(
                "the replay buffer holds {} samples; the model's input takes {want}",
                other.unwrap_or("no")
            )))
        }
    }
    let ids: Vec<u64> = state.held.iter().take(count).map(|(id, _)| *id).collect();
    let mut shape = vec![1];
    shape.extend_from_slice(&dims);
    store
        .replay_samples(&ids)
        .map_err(|e| data(e.to_string()))?
        .into_iter()
        .map(|(id, _, bytes)| {
            let t = Tensor::from_f32(shape.clone(), wire::le_f32s(&bytes))
                .ok_or_else(|| data(format!("sample {id}: wrong size")))?;
            Ok(vec![(name.clone(), t)])
        })
        .collect()
}

/// Size of an ONNX model, and of its weights: float32 and INT8 elements of initializers of rank
/// >= 2, and how many of them are zero.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelSize {
    pub bytes: u64,
    /// Deflate (gzip -6) of the file: what pruning saves shows here.
    pub gzip_bytes: u64,
    pub float_weights: u64,
    pub zero_weights: u64,
    pub int8_weights: u64,
}

pub fn model_size(onnx: &[u8]) -> Result<ModelSize, CompressError> {
    let model = ModelProto::decode(onnx).map_err(|e| CompressError::Model(format!("not an ONNX model: {e}")))?;
    let graph = model.graph.as_ref().ok_or_else(|| CompressError::Model("the model has no graph".into()))?;
    let (mut float_weights, mut zero_weights, mut int8_weights) = (0, 0, 0);
    for t in graph.initializer.iter().filter(|t| t.dims.len() >= 2) {
        let n = t.dims.iter().product::<i64>().max(0) as u64;
        match t.data_type {
            data_type::FLOAT => {
                float_weights += n;
                zero_weights += t.f32_values().map_or(0, |v| v.iter().filter(|x| **x == 0.0).count()) as u64;
            }
            data_type::INT8 => {
                int8_weights += n;
                zero_weights += t.raw_data.as_ref().map_or(0, |raw| raw.iter().filter(|b| **b == 0).count()) as u64;
            }
            _ => {}
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let gzip_bytes = gz.write_all(onnx).and_then(|_| gz.finish()).map(|v| v.len() as u64).unwrap_or(0);
    Ok(ModelSize { bytes: onnx.len() as u64, gzip_bytes, float_weights, zero_weights, int8_weights })
}

/// Loads a data directory's split, naming the directory in errors.
pub fn load_data(dir: &Path, split: &str) -> Result<Dataset, CompressError> {
    Dataset::load(dir, split)
        .map_err(|e| CompressError::Data { origin: dir.display().to_string(), message: e.to_string() })
}
