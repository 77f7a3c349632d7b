//! FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), as Flower's `FedYogi`:
//! with delta = FedAvg(updates) - w,
//!
//!   m = beta_1 * m + (1 - beta_1) * delta
//!   v = v - (1 - beta_2) * delta^2 * sign(v - delta^2)
//!   w_next = w + eta * m / (sqrt(v) + tau)
//!
//! The moments m and v are kept in the host's strategy state, so they survive a restart.
use nereid_sdk::prelude::*;
use nereid_sdk::server_opt::{moment, PseudoGradient};
use nereid_sdk::state;

#[derive(Default)]
struct FedYogi {
    eta: f64,
    eta_l: f64,
    beta_1: f64,
    beta_2: f64,
    tau: f64,
    round: PseudoGradient,
}

impl Plugin for FedYogi {
    fn info() -> Info {
        Info::new("fedyogi", env!("CARGO_PKG_VERSION"), "Adaptive federated optimization with Yogi (FedYogi)")
            .float("eta", Some(0.01), "Server-side learning rate (> 0)")
            .float("eta_l", Some(0.0316), "Client-side learning rate, published to clients (> 0)")
            .float("beta_1", Some(0.9), "Momentum parameter, in [0, 1)")
            .float("beta_2", Some(0.99), "Second moment parameter, in [0, 1)")
            .float("tau", Some(1e-3), "Degree of adaptability (> 0)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        for (key, slot) in [("eta", &mut self.eta), ("eta_l", &mut self.eta_l), ("tau", &mut self.tau)] {
            *slot = config.f64(key)?;
            if !(slot.is_finite() && *slot > 0.0) {
                return Err(PluginError::invalid_config(key, format!("must be > 0, got {slot}")));
            }
        }
        for (key, slot) in [("beta_1", &mut self.beta_1), ("beta_2", &mut self.beta_2)] {
            *slot = config.f64(key)?;
            if !(0.0..1.0).contains(slot) {
                return Err(PluginError::invalid_config(key, format!("must be in [0, 1), got {slot}")));
            }
        }
        Ok(())
    }
}

impl Aggregator for FedYogi {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.round = PseudoGradient::begin(global, "FedYogi")?;
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.round.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        let layout = self.round.layout().ok_or_else(|| PluginError::bad_state("begin-round was not called"))?;
        let step = self.round.finish()?;
        let m = moment("m", &layout)?;
        m.scale(self.beta_1)?;
        m.axpy(1.0 - self.beta_1, &step.delta)?;
        let v = moment("v", &layout)?;
        let squared = step.delta.duplicate()?;
        squared.mul(&step.delta)?;
        // sign(v - delta^2) * delta^2
        let sign = v.duplicate()?;
        sign.sub(&squared)?;
        sign.sign()?;
        sign.mul(&squared)?;
        v.axpy(-(1.0 - self.beta_2), &sign)?;
        let denominator = v.duplicate()?;
        denominator.sqrt()?;
        denominator.add_scalar(self.tau)?;
        let direction = m.duplicate()?;
        direction.div(&denominator)?;
        step.weights.axpy(self.eta, &direction)?;
        state::put_model("m", &m)?;
        state::put_model("v", &v)?;
        let mut out = Aggregate::new(step.weights);
        out.metrics = step.mean.metrics;
        Ok(out)
    }

    fn client_config(&self) -> Vec<nereid_sdk::ConfigEntry> {
        vec![nereid_sdk::ConfigEntry { key: "eta_l".into(), value: ConfigValue::Float(self.eta_l) }]
    }
}

nereid_sdk::export_aggregator!(FedYogi);
