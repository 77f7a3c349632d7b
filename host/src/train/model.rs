//! Model architectures described in TOML: an MLP or a small CNN, their seeded initialisation and
//! their forward pass on candle tensors.
use candle_core::{DType as CDType, Device, Tensor as CTensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model_io::NamedTensors;
use crate::tensor::Tensor;

/// `[model]` of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelSpec {
    /// Fully connected layers with ReLU between them.
    Mlp {
        /// Features per example.
        inputs: usize,
        /// Widths of the hidden layers.
        #[serde(default)]
        hidden: Vec<usize>,
        classes: usize,
    },
    /// 3x3 convolutions (padding 1) each followed by ReLU and 2x2 max pooling, then an MLP head.
    Cnn {
        /// Channels, height, width of one example.
        input_shape: [usize; 3],
        /// Output channels of each convolution.
        conv: Vec<usize>,
        #[serde(default)]
        hidden: Vec<usize>,
        classes: usize,
    },
    /// The user's own model, trained by the edge's external trainer (`[trainer]` in edge.toml):
    /// nereid knows only its tensors.
    External {
        /// In a job file: the safetensors file of the initial weights (relative to the job file).
        /// In a job sent to the cloud: their content digest, `sha256:<hex>`.
        init: String,
        /// The tensors (names and shapes, all f32), read from `init` when the job file is
        /// loaded; not written in a job file.
        #[serde(default)]
        tensors: Vec<TensorLayout>,
    },
}

/// A tensor of an external model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorLayout {
    pub name: String,
    pub shape: Vec<u64>,
}

