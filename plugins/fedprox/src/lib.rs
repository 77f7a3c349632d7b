//! FedProx (Li et al., 2020). One component, two slots:
//!
//! - aggregator (cloud): aggregates like FedAvg and publishes `mu` to the clients;
//! - client-objective (edge): adds the proximal term mu/2 * ||w - w_global||^2 to the local
//!   loss, i.e. mu * (w - w_global) to the gradient. (Flower's documented example drops the
//!   square; the squared norm is the one from the paper and the one whose gradient is this.)
//!
//! On the edge, `mu` comes from the aggregator (`server_config`), else from this plugin's own
//! configuration.
use nereid_sdk::prelude::*;

#[derive(Default)]
struct FedProx {
    mu: f64,
    mean: WeightedMean,
    global: Option<Model>,
}

impl Plugin for FedProx {
    fn info() -> Info {
        Info::new(
            "fedprox",
            env!("CARGO_PKG_VERSION"),
            "FedAvg aggregation with a proximal term mu/2 ||w - w_global||^2 on clients",
        )
        .float("mu", Some(0.01), "Proximal coefficient (>= 0); 0 is FedAvg")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.mu = config.f64("mu")?;
        if !(self.mu.is_finite() && self.mu >= 0.0) {
            return Err(PluginError::invalid_config("mu", format!("must be a finite number >= 0, got {}", self.mu)));
        }
        Ok(())
    }
}

impl Aggregator for FedProx {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.mean = WeightedMean::begin(global);
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.mean.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        Ok(self.mean.finish()?.with_metric("mu", self.mu))
    }

    fn client_config(&self) -> Vec<nereid_sdk::ConfigEntry> {
        vec![nereid_sdk::ConfigEntry { key: "mu".into(), value: ConfigValue::Float(self.mu) }]
    }
}

impl FedProx {
    fn global_tensor(&self, name: &str) -> Result<&Tensor, PluginError> {
        let global = self.global.as_ref().ok_or_else(|| PluginError::bad_state("begin-round was not called"))?;
        global.get(name).ok_or_else(|| PluginError::rejected(format!("tensor `{name}` is not in the global model")))
    }
}

impl ClientObjective for FedProx {
    fn begin_training(&mut self, _ctx: &RoundContext, global: Model, server: &Config) -> Result<(), PluginError> {
        if server.get("mu").is_some() {
            self.mu = server.f64("mu")?;
        }
        self.global = Some(global);
        Ok(())
    }

    /// mu/2 * ||w - w_global||^2
    fn penalty(&mut self, name: &str, weight: &Tensor) -> Result<f64, PluginError> {
        let diff = weight.cast(DType::F64)?;
        diff.sub(self.global_tensor(name)?)?;
        let norm = diff.l2_norm()?;
        Ok(0.5 * self.mu * norm * norm)
    }

    /// gradient += mu * (w - w_global)
    fn adjust_gradient(&mut self, name: &str, weight: &Tensor, gradient: &Tensor) -> Result<(), PluginError> {
        let global = self.global_tensor(name)?;
        gradient.axpy(self.mu, weight)?;
        gradient.axpy(-self.mu, global)?;
        Ok(())
    }
}

nereid_sdk::export_strategy!(FedProx);
