//! Passes over an ONNX model: INT8 weights (weight-only, dynamic, static QDQ) and magnitude
//! pruning, on the weights of MatMul, Gemm and Conv.
//!
//! Weights are quantized symmetrically per output channel (zero point 0, q in [-127, 127]), as
//! ONNX Runtime's quantizer does for int8 weights:
//! - weight-only: each weight becomes `DequantizeLinear(q, scale, axis)`; activations stay float.
//! - dynamic: MatMul and Gemm compute in integers: `DynamicQuantizeLinear` quantizes the
//!   activation (uint8, range measured per call), `MatMulInteger` multiplies, the product is
//!   rescaled by activation scale x weight scale. Its weights use 7 bits (q in [-63, 63], ONNX
//!   Runtime's `reduce_range`): on x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernel
//!   adds pairs of products in saturating 16-bit lanes (`vpmaddubsw`), and 255 x 127 x 2
//!   overflows them, which gave probabilities 0.1 off on such a CPU (measured on an AMD EPYC
//!   with AVX2 only); 255 x 63 x 2 does not. ONNX Runtime's CPU `ConvInteger` only takes uint8
//!   weights, so convolutions keep weight-only INT8 in this mode.
//! - static: weights as in weight-only, and each quantized operator's activation input goes
//!   through `QuantizeLinear`/`DequantizeLinear` (uint8, asymmetric) with a range calibrated by
//!   running the model on the calibration samples (min/max over all of them).
use std::collections::{BTreeMap, HashMap, HashSet};

use nereid_onnx::proto::{
    attribute_type, data_type, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
};
use nereid_onnx::Message;
use nereid_sdk::nn::OnnxSession;
use nereid_sdk::{PluginError, TensorData};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelPass {
    WeightOnly,
    Dynamic,
    Static,
    Prune { sparsity: f64 },
}

fn bad(message: impl Into<String>) -> PluginError {
    PluginError::rejected(message.into())
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    node.attribute.iter().find(|a| a.name == name).and_then(|a| a.i).unwrap_or(default)
}

fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    node.attribute.iter().find(|a| a.name == name).and_then(|a| a.f).unwrap_or(default)
}

fn raw(name: &str, data_type: i32, dims: &[i64], bytes: Vec<u8>) -> TensorProto {
    TensorProto { name: name.into(), dims: dims.to_vec(), data_type, raw_data: Some(bytes), ..Default::default() }
}

fn int8(name: &str, dims: &[i64], values: &[i8]) -> TensorProto {
    raw(name, data_type::INT8, dims, values.iter().map(|v| *v as u8).collect())
}

/// A node the pass inserts. Unnamed (names are optional in ONNX): its outputs name it, and in a
/// small model the names would be a visible share of the bytes INT8 saves.
fn inserted(op_type: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto::new(op_type, "", inputs, outputs)
}

fn float_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto::int(name, value)
}

/// A weight of a quantizable operator: which node uses it, and its output-channel axis.
struct Weight {
    dims: Vec<i64>,
    values: Vec<f32>,
    axis: usize,
    /// Elements between consecutive indices along `axis` (row-major).
    stride: usize,
}

impl Weight {
    fn new(dims: Vec<i64>, values: Vec<f32>, axis: usize) -> Weight {
        let stride = dims[axis + 1..].iter().product::<i64>() as usize;
        Weight { dims, values, axis, stride }
    }

    fn channels(&self) -> usize {
        self.dims[self.axis] as usize
    }

    /// The output channel of element `i`.
    fn channel_of(&self, i: usize) -> usize {
        (i / self.stride) % self.channels()
    }
}

/// The largest |q| of weights in full INT8 range.
const FULL_RANGE: f32 = 127.0;
/// The largest |q| of weights `MatMulInteger` multiplies (see the module's notes).
const REDUCED_RANGE: f32 = 63.0;

/// Per-channel symmetric INT8 with |q| <= `qmax`: q (same layout as the weight) and one scale
/// per channel.
fn quantize_per_channel(w: &Weight, qmax: f32) -> (Vec<i8>, Vec<f32>) {
    let mut max = vec![0f32; w.channels()];
    for (i, v) in w.values.iter().enumerate() {
        let c = w.channel_of(i);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max.iter().map(|&m| if m > 0.0 && m.is_finite() { m / qmax } else { 1.0 }).collect();
    let q = w
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[w.channel_of(i)]).round().clamp(-qmax, qmax) as i8)
        .collect();
    (q, scales)
}

