//! FedMedian: the coordinate-wise median of the clients' weights (Yin et al., "Byzantine-Robust
//! Distributed Learning: Towards Optimal Statistical Rates", ICML 2018), as Flower's
//! `FedMedian`: for every element, the median over the round's updates (for an even count, the
//! mean of the two middle values, as numpy's `median`). Example counts do not weigh in.
//!
//! The updates stay in the host's round store; the median is computed there in bounded chunks
//! (`round-updates`), so the plugin holds none of them.
use nereid_sdk::prelude::*;
use nereid_sdk::round::{self, Roster};

#[derive(Default)]
struct FedMedian {
    roster: Roster,
}

impl Plugin for FedMedian {
    fn info() -> Info {
        Info::new("fedmedian", env!("CARGO_PKG_VERSION"), "Coordinate-wise median of client weights (FedMedian)")
    }
}

impl Aggregator for FedMedian {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.roster = Roster::begin(global.as_ref());
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.roster.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        self.roster.require_any()?;
        let median = round::median(&round::all())?;
        Ok(Aggregate::new(median).with_metric("accepted_updates", self.roster.len() as f64))
    }
}

nereid_sdk::export_aggregator!(FedMedian);
