//! Local training on an edge node, native (candle), with the client-objective plugin applied to
//! every step's gradient; and evaluation of a model on local data.
pub mod data;
pub mod model;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor as CTensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW, SGD};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model_io::NamedTensors;
use crate::runtime::{ObjectivePlugin, PluginError};
use crate::tensor::Tensor;
pub use data::{DataError, Dataset};
pub use model::{ModelError, ModelSpec, Network};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

/// How a node trains in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: OptimizerKind,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams { epochs: 1, batch_size: 32, learning_rate: 0.05, optimizer: OptimizerKind::Sgd }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("client objective: {0}")]
    Objective(#[from] PluginError),
    #[error("training: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("training: {0}")]
    Params(String),
    #[error("training was cancelled")]
    Cancelled,
    #[error("training diverged: {0}")]
    Diverged(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainOutcome {
    #[serde(skip)]
    pub model: NamedTensors,
    pub examples: u64,
    pub steps: u64,
    /// Mean cross-entropy over the last epoch's batches.
    pub loss: f64,
    /// The client objective's extra loss at the trained weights (0 without one).
    pub penalty: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub examples: u64,
}

fn batch(data: &Dataset, idx: &[usize]) -> Result<(CTensor, CTensor), TrainError> {
    let x: Vec<f32> = idx.iter().flat_map(|i| data.row(*i).iter().copied()).collect();
    let y: Vec<u32> = idx.iter().map(|i| data.y[*i]).collect();
    Ok((CTensor::from_vec(x, (idx.len(), data.features), &Device::Cpu)?, model::labels(&y)?))
}

fn to_host(t: &CTensor) -> Result<Tensor, TrainError> {
    let shape: Vec<u64> = t.dims().iter().map(|d| *d as u64).collect();
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(Tensor::from_f32(shape, data).expect("shape of the candle tensor"))
}

fn to_candle(t: &Tensor, dims: &[usize]) -> Result<CTensor, TrainError> {
    let data =
        t.as_f32().ok_or_else(|| TrainError::Params("the client objective changed a gradient's dtype".into()))?;
    Ok(CTensor::from_slice(data, dims, &Device::Cpu)?)
}

enum Optim {
    Sgd(SGD),
    Adam(AdamW),
}

impl Optim {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        match self {
            Optim::Sgd(o) => o.step(grads),
            Optim::Adam(o) => o.step(grads),
        }
    }
}

/// Accuracy and mean cross-entropy of `model` on `data`.
pub fn evaluate(spec: &ModelSpec, model: &NamedTensors, data: &Dataset) -> Result<Evaluation, TrainError> {
    if data.is_empty() {
        return Ok(Evaluation { accuracy: 0.0, loss: 0.0, examples: 0 });
    }
    let net = Network::from_tensors(spec, model)?;
    let (mut correct, mut loss_sum) = (0usize, 0f64);
    let all: Vec<usize> = (0..data.len()).collect();
    for chunk in all.chunks(512) {
        let (x, y) = batch(data, chunk)?;
        let logits = net.forward(&x)?;
        loss_sum += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let predicted = logits.argmax(1)?.to_vec1::<u32>()?;
        correct += predicted.iter().zip(chunk).filter(|(p, i)| **p == data.y[**i]).count();
    }
    Ok(Evaluation {
        accuracy: correct as f64 / data.len() as f64,
        loss: loss_sum / data.len() as f64,
        examples: data.len() as u64,
    })
}

/// Trains `global` on `data` for `params.epochs` epochs of seeded mini-batches. With an
/// objective plugin (already begun on this round), every step's gradients go through its
/// `adjust-gradient` before the optimizer steps. `on_step(step, total)` reports progress.
pub fn train(
    spec: &ModelSpec,
    global: &NamedTensors,
    data: &Dataset,
    params: &TrainParams,
    seed: u64,
    objective: Option<&mut ObjectivePlugin>,
    on_step: impl FnMut(u64, u64),
) -> Result<TrainOutcome, TrainError> {
    train_cancellable(spec, global, data, params, seed, objective, on_step, &AtomicBool::new(false))
}

/// As [`train`], stopping with [`TrainError::Cancelled`] at the next step once `cancel` is set;
/// a loss or weights that stop being finite end it with [`TrainError::Diverged`].
#[allow(clippy::too_many_arguments)]
pub fn train_cancellable(
    spec: &ModelSpec,
    global: &NamedTensors,
    data: &Dataset,
    params: &TrainParams,
    seed: u64,
    mut objective: Option<&mut ObjectivePlugin>,
    mut on_step: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    if params.batch_size == 0 || !(params.learning_rate.is_finite() && params.learning_rate > 0.0) {
        return Err(TrainError::Params("batch_size must be >= 1 and learning_rate > 0".into()));
    }
    if data.is_empty() {
        return Err(TrainError::Params("the node has no training examples".into()));
    }
    let net = Network::from_tensors(spec, global)?;
    let vars: Vec<_> = net.vars.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = match params.optimizer {
        OptimizerKind::Sgd => Optim::Sgd(SGD::new(vars, params.learning_rate)?),
        OptimizerKind::Adam => Optim::Adam(AdamW::new(
            vars,
            ParamsAdamW { lr: params.learning_rate, weight_decay: 0.0, ..ParamsAdamW::default() },
        )?),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let batches_per_epoch = data.len().div_ceil(params.batch_size) as u64;
    let total = batches_per_epoch * params.epochs as u64;
    let (mut step, mut last_epoch_loss) = (0u64, 0f64);
    let mut order: Vec<usize> = (0..data.len()).collect();
    for _ in 0..params.epochs {
        order.shuffle(&mut rng);
        let mut epoch_loss = 0f64;
        for chunk in order.chunks(params.batch_size) {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let (x, y) = batch(data, chunk)?;
            let loss = candle_nn::loss::cross_entropy(&net.forward(&x)?, &y)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(TrainError::Diverged(format!(
                    "the loss is {value} at step {} (learning_rate {})",
                    step + 1,
                    params.learning_rate
                )));
            }
            epoch_loss += value;
            let mut grads = loss.backward()?;
            if let Some(obj) = objective.as_deref_mut() {
                for (name, var) in &net.vars {
                    let Some(g) = grads.get(var.as_tensor()) else { continue };
                    let mut host_grad = to_host(g)?;
                    obj.adjust_gradient(name, &to_host(var.as_tensor())?, &mut host_grad)?;
                    grads.insert(var.as_tensor(), to_candle(&host_grad, var.dims())?);
                }
            }
            optimizer.step(&grads)?;
            step += 1;
            on_step(step, total);
        }
        last_epoch_loss = epoch_loss / batches_per_epoch as f64;
    }
    let model = net.to_tensors()?;
    if let Some((name, _)) = model.iter().find(|(_, t)| !t.all_finite()) {
        return Err(TrainError::Diverged(format!(
            "weights of `{name}` are not finite after {step} steps (learning_rate {})",
            params.learning_rate
        )));
    }
    let mut penalty = 0.0;
    if let Some(obj) = objective {
        for (name, t) in &model {
            penalty += obj.penalty(name, t)?;
        }
    }
    Ok(TrainOutcome { model, examples: data.len() as u64, steps: step, loss: last_epoch_loss, penalty })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mlp_learns_the_digits_and_training_is_deterministic() {
        let (train_set, test_set) = Dataset::digits().holdout(0.2, 1);
        let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![32], classes: 10 };
        let init = spec.init(5);
        let before = evaluate(&spec, &init, &test_set).expect("eval");
        let params = TrainParams { epochs: 5, batch_size: 32, learning_rate: 0.1, optimizer: OptimizerKind::Sgd };
        let out = train(&spec, &init, &train_set, &params, 9, None, |_, _| {}).expect("train");
        let after = evaluate(&spec, &out.model, &test_set).expect("eval");
        assert!(after.accuracy > 0.9 && after.accuracy > before.accuracy + 0.5, "{before:?} -> {after:?}");
        let again = train(&spec, &init, &train_set, &params, 9, None, |_, _| {}).expect("train");
        assert_eq!(again.model, out.model, "same seed, same model");
    }

    #[test]
    fn a_cnn_with_adam_learns_too() {
        let (train_set, test_set) = Dataset::digits().holdout(0.2, 1);
        let spec = ModelSpec::Cnn { input_shape: [1, 8, 8], conv: vec![8], hidden: vec![32], classes: 10 };
        let params = TrainParams { epochs: 3, batch_size: 32, learning_rate: 0.005, optimizer: OptimizerKind::Adam };
        let out = train(&spec, &spec.init(2), &train_set, &params, 3, None, |_, _| {}).expect("train");
        let eval = evaluate(&spec, &out.model, &test_set).expect("eval");
        assert!(eval.accuracy > 0.85, "{eval:?}");
    }
}
