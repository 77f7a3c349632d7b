//! What cloud and edges say to each other over HTTP (JSON for control, safetensors for tensors),
//! and the configuration files of both roles.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::aggregate::Rejection;
use crate::job::{JobError, JobSpec, PluginRef, SpecError};
use crate::runtime::bindings::types::{ConfigEntry, ConfigValue};
use crate::runtime::config::ConfigTable;
use crate::train::{ModelSpec, TrainParams};

/// Safetensors header keys of an uploaded update.
/// Headers of the edge-cloud inference protocol: the cut a tail starts at, the digest of the
/// model the edge cut, a hard example's outbox id and when it was queued, and the cloud's
/// compute time (so the edge can tell transfer time from it).
pub const CUT_HEADER: &str = "x-nereid-cut";
pub const DIGEST_HEADER: &str = "x-nereid-model-digest";
pub const EXAMPLE_HEADER: &str = "x-nereid-example-id";
pub const QUEUED_HEADER: &str = "x-nereid-queued-ms";
pub const COMPUTE_HEADER: &str = "x-nereid-compute-ms";
/// The digest of the compressor component a split request's cut tensors are encoded with.
pub const COMPRESSOR_HEADER: &str = "x-nereid-compressor";

pub const META_NUM_EXAMPLES: &str = "nereid.num_examples";
pub const META_METRICS: &str = "nereid.metrics";

/// What a node should do now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub job: String,
    pub round: u32,
    /// The global model to start from (version = round - 1).
    pub model_version: u32,
    /// Seed of this node's local training in this round.
    pub seed: u64,
    pub model: ModelSpec,
    pub training: TrainParams,
    pub client_objective: Option<PluginRef>,
    /// With a compressor, the node uploads its update as the encoded difference to the global
    /// model.
    #[serde(default)]
    pub compressor: Option<PluginRef>,
    /// What the aggregator publishes to clients (FedProx's `mu`).
    pub server_config: ConfigTable,
    pub deadline_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskResponse {
    pub task: Option<Task>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UploadResponse {
    /// "accepted", or "duplicate" for an update the cloud had already.
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

/// Metrics an edge reports with its update (each optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct UpdateMetrics {
    /// Accuracy and loss of the round's global model on the node's local test split.
    pub eval_accuracy: f64,
    pub eval_loss: f64,
    pub eval_examples: u64,
    /// Training loss (last epoch) and the client objective's extra loss.
    pub train_loss: f64,
    pub penalty: f64,
    pub steps: u64,
}

impl UpdateMetrics {
    /// Checks the values are what a node could measure: accuracy in [0, 1], losses finite and
    /// not negative, a finite penalty, at most `max_examples` evaluation examples.
    pub fn validate(&self, max_examples: u64) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.eval_accuracy) {
            return Err(format!("eval_accuracy is {}, not in [0, 1]", self.eval_accuracy));
        }
        for (key, v) in [("eval_loss", self.eval_loss), ("train_loss", self.train_loss)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{key} is {v}, not a finite number >= 0"));
            }
        }
        if !self.penalty.is_finite() {
            return Err(format!("penalty is {}, not a finite number", self.penalty));
        }
        if self.eval_examples > max_examples {
            return Err(format!(
                "eval_examples is {}, more than the job's max_examples ({max_examples})",
                self.eval_examples
            ));
        }
        Ok(())
    }
}

/// `POST /v1/jobs/<job>/rounds/<round>/failure`: why a node cannot make its update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailureReport {
    pub reason: String,
}

/// Longest failure reason kept.
pub const MAX_FAILURE_REASON: usize = 2000;

impl FailureReport {
    /// The reason as the cloud keeps and shows it: one line, at most [`MAX_FAILURE_REASON`]
    /// characters.
    pub fn sanitized_reason(&self) -> String {
        let mut reason: String =
            self.reason.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_FAILURE_REASON).collect();
        if reason.trim().is_empty() {
            reason = "no reason given".into();
        }
        reason
    }
}