/// Most tensors an external model may have.
pub const MAX_TENSORS: usize = 4096;
/// Longest tensor name of an external model (bytes).
pub const MAX_TENSOR_NAME: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model: {0}")]
    Spec(String),
    /// A `[model]` field out of range.
    #[error("model.{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("model: tensor `{0}` is missing")]
    Missing(String),
    #[error("model: tensor `{name}` has shape {got:?}, the architecture needs {want:?}")]
    Shape { name: String, got: Vec<u64>, want: Vec<u64> },
    #[error("model: tensor `{0}` is not f32")]
    Dtype(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Most parameters a model may have: 2^28 (1 GiB as f32). A job's model also has to fit the
/// cloud's upload limit, which is usually far lower.
pub const MAX_PARAMETERS: u64 = 1 << 28;
/// Largest single dimension (features, a width, classes, channels, an image side).
pub const MAX_DIM: u64 = 1 << 24;
/// Most activations one example produces on its way through the model (elements): what a
/// training batch holds per example, twice over for the backward pass.
pub const MAX_ACTIVATIONS: u64 = 1 << 28;
/// Most hidden layers, and convolutions.
pub const MAX_LAYERS: usize = 64;
const MAX_CONV: usize = 16;

impl ModelSpec {
    /// Checks the architecture: every size positive and within the caps above, the number of
    /// parameters and activations too. The error's `key` is the offending field under `[model]`.
    pub fn validate(&self) -> Result<(), ModelError> {
        let spec = |key: &'static str, message: String| Err(ModelError::Invalid { key, message });
        let dim = |key: &'static str, v: usize| {
            if v == 0 || v as u64 > MAX_DIM {
                spec(key, format!("must be between 1 and {MAX_DIM}, not {v}"))
            } else {
                Ok(())
            }
        };
        let (hidden, classes) = match self {
            ModelSpec::External { init, tensors } => return validate_external(init, tensors),
            ModelSpec::Mlp { inputs, hidden, classes } => {
                dim("inputs", *inputs)?;
                (hidden, *classes)
            }
            ModelSpec::Cnn { input_shape, conv, hidden, classes } => {
                input_shape.iter().try_for_each(|d| dim("input_shape", *d))?;
                if conv.is_empty() {
                    return spec("conv", "a cnn needs at least one convolution".into());
                }
                if conv.len() > MAX_CONV {
                    return spec("conv", format!("at most {MAX_CONV} convolutions, not {}", conv.len()));
                }
                conv.iter().try_for_each(|c| dim("conv", *c))?;
                let (h, w) = (input_shape[1] >> conv.len(), input_shape[2] >> conv.len());
                if h == 0 || w == 0 {
                    return spec(
                        "conv",
                        format!(
                            "{} poolings shrink a {}x{} input to nothing",
                            conv.len(),
                            input_shape[1],
                            input_shape[2]
                        ),
                    );
                }
                (hidden, *classes)
            }
        };
        if hidden.len() > MAX_LAYERS {
            return spec("hidden", format!("at most {MAX_LAYERS} hidden layers, not {}", hidden.len()));
        }
        hidden.iter().try_for_each(|h| dim("hidden", *h))?;
        dim("classes", classes)?;
        // Every dimension is at most 2^24 and there are at most 81 layers: u128 cannot overflow.
        let params = self.parameters_u128();
        if params > MAX_PARAMETERS as u128 {
            return spec(
                "kind",
                format!("the model has {params} parameters, more than the {MAX_PARAMETERS} a job may have"),
            );
        }
        let activations = self.activations_per_example();
        if activations > MAX_ACTIVATIONS as u128 {
            return spec(
                "kind",
                format!(
                    "one example makes {activations} activations on its way through the model, more than {MAX_ACTIVATIONS}"
                ),
            );
        }
        Ok(())
    }

    /// Parameters of a validated spec.
    pub fn parameter_count(&self) -> u64 {
        self.parameters_u128() as u64
    }

    /// Parameters, counted without overflow whatever the sizes.
    fn parameters_u128(&self) -> u128 {
        let mut n: u128 = 0;
        let dense_in: u128 = match self {
            ModelSpec::External { tensors, .. } => return external_parameters(tensors),
            ModelSpec::Mlp { inputs, .. } => *inputs as u128,
            ModelSpec::Cnn { input_shape, conv, .. } => {
                let mut c_in = input_shape[0] as u128;
                for c in conv {
                    n = n
                        .saturating_add((*c as u128).saturating_mul(c_in).saturating_mul(9).saturating_add(*c as u128));
                    c_in = *c as u128;
                }
                let shift = conv.len().min(127) as u32;
                c_in.saturating_mul((input_shape[1] as u128) >> shift).saturating_mul((input_shape[2] as u128) >> shift)
            }
        };
        let (hidden, classes) = match self {
            ModelSpec::Mlp { hidden, classes, .. } | ModelSpec::Cnn { hidden, classes, .. } => (hidden, *classes),
            ModelSpec::External { .. } => return n,
        };
        let mut width = dense_in;
        for out in hidden.iter().copied().chain(std::iter::once(classes)) {
            let out = out as u128;
            n = n.saturating_add(out.saturating_mul(width).saturating_add(out));
            width = out;
        }
        n
    }

    /// Elements of the activations one example makes (inputs, every layer's output).
    fn activations_per_example(&self) -> u128 {
        let (hidden, classes) = match self {
            ModelSpec::Mlp { hidden, classes, .. } | ModelSpec::Cnn { hidden, classes, .. } => (hidden, *classes),
            // The trainer's own business: its process's memory is not the edge's.
            ModelSpec::External { .. } => return 0,
        };
        let mut total: u128 = self.input_len_u128();
        if let ModelSpec::Cnn { input_shape, conv, .. } = self {
            let (mut h, mut w) = (input_shape[1] as u128, input_shape[2] as u128);
            for c in conv {
                // Before and after the pooling.
                total = total.saturating_add((*c as u128).saturating_mul(h).saturating_mul(w));
                h /= 2;
                w /= 2;
                total = total.saturating_add((*c as u128).saturating_mul(h).saturating_mul(w));
            }
        }
        hidden.iter().chain(std::iter::once(&classes)).fold(total, |t, h| t.saturating_add(*h as u128))
    }

    fn input_len_u128(&self) -> u128 {
        match self {
            ModelSpec::Mlp { inputs, .. } => *inputs as u128,
            ModelSpec::Cnn { input_shape, .. } => input_shape.iter().fold(1u128, |p, d| p.saturating_mul(*d as u128)),
            ModelSpec::External { .. } => 0,
        }
    }

    /// Whether the model is the user's own, trained by an external trainer.
    pub fn is_external(&self) -> bool {
        matches!(self, ModelSpec::External { .. })
    }

    /// Activation elements of a training batch: what the edge's memory must hold for it.
    pub fn batch_activations(&self, batch_size: usize) -> u128 {
        self.activations_per_example().saturating_mul(batch_size as u128)
    }

    /// Features of one example, flattened (0 for an external model: nereid does not read its
    /// data).
    pub fn input_len(&self) -> usize {
        match self {
            ModelSpec::Mlp { inputs, .. } => *inputs,
            ModelSpec::Cnn { input_shape, .. } => input_shape.iter().product(),
            ModelSpec::External { .. } => 0,
        }
    }

    /// Classes of a built-in model (0 for an external one).
    pub fn classes(&self) -> usize {
        match self {
            ModelSpec::Mlp { classes, .. } | ModelSpec::Cnn { classes, .. } => *classes,
            ModelSpec::External { .. } => 0,
        }
    }

    /// Parameter names and shapes, in order.
    pub fn parameters(&self) -> Vec<(String, Vec<u64>)> {
        let mut params = Vec::new();
        let dense_in = match self {
            ModelSpec::External { tensors, .. } => {
                return tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
            }
            ModelSpec::Mlp { inputs, .. } => *inputs,
            ModelSpec::Cnn { input_shape, conv, .. } => {
                let mut c_in = input_shape[0];
                for (i, c) in conv.iter().enumerate() {
                    params.push((format!("conv.{i}.weight"), vec![*c as u64, c_in as u64, 3, 3]));
                    params.push((format!("conv.{i}.bias"), vec![*c as u64]));
                    c_in = *c;
                }
                c_in * (input_shape[1] >> conv.len()) * (input_shape[2] >> conv.len())
            }
        };
        let (hidden, classes) = match self {
            ModelSpec::Mlp { hidden, classes, .. } | ModelSpec::Cnn { hidden, classes, .. } => (hidden, *classes),
            ModelSpec::External { .. } => return params,
        };
        let mut width = dense_in;
        for (i, out) in hidden.iter().copied().chain(std::iter::once(classes)).enumerate() {
            params.push((format!("dense.{i}.weight"), vec![out as u64, width as u64]));
            params.push((format!("dense.{i}.bias"), vec![out as u64]));
            width = out;
        }
        params
    }

    /// Kaiming-uniform weights and zero biases from `seed`, as f32 tensors (none for an
    /// external model: its initial weights come with the job).
    pub fn init(&self, seed: u64) -> NamedTensors {
        if self.is_external() {
            return Vec::new();
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        self.parameters()
            .into_iter()
            .map(|(name, shape)| {
                let n: u64 = shape.iter().product();
                let data: Vec<f32> = if name.ends_with(".bias") {
                    vec![0.0; n as usize]
                } else {
                    let fan_in: u64 = shape[1..].iter().product();
                    let bound = (6.0 / fan_in as f64).sqrt() as f32;
                    (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
                };
                (name, Tensor::from_f32(shape, data).expect("shape from the spec"))
            })
            .collect()
    }

    /// As `check`, on a layout read from a file's header.
    pub fn check_layout(&self, layout: &[(String, crate::tensor::DType, Vec<u64>)]) -> Result<(), ModelError> {
        for (name, want) in self.parameters() {
            let (_, dtype, shape) =
                layout.iter().find(|(n, _, _)| *n == name).ok_or_else(|| ModelError::Missing(name.clone()))?;
            if *shape != want {
                return Err(ModelError::Shape { name, got: shape.clone(), want });
            }
            if *dtype != crate::tensor::DType::F32 {
                return Err(ModelError::Dtype(name));
            }
        }
        Ok(())
    }

    /// Checks that `model` has every parameter of this architecture with the right shape.
    pub fn check(&self, model: &NamedTensors) -> Result<(), ModelError> {
        for (name, want) in self.parameters() {
            let (_, t) = model.iter().find(|(n, _)| *n == name).ok_or_else(|| ModelError::Missing(name.clone()))?;
            if t.shape() != want.as_slice() {
                return Err(ModelError::Shape { name, got: t.shape().to_vec(), want });
            }
            if t.as_f32().is_none() {
                return Err(ModelError::Dtype(name));
            }
        }
        Ok(())
    }
}

fn external_parameters(tensors: &[TensorLayout]) -> u128 {
    tensors.iter().fold(0u128, |n, t| n.saturating_add(t.shape.iter().fold(1u128, |p, d| p.saturating_mul(*d as u128))))
}

fn validate_external(init: &str, tensors: &[TensorLayout]) -> Result<(), ModelError> {
    let invalid = |key: &'static str, message: String| Err(ModelError::Invalid { key, message });
    if init.is_empty() {
        return invalid("init", "names no file of initial weights".into());
    }
    if tensors.is_empty() {
        return invalid("init", "the initial weights have no tensors".into());
    }
    if tensors.len() > MAX_TENSORS {
        return invalid("init", format!("{} tensors, more than the {MAX_TENSORS} a model may have", tensors.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if t.name.is_empty() || t.name.len() > MAX_TENSOR_NAME || t.name.chars().any(char::is_control) {
            return invalid(
                "init",
                format!("tensor name {:?}: 1 to {MAX_TENSOR_NAME} bytes, no control characters", t.name),
            );
        }
        if !seen.insert(t.name.as_str()) {
            return invalid("init", format!("tensor `{}` appears twice", t.name));
        }
        if t.shape.len() > 8 || t.shape.iter().any(|d| *d == 0 || *d > MAX_DIM) {
            return invalid(
                "init",
                format!("tensor `{}` has shape {:?}: at most 8 dimensions, each 1 to {MAX_DIM}", t.name, t.shape),
            );
        }
    }
    let params = external_parameters(tensors);
    if params > MAX_PARAMETERS as u128 {
        return invalid(
            "init",
            format!("the model has {params} parameters, more than the {MAX_PARAMETERS} a job may have"),
        );
    }
    Ok(())
}

fn external_not_native() -> ModelError {
    ModelError::Spec("an external model is trained and evaluated by the edge's trainer, not by nereid".into())
}

/// A model's parameters as trainable candle variables, in the spec's order.
pub struct Network {
    pub spec: ModelSpec,
    pub vars: Vec<(String, Var)>,
}

impl Network {
    pub fn from_tensors(spec: &ModelSpec, model: &NamedTensors) -> Result<Network, ModelError> {
        if spec.is_external() {
            return Err(external_not_native());
        }
        spec.check(model)?;
        let vars = spec
            .parameters()
            .into_iter()
            .map(|(name, shape)| {
                let t = &model.iter().find(|(n, _)| *n == name).expect("checked above").1;
                let dims: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
                let data = t.as_f32().expect("checked above");
                Ok((name, Var::from_tensor(&CTensor::from_slice(data, dims.as_slice(), &Device::Cpu)?)?))
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Network { spec: spec.clone(), vars })
    }

    pub fn to_tensors(&self) -> Result<NamedTensors, ModelError> {
        self.vars
            .iter()
            .map(|(name, var)| {
                let shape: Vec<u64> = var.dims().iter().map(|d| *d as u64).collect();
                let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                Ok((name.clone(), Tensor::from_f32(shape, data).expect("shape of the var")))
            })
            .collect()
    }

    fn var(&self, name: &str) -> &CTensor {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor()).expect("parameter from the spec")
    }

    /// Logits of a batch `x` of shape [batch, input_len].
    pub fn forward(&self, x: &CTensor) -> Result<CTensor, ModelError> {
        let batch = x.dim(0)?;
        let (mut h, hidden) = match &self.spec {
            ModelSpec::External { .. } => return Err(external_not_native()),
            ModelSpec::Mlp { hidden, .. } => (x.clone(), hidden.len()),
            ModelSpec::Cnn { input_shape, conv, hidden, .. } => {
                let mut h = x.reshape((batch, input_shape[0], input_shape[1], input_shape[2]))?;
                for i in 0..conv.len() {
                    let w = self.var(&format!("conv.{i}.weight"));
                    let b = self.var(&format!("conv.{i}.bias"));
                    h = h.conv2d(w, 1, 1, 1, 1)?;
                    h = h.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?.relu()?.max_pool2d(2)?;
                }
                (h.flatten_from(1)?, hidden.len())
            }
        };
        for i in 0..=hidden {
            let w = self.var(&format!("dense.{i}.weight"));
            let b = self.var(&format!("dense.{i}.bias"));
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if i < hidden {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Labels as the u32 tensor cross-entropy wants.
pub fn labels(y: &[u32]) -> Result<CTensor, ModelError> {
    Ok(CTensor::from_slice(y, y.len(), &Device::Cpu)?.to_dtype(CDType::U32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_follow_the_architecture() {
        let mlp = ModelSpec::Mlp { inputs: 64, hidden: vec![32], classes: 10 };
        let names: Vec<_> = mlp.parameters().into_iter().map(|(n, s)| format!("{n}{s:?}")).collect();
        assert_eq!(names, ["dense.0.weight[32, 64]", "dense.0.bias[32]", "dense.1.weight[10, 32]", "dense.1.bias[10]"]);
        let cnn = ModelSpec::Cnn { input_shape: [1, 8, 8], conv: vec![4, 8], hidden: vec![], classes: 10 };
        let p = cnn.parameters();
        assert_eq!(p[0], ("conv.0.weight".to_string(), vec![4, 1, 3, 3]));
        assert_eq!(p[2], ("conv.1.weight".to_string(), vec![8, 4, 3, 3]));
        assert_eq!(p[4], ("dense.0.weight".to_string(), vec![10, 8 * 2 * 2]));
        assert!(ModelSpec::Cnn { input_shape: [1, 2, 2], conv: vec![4, 4], hidden: vec![], classes: 2 }
            .validate()
            .is_err());
    }

    #[test]
    fn init_is_seeded_and_forward_has_the_right_shape() {
        let cnn = ModelSpec::Cnn { input_shape: [1, 8, 8], conv: vec![4], hidden: vec![16], classes: 10 };
        assert_eq!(cnn.init(3), cnn.init(3));
        assert_ne!(cnn.init(3), cnn.init(4));
        let net = Network::from_tensors(&cnn, &cnn.init(3)).expect("network");
        let x = CTensor::zeros((5, 64), CDType::F32, &Device::Cpu).expect("x");
        assert_eq!(net.forward(&x).expect("forward").dims(), &[5, 10]);
        assert_eq!(net.to_tensors().expect("back"), cnn.init(3));
    }

    #[test]
    fn sizes_that_would_exhaust_memory_or_overflow_are_refused_with_their_key() {
        let key = |m: ModelSpec| match m.validate() {
            Err(ModelError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        // The defects' own values: a 16 Gi-wide layer, and 2^62 inputs.
        assert_eq!(key(ModelSpec::Mlp { inputs: 64, hidden: vec![17179869184], classes: 10 }), "hidden");
        assert_eq!(key(ModelSpec::Mlp { inputs: 4611686018427387904, hidden: vec![], classes: 10 }), "inputs");
        // Each dimension fine, the product too large.
        assert_eq!(key(ModelSpec::Mlp { inputs: 1 << 20, hidden: vec![1 << 12], classes: 10 }), "kind");
        assert_eq!(
            key(ModelSpec::Cnn { input_shape: [1, 64, 64], conv: vec![8; 17], hidden: vec![], classes: 2 }),
            "conv"
        );
        assert_eq!(key(ModelSpec::Mlp { inputs: 8, hidden: vec![8; 65], classes: 2 }), "hidden");
        let ok = ModelSpec::Mlp { inputs: 64, hidden: vec![128], classes: 10 };
        ok.validate().expect("the demo's model");
        assert_eq!(ok.parameter_count(), ok.parameters().iter().map(|(_, s)| s.iter().product::<u64>()).sum::<u64>());
        let cnn = ModelSpec::Cnn { input_shape: [3, 64, 64], conv: vec![8, 16], hidden: vec![32], classes: 10 };
        cnn.validate().expect("a small cnn");
        assert_eq!(cnn.parameter_count(), cnn.parameters().iter().map(|(_, s)| s.iter().product::<u64>()).sum::<u64>());
    }
}
