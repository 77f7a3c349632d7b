//! The round engine: folding each round's updates in node-name order as they arrive, closing
//! it (quorum, deadline, failures), and the job loop that opens rounds, swaps plugins at round
//! boundaries and ends jobs.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::plugins::{self, JobPlugins, LiveAggregator};
use super::Cloud;
use crate::aggregate::{Rejection, RoundError, RoundFold};
use crate::config::job::JobSpec;
use crate::lock;
use crate::model_io::{self, NamedTensors};
use crate::privacy::Accountant;
use crate::protocol::*;
use crate::runtime::{ClientUpdate, RoundContext, UpdateKind};
use crate::store::{now_ms, CloudStore};

/// A round's fold in progress. Updates are fed in node-name order (the round's selection,
/// sorted): each one as soon as it and every selected node before it have arrived, like a
/// reorder buffer, so folding goes on while uploads arrive and the result is the same whatever
/// the arrival order. Updates waiting for an earlier node wait on disk.
struct ActiveFold {
    round: u32,
    /// The aggregator this round began with; a swap takes effect at the next round.
    aggregator: LiveAggregator,
    order: Vec<String>,
    next: usize,
    fold: RoundFold,
}

/// How a round ends.
pub(super) enum Closing {
    /// Fold what arrived into v(round).
    Aggregate,
    /// Every selected node answered but fewer than `min_clients` sent an update: v(round) is
    /// v(round - 1), and the updates that came are left out.
    TooFew,
}

/// A closed round: v(round), its summary, and the aggregator's strategy state with the
/// aggregator that left it (None when nothing was folded).
pub(super) struct ClosedRound {
    pub model: Vec<u8>,
    pub summary: RoundSummary,
    pub state: Option<(String, Vec<u8>)>,
}

/// One round of a job, with what the engine reaches through: the store and the job's plugins.
#[derive(Clone, Copy)]
pub(super) struct RoundOf<'a> {
    pub store: &'a CloudStore,
    pub plugins: &'a JobPlugins,
    pub spec: &'a JobSpec,
    pub round: u32,
    pub selected: &'a [String],
}

/// The rounds in progress: each job's fold, and the decoded global model of each job whose
/// uploads are decoded against it (a job with a compressor).
#[derive(Default)]
pub struct Rounds {
    folds: Mutex<HashMap<String, ActiveFold>>,
    globals: Mutex<HashMap<String, (u32, Arc<NamedTensors>)>>,
    spent: Mutex<HashMap<String, Spent>>,
}

fn parse_metrics(json: &str) -> UpdateMetrics {
    serde_json::from_str(json).unwrap_or_default()
}

fn load_update(store: &CloudStore, job: &str, round: u32, node: &str) -> Result<ClientUpdate, Rejection> {
    let reject = |reason: String| Rejection { update: node.to_string(), reason };
    let row =
        store.update(job, round, node).map_err(|e| reject(e.to_string()))?.ok_or_else(|| reject("gone".into()))?;
    let tensors = model_io::read(&row.file).map_err(|e| reject(e.to_string()))?;
    // A NaN or an infinity would poison the global model whatever the aggregator.
    if let Some((name, _)) = tensors.iter().find(|(_, t)| !t.all_finite()) {
        return Err(reject(format!("tensor `{name}` holds NaN or infinite values")));
    }
    Ok(ClientUpdate {
        client: node.to_string(),
        kind: UpdateKind::Weights,
        tensors,
        num_examples: row.num_examples,
        metrics: Vec::new(),
        file: Some(row.file),
    })
}

fn previous_model(store: &CloudStore, job: &str, round: u32) -> anyhow::Result<Vec<u8>> {
    store.model(job, round - 1)?.ok_or_else(|| anyhow::anyhow!("model version {} is missing", round - 1))
}

/// The aggregator metric in which a differentially private aggregator reports its noise
/// multiplier (noise standard deviation over one client's clipping norm).
pub const DP_NOISE_METRIC: &str = "dp_noise_multiplier";

