//! FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), as Flower's `FedAdam`:
//! with delta = FedAvg(updates) - w and t the round number,
//!
//!   m = beta_1 * m + (1 - beta_1) * delta
//!   v = beta_2 * v + (1 - beta_2) * delta^2
//!   eta_t = eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))    (Flower's bias correction)
//!   w_next = w + eta_t * m / (sqrt(v) + tau)
//!
//! The moments m and v are kept in the host's strategy state, so a cloud killed mid-job goes on
//! with the same moments and ends with a bit-identical model.
use nereid_sdk::prelude::*;
use nereid_sdk::server_opt::{adaptive_step, first_moment, moment, square, Hyper, PseudoGradient};
use nereid_sdk::state;

#[derive(Default)]
struct FedAdam {
    hyper: Hyper,
    round_number: u32,
    round: PseudoGradient,
}

impl Plugin for FedAdam {
    fn info() -> Info {
        let defaults = Hyper { eta: 0.1, eta_l: 0.1, beta_1: 0.9, beta_2: 0.99, tau: 1e-9 };
        Hyper::declare(
            Info::new("fedadam", env!("CARGO_PKG_VERSION"), "Adaptive federated optimization with Adam (FedAdam)"),
            defaults,
            true,
        )
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.hyper = Hyper::read(config)?;
        Ok(())
    }
}

impl Aggregator for FedAdam {
    fn begin_round(&mut self, ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.round = PseudoGradient::begin(global, "FedAdam")?;
        self.round_number = ctx.round;
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
        v.scale(beta_2)?;
        v.axpy(1.0 - beta_2, &square(&step.delta)?)?;
        let t = f64::from(self.round_number) + 1.0;
        let eta_t = eta * (1.0 - beta_2.powf(t)).sqrt() / (1.0 - beta_1.powf(t));
        adaptive_step(&step.weights, &m, &v, eta_t, tau)?;
        state::put_model("m", &m)?;
        state::put_model("v", &v)?;
        let mut out = Aggregate::new(step.weights).with_metric("eta_t", eta_t);
        out.metrics.extend(step.mean.metrics);
        Ok(out)
    }

    fn client_config(&self) -> Vec<nereid_sdk::ConfigEntry> {
        self.hyper.client_config()
    }
}

nereid_sdk::export_aggregator!(FedAdam);
