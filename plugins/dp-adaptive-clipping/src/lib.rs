//! Central differential privacy with adaptive clipping (Andrew et al., "Differentially Private
//! Learning with Adaptive Clipping", NeurIPS 2021), Flower's
//! `DifferentialPrivacyServerSideAdaptiveClipping`. Each round, with the clipping norm C:
//!
//!   w_next = w + (1/n) sum_k clip(delta_k, C) + N(0, (z_delta C / n)^2)
//!   b = (#{k : ||delta_k|| <= C} + N(0, sigma_b^2)) / n
//!   C_next = C * exp(-clip_norm_lr * (b - target_clipped_quantile))
//!
//! where z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that the two Gaussian mechanisms together
//! spend what one with the configured noise multiplier z does (the value the accountant is
//! given); sigma_b defaults to n / 20. The noise uses the C the updates were clipped with.
//! C is kept in the host's strategy state: it survives a cloud restart.
use nereid_sdk::dp::{gaussian, ClippedMean, NOISE_METRIC};
use nereid_sdk::prelude::*;
use nereid_sdk::state;

#[derive(Default)]
struct AdaptiveClipping {
    z: f64,
    initial: f64,
    quantile: f64,
    lr: f64,
    count_stddev: f64,
    seed: u64,
    clip: f64,
    mean: ClippedMean,
}

const CLIP_KEY: &str = "clipping_norm";

impl Plugin for AdaptiveClipping {
    fn info() -> Info {
        Info::new(
            "dp-adaptive-clipping",
            env!("CARGO_PKG_VERSION"),
            "Central DP with a clipping norm that tracks a quantile",
        )
        .float("noise_multiplier", None, "Noise standard deviation over the clipping norm, z > 0")
        .float("initial_clipping_norm", Some(0.1), "The clipping norm of the first round (> 0)")
        .float("target_clipped_quantile", Some(0.5), "Fraction of updates to leave unclipped, in [0, 1]")
        .float("clip_norm_lr", Some(0.2), "Learning rate of the clipping norm (> 0)")
        .float("clipped_count_stddev", Some(0.0), "Noise on the unclipped count; 0: the round's updates / 20")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        let positive = |key: &str| -> Result<f64, PluginError> {
            let v = config.f64(key)?;
            if !(v.is_finite() && v > 0.0) {
                return Err(PluginError::invalid_config(key, format!("must be > 0, got {v}")));
            }
            Ok(v)
        };
        self.z = positive("noise_multiplier")?;
        self.initial = positive("initial_clipping_norm")?;
        self.lr = positive("clip_norm_lr")?;
        self.quantile = config.f64("target_clipped_quantile")?;
        if !(0.0..=1.0).contains(&self.quantile) {
            return Err(PluginError::invalid_config(
                "target_clipped_quantile",
                format!("must be in [0, 1], got {}", self.quantile),
            ));
        }
        self.count_stddev = config.f64("clipped_count_stddev")?;
        if !(self.count_stddev.is_finite() && self.count_stddev >= 0.0) {
            return Err(PluginError::invalid_config(
                "clipped_count_stddev",
                format!("must be >= 0, got {}", self.count_stddev),
            ));
        }
        Ok(())
    }
}

impl Aggregator for AdaptiveClipping {
    fn begin_round(&mut self, ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.mean = ClippedMean::begin(global)?;
        self.seed = ctx.seed;
        self.clip = state::scalar(CLIP_KEY).unwrap_or(self.initial);
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.mean.add(&update, self.clip).map(drop)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        let (n, within) = self.mean.counts();
        let sigma_b = if self.count_stddev > 0.0 { self.count_stddev } else { n as f64 / 20.0 };
        if 2.0 * sigma_b <= self.z {
            return Err(PluginError::bad_state(format!(
                "clipped_count_stddev {sigma_b} is too small for noise_multiplier {}: it must be more than z / 2",
                self.z
            )));
        }
        let z_delta = (self.z.powi(-2) - (2.0 * sigma_b).powi(-2)).powf(-0.5);
        let model = self.mean.finish(z_delta, self.clip, self.seed)?;
        let noisy_within = (within as f64 + gaussian(sigma_b, self.seed ^ 0x9e37_79b9_7f4a_7c15)?) / n as f64;
        let next = self.clip * (-self.lr * (noisy_within - self.quantile)).exp();
        state::put_scalar(CLIP_KEY, next)?;
        Ok(Aggregate::new(model)
            .with_metric(NOISE_METRIC, self.z)
            .with_metric("dp_update_noise_multiplier", z_delta)
            .with_metric("dp_clipping_norm", self.clip)
            .with_metric("dp_next_clipping_norm", next)
            .with_metric("dp_clipped_updates", (n - within) as f64)
            .with_metric("accepted_updates", n as f64))
    }
}

nereid_sdk::export_aggregator!(AdaptiveClipping);
