//! External trainers: the user's own program (PyTorch, NumPy, anything) trains and evaluates
//! the user's own model for the edge, which hands it each task and checks what comes back.
//!
//! The edge starts the program once (`[trainer]` in edge.toml) and keeps it between tasks, so a
//! framework's start-up (importing PyTorch takes seconds) is paid once, not every round. The
//! program connects to a Unix socket in the edge's state directory and speaks [`wire`]'s frames:
//! JSON messages, weights as safetensors. A trainer that crashes, hangs past
//! `task_timeout_secs`, breaks the protocol or returns weights that do not fit the model fails
//! the task with an error naming what it did; it is stopped and started again for the next task,
//! and the edge goes on.
//!
//! A job's client objective (e.g. FedProx's proximal term) still acts: during a fit the trainer
//! sends each step's gradients and the objective plugin adjusts them in the edge.
pub mod process;
pub mod wire;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::config::edge::TrainerConfig;
use crate::model_io::{self, NamedTensors};
use crate::runtime::{ObjectivePlugin, PluginError};
use crate::tensor::Tensor;
use process::TrainerProcess;
use wire::{EvaluateResult, FromTrainer, ToTrainer};
pub use wire::{SampleCounts, TaskInfo};

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("the trainer could not start: {0}")]
    Start(String),
    #[error("the trainer exited ({status}) during the task; its log ends: {log_tail}")]
    Exited { status: String, log_tail: String },
    #[error("the trainer did not finish the task within trainer.task_timeout_secs; it was stopped")]
    TimedOut,
    #[error("the task was cancelled")]
    Cancelled,
    #[error("the trainer broke the protocol: {0}")]
    Protocol(String),
    #[error("the trainer reported an error: {0}")]
    Refused(String),
    #[error("the trainer's result is refused: {0}")]
    BadResult(String),
    #[error("client objective: {0}")]
    Objective(#[from] PluginError),
}

/// What a trainer measured of a model on its test data.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub examples: u64,
    /// `metrics.accuracy`, if the trainer reports one.
    pub accuracy: Option<f64>,
    pub metrics: BTreeMap<String, f64>,
}

/// A fit's result, checked.
#[derive(Debug, Clone)]
pub struct FitOutcome {
    /// The trained weights, in the global model's tensor order.
    pub model: NamedTensors,
    pub examples: u64,
    pub metrics: BTreeMap<String, f64>,
    /// The global model's evaluation, when the task asked for one.
    pub evaluation: Option<Evaluation>,
    /// The client objective's extra loss at the trained weights (0 without one).
    pub penalty: f64,
}

/// Tensors of adjusted gradients, and names of the parameters they belong to, sent mid-fit.
const PARAM: &str = "param/";
const GRAD: &str = "grad/";

pub struct ExternalTrainer {
    process: TrainerProcess,
}

/// One trainer shared by the edge's federated-learning worker and its incremental job: it does
/// one task at a time.
pub type SharedTrainer = std::sync::Arc<std::sync::Mutex<ExternalTrainer>>;

/// A fit's inputs: the task, the model to start from and, for an incremental round, the samples
/// to train on.
pub struct FitRequest<'a> {
    pub task: &'a TaskInfo,
    pub global: &'a NamedTensors,
    /// `global` encoded as safetensors (what the trainer receives).
    pub global_bytes: &'a [u8],
    /// Evaluate `global` before training (on the trainer's own test data).
    pub evaluate_first: bool,
    /// Safetensors `x` and `y` ([`ToTrainer::Samples`]) and their counts.
    pub samples: Option<(&'a [u8], SampleCounts)>,
}

impl ExternalTrainer {
    /// `dir`: where the socket, the pid file and the trainer's log live.
    pub fn new(config: TrainerConfig, base: &Path, dir: &Path, node: &str) -> Result<ExternalTrainer, TrainerError> {
        Ok(ExternalTrainer { process: TrainerProcess::new(config, base, dir, node)? })
    }

    /// Has the trainer train `request.global`. A trainer that fails is stopped, except one that
    /// reported its own error cleanly (it waits for the next task).
    pub fn fit(
        &mut self,
        request: &FitRequest,
        objective: Option<&mut ObjectivePlugin>,
        cancel: &AtomicBool,
    ) -> Result<FitOutcome, TrainerError> {
        let out = self.fit_inner(request, objective, cancel);
        self.stop_unless_clean(&out);
        out
    }

