//! The edge host. Its inference services and API are in [`services`] and [`api`]; this module
//! is its federated-learning worker: it asks the cloud for work, evaluates the global model on its local test split,
//! trains on its local data with the job's client-objective plugin, stores the update, uploads it.
//!
//! A trained update is stored before it is uploaded and marked once the cloud acknowledged it,
//! so an edge killed at any point either re-sends the same update (the cloud counts it once) or,
//! killed mid-training, trains again from the same global model and seed (the same update).
//!
//! A task that cannot succeed here (it does not fit the node's data, training diverges, the
//! cloud refuses the update) is reported to the cloud, which stops waiting for this node in that
//! round; so is one that keeps failing for other reasons. The edge then goes on with other
//! jobs. Training stops when the round no longer waits for this node (it closed, the job ended).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;

use crate::components::Components;
use crate::model_io;
use crate::protocol::*;
use crate::runtime::{content_digest, CompressorPlugin, LoadedComponent, ObjectivePlugin, RoundContext, Runtime};
use crate::store::EdgeStore;
use crate::train::{self, Dataset};

pub mod api;
pub mod incremental;
pub mod mqtt;
pub mod replay;
pub mod services;
pub mod trigger;

/// Runs an edge node: its API and inference services if `listen` is set, its federated-learning
/// worker if `data` is, until the process ends.
pub async fn run(
    config: EdgeConfig,
    base: &Path,
    cache_dir: Option<PathBuf>,
    registry_cache: PathBuf,
) -> anyhow::Result<()> {
    crate::return_large_buffers_to_the_os();
    let models = match &config.models {
        Some(dir) => crate::runtime::nn::Models::load_dir(&base.join(dir), config.nn_backend).context("models")?,
        None => crate::runtime::nn::Models::new(config.nn_backend),
    };
    let runtime = Runtime::with_models(cache_dir, models)?;
    if config.listen.is_none()
        && (!config.services.is_empty() || config.replay.is_some() || config.incremental.is_some())
    {
        anyhow::bail!("services, [replay] and [incremental] need `listen` (the address of the edge's API)");
    }
    if config.listen.is_none() && config.data.is_none() {
        anyhow::bail!("nothing to do: set `data` (federated learning) and/or `listen` (inference services)");
    }
    let api = match &config.listen {
        Some(listen) => {
            let auth = api::ApiAuth::new(config.api.as_ref())?;
            let components = Components::new(registry_cache.clone(), &config.registries)?;
            let store = std::sync::Arc::new(EdgeStore::open(&base.join(&config.state))?);
            let services = services::Services::load(&config, base, &runtime, &components, store).await?;
            let (listen, limits) = (listen.clone(), config.http.clone());
            Some(tokio::spawn(async move { api::serve(&listen, std::sync::Arc::new(services), auth, limits).await }))
        }
        None => None,
    };
    if config.data.is_some() {
        let worker = Edge::new(config, base, runtime, registry_cache)?;
        return match api {
            // Whichever stops first (e.g. the API cannot bind) ends the node with its error.
            Some(task) => tokio::select! {
                r = worker.run() => r,
                r = task => r.context("edge API")?,
            },
            None => worker.run().await,
        };
    }
    match api {
        Some(task) => task.await.context("edge API")?,
        None => Ok(()),
    }
}

pub struct Edge {
    config: EdgeConfig,
    http: reqwest::Client,
    store: EdgeStore,
    runtime: Runtime,
    train: Dataset,
    test: Dataset,
    /// The client-objective plugin of the newest task (by digest), kept across rounds; a task
    /// naming another one replaces (and drops) it.
    objective: Option<(crate::job::PluginRef, ObjectivePlugin)>,
    /// The update compressor of the newest task and its job, kept across the job's rounds (a
    /// top-k compressor's error-feedback residual lives in it).
    compressor: Option<(String, crate::job::PluginRef, CompressorPlugin)>,
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

impl Edge {
    pub fn new(config: EdgeConfig, base: &Path, runtime: Runtime, registry_cache: PathBuf) -> anyhow::Result<Edge> {
        let data = base.join(config.data.as_ref().context("`data` is not set: this edge takes no training tasks")?);
        let train = Dataset::load(&data, "train")?;
        let test = Dataset::load(&data, "test")?;
        let store = EdgeStore::open(&base.join(&config.state))?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let components = Components::new(registry_cache, &config.registries)?;
        Ok(Edge {
            config,
            http,
            store,
            runtime,
            train,
            test,
            objective: None,
            compressor: None,
            components,
            attempts: None,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.cloud.trim_end_matches('/'), path)
    }

    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let resp = self.http.get(self.url(path)).bearer_auth(&self.config.token).send().await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!("GET {path}: {status}: {body}");
        }
        Ok(resp)
    }

