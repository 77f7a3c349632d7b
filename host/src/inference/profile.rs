//! Profiling a model on this node with ONNX Runtime: the time of every node (from ONNX
//! Runtime's own per-kernel trace), and the type and size of every tensor (from one run with
//! every intermediate tensor exposed as an output), which split inference plans with.
use std::collections::BTreeMap;
use std::time::Instant;

use nereid_onnx::proto::{data_type, Dim, ValueInfoProto};
use nereid_onnx::{Message, Model};
use ort::tensor::TensorElementType;
use ort::value::ValueType;

use super::native::{NativeError, NativeModel};
use super::wire;
use crate::runtime::{InputSpec, TensorData};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Onnx(#[from] nereid_onnx::OnnxError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error("profiling: {0}")]
    Other(String),
}

/// A model as profiled on this node.
#[derive(Debug, Clone)]
pub struct Profiled {
    /// The model with every tensor typed (so any cut can be written as two models).
    pub model: Model,
    /// Expected milliseconds per node (see [`time`]; nodes ONNX Runtime fused into another
    /// count in that one).
    pub node_ms: BTreeMap<String, f64>,
    /// Bytes of every tensor for one request of the profiled batch size.
    pub tensor_bytes: BTreeMap<String, u64>,
    /// Median wall time of one whole run, in milliseconds.
    pub run_ms: f64,
}

fn element(ty: TensorElementType) -> Option<(i32, u64)> {
    Some(match ty {
        TensorElementType::Float32 => (data_type::FLOAT, 4),
        TensorElementType::Float64 => (data_type::DOUBLE, 8),
        TensorElementType::Int64 => (data_type::INT64, 8),
        TensorElementType::Int32 => (data_type::INT32, 4),
        TensorElementType::Uint8 => (data_type::UINT8, 1),
        TensorElementType::Int8 => (data_type::INT8, 1),
        TensorElementType::Bool => (data_type::BOOL, 1),
        TensorElementType::Float16 => (data_type::FLOAT16, 2),
        _ => return None,
    })
}

/// Every runtime input's name, element type and shape (None for an open dimension).
pub fn input_specs(model: &Model) -> Result<Vec<InputSpec>, ProfileError> {
    model
        .runtime_inputs()
        .into_iter()
        .map(|input| {
            let (elem, dims) = input
                .r#type
                .as_ref()
                .and_then(|t| t.tensor_shape())
                .ok_or_else(|| ProfileError::Other(format!("input `{}` has no tensor shape", input.name)))?;
            let dtype = wire::dtype_of_onnx(elem).ok_or_else(|| {
                ProfileError::Other(format!("input `{}`: element type {elem} is not supported", input.name))
            })?;
            let shape = dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => u64::try_from(*n).ok(),
                    Dim::Symbolic(_) => None,
                })
                .collect();
            Ok(InputSpec { name: input.name.clone(), dtype, shape })
        })
        .collect()
}

/// Inputs of zeros for every runtime input, open dimensions set to `batch`.
pub fn synthetic_inputs(model: &Model, batch: u64) -> Result<Vec<TensorData>, ProfileError> {
    Ok(input_specs(model)?
        .into_iter()
        .map(|spec| {
            let shape: Vec<u64> = spec.shape.iter().map(|d| d.unwrap_or(batch)).collect();
            let numel: u64 = shape.iter().product();
            let bytes = numel as usize * wire::element_size(spec.dtype);
            TensorData { name: spec.name, dtype: spec.dtype, shape, data: vec![0u8; bytes] }
        })
        .collect())
}