/// What INT8 with |q| <= `qmax` turns the weight into: q * scale, per channel.
fn dequantized(w: &Weight, qmax: f32) -> Vec<f32> {
    let (q, scales) = quantize_per_channel(w, qmax);
    q.iter().enumerate().map(|(i, &q)| q as f32 * scales[w.channel_of(i)]).collect()
}

/// The weight input (index 1) of MatMul, Gemm and Conv nodes that can be quantized: a float
/// initializer that is not also a graph input, used by this node only, of a supported rank.
fn quantizable(graph: &GraphProto) -> BTreeMap<usize, (String, Weight)> {
    let inputs: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for node in &graph.node {
        for i in &node.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    let inits: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut found = BTreeMap::new();
    for (index, node) in graph.node.iter().enumerate() {
        let Some(name) = node.input.get(1) else { continue };
        let Some(init) = inits.get(name.as_str()) else { continue };
        if inputs.contains(name.as_str()) || uses.get(name.as_str()) != Some(&1) {
            continue;
        }
        let rank = init.dims.len();
        let axis = match node.op_type.as_str() {
            "Conv" if rank >= 3 => 0,
            "Gemm" if rank == 2 => {
                if attr_i(node, "transB", 0) == 1 {
                    0
                } else {
                    1
                }
            }
            "MatMul" if rank == 2 => 1,
            _ => continue,
        };
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            continue;
        }
        let Some(values) = init.f32_values() else { continue };
        found.insert(index, (name.clone(), Weight::new(init.dims.clone(), values, axis)));
    }
    found
}

fn opset(model: &ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(0, |o| o.version)
}

/// Replaces initializer `name` with its INT8 code and returns the node that dequantizes it
/// back under the same name.
fn weight_only(graph: &mut GraphProto, name: &str, w: &Weight) -> NodeProto {
    let (q, scales) = quantize_per_channel(w, FULL_RANGE);
    let channels = scales.len() as i64;
    graph.initializer.retain(|t| t.name != name);
    // No zero point: it defaults to 0 (symmetric), and the int8 type comes from q.
    let (q_name, s_name) = (format!("{name}_q"), format!("{name}_s"));
    graph.initializer.push(int8(&q_name, &w.dims, &q));
    graph.initializer.push(TensorProto::f32(&s_name, &[channels], &scales));
    let mut dq = inserted("DequantizeLinear", &[&q_name, &s_name], &[name]);
    dq.attribute = vec![float_attr("axis", w.axis as i64)];
    dq
}

/// Min and max of each of `tensors` over the calibration samples, measured by running the
/// model with them as extra outputs through wasi-nn.
fn calibrate(
    model: &ModelProto,
    tensors: &[String],
    samples: &[Vec<TensorData>],
) -> Result<HashMap<String, (f32, f32)>, PluginError> {
    if samples.is_empty() {
        return Err(bad("static quantization needs calibration samples (none were given)"));
    }
    let mut probe = model.clone();
    let graph = probe.graph.as_mut().ok_or_else(|| bad("the model has no graph"))?;
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    for t in tensors {
        if !outputs.contains(t) {
            graph.output.push(ValueInfoProto::tensor_of_any_shape(t, data_type::FLOAT));
        }
    }
    let session = OnnxSession::load(&probe.encode_to_vec())?;
    let mut ranges: HashMap<String, (f32, f32)> = HashMap::new();
    for (i, sample) in samples.iter().enumerate() {
        let outputs = session.run(sample.clone()).map_err(|e| bad(format!("calibration sample {i}: {e:?}")))?;
        for out in outputs.iter().filter(|o| tensors.contains(&o.name)) {
            let values = out.f32_values().ok_or_else(|| bad(format!("activation `{}` is not float32", out.name)))?;
            let r = ranges.entry(out.name.clone()).or_insert((0.0, 0.0));
            for v in values.into_iter().filter(|v| v.is_finite()) {
                r.0 = r.0.min(v);
                r.1 = r.1.max(v);
            }
        }
    }
    for t in tensors {
        if !ranges.contains_key(t) {
            return Err(bad(format!("calibration: the model did not return activation `{t}`")));
        }
    }
    Ok(ranges)
}

