//! Models (ordered named host tensors), their layout, client updates and round results.
use crate::{ClientUpdate, DType, Metric, NamedTensor, PluginError, Tensor, UpdateKind};

/// An ordered list of named host tensors: a model's weights, an update or a delta.
pub struct Model {
    tensors: Vec<NamedTensor>,
}

impl Model {
    pub fn new(tensors: Vec<NamedTensor>) -> Self {
        Model { tensors }
    }

    pub fn into_tensors(self) -> Vec<NamedTensor> {
        self.tensors
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|t| (t.name.as_str(), &t.value))
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name).map(|t| &t.value)
    }

    /// The names, element types and shapes, in order.
    pub fn layout(&self) -> Layout {
        Layout { entries: self.tensors.iter().map(|t| (t.name.clone(), t.value.dtype(), t.value.shape())).collect() }
    }

    /// Zeros of the same names and shapes; of `dtype` if given (e.g. an f64 accumulator).
    pub fn zeros_like(&self, dtype: Option<DType>) -> Result<Model, PluginError> {
        self.map(|t| Ok(Tensor::zeros_like(t, dtype)?))
    }

    /// A copy converted to `dtype`.
    pub fn cast(&self, dtype: DType) -> Result<Model, PluginError> {
        self.map(|t| Ok(t.cast(dtype)?))
    }

    /// A copy with each tensor converted to the element type `layout` gives for its name.
    pub fn cast_to(&self, layout: &Layout) -> Result<Model, PluginError> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| {
                let dtype = layout
                    .entries
                    .iter()
                    .find(|e| e.0 == t.name)
                    .map(|e| e.1)
                    .ok_or_else(|| PluginError::rejected(format!("unexpected extra tensor `{}`", t.name)))?;
                Ok(NamedTensor { name: t.name.clone(), value: t.value.cast(dtype)? })
            })
            .collect::<Result<_, PluginError>>()?;
        Ok(Model { tensors })
    }

    /// A copy-on-write copy.
    pub fn duplicate(&self) -> Result<Model, PluginError> {
        self.map(|t| Ok(t.duplicate()?))
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor, PluginError>) -> Result<Model, PluginError> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| Ok(NamedTensor { name: t.name.clone(), value: f(&t.value)? }))
            .collect::<Result<_, PluginError>>()?;
        Ok(Model { tensors })
    }

    /// Pairs each tensor with the tensor of the same name in `other`.
    fn zip<'a>(&'a self, other: &'a Model) -> Result<Vec<(&'a str, &'a Tensor, &'a Tensor)>, PluginError> {
        self.tensors
            .iter()
            .map(|t| {
                let o = other
                    .get(&t.name)
                    .ok_or_else(|| PluginError::rejected(format!("tensor `{}` is missing", t.name)))?;
                Ok((t.name.as_str(), &t.value, o))
            })
            .collect()
    }

    /// self += alpha * x, tensor by tensor (matched by name).
    pub fn axpy(&self, alpha: f64, x: &Model) -> Result<(), PluginError> {
        for (_, a, b) in self.zip(x)? {
            a.axpy(alpha, b)?;
        }
        Ok(())
    }

    /// self *= alpha.
    pub fn scale(&self, alpha: f64) -> Result<(), PluginError> {
        for t in &self.tensors {
            t.value.scale(alpha)?;
        }
        Ok(())
    }

    /// self += other.
    pub fn add(&self, other: &Model) -> Result<(), PluginError> {
        self.axpy(1.0, other)
    }

    /// self -= other.
    pub fn sub(&self, other: &Model) -> Result<(), PluginError> {
        self.axpy(-1.0, other)
    }

    /// self *= other, element-wise.
    pub fn mul(&self, other: &Model) -> Result<(), PluginError> {
        for (_, a, b) in self.zip(other)? {
            a.mul(b)?;
        }
        Ok(())
    }

    /// self /= other, element-wise.
    pub fn div(&self, other: &Model) -> Result<(), PluginError> {
        for (_, a, b) in self.zip(other)? {
            a.div(b)?;
        }
        Ok(())
    }

    /// self = sqrt(self), element-wise.
    pub fn sqrt(&self) -> Result<(), PluginError> {
        self.tensors.iter().try_for_each(|t| Ok(t.value.sqrt()?))
    }

    /// self += value, element-wise.
    pub fn add_scalar(&self, value: f64) -> Result<(), PluginError> {
        self.tensors.iter().try_for_each(|t| Ok(t.value.add_scalar(value)?))
    }

    /// self = sign(self): -1, 0 or 1, element-wise.
    pub fn sign(&self) -> Result<(), PluginError> {
        self.tensors.iter().try_for_each(|t| Ok(t.value.sign()?))
    }

    /// self += N(0, stddev^2) per element; tensor i draws from the stream of `seed + i`.
    pub fn add_gaussian(&self, stddev: f64, seed: u64) -> Result<(), PluginError> {
        for (i, t) in self.tensors.iter().enumerate() {
            t.value.add_gaussian(stddev, seed.wrapping_add(i as u64))?;
        }
        Ok(())
    }

    /// sum over every element of self * other, in f64.
    pub fn dot(&self, other: &Model) -> Result<f64, PluginError> {
        let mut sum = 0.0;
        for (_, a, b) in self.zip(other)? {
            sum += a.dot(b)?;
        }
        Ok(sum)
    }

    /// The L2 norm of the whole model (all tensors as one vector).
    pub fn l2_norm(&self) -> Result<f64, PluginError> {
        let mut sum = 0.0;
        for t in &self.tensors {
            sum += t.value.l2_norm()?.powi(2);
        }
        Ok(sum.sqrt())
    }

    /// Scales the whole model so that its L2 norm is at most `max_norm`; the factor applied.
    pub fn clip_by_norm(&self, max_norm: f64) -> Result<f64, PluginError> {
        let norm = self.l2_norm()?;
        if norm <= max_norm {
            return Ok(1.0);
        }
        let factor = max_norm / norm;
        self.scale(factor)?;
        Ok(factor)
    }

    /// Refuses a model with a NaN or infinite element, naming the tensor.
    pub fn check_finite(&self) -> Result<(), PluginError> {
        match self.tensors.iter().find(|t| !t.value.all_finite()) {
            Some(t) => Err(PluginError::rejected(format!("tensor `{}` contains NaN or Inf", t.name))),
            None => Ok(()),
        }
    }
}

