//! The edge's incremental-learning job (edge.toml `[incremental]`; Sedna's
//! IncrementalLearningJob, with a replay buffer): labelled samples arrive (`POST /v1/samples`,
//! the watched inbox directory, or MQTT: [`super::mqtt`]) and are kept as new samples; when the trigger holds (enough
//! new samples, optionally within a daily window, optionally when the serving model's accuracy on
//! them has dropped) a round fine-tunes the serving version on the new samples plus a draw from
//! the replay buffer, evaluates it against the serving version on the eval set, records it, and
//! deploys it - the joint service switches to it without a restart - only if the deploy
//! conditions hold.
//!
//! Versions, their metrics and the decisions live in the edge's store; the new samples of a round
//! are forgotten in the same transaction that records its version, so a crash mid-round trains
//! the same round again.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use nereid_onnx::Message;
use serde::Serialize;

use super::replay::{parse_batch, OfferReport, ReplayBuffer, Trainable};
use super::services::{is_bad_request, Services};
use crate::inference::export;
use crate::model_io::NamedTensors;
use crate::protocol::{EdgeConfig, IncrementalConfig};
use crate::runtime::{content_digest, RoundContext};
use crate::store::{now_ms, EdgeStore, VersionRow};
use crate::train::{self, Dataset, Evaluation, ModelSpec};

/// The version that serves: its weights (what the next round starts from) and how it does on
/// the eval set (what a new version is compared with).
struct Serving {
    version: u32,
    weights: NamedTensors,
    eval: Evaluation,
}

/// What the job is doing, for `GET /v1/incremental`.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub service: String,
    pub serving_version: u32,
    /// The model the service answers with (`<model>@v<version>` once a round was deployed).
    pub serving_model: String,
    /// Samples arrived since the last round.
    pub new_samples: u64,
    /// What the last check found: why no round started, or what started the last one.
    pub trigger: String,
    pub checks: u64,
    pub rounds: u64,
    pub inbox_taken: u64,
    pub inbox_failed: u64,
    /// The MQTT subscription's state (connected and subscribed, or why not), if there is one.
    pub mqtt: Option<String>,
    pub mqtt_taken: u64,
    pub mqtt_refused: u64,
    /// The last check's error, if it failed (it is tried again at the next check).
    pub last_error: Option<String>,
}

pub struct Job {
    cfg: IncrementalConfig,
    /// The service's configured model (version 0) and its ONNX bytes.
    configured: String,
    configured_onnx: Vec<u8>,
    spec: ModelSpec,
    eval: Dataset,
    inbox: Option<PathBuf>,
    store: Arc<EdgeStore>,
    serving: Mutex<Serving>,
    status: Mutex<JobStatus>,
    /// Failed attempts per batch (content digest) that failed for a reason of the moment; at
    /// [`ATTEMPTS`] the batch is refused for good, so one batch a plugin always traps on cannot
    /// hold up the others.
    attempts: Mutex<HashMap<String, u32>>,
    /// Where the MQTT source connects, checked at load.
    mqtt_target: Option<MqttTarget>,
}

/// The broker of `[incremental.mqtt]` and the session's client id.
#[derive(Debug, Clone)]
pub struct MqttTarget {
    pub host: String,
    pub port: u16,
    pub client_id: String,
}

/// How often a batch is tried before it is refused for good.
pub const ATTEMPTS: u32 = 5;