/// Inputs like [`synthetic_inputs`] but filled with a fixed pseudo-random pattern in [-1, 1)
/// (benchmarks: the same input every run, not zeros a kernel could shortcut). f32 inputs only.
pub fn patterned_inputs(model: &Model, batch: u64) -> Result<Vec<TensorData>, ProfileError> {
    let mut tensors = synthetic_inputs(model, batch)?;
    for t in &mut tensors {
        if t.dtype != crate::runtime::bindings::types::Dtype::F32 {
            return Err(ProfileError::Other(format!("input `{}`: only f32 inputs are filled", t.name)));
        }
        t.data = (0..t.data.len() / 4)
            .flat_map(|i| ((((i as u32).wrapping_mul(2654435761) >> 8) % 1000) as f32 / 500.0 - 1.0).to_le_bytes())
            .collect();
    }
    Ok(tensors)
}

/// Per tensor: ONNX element type, dims, bytes.
type Measured = BTreeMap<String, (i32, Vec<i64>, u64)>;

/// Shape and element type of every tensor, in one run of `model` with all of them exposed.
fn measure_tensors(model: &Model, batch: u64) -> Result<Measured, ProfileError> {
    let exposed = NativeModel::new(&model.with_all_outputs().encode_to_vec())?;
    let inputs = synthetic_inputs(model, batch)?;
    let mut measured = BTreeMap::new();
    for t in &inputs {
        measured.insert(
            t.name.clone(),
            (wire::onnx_element(t.dtype), t.shape.iter().map(|&d| d as i64).collect(), t.data.len() as u64),
        );
    }
    exposed.for_each_output(&inputs, |name, dtype| {
        if let ValueType::Tensor { ty, shape, .. } = dtype {
            if let Some((elem, size)) = element(*ty) {
                let dims: Vec<i64> = shape.iter().copied().collect();
                let numel: i64 = dims.iter().product();
                measured.insert(name.to_string(), (elem, dims, numel.max(0) as u64 * size));
            }
        }
    })?;
    Ok(measured)
}

/// A model with every tensor typed, and each tensor's bytes for one request.
pub struct Typed {
    pub model: Model,
    pub tensor_bytes: BTreeMap<String, u64>,
}

/// Types every tensor of `onnx` from one run with all of them exposed (two when the batch
/// dimension is open: dimensions that change with it stay open in the types written into halves).
pub fn typed(onnx: &[u8]) -> Result<Typed, ProfileError> {
    let mut model = Model::decode(onnx)?;
    let at_1 = measure_tensors(&model, 1)?;
    let open_batch = model.runtime_inputs().iter().any(|i| {
        i.r#type
            .as_ref()
            .and_then(|t| t.tensor_shape())
            .is_some_and(|(_, d)| d.iter().any(|d| matches!(d, Dim::Symbolic(_))))
    });
    let at_2 = if open_batch { Some(measure_tensors(&model, 2)?) } else { None };
    let types: Vec<ValueInfoProto> = at_1
        .iter()
        .map(|(name, (elem, dims, _))| {
            let other = at_2.as_ref().and_then(|m| m.get(name)).map(|(_, d, _)| d);
            let dims: Vec<Dim> = dims
                .iter()
                .enumerate()
                .map(|(i, &d)| match other.and_then(|o| o.get(i)) {
                    Some(&d2) if d2 != d => Dim::Symbolic("N".into()),
                    _ => Dim::Fixed(d),
                })
                .collect();
            ValueInfoProto::tensor(name, *elem, &dims)
        })
        .collect();
    model.annotate(types);
    let tensor_bytes = at_1.into_iter().map(|(name, (_, _, bytes))| (name, bytes)).collect();
    Ok(Typed { model, tensor_bytes })
}

/// Times of one model on this node.
pub struct Timing {
    /// Expected milliseconds per node (see [`time`]; nodes ONNX Runtime fused into another
    /// count in that one).
    pub node_ms: BTreeMap<String, f64>,
    /// Median wall time of one whole run, in milliseconds.
    pub run_ms: f64,
}

