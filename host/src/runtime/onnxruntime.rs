//! wasi-nn graphs on ONNX Runtime for the node's ONNX models. wasmtime-wasi-nn 48's own ONNX
//! backend keeps one session per model behind a mutex, so every plugin instance running that
//! model waits for the others, and its sessions cannot be told how many threads to use. Here a
//! graph keeps a pool of sessions: a computation takes an idle one (or builds one) and gives it
//! back, so concurrent instances compute in parallel; each session uses `intra_threads` threads
//! for one computation.
use std::sync::{Arc, Mutex};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::tensor::TensorElementType;
use ort::value::{DynValue, Tensor as OrtTensor, ValueType};
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, BackendGraph, Id, NamedTensor};
use wasmtime_wasi_nn::wit::{Tensor, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph};

fn failed(message: impl std::fmt::Display) -> BackendError {
    BackendError::BackendAccess(wasmtime::Error::msg(message.to_string()))
}

fn ort_failed(e: ort::Error) -> BackendError {
    failed(format!("ONNX Runtime: {e}"))
}

/// How a graph's sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionOptions {
    /// Threads one computation uses (ONNX Runtime's intra-op pool); None: ONNX Runtime's default
    /// (one per core).
    pub intra_threads: Option<usize>,
}

struct GraphState {
    onnx: Vec<u8>,
    options: SessionOptions,
    inputs: Vec<String>,
    outputs: Vec<(String, TensorType)>,
    /// Sessions not computing right now.
    idle: Mutex<Vec<Session>>,
}

fn tensor_type(ty: &ValueType) -> Option<TensorType> {
    match ty {
        ValueType::Tensor { ty, .. } => match ty {
            TensorElementType::Float32 => Some(TensorType::Fp32),
            TensorElementType::Float64 => Some(TensorType::Fp64),
            TensorElementType::Uint8 => Some(TensorType::U8),
            TensorElementType::Int32 => Some(TensorType::I32),
            TensorElementType::Int64 => Some(TensorType::I64),
            _ => None,
        },
        _ => None,
    }
}

/// An ONNX Runtime session as the node's graphs run one (`nereid bench serve` builds its native
/// baseline with it too, so both compare the same settings).
pub fn build_session(onnx: &[u8], options: SessionOptions) -> Result<Session, ort::Error> {
    let mut builder = Session::builder()?.with_optimization_level(GraphOptimizationLevel::Level3)?;
    if let Some(n) = options.intra_threads {
        // A session computing on one thread must not spin another core waiting for work.
        builder = builder.with_intra_threads(n)?.with_intra_op_spinning(n > 1)?.with_inter_threads(1)?;
    }
    builder.commit_from_memory(onnx)
}

impl GraphState {
    fn session(&self) -> Result<Session, BackendError> {
        build_session(&self.onnx, self.options).map_err(ort_failed)
    }

    fn take(&self) -> Result<Session, BackendError> {
        match crate::lock(&self.idle).pop() {
            Some(s) => Ok(s),
            None => self.session(),
        }
    }
}

/// Loads an ONNX model for ONNX Runtime (one session now, more when computations overlap).
pub fn load_onnx(onnx: &[u8], options: SessionOptions) -> Result<Graph, BackendError> {
    let mut state = GraphState {
        onnx: onnx.to_vec(),
        options,
        inputs: Vec::new(),
        outputs: Vec::new(),
        idle: Mutex::new(Vec::new()),
    };
    let first = state.session()?;
    state.inputs = first.inputs.iter().map(|i| i.name.clone()).collect();
    state.outputs = first
        .outputs
        .iter()
        .map(|o| {
            tensor_type(&o.output_type)
                .map(|ty| (o.name.clone(), ty))
                .ok_or_else(|| failed(format!("output `{}` is of a type wasi-nn cannot carry", o.name)))
        })
        .collect::<Result<_, _>>()?;
    state.idle = Mutex::new(vec![first]);
    let graph: Box<dyn BackendGraph> = Box::new(OnnxGraph(Arc::new(state)));
    Ok(graph.into())
}

struct OnnxGraph(Arc<GraphState>);

impl BackendGraph for OnnxGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let context: Box<dyn BackendExecutionContext> =
            Box::new(OnnxContext { graph: self.0.clone(), inputs: Vec::new(), outputs: Vec::new() });
        Ok(context.into())
    }
}

/// One plugin's use of a graph: inputs set, outputs of the last computation. Holds no session
/// between computations.
struct OnnxContext {
    graph: Arc<GraphState>,
    inputs: Vec<NamedTensor>,
    outputs: Vec<NamedTensor>,
}

fn values<T: bytemuck::Pod + ort::tensor::PrimitiveTensorElementType + std::fmt::Debug + 'static, const N: usize>(
    t: &Tensor,
    shape: Vec<i64>,
    from: fn([u8; N]) -> T,
) -> Result<DynValue, BackendError> {
    // One copy of the bytes where they already are the values (every little-endian machine).
    let data: Vec<T> = if cfg!(target_endian = "little") {
        let mut data = vec![T::zeroed(); t.data.len() / N];
        bytemuck::cast_slice_mut::<T, u8>(&mut data).copy_from_slice(&t.data);
        data
    } else {
        t.data.chunks_exact(N).map(|c| from(c.try_into().unwrap_or([0; N]))).collect()
    };
    Ok(OrtTensor::from_array((shape, data)).map_err(ort_failed)?.into_dyn())
}