/// What became of a batch.
pub enum Taken {
    New(OfferReport),
    /// Its content was taken in before (a redelivery).
    Duplicate,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `f32` samples (as the buffer stores them) and their labels as a dataset.
fn dataset(samples: &[(u64, i64, Vec<u8>)], features: usize) -> anyhow::Result<Dataset> {
    let mut data = Dataset { x: Vec::with_capacity(samples.len() * features), y: Vec::new(), features };
    for (id, label, bytes) in samples {
        if bytes.len() != features * 4 {
            bail!("sample {id} has {} bytes, the model takes {features} f32 values", bytes.len());
        }
        data.x.extend(crate::inference::wire::le_f32s(bytes));
        data.y.push(u32::try_from(*label).with_context(|| format!("sample {id}: label {label}"))?);
    }
    Ok(data)
}

impl Job {
    /// Reads the job's model (the service's configured one) and eval set; nothing runs yet.
    pub fn load(cfg: &IncrementalConfig, edge: &EdgeConfig, base: &Path, store: Arc<EdgeStore>) -> anyhow::Result<Job> {
        let service = edge
            .services
            .get(&cfg.service)
            .with_context(|| format!("service: there is no [services.{}] in edge.toml", cfg.service))?;
        let models = edge.models.as_ref().context("`models` (the model directory) is not set in edge.toml")?;
        let path = base.join(models).join(&service.model).join("model.onnx");
        let onnx = std::fs::read(&path).with_context(|| format!("service: reading {}", path.display()))?;
        let (spec, _) = export::from_onnx(&onnx).with_context(|| format!("service: {}", path.display()))?;
        let eval_dir = base.join(&cfg.eval);
        let eval = Dataset::load(&eval_dir, "test").context("eval")?;
        eval.check(&format!("eval {}", eval_dir.display()), spec.input_len(), spec.classes()).context("eval")?;
        if eval.is_empty() {
            bail!("eval: {} has no test samples", eval_dir.display());
        }
        if cfg.trigger.min_new_samples == 0 {
            bail!("trigger.min_new_samples: must be at least 1");
        }
        if let Some(d) = cfg.trigger.accuracy_drop.filter(|d| !(0.0..=1.0).contains(d)) {
            bail!("trigger.accuracy_drop: must be within 0..1 (got {d})");
        }
        let mqtt_target = match &cfg.mqtt {
            None => None,
            Some(m) => {
                let (host, port) = m
                    .broker
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                    .filter(|(h, _)| !h.is_empty())
                    .with_context(|| format!("mqtt.broker: `{}` is not host:port", m.broker))?;
                if m.topic.is_empty() {
                    bail!("mqtt.topic: empty");
                }
                if let Some(var) = &m.password_env {
                    std::env::var(var).with_context(|| format!("mqtt.password_env: ${var} is not set"))?;
                }
                let client_id = m.client_id.clone().unwrap_or_else(|| format!("nereid-{}", edge.name));
                Some(MqttTarget { host, port, client_id })
            }
        };
        let t = &cfg.training;
        if t.epochs == 0 || t.batch_size == 0 || !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            bail!("training: epochs and batch_size must be at least 1, learning_rate above 0");
        }
        let status = JobStatus {
            service: cfg.service.clone(),
            serving_version: 0,
            serving_model: service.model.clone(),
            new_samples: 0,
            trigger: "not checked yet".into(),
            checks: 0,
            rounds: 0,
            inbox_taken: 0,
            inbox_failed: 0,
            mqtt: cfg.mqtt.as_ref().map(|_| "not connected yet".to_string()),
            mqtt_taken: 0,
            mqtt_refused: 0,
            last_error: None,
        };
        Ok(Job {
            cfg: cfg.clone(),
            configured: service.model.clone(),
            configured_onnx: onnx,
            // Until `resume` reads the store.
            serving: Mutex::new(Serving {
                version: 0,
                weights: NamedTensors::new(),
                eval: Evaluation { accuracy: 0.0, loss: 0.0, examples: 0 },
            }),
            spec,
            eval,
            inbox: cfg.inbox.as_ref().map(|d| base.join(d)),
            store,
            status: Mutex::new(status),
            attempts: Mutex::default(),
            mqtt_target,
        })
    }

    /// What the job's model trains on: the samples the buffer must take from now on.
    pub fn trainable(&self) -> Trainable {
        Trainable { layout: format!("f32[{}]", self.spec.input_len()), classes: self.spec.classes() as i64 }
    }