/// Times `model` (typed, see [`typed`]): `runs` timed runs after a warm-up.
///
/// A node's time is its fastest run, scaled so that the nodes add up to the mean wall time of
/// a run: so they share the waits of slow runs (and the time between kernels) in proportion to
/// their cost. Means per node would give the waits to whichever node was running when they
/// came, and under a CPU limit (a CFS quota, as a container's CPU limit sets) a run goes at
/// full speed until the quota is overdrawn and then waits whole periods: with 20 runs a
/// pooling node of microseconds was measured at 10 ms and the plan cut after it, on an edge
/// limited to a tenth of a core. (Medians are no better: a node longer than a quota waits in
/// most runs.)
pub fn time(model: &Model, runs: usize) -> Result<Timing, ProfileError> {
    let trace_dir = tempfile::tempdir().map_err(|e| ProfileError::Other(e.to_string()))?;
    let session = NativeModel::with_profiling(&model.encode(), &trace_dir.path().join("ort"))?;
    let inputs = synthetic_inputs(model, 1)?;
    const WARMUP: usize = 3;
    let runs = runs.max(1);
    let mut wall = Vec::with_capacity(runs);
    for i in 0..WARMUP + runs {
        let start = Instant::now();
        session.run_any(&inputs)?;
        if i >= WARMUP {
            wall.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let trace = session.end_profiling()?;
    let text = std::fs::read_to_string(&trace).map_err(|e| ProfileError::Other(format!("{trace}: {e}")))?;
    let mean = wall.iter().sum::<f64>() / wall.len() as f64;
    let fastest = node_times(&text, runs)?;
    let sum: f64 = fastest.values().sum();
    let scale = if sum > 0.0 { mean / sum } else { 1.0 };
    let node_ms = fastest.into_iter().map(|(node, ms)| (node, ms * scale)).collect();
    Ok(Timing { node_ms, run_ms: median(&mut wall) })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Types `onnx` (see [`typed`]) and times it (see [`time`]).
pub fn profile(onnx: &[u8], runs: usize) -> Result<Profiled, ProfileError> {
    let Typed { model, tensor_bytes } = typed(onnx)?;
    let Timing { node_ms, run_ms } = time(&model, runs)?;
    Ok(Profiled { model, node_ms, tensor_bytes, run_ms })
}

impl Profiled {
    /// What the splitter plans from: this node's times as the edge's, `cloud_ms` as the cloud's.
    pub fn split_profile(&self, cloud_ms: BTreeMap<String, f64>) -> nereid_onnx::Profile {
        nereid_onnx::Profile { edge_ms: self.node_ms.clone(), cloud_ms, tensor_bytes: self.tensor_bytes.clone() }
    }
}

/// Fastest duration per node over its last `runs` kernel events (the warm-up runs come first).
fn node_times(trace: &str, runs: usize) -> Result<BTreeMap<String, f64>, ProfileError> {
    #[derive(serde::Deserialize)]
    struct Event {
        #[serde(default)]
        cat: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        dur: f64,
        #[serde(default)]
        ts: f64,
    }
    let events: Vec<Event> =
        serde_json::from_str(trace).map_err(|e| ProfileError::Other(format!("ONNX Runtime's trace: {e}")))?;
    let mut per_node: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for e in events {
        if e.cat != "Node" {
            continue;
        }
        if let Some(kernel) = e.name.strip_suffix("_kernel_time") {
            // Level-3 optimisation renames what it rewrites: a fusion is `fused <last node>`
            // (e.g. Conv+Relu under the Relu's name), a layout change `<node>_nchwc`. The time
            // counts for that node; inserted reorder kernels match no node and are left out.
            let node = kernel.trim_start_matches("fused ").trim_end_matches("_nchwc");
            per_node.entry(node.to_string()).or_default().push((e.ts, e.dur));
        }
    }
    Ok(per_node
        .into_iter()
        .map(|(node, mut events)| {
            events.sort_by(|a, b| a.0.total_cmp(&b.0));
            let last = &events[events.len().saturating_sub(runs)..];
            (node, last.iter().map(|(_, d)| *d).fold(f64::INFINITY, f64::min) / 1e3)
        })
        .collect())
}
