//! A trained job's model as ONNX: the architecture of `[model]` (MLP or CNN) with the job's
//! weights, so the model federated learning produced can be served by any ONNX runtime.
use nereid_onnx::proto::{
    data_type, AttributeProto, Dim, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
};

use crate::model_io::NamedTensors;
use crate::train::model::{ModelError, ModelSpec};

/// Input and output names of exported models.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "probabilities";

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: Some(nereid_onnx::proto::attribute_type::INTS),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// The ONNX model (opset 17) computing what `train::model::Network::forward` computes, followed
/// by a softmax: input `input` [N, features], output `probabilities` [N, classes].
pub fn to_onnx(spec: &ModelSpec, weights: &NamedTensors) -> Result<ModelProto, ModelError> {
    spec.check(weights)?;
    if let ModelSpec::Cnn { conv, .. } = spec {
        // Measured: candle 0.9's CPU conv2d disagrees with ONNX's Conv (and with a hand-written
        // loop) when a convolution has more than one input channel, so the weights a CNN job
        // trained would mean something else in ONNX. Refused rather than exported wrong.
        if conv.len() > 1 {
            return Err(ModelError::Spec(
                "exporting a CNN with more than one convolution is refused: the trainer's conv2d (candle 0.9) \
                 does not compute ONNX's Conv for multi-channel inputs, so the trained weights would not carry over"
                    .into(),
            ));
        }
    }
    let mut initializer = Vec::new();
    for (name, t) in weights {
        let values = t.as_f32().ok_or_else(|| ModelError::Dtype(name.clone()))?;
        let dims: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        initializer.push(TensorProto::f32(name, &dims, values));
    }
    let mut nodes = Vec::new();
    let mut h = INPUT.to_string();
    let hidden = match spec {
        ModelSpec::External { .. } => {
            return Err(ModelError::Spec(
                "an external model is exported by its own framework (e.g. torch.onnx.export), not by nereid".into(),
            ))
        }
        ModelSpec::Mlp { hidden, .. } => hidden.len(),
        ModelSpec::Cnn { input_shape, conv, hidden, .. } => {
            let shape = [-1, input_shape[0] as i64, input_shape[1] as i64, input_shape[2] as i64];
            initializer.push(TensorProto::i64("image_shape", &[4], &shape));
            nodes.push(NodeProto::new("Reshape", "image", &[&h, "image_shape"], &["image"]));
            h = "image".into();
            for i in 0..conv.len() {
                let (c, r, p) = (format!("conv{i}"), format!("relu{i}"), format!("pool{i}"));
                let mut node =
                    NodeProto::new("Conv", &c, &[&h, &format!("conv.{i}.weight"), &format!("conv.{i}.bias")], &[&c]);
                node.attribute = vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])];
                nodes.push(node);
                nodes.push(NodeProto::new("Relu", &r, &[&c], &[&r]));
                let mut pool = NodeProto::new("MaxPool", &p, &[&r], &[&p]);
                pool.attribute = vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])];
                nodes.push(pool);
                h = p;
            }
            let mut flatten = NodeProto::new("Flatten", "flatten", &[&h], &["flat"]);
            flatten.attribute = vec![AttributeProto::int("axis", 1)];
            nodes.push(flatten);
            h = "flat".into();
            hidden.len()
        }
    };
    for i in 0..=hidden {
        let out = if i < hidden { format!("dense{i}") } else { "logits".to_string() };
        let mut gemm =
            NodeProto::new("Gemm", &out, &[&h, &format!("dense.{i}.weight"), &format!("dense.{i}.bias")], &[&out]);
        gemm.attribute = vec![AttributeProto::int("transB", 1)];
        nodes.push(gemm);
        h = out;
        if i < hidden {
            let r = format!("dense_relu{i}");
            nodes.push(NodeProto::new("Relu", &r, &[&h], &[&r]));
            h = r;
        }
    }
    let mut softmax = NodeProto::new("Softmax", "softmax", &[&h], &[OUTPUT]);
    softmax.attribute = vec![AttributeProto::int("axis", 1)];
    nodes.push(softmax);
    let batch = Dim::Symbolic("N".into());
    let graph = GraphProto {
        name: "nereid".into(),
        node: nodes,
        input: vec![ValueInfoProto::tensor(
            INPUT,
            data_type::FLOAT,
            &[batch.clone(), Dim::Fixed(spec.input_len() as i64)],
        )],
        output: vec![ValueInfoProto::tensor(OUTPUT, data_type::FLOAT, &[batch, Dim::Fixed(spec.classes() as i64)])],
        initializer,
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        producer_name: "nereid".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    })
}

