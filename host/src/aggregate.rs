//! One aggregation round over a set of updates, as the cloud and `nereid plugin aggregate` run
//! it. A refused update is reported and left out. If the plugin's instance is lost on an update
//! (trap, timeout, out of memory), that update is left out and the round is rebuilt on a fresh
//! instance by replaying `begin-round` and the updates accepted so far, so one bad update or one
//! plugin bug does not lose the others.
use serde::{Deserialize, Serialize};

use crate::model_io::NamedTensors;
use crate::runtime::{AggregateResult, AggregatorPlugin, ClientUpdate, PluginError, RoundContext};

/// How many lost instances one round tolerates before it gives up.
pub const MAX_RESTARTS: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub update: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct RoundReport {
    pub result: AggregateResult,
    pub accepted: Vec<String>,
    pub rejected: Vec<Rejection>,
    /// Instances lost (and replaced) during the round.
    pub restarts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("update `{update}` was accepted earlier but cannot be read again for the replay: {reason}")]
    Replay { update: String, reason: String },
    #[error("no update was accepted this round{}", list_rejections(.0))]
    NothingAccepted(Vec<Rejection>),
}

fn list_rejections(rejected: &[Rejection]) -> String {
    rejected.iter().map(|r| format!("\n  {}: {}", r.update, r.reason)).collect()
}

/// Runs a round over `count` updates; `load(i)` reads update i (again, on a replay). An update
/// that cannot be read is rejected with the reason `load` gives.
pub fn run_round(
    plugin: &mut AggregatorPlugin,
    ctx: &RoundContext,
    global: Option<&NamedTensors>,
    count: usize,
    load: impl Fn(usize) -> Result<ClientUpdate, Rejection>,
) -> Result<RoundReport, RoundError> {
    plugin.begin_round(ctx, global.map(|g| g.as_slice()))?;
    let mut accepted: Vec<(usize, String)> = Vec::new();
    let mut rejected = Vec::new();
    let mut restarts = 0;
    for i in 0..count {
        let update = match load(i) {
            Ok(u) => u,
            Err(r) => {
                rejected.push(r);
                continue;
            }
        };
        match plugin.accumulate(&update) {
            Ok(()) => accepted.push((i, update.client)),
            Err(e @ PluginError::Rejected { .. }) => {
                rejected.push(Rejection { update: update.client, reason: e.to_string() })
            }
            Err(e) if e.instance_lost() => {
                tracing::warn!(update = %update.client, "leaving the update out and replaying the round: {e}");
                rejected.push(Rejection { update: update.client, reason: e.to_string() });
                restarts += 1;
                if restarts > MAX_RESTARTS {
                    return Err(e.into());
                }
                plugin.begin_round(ctx, global.map(|g| g.as_slice()))?;
                for (j, name) in &accepted {
                    let again = load(*j).map_err(|r| RoundError::Replay { update: name.clone(), reason: r.reason })?;
                    plugin.accumulate(&again)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    if accepted.is_empty() {
        return Err(RoundError::NothingAccepted(rejected));
    }
    let result = plugin.finish()?;
    Ok(RoundReport { result, accepted: accepted.into_iter().map(|(_, n)| n).collect(), rejected, restarts })
}
