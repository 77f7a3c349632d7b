//! {{name}}: a client objective (edge, every training step): an extra term in the local loss.
//! As written it is FedProx's proximal term mu/2 ||w - w_global||^2 (`mu` from the job, or as
//! the aggregator publishes it). `nereid plugin build` builds it and runs the slot's checks.
use nereid_sdk::prelude::*;

#[derive(Default)]
struct Objective {
    mu: f64,
    global: Option<Model>,
}

impl Plugin for Objective {
    fn info() -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), "Proximal term mu/2 ||w - w_global||^2")
            .float("mu", Some(0.01), "Weight of the term (>= 0)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.mu = config.f64("mu")?;
        if !(self.mu.is_finite() && self.mu >= 0.0) {
            return Err(PluginError::invalid_config("mu", format!("must be a finite number >= 0, got {}", self.mu)));
        }
        Ok(())
    }
}

impl Objective {
    fn global(&self, name: &str) -> Result<&Tensor, PluginError> {
        let global = self.global.as_ref().ok_or_else(|| PluginError::bad_state("begin-round was not called"))?;
        global.get(name).ok_or_else(|| PluginError::rejected(format!("tensor `{name}` is not in the global model")))
    }
}

impl ClientObjective for Objective {
    fn begin_training(&mut self, _ctx: &RoundContext, global: Model, server: &Config) -> Result<(), PluginError> {
        if server.get("mu").is_some() {
            self.mu = server.f64("mu")?;
        }
        self.global = Some(global);
        Ok(())
    }

    fn penalty(&mut self, name: &str, weight: &Tensor) -> Result<f64, PluginError> {
        let diff = weight.cast(DType::F64)?;
        diff.sub(self.global(name)?)?;
        let norm = diff.l2_norm()?;
        Ok(0.5 * self.mu * norm * norm)
    }

    fn adjust_gradient(&mut self, name: &str, weight: &Tensor, gradient: &Tensor) -> Result<(), PluginError> {
        gradient.axpy(self.mu, weight)?;
        gradient.axpy(-self.mu, self.global(name)?)?;
        Ok(())
    }
}

nereid_sdk::export_client_objective!(Objective);