/// The architecture and weights of a model [`to_onnx`] wrote (e.g. `nereid model export`), so
/// that it can be trained further. Any other graph is refused: its weights would mean something
/// else to the trainer.
pub fn from_onnx(onnx: &[u8]) -> Result<(ModelSpec, NamedTensors), ModelError> {
    let model = nereid_onnx::Model::decode(onnx).map_err(|e| ModelError::Spec(format!("not an ONNX model: {e}")))?;
    let graph = model.graph();
    let init = |name: &str| graph.initializer.iter().find(|t| t.name == name);
    let dims = |name: &str| init(name).map(|t| t.dims.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>());
    let dense: Vec<Vec<usize>> = (0..).map_while(|i| dims(&format!("dense.{i}.weight"))).collect();
    let (last, hidden) = dense.split_last().ok_or_else(|| {
        ModelError::Spec(
            "it has no `dense.0.weight`: only models nereid exported (nereid model export) can be trained".into(),
        )
    })?;
    let hidden: Vec<usize> = hidden.iter().map(|d| d.first().copied().unwrap_or(0)).collect();
    let classes = last.first().copied().unwrap_or(0);
    let spec = match init("image_shape") {
        Some(shape) => {
            let s: Vec<usize> = shape.i64_values().unwrap_or_default().iter().map(|&d| d.max(0) as usize).collect();
            let [_, c, h, w] = s[..] else {
                return Err(ModelError::Spec("`image_shape` is not [batch, channels, height, width]".into()));
            };
            let conv = (0..).map_while(|i| dims(&format!("conv.{i}.weight"))).map(|d| d[0]).collect();
            ModelSpec::Cnn { input_shape: [c, h, w], conv, hidden, classes }
        }
        None => ModelSpec::Mlp { inputs: dense[0].get(1).copied().unwrap_or(0), hidden, classes },
    };
    spec.validate()?;
    let mut weights = NamedTensors::new();
    for (name, shape) in spec.parameters() {
        let t = init(&name).ok_or_else(|| ModelError::Missing(name.clone()))?;
        let values = t.f32_values().ok_or_else(|| ModelError::Dtype(name.clone()))?;
        let got: Vec<u64> = t.dims.iter().map(|&d| d.max(0) as u64).collect();
        if got != shape {
            return Err(ModelError::Shape { name, got, want: shape });
        }
        let tensor = crate::tensor::Tensor::from_f32(got, values).ok_or_else(|| ModelError::Dtype(name.clone()))?;
        weights.push((name, tensor));
    }
    let rebuilt = to_onnx(&spec, &weights)?;
    if rebuilt.graph.as_ref().map(|g| &g.node) != Some(&graph.node) {
        return Err(ModelError::Spec(format!(
            "its graph is not the one nereid exports for {spec:?}: only models nereid exported can be trained"
        )));
    }
    Ok((spec, weights))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nereid_onnx::Message;

    #[test]
    fn an_exported_model_reads_back_as_its_architecture_and_weights_and_others_are_refused() {
        for spec in [
            ModelSpec::Mlp { inputs: 64, hidden: vec![32, 16], classes: 10 },
            ModelSpec::Mlp { inputs: 8, hidden: vec![], classes: 3 },
            ModelSpec::Cnn { input_shape: [1, 8, 8], conv: vec![4], hidden: vec![16], classes: 10 },
        ] {
            let weights = spec.init(3);
            let onnx = to_onnx(&spec, &weights).expect("exports").encode_to_vec();
            let (read_spec, read_weights) = from_onnx(&onnx).expect("reads back");
            assert_eq!(read_spec, spec);
            assert_eq!(read_weights, weights);
        }
        let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![32], classes: 10 };
        let mut proto = to_onnx(&spec, &spec.init(3)).expect("exports");
        // Another graph over the same weights (no softmax) would be trained as if it had one.
        proto.graph.as_mut().expect("graph").node.pop();
        let err = from_onnx(&proto.encode_to_vec()).expect_err("refused");
        assert!(err.to_string().contains("only models nereid exported"), "{err}");
        let err = from_onnx(b"not onnx").expect_err("refused");
        assert!(err.to_string().contains("not an ONNX model"), "{err}");
    }
}
