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
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use super::error::{is_bad_request, BadRequest};
use super::learner::{Learner, Round};
use super::replay::{parse_batch, to_dataset, OfferReport, Origin, ReplayBuffer, Trainable};
use super::services::Services;
use crate::config::edge::{EdgeConfig, IncrementalConfig, MqttSource, ServiceKind};
use crate::lock;
use crate::model_io::NamedTensors;
use crate::protocol::VersionList;
use crate::protocol::VersionRow;
use crate::runtime::{content_digest, RoundContext};
use crate::store::{now_ms, EdgeStore};
use crate::train::{Dataset, Evaluation};
use crate::trainer::SharedTrainer;

/// The version that serves: its model and weights (what the next round starts from) and how
/// it does on the eval set (what a new version is compared with).
struct Serving {
    version: u32,
    onnx: Vec<u8>,
    weights: NamedTensors,
    eval: Evaluation,
}

/// What the job is doing, for `GET /v1/incremental`.
#[derive(Debug, Clone, Serialize)]
pub struct IncrementalStatus {
    pub service: String,
    pub serving_version: u32,
    /// The model the service answers with (`<model>@v<version>` once a round was deployed).
    pub serving_model: String,
    /// Samples arrived since the last round.
    pub new_samples: u64,
    #[serde(flatten)]
    pub activity: Activity,
}

/// What the checks, the inbox and the MQTT source did so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Activity {
    /// What the last check found: why no round started, or what started the last one.
    pub trigger: String,
    pub checks: u64,
    pub rounds: u64,
    pub inbox_taken: u64,
    pub inbox_failed: u64,
    /// Rounds that failed (the learner or the store); the next attempt waits longer each time.
    pub failed_rounds: u64,
    /// The MQTT subscription's state (connected and subscribed, or why not), if there is one.
    pub mqtt: Option<String>,
    pub mqtt_taken: u64,
    pub mqtt_refused: u64,
    /// The last check's error, if it failed (it is tried again at the next check).
    pub last_error: Option<String>,
}

pub struct IncrementalJob {
    cfg: IncrementalConfig,
    /// The service's configured model (version 0) and its ONNX bytes.
    configured: String,
    configured_onnx: Vec<u8>,
    learner: Learner,
    /// This node's name (what the trainer is told).
    node: String,
    eval: Dataset,
    inbox: Option<PathBuf>,
    store: Arc<EdgeStore>,
    serving: Mutex<Serving>,
    activity: Mutex<Activity>,
    /// Failed attempts per batch (content digest) that failed for a reason of the moment; at
    /// [`ATTEMPTS`] the batch is refused for good, so one batch a plugin always traps on cannot
    /// hold up the others.
    attempts: Mutex<HashMap<String, u32>>,
    /// Where the MQTT source connects, checked at load.
    mqtt_target: Option<MqttTarget>,
    /// Rounds failed in a row, when the next may start, and the last one's error.
    backoff: Mutex<Backoff>,
}

#[derive(Default)]
struct Backoff {
    failed: u32,
    not_before: Option<Instant>,
    error: String,
}

