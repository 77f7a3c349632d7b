//! FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), as Flower's `FedYogi`:
//! with delta = FedAvg(updates) - w,
//!
//!   m = beta_1 * m + (1 - beta_1) * delta
//!   v = v - (1 - beta_2) * delta^2 * sign(v - delta^2)
//!   w_next = w + eta * m / (sqrt(v) + tau)
//!
//! The moments m and v are kept in the host's strategy state, so they survive a restart.
use nereid_sdk::prelude::*;
use nereid_sdk::server_opt::{adaptive_step, first_moment, moment, square, Hyper, PseudoGradient};
use nereid_sdk::state;

#[derive(Default)]
struct FedYogi {
    hyper: Hyper,
    round: PseudoGradient,
}

impl Plugin for FedYogi {
    fn info() -> Info {
        let defaults = Hyper { eta: 0.01, eta_l: 0.0316, beta_1: 0.9, beta_2: 0.99, tau: 1e-3 };
        Hyper::declare(
            Info::new("fedyogi", env!("CARGO_PKG_VERSION"), "Adaptive federated optimization with Yogi (FedYogi)"),
            defaults,
            true,
        )
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.hyper = Hyper::read(config)?;
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
        let Hyper { eta, beta_1, beta_2, tau, .. } = self.hyper;
        let layout = self.round.layout().ok_or_else(|| PluginError::bad_state("begin-round was not called"))?;
        let step = self.round.finish()?;
        let m = first_moment(&layout, &step.delta, beta_1)?;
        let v = moment("v", &layout)?;
        let squared = square(&step.delta)?;
        // v -= (1 - beta_2) * delta^2 * sign(v - delta^2)
        let sign = v.duplicate()?;
        sign.sub(&squared)?;
        sign.sign()?;
        sign.mul(&squared)?;
        v.axpy(-(1.0 - beta_2), &sign)?;
        adaptive_step(&step.weights, &m, &v, eta, tau)?;
        state::put_model("m", &m)?;
        state::put_model("v", &v)?;
        let mut out = Aggregate::new(step.weights);
        out.metrics = step.mean.metrics;
        Ok(out)
    }

    fn client_config(&self) -> Vec<nereid_sdk::ConfigEntry> {
        self.hyper.client_config()
    }
}

nereid_sdk::export_aggregator!(FedYogi);