    /// Serves until the process ends; a cloud that is down is retried.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.config.poll_ms);
        tracing::info!(node = %self.config.name, train = self.train.len(), test = self.test.len(), "edge started");
        loop {
            match self.step().await {
                Ok(true) => {}
                Ok(false) => tokio::time::sleep(poll).await,
                Err(e) => {
                    tracing::warn!(node = %self.config.name, "{e:#}");
                    tokio::time::sleep(poll).await;
                }
            }
        }
    }

    /// One poll; true if it did work.
    async fn step(&mut self) -> anyhow::Result<bool> {
        let resp: TaskResponse = self.get("/v1/task").await?.json().await?;
        let Some(task) = resp.task else { return Ok(false) };
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
        let path = format!("/v1/jobs/{}/rounds/{}/failure", task.job, task.round);
        let resp = self
            .http
            .post(self.url(&path))
            .bearer_auth(&self.config.token)
            .json(&FailureReport { reason: reason.to_string() })
            .send()
            .await
            .with_context(|| format!("reporting a failure to {path}"))?;
        let status = resp.status();
        // Past the round (closed, or this node no longer selected): nothing to tell.
        if status.is_success() || status == StatusCode::CONFLICT || status == StatusCode::FORBIDDEN {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("reporting a failure to {path}: {status}: {body}")
    }

    /// Whether the cloud still waits for this node's update of `task` (false once the round
    /// closed, the job stopped, or the node reported a failure).
    async fn still_wanted(http: &reqwest::Client, url: &str, token: &str) -> Option<bool> {
        let resp = http.get(url).bearer_auth(token).send().await.ok()?;
        let state: RoundState = resp.error_for_status().ok()?.json().await.ok()?;
        Some(state.waits_for_caller)
    }

    /// A task's plugin: pulled from the registry by its pinned digest, or else from the cloud,
    /// and checked against the digest the task names.
    async fn fetch_plugin(&self, plugin: &crate::job::PluginRef, what: &str) -> anyhow::Result<LoadedComponent> {
        let (bytes, origin) = match &plugin.pinned {
            Some(pinned) => (self.components.fetch_pinned(pinned, &plugin.digest).await?.bytes, pinned.clone()),
            None => {
                let bytes = self.get(&format!("/v1/components/{}", plugin.digest)).await?.bytes().await?.to_vec();
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
    async fn objective(&mut self, plugin: &crate::job::PluginRef) -> anyhow::Result<ObjectivePlugin> {
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
    async fn compressor(&mut self, job: &str, plugin: &crate::job::PluginRef) -> anyhow::Result<CompressorPlugin> {
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
        let global_bytes =
            self.get(&format!("/v1/jobs/{}/models/{}", task.job, task.model_version)).await?.bytes().await?;
        let global = model_io::decode(&global_bytes, Path::new("global model")).map_err(task_failed)?;
        task.model.check(&global).map_err(task_failed)?;
        let (inputs, classes) = (task.model.input_len(), task.model.classes());
        self.train.check(&format!("{} train data", self.config.name), inputs, classes).map_err(task_failed)?;
        self.test.check(&format!("{} test data", self.config.name), inputs, classes).map_err(task_failed)?;
        let mut objective = match &task.client_objective {
            Some(p) => Some(self.objective(p).await?),
            None => {
                self.objective = None;
                None
            }
        };
        let ctx = RoundContext { job: task.job.clone(), round: task.round, seed: task.seed };
        if let Some(obj) = objective.as_mut() {
            obj.begin_round(&ctx, &global, &table_to_entries(&task.server_config)).map_err(task_failed)?;
        }
        let global_for_delta = task.compressor.as_ref().map(|_| global.clone()).unwrap_or_default();
        let (spec, params, seed) = (task.model.clone(), task.training.clone(), task.seed);
        let (train_set, test_set) = (self.train.clone(), self.test.clone());
        let label = format!("{} round {}", self.config.name, task.round);
        let cancel = Arc::new(AtomicBool::new(false));
        // While training, ask now and then whether the round still waits for this node.
        let watcher = {
            let (cancel, http, token) = (cancel.clone(), self.http.clone(), self.config.token.clone());
            let url = self.url(&format!("/v1/jobs/{}/rounds/{}", task.job, task.round));
            let every = Duration::from_millis(self.config.poll_ms.max(200));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if Edge::still_wanted(&http, &url, &token).await == Some(false) {
                        cancel.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            })
        };
        let cancelled = cancel.clone();
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
        watcher.abort();
        let (objective, outcome, eval) = match trained? {
            Ok(t) => t,
            Err(train::TrainError::Cancelled) => {
                tracing::info!(node = %self.config.name, job = %task.job, round = task.round, "training cancelled: the round no longer waits for this node");
                return Ok(None);
            }
            Err(e) => return Err(task_failed(e)),
        };
        if let (Some(p), Some(obj)) = (&task.client_objective, objective) {
            self.objective = Some((p.clone(), obj));
        }
        let metrics = UpdateMetrics {
            eval_accuracy: eval.accuracy,
            eval_loss: eval.loss,
            eval_examples: eval.examples,
            train_loss: outcome.loss,
            penalty: outcome.penalty,
            steps: outcome.steps,
        };
        metrics.validate(u64::MAX).map_err(|e| task_failed(format!("the metrics of this round: {e}")))?;
        let metrics_json = serde_json::to_string(&metrics)?;
        let meta = HashMap::from([
            (META_NUM_EXAMPLES.to_string(), outcome.examples.to_string()),
            (META_METRICS.to_string(), metrics_json.clone()),
        ]);
        let upload = match &task.compressor {
            Some(p) => {
                let mut compressor = self.compressor(&task.job, p).await?;
                // The difference to the global model travels: it is what INT8 and top-k code well.
                let mut delta = outcome.model.clone();
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
                outcome.model
            }
        };
        let bytes = model_io::encode(&upload, Some(meta))?;
        // Stored before it is sent: a restart re-sends this very update.
        self.store.save_trained(&task.job, task.round, outcome.examples, &metrics_json, &bytes)?;
        tracing::info!(node = %self.config.name, job = %task.job, round = task.round, eval_accuracy = eval.accuracy, train_loss = outcome.loss, "trained");
        Ok(Some(bytes))
    }

    /// Sends a stored update. A refusal for good marks it done (and is a [`TaskFailed`], which
    /// the caller reports); the link or a busy cloud failing it leaves it for the next poll
    /// ([`RetryLater`], not counted against the task), a server error is counted.
    async fn upload(&self, task: &Task, bytes: Vec<u8>) -> anyhow::Result<()> {
        let path = format!("/v1/jobs/{}/rounds/{}/update", task.job, task.round);
        let sent = self.http.post(self.url(&path)).bearer_auth(&self.config.token).body(bytes).send().await;
        let resp = sent.map_err(|e| RetryLater(format!("uploading to {path}: {e}")))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        match status {
            s if s.is_success() => self.store.mark_uploaded(&task.job, task.round)?,
            // Too late: the round closed without this update (or the node gave it up).
            StatusCode::CONFLICT => {
                tracing::warn!(node = %self.config.name, round = task.round, "the cloud takes the update no more: {body}");
                self.store.mark_uploaded(&task.job, task.round)?;
            }
            StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::NOT_FOUND => {
                self.store.mark_uploaded(&task.job, task.round)?;
                let message = serde_json::from_str::<ErrorBody>(&body).map(|e| e.error).unwrap_or(body);
                return Err(task_failed(format!("the cloud refused the update: {status}: {message}")));
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                return Err(RetryLater(format!("the cloud is busy ({status}); the update is sent again")).into())
            }
            _ => anyhow::bail!("upload failed: {status}: {body}"),
        }
        Ok(())
    }
}
