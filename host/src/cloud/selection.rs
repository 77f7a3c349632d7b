//! Which of the online nodes a round selects: the job's `[client_selection]` sampler plugin, or
//! the built-in seeded uniform draw. The plugin sees each online node as a sample (`id`: its
//! position in name order, `label`: its newest training loss in millionths, -1 if it has
//! reported none) and draws the round's ids; a plugin that fails, or answers with ids that are
//! not `count` distinct online nodes, is logged and the round falls back to the uniform draw.
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::Cloud;
use crate::config::job::JobSpec;
use crate::runtime::{RoundContext, SampleRef};

/// How many rounds back a node's training loss is looked for.
const LOSS_LOOKBACK: u32 = 20;

/// The built-in selection: `count` of `online` by a shuffle seeded from the job and round.
fn uniform(spec: &JobSpec, round: u32, online: &[String], count: usize) -> Vec<String> {
    let mut chosen = online.to_vec();
    chosen.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed ^ (round as u64).rotate_left(32)));
    chosen.truncate(count);
    chosen
}

/// `count` of `online` (sorted by name) for round `round`, sorted by name.
pub(super) fn select(cloud: &Cloud, spec: &JobSpec, round: u32, online: &[String], count: usize) -> Vec<String> {
    let mut chosen = match by_plugin(cloud, spec, round, online, count) {
        Ok(Some(chosen)) => chosen,
        Ok(None) => uniform(spec, round, online, count),
        Err(e) => {
            tracing::warn!(job = %spec.name, round, "client selection plugin failed, selecting uniformly: {e:#}");
            uniform(spec, round, online, count)
        }
    };
    chosen.sort();
    chosen
}

fn by_plugin(
    cloud: &Cloud,
    spec: &JobSpec,
    round: u32,
    online: &[String],
    count: usize,
) -> anyhow::Result<Option<Vec<String>>> {
    let Some(selector) = cloud.plugins.selector(&cloud.store, spec)? else { return Ok(None) };
    let losses = cloud.store.last_losses(&spec.name, round.saturating_sub(LOSS_LOOKBACK))?;
    let held: Vec<SampleRef> = online
        .iter()
        .enumerate()
        .map(|(i, node)| SampleRef {
            id: i as u64,
            label: losses.get(node).map_or(-1, |l| (l * 1e6).round().clamp(0.0, i64::MAX as f64) as i64),
        })
        .collect();
    let ctx = RoundContext { job: spec.name.clone(), round, seed: spec.seed.wrapping_add(round as u64) };
    let mut plugin = crate::lock(&selector);
    plugin.restore(&held, held.len() as u64)?;
    let ids = plugin.draw(&ctx, count as u32)?;
    let mut seen = std::collections::BTreeSet::new();
    for id in &ids {
        if *id as usize >= online.len() || !seen.insert(*id) {
            anyhow::bail!("it drew id {id}, which is not one of the {} online nodes or was drawn twice", online.len());
        }
    }
    if ids.len() != count {
        anyhow::bail!("it drew {} nodes where the round selects {count}", ids.len());
    }
    Ok(Some(ids.into_iter().map(|id| online[id as usize].clone()).collect()))
}