    /// Picks up where the store left off: records the configured model as version 0 the first
    /// time, and makes the newest deployed version serve.
    pub fn resume(&self, services: &Services) -> anyhow::Result<()> {
        match services.is_joint(&self.cfg.service) {
            Some(true) => {}
            Some(false) => bail!("service: `{}` is not a joint service", self.cfg.service),
            None => bail!("service: no service `{}`", self.cfg.service),
        }
        let (held, _, layout) = self.store.replay_summary()?;
        let want = self.trainable().layout;
        if let Some(layout) = layout.filter(|l| held > 0 && *l != want) {
            bail!(
                "the replay buffer holds {layout} samples; the model of [services.{}] takes {want}",
                self.cfg.service
            );
        }
        let (version, onnx) = match self.store.serving_version()? {
            Some(found) => found,
            None => {
                let onnx = self.configured_onnx.clone();
                let (_, weights) = export::from_onnx(&onnx)?;
                let eval = train::evaluate(&self.spec, &weights, &self.eval)?;
                let row = VersionRow {
                    version: 0,
                    service: self.cfg.service.clone(),
                    created_ms: now_ms(),
                    parent: None,
                    trigger: "initial".into(),
                    new_samples: 0,
                    replayed: 0,
                    metrics: serde_json::json!({ "accuracy": eval.accuracy, "loss": eval.loss }),
                    decision: "initial".into(),
                    reason: format!("the model of [services.{}] when the job started", self.cfg.service),
                };
                self.store.record_version(&row, &onnx, None)?;
                (0, onnx)
            }
        };
        let (spec, weights) = export::from_onnx(&onnx).with_context(|| format!("model version {version}"))?;
        if spec != self.spec {
            bail!(
                "model version {version} (in `state`) is a {spec:?}, the model of [services.{}] a {:?}: \
                 the job cannot go on from it (start it over with another `state`, or restore the model)",
                self.cfg.service,
                self.spec
            );
        }
        let eval = train::evaluate(&self.spec, &weights, &self.eval)?;
        if version > 0 {
            let name = self.version_name(version);
            services.switch(services.prepare_switch(&self.cfg.service, &name, &onnx)?, &self.configured)?;
        }
        *lock(&self.serving) = Serving { version, weights, eval };
        let mut status = lock(&self.status);
        status.serving_version = version;
        status.serving_model = services.serving_model(&self.cfg.service).unwrap_or_default();
        status.new_samples = self.store.new_samples_count()?;
        tracing::info!(service = %self.cfg.service, version, accuracy = eval.accuracy, "incremental job: serving version");
        Ok(())
    }

    fn version_name(&self, version: u32) -> String {
        format!("{}@v{version}", self.configured)
    }

    pub fn status(&self) -> JobStatus {
        lock(&self.status).clone()
    }

    /// One check: takes in the inbox, evaluates the trigger, runs a round if it holds.
    pub fn check(&self, services: &Services) -> anyhow::Result<()> {
        let replay = services.replay.as_ref().context("the incremental job needs [replay]")?;
        lock(&self.status).checks += 1;
        // A file that fails for a reason of the moment (the store, the plugin) stays in the inbox
        // for the next check; the samples already here still get their round.
        let inbox_failure = self.inbox.as_ref().and_then(|inbox| self.take_inbox(inbox, replay).err());
        let pending = self.store.new_samples_count()?;
        lock(&self.status).new_samples = pending;
        match self.trigger(pending)? {
            Err(waiting) => lock(&self.status).trigger = waiting,
            Ok(fired) => {
                lock(&self.status).trigger = format!("round started: {fired}");
                self.round(services, replay, &fired)?;
            }
        }
        inbox_failure.map_or(Ok(()), Err)
    }

    /// `Ok(reason)` when a round should start, `Err(why not)` when not.
    fn trigger(&self, pending: u64) -> anyhow::Result<Result<String, String>> {
        let t = &self.cfg.trigger;
        if pending < t.min_new_samples {
            return Ok(Err(format!("waiting for new samples: {pending} of {}", t.min_new_samples)));
        }
        let mut reason = format!("{pending} new samples (>= {})", t.min_new_samples);
        if let Some(window) = t.window {
            use chrono::Timelike;
            let now = chrono::Local::now();
            let minute = (now.hour() * 60 + now.minute()) as u16;
            if !window.contains(minute) {
                return Ok(Err(format!(
                    "{pending} new samples, outside the window {window} (now {:02}:{:02})",
                    now.hour(),
                    now.minute()
                )));
            }
            reason.push_str(&format!(", within {window}"));
        }
        if let Some(drop) = t.accuracy_drop {
            let new = dataset(&self.store.new_samples()?, self.spec.input_len())?;
            let serving = lock(&self.serving);
            let on_new = train::evaluate(&self.spec, &serving.weights, &new)?.accuracy;
            let fell = serving.eval.accuracy - on_new;
            let words = format!(
                "the serving version's accuracy on the new samples is {on_new:.4}, on the eval set {:.4}",
                serving.eval.accuracy
            );
            if fell < drop {
                return Ok(Err(format!("{pending} new samples, no drop: {words} (a round needs a drop of {drop})")));
            }
            reason.push_str(&format!(", accuracy dropped by {fell:.4}: {words}"));
        }
        Ok(Ok(reason))
    }