/// `GET /v1/jobs/<job>/rounds/<round>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundState {
    /// The job runs and the round has not closed.
    pub open: bool,
    /// The round still waits for the caller's update (a node selected that has neither sent one
    /// nor reported a failure; for the operator, the same as `open`).
    pub waits_for_caller: bool,
}

/// One closed round, as the cloud records it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundSummary {
    pub round: u32,
    pub participants: Vec<String>,
    pub rejected: Vec<Rejection>,
    /// Example-weighted accuracy of the round's starting model on the participants' test splits.
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub train_loss: Option<f64>,
    pub examples: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub closed_by: String,
    pub aggregator_metrics: BTreeMap<String, f64>,
    pub duration_ms: i64,
    /// The aggregator instance that folded this round (pinned reference or digest).
    #[serde(default)]
    pub aggregator: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CurrentRound {
    pub round: u32,
    pub selected: Vec<String>,
    pub received: Vec<String>,
    /// Updates the aggregator took in already (in node-name order, as they become contiguous).
    #[serde(default)]
    pub folded: Vec<String>,
    /// Selected nodes that reported they cannot make their update, with the reason.
    #[serde(default)]
    pub failed: BTreeMap<String, String>,
    pub deadline_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    pub last_seen_ms: Option<i64>,
    /// "uploaded", "failed" (reported it cannot make its update), "training" (selected, no
    /// update yet), "idle" (not selected), or "offline".
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStatus {
    pub name: String,
    pub status: String,
    pub reason: Option<String>,
    /// Rounds closed so far (the newest model's version).
    pub rounds_done: u32,
    pub max_rounds: u32,
    /// The job's aggregator (pinned reference or digest).
    pub aggregator: String,
    pub client_objective: Option<String>,
    /// The job's update compressor (pinned reference or digest).
    #[serde(default)]
    pub compressor: Option<String>,
    /// Bytes of updates uploaded over all closed rounds.
    #[serde(default)]
    pub bytes_up_total: u64,
    /// Whether a re-applied job's plugins wait for the next round boundary.
    #[serde(default)]
    pub swap_pending: bool,
    /// Plugin swaps so far, and refused ones (with the error).
    #[serde(default)]
    pub swaps: Vec<crate::store::SwapRow>,
    pub current: Option<CurrentRound>,
    pub nodes: Vec<NodeStatus>,
    pub history: Vec<RoundSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSummary {
    pub name: String,
    pub status: String,
    pub rounds_done: u32,
    pub max_rounds: u32,
    /// What an apply did beyond the status (e.g. when new plugins take over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubmitJob {
    pub spec: JobSpec,
}

pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token (32 bytes, hex).
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub fn config_value_to_toml(v: &ConfigValue) -> toml::Value {
    match v {
        ConfigValue::Boolean(b) => toml::Value::Boolean(*b),
        ConfigValue::Integer(i) => toml::Value::Integer(*i),
        ConfigValue::Float(f) => toml::Value::Float(*f),
        ConfigValue::Text(t) => toml::Value::String(t.clone()),
    }
}

/// Scalars of a table as plugin config entries (other values are skipped).
pub fn table_to_entries(table: &ConfigTable) -> Vec<ConfigEntry> {
    table
        .iter()
        .filter_map(|(k, v)| {
            let value = match v {
                toml::Value::Boolean(b) => ConfigValue::Boolean(*b),
                toml::Value::Integer(i) => ConfigValue::Integer(*i),
                toml::Value::Float(f) => ConfigValue::Float(*f),
                toml::Value::String(s) => ConfigValue::Text(s.clone()),
                _ => return None,
            };
            Some(ConfigEntry { key: k.clone(), value })
        })
        .collect()
}

fn default_upload_mib() -> usize {
    64
}

fn default_online_secs() -> f64 {
    10.0
}

/// `cloud.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Address to listen on, e.g. "127.0.0.1:7000".
    pub listen: String,
    /// SQLite database of the cloud's state (relative to the config file).
    pub state: PathBuf,
    /// Bearer token of operators (`nereid job ...`).
    pub admin_token: String,
    /// Largest upload body, in MiB.
    #[serde(default = "default_upload_mib")]
    pub max_upload_mib: usize,
    /// A node counts as available for selection if it polled within this many seconds.
    #[serde(default = "default_online_secs")]
    pub online_secs: f64,
    /// Nodes and their tokens (more with `nereid token create`).
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeEntry>,
    /// Registries of `oci://` plugins: `[registries."host:port"]` with `insecure`, `username`,
    /// `password` / `password_env`, `token` / `token_env`.
    #[serde(default)]
    pub registries: BTreeMap<String, nereid_registry::HostSettings>,
    /// Directory of the cloud's models, `<dir>/<name>/model.onnx` (relative to the config file).
    pub models: Option<PathBuf>,
    /// Inference services edges call: hard examples of joint inference, tails of split inference.
    #[serde(default)]
    pub services: BTreeMap<String, CloudServiceConfig>,
    /// Time limits and connection bounds of the API's server.
    #[serde(default)]
    pub http: nereid_net::ServerLimits,
}

/// Largest `max_upload_mib`.
pub const MAX_UPLOAD_MIB: usize = 1 << 16;

fn limits_error(table: &str, e: nereid_net::LimitsError) -> SpecError {
    let message = e.to_string();
    let key = message.split('`').nth(1).unwrap_or("").to_string();
    SpecError { key: format!("{table}.{key}"), message }
}

fn plugin_limits(key: &str, p: &ServicePlugin) -> Result<(), SpecError> {
    crate::runtime::Limits::with_overrides(p.timeout_ms, p.memory_mib)
        .validate()
        .map_err(|(k, message)| SpecError { key: format!("{key}.{k}"), message })
}

fn name(kind: crate::names::Kind, key: String, value: &str) -> Result<(), SpecError> {
    crate::names::check(kind, value).map_err(|e| SpecError { key, message: e.to_string() })
}

impl crate::job::CheckConfig for CloudConfig {
    fn check(&self) -> Result<(), SpecError> {
        use crate::names::Kind;
        if !(1..=MAX_UPLOAD_MIB).contains(&self.max_upload_mib) {
            return Err(SpecError {
                key: "max_upload_mib".into(),
                message: format!("must be between 1 and {MAX_UPLOAD_MIB}"),
            });
        }
        if !(self.online_secs.is_finite() && self.online_secs > 0.0 && self.online_secs <= 86_400.0) {
            return Err(SpecError {
                key: "online_secs".into(),
                message: "must be a positive number of seconds, at most a day".into(),
            });
        }
        if self.admin_token.len() < 8 {
            return Err(SpecError { key: "admin_token".into(), message: "must be at least 8 characters".into() });
        }
        for (node, entry) in &self.nodes {
            name(Kind::Node, format!("nodes.{node}"), node)?;
            if entry.token.len() < 8 {
                return Err(SpecError {
                    key: format!("nodes.{node}.token"),
                    message: "must be at least 8 characters".into(),
                });
            }
        }
        for (service, cfg) in &self.services {
            name(Kind::Service, format!("services.{service}"), service)?;
            name(Kind::Model, format!("services.{service}.model"), &cfg.model)?;
            if let Some(c) = &cfg.compressor {
                plugin_limits(&format!("services.{service}.compressor"), c)?;
            }
        }
        self.http.validate().map_err(|e| limits_error("http", e))
    }
}

/// `[services.<name>]` of cloud.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudServiceConfig {
    /// The model (a name in `models`): the big model of joint inference, or the model split
    /// inference cuts (the edge must have the same one).
    pub model: String,
    /// Decodes the cut tensors of split requests that edges encoded with this same component.
    pub compressor: Option<ServicePlugin>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub token: String,
}

