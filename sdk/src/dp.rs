//! Differential privacy's server side (McMahan et al., "Learning Differentially Private Recurrent
//! Language Models", ICLR 2018): each client's update delta = w_k - w is clipped to an L2 norm
//! C, the clipped deltas are averaged uniformly (every client counts once, whatever its
//! examples, so one client moves the sum by at most C), and Gaussian noise of standard deviation
//! z * C / n is added to the mean. The aggregate reports `dp_noise_multiplier` = z, from which
//! the host's accountant computes epsilon.
use crate::{DType, Layout, Model, PluginError, Tensor, Update, UpdateKind};

/// The metric in which a private aggregator reports its noise multiplier to the accountant.
pub const NOISE_METRIC: &str = "dp_noise_multiplier";

/// A round's sum of clipped deltas.
#[derive(Default)]
pub struct ClippedMean {
    global: Option<Model>,
    layout: Option<Layout>,
    sum: Option<Model>,
    count: u64,
    within: u64,
}

impl ClippedMean {
    /// A round on `global`, which clipping deltas needs.
    pub fn begin(global: Option<Model>) -> Result<Self, PluginError> {
        let global = global.ok_or_else(|| {
            PluginError::bad_state("clipping client deltas needs the global model; the round has none")
        })?;
        Ok(ClippedMean { layout: Some(global.layout()), global: Some(global), ..Default::default() })
    }

    /// Clips the update's delta to `clip_norm` and adds it; true if it was within the bound.
    pub fn add(&mut self, update: &Update, clip_norm: f64) -> Result<bool, PluginError> {
        let (Some(global), Some(layout)) = (&self.global, &self.layout) else {
            return Err(PluginError::bad_state("begin-round was not called"));
        };
        layout.check(&update.model)?;
        update.model.check_finite()?;
        let delta = update.model.cast(DType::F64)?;
        if update.kind == UpdateKind::Weights {
            delta.sub(global)?;
        }
        let within = delta.clip_by_norm(clip_norm)? == 1.0;
        match &self.sum {
            Some(sum) => sum.add(&delta)?,
            None => self.sum = Some(delta),
        }
        self.count += 1;
        self.within += u64::from(within);
        Ok(within)
    }

    /// Updates added so far, and how many of them were within the bound.
    pub fn counts(&self) -> (u64, u64) {
        (self.count, self.within)
    }

    /// global + mean of the clipped deltas + N(0, (z C / n)^2) per element (noise from `seed`).
    pub fn finish(&mut self, z: f64, clip_norm: f64, seed: u64) -> Result<Model, PluginError> {
        let (Some(sum), Some(global), Some(layout)) = (self.sum.take(), self.global.take(), self.layout.clone()) else {
            return Err(PluginError::bad_state("no update was accepted this round"));
        };
        let n = self.count as f64;
        sum.scale(1.0 / n)?;
        sum.add_gaussian(z * clip_norm / n, seed)?;
        sum.add(&global)?;
        sum.cast_to(&layout)
    }
}

/// A number from N(0, stddev^2) drawn by the host from the stream of `seed`.
pub fn gaussian(stddev: f64, seed: u64) -> Result<f64, PluginError> {
    let t = Tensor::zeros(DType::F64, &[])?;
    t.add_gaussian(stddev, seed)?;
    Ok(t.read(0, 1)?.first().copied().unwrap_or(0.0))
}
