//! The traits a plugin implements, one per slot.
use crate::{Aggregate, Config, ConfigEntry, Info, Model, NamedTensor, PluginError, RoundContext, Tensor, Update};

/// What every plugin implements: its description and its configuration.
///
/// The host creates one instance per slot it loads the plugin into, calls `configure` once with
/// the plugin's table from the job TOML (keys and types already checked against `info()`'s
/// schema, defaults filled in), then the slot's calls.
pub trait Plugin: Default + 'static {
    fn info() -> Info;

    fn configure(&mut self, _config: &Config) -> Result<(), PluginError> {
        Ok(())
    }
}

/// Slot `aggregator`: turns the updates of a round into the next global model, as a fold.
pub trait Aggregator: Plugin {
    /// A round starts; `global` is the current global model (None before the first round).
    fn begin_round(&mut self, ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError>;

    /// Folds one update in. Return `PluginError::rejected` (and leave the state as it was) to
    /// refuse it; the host reports it under the update's name and goes on.
    fn accumulate(&mut self, update: Update) -> Result<(), PluginError>;

    /// The round ends: return the next global model.
    fn finish(&mut self) -> Result<Aggregate, PluginError>;

    /// Values the host publishes to clients with the global model.
    fn client_config(&self) -> Vec<ConfigEntry> {
        Vec::new()
    }
}

/// Slot `client-objective`: extra terms in the local objective during training on an edge.
pub trait ClientObjective: Plugin {
    /// Local training of a round starts from `global`; `server` holds what the aggregator
    /// published (`Aggregator::client_config`).
    fn begin_training(&mut self, ctx: &RoundContext, global: Model, server: &Config) -> Result<(), PluginError>;

    /// The extra loss contributed by parameter `name` at its current value.
    fn penalty(&mut self, name: &str, weight: &Tensor) -> Result<f64, PluginError>;

    /// Adds the extra term's gradient for parameter `name` to `gradient` in place.
    fn adjust_gradient(&mut self, name: &str, weight: &Tensor, gradient: &Tensor) -> Result<(), PluginError>;
}

/// Where an inference is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The edge's own result stands.
    Edge,
    /// A hard example: the cloud's bigger model answers it.
    Cloud,
}

/// A router's decision, with the policy's score (e.g. a confidence) for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub route: Route,
    pub score: f64,
}

/// Slot `router` (joint inference): decides from the edge model's output whether the edge's
/// answer stands or the example goes to the cloud.
pub trait Router: Plugin {
    fn decide(&mut self, output: &Tensor) -> Result<Decision, PluginError>;
}

/// How the edge reaches the cloud, as measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub bandwidth_mbit_s: f64,
    pub rtt_ms: f64,
}

/// A set of tensors that separates a model's inputs from its outputs, with its predicted
/// end-to-end latency.
#[derive(Debug, Clone, PartialEq)]
pub struct CutPoint {
    pub tensors: Vec<String>,
    pub predicted_ms: f64,
}

/// Slot `splitter` (split inference): where to cut one model between edge and cloud.
pub trait Splitter: Plugin {
    /// The valid cuts of an ONNX model with their predicted latencies, best first. `profile` is
    /// the host's measurements as JSON (per-node milliseconds on each side, tensor sizes).
    fn plan(&mut self, model: &[u8], profile: &str, link: Link) -> Result<Vec<CutPoint>, PluginError>;

    /// The head (edge) and tail (cloud) ONNX models of a cut; an empty half is empty bytes (no
    /// head for the cloud-only cut, no tail for the edge-only one).
    fn partition(&mut self, model: &[u8], cut: &[String]) -> Result<(Vec<u8>, Vec<u8>), PluginError>;
}

/// One input of a model, as an [`Adapter`] is told of it.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub dtype: crate::DType,
    /// Outermost first; `None` for a dimension the model leaves open (e.g. the batch).
    pub shape: Vec<Option<u64>>,
}

/// Slot `adapter`: turns a raw payload (an image file, a sensor frame) into a model's inputs.
pub trait Adapter: Plugin {
    /// One tensor per input of `inputs`, from `payload` sent with `content_type`.
    fn decode(
        &mut self,
        content_type: &str,
        payload: &[u8],
        inputs: &[InputSpec],
    ) -> Result<Vec<crate::TensorData>, PluginError>;
}

/// A sample as a [`Sampler`] sees it: its id in the node's store and its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRef {
    pub id: u64,
    pub label: i64,
}

/// What a [`Sampler`] does with an offered sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Keep it, evicting the buffered sample with this id if one is given.
    Keep(Option<u64>),
    Discard,
}

/// Slot `sampler` (a replay buffer's policy): which arriving samples the buffer keeps, which it
/// evicts for them, and which a training batch draws. The host stores the samples; the plugin
/// sees ids and labels.
pub trait Sampler: Plugin {
    /// Rebuilds the state after a restart from what the buffer holds and how many samples were
    /// offered so far.
    fn restore(&mut self, held: &[SampleRef], offered: u64) -> Result<(), PluginError>;
    /// A new sample arrives.
    fn offer(&mut self, sample: SampleRef) -> Result<Admission, PluginError>;
    /// Ids of buffered samples for a training batch of `count`.
    fn draw(&mut self, ctx: &RoundContext, count: u32) -> Result<Vec<u64>, PluginError>;
}

/// Slot `compressor`: encodes updates before upload and decodes them on the receiving side, and
/// rewrites models (quantization, pruning).
pub trait Compressor: Plugin {
    /// What travels instead of `update` (e.g. INT8 values and their scales). State kept between
    /// calls (an error-feedback residual) belongs to the sending node's instance.
    fn encode(&mut self, ctx: &RoundContext, update: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError>;
    /// Inverts `encode` on the receiving side.
    fn decode(&mut self, ctx: &RoundContext, payload: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError>;
    /// Rewrites an ONNX model. `calibration` holds sample inputs (named model inputs, one list
    /// per sample) for passes that measure activation ranges; [`crate::nn::run_onnx`] runs a
    /// model on them natively.
    fn rewrite_model(&mut self, model: &[u8], calibration: Vec<Vec<NamedTensor>>) -> Result<Vec<u8>, PluginError>;
}
