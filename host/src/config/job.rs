//! Federated-learning jobs in TOML: the schema, the one check of a job's settings (for the CLI
//! and the cloud's API alike), and loading a job file with its plugins, whose errors name the
//! file, the line and the key (syntax, unknown keys, types, ranges, plugin files, plugin
//! configurations).
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::reader::{bad, parse, read, ConfigError, FieldError, Source};
use crate::runtime::config::ConfigTable;
use crate::runtime::Fetched;
use crate::runtime::{
    AggregatorPlugin, CompressorPlugin, Limits, ObjectivePlugin, PluginError, Runtime, SamplerPlugin,
};
use crate::train::{ModelSpec, OptimizerKind, TrainParams};

/// A job file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub job: JobSection,
    #[serde(default)]
    pub rounds: RoundsSection,
    pub stop: StopSection,
    pub model: ModelSpec,
    #[serde(default)]
    pub training: TrainingSection,
    pub aggregator: AggregatorSection,
    pub client_objective: Option<PluginSection>,
    /// Encodes each update on its edge before upload and decodes it on the cloud (e.g. INT8 or
    /// top-k); edges then send the difference to the global model.
    pub compressor: Option<PluginSection>,
    /// Differential privacy's accounting: epsilon after every round, and a budget.
    pub privacy: Option<PrivacySection>,
    /// A sampler plugin that picks each round's nodes among those online (default: uniform).
    pub client_selection: Option<PluginSection>,
}

/// `[aggregator]`: the plugin that folds the clients' updates, and the stages after it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorSection {
    pub plugin: Spanned<String>,
    pub follow_tag: Option<Spanned<bool>>,
    #[serde(default)]
    pub config: BTreeMap<Spanned<String>, toml::Value>,
    pub timeout_ms: Option<u64>,
    pub memory_mib: Option<usize>,
    /// Aggregators run after this one, in order, each on the model the one before produced (its
    /// only update), e.g. a differentially private mean then FedAdam's server step.
    #[serde(default)]
    pub then: Vec<PluginSection>,
}

impl AggregatorSection {
    /// The first stage as a plain plugin section.
    fn first(&self) -> PluginSection {
        PluginSection {
            plugin: self.plugin.clone(),
            follow_tag: self.follow_tag.clone(),
            config: self.config.clone(),
            timeout_ms: self.timeout_ms,
            memory_mib: self.memory_mib,
        }
    }
}

/// `[privacy]`: the (epsilon, delta) a job's differentially private rounds spend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// The delta at which epsilon is reported.
    pub delta: f64,
    /// The job stops when its next round would take epsilon past this.
    pub epsilon_budget: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Unique name of the job on its cloud.
    pub name: String,
    /// Seed of the initial model, client selection and local shuffling.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsSection {
    /// Fewest clients a round runs with.
    pub min_clients: usize,
    /// Share of the available clients selected each round (at least `min_clients`).
    pub fraction: f64,
    /// Seconds after which a round closes with the updates that arrived (if at least
    /// `min_clients` did).
    pub deadline_secs: f64,
    /// The most examples one update may claim (an update claiming more is refused): an
    /// update's weight in the aggregate is its example count, so this bounds what one node weighs.
    pub max_examples: u64,
}

impl Default for RoundsSection {
    fn default() -> Self {
        RoundsSection { min_clients: 1, fraction: 1.0, deadline_secs: 60.0, max_examples: DEFAULT_MAX_EXAMPLES }
    }
}

/// Default `[rounds] max_examples`.
pub const DEFAULT_MAX_EXAMPLES: u64 = 1_000_000_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StopSection {
    /// Rounds to run at most.
    pub rounds: u32,
    /// Stop once the clients' weighted accuracy of the global model reaches this.
    pub target_accuracy: Option<f64>,
    /// Stop after this many seconds of wall time.
    pub wall_secs: Option<f64>,
}

/// Training parameters, and per-node overrides (heterogeneous devices).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: OptimizerKind,
    pub nodes: BTreeMap<String, TrainingOverride>,
}

