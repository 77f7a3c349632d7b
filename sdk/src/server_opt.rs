//! What the server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi; Reddi et al., "Adaptive
//! Federated Optimization", 2021) share: the round's FedAvg mean and the pseudo-gradient
//! delta = mean - global, on which each plugin takes its own optimizer step. Their moments live
//! in the host-kept strategy state ([`crate::state`]), so they survive a restart.
use crate::{Aggregate, Layout, Model, PluginError, Update, WeightedMean};

/// A round's weighted mean, with the global model it started from.
#[derive(Default)]
pub struct PseudoGradient {
    global: Option<Model>,
    mean: WeightedMean,
}

/// The end of a round for a server optimizer.
pub struct Step {
    /// The round's global model, writable: the optimizer adds its step to it.
    pub weights: Model,
    /// mean - global, in the model's element types.
    pub delta: Model,
    /// The mean's metrics (`accepted_updates`, `total_weight`).
    pub mean: Aggregate,
}

impl PseudoGradient {
    /// A round on `global`, which a server optimizer cannot do without.
    pub fn begin(global: Option<Model>, strategy: &str) -> Result<Self, PluginError> {
        let global = global.ok_or_else(|| {
            PluginError::bad_state(format!("{strategy} steps from the global model, and the round has none"))
        })?;
        // A copy-on-write duplicate: the mean may let the host free its own handle.
        let kept = global.duplicate()?;
        Ok(PseudoGradient { global: Some(kept), mean: WeightedMean::begin(Some(global)) })
    }

    /// Folds an update into the mean (FedAvg's checks and weights).
    pub fn add(&mut self, update: &Update) -> Result<(), PluginError> {
        self.mean.add(update)
    }

    /// The layout of the round's model.
    pub fn layout(&self) -> Option<Layout> {
        self.global.as_ref().map(Model::layout)
    }

    /// The mean, the pseudo-gradient and the weights to step from.
    pub fn finish(&mut self) -> Result<Step, PluginError> {
        let weights = self.global.take().ok_or_else(|| PluginError::bad_state("begin-round was not called"))?;
        let mean = self.mean.finish()?;
        let delta = mean.model.duplicate()?;
        delta.sub(&weights)?;
        Ok(Step { weights, delta, mean })
    }
}

/// A moment buffer from the strategy state under `key`, or zeros the first time.
pub fn moment(key: &str, layout: &Layout) -> Result<Model, PluginError> {
    match crate::state::model(key, layout)? {
        Some(m) => Ok(m),
        None => layout.zeros(),
    }
}