    fn stop_unless_clean<T>(&mut self, out: &Result<T, TrainerError>) {
        if let Err(e) = out {
            if !matches!(e, TrainerError::Refused(_)) {
                self.process.stop();
            }
        }
    }

    fn fit_inner(
        &mut self,
        request: &FitRequest,
        mut objective: Option<&mut ObjectivePlugin>,
        cancel: &AtomicBool,
    ) -> Result<FitOutcome, TrainerError> {
        let &FitRequest { task, global, global_bytes, evaluate_first, samples } = request;
        let deadline = Instant::now() + self.process.task_timeout();
        // Weights, or parameters and gradients, of this model: room for twice its tensors.
        let max_payload = 2 * global_bytes.len() as u64 + (1 << 20);
        let log = self.process.log().to_path_buf();
        let running = self.process.connect(cancel)?;
        let fit =
            ToTrainer::Fit { task, evaluate_first, objective: objective.is_some(), samples: samples.map(|s| s.1) };
        running.send(&fit, global_bytes)?;
        if let Some((bytes, _)) = samples {
            running.send(&ToTrainer::Samples, bytes)?;
        }
        loop {
            let (message, payload) = running.receive::<FromTrainer>(deadline, cancel, max_payload, &log)?;
            match message {
                FromTrainer::AdjustGradients => {
                    let Some(obj) = objective.as_deref_mut() else {
                        return Err(TrainerError::Protocol(
                            "it sent adjust_gradients, but the job has no client objective".into(),
                        ));
                    };
                    let adjusted = adjust_gradients(obj, global, &payload)?;
                    let bytes = model_io::encode(&adjusted, None)
                        .map_err(|e| TrainerError::Protocol(format!("the adjusted gradients: {e}")))?;
                    running.send(&ToTrainer::Gradients, &bytes)?;
                }
                FromTrainer::FitResult { num_examples, metrics, evaluation } => {
                    let examples = num_examples
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("num_examples is missing or 0: the cloud weighs an update by it"))?;
                    check_metrics("metrics", &metrics)?;
                    let evaluation = match (evaluate_first, evaluation) {
                        (true, Some(e)) => Some(check_evaluation(e)?),
                        (true, None) => return Err(bad("the task asked for an evaluation and it sent none")),
                        (false, _) => None,
                    };
                    let model = check_weights(global, &payload)?;
                    let mut penalty = 0.0;
                    if let Some(obj) = objective {
                        for (name, t) in &model {
                            penalty += obj.penalty(name, t)?;
                        }
                    }
                    return Ok(FitOutcome { model, examples, metrics, evaluation, penalty });
                }
                FromTrainer::Error { message, kind } => return Err(refused(message, kind)),
                other => return Err(unexpected(&other, "fit_result")),
            }
        }
    }
}

fn bad(message: impl Into<String>) -> TrainerError {
    TrainerError::BadResult(message.into())
}

fn refused(message: String, kind: Option<String>) -> TrainerError {
    let message: String = message.chars().take(2000).collect();
    match kind {
        Some(kind) => TrainerError::Refused(format!("{}: {message}", kind.chars().take(100).collect::<String>())),
        None => TrainerError::Refused(message),
    }
}

pub(crate) fn kind_of(m: &FromTrainer) -> &'static str {
    match m {
        FromTrainer::Hello { .. } => "hello",
        FromTrainer::AdjustGradients => "adjust_gradients",
        FromTrainer::FitResult { .. } => "fit_result",
        FromTrainer::Error { .. } => "error",
    }
}

fn unexpected(m: &FromTrainer, wanted: &str) -> TrainerError {
    TrainerError::Protocol(format!("it sent {} where {wanted} was due", kind_of(m)))
}

fn check_metrics(what: &str, metrics: &BTreeMap<String, f64>) -> Result<(), TrainerError> {
    if metrics.len() > 64 {
        return Err(bad(format!("{what}: {} entries, at most 64", metrics.len())));
    }
    for (k, v) in metrics {
        if k.is_empty() || k.len() > 64 || k.chars().any(char::is_control) {
            return Err(bad(format!("{what}: a name of 1 to 64 printable characters, not {k:?}")));
        }
        if !v.is_finite() {
            return Err(bad(format!("{what}.{k} is {v}, not a finite number")));
        }
    }
    Ok(())
}

