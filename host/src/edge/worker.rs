//! The edge's federated-learning worker: it asks the cloud for work, evaluates the global model
//! on its local test split, trains on its local data with the job's client-objective plugin,
//! stores the update, uploads it.
//!
//! A trained update is stored before it is uploaded and marked once the cloud acknowledged it,
//! so an edge killed at any point either re-sends the same update (the cloud counts it once) or,
//! killed mid-training, trains again from the same global model and seed (the same update).
//!
//! A task that cannot succeed here (it does not fit the node's data, training diverges, the
//! cloud refuses the update) is reported to the cloud, which stops waiting for this node in that
//! round; so is one that keeps failing for other reasons. The edge then goes on with other
//! jobs. Training stops when the round no longer waits for this node (it closed, the job ended).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;

use crate::client::CloudClient;
use crate::components::Components;
use crate::config::EdgeConfig;
use crate::model_io;
use crate::protocol::*;
use crate::runtime::{content_digest, CompressorPlugin, LoadedComponent, ObjectivePlugin, RoundContext, Runtime};
use crate::store::EdgeStore;
use crate::train::{self, Dataset};
use crate::trainer::{FitRequest, SharedTrainer, TaskInfo, TrainerError};

/// An external trainer's metrics as the update carries them: its fit's by name, its
/// evaluation's as `eval_<name>` (accuracy has its own field); names the cloud would refuse fail
/// the task here, naming the metric.
fn trainer_metrics(fit: &BTreeMap<String, f64>, eval: &BTreeMap<String, f64>) -> anyhow::Result<BTreeMap<String, f64>> {
    let all: BTreeMap<String, f64> = fit
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .chain(eval.iter().filter(|(k, _)| *k != "accuracy").map(|(k, v)| (format!("eval_{k}"), *v)))
        .collect();
    if let Some(bad) = all.keys().find(|k| !is_metric_name(k)) {
        return Err(task_failed(format!(
            "the trainer's metric {bad:?}: a name of 1 to 64 letters, digits, `_`, `-` or `.`"
        )));
    }
    if all.len() > MAX_TRAINER_METRICS {
        return Err(task_failed(format!("the trainer reports {} metrics, at most {MAX_TRAINER_METRICS}", all.len())));
    }
    Ok(all)
}

/// A round's trained model, before it is coded for upload.
struct Trained {
    model: model_io::NamedTensors,
    examples: u64,
    metrics: UpdateMetrics,
}

pub struct Worker {
    config: EdgeConfig,
    cloud: CloudClient,
    store: EdgeStore,
    runtime: Runtime,
    /// The local train and test splits, for built-in models (`data`).
    data: Option<(Dataset, Dataset)>,
    /// The user's trainer, for external models (`[trainer]`), shared with the incremental job.
    trainer: Option<SharedTrainer>,
    /// The client-objective plugin of the newest task (by digest), kept across rounds; a task
    /// naming another one replaces (and drops) it.
    objective: Option<(crate::config::job::PluginRef, ObjectivePlugin)>,
    /// The update compressor of the newest task and its job, kept across the job's rounds (a
    /// top-k compressor's error-feedback residual lives in it).
    compressor: Option<(String, crate::config::job::PluginRef, CompressorPlugin)>,
    components: Components,
    /// Failed attempts at the current task (job, round) for reasons that may pass (the cloud or a
    /// registry unreachable, a server error); past [`MAX_ATTEMPTS`] the task is given up.
    attempts: Option<((String, u32), u32)>,
}

/// Attempts at one task before the edge reports it failed and goes on to other work.
const MAX_ATTEMPTS: u32 = 5;

/// A task that cannot succeed here however often it is tried (the task does not fit the node's
/// data, the trainer failed or diverged, the cloud refused the update): reported to the cloud.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TaskFailed(String);

fn task_failed(e: impl std::fmt::Display) -> anyhow::Error {
    TaskFailed(e.to_string()).into()
}

/// A task that waits for the link or the cloud: tried again at the next poll, however often
/// (the update is stored; the round's deadline decides whether it still counts).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RetryLater(String);