/// Names, element types and shapes of a model, to check that updates agree with each other.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub entries: Vec<(String, DType, Vec<u64>)>,
}

impl Layout {
    /// A model of zeros with these names, element types and shapes.
    pub fn zeros(&self) -> Result<Model, PluginError> {
        let tensors = self
            .entries
            .iter()
            .map(|(name, dtype, shape)| Ok(NamedTensor { name: name.clone(), value: Tensor::zeros(*dtype, shape)? }))
            .collect::<Result<_, PluginError>>()?;
        Ok(Model { tensors })
    }

    /// Refuses a model whose tensors differ from this layout, naming the first difference.
    pub fn check(&self, model: &Model) -> Result<(), PluginError> {
        for (name, dtype, shape) in &self.entries {
            let t = model.get(name).ok_or_else(|| PluginError::rejected(format!("tensor `{name}` is missing")))?;
            let (d, s) = (t.dtype(), t.shape());
            if d != *dtype {
                return Err(PluginError::rejected(format!("tensor `{name}` has dtype {d}, expected {dtype}")));
            }
            if s != *shape {
                return Err(PluginError::rejected(format!("tensor `{name}` has shape {s:?}, expected {shape:?}")));
            }
        }
        if let Some((extra, _)) = model.iter().find(|(n, _)| !self.entries.iter().any(|e| e.0 == *n)) {
            return Err(PluginError::rejected(format!("unexpected extra tensor `{extra}`")));
        }
        Ok(())
    }
}

/// One client's contribution to a round.
pub struct Update {
    pub client: String,
    pub kind: UpdateKind,
    pub model: Model,
    pub num_examples: u64,
    pub metrics: Vec<Metric>,
}

impl From<ClientUpdate> for Update {
    fn from(u: ClientUpdate) -> Self {
        Update {
            client: u.client,
            kind: u.kind,
            model: Model::new(u.tensors),
            num_examples: u.num_examples,
            metrics: u.metrics,
        }
    }
}

/// What an aggregator's round ends with.
pub struct Aggregate {
    pub model: Model,
    pub metrics: Vec<Metric>,
}

impl Aggregate {
    pub fn new(model: Model) -> Self {
        Aggregate { model, metrics: Vec::new() }
    }

    pub fn with_metric(mut self, name: &str, value: f64) -> Self {
        self.metrics.push(Metric { name: name.to_string(), value });
        self
    }
}