fn default_poll_ms() -> u64 {
    200
}

/// `edge.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This node's name (as the cloud knows it).
    pub name: String,
    /// The cloud's base URL, e.g. "http://127.0.0.1:7000".
    pub cloud: String,
    /// This node's bearer token.
    pub token: String,
    /// Directory of the local data for federated learning (see the README for its layout;
    /// relative to the config file). Without it the edge takes no training tasks.
    pub data: Option<PathBuf>,
    /// SQLite database of the edge's state (relative to the config file).
    pub state: PathBuf,
    /// How often to ask the cloud for work, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Registries of `oci://` plugins, as in `cloud.toml`.
    #[serde(default)]
    pub registries: BTreeMap<String, nereid_registry::HostSettings>,
    /// Address of the edge's own API (inference services, `/metrics`), e.g. "127.0.0.1:7100".
    pub listen: Option<String>,
    /// Directory of the edge's models, `<dir>/<name>/model.onnx` (relative to the config file).
    pub models: Option<PathBuf>,
    /// What wasi-nn runs the models on: "onnxruntime" (default) or "openvino".
    #[serde(default)]
    pub nn_backend: crate::runtime::nn::NnBackend,
    /// How often undelivered hard examples are offered to the cloud again, in milliseconds.
    #[serde(default = "default_outbox_retry_ms")]
    pub outbox_retry_ms: u64,
    /// Inference services, served at `POST /v1/infer/<name>`.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// The replay buffer: its sampler plugin (e.g. replay-buffer); samples arrive on
    /// `POST /v1/samples` and their bytes are kept in `state`.
    pub replay: Option<ServicePlugin>,
    /// The incremental-learning job: fine-tunes a joint service's model on the samples that
    /// arrive plus a draw from the replay buffer, and switches the service to a better version.
    pub incremental: Option<IncrementalConfig>,
    /// Who may call the edge's API (required with `listen`).
    pub api: Option<EdgeApiConfig>,
    /// Time limits and connection bounds of the edge API's server.
    #[serde(default)]
    pub http: nereid_net::ServerLimits,
}

