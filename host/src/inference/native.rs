//! ONNX models run by the host itself through ONNX Runtime: the cloud's models and tails, and
//! profiling. (Plugins run theirs through wasi-nn.)
use std::sync::Mutex;

use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::{DynValue, Tensor, ValueType};

use crate::runtime::bindings::types::Dtype;
use crate::runtime::nn::{init_onnxruntime, NnError};
use crate::runtime::TensorData;

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(transparent)]
    Nn(#[from] NnError),
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    #[error("{0}")]
    Input(String),
}

/// A loaded model: one session, inputs and outputs by name.
pub struct NativeModel {
    session: Mutex<Session>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Dims of each input (-1 where the model leaves them open).
    pub input_dims: Vec<Vec<i64>>,
}

impl std::fmt::Debug for NativeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeModel").field("inputs", &self.inputs).field("outputs", &self.outputs).finish()
    }
}

fn value(t: &TensorData) -> Result<DynValue, NativeError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    macro_rules! typed {
        ($ty:ty, $n:expr) => {{
            let values: Vec<$ty> =
                t.data.chunks_exact($n).map(|c| <$ty>::from_le_bytes(c.try_into().unwrap_or([0; $n]))).collect();
            Tensor::from_array((shape, values))?.into_dyn()
        }};
    }
    Ok(match t.dtype {
        Dtype::F32 => typed!(f32, 4),
        Dtype::F64 => typed!(f64, 8),
        Dtype::I32 => typed!(i32, 4),
        Dtype::I64 => typed!(i64, 8),
        Dtype::U8 => Tensor::from_array((shape, t.data.clone()))?.into_dyn(),
        Dtype::I8 => typed!(i8, 1),
    })
}

impl NativeModel {
    pub fn new(onnx: &[u8]) -> Result<NativeModel, NativeError> {
        Self::build(onnx, None)
    }

    /// A session that writes ONNX Runtime's per-node profile to `path` (see [`Self::end_profiling`]).
    pub fn with_profiling(onnx: &[u8], path: &std::path::Path) -> Result<NativeModel, NativeError> {
        Self::build(onnx, Some(path))
    }

    fn build(onnx: &[u8], profile: Option<&std::path::Path>) -> Result<NativeModel, NativeError> {
        init_onnxruntime()?;
        // The optimisation level wasi-nn's ONNX backend uses, so both run the same graph.
        let mut builder = Session::builder()?.with_optimization_level(GraphOptimizationLevel::Level3)?;
        if let Some(path) = profile {
            builder = builder.with_profiling(path)?;
        }
        let session = builder.commit_from_memory(onnx)?;
        let inputs = session.inputs.iter().map(|i| i.name.clone()).collect();
        let input_dims = session
            .inputs
            .iter()
            .map(|i| match &i.input_type {
                ValueType::Tensor { shape, .. } => shape.iter().copied().collect(),
                _ => Vec::new(),
            })
            .collect();
        let outputs = session.outputs.iter().map(|o| o.name.clone()).collect();
        Ok(NativeModel { session: Mutex::new(session), inputs, outputs, input_dims })
    }

    /// Runs the model; outputs in the model's order, as float32 (what the models served here
    /// produce; wasi-nn's ONNX backend has the same limit).
    pub fn run(&self, inputs: &[TensorData]) -> Result<Vec<TensorData>, NativeError> {
        for name in &self.inputs {
            if !inputs.iter().any(|t| &t.name == name) {
                return Err(NativeError::Input(format!("input `{name}` is missing")));
            }
        }
        let values = inputs
            .iter()
            .filter(|t| self.inputs.contains(&t.name))
            .map(|t| Ok((t.name.clone(), value(t)?)))
            .collect::<Result<Vec<_>, NativeError>>()?;
        let mut session = crate::lock(&self.session);
        let outputs = session.run(values)?;
        let mut out = Vec::with_capacity(self.outputs.len());
        for name in &self.outputs {
            let (shape, data) = outputs[name.as_str()].try_extract_tensor::<f32>()?;
            out.push(crate::inference::wire::f32_tensor(name, shape.iter().map(|&d| d as u64).collect(), data));
        }
        Ok(out)
    }

    /// Runs the model and discards the outputs, whatever their types (profiling).
    pub fn run_any(&self, inputs: &[TensorData]) -> Result<(), NativeError> {
        self.for_each_output(inputs, |_, _| {})
    }

    /// Runs the model and shows `f` each output's name and type (with its actual shape).
    pub fn for_each_output(
        &self,
        inputs: &[TensorData],
        mut f: impl FnMut(&str, &ValueType),
    ) -> Result<(), NativeError> {
        let values = inputs.iter().map(|t| Ok((t.name.clone(), value(t)?))).collect::<Result<Vec<_>, NativeError>>()?;
        let mut session = crate::lock(&self.session);
        let outputs = session.run(values)?;
        for (name, v) in outputs.iter() {
            f(name, v.dtype());
        }
        Ok(())
    }

    /// Ends profiling; the path of the JSON trace ONNX Runtime wrote.
    pub fn end_profiling(&self) -> Result<String, NativeError> {
        Ok(crate::lock(&self.session).end_profiling()?)
    }
}
