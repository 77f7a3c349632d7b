//! `edge.toml`: an edge host's configuration (its services, replay buffer, incremental-learning
//! job and API clients).
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::{self, Secret};
use super::trigger::{Condition, DailyWindow};
use super::{limits_error, name, plugin_limits, CheckConfig, FieldError, ServicePlugin};
use crate::names::Kind;
use crate::train::TrainParams;

fn default_poll_ms() -> u64 {
    200
}

fn default_long_poll_secs() -> u32 {
    25
}

/// Below the edge's 60 s request timeout and the cloud's 55 s hold.
pub const MAX_LONG_POLL_SECS: u32 = 50;
/// How the edge's async threads are scheduled (`io_scheduling`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoScheduling {
    #[default]
    Normal,
    Batch,
}

/// The most threads `io_threads` may ask for.
pub const MAX_IO_THREADS: usize = 256;

/// `edge.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This node's name (as the cloud knows it): `name`, or `name_env`, a variable holding it
    /// (one config for many nodes, e.g. a DaemonSet's `spec.nodeName`).
    #[serde(default)]
    pub name: String,
    pub name_env: Option<String>,
    /// The cloud's base URL, e.g. "http://127.0.0.1:7000".
    pub cloud: String,
    /// This node's bearer token: `token`, `token_file` (a file holding it, relative to the config
    /// file) or `token_env` (a variable); none when the cloud knows nodes by their certificates
    /// (`cloud_tls.cert`).
    #[serde(default)]
    pub token: Secret,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    /// Directory of the local data for federated learning (see docs/configuration.md for its layout;
    /// relative to the config file). Without it the edge takes no training tasks.
    pub data: Option<PathBuf>,
    /// SQLite database of the edge's state (relative to the config file).
    pub state: PathBuf,
    /// How often to ask the cloud for work, in milliseconds (the least time between two asks).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// Seconds the cloud may hold a request for work until it has some (a long poll: an idle
    /// edge then costs the cloud about nothing); 0 asks every `poll_ms` instead. At most 50.
    #[serde(default = "default_long_poll_secs")]
    pub long_poll_secs: u32,
    /// Threads of the async runtime that serves the API and talks to the cloud (default: one
    /// per core). Models and plugins run on threads of their own (each service's `instances`);
    /// when those keep every core busy, fewer here leaves the cores to them (1 to 256).
    pub io_threads: Option<usize>,
    /// How the async runtime's threads are scheduled: "normal" (default), or "batch" (Linux's
    /// SCHED_BATCH: woken by a request, they wait for the scheduler's tick rather than preempt
    /// a running model, so a machine the pools keep busy reads requests in bursts; an idle core
    /// still runs them at once).
    #[serde(default)]
    pub io_scheduling: IoScheduling,
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
    /// The user's own trainer, for jobs whose `[model]` is `kind = "external"`.
    pub trainer: Option<TrainerConfig>,
    /// TLS of the edge's own API (`listen`): `cert`, `key`; `client_ca`, `client_auth`.
    pub tls: Option<nereid_net::tls::ServerTls>,
    /// How the edge reaches an `https://` cloud: `ca` (the CA it trusts, else the system's),
    /// `cert` and `key` (its client certificate, for mutual TLS).
    #[serde(default)]
    pub cloud_tls: nereid_net::tls::ClientTls,
    /// Use plain HTTP with a cloud, or serve the API on an address, that is not loopback
    /// (logged as a warning). Refused otherwise.
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// `[trainer]` of edge.toml: the program that trains and evaluates the user's own model. The
/// edge starts it, hands it tasks over a local socket (docs/bring-your-own-model.md) and keeps it
/// running between tasks; one that crashes, hangs or answers wrong is stopped, the task fails
/// and the next task starts it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// The program and its arguments, e.g. `["python3", "train.py"]`.
    pub command: Vec<String>,
    /// Its working directory (relative to the config file) [default: the config file's].
    pub workdir: Option<PathBuf>,
    /// Extra environment variables for it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds the program may take to start and connect.
    #[serde(default = "default_trainer_start_secs")]
    pub start_timeout_secs: f64,
    /// Seconds one task (a round's training and evaluation) may take.
    #[serde(default = "default_trainer_task_secs")]
    pub task_timeout_secs: f64,
}

fn default_trainer_start_secs() -> f64 {
    120.0
}

fn default_trainer_task_secs() -> f64 {
    3600.0
}

