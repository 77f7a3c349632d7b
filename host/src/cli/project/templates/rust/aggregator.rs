//! {{name}}: an aggregator (cloud, once per round). As written it is FedAvg: for every tensor,
//! w_next = sum_k n_k * w_k / sum_k n_k, summed in f64 by the host. Change `accumulate` and
//! `finish` to aggregate your way; `nereid plugin build` builds it and runs the slot's checks.
use nereid_sdk::prelude::*;

#[derive(Default)]
struct Strategy {
    mean: WeightedMean,
}

impl Plugin for Strategy {
    fn info() -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), "Weighted average of client models by example count")
    }
}

impl Aggregator for Strategy {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.mean = WeightedMean::begin(global);
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.mean.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        self.mean.finish()
    }
}

nereid_sdk::export_aggregator!(Strategy);