/// `[api]` of edge.toml: who may call the edge's API. `/v1/health` and `/metrics` are open;
/// everything else needs a client's bearer token, unless `open = true`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeApiConfig {
    /// Serve the API without authentication: anyone who reaches `listen` may infer, send
    /// samples and read the edge's state.
    #[serde(default)]
    pub open: bool,
    /// `[api.clients.<name>]`: a caller's token (`token`, or `token_env` naming an environment
    /// variable) and what it may do.
    #[serde(default)]
    pub clients: BTreeMap<String, ApiClient>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    pub token: Option<String>,
    pub token_env: Option<String>,
    /// What the client may do [default: all]: "infer" (`POST /v1/infer/...`), "samples"
    /// (`POST /v1/samples`), "read" (`GET` of samples, plans, the incremental job and models).
    #[serde(default = "ApiRight::all")]
    pub allow: Vec<ApiRight>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRight {
    Infer,
    Samples,
    Read,
}

impl ApiRight {
    fn all() -> Vec<ApiRight> {
        vec![ApiRight::Infer, ApiRight::Samples, ApiRight::Read]
    }

    /// What the right allows, for messages.
    pub fn verb(self) -> &'static str {
        match self {
            ApiRight::Infer => "infer",
            ApiRight::Samples => "send samples",
            ApiRight::Read => "read",
        }
    }
}

impl ApiClient {
    /// The client's token: `token`, or the value of the variable `token_env` names.
    pub fn resolve_token(&self) -> Result<String, String> {
        match (&self.token, &self.token_env) {
            (Some(t), None) => Ok(t.clone()),
            (None, Some(var)) => std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("the environment variable `{var}` is not set")),
            _ => Err("give exactly one of `token` and `token_env`".into()),
        }
    }
}

