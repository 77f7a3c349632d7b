//! The weights of any ONNX classifier, as the user's trainer sees them: its float32
//! initializers by name (what `torch.onnx.export` writes under the `state_dict` names), read out
//! of a model and written back into it, the graph untouched. This is how an incremental job
//! fine-tunes a model nereid did not export.
use nereid_onnx::proto::{data_type, Dim, ModelProto, TensorProto};
use nereid_onnx::Message;

use crate::model_io::NamedTensors;
use crate::tensor::Tensor;
use crate::train::model::{MAX_DIM, MAX_PARAMETERS};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InitializerError(String);

fn err(message: impl Into<String>) -> InitializerError {
    InitializerError(message.into())
}

fn decode(onnx: &[u8]) -> Result<ModelProto, InitializerError> {
    ModelProto::decode(onnx).map_err(|e| err(format!("not an ONNX model: {e}")))
}

/// What a classifier takes and gives: floats per example (the product of its one input's
/// dimensions after the batch) and classes (its first output's last dimension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifierShape {
    pub features: usize,
    pub classes: usize,
}

pub fn classifier_shape(onnx: &[u8]) -> Result<ClassifierShape, InitializerError> {
    let (_, dims) = super::compress::example_input(onnx).map_err(|e| err(e.to_string()))?;
    let features = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).filter(|n| (1..=MAX_DIM).contains(n));
    let features = features.ok_or_else(|| err(format!("its input's example shape {dims:?} is empty or too large")))?;
    let model = decode(onnx)?;
    let output = model.graph.as_ref().and_then(|g| g.output.first()).ok_or_else(|| err("the model has no output"))?;
    let classes = match output.r#type.as_ref().and_then(|t| t.tensor_shape()).and_then(|(_, d)| d.last().cloned()) {
        Some(Dim::Fixed(n)) if (2..=MAX_DIM as i64).contains(&n) => n as usize,
        other => {
            return Err(err(format!(
                "its first output `{}` must end in a fixed number of classes (at least 2), not {other:?}",
                output.name
            )))
        }
    };
    Ok(ClassifierShape { features: features as usize, classes })
}

fn is_float(t: &TensorProto) -> bool {
    t.data_type == data_type::FLOAT
}

/// The model's float32 initializers, in the graph's order. One stored outside the model file
/// (external data) is refused: the edge keeps a model as one file.
pub fn float_initializers(onnx: &[u8]) -> Result<NamedTensors, InitializerError> {
    let model = decode(onnx)?;
    let graph = model.graph.as_ref().ok_or_else(|| err("the model has no graph"))?;
    let mut weights = NamedTensors::new();
    let mut total = 0u64;
    for t in graph.initializer.iter().filter(|t| is_float(t)) {
        let values = t.f32_values().ok_or_else(|| {
            err(format!("initializer `{}`: stored outside the model or not as its shape says", t.name))
        })?;
        let shape: Vec<u64> = t.dims.iter().map(|&d| d.max(0) as u64).collect();
        total += values.len() as u64;
        if total > MAX_PARAMETERS {
            return Err(err(format!("more than {MAX_PARAMETERS} float32 weights")));
        }
        let tensor = Tensor::from_f32(shape, values).ok_or_else(|| err(format!("initializer `{}`", t.name)))?;
        weights.push((t.name.clone(), tensor));
    }
    if weights.is_empty() {
        return Err(err("the model has no float32 initializers: nothing to train"));
    }
    Ok(weights)
}

/// `onnx` with its float32 initializers' values replaced by `weights` (every one of them, by
/// name, with the same shapes); nothing else changes.
pub fn with_initializers(onnx: &[u8], weights: &NamedTensors) -> Result<Vec<u8>, InitializerError> {
    let mut model = decode(onnx)?;
    let graph = model.graph.as_mut().ok_or_else(|| err("the model has no graph"))?;
    let mut written = 0;
    for t in graph.initializer.iter_mut().filter(|t| is_float(t)) {
        let (_, w) = weights
            .iter()
            .find(|(n, _)| *n == t.name)
            .ok_or_else(|| err(format!("no weights for initializer `{}`", t.name)))?;
        let values = w.as_f32().ok_or_else(|| err(format!("weights of `{}` are not float32", t.name)))?;
        let dims: Vec<u64> = t.dims.iter().map(|&d| d.max(0) as u64).collect();
        if w.shape() != dims.as_slice() {
            return Err(err(format!("weights of `{}` are {:?}, the initializer {dims:?}", t.name, w.shape())));
        }
        t.float_data.clear();
        t.raw_data = Some(values.iter().flat_map(|v| v.to_le_bytes()).collect());
        written += 1;
    }
    if written != weights.len() {
        return Err(err(format!("{} weights for {written} float32 initializers", weights.len())));
    }
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ModelSpec;

    #[test]
    fn initializers_round_trip_and_only_their_values_change() {
        let spec = ModelSpec::Mlp { inputs: 4, hidden: vec![3], classes: 2 };
        let weights = spec.init(1);
        let onnx = super::super::export::to_onnx(&spec, &weights).expect("export").encode_to_vec();
        assert_eq!(classifier_shape(&onnx).expect("shape"), ClassifierShape { features: 4, classes: 2 });
        let read = float_initializers(&onnx).expect("read");
        assert_eq!(read, weights);
        let doubled: NamedTensors = read
            .iter()
            .map(|(n, t)| {
                let v = t.as_f32().expect("f32").iter().map(|x| 2.0 * x).collect();
                (n.clone(), Tensor::from_f32(t.shape().to_vec(), v).expect("tensor"))
            })
            .collect();
        let rewritten = with_initializers(&onnx, &doubled).expect("write");
        assert_eq!(float_initializers(&rewritten).expect("read"), doubled);
        let (before, after) = (decode(&onnx).expect("onnx"), decode(&rewritten).expect("onnx"));
        assert_eq!(before.graph.as_ref().map(|g| &g.node), after.graph.as_ref().map(|g| &g.node));
        let wrong: NamedTensors = vec![doubled[0].clone()];
        assert!(with_initializers(&onnx, &wrong).is_err(), "every initializer needs its weights");
    }
}