/// The delta at which epsilon is reported when a job has no `[privacy]` section.
pub const DEFAULT_DELTA: f64 = 1e-5;

fn sampling_rate(selected: usize, population: usize) -> f64 {
    if population == 0 {
        1.0
    } else {
        (selected as f64 / population as f64).min(1.0)
    }
}

/// A private job's privacy spent over its closed rounds before `through`: opening and closing a
/// round then reads only the rounds closed since, not the job's whole history every round.
#[derive(Debug, Clone, Default)]
struct Spent {
    through: u32,
    accountant: Accountant,
    last_z: Option<f64>,
}

/// Summaries read at once while catching up on a job's closed rounds.
const SPENT_PAGE: u32 = 1000;

impl Rounds {
    /// The privacy accountant over the closed rounds of `spec`'s job before `round`, and the
    /// noise multiplier of the last private one.
    fn accountant_before(
        &self,
        store: &CloudStore,
        spec: &JobSpec,
        round: u32,
    ) -> anyhow::Result<(Accountant, Option<f64>)> {
        let mut cached = lock(&self.spent);
        // A job applied again under its name starts from round 1: the cache is then too far on.
        let mut spent = cached.get(&spec.name).filter(|s| s.through <= round).cloned().unwrap_or_default();
        'pages: loop {
            let (page, next) = store.summaries(&spec.name, Some(spent.through), SPENT_PAGE)?;
            for (r, summary) in page {
                if r >= round {
                    break 'pages;
                }
                if let Some(p) = serde_json::from_str::<RoundSummary>(&summary).ok().and_then(|s| s.privacy) {
                    spent.accountant.step(p.sampling_rate, p.noise_multiplier);
                    spent.last_z = Some(p.noise_multiplier);
                }
                spent.through = r + 1;
            }
            if next.is_none() {
                break;
            }
        }
        let found = (spent.accountant.clone(), spent.last_z);
        cached.insert(spec.name.clone(), spent);
        Ok(found)
    }

    /// The privacy spent once round `round` (noise multiplier `z`, sampling rate `q`) is added.
    fn account(&self, store: &CloudStore, spec: &JobSpec, round: u32, z: f64, q: f64) -> anyhow::Result<RoundPrivacy> {
        let delta = spec.privacy.as_ref().map_or(DEFAULT_DELTA, |p| p.delta);
        let (mut accountant, _) = self.accountant_before(store, spec, round)?;
        accountant.step(q, z);
        Ok(RoundPrivacy { noise_multiplier: z, sampling_rate: q, epsilon: accountant.epsilon(delta), delta })
    }

    /// Why round `round` must not open: one more round like the last private one, at sampling
    /// rate `q`, would take epsilon past the job's budget.
    fn budget_spent(&self, store: &CloudStore, spec: &JobSpec, round: u32, q: f64) -> anyhow::Result<Option<String>> {
        let Some((budget, delta)) = spec.privacy.as_ref().and_then(|p| p.epsilon_budget.map(|b| (b, p.delta))) else {
            return Ok(None);
        };
        let (mut accountant, last_z) = self.accountant_before(store, spec, round)?;
        let Some(z) = last_z else { return Ok(None) };
        let spent = accountant.epsilon(delta);
        accountant.step(q, z);
        let next = accountant.epsilon(delta);
        Ok((next > budget).then(|| {
            format!("privacy budget spent: epsilon {spent:.4} at delta {delta}; one more round would reach {next:.4}, past the budget of {budget}")
        }))
    }
}

fn round_context(spec: &JobSpec, round: u32) -> RoundContext {
    RoundContext { job: spec.name.clone(), round, seed: spec.seed.wrapping_add(round as u64) }
}

/// The prefix of stage `k`'s keys (k >= 1) in a chain's committed strategy state; the first
/// stage's keys have none.
fn stage_prefix(k: usize) -> String {
    format!("then[{}]/", k - 1)
}