impl crate::job::CheckConfig for EdgeConfig {
    fn check(&self) -> Result<(), SpecError> {
        use crate::names::Kind;
        name(Kind::Node, "name".into(), &self.name)?;
        for (service, cfg) in &self.services {
            name(Kind::Service, format!("services.{service}"), service)?;
            name(Kind::Model, format!("services.{service}.model"), &cfg.model)?;
            if let Some(remote) = &cfg.cloud_service {
                name(Kind::Service, format!("services.{service}.cloud_service"), remote)?;
            }
            let plugins = [
                ("router", &cfg.router),
                ("splitter", &cfg.splitter),
                ("adapter", &cfg.adapter),
                ("compressor", &cfg.compressor),
            ];
            for (slot, p) in plugins {
                if let Some(p) = p {
                    plugin_limits(&format!("services.{service}.{slot}"), p)?;
                }
            }
        }
        if let Some(p) = &self.replay {
            plugin_limits("replay", p)?;
        }
        if self.listen.is_some() {
            let api = self.api.as_ref().ok_or_else(|| SpecError {
                key: "listen".into(),
                message: "the edge's API needs callers' tokens ([api.clients.<name>] token = ...) or [api] open = true                           to serve without authentication"
                    .into(),
            })?;
            if !api.open && api.clients.is_empty() {
                return Err(SpecError {
                    key: "api".into(),
                    message: "no [api.clients.<name>] and not `open = true`: nobody could call the API".into(),
                });
            }
        }
        if let Some(api) = &self.api {
            for (client, c) in &api.clients {
                name(Kind::Node, format!("api.clients.{client}"), client)?;
                let token = c
                    .resolve_token()
                    .map_err(|message| SpecError { key: format!("api.clients.{client}.token"), message })?;
                if token.len() < 8 {
                    return Err(SpecError {
                        key: format!("api.clients.{client}.token"),
                        message: "must be at least 8 characters".into(),
                    });
                }
            }
        }
        self.http.validate().map_err(|e| limits_error("http", e))
    }
}

/// `[incremental]` of edge.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalConfig {
    /// The joint service whose model is fine-tuned and, when a version is deployed, switched.
    pub service: String,
    /// A data directory whose `test` split is the eval set (relative to the config file).
    pub eval: PathBuf,
    /// A watched directory: every `*.safetensors` batch put there (`x`, `y`, as for
    /// `POST /v1/samples`) is taken in, then moved to `done/` (or to `failed/`, with the error in
    /// `<file>.error`). Relative to the config file.
    pub inbox: Option<PathBuf>,
    /// Sample batches published to an MQTT broker.
    pub mqtt: Option<MqttSource>,
    /// How often the inbox and the trigger are checked, in milliseconds.
    #[serde(default = "default_check_ms")]
    pub check_ms: u64,
    pub trigger: TriggerConfig,
    /// Samples a round draws from the replay buffer [default: as many as there are new samples].
    pub replay_draw: Option<u32>,
    /// How a round fine-tunes [default: 5 epochs, batches of 16, SGD at 0.05].
    #[serde(default = "default_fine_tuning")]
    pub training: TrainParams,
    /// Seed of the rounds' shuffling and draws (round v uses seed + v).
    #[serde(default)]
    pub seed: u64,
    /// Conditions (all must hold) for deploying a new version, on the eval set against the
    /// serving version: `accuracy`, `accuracy_delta`, `loss`, `loss_delta` with `>=`, `>`, `<=`, `<`.
    #[serde(default = "default_deploy_if")]
    pub deploy_if: Vec<crate::edge::trigger::Condition>,
}

/// `GET /v1/models` of an edge: its incremental-learning job's model versions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionList {
    pub serving_version: u32,
    pub versions: Vec<crate::store::VersionRow>,
}

/// `[incremental.mqtt]`: sample batches (safetensors with `x` and `y`, as `POST /v1/samples`
/// takes them) published to an MQTT broker. The edge subscribes with QoS 1 in a persistent
/// session and acknowledges a batch once it is stored, so batches published while it is down or
/// before it stored them arrive again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    /// The broker, `host:port`.
    pub broker: String,
    /// The topic filter to subscribe to, e.g. "site/+/samples".
    pub topic: String,
    /// The session's client id [default: "nereid-<name>"].
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// An environment variable holding the password (instead of `password`).
    pub password_env: Option<String>,
    /// The largest message taken, in MiB.
    #[serde(default = "default_mqtt_mib")]
    pub max_message_mib: usize,
}