    /// Fine-tunes, evaluates, records, and deploys if the conditions hold.
    fn round(&self, services: &Services, replay: &ReplayBuffer, trigger: &str) -> anyhow::Result<()> {
        let new = self.store.new_samples()?;
        let last_id = new.last().map(|s| s.0);
        let features = self.spec.input_len();
        let mut data = dataset(&new, features)?;
        let next = self.store.next_version()?;
        let seed = self.cfg.seed.wrapping_add(next as u64);
        let ctx = RoundContext { job: format!("incremental/{}", self.cfg.service), round: next, seed };
        let count = self.cfg.replay_draw.unwrap_or(new.len().min(u32::MAX as usize) as u32);
        // The buffer took the new samples in too: those are in the round already.
        let fresh: HashSet<u64> = new.iter().map(|s| s.0).collect();
        let drawn: Vec<_> = replay.draw(&ctx, count)?.into_iter().filter(|s| !fresh.contains(&s.0)).collect();
        let replayed = dataset(&drawn, features).context("a sample drawn from the replay buffer")?;
        data.x.extend_from_slice(&replayed.x);
        data.y.extend_from_slice(&replayed.y);
        let (parent, start, serving_eval) = {
            let s = lock(&self.serving);
            (s.version, s.weights.clone(), s.eval)
        };
        let outcome = train::train(&self.spec, &start, &data, &self.cfg.training, seed, None, |_, _| {})?;
        let eval = train::evaluate(&self.spec, &outcome.model, &self.eval)?;
        let measured = super::trigger::Measured {
            accuracy: eval.accuracy,
            loss: eval.loss,
            serving_accuracy: serving_eval.accuracy,
            serving_loss: serving_eval.loss,
        };
        let checks: Vec<(bool, String)> = self.cfg.deploy_if.iter().map(|c| c.check(&measured)).collect();
        let deploy = checks.iter().all(|(holds, _)| *holds);
        let reason = if checks.is_empty() {
            "no deploy conditions: every version is deployed".to_string()
        } else {
            checks.into_iter().map(|(_, why)| why).collect::<Vec<_>>().join("; ")
        };
        let onnx = export::to_onnx(&self.spec, &outcome.model)?.encode_to_vec();
        // Registered and instantiated before it is recorded as deployed: a version that cannot
        // serve is never recorded as serving.
        let prepared = match deploy {
            true => Some(services.prepare_switch(&self.cfg.service, &self.version_name(next), &onnx)?),
            false => None,
        };
        let row = VersionRow {
            version: next,
            service: self.cfg.service.clone(),
            created_ms: now_ms(),
            parent: Some(parent),
            trigger: trigger.to_string(),
            new_samples: new.len() as u64,
            replayed: drawn.len() as u64,
            metrics: serde_json::json!({
                "accuracy": eval.accuracy,
                "loss": eval.loss,
                "serving_accuracy": serving_eval.accuracy,
                "serving_loss": serving_eval.loss,
                "accuracy_delta": eval.accuracy - serving_eval.accuracy,
                "loss_delta": eval.loss - serving_eval.loss,
                "train_loss": outcome.loss,
                "examples": outcome.examples,
            }),
            decision: if deploy { "deployed" } else { "kept" }.into(),
            reason: reason.clone(),
        };
        // Recorded, switched and shown as one step for readers of the versions (`versions`).
        let mut serving = lock(&self.serving);
        self.store.record_version(&row, &onnx, last_id)?;
        tracing::info!(
            service = %self.cfg.service, version = next, accuracy = eval.accuracy,
            serving_accuracy = serving_eval.accuracy, deployed = deploy, "incremental round: {reason}"
        );
        if let Some(prepared) = prepared {
            services.switch(prepared, &self.configured)?;
            *serving = Serving { version: next, weights: outcome.model, eval };
        }
        let mut status = lock(&self.status);
        status.rounds += 1;
        status.new_samples = self.store.new_samples_count()?;
        status.serving_version = serving.version;
        status.serving_model = services.serving_model(&self.cfg.service).unwrap_or_default();
        Ok(())
    }

    /// The serving version and every version recorded, read together (a round records and
    /// switches under the same lock).
    pub fn versions(&self) -> anyhow::Result<(u32, Vec<VersionRow>)> {
        let serving = lock(&self.serving);
        Ok((serving.version, self.store.versions()?))
    }

