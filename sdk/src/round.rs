//! The round's accepted updates, for aggregators that need all of them at once (medians,
//! Krum, Bulyan). The host keeps the updates on disk and computes over them in bounded chunks,
//! so the plugin holds none of them: `accumulate` validates and remembers who sent what, and
//! `finish` asks for distances and order statistics by index (the i-th accepted update).
use crate::bindings::nereid::plugin::round_updates;
use crate::{Model, PluginError};

fn failed(what: &str) -> impl Fn(String) -> PluginError + '_ {
    move |m| PluginError::Internal(format!("{what}: {m}"))
}

/// How many updates the round accepted so far.
pub fn count() -> u32 {
    round_updates::count()
}

/// All indices 0..count().
pub fn all() -> Vec<u32> {
    (0..count()).collect()
}

/// Squared L2 distances between the given updates over the whole model, as rows.
pub fn pairwise_distances(updates: &[u32]) -> Result<Vec<Vec<f64>>, PluginError> {
    let n = updates.len();
    let flat = round_updates::pairwise_distances(updates).map_err(failed("pairwise distances"))?;
    Ok(flat.chunks(n.max(1)).map(<[f64]>::to_vec).collect())
}

/// Per element, the mean of the sorted values of rank `lo..hi` among `updates`.
pub fn rank_mean(updates: &[u32], lo: u32, hi: u32) -> Result<Model, PluginError> {
    round_updates::rank_mean(updates, lo, hi).map(Model::new).map_err(failed("rank mean"))
}

/// The coordinate-wise median (the mean of the two middle values for an even count, as numpy).
pub fn median(updates: &[u32]) -> Result<Model, PluginError> {
    let n = updates.len() as u32;
    rank_mean(updates, n.saturating_sub(1) / 2, n / 2 + 1)
}

/// Per element, the mean of the `count` values nearest the element's median.
pub fn median_nearest_mean(updates: &[u32], count: u32) -> Result<Model, PluginError> {
    round_updates::median_nearest_mean(updates, count).map(Model::new).map_err(failed("mean around the median"))
}

/// sum_i weights_i * update_i / sum_i weights_i.
pub fn weighted_mean(updates: &[u32], weights: &[f64]) -> Result<Model, PluginError> {
    round_updates::weighted_mean(updates, weights).map(Model::new).map_err(failed("weighted mean"))
}

/// Who sent the round's accepted updates and with how many examples, in acceptance order (the
/// indices `round-updates` uses), with the checks every whole-round aggregator makes: the
/// layout of the global model (or of the first update), finite values, weights not deltas.
#[derive(Default)]
pub struct Roster {
    layout: Option<crate::Layout>,
    pub clients: Vec<String>,
    pub examples: Vec<u64>,
}

impl Roster {
    pub fn begin(global: Option<&Model>) -> Self {
        Roster { layout: global.map(Model::layout), ..Default::default() }
    }

    /// Checks `update` and, if it passes, records it as the next index.
    pub fn add(&mut self, update: &crate::Update) -> Result<(), PluginError> {
        if update.kind != crate::UpdateKind::Weights {
            return Err(PluginError::rejected("this aggregator takes client weights, not deltas"));
        }
        if let Some(layout) = &self.layout {
            layout.check(&update.model)?;
        }
        update.model.check_finite()?;
        self.layout.get_or_insert_with(|| update.model.layout());
        self.clients.push(update.client.clone());
        self.examples.push(update.num_examples);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Fails when the round accepted nothing.
    pub fn require_any(&self) -> Result<(), PluginError> {
        if self.is_empty() {
            return Err(PluginError::bad_state("no update was accepted this round"));
        }
        Ok(())
    }
}

/// Krum scores (Blanchard et al., 2017) of the updates `members` index into the distance
/// matrix `d`: for each, the sum of its squared distances to its n - f - 2 nearest others (at
/// least 1), as Flower's `aggregate_krum`.
pub fn krum_scores(d: &[Vec<f64>], members: &[usize], f: usize) -> Vec<f64> {
    let n = members.len();
    let nearest = n.saturating_sub(f + 2).max(1).min(n.saturating_sub(1));
    members
        .iter()
        .map(|&i| {
            let mut row: Vec<f64> = members.iter().filter(|&&j| j != i).map(|&j| d[i][j]).collect();
            row.sort_by(f64::total_cmp);
            row[..nearest].iter().sum()
        })
        .collect()
}

/// Positions of `scores` from lowest to highest (ties: earlier first).
pub fn ranked(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order
}