/// Splits a chain's committed state into the first stage's and each later stage's.
fn split_state(state: NamedTensors, later: usize) -> (NamedTensors, Vec<NamedTensors>) {
    let mut first = Vec::new();
    let mut rest = vec![Vec::new(); later];
    'keys: for (key, t) in state {
        for (k, stage) in rest.iter_mut().enumerate() {
            if let Some(own) = key.strip_prefix(&stage_prefix(k + 1)) {
                stage.push((own.to_string(), t));
                continue 'keys;
            }
        }
        first.push((key, t));
    }
    (first, rest)
}

impl Rounds {
    /// Runs the stages after the aggregator (`aggregator.then`) on its result: each takes the
    /// model the one before produced as its only update (`examples`: the round's example
    /// count) with the round's global model. Metrics of stage k are named `then[k-1].<name>`;
    /// the states are joined under [`stage_prefix`].
    fn run_stages(
        &self,
        r: &RoundOf,
        aggregator: &LiveAggregator,
        first: crate::runtime::AggregateResult,
        examples: u64,
    ) -> anyhow::Result<crate::runtime::AggregateResult> {
        let mut stages = crate::lock(&aggregator.then);
        if stages.is_empty() {
            return Ok(first);
        }
        let RoundOf { store, spec, round, .. } = *r;
        let global = self.global(store, spec, round)?;
        let ctx = round_context(spec, round);
        let mut result = first;
        for (k, stage) in stages.iter_mut().enumerate() {
            let table = format!("aggregator.then[{k}]");
            let update = ClientUpdate {
                client: if k == 0 { "aggregator".into() } else { format!("aggregator.then[{}]", k - 1) },
                kind: UpdateKind::Weights,
                tensors: result.tensors,
                num_examples: examples.max(1),
                metrics: Vec::new(),
                file: None,
            };
            let report = crate::aggregate::run_round(stage, &ctx, Some(&global), 1, |_| Ok(update.clone()))
                .map_err(|e| anyhow::anyhow!("{table}: {e}"))?;
            if let Some(refused) = report.rejected.first() {
                anyhow::bail!("{table} refused the model of the stage before it: {}", refused.reason);
            }
            result.tensors = report.result.tensors;
            result.metrics.extend(report.result.metrics.into_iter().map(|(n, v)| (format!("then[{k}].{n}"), v)));
            result
                .state
                .extend(report.result.state.into_iter().map(|(key, t)| (format!("{}{key}", stage_prefix(k + 1)), t)));
        }
        Ok(result)
    }

    /// The global model round `round` of `spec` starts from, v(round - 1). For a job with a
    /// compressor it is decoded once per round and kept (every upload is decoded against it);
    /// otherwise it is read when needed (at the fold's start), so its memory is not held.
    pub fn global(&self, store: &CloudStore, spec: &JobSpec, round: u32) -> anyhow::Result<Arc<NamedTensors>> {
        let cached = lock(&self.globals).get(&spec.name).filter(|(r, _)| *r == round).map(|(_, g)| g.clone());
        if let Some(g) = cached {
            return Ok(g);
        }
        let bytes = previous_model(store, &spec.name, round)?;
        let global = Arc::new(model_io::decode(&bytes, Path::new("global model"))?);
        if spec.compressor.is_some() {
            lock(&self.globals).insert(spec.name.clone(), (round, global.clone()));
        }
        Ok(global)
    }