/// uint8 asymmetric parameters for a range that includes 0: (scale, zero point).
pub fn activation_params(min: f32, max: f32) -> (f32, u8) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let scale = if max > min { (max - min) / 255.0 } else { 1.0 };
    let zero = (-min / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zero)
}

/// What `rewrite` does.
#[derive(Debug, Clone)]
pub struct Options {
    pub pass: ModelPass,
    pub bias_correction: bool,
    /// Names of nodes whose activation input stays float (their weights are still INT8).
    pub float_inputs: Vec<String>,
}

pub fn rewrite(bytes: &[u8], options: &Options, calibration: &[Vec<TensorData>]) -> Result<Vec<u8>, PluginError> {
    let pass = options.pass;
    let mut model = ModelProto::decode(bytes).map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    if matches!(pass, ModelPass::WeightOnly | ModelPass::Dynamic | ModelPass::Static) && opset(&model) < 13 {
        return Err(bad(format!(
            "the model imports opset {}; per-channel DequantizeLinear needs opset 13 or newer",
            opset(&model)
        )));
    }
    let graph = model.graph.as_ref().ok_or_else(|| bad("the model has no graph"))?;
    let found = quantizable(graph);
    if found.is_empty() {
        return Err(bad("the model has no MatMul, Gemm or Conv with a float32 weight initializer to compress"));
    }
    for name in &options.float_inputs {
        if !found.keys().any(|&i| graph.node[i].name == *name) {
            return Err(bad(format!(
                "float_inputs: `{name}` is not the name of a MatMul, Gemm or Conv node with an INT8 weight"
            )));
        }
    }
    let float_input = |index: usize| options.float_inputs.contains(&graph.node[index].name);
    let ranges = if pass == ModelPass::Static {
        let mut acts: Vec<String> =
            found.keys().filter(|&&i| !float_input(i)).map(|&i| graph.node[i].input[0].clone()).collect();
        acts.sort();
        acts.dedup();
        if acts.is_empty() {
            HashMap::new()
        } else {
            calibrate(&model, &acts, calibration)?
        }
    } else {
        HashMap::new()
    };
    // How each layer's activation input is quantized.
    let activation: BTreeMap<usize, ActivationQuant> = found
        .keys()
        .map(|&index| {
            let node = &graph.node[index];
            let quant = match pass {
                _ if float_input(index) => ActivationQuant::Float,
                ModelPass::Static => {
                    let (min, max) = ranges[&node.input[0]];
                    let (scale, zero) = activation_params(min, max);
                    ActivationQuant::Static(scale, zero)
                }
                ModelPass::Dynamic if integer_matmul(node) => ActivationQuant::Dynamic,
                _ => ActivationQuant::Float,
            };
            (index, quant)
        })
        .collect();
    if options.bias_correction && !matches!(pass, ModelPass::Prune { .. }) && !calibration.is_empty() {
        let layers: Vec<(usize, ActivationQuant)> = activation.iter().map(|(i, a)| (*i, *a)).collect();
        correct_biases(&mut model, &found, &layers, calibration)?;
    }
    let graph = model.graph.as_mut().ok_or_else(|| bad("the model has no graph"))?;
    if let ModelPass::Prune { sparsity } = pass {
        prune(graph, &found, sparsity);
        return Ok(model.encode_to_vec());
    }
    let old_nodes = std::mem::take(&mut graph.node);
    let mut nodes = Vec::with_capacity(old_nodes.len() * 2);
    let mut activations_done: HashMap<String, String> = HashMap::new();
    for (index, mut node) in old_nodes.into_iter().enumerate() {
        let (Some((name, w)), Some(quant)) = (found.get(&index), activation.get(&index)) else {
            nodes.push(node);
            continue;
        };
        match *quant {
            ActivationQuant::Dynamic => {
                dynamic_matmul(graph, &mut nodes, &mut activations_done, node, name, w);
                continue;
            }
            ActivationQuant::Static(scale, zero) => {
                nodes.push(weight_only(graph, name, w));
                let x = node.input[0].clone();
                let dq = match activations_done.get(&x) {
                    Some(dq) => dq.clone(),
                    None => {
                        let (s, z, q, dq) = (format!("{x}_s"), format!("{x}_z"), format!("{x}_q"), format!("{x}_dq"));
                        graph.initializer.push(TensorProto::f32(&s, &[], &[scale]));
                        graph.initializer.push(raw(&z, data_type::UINT8, &[], vec![zero]));
                        nodes.push(inserted("QuantizeLinear", &[&x, &s, &z], &[&q]));
                        nodes.push(inserted("DequantizeLinear", &[&q, &s, &z], &[&dq]));
                        activations_done.insert(x.clone(), dq.clone());
                        dq
                    }
                };
                node.input[0] = dq;
            }
            ActivationQuant::Float => nodes.push(weight_only(graph, name, w)),
        }
        nodes.push(node);
    }
    graph.node = nodes;
    check_unique(graph)?;
    Ok(model.encode_to_vec())
}

