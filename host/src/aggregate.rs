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

/// A round being folded incrementally: updates are fed in the order of their indices (the
/// caller's canonical order), possibly with gaps, as they become available.
pub struct RoundFold {
    ctx: RoundContext,
    accepted: Vec<(usize, String)>,
    rejected: Vec<Rejection>,
    restarts: u32,
    last: Option<usize>,
}

impl RoundFold {
    /// Begins the round on `plugin`. `global` is read again only if the plugin's instance is lost.
    pub fn begin(
        plugin: &mut AggregatorPlugin,
        ctx: RoundContext,
        global: Option<&NamedTensors>,
    ) -> Result<RoundFold, RoundError> {
        plugin.begin_round(&ctx, global.map(|g| g.as_slice()))?;
        Ok(RoundFold { ctx, accepted: Vec::new(), rejected: Vec::new(), restarts: 0, last: None })
    }

    pub fn accepted(&self) -> impl Iterator<Item = &str> {
        self.accepted.iter().map(|(_, n)| n.as_str())
    }

    /// Folds update `i` (greater than every index fed before). `load(j)` reads update j, again
    /// for the replay after a lost instance; `global` gives the global model for that replay.
    pub fn feed(
        &mut self,
        plugin: &mut AggregatorPlugin,
        i: usize,
        load: &dyn Fn(usize) -> Result<ClientUpdate, Rejection>,
        global: &dyn Fn() -> Result<Option<NamedTensors>, RoundError>,
    ) -> Result<(), RoundError> {
        debug_assert!(self.last.is_none_or(|l| i > l), "updates are fed in increasing order");
        self.last = Some(i);
        let update = match load(i) {
            Ok(u) => u,
            Err(r) => {
                self.rejected.push(r);
                return Ok(());
            }
        };
        match plugin.accumulate(&update) {
            Ok(()) => self.accepted.push((i, update.client)),
            Err(e @ PluginError::Rejected { .. }) => {
                self.rejected.push(Rejection { update: update.client, reason: e.to_string() })
            }
            Err(e) if e.instance_lost() => {
                tracing::warn!(update = %update.client, "leaving the update out and replaying the round: {e}");
                self.rejected.push(Rejection { update: update.client, reason: e.to_string() });
                self.restarts += 1;
                if self.restarts > MAX_RESTARTS {
                    return Err(e.into());
                }
                let global = global()?;
                plugin.begin_round(&self.ctx, global.as_deref())?;
                drop(global);
                for (j, name) in &self.accepted {
                    let again = load(*j).map_err(|r| RoundError::Replay { update: name.clone(), reason: r.reason })?;
                    plugin.accumulate(&again)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Ends the round with the next global model.
    pub fn finish(self, plugin: &mut AggregatorPlugin) -> Result<RoundReport, RoundError> {
        if self.accepted.is_empty() {
            return Err(RoundError::NothingAccepted(self.rejected));
        }
        let result = plugin.finish()?;
        Ok(RoundReport {
            result,
            accepted: self.accepted.into_iter().map(|(_, n)| n).collect(),
            rejected: self.rejected,
            restarts: self.restarts,
        })
    }
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
    let mut fold = RoundFold::begin(plugin, ctx.clone(), global)?;
    for i in 0..count {
        fold.feed(plugin, i, &load, &|| Ok(global.cloned()))?;
    }
    fold.finish(plugin)
}
