//! What the server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi; Reddi et al., "Adaptive
//! Federated Optimization", 2021) share: the round's FedAvg mean and the pseudo-gradient
//! delta = mean - global, on which each plugin takes its own optimizer step. Their moments live
//! in the host-kept strategy state ([`crate::state`]), so they survive a restart.
use crate::{Aggregate, Config, ConfigEntry, ConfigValue, Info, Layout, Model, PluginError, Update, WeightedMean};

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

/// The adaptive optimizers' options as Flower names them, checked: `eta`, `eta_l`, `tau` > 0;
/// `beta_1`, `beta_2` in [0, 1) (0 when the plugin does not declare them: FedAdagrad).
#[derive(Default, Clone, Copy)]
pub struct Hyper {
    pub eta: f64,
    pub eta_l: f64,
    pub beta_1: f64,
    pub beta_2: f64,
    pub tau: f64,
}

impl Hyper {
    /// Declares the options with these defaults; `betas`: false for FedAdagrad, which has none.
    pub fn declare(info: Info, defaults: Hyper, betas: bool) -> Info {
        let info = info.float("eta", Some(defaults.eta), "Server-side learning rate (> 0)").float(
            "eta_l",
            Some(defaults.eta_l),
            "Client-side learning rate, published to clients (> 0)",
        );
        let info = if betas {
            info.float("beta_1", Some(defaults.beta_1), "Momentum parameter, in [0, 1)").float(
                "beta_2",
                Some(defaults.beta_2),
                "Second moment parameter, in [0, 1)",
            )
        } else {
            info
        };
        info.float("tau", Some(defaults.tau), "Degree of adaptability (> 0)")
    }

    pub fn read(config: &Config) -> Result<Hyper, PluginError> {
        let positive = |key: &str| -> Result<f64, PluginError> {
            let v = config.f64(key)?;
            if !(v.is_finite() && v > 0.0) {
                return Err(PluginError::invalid_config(key, format!("must be > 0, got {v}")));
            }
            Ok(v)
        };
        let fraction = |key: &str| -> Result<f64, PluginError> {
            if config.get(key).is_none() {
                return Ok(0.0);
            }
            let v = config.f64(key)?;
            if !(0.0..1.0).contains(&v) {
                return Err(PluginError::invalid_config(key, format!("must be in [0, 1), got {v}")));
            }
            Ok(v)
        };
        Ok(Hyper {
            eta: positive("eta")?,
            eta_l: positive("eta_l")?,
            tau: positive("tau")?,
            beta_1: fraction("beta_1")?,
            beta_2: fraction("beta_2")?,
        })
    }

    /// What the aggregator publishes to clients: the client-side learning rate.
    pub fn client_config(&self) -> Vec<ConfigEntry> {
        vec![ConfigEntry { key: "eta_l".into(), value: ConfigValue::Float(self.eta_l) }]
    }
}

/// delta^2, element-wise.
pub fn square(delta: &Model) -> Result<Model, PluginError> {
    let squared = delta.duplicate()?;
    squared.mul(delta)?;
    Ok(squared)
}

/// The first moment from the strategy state: m = beta_1 * m + (1 - beta_1) * delta.
pub fn first_moment(layout: &Layout, delta: &Model, beta_1: f64) -> Result<Model, PluginError> {
    let m = moment("m", layout)?;
    m.scale(beta_1)?;
    m.axpy(1.0 - beta_1, delta)?;
    Ok(m)
}

/// weights += eta * m / (sqrt(v) + tau), element-wise.
pub fn adaptive_step(weights: &Model, m: &Model, v: &Model, eta: f64, tau: f64) -> Result<(), PluginError> {
    let denominator = v.duplicate()?;
    denominator.sqrt()?;
    denominator.add_scalar(tau)?;
    let direction = m.duplicate()?;
    direction.div(&denominator)?;
    weights.axpy(eta, &direction)
}
