//! FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), as Flower's
//! `FedAdagrad`: with delta = FedAvg(updates) - w,
//!
//!   m = beta_1 * m + (1 - beta_1) * delta      (beta_1 = 0, as Flower's FedAdagrad: m = delta)
//!   v = v + delta^2
//!   w_next = w + eta * m / (sqrt(v) + tau)
//!
//! The second moment v is kept in the host's strategy state, so it survives a restart.
use nereid_sdk::prelude::*;
use nereid_sdk::server_opt::{adaptive_step, moment, square, Hyper, PseudoGradient};
use nereid_sdk::state;

#[derive(Default)]
struct FedAdagrad {
    hyper: Hyper,
    round: PseudoGradient,
}

impl Plugin for FedAdagrad {
    fn info() -> Info {
        let defaults = Hyper { eta: 0.1, eta_l: 0.1, tau: 1e-9, beta_1: 0.0, beta_2: 0.0 };
        Hyper::declare(
            Info::new(
                "fedadagrad",
                env!("CARGO_PKG_VERSION"),
                "Adaptive federated optimization with Adagrad (FedAdagrad)",
            ),
            defaults,
            false,
        )
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.hyper = Hyper::read(config)?;
        Ok(())
    }
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
        let v = moment("v", &layout)?;
        v.add(&square(&step.delta)?)?;
        // m = delta (Flower's FedAdagrad keeps beta_1 = 0).
        adaptive_step(&step.weights, &step.delta, &v, self.hyper.eta, self.hyper.tau)?;
        state::put_model("v", &v)?;
        let mut out = Aggregate::new(step.weights);
        out.metrics = step.mean.metrics;
        Ok(out)
    }

    fn client_config(&self) -> Vec<nereid_sdk::ConfigEntry> {
        self.hyper.client_config()
    }
}

nereid_sdk::export_aggregator!(FedAdagrad);