impl Default for TrainingSection {
    fn default() -> Self {
        let d = TrainParams::default();
        TrainingSection {
            epochs: d.epochs,
            batch_size: d.batch_size,
            learning_rate: d.learning_rate,
            optimizer: d.optimizer,
            nodes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingOverride {
    pub epochs: Option<u32>,
    pub batch_size: Option<usize>,
    pub learning_rate: Option<f64>,
    pub optimizer: Option<OptimizerKind>,
}

impl TrainingSection {
    /// The parameters node `node` trains with.
    pub fn for_node(&self, node: &str) -> TrainParams {
        let o = self.nodes.get(node).cloned().unwrap_or_default();
        TrainParams {
            epochs: o.epochs.unwrap_or(self.epochs),
            batch_size: o.batch_size.unwrap_or(self.batch_size),
            learning_rate: o.learning_rate.unwrap_or(self.learning_rate),
            optimizer: o.optimizer.unwrap_or(self.optimizer),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    /// The component: a path relative to the job file, or `oci://host[:port]/repo:tag` /
    /// `oci://host[:port]/repo@sha256:<hex>`.
    pub plugin: Spanned<String>,
    /// With an `oci://` tag: swap the plugin when the tag moves (checked at each round boundary).
    pub follow_tag: Option<Spanned<bool>>,
    /// The plugin's own options, checked against its schema and by the plugin.
    #[serde(default)]
    pub config: BTreeMap<Spanned<String>, toml::Value>,
    pub timeout_ms: Option<u64>,
    pub memory_mib: Option<usize>,
}

/// A plugin as the cloud and the edges get it: pinned by digest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginRef {
    /// The component's content digest.
    pub digest: String,
    /// The `oci://` reference as the job names it (absent for a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `source` pinned to a manifest digest: what every node pulls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Re-resolve `source` at each round boundary and swap when it moved.
    #[serde(default)]
    pub follow_tag: bool,
    pub config: ConfigTable,
    pub limits: Limits,
}

/// A validated job, as sent to the cloud.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub seed: u64,
    pub rounds: RoundsSection,
    pub stop: StopSection,
    pub model: ModelSpec,
    pub training: TrainingSection,
    pub aggregator: PluginRef,
    /// `aggregator.then`: the stages after the aggregator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregator_then: Vec<PluginRef>,
    pub client_objective: Option<PluginRef>,
    #[serde(default)]
    pub compressor: Option<PluginRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_selection: Option<PluginRef>,
}

impl JobSpec {
    /// The job's plugins with their table names: the aggregator and its stages, then the client
    /// objective and the compressor if there are.
    pub fn plugins(&self) -> impl Iterator<Item = (String, &PluginRef)> {
        std::iter::once(("aggregator".to_string(), &self.aggregator))
            .chain(self.aggregator_then.iter().enumerate().map(|(i, p)| (format!("aggregator.then[{i}]"), p)))
            .chain(self.client_objective.as_ref().map(|p| ("client_objective".to_string(), p)))
            .chain(self.compressor.as_ref().map(|p| ("compressor".to_string(), p)))
            .chain(self.client_selection.as_ref().map(|p| ("client_selection".to_string(), p)))
    }

    pub fn plugins_mut(&mut self) -> impl Iterator<Item = (String, &mut PluginRef)> {
        std::iter::once(("aggregator".to_string(), &mut self.aggregator))
            .chain(self.aggregator_then.iter_mut().enumerate().map(|(i, p)| (format!("aggregator.then[{i}]"), p)))
            .chain(self.client_objective.as_mut().map(|p| ("client_objective".to_string(), p)))
            .chain(self.compressor.as_mut().map(|p| ("compressor".to_string(), p)))
            .chain(self.client_selection.as_mut().map(|p| ("client_selection".to_string(), p)))
    }

    /// Every aggregator stage: the aggregator, then `aggregator.then`.
    pub fn aggregator_chain(&self) -> impl Iterator<Item = &PluginRef> {
        std::iter::once(&self.aggregator).chain(&self.aggregator_then)
    }
}

/// What a job's settings may ask at most (the model's own caps are in [`crate::train::model`]).
pub mod caps {
    pub const EPOCHS: u32 = 10_000;
    pub const BATCH_SIZE: usize = 1 << 16;
    pub const LEARNING_RATE: f64 = 100.0;
    pub const MIN_CLIENTS: usize = 1_000_000;
    pub const DEADLINE_SECS: f64 = 7.0 * 86_400.0;
    pub const ROUNDS: u32 = 1_000_000;
    pub const WALL_SECS: f64 = 366.0 * 86_400.0;
    pub const MAX_EXAMPLES: u64 = 1 << 40;
    pub const NODE_OVERRIDES: usize = 100_000;
    /// Activation elements of one training batch (4 GiB as f32).
    pub const BATCH_ACTIVATIONS: u128 = 1 << 30;
}

/// The one check of a job's settings, for the CLI (`job apply`, `--dry-run`) and the cloud's
/// API alike: names, ranges, and the model's size.
pub fn check_settings(
    name: &str,
    rounds: &RoundsSection,
    stop: &StopSection,
    model: &ModelSpec,
    training: &TrainingSection,
) -> Result<(), FieldError> {
    use crate::names::{check, Kind};
    check(Kind::Job, name).map_err(|e| bad("job.name", e.to_string()))?;
    if !(1..=caps::MIN_CLIENTS).contains(&rounds.min_clients) {
        return Err(bad("rounds.min_clients", format!("must be between 1 and {}", caps::MIN_CLIENTS)));
    }
    if !(rounds.fraction > 0.0 && rounds.fraction <= 1.0) {
        return Err(bad("rounds.fraction", "must be in (0, 1]"));
    }
    if !(rounds.deadline_secs.is_finite() && rounds.deadline_secs > 0.0 && rounds.deadline_secs <= caps::DEADLINE_SECS)
    {
        return Err(bad(
            "rounds.deadline_secs",
            format!("must be a positive number of seconds, at most {}", caps::DEADLINE_SECS),
        ));
    }
    if !(1..=caps::MAX_EXAMPLES).contains(&rounds.max_examples) {
        return Err(bad("rounds.max_examples", format!("must be between 1 and {}", caps::MAX_EXAMPLES)));
    }
    if !(1..=caps::ROUNDS).contains(&stop.rounds) {
        return Err(bad("stop.rounds", format!("must be between 1 and {}", caps::ROUNDS)));
    }
    if stop.target_accuracy.is_some_and(|a| !(a > 0.0 && a <= 1.0)) {
        return Err(bad("stop.target_accuracy", "must be in (0, 1]"));
    }
    if stop.wall_secs.is_some_and(|w| !(w.is_finite() && w > 0.0 && w <= caps::WALL_SECS)) {
        return Err(bad(
            "stop.wall_secs",
            format!("must be a positive number of seconds, at most {}", caps::WALL_SECS),
        ));
    }
    if let Err(e) = model.validate() {
        let key = match &e {
            crate::train::ModelError::Invalid { key, .. } => format!("model.{key}"),
            _ => "model.kind".to_string(),
        };
        let message = match e {
            crate::train::ModelError::Invalid { message, .. } => message,
            other => other.to_string(),
        };
        return Err(bad(key, message));
    }
    if training.nodes.len() > caps::NODE_OVERRIDES {
        return Err(bad("training.nodes", format!("at most {} per-node overrides", caps::NODE_OVERRIDES)));
    }
    let check_params = |prefix: &str, p: &TrainParams| {
        if !(1..=caps::EPOCHS).contains(&p.epochs) {
            return Err(bad(format!("{prefix}.epochs"), format!("must be between 1 and {}", caps::EPOCHS)));
        }
        if !(1..=caps::BATCH_SIZE).contains(&p.batch_size) {
            return Err(bad(format!("{prefix}.batch_size"), format!("must be between 1 and {}", caps::BATCH_SIZE)));
        }
        if model.batch_activations(p.batch_size) > caps::BATCH_ACTIVATIONS {
            return Err(bad(
                format!("{prefix}.batch_size"),
                format!(
                    "a batch of {} makes more than {} activations in this model: use a smaller batch",
                    p.batch_size,
                    caps::BATCH_ACTIVATIONS
                ),
            ));
        }
        if !(p.learning_rate.is_finite() && p.learning_rate > 0.0 && p.learning_rate <= caps::LEARNING_RATE) {
            return Err(bad(
                format!("{prefix}.learning_rate"),
                format!("must be a positive number, at most {}", caps::LEARNING_RATE),
            ));
        }
        Ok(())
    };
    check_params("training", &training.for_node(""))?;
    for node in training.nodes.keys() {
        check(Kind::Node, node).map_err(|e| bad(format!("training.nodes.{node}"), e.to_string()))?;
        check_params(&format!("training.nodes.{node}"), &training.for_node(node))?;
    }
    Ok(())
}

fn check_privacy(p: &PrivacySection) -> Result<(), FieldError> {
    if !(p.delta > 0.0 && p.delta < 1.0) {
        return Err(bad("privacy.delta", format!("must be between 0 and 1 (exclusive), got {}", p.delta)));
    }
    if let Some(b) = p.epsilon_budget.filter(|b| !(b.is_finite() && *b > 0.0)) {
        return Err(bad("privacy.epsilon_budget", format!("must be a positive number, got {b}")));
    }
    Ok(())
}

/// Checks a plugin's limits; the key is under `table`.
fn check_limits(table: &str, limits: &Limits) -> Result<(), FieldError> {
    limits.validate().map_err(|(key, message)| bad(format!("{table}.{key}"), message))
}

impl JobSpec {
    /// The checks of [`check_settings`], and that the plugins are named by a digest and valid
    /// references, with limits a host can give: what the cloud checks of a job it is sent.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_settings(&self.name, &self.rounds, &self.stop, &self.model, &self.training)?;
        if let ModelSpec::External { init, .. } = &self.model {
            if nereid_registry::sha256_hex(init).is_none() {
                return Err(bad("model.init", "the initial weights' digest is not `sha256:<64 hex digits>`"));
            }
        }
        if let Some(privacy) = &self.privacy {
            check_privacy(privacy)?;
        }
        for (table, p) in self.plugins() {
            let table = table.as_str();
            if nereid_registry::sha256_hex(&p.digest).is_none() {
                return Err(bad(format!("{table}.plugin"), "the component's digest is not `sha256:<64 hex digits>`"));
            }
            for r in p.source.iter().chain(&p.pinned) {
                nereid_registry::Reference::parse(r).map_err(|e| bad(format!("{table}.plugin"), e.to_string()))?;
            }
            check_limits(table, &p.limits)?;
        }
        Ok(())
    }
}

/// A job file read and checked, with the bytes of its plugins.
pub struct LoadedJob {
    pub spec: JobSpec,
    /// Bytes of the components given as files, by digest (registry components are pulled by
    /// every node itself).
    pub components: BTreeMap<String, Vec<u8>>,
    /// An external model's initial weights (safetensors), as `[model] init` names them.
    pub initial_weights: Option<Vec<u8>>,
}

/// What initial weights of an external model must be: f32 tensors with finite values.
pub fn check_initial_weights(weights: &crate::model_io::NamedTensors) -> Result<(), String> {
    for (name, t) in weights {
        if t.as_f32().is_none() {
            return Err(format!("tensor `{name}` is {:?}; an external model's tensors are f32", t.dtype()));
        }
        if !t.all_finite() {
            return Err(format!("tensor `{name}` has a value that is not finite"));
        }
    }
    Ok(())
}

/// Reads the initial weights an external model's `init` names (relative to `base`) and fills in
/// the model's tensors and digest; returns the file's bytes.
fn load_external(model: &mut ModelSpec, base: &Path) -> Result<Option<Vec<u8>>, FieldError> {
    let ModelSpec::External { init, tensors } = model else { return Ok(None) };
    if !tensors.is_empty() {
        return Err(bad("model.tensors", "is read from the `init` file, not written in the job"));
    }
    let path = base.join(&*init);
    let bytes = crate::files::read_limited(&path, crate::files::MAX_MODEL_BYTES)
        .map_err(|e| bad("model.init", format!("{}: {e}", path.display())))?;
    let weights = crate::model_io::decode(&bytes, &path).map_err(|e| bad("model.init", e.to_string()))?;
    check_initial_weights(&weights).map_err(|e| bad("model.init", format!("{}: {e}", path.display())))?;
    *tensors = weights
        .iter()
        .map(|(name, t)| crate::train::model::TensorLayout { name: name.clone(), shape: t.shape().to_vec() })
        .collect();
    *init = crate::runtime::content_digest(&bytes);
    Ok(Some(bytes))
}

/// Fetches a plugin as a job names it (`oci://` reference, or path relative to the given base).
pub type Fetch<'a> = &'a dyn Fn(&str, &Path) -> Result<Fetched, Box<dyn std::error::Error + Send + Sync>>;

fn limits(section: &PluginSection) -> Limits {
    Limits::with_overrides(section.timeout_ms, section.memory_mib)
}

/// Parses and validates the job file at `path`, loading its plugins into `runtime` to check
/// their slots and configurations.
pub fn load(path: &Path, runtime: &Runtime, fetch: Fetch) -> Result<LoadedJob, ConfigError> {
    let text = read(path)?;
    let src = Source { path, text: &text };
    let mut file: JobFile = parse(&src)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let initial_weights = load_external(&mut file.model, base).map_err(|e| src.error_at_key(&e.key, e.message))?;
    check_settings(&file.job.name, &file.rounds, &file.stop, &file.model, &file.training)
        .map_err(|e| src.error_at_key(&e.key, e.message))?;
    let mut components = BTreeMap::new();
    let mut load_plugin = |section: &PluginSection, table: &str| -> Result<PluginRef, ConfigError> {
        let at_plugin =
            |message: String| src.error(section.plugin.span().start, Some(format!("{table}.plugin")), message);
        let source = section.plugin.get_ref();
        let is_reference = nereid_registry::is_reference(source);
        let follow_tag = section.follow_tag.as_ref().is_some_and(|f| *f.get_ref());
        let is_tag = is_reference && !source.contains('@');
        if let (true, "compressor", Some(flag)) = (follow_tag, table, &section.follow_tag) {
            return Err(src.error(
                flag.span().start,
                Some(format!("{table}.follow_tag")),
                "the compressor cannot follow a tag: every edge and the cloud must code updates with the same plugin for the whole job",
            ));
        }
        if let (true, Some(flag)) = (follow_tag && !is_tag, &section.follow_tag) {
            return Err(src.error(
                flag.span().start,
                Some(format!("{table}.follow_tag")),
                "only a plugin given as an oci:// tag can follow it",
            ));
        }
        let fetched = fetch(source, base).map_err(|e| at_plugin(e.to_string()))?;
        let config: ConfigTable = section.config.iter().map(|(k, v)| (k.get_ref().clone(), v.clone())).collect();
        let limits = limits(section);
        check_limits(table, &limits).map_err(|e| src.error_at_key(&e.key, e.message))?;
        let loaded = runtime.load_bytes(&fetched.bytes, &fetched.origin).map_err(|e| at_plugin(e.to_string()))?;
        let checked = match table {
            t if t.starts_with("aggregator") => AggregatorPlugin::new(runtime, loaded, limits, &config).map(drop),
            "compressor" => CompressorPlugin::new(runtime, loaded, limits, &config).map(drop),
            "client_selection" => SamplerPlugin::new(runtime, loaded, limits, &config).map(drop),
            _ => ObjectivePlugin::new(runtime, loaded, limits, &config).map(drop),
        };
        if let Err(e) = checked {
            return Err(match e {
                PluginError::InvalidConfig { key, message, plugin } => {
                    let offset = section.config.keys().find(|k| *k.get_ref() == key).map(|k| k.span().start);
                    let full = format!("{table}.config.{key}");
                    let message = format!("plugin `{plugin}` refuses it: {message}");
                    match offset {
                        Some(o) => src.error(o, Some(full), message),
                        None => src.error(section.plugin.span().start, Some(full), message),
                    }
                }
                other => at_plugin(other.to_string()),
            });
        }
        let digest = fetched.digest.clone();
        if !is_reference {
            components.insert(digest.clone(), fetched.bytes);
        }
        Ok(PluginRef {
            digest,
            source: is_reference.then(|| source.clone()),
            pinned: fetched.pinned,
            follow_tag,
            config,
            limits,
        })
    };
    let aggregator = load_plugin(&file.aggregator.first(), "aggregator")?;
    let aggregator_then = file
        .aggregator
        .then
        .iter()
        .enumerate()
        .map(|(i, s)| load_plugin(s, &format!("aggregator.then[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(privacy) = &file.privacy {
        check_privacy(privacy).map_err(|e| src.error_at_key(&e.key, e.message))?;
    }
    let client_objective = file.client_objective.as_ref().map(|s| load_plugin(s, "client_objective")).transpose()?;
    let compressor = file.compressor.as_ref().map(|s| load_plugin(s, "compressor")).transpose()?;
    let client_selection = file.client_selection.as_ref().map(|s| load_plugin(s, "client_selection")).transpose()?;
    let spec = JobSpec {
        name: file.job.name,
        seed: file.job.seed,
        rounds: file.rounds,
        stop: file.stop,
        model: file.model,
        training: file.training,
        aggregator,
        aggregator_then,
        client_objective,
        compressor,
        privacy: file.privacy,
        client_selection,
    };
    Ok(LoadedJob { spec, components, initial_weights })
}