fn default_mqtt_mib() -> usize {
    16
}

/// `[incremental.trigger]`: a round starts when every configured condition holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// New samples (arrived since the last round) needed.
    pub min_new_samples: u64,
    /// Only within this daily window of the edge's local time, `HH:MM-HH:MM` (may wrap midnight).
    pub window: Option<crate::edge::trigger::DailyWindow>,
    /// Only when the serving version's accuracy on the new samples is at least this much below
    /// its accuracy on the eval set (the data has drifted away from it).
    pub accuracy_drop: Option<f64>,
}

fn default_check_ms() -> u64 {
    10_000
}

fn default_fine_tuning() -> TrainParams {
    TrainParams { epochs: 5, batch_size: 16, learning_rate: 0.05, optimizer: crate::train::OptimizerKind::Sgd }
}

fn default_deploy_if() -> Vec<crate::edge::trigger::Condition> {
    vec!["accuracy_delta >= 0.01".parse().expect("a valid condition")]
}

fn default_outbox_retry_ms() -> u64 {
    1000
}

/// What an inference service does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// Joint inference: the edge model answers; the router plugin sends hard examples to the
    /// cloud's bigger model.
    Joint,
    /// Split inference: the splitter plugin cuts one model; the edge runs the head, the cloud
    /// the tail.
    Split,
}

/// `[services.<name>]` of edge.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub kind: ServiceKind,
    /// The model (a name in `models`): the edge model of joint inference, or the model split
    /// inference cuts.
    pub model: String,
    /// `kind = "joint"`: the router plugin.
    pub router: Option<ServicePlugin>,
    /// `kind = "split"`: the splitter plugin.
    pub splitter: Option<ServicePlugin>,
    /// Turns request bodies of other content types than JSON and safetensors (e.g. `image/png`)
    /// into the model's inputs.
    pub adapter: Option<ServicePlugin>,
    /// `kind = "split"`: encodes the cut tensors before they travel (the cloud's service needs
    /// the same component as its `compressor`).
    pub compressor: Option<ServicePlugin>,
    /// The cloud's base URL [default: `cloud`].
    pub cloud: Option<String>,
    /// The service's name on the cloud [default: this service's name].
    pub cloud_service: Option<String>,
    /// How long a cloud call may take before the edge answers on its own, in milliseconds.
    #[serde(default = "default_cloud_timeout_ms")]
    pub cloud_timeout_ms: u64,
    /// `kind = "split"`: plan again when the measured bandwidth moves from the planned one by
    /// more than this factor.
    #[serde(default = "default_replan_factor")]
    pub replan_factor: f64,
    /// `kind = "split"`: bytes of the probe upload that measures the link's bandwidth.
    #[serde(default = "default_probe_kib")]
    pub probe_kib: u64,
    /// `kind = "split"`: while the plan sends nothing to the cloud (edge-only, or made while the
    /// cloud was unreachable), measure the link again every this many seconds; 0 never.
    #[serde(default = "default_relink_secs")]
    pub relink_secs: u64,
}

fn default_relink_secs() -> u64 {
    30
}

fn default_cloud_timeout_ms() -> u64 {
    2000
}

fn default_replan_factor() -> f64 {
    2.0
}

fn default_probe_kib() -> u64 {
    64
}

/// A service's plugin: a `.wasm` path (relative to the config file) or an `oci://` reference,
/// and its options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePlugin {
    pub plugin: String,
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    pub timeout_ms: Option<u64>,
    pub memory_mib: Option<usize>,
}

/// Reads a TOML file into `T` and checks it, with errors naming the file, the line and the key;
/// relative paths in it are resolved by the caller against the returned directory.
pub fn read_config<T: serde::de::DeserializeOwned + crate::job::CheckConfig>(
    path: &Path,
) -> Result<(T, PathBuf), JobError> {
    let value = crate::job::parse_checked_file(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((value, base))
}