/// Every tensor is produced once: a name the pass generated must not be one the model had.
fn check_unique(graph: &GraphProto) -> Result<(), PluginError> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    // Old models list initializers among the inputs too: those are one tensor.
    let inputs = graph.input.iter().map(|i| i.name.as_str()).filter(|n| !inits.contains(n));
    let outputs = graph.node.iter().flat_map(|n| n.output.iter().map(String::as_str));
    let mut seen = HashSet::new();
    for name in graph.initializer.iter().map(|t| t.name.as_str()).chain(inputs).chain(outputs) {
        if !name.is_empty() && !seen.insert(name) {
            return Err(bad(format!(
                "tensor `{name}` would be produced twice: the model already uses a name this pass generates"
            )));
        }
    }
    Ok(())
}

/// Whether the dynamic pass computes `node` in integers (else its weight is dequantized).
fn integer_matmul(node: &NodeProto) -> bool {
    node.op_type == "MatMul"
        || (node.op_type == "Gemm"
            && attr_i(node, "transA", 0) == 0
            && attr_f(node, "alpha", 1.0) == 1.0
            && attr_f(node, "beta", 1.0) == 1.0)
}

/// How a pass quantizes a layer's activation input.
#[derive(Clone, Copy)]
enum ActivationQuant {
    Float,
    /// Calibrated uint8 (scale, zero point).
    Static(f32, u8),
    /// uint8 with the range of each call.
    Dynamic,
}

/// MatMul or Gemm (transA = 0, alpha = beta = 1) as DynamicQuantizeLinear + MatMulInteger,
/// rescaled to float, plus Gemm's bias.
fn dynamic_matmul(
    graph: &mut GraphProto,
    nodes: &mut Vec<NodeProto>,
    quantized_inputs: &mut HashMap<String, String>,
    original: NodeProto,
    name: &str,
    w: &Weight,
) {
    let (q, scales) = quantize_per_channel(w, REDUCED_RANGE);
    let (k, n) = if w.axis == 0 { (w.dims[1], w.dims[0]) } else { (w.dims[0], w.dims[1]) };
    // MatMulInteger takes B as [K, N]: a transposed Gemm weight is stored transposed back.
    let q: Vec<i8> = if w.axis == 0 {
        (0..(k * n) as usize).map(|i| q[(i % n as usize) * k as usize + i / n as usize]).collect()
    } else {
        q
    };
    graph.initializer.retain(|t| t.name != name);
    let (q_name, s_name) = (format!("{name}_q"), format!("{name}_s"));
    graph.initializer.push(int8(&q_name, &[k, n], &q));
    graph.initializer.push(TensorProto::f32(&s_name, &[n], &scales));
    let x = original.input[0].clone();
    let prefix = if original.name.is_empty() { original.output[0].clone() } else { original.name.clone() };
    let (xq, xs, xz) = (format!("{x}_q"), format!("{x}_s"), format!("{x}_z"));
    if !quantized_inputs.contains_key(&x) {
        nodes.push(inserted("DynamicQuantizeLinear", &[&x], &[&xq, &xs, &xz]));
        quantized_inputs.insert(x.clone(), xq.clone());
    }
    let (int, float, scale, scaled) =
        (format!("{prefix}_i32"), format!("{prefix}_f32"), format!("{prefix}_rs"), format!("{prefix}_mul"));
    // B's zero point is left out: 0, as the weights are symmetric.
    nodes.push(inserted("MatMulInteger", &[&xq, &q_name, &xz], &[&int]));
    let mut cast = inserted("Cast", &[&int], &[&float]);
    cast.attribute = vec![AttributeProto {
        name: "to".into(),
        r#type: Some(attribute_type::INT),
        i: Some(data_type::FLOAT as i64),
        ..Default::default()
    }];
    nodes.push(cast);
    nodes.push(inserted("Mul", &[&xs, &s_name], &[&scale]));
    let out = original.output[0].clone();
    match original.input.get(2).filter(|b| !b.is_empty()) {
        Some(bias) => {
            nodes.push(inserted("Mul", &[&float, &scale], &[&scaled]));
            nodes.push(inserted("Add", &[&scaled, bias], &[&out]));
        }
        None => nodes.push(inserted("Mul", &[&float, &scale], &[&out])),
    }
}