fn check_evaluation(e: EvaluateResult) -> Result<Evaluation, TrainerError> {
    if !(e.loss.is_finite() && e.loss >= 0.0) {
        return Err(bad(format!("the evaluation's loss is {}, not a finite number >= 0", e.loss)));
    }
    let examples = e.num_examples.ok_or_else(|| bad("the evaluation has no num_examples"))?;
    check_metrics("the evaluation's metrics", &e.metrics)?;
    let accuracy = e.metrics.get("accuracy").copied();
    if accuracy.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
        return Err(bad(format!("the evaluation's accuracy is {}, not in [0, 1]", accuracy.unwrap_or_default())));
    }
    Ok(Evaluation { loss: e.loss, examples, accuracy, metrics: e.metrics })
}

fn layout(t: &Tensor) -> String {
    format!("{:?}{:?}", t.dtype(), t.shape())
}

/// The trained weights, if they are exactly the global model's tensors (names, f32, shapes),
/// every value finite; in the global model's order.
fn check_weights(global: &NamedTensors, payload: &[u8]) -> Result<NamedTensors, TrainerError> {
    let mut trained: BTreeMap<String, Tensor> = model_io::decode(payload, Path::new("the trainer's weights"))
        .map_err(|e| bad(e.to_string()))?
        .into_iter()
        .collect();
    let missing: Vec<&str> =
        global.iter().map(|(n, _)| n.as_str()).filter(|n| !trained.contains_key(*n)).take(5).collect();
    let unknown: Vec<&str> =
        trained.keys().map(String::as_str).filter(|n| !global.iter().any(|(g, _)| g == n)).take(5).collect();
    if !missing.is_empty() || !unknown.is_empty() {
        return Err(bad(format!(
            "its tensors are not the model's: missing {missing:?}, not in the model {unknown:?} (first 5 of each)"
        )));
    }
    let mut model = Vec::with_capacity(global.len());
    for (name, g) in global {
        let t = trained.remove(name).expect("every name checked above");
        if t.dtype() != g.dtype() || t.shape() != g.shape() {
            return Err(bad(format!("tensor `{name}` is {}, the model's is {}", layout(&t), layout(g))));
        }
        if !t.all_finite() {
            return Err(bad(format!("tensor `{name}` has a value that is not finite (NaN or infinite)")));
        }
        model.push((name.clone(), t));
    }
    Ok(model)
}

/// Runs the client objective over the gradients a trainer sent mid-fit.
fn adjust_gradients(
    obj: &mut ObjectivePlugin,
    global: &NamedTensors,
    payload: &[u8],
) -> Result<NamedTensors, TrainerError> {
    let protocol = |m: String| TrainerError::Protocol(format!("adjust_gradients: {m}"));
    let mut sent: BTreeMap<String, Tensor> = model_io::decode(payload, Path::new("the trainer's gradients"))
        .map_err(|e| protocol(e.to_string()))?
        .into_iter()
        .collect();
    let names: Vec<String> = sent.keys().filter_map(|k| k.strip_prefix(GRAD)).map(str::to_string).collect();
    let mut adjusted = Vec::with_capacity(names.len());
    for name in names {
        let mut grad = sent.remove(&format!("{GRAD}{name}")).expect("listed above");
        let param = sent
            .remove(&format!("{PARAM}{name}"))
            .ok_or_else(|| protocol(format!("`{GRAD}{name}` without `{PARAM}{name}`")))?;
        let (_, g) = global
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| protocol(format!("`{name}` is not a tensor of the model")))?;
        for (what, t) in [("gradient", &grad), ("parameter", &param)] {
            if t.dtype() != g.dtype() || t.shape() != g.shape() {
                return Err(protocol(format!("the {what} of `{name}` is {}, the model's is {}", layout(t), layout(g))));
            }
            if !t.all_finite() {
                return Err(bad(format!("the {what} of `{name}` has a value that is not finite: training diverged")));
            }
        }
        obj.adjust_gradient(&name, &param, &mut grad)?;
        adjusted.push((name, grad));
    }
    if let Some(extra) = sent.keys().next() {
        return Err(protocol(format!("`{extra}` is neither `{PARAM}<name>` with its gradient nor `{GRAD}<name>`")));
    }
    Ok(adjusted)
}