    /// Takes in one batch (an inbox file, an MQTT message) unless its content was taken in
    /// before. An error the batch causes is a [`super::services::BadRequest`] (refused for good);
    /// any other is of the moment, and after [`ATTEMPTS`] of those the batch is refused too.
    pub fn take_in(&self, replay: &ReplayBuffer, bytes: &[u8], name: &str) -> anyhow::Result<Taken> {
        let digest = content_digest(bytes);
        if self.store.inbox_ingested(&digest)? {
            return Ok(Taken::Duplicate);
        }
        let taken = parse_batch(bytes)
            .map_err(anyhow::Error::from)
            .and_then(|(x, y)| replay.offer(&x, &y, Some((&digest, name))));
        let mut attempts = lock(&self.attempts);
        match taken {
            Ok(report) => {
                attempts.remove(&digest);
                Ok(Taken::New(report))
            }
            Err(e) if is_bad_request(&e) => Err(e),
            Err(e) => {
                let n = attempts.entry(digest.clone()).or_insert(0);
                *n += 1;
                if *n >= ATTEMPTS {
                    attempts.remove(&digest);
                    return Err(super::services::BadRequest(format!("failed {ATTEMPTS} times, the last: {e:#}")).into());
                }
                Err(e)
            }
        }
    }

    /// The MQTT source and where it connects, if the job has one.
    pub fn mqtt(&self) -> Option<(&crate::protocol::MqttSource, &MqttTarget)> {
        self.cfg.mqtt.as_ref().zip(self.mqtt_target.as_ref())
    }

    /// Notes the MQTT subscription's state, and a batch taken in (`Some(true)`) or refused.
    pub fn note_mqtt(&self, state: Option<String>, taken: Option<bool>) {
        let mut status = lock(&self.status);
        if let Some(state) = state {
            status.mqtt = Some(state);
        }
        match taken {
            Some(true) => status.mqtt_taken += 1,
            Some(false) => status.mqtt_refused += 1,
            None => {}
        }
    }

    /// Takes in every `*.safetensors` file of the inbox (by name): into the buffer and the new
    /// samples, then to `done/`; a file that is refused goes to `failed/` with its error beside
    /// it. A file whose content was taken in before (a crash before the move) is only moved.
    fn take_inbox(&self, dir: &Path, replay: &ReplayBuffer) -> anyhow::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("inbox {}", dir.display())),
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        for path in files {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let bytes = std::fs::read(&path).with_context(|| format!("inbox file {}", path.display()))?;
            let to = match self.take_in(replay, &bytes, &name) {
                Ok(Taken::New(report)) => {
                    tracing::info!(file = %path.display(), kept = report.kept, offered = report.offered, "inbox: taken in");
                    lock(&self.status).inbox_taken += 1;
                    "done"
                }
                Ok(Taken::Duplicate) => "done",
                Err(e) if is_bad_request(&e) => {
                    tracing::warn!(file = %path.display(), "inbox: refused: {e:#}");
                    let failed = dir.join("failed");
                    std::fs::create_dir_all(&failed).with_context(|| format!("creating {}", failed.display()))?;
                    std::fs::write(failed.join(format!("{name}.error")), format!("{e:#}\n"))?;
                    lock(&self.status).inbox_failed += 1;
                    "failed"
                }
                Err(e) => return Err(e.context(format!("inbox file {}", path.display()))),
            };
            let to = dir.join(to);
            std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
            std::fs::rename(&path, to.join(&name))
                .with_context(|| format!("moving {} to {}", path.display(), to.display()))?;
        }
        Ok(())
    }
}

/// Checks the job every `check_ms` until the process ends; a failed check is logged, shown in
/// the status and tried again at the next one.
pub async fn run(services: Arc<Services>) {
    let Some(every) = services.incremental.as_ref().map(|j| Duration::from_millis(j.cfg.check_ms.max(10))) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let s = services.clone();
        let checked = tokio::task::spawn_blocking(move || match &s.incremental {
            Some(job) => job.check(&s),
            None => Ok(()),
        })
        .await;
        let error = match checked {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(format!("the check panicked: {e}")),
        };
        if let Some(e) = &error {
            tracing::warn!("incremental job: {e}");
        }
        if let Some(job) = &services.incremental {
            lock(&job.status).last_error = error;
        }
    }
}