    /// Feeds the round's fold every update that can go in now: the next ones in node-name order
    /// that have arrived; with `closing`, also those after nodes that never sent one.
    pub(super) fn advance(&self, r: &RoundOf, closing: bool) -> anyhow::Result<()> {
        let RoundOf { store, plugins, spec, round, selected } = *r;
        let mut folds = lock(&self.folds);
        let stale = folds.get(&spec.name).is_none_or(|f| f.round != round);
        if stale {
            let aggregator = plugins.aggregator(store, spec)?;
            let mut plugin = crate::lock(&aggregator.plugin);
            // The strategy state as committed: after a restart the same as the instance had.
            let state = match store.strategy_state(&spec.name, round, &aggregator.label)? {
                Some(bytes) => model_io::decode(&bytes, Path::new("the strategy state"))?,
                None => Vec::new(),
            };
            let mut then = crate::lock(&aggregator.then);
            let (first, rest) = split_state(state, then.len());
            plugin.set_state(first);
            for (stage, state) in then.iter_mut().zip(rest) {
                stage.set_state(state);
            }
            drop(then);
            // A new round, or a restarted cloud: begin again from the persisted state.
            let mut order = selected.to_vec();
            order.sort();
            let ctx = round_context(spec, round);
            let global = self.global(store, spec, round)?;
            let fold = RoundFold::begin(&mut plugin, ctx, Some(&global))?;
            drop(plugin);
            folds.insert(spec.name.clone(), ActiveFold { round, aggregator, order, next: 0, fold });
        }
        let active = folds.get_mut(&spec.name).expect("inserted above");
        let instance = active.aggregator.plugin.clone();
        let mut plugin = crate::lock(&instance);
        let received: HashSet<String> = store.update_nodes(&spec.name, round)?.into_iter().collect();
        let order = active.order.clone();
        let load = |j: usize| load_update(store, &spec.name, round, &order[j]);
        let global = || {
            self.global(store, spec, round)
                .map(|g| Some(g.as_ref().clone()))
                .map_err(|e| RoundError::Replay { update: "the global model".into(), reason: e.to_string() })
        };
        while active.next < order.len() {
            let node = &order[active.next];
            if received.contains(node) {
                active.fold.feed(&mut plugin, active.next, &load, &global)?;
            } else if !closing {
                break;
            }
            active.next += 1;
        }
        Ok(())
    }

