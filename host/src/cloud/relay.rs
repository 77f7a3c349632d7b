//! A regional aggregator: this cloud takes rounds from an upper cloud (`[upstream]` of
//! cloud.toml) as one of its nodes. It runs each such round with its own nodes, from the upper
//! cloud's global model and with the job's aggregator, and sends the result up as one update
//! that stands for every example behind it. For an aggregator that is a weighted mean of the
//! updates (FedAvg, FedProx; the server optimizers on top of that mean), the upper cloud's fold
//! of the regions' results is then the flat fold of all the nodes' updates, up to the
//! reassociation of the float sums.
//!
//! Crash safety is the flat path's: the region's round is an ordinary round of this cloud
//! (updates persisted before they are acknowledged, folded in node-name order), and which upper
//! round it serves commits with the upper model it starts from ([`CloudStore::relay_round`]).
//! A restarted region sends what it had not sent; the upper cloud counts a resent update once.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;

use super::{rounds, Cloud};
use crate::client::CloudClient;
use crate::config::cloud::UpstreamConfig;
use crate::config::job::JobSpec;
use crate::model_io;
use crate::protocol::*;
use crate::runtime::content_digest;
use crate::store::{now_ms, CloudStore, Relayed};

/// The upper cloud and how this region takes part in its rounds.
pub(super) struct Relay {
    upstream: CloudClient,
    config: UpstreamConfig,
}

/// What became of a task the upper cloud gave.
enum Taken {
    /// The region runs the round now (or ran it already).
    Running,
    /// A round of the job is still open here: the task is taken once it closed.
    Busy,
}

/// Waits before asking again after a failure or while a task waits for a local round.
const RETRY: Duration = Duration::from_secs(1);

/// The spec of the region's copy of an upper job: the region's rounds wait for its own quorum;
/// the stages after the aggregator, the privacy accounting and the stopping rules stay with the
/// upper cloud, which applies them to the fold of the regions' results.
pub fn regional_spec(mut spec: JobSpec, config: &UpstreamConfig) -> JobSpec {
    spec.rounds.min_clients = config.min_clients;
    spec.aggregator_then.clear();
    spec.privacy = None;
    spec.stop.target_accuracy = None;
    spec.stop.wall_secs = None;
    spec
}

impl Relay {
    pub fn connect(config: UpstreamConfig) -> anyhow::Result<Relay> {
        // Long enough for a long poll and for a large model to download.
        let timeout = Duration::from_secs(u64::from(config.long_poll_secs) + 300);
        let upstream =
            CloudClient::connect(&config.url, config.token.expose(), timeout, &config.tls, config.allow_plaintext)
                .context("cloud.toml [upstream]")?;
        Ok(Relay { upstream, config })
    }

