//! FedTrimmedAvg: the coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed
//! Learning: Towards Optimal Statistical Rates", ICML 2018), as Flower's `FedTrimmedAvg`: for
//! every element, the round's values sorted, k = floor(beta * n) cut from each end, and the rest
//! averaged (scipy's `trim_mean`). Example counts do not weigh in.
//!
//! The updates stay in the host's round store (`round-updates`); the plugin holds none of them.
use nereid_sdk::prelude::*;
use nereid_sdk::round::{self, Roster};

#[derive(Default)]
struct FedTrimmedAvg {
    beta: f64,
    roster: Roster,
}

impl Plugin for FedTrimmedAvg {
    fn info() -> Info {
        Info::new("fedtrimmedavg", env!("CARGO_PKG_VERSION"), "Coordinate-wise trimmed mean of client weights").float(
            "beta",
            Some(0.2),
            "Fraction cut from each end, in [0, 0.5)",
        )
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.beta = config.f64("beta")?;
        if !(0.0..0.5).contains(&self.beta) {
            return Err(PluginError::invalid_config("beta", format!("must be in [0, 0.5), got {}", self.beta)));
        }
        Ok(())
    }
}

impl Aggregator for FedTrimmedAvg {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.roster = Roster::begin(global.as_ref());
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.roster.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        self.roster.require_any()?;
        let n = self.roster.len();
        let cut = (self.beta * n as f64).floor() as usize;
        let mean = round::rank_mean(&round::all(), cut as u32, (n - cut) as u32)?;
        Ok(Aggregate::new(mean).with_metric("accepted_updates", n as f64).with_metric("trimmed_per_end", cut as f64))
    }
}

nereid_sdk::export_aggregator!(FedTrimmedAvg);