/// Sets the smallest-magnitude `round(sparsity * n)` elements of each weight to zero (ties
/// broken by position, so exactly that many are chosen).
fn prune(graph: &mut GraphProto, found: &BTreeMap<usize, (String, Weight)>, sparsity: f64) {
    for (name, w) in found.values() {
        let mut values = w.values.clone();
        let k = (sparsity * values.len() as f64).round() as usize;
        let mut order: Vec<usize> = (0..values.len()).collect();
        if k > 0 && k < values.len() {
            order.select_nth_unstable_by(k - 1, |&a, &b| values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b)));
        }
        for &i in order.iter().take(k) {
            values[i] = 0.0;
        }
        if let Some(init) = graph.initializer.iter_mut().find(|t| t.name == *name) {
            *init = TensorProto::f32(name, &w.dims, &values);
        }
    }
}

/// Empirical bias correction (Nagel et al., ICCV 2019, section 4.2): INT8 shifts each output
/// channel's mean by E[layer_int8(x) - layer(x)]; measured on the calibration samples and
/// subtracted from the channel's bias, so the layer's output keeps its float mean. Conv and Gemm
/// only (they have a bias to carry it). Measured for every layer at once on the float model's
/// activations, including the rounding of the activations the pass quantizes (static, dynamic).
fn correct_biases(
    model: &mut ModelProto,
    found: &BTreeMap<usize, (String, Weight)>,
    layers: &[(usize, ActivationQuant)],
    samples: &[Vec<TensorData>],
) -> Result<(), PluginError> {
    let opset = opset(model);
    let mut probe = model.clone();
    let graph = probe.graph.as_mut().ok_or_else(|| bad("the model has no graph"))?;
    let mut measured: Vec<(usize, String)> = Vec::new();
    for &(index, activation) in layers {
        let Some((name, w)) = found.get(&index) else { continue };
        let node = graph.node[index].clone();
        let correctable = match node.op_type.as_str() {
            "Conv" => true,
            "Gemm" => attr_f(&node, "beta", 1.0) == 1.0,
            _ => false,
        };
        if !correctable {
            continue;
        }
        let (err, mean) = (format!("{}_qerr", node.output[0]), format!("{}_qerr_mean", node.output[0]));
        let x = node.input[0].as_str();
        let copy = |graph: &mut GraphProto, input: &str, weight: &str, output: &str| {
            let mut copy = inserted(&node.op_type, &[input, weight], &[output]);
            copy.attribute = node.attribute.clone();
            graph.node.push(copy);
        };
        match activation {
            // Linear in the weight: the error is the layer with weight W_q - W.
            ActivationQuant::Float => {
                let delta: Vec<f32> = dequantized(w, FULL_RANGE).iter().zip(&w.values).map(|(q, f)| q - f).collect();
                let delta_name = format!("{name}_qdelta");
                graph.initializer.push(TensorProto::f32(&delta_name, &w.dims, &delta));
                copy(graph, x, &delta_name, &err);
            }
            // The layer on quantized activations with INT8 weights, minus the float layer.
            ActivationQuant::Static(..) | ActivationQuant::Dynamic => {
                let (q, s, z, xdq) =
                    (format!("{err}_xq"), format!("{err}_xs"), format!("{err}_xz"), format!("{err}_xdq"));
                if let ActivationQuant::Static(scale, zero) = activation {
                    graph.initializer.push(TensorProto::f32(&s, &[], &[scale]));
                    graph.initializer.push(raw(&z, data_type::UINT8, &[], vec![zero]));
                    graph.node.push(inserted("QuantizeLinear", &[x, &s, &z], &[&q]));
                } else {
                    graph.node.push(inserted("DynamicQuantizeLinear", &[x], &[&q, &s, &z]));
                }
                graph.node.push(inserted("DequantizeLinear", &[&q, &s, &z], &[&xdq]));
                let wq = format!("{name}_qw");
                let qmax = if matches!(activation, ActivationQuant::Dynamic) { REDUCED_RANGE } else { FULL_RANGE };
                graph.initializer.push(TensorProto::f32(&wq, &w.dims, &dequantized(w, qmax)));
                let (quantized, float) = (format!("{err}_quantized"), format!("{err}_float"));
                copy(graph, &xdq, &wq, &quantized);
                copy(graph, x, name, &float);
                graph.node.push(inserted("Sub", &[&quantized, &float], &[&err]));
            }
        }
        // Every axis but the channels (1): [0] for Gemm, [0, 2, 3, ...] for Conv.
        let axes: Vec<i64> = std::iter::once(0).chain(2..w.dims.len() as i64).collect();
        let axes = if node.op_type == "Gemm" { vec![0] } else { axes };
        let mut reduce = if opset >= 18 {
            let axes_name = format!("{err}_axes");
            graph.initializer.push(TensorProto::i64(&axes_name, &[axes.len() as i64], &axes));
            inserted("ReduceMean", &[&err, &axes_name], &[&mean])
        } else {
            let mut r = inserted("ReduceMean", &[&err], &[&mean]);
            r.attribute = vec![AttributeProto {
                name: "axes".into(),
                r#type: Some(attribute_type::INTS),
                ints: axes,
                ..Default::default()
            }];
            r
        };
        reduce.attribute.push(float_attr("keepdims", 0));
        graph.node.push(reduce);
        graph.output.push(ValueInfoProto::tensor_of_any_shape(&mean, data_type::FLOAT));
        measured.push((index, mean));
    }
    if measured.is_empty() {
        return Ok(());
    }
    let session = OnnxSession::load(&probe.encode_to_vec())?;
    let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
    for (i, sample) in samples.iter().enumerate() {
        let outputs = session.run(sample.clone()).map_err(|e| bad(format!("bias correction, sample {i}: {e:?}")))?;
        for out in outputs {
            if let Some(sum) =
                measured.iter().any(|(_, m)| *m == out.name).then(|| sums.entry(out.name.clone()).or_default())
            {
                let values = out.f32_values().ok_or_else(|| bad(format!("`{}` is not float32", out.name)))?;
                sum.resize(values.len(), 0.0);
                sum.iter_mut().zip(values).for_each(|(s, v)| *s += v as f64);
            }
        }
    }
    let graph = model.graph.as_mut().ok_or_else(|| bad("the model has no graph"))?;
    for (index, mean) in measured {
        let Some(sum) = sums.get(&mean) else { continue };
        let shift: Vec<f32> = sum.iter().map(|s| (s / samples.len() as f64) as f32).collect();
        let node = &graph.node[index];
        let bias_name = node.input.get(2).filter(|b| !b.is_empty()).cloned();
        match bias_name {
            Some(b) => {
                let Some(init) = graph.initializer.iter_mut().find(|t| t.name == b) else { continue };
                let Some(values) = init.f32_values().filter(|v| v.len() == shift.len()) else { continue };
                let corrected: Vec<f32> = values.iter().zip(&shift).map(|(v, s)| v - s).collect();
                *init = TensorProto::f32(&b, &init.dims.clone(), &corrected);
            }
            None => {
                let b = format!("{}_bias", node.output[0]);
                let corrected: Vec<f32> = shift.iter().map(|s| -s).collect();
                graph.initializer.push(TensorProto::f32(&b, &[corrected.len() as i64], &corrected));
                let node = &mut graph.node[index];
                node.input.resize(2, String::new());
                node.input.push(b);
            }
        }
    }
    Ok(())
}
