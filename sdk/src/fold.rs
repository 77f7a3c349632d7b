//! The weighted-mean fold behind FedAvg and FedProx's server side.
use crate::{Aggregate, DType, Layout, Model, PluginError, Update, UpdateKind};

/// Folds updates into sum_k n_k * w_k / sum_k n_k, tensor by tensor (n_k = the update's example
/// count), accumulated in f64 whatever the model's element type, and returned in the model's own
/// element types.
///
/// Updates of kind `delta` are averaged the same way and added to the round's global model.
/// An update is refused, with the state left as it was, when it has zero examples, a NaN or
/// infinite element, a tensor missing, extra, or of another shape or dtype than the global model
/// (or, before there is one, the first accepted update), or another kind than the updates before.
#[derive(Default)]
pub struct WeightedMean {
    global: Option<Model>,
    layout: Option<Layout>,
    kind: Option<UpdateKind>,
    sum: Option<Model>,
    total_weight: f64,
    accepted: u64,
}

impl WeightedMean {
    /// A new round on `global` (None before the first round).
    pub fn begin(global: Option<Model>) -> Self {
        let layout = global.as_ref().map(Model::layout);
        WeightedMean { global, layout, ..Default::default() }
    }

    /// The round's global model, if any.
    pub fn global(&self) -> Option<&Model> {
        self.global.as_ref()
    }

    /// Folds `update` in with weight n_k.
    pub fn add(&mut self, update: &Update) -> Result<(), PluginError> {
        if update.num_examples == 0 {
            return Err(PluginError::rejected("the update reports zero examples"));
        }
        self.add_weighted(update, update.num_examples as f64)
    }

    /// Folds `update` in with an explicit weight.
    pub fn add_weighted(&mut self, update: &Update, weight: f64) -> Result<(), PluginError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(PluginError::rejected(format!("weight {weight} is not a positive number")));
        }
        if let Some(layout) = &self.layout {
            layout.check(&update.model)?;
        }
        if let Some(kind) = self.kind.filter(|k| *k != update.kind) {
            let word = |k: UpdateKind| match k {
                UpdateKind::Weights => "weights",
                UpdateKind::Delta => "delta",
            };
            return Err(PluginError::rejected(format!(
                "the update is a {} but earlier updates of this round were {}",
                word(update.kind),
                word(kind)
            )));
        }
        if update.kind == UpdateKind::Delta && self.global.is_none() {
            return Err(PluginError::rejected("a delta update needs a global model"));
        }
        update.model.check_finite()?;
        // Validated: from here on the update counts.
        if update.kind == UpdateKind::Weights {
            // Only deltas need the global model, and a round does not mix kinds: let the host
            // free it before the accumulator is allocated.
            self.global = None;
        }
        let sum = match &self.sum {
            Some(sum) => sum,
            None => self.sum.insert(update.model.zeros_like(Some(DType::F64))?),
        };
        sum.axpy(weight, &update.model)?;
        self.layout.get_or_insert_with(|| update.model.layout());
        self.kind = Some(update.kind);
        self.total_weight += weight;
        self.accepted += 1;
        Ok(())
    }

    /// Number of updates accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// The weighted mean (plus the global model for deltas), in the model's element types.
    /// Metrics: `accepted_updates`, `total_weight`.
    pub fn finish(&mut self) -> Result<Aggregate, PluginError> {
        let (Some(sum), Some(layout)) = (self.sum.take(), self.layout.clone()) else {
            return Err(PluginError::bad_state("no update was accepted this round"));
        };
        // One pass from the f64 sum into the model's own element types.
        let mean = layout.zeros()?;
        mean.axpy(1.0 / self.total_weight, &sum)?;
        drop(sum);
        if self.kind == Some(UpdateKind::Delta) {
            if let Some(global) = &self.global {
                mean.add(global)?;
            }
        }
        Ok(Aggregate::new(mean)
            .with_metric("accepted_updates", self.accepted as f64)
            .with_metric("total_weight", self.total_weight))
    }
}
