//! What cloud and edges say to each other over HTTP: JSON for control, safetensors for tensors,
//! the headers of the inference protocol, and the routes (see [`routes`]). What the user writes
//! (cloud.toml, edge.toml, job files) is in [`crate::config`].
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::aggregate::Rejection;
use crate::config::job::{JobSpec, PluginRef};
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
    /// For a node the cloud knows as a regional aggregator (`region = true`): the job's spec,
    /// from which the region runs the same round with its own nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Box<JobSpec>>,
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
    /// An external trainer's own metrics, by its names: those of its fit, and its evaluation's
    /// (other than `accuracy`) as `eval_<name>`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub trainer: BTreeMap<String, f64>,
}

/// Most entries of [`UpdateMetrics::trainer`].
pub const MAX_TRAINER_METRICS: usize = 64;

/// Whether `name` may name a trainer's metric: 1 to 64 letters, digits, `_`, `-` and `.`.
pub fn is_metric_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
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
        if self.trainer.len() > MAX_TRAINER_METRICS {
            return Err(format!("{} trainer metrics, at most {MAX_TRAINER_METRICS}", self.trainer.len()));
        }
        for (name, v) in &self.trainer {
            if !is_metric_name(name) {
                return Err(format!("trainer metric {name:?}: 1 to 64 letters, digits, `_`, `-` or `.`"));
            }
            if !v.is_finite() {
                return Err(format!("trainer metric `{name}` is {v}, not a finite number"));
            }
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

/// The query of a long poll (`GET /v1/task?wait=25`, `GET /v1/jobs/<job>/rounds/<round>?wait=25`):
/// the cloud holds the request up to `wait` seconds until it has something new to say (a task
/// for the caller; a round that stopped waiting for it), instead of answering at once.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    #[serde(default)]
    pub wait: u32,
}

/// The longest long poll the cloud holds, in seconds (below the edge's 60 s request timeout).
pub const MAX_WAIT_SECS: u32 = 55;

/// `GET /v1/jobs/<job>?from=R&limit=N`: which closed rounds' summaries a job's status carries.
/// A long job closes tens of thousands of rounds, so the history comes in pages: `from` the
/// first round of the page (without it, the page ends at the newest round), at most `limit`
/// rounds ([`DEFAULT_HISTORY_PAGE`] by default, [`MAX_HISTORY_PAGE`] at most).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    pub from: Option<u32>,
    pub limit: Option<u32>,
}

/// Rounds of history in a job's status when the caller does not ask for a page.
pub const DEFAULT_HISTORY_PAGE: u32 = 1_000;
/// The most rounds of history one status carries (about 0.5 KB each).
pub const MAX_HISTORY_PAGE: u32 = 10_000;

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
    /// The external trainers' own metrics: for each name, the mean over the participants that
    /// reported it, weighted by their examples.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trainer_metrics: BTreeMap<String, f64>,
    pub duration_ms: i64,
    /// The aggregator instance that folded this round (pinned reference or digest).
    #[serde(default)]
    pub aggregator: String,
    /// For a round whose aggregator added differential-privacy noise: its parameters and the
    /// job's epsilon after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<RoundPrivacy>,
}

/// What a differentially private round spent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundPrivacy {
    /// Noise standard deviation over the clipping norm (the aggregator's `dp_noise_multiplier`).
    pub noise_multiplier: f64,
    /// Nodes selected over nodes online when the round opened.
    pub sampling_rate: f64,
    /// The job's epsilon after this round, at the job's `[privacy] delta`.
    pub epsilon: f64,
    pub delta: f64,
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
    pub swaps: Vec<SwapRow>,
    pub current: Option<CurrentRound>,
    pub nodes: Vec<NodeStatus>,
    /// Closed rounds' summaries, oldest first: one page of them (see [`HistoryQuery`]).
    pub history: Vec<RoundSummary>,
    /// The `from` of the next page when closed rounds newer than this page's exist.
    #[serde(default)]
    pub history_next: Option<u32>,
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

/// `GET /v1/models` of an edge: its incremental-learning job's model versions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionList {
    pub serving_version: u32,
    pub versions: Vec<VersionRow>,
}

/// A plugin swap (or a refused one) on a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwapRow {
    /// The first round the new plugin serves (or would have).
    pub round: u32,
    pub slot: String,
    pub from: String,
    pub to: String,
    /// Why the new plugin was refused (the old one kept running).
    pub error: Option<String>,
    pub at_ms: i64,
}

/// A model version of an incremental-learning job: how it came about, its metrics (JSON) and
/// what was decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRow {
    pub version: u32,
    pub service: String,
    pub created_ms: i64,
    /// The version it was fine-tuned from (none for the first).
    pub parent: Option<u32>,
    /// What started the round ("initial" for the model the job began with).
    pub trigger: String,
    pub new_samples: u64,
    pub replayed: u64,
    pub metrics: serde_json::Value,
    /// "initial", "deployed" or "kept" (the serving version stayed).
    pub decision: String,
    pub reason: String,
}

