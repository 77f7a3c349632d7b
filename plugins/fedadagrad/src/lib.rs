//! FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), as Flower's
//! `FedAdagrad`: with delta = FedAvg(updates) - w,
//!
//!   m = beta_1 * m + (1 - beta_1) * delta      (beta_1 = 0, as Flower's FedAdagrad: m = delta)
//!   v = v + delta^2
//!   w_next = w + eta * m / (sqrt(v) + tau)
//!
//! The moments m and v are kept in the host's strategy state, so they survive a restart.
use nereid_sdk::prelude::*;
use nereid_sdk::server_opt::{moment, PseudoGradient};
use nereid_sdk::state;

#[derive(Default)]
struct FedAdagrad {
    eta: f64,
    eta_l: f64,
    tau: f64,
    round: PseudoGradient,
}

impl Plugin for FedAdagrad {
    fn info() -> Info {
        Info::new("fedadagrad", env!("CARGO_PKG_VERSION"), "Adaptive federated optimization with Adagrad (FedAdagrad)")
            .float("eta", Some(0.1), "Server-side learning rate (> 0)")
            .float("eta_l", Some(0.1), "Client-side learning rate, published to clients (> 0)")
            .float("tau", Some(1e-9), "Degree of adaptability (> 0)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.eta = positive(config, "eta")?;
        self.eta_l = positive(config, "eta_l")?;
        self.tau = positive(config, "tau")?;
        Ok(())
    }
}

fn positive(config: &Config, key: &str) -> Result<f64, PluginError> {
    let v = config.f64(key)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(PluginError::invalid_config(key, format!("must be > 0, got {v}")));
    }
    Ok(v)
}

impl Aggregator for FedAdagrad {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.round = PseudoGradient::begin(global, "FedAdagrad")?;
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.round.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        let layout = self.round.layout().ok_or_else(|| PluginError::bad_state("begin-round was not called"))?;
        let step = self.round.finish()?;
        let m = step.delta.duplicate()?;
        let v = moment("v", &layout)?;
        let squared = step.delta.duplicate()?;
        squared.mul(&step.delta)?;
        v.add(&squared)?;
        let denominator = v.duplicate()?;
        denominator.sqrt()?;
        denominator.add_scalar(self.tau)?;
        m.div(&denominator)?;
        step.weights.axpy(self.eta, &m)?;
        state::put_model("v", &v)?;
        let mut out = Aggregate::new(step.weights);
        out.metrics = step.mean.metrics;
        Ok(out)
    }

    fn client_config(&self) -> Vec<nereid_sdk::ConfigEntry> {
        vec![nereid_sdk::ConfigEntry { key: "eta_l".into(), value: ConfigValue::Float(self.eta_l) }]
    }
}

nereid_sdk::export_aggregator!(FedAdagrad);