fn to_ort(t: &Tensor) -> Result<DynValue, BackendError> {
    let shape: Vec<i64> = t.dimensions.iter().map(|&d| i64::from(d)).collect();
    let numel: u64 = t.dimensions.iter().map(|&d| u64::from(d)).product();
    let size = match t.ty {
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
        TensorType::U8 => 1,
        TensorType::Fp16 | TensorType::Bf16 => 2,
    };
    if numel.checked_mul(size) != Some(t.data.len() as u64) {
        return Err(failed(format!(
            "tensor of {} bytes for dimensions {:?} ({} expected)",
            t.data.len(),
            t.dimensions,
            numel.saturating_mul(size)
        )));
    }
    match t.ty {
        TensorType::Fp32 => values(t, shape, f32::from_le_bytes),
        TensorType::Fp64 => values(t, shape, f64::from_le_bytes),
        TensorType::I32 => values(t, shape, i32::from_le_bytes),
        TensorType::I64 => values(t, shape, i64::from_le_bytes),
        TensorType::U8 => Ok(OrtTensor::from_array((shape, t.data.clone())).map_err(ort_failed)?.into_dyn()),
        TensorType::Fp16 | TensorType::Bf16 => Err(failed("16-bit float inputs are not supported")),
    }
}

fn from_ort(value: &DynValue, ty: TensorType) -> Result<Tensor, BackendError> {
    fn bytes<T: ort::tensor::PrimitiveTensorElementType + Copy + std::fmt::Debug, const N: usize>(
        value: &DynValue,
        to: fn(T) -> [u8; N],
    ) -> Result<(Vec<u32>, Vec<u8>), BackendError> {
        let (shape, data) = value.try_extract_tensor::<T>().map_err(ort_failed)?;
        let dims: Result<Vec<u32>, BackendError> =
            shape.iter().map(|&d| u32::try_from(d).map_err(|_| failed(format!("dimension {d}")))).collect();
        Ok((dims?, data.iter().flat_map(|v| to(*v)).collect()))
    }
    let (dimensions, data) = match ty {
        TensorType::Fp32 => bytes(value, f32::to_le_bytes)?,
        TensorType::Fp64 => bytes(value, f64::to_le_bytes)?,
        TensorType::I32 => bytes(value, i32::to_le_bytes)?,
        TensorType::I64 => bytes(value, i64::to_le_bytes)?,
        TensorType::U8 => bytes(value, u8::to_le_bytes)?,
        TensorType::Fp16 | TensorType::Bf16 => return Err(failed("16-bit float outputs are not supported")),
    };
    Ok(Tensor { dimensions, ty, data })
}

impl OnnxContext {
    fn input_name(&self, id: Id) -> Result<String, BackendError> {
        match id {
            Id::Index(i) => {
                self.graph.inputs.get(i as usize).cloned().ok_or_else(|| failed(format!("no input at index {i}")))
            }
            Id::Name(name) if self.graph.inputs.contains(&name) => Ok(name),
            Id::Name(name) => Err(failed(format!("the model has no input `{name}`"))),
        }
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let values = self
            .inputs
            .iter()
            .map(|t| Ok((t.name.clone(), to_ort(&t.tensor)?)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        let mut session = self.graph.take()?;
        let outputs = (|| {
            let out = session.run(values).map_err(ort_failed)?;
            self.graph
                .outputs
                .iter()
                .map(|(name, ty)| Ok(NamedTensor { name: name.clone(), tensor: from_ort(&out[name.as_str()], *ty)? }))
                .collect::<Result<Vec<_>, BackendError>>()
        })();
        // A failed run (e.g. a wrong shape) leaves the session as good as before.
        crate::lock(&self.graph.idle).push(session);
        self.outputs = outputs?;
        Ok(())
    }
}

impl BackendExecutionContext for OnnxContext {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let name = self.input_name(id)?;
        self.inputs.retain(|t| t.name != name);
        self.inputs.push(NamedTensor { name, tensor: tensor.clone() });
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        let found = match &id {
            Id::Index(i) => self.outputs.get(*i as usize),
            Id::Name(name) => self.outputs.iter().find(|t| &t.name == name),
        };
        found.map(|t| t.tensor.clone()).ok_or_else(|| failed(format!("no output {id:?}: has `compute` run?")))
    }

    fn compute(&mut self, inputs: Option<Vec<NamedTensor>>) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let named = inputs.is_some();
        if let Some(inputs) = inputs {
            self.inputs.clear();
            for input in inputs {
                self.set_input(Id::Name(input.name), &input.tensor)?;
            }
        }
        self.run()?;
        Ok(named.then(|| std::mem::take(&mut self.outputs)))
    }
}
