//! Inference through wasi-nn: the plugin names a model and ONNX Runtime runs it natively in the
//! host. Graphs and execution contexts are kept per model name for the life of the instance.
use std::cell::RefCell;
use std::collections::HashMap;

use crate::{DType, PluginError, TensorData};

mod wasi_nn {
    wit_bindgen::generate!({ path: "../wit/deps/wasi-nn", world: "ml" });
}

use wasi_nn::wasi::nn::graph::{load, load_by_name, ExecutionTarget, Graph, GraphEncoding};
use wasi_nn::wasi::nn::inference::GraphExecutionContext;
use wasi_nn::wasi::nn::tensor::{Tensor as NnTensor, TensorType};

thread_local! {
    static LOADED: RefCell<HashMap<String, (Graph, GraphExecutionContext)>> = RefCell::new(HashMap::new());
}

fn to_nn(dtype: DType) -> Result<TensorType, PluginError> {
    Ok(match dtype {
        DType::F32 => TensorType::Fp32,
        DType::F64 => TensorType::Fp64,
        DType::U8 => TensorType::U8,
        DType::I32 => TensorType::I32,
        DType::I64 => TensorType::I64,
        DType::I8 => return Err(PluginError::rejected("wasi-nn has no i8 tensors")),
    })
}

fn from_nn(ty: TensorType) -> Result<DType, PluginError> {
    Ok(match ty {
        TensorType::Fp32 => DType::F32,
        TensorType::Fp64 => DType::F64,
        TensorType::U8 => DType::U8,
        TensorType::I32 => DType::I32,
        TensorType::I64 => DType::I64,
        TensorType::Fp16 | TensorType::Bf16 => {
            return Err(PluginError::Internal("the model returned a 16-bit float tensor".into()))
        }
    })
}

fn to_nn_tensors(inputs: Vec<TensorData>) -> Result<Vec<(String, NnTensor)>, PluginError> {
    inputs
        .into_iter()
        .map(|t| {
            let dims = t
                .shape
                .iter()
                .map(|&d| {
                    u32::try_from(d)
                        .map_err(|_| PluginError::rejected(format!("input `{}`: dimension {d} too large", t.name)))
                })
                .collect::<Result<Vec<u32>, _>>()?;
            Ok((t.name, NnTensor::new(&dims, to_nn(t.dtype)?, &t.data)))
        })
        .collect()
}

fn from_nn_tensors(outputs: Vec<(String, NnTensor)>) -> Result<Vec<TensorData>, PluginError> {
    outputs
        .into_iter()
        .map(|(name, t)| {
            Ok(TensorData {
                name,
                dtype: from_nn(t.ty())?,
                shape: t.dimensions().into_iter().map(u64::from).collect(),
                data: t.data(),
            })
        })
        .collect()
}

/// Runs `model` (a name the host registered) on `inputs`; outputs in the model's order.
pub fn run(model: &str, inputs: Vec<TensorData>) -> Result<Vec<TensorData>, PluginError> {
    let tensors = to_nn_tensors(inputs)?;
    let outputs = LOADED.with(|loaded| {
        let mut loaded = loaded.borrow_mut();
        if !loaded.contains_key(model) {
            let graph =
                load_by_name(model).map_err(|e| PluginError::rejected(format!("model `{model}`: {}", e.data())))?;
            let context = graph
                .init_execution_context()
                .map_err(|e| PluginError::Internal(format!("model `{model}`: {}", e.data())))?;
            loaded.insert(model.to_string(), (graph, context));
        }
        let (_, context) = &loaded[model];
        context.compute(tensors).map_err(|e| PluginError::rejected(format!("model `{model}`: {}", e.data())))
    })?;
    from_nn_tensors(outputs)
}

/// A model the plugin built itself (ONNX bytes), loaded once for several runs (e.g. a
/// calibration pass that exposes intermediate tensors). Needs a node whose host offers a wasi-nn
/// backend to plugins (`nereid model compress` does).
pub struct OnnxSession {
    // Declared first: the context is dropped before its graph.
    context: GraphExecutionContext,
    _graph: Graph,
}

impl OnnxSession {
    pub fn load(onnx: &[u8]) -> Result<OnnxSession, PluginError> {
        let graph = load(&[onnx.to_vec()], GraphEncoding::Onnx, ExecutionTarget::Cpu)
            .map_err(|e| PluginError::rejected(format!("loading the model through wasi-nn: {}", e.data())))?;
        let context = graph
            .init_execution_context()
            .map_err(|e| PluginError::Internal(format!("wasi-nn execution context: {}", e.data())))?;
        Ok(OnnxSession { context, _graph: graph })
    }

    /// The model's outputs on `inputs`, in the model's order.
    pub fn run(&self, inputs: Vec<TensorData>) -> Result<Vec<TensorData>, PluginError> {
        let outputs = self
            .context
            .compute(to_nn_tensors(inputs)?)
            .map_err(|e| PluginError::rejected(format!("running the model: {}", e.data())))?;
        from_nn_tensors(outputs)
    }
}
