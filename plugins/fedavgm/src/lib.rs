//! FedAvgM: FedAvg with server momentum (Hsu et al., "Measuring the Effects of Non-Identical
//! Data Distribution for Federated Visual Classification", 2019), as Flower's `FedAvgM`:
//!
//!   avg = sum_k n_k w_k / sum_k n_k,  g = w - avg            (the pseudo-gradient)
//!   v = server_momentum * v + g       (v = g in the first round with momentum)
//!   w_next = w - server_learning_rate * v
//!
//! With server_learning_rate = 1 and server_momentum = 0 it is FedAvg. The momentum buffer `v`
//! is kept in the host's strategy state, so it survives a cloud restart.
use nereid_sdk::prelude::*;
use nereid_sdk::server_opt::PseudoGradient;
use nereid_sdk::state;

#[derive(Default)]
struct FedAvgM {
    lr: f64,
    momentum: f64,
    round: PseudoGradient,
}

impl Plugin for FedAvgM {
    fn info() -> Info {
        Info::new("fedavgm", env!("CARGO_PKG_VERSION"), "FedAvg with server-side momentum (FedAvgM)")
            .float("server_learning_rate", Some(1.0), "Server-side learning rate (> 0)")
            .float("server_momentum", Some(0.0), "Server-side momentum factor, in [0, 1)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.lr = config.f64("server_learning_rate")?;
        self.momentum = config.f64("server_momentum")?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(PluginError::invalid_config("server_learning_rate", format!("must be > 0, got {}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(PluginError::invalid_config(
                "server_momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        Ok(())
    }
}

impl Aggregator for FedAvgM {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.round = PseudoGradient::begin(global, "FedAvgM")?;
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.round.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        let layout = self.round.layout();
        let step = self.round.finish()?;
        if self.lr == 1.0 && self.momentum == 0.0 {
            return Ok(step.mean);
        }
        // g = w - avg = -delta.
        let g = step.delta;
        g.scale(-1.0)?;
        let v = match (self.momentum > 0.0, layout) {
            (true, Some(layout)) => {
                let v = match state::model("momentum", &layout)? {
                    Some(v) => {
                        v.scale(self.momentum)?;
                        v.add(&g)?;
                        v
                    }
                    None => g,
                };
                state::put_model("momentum", &v)?;
                v
            }
            _ => g,
        };
        step.weights.axpy(-self.lr, &v)?;
        let mut out = Aggregate::new(step.weights);
        out.metrics = step.mean.metrics;
        Ok(out)
    }
}

nereid_sdk::export_aggregator!(FedAvgM);