/// The routes of the cloud's and the edge's APIs: the patterns the servers register, and the
/// paths clients build (names and digests in them are checked where they enter, so they are
/// path-safe).
pub mod routes {
    pub const HEALTH: &str = "/v1/health";
    /// Readiness (200 while the server takes new work, 503 once it drains), distinct from
    /// liveness (HEALTH).
    pub const READY: &str = "/v1/ready";
    pub const METRICS: &str = "/metrics";

    // The cloud's.
    pub const TASK: &str = "/v1/task";
    pub const COMPONENTS: &str = "/v1/components";
    /// `POST`: the initial weights of an external model (safetensors); answers their digest.
    pub const INITIAL_WEIGHTS: &str = "/v1/initial-weights";
    pub const COMPONENT: &str = "/v1/components/{digest}";
    pub const JOBS: &str = "/v1/jobs";
    pub const JOB: &str = "/v1/jobs/{job}";
    pub const JOB_STOP: &str = "/v1/jobs/{job}/stop";
    pub const MODEL: &str = "/v1/jobs/{job}/models/{version}";
    pub const ROUND: &str = "/v1/jobs/{job}/rounds/{round}";
    pub const UPDATE: &str = "/v1/jobs/{job}/rounds/{round}/update";
    pub const FAILURE: &str = "/v1/jobs/{job}/rounds/{round}/failure";
    pub const PING: &str = "/v1/ping";
    pub const INFER: &str = "/v1/infer/{service}";
    pub const TAIL: &str = "/v1/infer/{service}/tail";
    pub const PROFILE: &str = "/v1/infer/{service}/profile";
    pub const HARD_EXAMPLES: &str = "/v1/infer/{service}/hard-examples";

    // The edge's (besides INFER, HEALTH and METRICS).
    pub const PLAN: &str = "/v1/infer/{service}/plan";
    pub const SAMPLES: &str = "/v1/samples";
    pub const INCREMENTAL: &str = "/v1/incremental";
    pub const MODELS: &str = "/v1/models";

    pub fn component(digest: &str) -> String {
        format!("/v1/components/{digest}")
    }

    pub fn job(job: &str) -> String {
        format!("/v1/jobs/{job}")
    }

    /// A job's status with the history page `from..` of at most `limit` rounds.
    pub fn job_page(name: &str, from: Option<u32>, limit: Option<u32>) -> String {
        let query: Vec<String> = [("from", from), ("limit", limit)]
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
            .collect();
        match query.is_empty() {
            true => job(name),
            false => format!("{}?{}", job(name), query.join("&")),
        }
    }

    pub fn job_stop(job: &str) -> String {
        format!("/v1/jobs/{job}/stop")
    }

    pub fn model(job: &str, version: u32) -> String {
        format!("/v1/jobs/{job}/models/{version}")
    }

    pub fn round(job: &str, round: u32) -> String {
        format!("/v1/jobs/{job}/rounds/{round}")
    }

    /// `path` as a long poll held up to `wait_secs` (`path` itself for 0: answered at once).
    pub fn waiting(path: &str, wait_secs: u32) -> String {
        match wait_secs {
            0 => path.to_string(),
            w => format!("{path}?wait={w}"),
        }
    }

    pub fn update(job: &str, round: u32) -> String {
        format!("/v1/jobs/{job}/rounds/{round}/update")
    }

    pub fn failure(job: &str, round: u32) -> String {
        format!("/v1/jobs/{job}/rounds/{round}/failure")
    }

    pub fn infer(service: &str) -> String {
        format!("/v1/infer/{service}")
    }

    pub fn tail(service: &str) -> String {
        format!("/v1/infer/{service}/tail")
    }

    pub fn profile(service: &str) -> String {
        format!("/v1/infer/{service}/profile")
    }

    pub fn hard_examples(service: &str) -> String {
        format!("/v1/infer/{service}/hard-examples")
    }

    pub fn plan(service: &str) -> String {
        format!("/v1/infer/{service}/plan")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trainers_metrics_need_plain_names_and_finite_values() {
        let with = |name: &str, v: f64| UpdateMetrics {
            trainer: BTreeMap::from([(name.to_string(), v)]),
            ..Default::default()
        };
        assert!(with("val_f1.macro", 0.5).validate(10).is_ok());
        assert!(with("top 5", 0.5).validate(10).expect_err("refused").contains("\"top 5\""));
        assert!(with("ok\n# forged", 0.5).validate(10).is_err());
        assert!(with("f1", f64::INFINITY).validate(10).expect_err("refused").contains("`f1` is inf"));
        let many = UpdateMetrics {
            trainer: (0..=MAX_TRAINER_METRICS).map(|i| (format!("m{i}"), 1.0)).collect(),
            ..Default::default()
        };
        assert!(many.validate(10).expect_err("refused").contains("at most 64"));
    }
}