    /// Takes rounds from the upper cloud and sends their results up, until the cloud stops.
    pub async fn run(self, cloud: Arc<Cloud>) {
        tracing::info!(upstream = %self.config.url, "regional aggregator: taking rounds from the upper cloud");
        loop {
            if let Err(e) = self.send_closed(&cloud).await {
                tracing::warn!(upstream = %self.config.url, "sending a region's result: {e:#}");
            }
            let pause = tokio::select! {
                task = self.upstream.task_within(self.config.long_poll_secs) => match task {
                    Ok(Some(task)) => match self.take(&cloud, task).await {
                        Ok(Taken::Running) => false,
                        Ok(Taken::Busy) => true,
                        Err(e) => {
                            tracing::warn!(upstream = %self.config.url, "taking a round: {e:#}");
                            true
                        }
                    },
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(upstream = %self.config.url, "asking for a task: {e}");
                        true
                    }
                },
                () = cloud.relay_wake.notified() => false,
                () = cloud.stopping.cancelled() => return,
            };
            if pause {
                tokio::select! {
                    () = cloud.relay_wake.notified() => {}
                    () = tokio::time::sleep(RETRY) => {}
                    () = cloud.stopping.cancelled() => return,
                }
            }
        }
    }

    /// Starts the region's round for an upper task: the job's spec and components, the upper
    /// global model, then the round's record, committed together.
    async fn take(&self, cloud: &Arc<Cloud>, task: Task) -> anyhow::Result<Taken> {
        let (job, round) = (task.job.clone(), task.round);
        if cloud.store.relayed_deadline(&job, round)?.is_some() {
            // Ours already (running, or its result waits to go up): asked again after a while.
            return Ok(Taken::Busy);
        }
        if let Some(row) = cloud.store.job(&job)? {
            if cloud.store.round(&job, row.next_round)?.is_some_and(|r| r.closed_ms.is_none()) {
                return Ok(Taken::Busy);
            }
        }
        let Some(spec) = task.region else {
            return self
                .refuse(
                    &job,
                    round,
                    "the upper cloud does not know this node as a region: set `region = true` in its [nodes.<name>]",
                )
                .await;
        };
        if spec.compressor.is_some() {
            return self
                .refuse(&job, round, "a job with a compressor is not aggregated by regions: the upper cloud would decode the region's result as a compressed update")
                .await;
        }
        let spec = regional_spec(*spec, &self.config);
        if spec.name != job {
            anyhow::bail!("the upper cloud's task for job `{job}` carries the spec of job `{}`", spec.name);
        }
        if let Err(e) = spec.validate() {
            return self.refuse(&job, round, &format!("the job's spec as this region runs it: {e}")).await;
        }
        for (table, plugin) in spec.plugins() {
            if cloud.store.component(&plugin.digest)?.is_some() {
                continue;
            }
            let bytes = self.upstream.component(&plugin.digest).await.with_context(|| format!("the job's {table}"))?;
            let digest = content_digest(&bytes);
            anyhow::ensure!(
                digest == plugin.digest,
                "the upper cloud sent {table} with digest {digest}, not {}",
                plugin.digest
            );
            cloud.store.put_component(&digest, &bytes)?;
        }
        let model = self.upstream.model(&job, task.model_version).await?;
        let decoded = model_io::decode(&model, Path::new("the upper cloud's global model"))?;
        spec.model.check(&decoded).context("the upper cloud's global model")?;
        let margin = (self.config.deadline_margin_secs * 1000.0) as i64;
        let deadline = (task.deadline_ms - margin).max(now_ms() + 1000);
        let spec_json = serde_json::to_string(&spec)?;
        match cloud.store.relay_round(&job, &spec_json, round, &model, deadline)? {
            Relayed::Conflict(why) => return self.refuse(&job, round, &why).await,
            Relayed::Taken { started } => {
                // Version round - 1 is the upper model now: nothing cached of the region's own.
                crate::lock(&cloud.served).remove(&job);
                cloud.rounds.forget(&job);
                if started {
                    tokio::spawn(rounds::run_job(cloud.clone(), job.clone()));
                }
            }
        }
        cloud.wake.notify_waiters();
        tracing::info!(job = %job, round, "region: round taken from the upper cloud");
        Ok(Taken::Running)
    }

    /// Tells the upper cloud this region will not send a result for the round.
    async fn refuse(&self, job: &str, round: u32, reason: &str) -> anyhow::Result<Taken> {
        tracing::warn!(job, round, "region: {reason}");
        match self.upstream.report_failure(job, round, reason).await {
            Err(e) if matches!(e.status(), Some(StatusCode::CONFLICT | StatusCode::FORBIDDEN)) => Ok(Taken::Busy),
            answer => answer.map(|_| Taken::Busy).map_err(Into::into),
        }
    }

    /// Sends up the result of every relayed round that closed here and was not sent yet.
    async fn send_closed(&self, cloud: &Cloud) -> anyhow::Result<()> {
        for (job, round) in cloud.store.unsent_relayed()? {
            let Some(row) = cloud.store.round(&job, round)? else { continue };
            let Some(summary) = row.summary.filter(|_| row.closed_ms.is_some()) else { continue };
            let summary: RoundSummary = serde_json::from_str(&summary).context("the round's summary")?;
            let outcome = self.send(&cloud.store, &job, round, &summary).await?;
            cloud.store.settle_relayed(&job, round, &outcome)?;
            tracing::info!(job = %job, round, outcome, participants = summary.participants.len(), "region: round settled upstream");
        }
        Ok(())
    }

    /// Sends one closed round's result (or its failure) up; the outcome to record. A link or
    /// upper cloud that fails leaves the round unsent, for the next pass.
    async fn send(&self, store: &CloudStore, job: &str, round: u32, summary: &RoundSummary) -> anyhow::Result<String> {
        if summary.participants.is_empty() || summary.examples == 0 {
            let why: Vec<&str> = summary.rejected.iter().take(3).map(|r| r.reason.as_str()).collect();
            let reason = format!("the region folded no update in round {round}: {}", why.join("; "));
            return match self.upstream.report_failure(job, round, &reason).await {
                Ok(_) => Ok("failed".into()),
                Err(e) if matches!(e.status(), Some(StatusCode::CONFLICT | StatusCode::FORBIDDEN)) => Ok("late".into()),
                Err(e) => Err(e.into()),
            };
        }
        let model = store.model(job, round)?.with_context(|| format!("model version {round} is missing"))?;
        let tensors = model_io::decode(&model, Path::new("the region's result"))?;
        let meta = HashMap::from([
            (META_NUM_EXAMPLES.to_string(), summary.examples.to_string()),
            (META_METRICS.to_string(), serde_json::to_string(&region_metrics(store, job, round, summary)?)?),
        ]);
        let bytes = model_io::encode(&tensors, Some(meta))?;
        match self.upstream.upload(job, round, bytes).await {
            Ok(answer) => Ok(answer.status),
            Err(e) => match e.status() {
                None | Some(StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) => Err(e.into()),
                Some(StatusCode::CONFLICT) => Ok("late".into()),
                Some(s) if s.is_client_error() => Ok(format!("refused: {e}")),
                Some(_) => Err(e.into()),
            },
        }
    }
}

/// The metrics the region's result carries: its participants', weighted as the upper cloud
/// weights a round's (evaluation by evaluation examples, training by training examples), so the
/// upper round's figures are those of a flat round over every node.
fn region_metrics(store: &CloudStore, job: &str, round: u32, summary: &RoundSummary) -> anyhow::Result<UpdateMetrics> {
    let mut eval_examples = 0u64;
    let (mut penalty, mut steps) = (0.0, 0u64);
    for (node, n, metrics) in store.update_metrics(job, round)? {
        if !summary.participants.contains(&node) {
            continue;
        }
        let m: UpdateMetrics = serde_json::from_str(&metrics).unwrap_or_default();
        eval_examples = eval_examples.saturating_add(m.eval_examples);
        penalty += m.penalty * n as f64 / summary.examples as f64;
        steps = steps.max(m.steps);
    }
    Ok(UpdateMetrics {
        eval_accuracy: summary.accuracy.unwrap_or(0.0),
        eval_loss: summary.loss.unwrap_or(0.0),
        eval_examples,
        train_loss: summary.train_loss.unwrap_or(0.0),
        penalty,
        steps,
        trainer: summary.trainer_metrics.clone(),
    })
}