/// Longest wait after failed rounds before the next attempt.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The broker of `[incremental.mqtt]`, the session's client id, and the TLS of `mqtts://`.
#[derive(Debug, Clone)]
pub struct MqttTarget {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// How often a batch is tried before it is refused for good.
pub const ATTEMPTS: u32 = 5;

/// What became of a batch.
pub enum Taken {
    New(OfferReport),
    /// Its content was taken in before (a redelivery).
    Duplicate,
}

/// The samples arrived since the last round, read once per check that needs them.
struct NewSamples {
    ids: Vec<u64>,
    data: Dataset,
}

impl IncrementalJob {
    /// Reads the job's model (the service's configured one) and eval set; nothing runs yet.
    pub fn load(
        cfg: &IncrementalConfig,
        edge: &EdgeConfig,
        base: &Path,
        store: Arc<EdgeStore>,
        trainer: Option<SharedTrainer>,
    ) -> anyhow::Result<IncrementalJob> {
        let service = edge
            .services
            .get(&cfg.service)
            .with_context(|| format!("service: there is no [services.{}] in edge.toml", cfg.service))?;
        if service.kind != ServiceKind::Joint {
            bail!("service: `{}` is not a joint service", cfg.service);
        }
        let models = edge.models.as_ref().context("`models` (the model directory) is not set in edge.toml")?;
        let path = base.join(models).join(&service.model).join("model.onnx");
        let onnx = crate::files::read_limited(&path, crate::files::MAX_MODEL_BYTES)
            .with_context(|| format!("service: reading {}", path.display()))?;
        let (learner, weights) =
            Learner::load(cfg.learner, &onnx, trainer).with_context(|| format!("service: {}", path.display()))?;
        let eval_dir = base.join(&cfg.eval);
        let eval = Dataset::load(&eval_dir, "test").context("eval")?;
        eval.check(&format!("eval {}", eval_dir.display()), learner.features(), learner.classes()).context("eval")?;
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
                let (secure, address) = match m.broker.split_once("://") {
                    Some(("mqtts", rest)) => (true, rest),
                    Some(("mqtt", rest)) => (false, rest),
                    Some((scheme, _)) => bail!("mqtt.broker: `{scheme}://` is neither mqtt:// nor mqtts://"),
                    None => (false, m.broker.as_str()),
                };
                let (host, port) = address
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
                let tls = if secure {
                    Some(Arc::new(m.tls.config().context("mqtt.tls")?))
                } else {
                    nereid_net::tls::check_plaintext(
                        "the MQTT source",
                        address,
                        edge.allow_plaintext,
                        "allow_plaintext = true, or mqtts://",
                    )
                    .context("mqtt.broker")?;
                    None
                };
                Some(MqttTarget { host, port, client_id, tls })
            }
        };
        let t = &cfg.training;
        if t.epochs == 0 || t.batch_size == 0 || !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            bail!("training: epochs and batch_size must be at least 1, learning_rate above 0");
        }
        Ok(IncrementalJob {
            cfg: cfg.clone(),
            configured: service.model.clone(),
            // Version 0 until `resume` reads the store (and measures what serves).
            serving: Mutex::new(Serving {
                version: 0,
                onnx: onnx.clone(),
                weights,
                eval: Evaluation { accuracy: 0.0, loss: 0.0, examples: 0 },
            }),
            configured_onnx: onnx,
            learner,
            node: edge.name.clone(),
            eval,
            inbox: cfg.inbox.as_ref().map(|d| base.join(d)),
            store,
            activity: Mutex::new(Activity {
                trigger: "not checked yet".into(),
                mqtt: cfg.mqtt.as_ref().map(|_| "not connected yet".to_string()),
                ..Activity::default()
            }),
            attempts: Mutex::default(),
            mqtt_target,
            backoff: Mutex::default(),
        })
    }

    /// What the job's model trains on: the samples the buffer must take from now on.
    pub fn trainable(&self) -> Trainable {
        Trainable { layout: format!("f32[{}]", self.learner.features()), classes: self.learner.classes() as i64 }
    }

    /// Picks up where the store left off: records the configured model as version 0 the first
    /// time, and makes the newest deployed version serve.
    pub fn resume(&self, services: &Services) -> anyhow::Result<()> {
        let stored = self.store.serving_version()?;
        let (version, onnx, weights) = match &stored {
            None => {
                let s = lock(&self.serving);
                (0, s.onnx.clone(), s.weights.clone())
            }
            Some((version, onnx)) => {
                let what = format!("model version {version} (in `state`) of [services.{}]", self.cfg.service);
                (*version, onnx.clone(), self.learner.weights(onnx, &what)?)
            }
        };
        let eval = self.learner.evaluate(&onnx, &weights, &self.eval)?;
        match &stored {
            None => {
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
                self.store.record_version(&row, &self.configured_onnx, None)?;
            }
            Some((version, onnx)) if *version > 0 => {
                services.switch(services.prepare_switch(&self.cfg.service, &self.version_name(*version), onnx)?);
            }
            Some(_) => {}
        }
        *lock(&self.serving) = Serving { version, onnx, weights, eval };
        tracing::info!(service = %self.cfg.service, version, accuracy = eval.accuracy, "incremental job: serving version");
        Ok(())
    }

    /// The name version `version` is registered under (version 0 is the configured model).
    fn version_name(&self, version: u32) -> String {
        match version {
            0 => self.configured.clone(),
            v => format!("{}@v{v}", self.configured),
        }
    }

    pub fn status(&self) -> anyhow::Result<IncrementalStatus> {
        let version = lock(&self.serving).version;
        Ok(IncrementalStatus {
            service: self.cfg.service.clone(),
            serving_version: version,
            serving_model: self.version_name(version),
            new_samples: self.store.new_samples_count()?,
            activity: lock(&self.activity).clone(),
        })
    }

    fn load_new_samples(&self) -> anyhow::Result<NewSamples> {
        let samples = self.store.new_samples()?;
        let data = to_dataset(&samples, self.learner.features())?;
        Ok(NewSamples { ids: samples.into_iter().map(|s| s.0).collect(), data })
    }

    /// One check: takes in the inbox, evaluates the trigger, runs a round if it holds.
    pub fn check(&self, services: &Services, replay: &ReplayBuffer) -> anyhow::Result<()> {
        lock(&self.activity).checks += 1;
        // A file that fails for a reason of the moment (the store, the plugin) stays in the inbox
        // for the next check; the samples already here still get their round.
        let inbox_failure = self.inbox.as_ref().and_then(|inbox| self.take_inbox(inbox, replay).err());
        {
            let backoff = lock(&self.backoff);
            let left = backoff.not_before.map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()));
            if !left.is_zero() {
                lock(&self.activity).trigger = format!(
                    "{} failed round(s) in a row, the next in {:.1} s; the last: {}",
                    backoff.failed,
                    left.as_secs_f64(),
                    backoff.error
                );
                return inbox_failure.map_or(Ok(()), Err);
            }
        }
        let mut new = None;
        match self.trigger(&mut new)? {
            Err(waiting) => lock(&self.activity).trigger = waiting,
            Ok(fired) => {
                lock(&self.activity).trigger = format!("round started: {fired}");
                let new = match new {
                    Some(n) => n,
                    None => self.load_new_samples()?,
                };
                let done = self.round(services, replay, new, &fired);
                let mut backoff = lock(&self.backoff);
                match &done {
                    Ok(()) => *backoff = Backoff::default(),
                    Err(e) => {
                        lock(&self.activity).failed_rounds += 1;
                        let failed = backoff.failed.saturating_add(1);
                        let wait = Duration::from_millis(self.cfg.check_ms.max(10))
                            .saturating_mul(1 << failed.min(16))
                            .min(MAX_BACKOFF);
                        *backoff = Backoff { failed, not_before: Some(Instant::now() + wait), error: format!("{e:#}") };
                    }
                }
                done?;
            }
        }
        inbox_failure.map_or(Ok(()), Err)
    }

    /// `Ok(reason)` when a round should start, `Err(why not)` when not. The new samples, if it
    /// had to read them, are left in `new` for the round.
    fn trigger(&self, new: &mut Option<NewSamples>) -> anyhow::Result<Result<String, String>> {
        let t = &self.cfg.trigger;
        let pending = self.store.new_samples_count()?;
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
            let samples = new.insert(self.load_new_samples()?);
            let serving = lock(&self.serving);
            let on_new = self.learner.evaluate(&serving.onnx, &serving.weights, &samples.data)?.accuracy;
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
    fn round(&self, services: &Services, replay: &ReplayBuffer, new: NewSamples, trigger: &str) -> anyhow::Result<()> {
        let NewSamples { ids, mut data } = new;
        let next = self.store.next_version()?;
        let seed = self.cfg.seed.wrapping_add(next as u64);
        let ctx = RoundContext { job: format!("incremental/{}", self.cfg.service), round: next, seed };
        let count = self.cfg.replay_draw.unwrap_or(ids.len().min(u32::MAX as usize) as u32);
        // The buffer took the new samples in too: those are in the round already.
        let fresh: HashSet<u64> = ids.iter().copied().collect();
        let drawn: Vec<_> = replay.draw(&ctx, count)?.into_iter().filter(|s| !fresh.contains(&s.0)).collect();
        let replayed = to_dataset(&drawn, self.learner.features()).context("a sample drawn from the replay buffer")?;
        data.x.extend_from_slice(&replayed.x);
        data.y.extend_from_slice(&replayed.y);
        let (parent, start, start_onnx, serving_eval) = {
            let s = lock(&self.serving);
            (s.version, s.weights.clone(), s.onnx.clone(), s.eval)
        };
        let outcome = self.learner.fine_tune(&Round {
            job: ctx.job.clone(),
            version: next,
            node: &self.node,
            seed,
            training: &self.cfg.training,
            start: &start,
            start_onnx: &start_onnx,
            data: &data,
            new_samples: ids.len() as u64,
        })?;
        let eval = self.learner.evaluate(&outcome.onnx, &outcome.weights, &self.eval)?;
        let measured = crate::config::trigger::Measured {
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
        let onnx = outcome.onnx;
        // Registered and instantiated before it is recorded as deployed: a version that cannot
        // serve is never recorded as serving.
        let prepared =
            deploy.then(|| services.prepare_switch(&self.cfg.service, &self.version_name(next), &onnx)).transpose()?;
        let row = VersionRow {
            version: next,
            service: self.cfg.service.clone(),
            created_ms: now_ms(),
            parent: Some(parent),
            trigger: trigger.to_string(),
            new_samples: ids.len() as u64,
            replayed: drawn.len() as u64,
            metrics: serde_json::json!({
                "accuracy": eval.accuracy,
                "loss": eval.loss,
                "serving_accuracy": serving_eval.accuracy,
                "serving_loss": serving_eval.loss,
                "accuracy_delta": eval.accuracy - serving_eval.accuracy,
                "loss_delta": eval.loss - serving_eval.loss,
                "train_loss": outcome.train_loss,
                "examples": outcome.examples,
            }),
            decision: if deploy { "deployed" } else { "kept" }.into(),
            reason: reason.clone(),
        };
        // Recorded, switched and shown as one step for readers of the versions (`versions`).
        let mut serving = lock(&self.serving);
        self.store.record_version(&row, &onnx, ids.last().copied())?;
        tracing::info!(
            service = %self.cfg.service, version = next, accuracy = eval.accuracy,
            serving_accuracy = serving_eval.accuracy, deployed = deploy, "incremental round: {reason}"
        );
        if let Some(prepared) = prepared {
            services.switch(prepared);
            *serving = Serving { version: next, onnx, weights: outcome.weights, eval };
        }
        lock(&self.activity).rounds += 1;
        Ok(())
    }

    /// The serving version and every version recorded, read together (a round records and
    /// switches under the same lock).
    pub fn versions(&self) -> anyhow::Result<VersionList> {
        let serving = lock(&self.serving);
        Ok(VersionList { serving_version: serving.version, versions: self.store.versions()? })
    }

    /// Takes in one batch (an inbox file, an MQTT message) unless its content was taken in
    /// before. An error the batch causes is a [`BadRequest`] (refused for good);
    /// any other is of the moment, and after [`ATTEMPTS`] of those the batch is refused too.
    pub fn take_in(&self, replay: &ReplayBuffer, bytes: &[u8], name: &str) -> anyhow::Result<Taken> {
        let digest = content_digest(bytes);
        if self.store.inbox_ingested(&digest)? {
            return Ok(Taken::Duplicate);
        }
        let taken = parse_batch(bytes)
            .map_err(anyhow::Error::from)
            .and_then(|(x, y)| replay.offer(&x, &y, Origin::Content { digest: &digest, name }));
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
                    return Err(BadRequest(format!("failed {ATTEMPTS} times, the last: {e:#}")).into());
                }
                Err(e)
            }
        }
    }

    /// The MQTT source and where it connects, if the job has one.
    pub fn mqtt(&self) -> Option<(&MqttSource, &MqttTarget)> {
        self.cfg.mqtt.as_ref().zip(self.mqtt_target.as_ref())
    }

    /// Notes the MQTT subscription's state, and a batch taken in (`Some(true)`) or refused.
    pub fn note_mqtt(&self, state: Option<String>, taken: Option<bool>) {
        let mut activity = lock(&self.activity);
        if let Some(state) = state {
            activity.mqtt = Some(state);
        }
        match taken {
            Some(true) => activity.mqtt_taken += 1,
            Some(false) => activity.mqtt_refused += 1,
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
            // A file that is not a regular one or too large is refused like a malformed one.
            let taken = match crate::files::read_limited(&path, super::replay::MAX_BATCH_BYTES) {
                Ok(bytes) => self.take_in(replay, &bytes, &name),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(BadRequest(e.to_string()).into()),
                Err(e) => return Err(e).with_context(|| format!("inbox file {}", path.display())),
            };
            let to = match taken {
                Ok(Taken::New(report)) => {
                    tracing::info!(file = %path.display(), kept = report.kept, offered = report.offered, "inbox: taken in");
                    lock(&self.activity).inbox_taken += 1;
                    "done"
                }
                Ok(Taken::Duplicate) => "done",
                Err(e) if is_bad_request(&e) => {
                    tracing::warn!(file = %path.display(), "inbox: refused: {e:#}");
                    let failed = dir.join("failed");
                    std::fs::create_dir_all(&failed).with_context(|| format!("creating {}", failed.display()))?;
                    std::fs::write(failed.join(format!("{name}.error")), format!("{e:#}\n"))?;
                    lock(&self.activity).inbox_failed += 1;
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
pub async fn run(job: Arc<IncrementalJob>, services: Arc<Services>, replay: Arc<ReplayBuffer>) {
    let every = Duration::from_millis(job.cfg.check_ms.max(10));
    loop {
        tokio::time::sleep(every).await;
        let (j, s, r) = (job.clone(), services.clone(), replay.clone());
        let checked = tokio::task::spawn_blocking(move || j.check(&s, &r)).await;
        let error = match checked {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(format!("the check panicked: {e}")),
        };
        if let Some(e) = &error {
            tracing::warn!("incremental job: {e}");
        }
        lock(&job.activity).last_error = error;
    }
}