impl Worker {
    /// `trainer`: the process of edge.toml's `[trainer]`, if it has one.
    pub fn new(
        config: EdgeConfig,
        base: &Path,
        runtime: Runtime,
        registry_cache: PathBuf,
        trainer: Option<SharedTrainer>,
    ) -> anyhow::Result<Worker> {
        anyhow::ensure!(
            config.data.is_some() || config.trainer.is_some(),
            "neither `data` nor [trainer] is set: this edge takes no training tasks"
        );
        let data = match &config.data {
            Some(dir) => {
                let dir = base.join(dir);
                Some((Dataset::load(&dir, "train")?, Dataset::load(&dir, "test")?))
            }
            None => None,
        };
        let state = base.join(&config.state);
        let store = EdgeStore::open(&state)?;
        let cloud = CloudClient::connect(
            &config.cloud,
            config.token.expose(),
            Duration::from_secs(60),
            &config.cloud_tls,
            config.allow_plaintext,
        )?;
        let components = Components::new(registry_cache, &config.registries)?;
        Ok(Worker {
            config,
            cloud,
            store,
            runtime,
            data,
            trainer,
            objective: None,
            compressor: None,
            components,
            attempts: None,
        })
    }

    /// Serves until the process ends; a cloud that is down is retried.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.config.poll_ms);
        let (train, test) = self.data.as_ref().map_or((0, 0), |(train, test)| (train.len(), test.len()));
        let trainer = self.config.trainer.as_ref().map(|t| t.command.join(" "));
        tracing::info!(node = %self.config.name, train, test, trainer, "edge started");
        loop {
            let asked = tokio::time::Instant::now();
            match self.step().await {
                Ok(true) => {}
                // A cloud that held the request answered when it had something to say: ask
                // again at once, but never more often than every `poll_ms`.
                Ok(false) => tokio::time::sleep_until(asked + poll).await,
                Err(e) => {
                    tracing::warn!(node = %self.config.name, "{e:#}");
                    tokio::time::sleep(poll).await;
                }
            }
        }
    }

    /// One poll; true if it did work.
    async fn step(&mut self) -> anyhow::Result<bool> {
        let Some(task) = self.cloud.task_within(self.config.long_poll_secs).await? else { return Ok(false) };
        let done = match self.store.trained(&task.job, task.round)? {
            Some(row) if row.uploaded => return Ok(false),
            Some(row) => self.upload(&task, row.bytes).await,
            None => match self.train_round(&task).await {
                Ok(Some(bytes)) => self.upload(&task, bytes).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
        };
        match done {
            Ok(()) => {
                self.attempts = None;
                Ok(true)
            }
            Err(e) => self.failed(&task, e).await.map(|()| true),
        }
    }

    /// A task went wrong: a failure for good is reported at once; another is tried again at the
    /// next poll, and reported once it failed [`MAX_ATTEMPTS`] times, so that no task holds the
    /// edge for ever.
    async fn failed(&mut self, task: &Task, e: anyhow::Error) -> anyhow::Result<()> {
        let key = (task.job.clone(), task.round);
        if e.is::<RetryLater>() {
            return Err(e);
        }
        let reason = if e.is::<TaskFailed>() {
            format!("{e:#}")
        } else {
            let n = match &self.attempts {
                Some((k, n)) if *k == key => n + 1,
                _ => 1,
            };
            if n < MAX_ATTEMPTS {
                self.attempts = Some((key, n));
                return Err(
                    e.context(format!("task {} round {} (attempt {n} of {MAX_ATTEMPTS})", task.job, task.round))
                );
            }
            format!("gave up after {MAX_ATTEMPTS} attempts: {e:#}")
        };
        self.attempts = None;
        tracing::warn!(node = %self.config.name, job = %task.job, round = task.round, "task failed: {reason}");
        self.report_failure(task, &reason).await
    }

    /// Tells the cloud this node cannot make its update for `task` (the round stops waiting for
    /// it, and the node goes on to other work).
    async fn report_failure(&self, task: &Task, reason: &str) -> anyhow::Result<()> {
        match self.cloud.report_failure(&task.job, task.round, reason).await {
            // Past the round (closed, or this node no longer selected): nothing to tell.
            Err(e) if matches!(e.status(), Some(StatusCode::CONFLICT | StatusCode::FORBIDDEN)) => Ok(()),
            answer => answer.map(drop).map_err(Into::into),
        }
    }

    /// A task's plugin: pulled from the registry by its pinned digest, or else from the cloud,
    /// and checked against the digest the task names.
    async fn fetch_plugin(
        &self,
        plugin: &crate::config::job::PluginRef,
        what: &str,
    ) -> anyhow::Result<LoadedComponent> {
        let (bytes, origin) = match &plugin.pinned {
            Some(pinned) => (self.components.fetch_pinned(pinned, &plugin.digest).await?.bytes, pinned.clone()),
            None => {
                let bytes = self.cloud.component(&plugin.digest).await?.to_vec();
                let digest = content_digest(&bytes);
                anyhow::ensure!(
                    digest == plugin.digest,
                    "component digest mismatch: expected {}, got {digest}",
                    plugin.digest
                );
                (bytes, format!("{what} {digest}"))
            }
        };
        Ok(self.runtime.load_bytes(&bytes, &origin)?)
    }

    /// The task's client objective: the one kept from earlier rounds if it is the same plugin
    /// with the same config, else a new instance (the old one is dropped: no ghost instances).
    async fn objective(&mut self, plugin: &crate::config::job::PluginRef) -> anyhow::Result<ObjectivePlugin> {
        match self.objective.take() {
            Some((kept, p)) if kept == *plugin => return Ok(p),
            Some(_) => {
                tracing::info!(node = %self.config.name, to = %plugin.pinned.as_deref().unwrap_or(&plugin.digest), "client objective swapped")
            }
            None => {}
        }
        let loaded = self.fetch_plugin(plugin, "client objective").await?;
        Ok(ObjectivePlugin::new(&self.runtime, loaded, plugin.limits, &plugin.config)?)
    }

    /// The task's compressor, kept across rounds while tasks of the same job name the same one.
    async fn compressor(
        &mut self,
        job: &str,
        plugin: &crate::config::job::PluginRef,
    ) -> anyhow::Result<CompressorPlugin> {
        if let Some((kept_job, kept, p)) = self.compressor.take() {
            if kept_job == job && kept == *plugin {
                return Ok(p);
            }
        }
        let loaded = self.fetch_plugin(plugin, "compressor").await?;
        Ok(CompressorPlugin::new(&self.runtime, loaded, plugin.limits, &plugin.config)?)
    }

    /// Trains the task's update and stores it; None if the round stopped waiting for it
    /// meanwhile (training is cancelled then).
    async fn train_round(&mut self, task: &Task) -> anyhow::Result<Option<Vec<u8>>> {
        // What the cloud sent is checked here again: an edge does not trust a task either.
        task.model.validate().map_err(task_failed)?;
        let global_bytes = self.cloud.model(&task.job, task.model_version).await?;
        let global = model_io::decode(&global_bytes, Path::new("global model")).map_err(task_failed)?;
        task.model.check(&global).map_err(task_failed)?;
        if !task.model.is_external() {
            let (train_set, test_set) = self.datasets().map_err(task_failed)?;
            let (inputs, classes) = (task.model.input_len(), task.model.classes());
            train_set.check(&format!("{} train data", self.config.name), inputs, classes).map_err(task_failed)?;
            test_set.check(&format!("{} test data", self.config.name), inputs, classes).map_err(task_failed)?;
        }
        let mut objective = match &task.client_objective {
            Some(p) => Some(self.objective(p).await?),
            None => {
                self.objective = None;
                None
            }
        };
        let ctx = RoundContext { job: task.job.clone(), round: task.round, seed: task.seed };
        if let Some(obj) = objective.as_mut() {
            obj.begin_round(&ctx, &global, &crate::runtime::config::table_to_entries(&task.server_config))
                .map_err(task_failed)?;
        }
        let global_for_delta = task.compressor.as_ref().map(|_| global.clone()).unwrap_or_default();
        let cancel = Arc::new(AtomicBool::new(false));
        // While training, ask now and then whether the round still waits for this node.
        let watcher = {
            let (cancel, cloud, job, round) = (cancel.clone(), self.cloud.clone(), task.job.clone(), task.round);
            let every = Duration::from_millis(self.config.poll_ms.max(200));
            let wait = self.config.long_poll_secs;
            tokio::spawn(async move {
                loop {
                    let asked = tokio::time::Instant::now();
                    // Not waited for any more once the round closed, the job stopped, or this
                    // node's update or failure is in. The cloud holds the question (a long
                    // poll) while the round waits; one that does not is asked every `every`.
                    let state = cloud.round_state_within(&job, round, wait).await;
                    if state.is_ok_and(|s| !s.waits_for_caller) {
                        cancel.store(true, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep_until(asked + every).await;
                }
            })
        };
        let trained = if task.model.is_external() {
            self.train_external(task, global, global_bytes, objective, cancel).await
        } else {
            self.train_native(task, global, objective, cancel).await
        };
        watcher.abort();
        let Some((objective, trained)) = trained? else {
            tracing::info!(node = %self.config.name, job = %task.job, round = task.round, "training cancelled: the round no longer waits for this node");
            return Ok(None);
        };
        if let (Some(p), Some(obj)) = (&task.client_objective, objective) {
            self.objective = Some((p.clone(), obj));
        }
        let Trained { model, examples, metrics } = trained;
        metrics.validate(u64::MAX).map_err(|e| task_failed(format!("the metrics of this round: {e}")))?;
        let metrics_json = serde_json::to_string(&metrics)?;
        let meta = HashMap::from([
            (META_NUM_EXAMPLES.to_string(), examples.to_string()),
            (META_METRICS.to_string(), metrics_json.clone()),
        ]);
        let upload = match &task.compressor {
            Some(p) => {
                let mut compressor = self.compressor(&task.job, p).await?;
                // The difference to the global model travels: it is what INT8 and top-k code well.
                let mut delta = model;
                for (name, d) in delta.iter_mut() {
                    let g = global_for_delta
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, g)| g)
                        .with_context(|| format!("the global model has no `{name}`"))?;
                    d.axpy(-1.0, g).with_context(|| format!("update tensor `{name}`"))?;
                }
                let encoded = compressor.encode(&ctx, &delta).map_err(task_failed)?;
                self.compressor = Some((task.job.clone(), p.clone(), compressor));
                encoded
            }
            None => {
                self.compressor = None;
                model
            }
        };
        let bytes = model_io::encode(&upload, Some(meta))?;
        // Stored before it is sent: a restart re-sends this very update. A full or read-only
        // state directory does not hold the round up: the update is sent from memory (after a
        // restart before the cloud has it, the round is trained again).
        if let Err(e) = self.store.save_trained(&task.job, task.round, examples, &metrics_json, &bytes) {
            if !e.is_storage() {
                return Err(e.into());
            }
            tracing::warn!(node = %self.config.name, job = %task.job, round = task.round, "the update is sent without being kept: {e}");
        }
        tracing::info!(node = %self.config.name, job = %task.job, round = task.round, eval_accuracy = metrics.eval_accuracy, train_loss = metrics.train_loss, "trained");
        Ok(Some(bytes))
    }

    /// The node's local data, for a built-in model.
    fn datasets(&self) -> Result<(&Dataset, &Dataset), String> {
        match &self.data {
            Some((train, test)) => Ok((train, test)),
            None => Err(format!(
                "{} has no `data`: it trains only external models (through its [trainer])",
                self.config.name
            )),
        }
    }

    /// Evaluates the global model on the local test split, then trains it natively (candle).
    async fn train_native(
        &mut self,
        task: &Task,
        global: model_io::NamedTensors,
        objective: Option<ObjectivePlugin>,
        cancelled: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<(Option<ObjectivePlugin>, Trained)>> {
        let (train_set, test_set) = self.datasets().map_err(task_failed)?;
        let (train_set, test_set) = (train_set.clone(), test_set.clone());
        let (spec, params, seed) = (task.model.clone(), task.training.clone(), task.seed);
        let label = format!("{} round {}", self.config.name, task.round);
        let trained = tokio::task::spawn_blocking(move || {
            let eval = train::evaluate(&spec, &global, &test_set)?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:20}] {pos}/{len} steps")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(label);
            let mut objective = objective;
            let on_step = |s, t| {
                bar.set_length(t);
                bar.set_position(s);
            };
            let outcome = train::train_cancellable(
                &spec,
                &global,
                &train_set,
                &params,
                seed,
                objective.as_mut(),
                on_step,
                &cancelled,
            );
            bar.finish_and_clear();
            Ok::<_, train::TrainError>((objective, outcome?, eval))
        })
        .await;
        let (objective, outcome, eval) = match trained? {
            Ok(t) => t,
            Err(train::TrainError::Cancelled) => return Ok(None),
            Err(e) => return Err(task_failed(e)),
        };
        let metrics = UpdateMetrics {
            eval_accuracy: eval.accuracy,
            eval_loss: eval.loss,
            eval_examples: eval.examples,
            train_loss: outcome.loss,
            penalty: outcome.penalty,
            steps: outcome.steps,
            trainer: Default::default(),
        };
        Ok(Some((objective, Trained { model: outcome.model, examples: outcome.examples, metrics })))
    }

    /// Has the user's trainer (`[trainer]`) evaluate the global model and train it.
    async fn train_external(
        &mut self,
        task: &Task,
        global: model_io::NamedTensors,
        global_bytes: bytes::Bytes,
        objective: Option<ObjectivePlugin>,
        cancelled: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<(Option<ObjectivePlugin>, Trained)>> {
        let trainer = self.trainer.clone().ok_or_else(|| {
            task_failed(format!(
                "the job's model is external and {} has no [trainer] in its edge.toml",
                self.config.name
            ))
        })?;
        let info = TaskInfo {
            job: task.job.clone(),
            round: task.round,
            node: self.config.name.clone(),
            seed: task.seed,
            epochs: task.training.epochs,
            batch_size: task.training.batch_size,
            learning_rate: task.training.learning_rate,
            optimizer: task.training.optimizer,
            server_config: serde_json::to_value(&task.server_config)?,
        };
        let (objective, outcome) = tokio::task::spawn_blocking(move || {
            let mut objective = objective;
            let request = FitRequest {
                task: &info,
                global: &global,
                global_bytes: &global_bytes,
                evaluate_first: true,
                samples: None,
            };
            let out = crate::lock(&trainer).fit(&request, objective.as_mut(), &cancelled);
            (objective, out)
        })
        .await?;
        let outcome = match outcome {
            Ok(o) => o,
            Err(TrainerError::Cancelled) => return Ok(None),
            Err(e) => return Err(task_failed(e)),
        };
        let eval = outcome.evaluation.as_ref().expect("asked for (evaluate_first)");
        let metric = |key: &str| outcome.metrics.get(key).copied();
        let metrics = UpdateMetrics {
            eval_accuracy: eval.accuracy.unwrap_or(0.0),
            eval_loss: eval.loss,
            eval_examples: eval.examples,
            train_loss: metric("loss").or(metric("train_loss")).unwrap_or(0.0),
            penalty: outcome.penalty,
            steps: metric("steps").filter(|s| *s >= 0.0).map_or(0, |s| s as u64),
            trainer: trainer_metrics(&outcome.metrics, &eval.metrics)?,
        };
        Ok(Some((objective, Trained { model: outcome.model, examples: outcome.examples, metrics })))
    }

    /// Marks the task's update sent. A full or read-only state directory leaves it unmarked: the
    /// cloud answers a second upload of it as a duplicate.
    fn mark_uploaded(&self, task: &Task) -> anyhow::Result<()> {
        match self.store.mark_uploaded(&task.job, task.round) {
            Err(e) if e.is_storage() => {
                tracing::warn!(node = %self.config.name, job = %task.job, round = task.round, "the update was sent; marking it so: {e}");
                Ok(())
            }
            done => Ok(done?),
        }
    }

    /// Sends a stored update. A refusal for good marks it done (and is a [`TaskFailed`], which
    /// the caller reports); the link or a busy cloud failing it leaves it for the next poll
    /// ([`RetryLater`], not counted against the task), a server error is counted.
    async fn upload(&self, task: &Task, bytes: Vec<u8>) -> anyhow::Result<()> {
        let refused = match self.cloud.upload(&task.job, task.round, bytes).await {
            Ok(_) => return self.mark_uploaded(task),
            Err(e) => e,
        };
        match refused.status() {
            // The link broke: the update is stored and sent again.
            None => Err(RetryLater(refused.to_string()).into()),
            // Too late: the round closed without this update (or the node gave it up).
            Some(StatusCode::CONFLICT) => {
                tracing::warn!(node = %self.config.name, round = task.round, "the cloud takes the update no more: {refused}");
                self.mark_uploaded(task)
            }
            Some(
                StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::NOT_FOUND,
            ) => {
                self.mark_uploaded(task)?;
                Err(task_failed(refused))
            }
            Some(StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) => {
                Err(RetryLater(format!("the cloud is busy; the update is sent again: {refused}")).into())
            }
            // The cloud's disk is full: it wrote nothing, and takes the update once it has space.
            Some(StatusCode::INSUFFICIENT_STORAGE) => {
                Err(RetryLater(format!("the cloud has no space; the update is sent again: {refused}")).into())
            }
            Some(_) => Err(refused.into()),
        }
    }
}
