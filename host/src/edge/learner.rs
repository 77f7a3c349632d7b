//! Who fine-tunes an incremental job's model (`[incremental] learner`): nereid's own trainer,
//! for the models nereid exports, or the edge's `[trainer]` (the user's program), for any ONNX
//! classifier. Either way a version is an ONNX model and its weights; the job around it
//! (trigger, replay draw, evaluation against the serving version, deployment) is the same.
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context};
use nereid_onnx::Message;

use crate::config::edge::LearnerKind;
use crate::inference::{compress, export, initializers};
use crate::model_io::{self, NamedTensors};
use crate::tensor::{Buffer, Tensor};
use crate::train::{self, Dataset, Evaluation, ModelSpec, TrainParams};
use crate::trainer::{FitRequest, SampleCounts, SharedTrainer, TaskInfo};

pub enum Learner {
    /// nereid trains the architecture the model was exported from.
    Builtin(ModelSpec),
    /// The user's trainer trains the model's float32 initializers; ONNX Runtime evaluates.
    Trainer {
        trainer: SharedTrainer,
        /// The input's per-example shape (the samples' `x` rows take it).
        example_dims: Vec<u64>,
        shape: initializers::ClassifierShape,
        /// The configured model's trained tensors: a stored version must have the same.
        layout: Vec<(String, Vec<u64>)>,
    },
}

/// A fine-tuned version.
pub struct Tuned {
    pub weights: NamedTensors,
    pub onnx: Vec<u8>,
    /// The training loss the learner reports (the trainer's `loss` metric), if any.
    pub train_loss: Option<f64>,
    pub examples: u64,
}

/// One round's fine-tuning: where it starts and what it trains on.
pub struct Round<'a> {
    pub job: String,
    pub version: u32,
    pub node: &'a str,
    pub seed: u64,
    pub training: &'a TrainParams,
    pub start: &'a NamedTensors,
    /// The serving version's ONNX model (the trainer's result is written into its initializers).
    pub start_onnx: &'a [u8],
    pub data: &'a Dataset,
    pub new_samples: u64,
}

fn layout(weights: &NamedTensors) -> Vec<(String, Vec<u64>)> {
    weights.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect()
}

impl Learner {
    /// The learner of `kind` for the configured model `onnx`, and that model's weights.
    pub fn load(
        kind: LearnerKind,
        onnx: &[u8],
        trainer: Option<SharedTrainer>,
    ) -> anyhow::Result<(Learner, NamedTensors)> {
        match kind {
            LearnerKind::Builtin => {
                let (spec, weights) = export::from_onnx(onnx).context(
                    "learner = \"builtin\" trains only models nereid exported (learner = \"trainer\" trains any)",
                )?;
                Ok((Learner::Builtin(spec), weights))
            }
            LearnerKind::Trainer => {
                let trainer = trainer.context("learner = \"trainer\" needs [trainer] in edge.toml")?;
                let shape = initializers::classifier_shape(onnx)?;
                let (_, example_dims) = compress::example_input(onnx)?;
                let weights = initializers::float_initializers(onnx)?;
                Ok((Learner::Trainer { trainer, example_dims, shape, layout: layout(&weights) }, weights))
            }
        }
    }

    /// Floats per example.
    pub fn features(&self) -> usize {
        match self {
            Learner::Builtin(spec) => spec.input_len(),
            Learner::Trainer { shape, .. } => shape.features,
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            Learner::Builtin(spec) => spec.classes(),
            Learner::Trainer { shape, .. } => shape.classes,
        }
    }

    /// The weights of a stored version (`what` names it), if it is a version of this job's model.
    pub fn weights(&self, onnx: &[u8], what: &str) -> anyhow::Result<NamedTensors> {
        let (found, want, weights) = match self {
            Learner::Builtin(want) => {
                let (spec, weights) = export::from_onnx(onnx).with_context(|| what.to_string())?;
                (format!("{spec:?}"), format!("{want:?}"), weights)
            }
            Learner::Trainer { layout: want, .. } => {
                let weights = initializers::float_initializers(onnx).with_context(|| what.to_string())?;
                let found = layout(&weights);
                (format!("{found:?}"), format!("{want:?}"), weights)
            }
        };
        if found != want {
            bail!(
                "{what} is a {found}, the configured model a {want}: the job cannot go on from it (start it over \
                 with another `state`, or restore the model)"
            );
        }
        Ok(weights)
    }

    /// How a version does on `data`: nereid's own evaluation for built-in models, ONNX Runtime
    /// on the version's ONNX model for the trainer's (what serves is what is measured).
    pub fn evaluate(&self, onnx: &[u8], weights: &NamedTensors, data: &Dataset) -> anyhow::Result<Evaluation> {
        Ok(match self {
            Learner::Builtin(spec) => train::evaluate(spec, weights, data)?,
            Learner::Trainer { .. } => {
                let a = compress::evaluate(onnx, data, "the samples")?;
                Evaluation { accuracy: a.accuracy, loss: a.loss, examples: a.examples as u64 }
            }
        })
    }

    /// Fine-tunes the serving version on the round's data.
    pub fn fine_tune(&self, round: &Round) -> anyhow::Result<Tuned> {
        match self {
            Learner::Builtin(spec) => {
                let outcome = train::train(spec, round.start, round.data, round.training, round.seed, None, |_, _| {})?;
                let onnx = export::to_onnx(spec, &outcome.model)?.encode_to_vec();
                Ok(Tuned { weights: outcome.model, onnx, train_loss: Some(outcome.loss), examples: outcome.examples })
            }
            Learner::Trainer { trainer, example_dims, .. } => {
                let data = round.data;
                let n = data.len() as u64;
                let mut x_shape = vec![n];
                x_shape.extend_from_slice(example_dims);
                let x = Tensor::from_f32(x_shape, data.x.clone()).context("the samples' x")?;
                let y = Tensor::new(vec![n], Buffer::I64(data.y.iter().map(|&l| l as i64).collect()))
                    .context("the samples' y")?;
                let samples = model_io::encode(&[("x".to_string(), x), ("y".to_string(), y)], None)?;
                let start = model_io::encode(round.start, None)?;
                let task = TaskInfo {
                    job: round.job.clone(),
                    round: round.version,
                    node: round.node.to_string(),
                    seed: round.seed,
                    epochs: round.training.epochs,
                    batch_size: round.training.batch_size,
                    learning_rate: round.training.learning_rate,
                    optimizer: round.training.optimizer,
                    server_config: serde_json::json!({}),
                };
                let counts =
                    SampleCounts { examples: n, new: round.new_samples, replayed: n.saturating_sub(round.new_samples) };
                let request = FitRequest {
                    task: &task,
                    global: round.start,
                    global_bytes: &start,
                    evaluate_first: false,
                    samples: Some((&samples, counts)),
                };
                // Nothing cancels a round: a trainer that hangs is stopped at its task limit.
                let outcome = crate::lock(trainer)
                    .fit(&request, None, &AtomicBool::new(false))
                    .with_context(|| format!("the trainer fine-tuning version {}", round.version))?;
                let onnx = initializers::with_initializers(round.start_onnx, &outcome.model)?;
                let train_loss = outcome.metrics.get("loss").or(outcome.metrics.get("train_loss")).copied();
                Ok(Tuned { weights: outcome.model, onnx, train_loss, examples: outcome.examples })
            }
        }
    }
}
