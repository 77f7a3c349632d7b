//! FedAvg (McMahan et al., 2017), as Flower's `aggregate`: for every tensor,
//! w_next = sum_k n_k * w_k / sum_k n_k, where n_k is client k's number of training examples.
//! Accumulated in f64, returned in the model's element types. Updates may be weights or deltas
//! (then w_next = w_global + the weighted mean of the deltas).
//!
//! Refused, naming the update, while the others still count: zero examples, a NaN or infinite
//! element, a missing or extra tensor, another shape or dtype, or weights and deltas mixed.
use nereid_sdk::prelude::*;

#[derive(Default)]
struct FedAvg {
    mean: WeightedMean,
}

impl Plugin for FedAvg {
    fn info() -> Info {
        Info::new("fedavg", env!("CARGO_PKG_VERSION"), "Weighted average of client models by example count (FedAvg)")
    }
}

impl Aggregator for FedAvg {
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

nereid_sdk::export_aggregator!(FedAvg);