impl TrainerConfig {
    fn check(&self) -> Result<(), FieldError> {
        let bad = |key: &str, message: &str| FieldError { key: format!("trainer.{key}"), message: message.into() };
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(bad("command", "names no program"));
        }
        for (key, v) in [("start_timeout_secs", self.start_timeout_secs), ("task_timeout_secs", self.task_timeout_secs)]
        {
            if !(v.is_finite() && v > 0.0 && v <= 7.0 * 86_400.0) {
                return Err(bad(key, "must be a positive number of seconds, at most a week"));
            }
        }
        if self.env.keys().any(|k| k.is_empty() || k.contains('=') || k.starts_with("NEREID_TRAINER_")) {
            return Err(bad("env", "variable names are not empty, have no `=` and do not start with NEREID_TRAINER_"));
        }
        Ok(())
    }
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
    /// `[api.clients.<name>]`: a caller's token (`token`, `token_file` or `token_env`, as for the node's own token)
    /// and what it may do.
    #[serde(default)]
    pub clients: BTreeMap<String, ApiClient>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    #[serde(default)]
    pub token: Secret,
    pub token_file: Option<PathBuf>,
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

impl CheckConfig for EdgeConfig {
    fn resolve(&mut self, base: &std::path::Path) -> Result<(), FieldError> {
        if let Some(var) = &self.name_env {
            let fail = |message: String| Err(FieldError { key: "name_env".into(), message });
            if !self.name.is_empty() {
                return fail("give one of `name` and `name_env`".into());
            }
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => self.name = v,
                _ => return fail(format!("the environment variable `{var}` is not set")),
            }
        }
        secret::resolve("token", &mut self.token, self.token_file.as_ref(), self.token_env.as_ref(), base)?;
        for (name, client) in self.api.iter_mut().flat_map(|api| api.clients.iter_mut()) {
            let key = format!("api.clients.{name}.token");
            secret::resolve(&key, &mut client.token, client.token_file.as_ref(), client.token_env.as_ref(), base)?;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), FieldError> {
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
        if let Some(t) = &self.trainer {
            t.check()?;
        }
        if self.incremental.as_ref().is_some_and(|i| i.learner == LearnerKind::Trainer) && self.trainer.is_none() {
            return Err(FieldError {
                key: "incremental.learner".into(),
                message: "\"trainer\" needs the program that trains: [trainer] command = [...] in edge.toml".into(),
            });
        }
        if self.long_poll_secs > MAX_LONG_POLL_SECS {
            return Err(FieldError {
                key: "long_poll_secs".into(),
                message: format!("{} is more than {MAX_LONG_POLL_SECS} seconds", self.long_poll_secs),
            });
        }
        if self.io_threads.is_some_and(|n| !(1..=MAX_IO_THREADS).contains(&n)) {
            return Err(FieldError { key: "io_threads".into(), message: format!("must be 1 to {MAX_IO_THREADS}") });
        }
        if self.io_scheduling == IoScheduling::Batch && !cfg!(target_os = "linux") {
            return Err(FieldError {
                key: "io_scheduling".into(),
                message: "\"batch\" needs Linux (SCHED_BATCH)".into(),
            });
        }
        if self.token.is_empty() && self.cloud_tls.cert.is_none() {
            return Err(FieldError {
                key: "token".into(),
                message: "a node needs a token, or a client certificate (cloud_tls.cert and cloud_tls.key)".into(),
            });
        }
        if self.cloud_tls.cert.is_some() != self.cloud_tls.key.is_some() {
            return Err(FieldError {
                key: "cloud_tls".into(),
                message: "a client certificate needs both `cert` and `key`".into(),
            });
        }
        if self.listen.is_some() {
            let api = self.api.as_ref().ok_or_else(|| FieldError {
                key: "listen".into(),
                message:
                    "the edge's API needs callers' tokens ([api.clients.<name>] token = ...) or [api] open = true \
                          to serve without authentication"
                        .into(),
            })?;
            if !api.open && api.clients.is_empty() {
                return Err(FieldError {
                    key: "api".into(),
                    message: "no [api.clients.<name>] and not `open = true`: nobody could call the API".into(),
                });
            }
        }
        if let Some(api) = &self.api {
            for (client, c) in &api.clients {
                name(Kind::Node, format!("api.clients.{client}"), client)?;
                if c.token.len() < 8 {
                    return Err(FieldError {
                        key: format!("api.clients.{client}.token"),
                        message: "give one of `token`, `token_file` and `token_env`, at least 8 characters".into(),
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
    /// Who fine-tunes: "builtin" (nereid trains the models it exported) or "trainer" (the
    /// edge's `[trainer]` trains any ONNX model on the samples the edge hands it; the model's
    /// float32 initializers are the tensors it trains) [default: "builtin"].
    #[serde(default)]
    pub learner: LearnerKind,
    /// How a round fine-tunes [default: 5 epochs, batches of 16, SGD at 0.05].
    #[serde(default = "default_fine_tuning")]
    pub training: TrainParams,
    /// Seed of the rounds' shuffling and draws (round v uses seed + v).
    #[serde(default)]
    pub seed: u64,
    /// Conditions (all must hold) for deploying a new version, on the eval set against the
    /// serving version: `accuracy`, `accuracy_delta`, `loss`, `loss_delta` with `>=`, `>`, `<=`, `<`.
    #[serde(default = "default_deploy_if")]
    pub deploy_if: Vec<Condition>,
}

/// `[incremental.mqtt]`: sample batches (safetensors with `x` and `y`, as `POST /v1/samples`
/// takes them) published to an MQTT broker. The edge subscribes with QoS 1 in a persistent
/// session and acknowledges a batch once it is stored, so batches published while it is down or
/// before it stored them arrive again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    /// The broker: `host:port` or `mqtt://host:port` (plain, loopback only unless
    /// `allow_plaintext`), or `mqtts://host:port` (TLS, with `tls`).
    pub broker: String,
    /// For `mqtts://`: the CA to trust (else the system's), and a client certificate and key.
    #[serde(default)]
    pub tls: nereid_net::tls::ClientTls,
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

/// `[incremental] learner`: who fine-tunes the service's model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LearnerKind {
    /// nereid's own trainer, for models nereid exported.
    #[default]
    Builtin,
    /// The edge's `[trainer]`, for any ONNX model with float32 initializers.
    Trainer,
}

/// `[incremental.trigger]`: a round starts when every configured condition holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// New samples (arrived since the last round) needed.
    pub min_new_samples: u64,
    /// Only within this daily window of the edge's local time, `HH:MM-HH:MM` (may wrap midnight).
    pub window: Option<DailyWindow>,
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

fn default_deploy_if() -> Vec<Condition> {
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
    /// `kind = "joint"` with `offload_when_faster`: measure the path not taken this often.
    #[serde(default = "default_relink_secs")]
    pub relink_secs: u64,
    /// `kind = "joint"`: send a whole request to the cloud's service, without running the edge
    /// model, while the cloud's answers come back sooner than the edge model's (each path's
    /// latency measured as requests take it).
    #[serde(default)]
    pub offload_when_faster: bool,
    /// Requests served at once, each by its own plugin instance and model session [default:
    /// the number of cores].
    pub instances: Option<u32>,
    /// Threads one model run uses (ONNX Runtime's intra-op threads per session).
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// Requests that may wait for a free instance; past that the edge answers 503 with
    /// Retry-After at once.
    #[serde(default = "default_queue")]
    pub queue: u32,
    /// `kind = "joint"`: the most waiting requests run as one model call (stacked along the
    /// model's first, open, dimension); 1 runs each request alone.
    #[serde(default = "default_batch_max")]
    pub batch_max: u32,
}

/// Most instances, threads, waiting requests and batch size a service may ask for.
pub const MAX_INSTANCES: u32 = 64;
pub const MAX_THREADS: u32 = 64;
pub const MAX_QUEUE: u32 = 4096;
pub const MAX_BATCH: u32 = 256;

impl ServiceConfig {
    /// The instances a service runs (its `instances`, else the cores).
    pub fn instances(&self) -> u32 {
        self.instances
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32).min(MAX_INSTANCES))
    }
}

fn default_threads() -> u32 {
    1
}

fn default_queue() -> u32 {
    64
}

fn default_batch_max() -> u32 {
    1
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_takes_its_name_from_a_variable_and_only_from_one_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("edge.toml");
        let body = "cloud = \"http://127.0.0.1:7000\"\ntoken = \"t\"\nstate = \"e.db\"\nname_env = \"NEREID_TEST_NODE_NAME\"\n";
        std::fs::write(&path, body).expect("write");
        std::env::set_var("NEREID_TEST_NODE_NAME", "edge-from-env");
        let (config, _) = super::super::read_config::<EdgeConfig>(&path).expect("valid");
        assert_eq!(config.name, "edge-from-env");
        std::fs::write(&path, format!("name = \"edge-1\"\n{body}")).expect("write");
        let e = super::super::read_config::<EdgeConfig>(&path).expect_err("two names").to_string();
        assert!(e.contains("name_env") && e.contains("give one of"), "{e}");
        std::fs::write(&path, body.replace("NEREID_TEST_NODE_NAME", "NEREID_TEST_UNSET_NAME")).expect("write");
        let e = super::super::read_config::<EdgeConfig>(&path).expect_err("unset").to_string();
        assert!(e.contains("NEREID_TEST_UNSET_NAME"), "{e}");
    }

    #[test]
    fn io_threads_takes_1_to_256() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("edge.toml");
        let body = "name = \"e\"\ncloud = \"http://127.0.0.1:7000\"\ntoken = \"t\"\nstate = \"e.db\"\n";
        std::fs::write(&path, format!("{body}io_threads = 1\n")).expect("write");
        let (config, _) = super::super::read_config::<EdgeConfig>(&path).expect("valid");
        assert_eq!(config.io_threads, Some(1));
        for bad in ["0", "257"] {
            std::fs::write(&path, format!("{body}io_threads = {bad}\n")).expect("write");
            let e = super::super::read_config::<EdgeConfig>(&path).expect_err(bad).to_string();
            assert!(e.contains("io_threads") && e.contains("1 to 256"), "{e}");
        }
    }
}
