//! Central differential privacy with a fixed clipping norm (McMahan et al., "Learning
//! Differentially Private Recurrent Language Models", ICLR 2018), Flower's
//! `DifferentialPrivacyServerSideFixedClipping`: with delta_k = w_k - w,
//!
//!   w_next = w + (1/n) sum_k clip(delta_k, C) + N(0, (z C / n)^2)
//!
//! clip(d, C) = d * min(1, C / ||d||_2) over the whole update; every client counts once. Put it
//! first in an aggregator chain (`[[aggregator.then]]` for a server optimizer after it). The
//! host's accountant reads `dp_noise_multiplier` and reports epsilon after every round.
use nereid_sdk::dp::{ClippedMean, NOISE_METRIC};
use nereid_sdk::prelude::*;

#[derive(Default)]
struct FixedClipping {
    z: f64,
    clip: f64,
    seed: u64,
    mean: ClippedMean,
}

impl Plugin for FixedClipping {
    fn info() -> Info {
        Info::new(
            "dp-fixed-clipping",
            env!("CARGO_PKG_VERSION"),
            "Central DP: clipped uniform mean plus Gaussian noise",
        )
        .float("noise_multiplier", None, "Noise standard deviation over the clipping norm, z >= 0")
        .float("clipping_norm", None, "L2 bound C of each client's update (> 0)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.z = config.f64("noise_multiplier")?;
        self.clip = config.f64("clipping_norm")?;
        if !(self.z.is_finite() && self.z >= 0.0) {
            return Err(PluginError::invalid_config("noise_multiplier", format!("must be >= 0, got {}", self.z)));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(PluginError::invalid_config("clipping_norm", format!("must be > 0, got {}", self.clip)));
        }
        Ok(())
    }
}

impl Aggregator for FixedClipping {
    fn begin_round(&mut self, ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.mean = ClippedMean::begin(global)?;
        self.seed = ctx.seed;
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.mean.add(&update, self.clip).map(drop)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        let (n, within) = self.mean.counts();
        let model = self.mean.finish(self.z, self.clip, self.seed)?;
        Ok(Aggregate::new(model)
            .with_metric(NOISE_METRIC, self.z)
            .with_metric("dp_clipping_norm", self.clip)
            .with_metric("dp_clipped_updates", (n - within) as f64)
            .with_metric("accepted_updates", n as f64))
    }
}

nereid_sdk::export_aggregator!(FixedClipping);
