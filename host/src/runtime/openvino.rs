//! wasi-nn graphs on OpenVINO for the node's ONNX models. wasmtime-wasi-nn 48's own OpenVINO
//! backend cannot be configured, and three of its defaults are wrong for nereid: on a CPU with
//! bf16 units (avx512_bf16, AMX) OpenVINO computes in bf16 unless told otherwise (answers then
//! differ from ONNX Runtime's by ~1e-3), outputs come back named "0", "1", ... (split inference
//! matches the head's outputs to the cut by name), and every execution context compiles a new
//! infer request. This one asks for f32, names outputs as the model does, and reuses requests.
use std::sync::{Arc, Mutex, OnceLock};

use openvino::{CompiledModel, Core, DeviceType, InferRequest, RwPropertyKey, Shape, Tensor as OvTensor};
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, BackendGraph, Id, NamedTensor};
use wasmtime_wasi_nn::wit::Tensor;
use wasmtime_wasi_nn::{ExecutionContext, Graph};

fn failed(message: impl std::fmt::Display) -> BackendError {
    BackendError::BackendAccess(wasmtime::Error::msg(message.to_string()))
}

/// One OpenVINO core per process (it holds the loaded device plugins).
fn core() -> Result<&'static Mutex<Core>, BackendError> {
    static CORE: OnceLock<Result<Mutex<Core>, String>> = OnceLock::new();
    CORE.get_or_init(|| {
        let mut core = Core::new().map_err(|e| e.to_string())?;
        core.set_property(&DeviceType::CPU, &RwPropertyKey::HintInferencePrecision, "f32")
            .map_err(|e| format!("asking OpenVINO's CPU plugin for f32: {e}"))?;
        Ok(Mutex::new(core))
    })
    .as_ref()
    .map_err(failed)
}

struct OpenvinoGraph(Arc<GraphState>);

struct GraphState {
    compiled: Mutex<CompiledModel>,
    /// The model's output names, in output order.
    outputs: Vec<String>,
    /// Infer requests of finished execution contexts, ready for the next.
    idle: Mutex<Vec<InferRequest>>,
}

// SAFETY: OpenVINO's compiled models are thread-safe (the C API documents concurrent infer
// request creation); the compiled model is used under its mutex regardless.
unsafe impl Sync for GraphState {}

/// Compiles an ONNX model for OpenVINO's CPU plugin.
pub fn load_onnx(onnx: &[u8]) -> Result<Graph, BackendError> {
    let mut core = core()?.lock().unwrap_or_else(|e| e.into_inner());
    let model = core.read_model_from_buffer(onnx, None)?;
    let outputs = (0..model.get_outputs_len()?)
        .map(|i| model.get_output_by_index(i).and_then(|port| port.get_name()))
        .collect::<Result<Vec<_>, _>>()?;
    let compiled = core.compile_model(&model, DeviceType::CPU)?;
    let graph: Box<dyn BackendGraph> = Box::new(OpenvinoGraph(Arc::new(GraphState {
        compiled: Mutex::new(compiled),
        outputs,
        idle: Mutex::new(Vec::new()),
    })));
    Ok(graph.into())
}

impl BackendGraph for OpenvinoGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let reused = crate::lock(&self.0.idle).pop();
        let request = match reused {
            Some(r) => r,
            None => crate::lock(&self.0.compiled).create_infer_request()?,
        };
        let context: Box<dyn BackendExecutionContext> =
            Box::new(OpenvinoContext { graph: self.0.clone(), request: Some(request) });
        Ok(context.into())
    }
}

struct OpenvinoContext {
    graph: Arc<GraphState>,
    /// Always Some until dropped (then it goes back to the graph's idle requests).
    request: Option<InferRequest>,
}

impl Drop for OpenvinoContext {
    fn drop(&mut self) {
        if let Some(r) = self.request.take() {
            crate::lock(&self.graph.idle).push(r);
        }
    }
}

fn to_openvino(tensor: &Tensor) -> Result<OvTensor, BackendError> {
    let dims: Vec<i64> = tensor.dimensions.iter().map(|&d| d as i64).collect();
    let mut t = OvTensor::new(tensor.ty.into(), &Shape::new(&dims)?)?;
    let buffer = t.get_raw_data_mut()?;
    if buffer.len() != tensor.data.len() {
        return Err(failed(format!(
            "tensor of {} bytes for dimensions {dims:?} ({} expected)",
            tensor.data.len(),
            buffer.len()
        )));
    }
    buffer.copy_from_slice(&tensor.data);
    Ok(t)
}

fn from_openvino(t: &OvTensor) -> Result<Tensor, BackendError> {
    Ok(Tensor {
        dimensions: t.get_shape()?.get_dimensions().iter().map(|&d| d as u32).collect(),
        ty: t.get_element_type()?.try_into()?,
        data: t.get_raw_data()?.to_vec(),
    })
}

impl OpenvinoContext {
    fn request(&mut self) -> Result<&mut InferRequest, BackendError> {
        self.request.as_mut().ok_or_else(|| failed("the infer request was released"))
    }
}

impl BackendExecutionContext for OpenvinoContext {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let t = to_openvino(tensor)?;
        let request = self.request()?;
        match id {
            Id::Index(i) => request.set_input_tensor_by_index(i as usize, &t)?,
            Id::Name(name) => request.set_tensor(&name, &t)?,
        }
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        let request = self.request()?;
        let t = match id {
            Id::Index(i) => request.get_output_tensor_by_index(i as usize)?,
            Id::Name(name) => request.get_tensor(&name)?,
        };
        from_openvino(&t)
    }

    fn compute(&mut self, inputs: Option<Vec<NamedTensor>>) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let Some(inputs) = inputs else {
            self.request()?.infer()?;
            return Ok(None);
        };
        for input in &inputs {
            let t = to_openvino(&input.tensor)?;
            self.request()?.set_tensor(&input.name, &t)?;
        }
        self.request()?.infer()?;
        let names = self.graph.outputs.clone();
        let request = self.request()?;
        names
            .into_iter()
            .enumerate()
            .map(|(i, name)| Ok(NamedTensor { name, tensor: from_openvino(&request.get_output_tensor_by_index(i)?)? }))
            .collect::<Result<Vec<_>, BackendError>>()
            .map(Some)
    }
}