    /// Nodes whose updates the open round's fold took in so far.
    pub fn folded(&self, job: &str, round: u32) -> Vec<String> {
        lock(&self.folds)
            .get(job)
            .filter(|a| a.round == round)
            .map(|a| a.fold.accepted().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Drops what the rounds of `job` hold (the job ended).
    pub fn forget(&self, job: &str) {
        lock(&self.folds).remove(job);
        lock(&self.globals).remove(job);
        lock(&self.spent).remove(job);
    }

    /// Folds what is left of round `round` and ends it: v(round) and the round's summary
    /// (`traffic`: the bytes up and down the round moved).
    pub(super) fn close(
        &self,
        r: &RoundOf,
        closing: Closing,
        (closed_by, opened_ms, traffic): (&str, i64, (u64, u64)),
    ) -> anyhow::Result<ClosedRound> {
        let RoundOf { store, spec, round, .. } = *r;
        let failures = store.failures(&spec.name, round)?;
        let failed =
            |rejected: &mut Vec<Rejection>| {
                rejected.extend(failures.iter().map(|(node, reason)| Rejection {
                    update: node.clone(),
                    reason: format!("the node failed: {reason}"),
                }))
            };
        let metrics_of: HashMap<String, (u64, UpdateMetrics)> = store
            .update_metrics(&spec.name, round)?
            .into_iter()
            .map(|(node, n, metrics)| (node, (n, parse_metrics(&metrics))))
            .collect();
        if let Closing::TooFew = closing {
            self.forget(&spec.name);
            let mut rejected: Vec<Rejection> = metrics_of
                .keys()
                .map(|node| Rejection {
                    update: node.clone(),
                    reason: format!(
                        "left out: only {} of the {} nodes the round needs sent an update",
                        metrics_of.len(),
                        spec.rounds.min_clients
                    ),
                })
                .collect();
            rejected.sort_by(|a, b| a.update.cmp(&b.update));
            failed(&mut rejected);
            let summary = RoundSummary {
                round,
                closed_by: closed_by.into(),
                rejected,
                duration_ms: now_ms() - opened_ms,
                aggregator: plugins::chain_label(spec),
                ..RoundSummary::default()
            };
            return Ok(ClosedRound { model: previous_model(store, &spec.name, round)?, summary, state: None });
        }
        self.advance(r, true)?;
        let active =
            lock(&self.folds).remove(&spec.name).ok_or_else(|| anyhow::anyhow!("round {round} has no fold"))?;
        lock(&self.globals).remove(&spec.name);
        let mut plugin = crate::lock(&active.aggregator.plugin);
        let (model, accepted, mut rejected, agg_metrics, state) = match active.fold.finish(&mut plugin) {
            Ok(report) => {
                let examples = report
                    .accepted
                    .iter()
                    .filter_map(|n| metrics_of.get(n))
                    .fold(0u64, |sum, m| sum.saturating_add(m.0));
                let staged = self.run_stages(r, &active.aggregator, report.result, examples)?;
                (
                    model_io::encode(&staged.tensors, None)?,
                    report.accepted,
                    report.rejected,
                    staged.metrics.into_iter().collect(),
                    Some((active.aggregator.label.clone(), model_io::encode(&staged.state, None)?)),
                )
            }
            // Nothing usable arrived: the global model and the strategy state stay as they were.
            Err(RoundError::NothingAccepted(rejected)) => {
                (previous_model(store, &spec.name, round)?, Vec::new(), rejected, BTreeMap::new(), None)
            }
            Err(e) => return Err(e.into()),
        };
        failed(&mut rejected);
        let weighted = |f: &dyn Fn(&UpdateMetrics) -> f64, w: &dyn Fn(&(u64, UpdateMetrics)) -> u64| {
            let total: u64 = accepted.iter().filter_map(|n| metrics_of.get(n)).map(w).fold(0, u64::saturating_add);
            (total > 0).then(|| {
                accepted.iter().filter_map(|n| metrics_of.get(n)).map(|m| f(&m.1) * w(m) as f64).sum::<f64>()
                    / total as f64
            })
        };
        let mut trainer_metrics = BTreeMap::<String, (f64, u64)>::new();
        for (n, m) in accepted.iter().filter_map(|n| metrics_of.get(n)) {
            for (name, v) in &m.trainer {
                let (sum, weight) = trainer_metrics.entry(name.clone()).or_default();
                *sum += v * *n as f64;
                *weight = weight.saturating_add(*n);
            }
        }
        let privacy = match agg_metrics.get(DP_NOISE_METRIC) {
            Some(&z) => {
                let population = store.round(&spec.name, round)?.and_then(|r| r.population).unwrap_or(0);
                Some(self.account(store, spec, round, z, sampling_rate(r.selected.len(), population as usize))?)
            }
            None => None,
        };
        let summary = RoundSummary {
            privacy,
            round,
            trainer_metrics: trainer_metrics
                .into_iter()
                .filter(|(_, (_, w))| *w > 0)
                .map(|(name, (sum, w))| (name, sum / w as f64))
                .collect(),
            examples: accepted.iter().filter_map(|n| metrics_of.get(n)).fold(0u64, |sum, m| sum.saturating_add(m.0)),
            accuracy: weighted(&|m| m.eval_accuracy, &|m| m.1.eval_examples),
            loss: weighted(&|m| m.eval_loss, &|m| m.1.eval_examples),
            train_loss: weighted(&|m| m.train_loss, &|m| m.0),
            participants: accepted,
            rejected,
            bytes_up: traffic.0,
            bytes_down: traffic.1,
            closed_by: closed_by.into(),
            aggregator_metrics: agg_metrics,
            duration_ms: now_ms() - opened_ms,
            aggregator: active.aggregator.label.clone(),
        };
        Ok(ClosedRound { model, summary, state })
    }
}

/// Drops what a job holds in memory beside the board (folds, served models, plugin instances):
/// when it ends, and before its loop starts again from the durable state.
fn forget_in_memory(cloud: &Cloud, name: &str) {
    cloud.rounds.forget(name);
    lock(&cloud.served).remove(name);
    cloud.plugins.forget(name);
}

/// How long a job whose state directory is full or read-only waits before it tries again.
const STORAGE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) async fn run_job(cloud: Arc<Cloud>, name: String) {
    loop {
        match job_loop(&cloud, &name).await {
            Ok(()) => return,
            // A full or read-only state directory fails a write as a whole (the transaction rolls
            // back): the job goes on from its durable state once space returns, as it does after
            // a restart, with the folds and plugin instances it held in memory dropped as a
            // restart drops them. The board stays: nodes keep their tasks, and a round whose fold
            // had begun takes no more updates.
            Err(e) if crate::store::is_storage_error(&e) => {
                tracing::error!(job = %name, "the state directory is full or read-only; the job waits for space: {e:#}");
                forget_in_memory(&cloud, &name);
                tokio::time::sleep(STORAGE_RETRY).await;
            }
            Err(e) => {
                tracing::error!(job = %name, "job failed: {e:#}");
                let _ = cloud.finish_job(&name, "failed", &format!("{e:#}"));
                return;
            }
        }
    }
}

async fn job_loop(cloud: &Arc<Cloud>, name: &str) -> anyhow::Result<()> {
    let progress = indicatif::ProgressBar::new(0);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:20}] {pos}/{len} updates {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // A region's copy of an upper job opens a round only when the upper cloud gave it one.
    let relayed = cloud.store.is_relayed_job(name)?;
    loop {
        let Some(row) = cloud.store.job(name)? else { return Ok(()) };
        if row.status != "running" {
            cloud.board.remove(name);
            progress.finish_and_clear();
            forget_in_memory(cloud, name);
            return Ok(());
        }
        let spec: JobSpec = serde_json::from_str(&row.spec)?;
        let r = row.next_round;
        if r > spec.stop.rounds {
            cloud.finish_job(name, "done", &format!("ran {} rounds", spec.stop.rounds))?;
            continue;
        }
        if spec.stop.wall_secs.is_some_and(|w| (now_ms() - row.created_ms) as f64 > w * 1000.0) {
            cloud.finish_job(name, "done", "wall time limit reached")?;
            continue;
        }
        let round = match cloud.store.round(name, r)? {
            Some(round) => round,
            None => {
                cloud.board.sync(name, row.created_ms, Arc::new(spec.clone()), None, []);
                if cloud.plugins.at_round_boundary(&cloud.store, &spec, row.pending_spec.is_some(), r).await? {
                    continue;
                }
                let relayed_deadline = if relayed {
                    let Some(deadline) = cloud.store.relayed_deadline(name, r)? else {
                        wait(cloud).await;
                        continue;
                    };
                    Some(deadline)
                } else {
                    None
                };
                let online = cloud.online_since(now_ms() - cloud.online_ms);
                if online.len() < spec.rounds.min_clients {
                    wait(cloud).await;
                    continue;
                }
                let count = ((online.len() as f64 * spec.rounds.fraction).ceil() as usize)
                    .clamp(spec.rounds.min_clients, online.len());
                let chosen = {
                    let (c, spec2, online) = (cloud.clone(), spec.clone(), online.clone());
                    tokio::task::spawn_blocking(move || super::selection::select(&c, &spec2, r, &online, count)).await?
                };
                let deadline =
                    relayed_deadline.unwrap_or_else(|| now_ms() + (spec.rounds.deadline_secs * 1000.0) as i64);
                if let Some(reason) =
                    cloud.rounds.budget_spent(&cloud.store, &spec, r, sampling_rate(count, online.len()))?
                {
                    cloud.finish_job(name, "done", &reason)?;
                    continue;
                }
                cloud.store.open_round(name, r, &chosen, deadline, online.len())?;
                // A fleet's round selects thousands: the log names a few.
                let named: Vec<&str> = chosen.iter().take(8).map(String::as_str).collect();
                tracing::info!(job = name, round = r, selected = chosen.len(), first = ?named, "round opened");
                continue;
            }
        };
        {
            let (c, spec2, selected) = (cloud.clone(), spec.clone(), round.selected.clone());
            tokio::task::spawn_blocking(move || {
                let of = RoundOf { store: &c.store, plugins: &c.plugins, spec: &spec2, round: r, selected: &selected };
                c.rounds.advance(&of, false)
            })
            .await??;
        }
        let received: HashSet<String> = cloud.store.update_nodes(name, r)?.into_iter().collect();
        progress.set_prefix(format!("{name} round {r}"));
        progress.set_length(round.selected.len() as u64);
        progress.set_position(received.len() as u64);
        let failed: HashSet<String> = cloud.store.failures(name, r)?.into_iter().map(|(n, _)| n).collect();
        let open = round.closed_ms.is_none().then_some(&round);
        cloud.board.sync(name, row.created_ms, Arc::new(spec.clone()), open, received.iter().chain(&failed).cloned());
        // Every selected node sent its update or said it cannot.
        let answered = round.selected.iter().all(|n| received.contains(n) || failed.contains(n));
        let late = now_ms() >= round.deadline_ms;
        let enough = received.len() >= spec.rounds.min_clients;
        let (closed_by, closing) = if answered && enough {
            ("quorum", Closing::Aggregate)
        } else if answered {
            ("failures", Closing::TooFew)
        } else if late && enough {
            ("deadline", Closing::Aggregate)
        } else if late && relayed {
            // The upper round ends soon after: waiting on would only make the region's answer late.
            ("deadline", Closing::TooFew)
        } else {
            if late {
                progress.set_message(format!("past the deadline, waiting for {} updates", spec.rounds.min_clients));
            }
            wait(cloud).await;
            continue;
        };
        // From here the round takes no more updates: the fold below sees every one acknowledged.
        cloud.board.begin_close(name, r);
        let (c, spec2, selected) = (cloud.clone(), spec.clone(), round.selected.clone());
        let traffic = lock(&cloud.traffic).get(&(name.to_string(), r)).copied().unwrap_or_default();
        let opened = round.opened_ms;
        let ClosedRound { model, summary, state } = tokio::task::spawn_blocking(move || {
            let of = RoundOf { store: &c.store, plugins: &c.plugins, spec: &spec2, round: r, selected: &selected };
            c.rounds.close(&of, closing, (closed_by, opened, traffic))
        })
        .await??;
        let summary_json = serde_json::to_string(&summary)?;
        let state = state.as_ref().map(|(by, bytes)| (by.as_str(), bytes.as_slice()));
        cloud.store.close_round(name, r, &model, &summary_json, state)?;
        cloud.board.close(name, r);
        cloud.counters.rounds_closed.fetch_add(1, Ordering::Relaxed);
        cloud.relay_wake.notify_one();
        let c = cloud.clone();
        tokio::task::spawn_blocking(move || c.store.collect_update_files()).await??;
        lock(&cloud.traffic).remove(&(name.to_string(), r));
        tracing::info!(
            job = name,
            round = r,
            participants = summary.participants.len(),
            accuracy = summary.accuracy,
            closed_by = summary.closed_by,
            "round closed"
        );
        if let (Some(target), Some(acc)) = (spec.stop.target_accuracy, summary.accuracy) {
            if acc >= target {
                cloud.finish_job(name, "done", &format!("accuracy {acc:.4} reached the target {target}"))?;
            }
        }
    }
}

pub(super) async fn wait(cloud: &Cloud) {
    let _ = tokio::time::timeout(Duration::from_millis(100), cloud.wake.notified()).await;
}
