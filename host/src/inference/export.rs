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
