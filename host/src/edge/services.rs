//! The edge's inference services.
//!
//! - **joint**: the edge model runs through the router plugin (wasi-nn, ONNX Runtime); the
//!   plugin decides per example whether the edge's answer stands. Hard examples are queued in
//!   the persistent outbox first, then sent to the cloud's bigger model; if the cloud does not
//!   answer in time the edge's own answer is returned, marked, and the outbox delivers the
//!   example when the link is back.
//! - **split**: the splitter plugin plans where to cut the model from both sides' per-node
//!   profiles and the measured link; the edge runs the head (through the plugin), sends the cut
//!   tensors as safetensors, the cloud runs the tail. The link is measured on every transfer and
//!   the plan is made again when the bandwidth moves by more than `replan_factor`.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use crate::components::Components;
use crate::inference::codec::ActivationCodec;
use crate::inference::profile;
use crate::inference::wire::{self, InferRequest};
use crate::protocol::{
    EdgeConfig, ServiceConfig, ServiceKind, COMPRESSOR_HEADER, COMPUTE_HEADER, CUT_HEADER, DIGEST_HEADER,
    EXAMPLE_HEADER, QUEUED_HEADER,
};
use crate::runtime::config::ConfigTable;
use crate::runtime::{
    content_digest, AdapterPlugin, CompressorPlugin, CutPoint, InputSpec, Limits, LoadedComponent, Route, RouterPlugin,
    Runtime, SplitterPlugin, TensorData,
};
use crate::store::{now_ms, EdgeStore};

/// An error the request caused (a missing input, a refused cut): the API answers 400. Plugins
/// refusing an input (`PluginError::Rejected`) and the cloud refusing one count as such too.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// Whether `e` is the caller's fault (see [`BadRequest`]).
pub fn is_bad_request(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<BadRequest>()
            || matches!(
                c.downcast_ref::<crate::runtime::PluginError>(),
                Some(crate::runtime::PluginError::Rejected { .. })
            )
    })
}

/// Counters of one service, for `/metrics`.
#[derive(Default)]
pub struct ServiceMetrics {
    pub inferences: AtomicU64,
    pub hard_examples: AtomicU64,
    pub fallbacks: AtomicU64,
    pub replans: AtomicU64,
    /// Per route ("edge", "cloud", "split"): requests and their total seconds.
    pub latency: Mutex<BTreeMap<&'static str, (u64, f64)>>,
}

impl ServiceMetrics {
    fn observe(&self, route: &'static str, elapsed: Duration) {
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let e = l.entry(route).or_default();
        e.0 += 1;
        e.1 += elapsed.as_secs_f64();
    }
}

/// One answered example (a row of the batch).
#[derive(Debug, Clone, Serialize)]
pub struct RowResult {
    pub index: u64,
    /// Where this row's outputs were computed: "edge" or "cloud".
    pub computed: &'static str,
    /// The router's decision and score.
    pub route: Route,
    pub score: f64,
    /// The cloud could not be reached: the edge answered and the example waits in the outbox.
    pub queued: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NamedValue {
    pub name: String,
    pub shape: Vec<u64>,
    pub data: Vec<f32>,
}

/// The answer of `POST /v1/infer/<service>`.
#[derive(Debug, Clone, Serialize)]
pub struct InferResponse {
    pub service: String,
    pub outputs: Vec<NamedValue>,
    /// Where the answer was computed: "edge", "cloud", "split" (head on the edge, tail in the
    /// cloud) or "mixed" (joint: some rows each way).
    pub computed: &'static str,
    /// Joint: per row.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<RowResult>,
    /// Split: the cut used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut: Option<Vec<String>>,
    /// Split: the cloud was unreachable and the edge ran the whole model.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    /// Split: bytes of cut tensors sent to the cloud (after the service's compressor, if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_bytes: Option<usize>,
    pub edge_ms: f64,
    pub total_ms: f64,
}

/// Outcome of a call to the cloud.
enum CloudCall {
    Answered { outputs: Vec<TensorData>, compute_ms: f64 },
    Unreachable(String),
}

struct CloudLink {
    http: reqwest::Client,
    base: String,
    service: String,
    token: String,
    timeout: Duration,
}

impl CloudLink {
    fn url(&self, suffix: &str) -> String {
        format!("{}/v1/infer/{}{suffix}", self.base.trim_end_matches('/'), self.service)
    }

    /// POSTs safetensors and reads safetensors back. A refusal (4xx) is an error for the caller;
    /// anything else that goes wrong means the cloud is unreachable.
    async fn post(&self, suffix: &str, body: Vec<u8>, headers: &[(&str, String)]) -> anyhow::Result<CloudCall> {
        let mut req = self.http.post(self.url(suffix)).bearer_auth(&self.token).timeout(self.timeout).body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Ok(CloudCall::Unreachable(e.to_string())),
        };
        let status = resp.status();
        let compute_ms = resp
            .headers()
            .get(COMPUTE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Ok(CloudCall::Unreachable(e.to_string())),
        };
        if status.is_client_error() {
            let why =
                format!("cloud service `{}` refused: {status}: {}", self.service, String::from_utf8_lossy(&bytes));
            return Err(BadRequest(why).into());
        }
        if !status.is_success() {
            return Ok(CloudCall::Unreachable(format!("{status}: {}", String::from_utf8_lossy(&bytes))));
        }
        Ok(CloudCall::Answered { outputs: wire::from_safetensors(&bytes)?, compute_ms })
    }
}

struct Joint {
    /// The model in the runtime's models the service answers with, and the router instance
    /// that runs it (an incremental-learning job replaces both at once).
    serving: Mutex<ServingModel>,
    /// The model of edge.toml (stays registered when another one serves).
    configured: String,
    component: LoadedComponent,
    limits: Limits,
    config: ConfigTable,
}

struct ServingModel {
    model: String,
    router: RouterPlugin,
}

/// A model version ready to serve (registered, with its own router instance), not serving yet.
pub struct PreparedSwitch {
    service: String,
    joint: Arc<Joint>,
    serving: ServingModel,
}

/// The halves of one cut, ready to run. Cut tensors that are model inputs are sent as they came.
#[derive(Clone)]
struct Halves {
    /// The head's name in the runtime's models (none for the cloud-only cut).
    head: Option<String>,
    /// Whether anything runs in the cloud (not for the edge-only cut).
    has_tail: bool,
}

struct Plan {
    cut: Vec<String>,
    predicted_ms: f64,
    bandwidth_mbit_s: f64,
    rtt_ms: f64,
    cuts: Vec<CutPoint>,
}

/// What plans are made from, measured once: the model with every tensor typed (encoded, as the
/// plugin takes it) and both sides' profile.
struct Planning {
    typed: Vec<u8>,
    profile: nereid_onnx::Profile,
    /// Whether `profile.cloud_ms` is the cloud's (else this node's, until the cloud answers).
    cloud_measured: bool,
}

struct SplitState {
    plugin: SplitterPlugin,
    planning: Option<Planning>,
    plan: Option<Plan>,
    halves: HashMap<Vec<String>, Halves>,
    /// Exponentially weighted bandwidth seen on transfers, Mbit/s.
    measured_mbit_s: Option<f64>,
    /// Float32 bytes of the cut tensors over the bytes the compressor made of them, on the last
    /// transfer: plans count transfers as float32 bytes / (bandwidth x this).
    compression_ratio: Option<f64>,
}

struct Split {
    model: String,
    onnx: Vec<u8>,
    digest: String,
    /// The model's outputs: the cut that runs everything on the edge.
    outputs: Vec<String>,
    replan_factor: f64,
    probe_bytes: usize,
    relink: Option<Duration>,
    component: LoadedComponent,
    limits: Limits,
    config: ConfigTable,
    /// Encodes the cut tensors before they travel.
    codec: Option<ActivationCodec>,
    state: Mutex<SplitState>,
    /// Held while planning, so a request arriving during the start-up plan waits for it.
    planner: tokio::sync::Mutex<()>,
}

// Arcs, so a blocking task can hold its service's half without the whole service.
enum Kind {
    Joint(Arc<Joint>),
    Split(Arc<Split>),
}

pub struct Service {
    pub name: String,
    inputs: Vec<String>,
    /// The adapter for other bodies, with what it is told of the model's inputs.
    adapter: Option<(Mutex<AdapterPlugin>, Vec<InputSpec>)>,
    cloud: CloudLink,
    kind: Kind,
    pub metrics: ServiceMetrics,
}

impl Service {
    /// The model's input names.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }
}

/// Every service of an edge, and the outbox they share.
pub struct Services {
    pub services: BTreeMap<String, Arc<Service>>,
    /// The replay buffer, if edge.toml has a `[replay]`.
    pub replay: Option<super::replay::ReplayBuffer>,
    /// The incremental-learning job, if edge.toml has an `[incremental]`.
    pub incremental: Option<super::incremental::Job>,
    pub store: Arc<EdgeStore>,
    runtime: Runtime,
    pub outbox_delivered: AtomicU64,
    outbox_wake: tokio::sync::Notify,
    /// Outbox entries a request is sending right now: the outbox leaves them to it.
    in_flight: Arc<Mutex<HashSet<i64>>>,
    retry: Duration,
}

/// An outbox entry a request is sending; released when the request is done with it (or
/// dropped half-way: the outbox then sends it).
struct Claim {
    ids: Arc<Mutex<HashSet<i64>>>,
    id: i64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.ids).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| anyhow!("inference task: {e}"))?
}

impl Services {
    /// Loads every service of edge.toml (`base` is its directory): models, plugins (checked
    /// against their slots and configured), cloud links. Errors name the service and the field.
    pub async fn load(
        edge: &EdgeConfig,
        base: &Path,
        runtime: &Runtime,
        components: &Components,
        store: Arc<EdgeStore>,
    ) -> anyhow::Result<Services> {
        let mut services = BTreeMap::new();
        for (name, cfg) in &edge.services {
            let service = Self::load_one(name, cfg, edge, base, runtime, components)
                .await
                .with_context(|| format!("[services.{name}]"))?;
            services.insert(name.clone(), Arc::new(service));
        }
        let mut replay = match &edge.replay {
            Some(cfg) => Some(
                super::replay::ReplayBuffer::load(cfg, base, runtime, components, store.clone())
                    .await
                    .context("[replay]")?,
            ),
            None => None,
        };
        let incremental = match &edge.incremental {
            None => None,
            Some(cfg) => {
                let job = super::incremental::Job::load(cfg, edge, base, store.clone()).context("[incremental]")?;
                replay
                    .as_mut()
                    .context("[incremental]: the job needs a replay buffer ([replay] in edge.toml)")?
                    .feed_training(job.trainable())
                    .context("[incremental]")?;
                Some(job)
            }
        };
        let services = Services {
            services,
            replay,
            incremental,
            store,
            runtime: runtime.clone(),
            outbox_delivered: AtomicU64::new(0),
            outbox_wake: tokio::sync::Notify::new(),
            in_flight: Arc::default(),
            retry: Duration::from_millis(edge.outbox_retry_ms),
        };
        if let Some(job) = &services.incremental {
            job.resume(&services).context("[incremental]")?;
        }
        Ok(services)
    }

    async fn load_one(
        name: &str,
        cfg: &ServiceConfig,
        edge: &EdgeConfig,
        base: &Path,
        runtime: &Runtime,
        components: &Components,
    ) -> anyhow::Result<Service> {
        let dir = base.join(edge.models.as_ref().context("`models` (the model directory) is not set in edge.toml")?);
        let path = dir.join(&cfg.model).join("model.onnx");
        if !runtime.models().contains(&cfg.model) {
            bail!("model: `{}` is not in the model store ({} not found)", cfg.model, path.display());
        }
        let onnx = crate::files::read_limited(&path, crate::files::MAX_MODEL_BYTES)
            .with_context(|| format!("model: reading {}", path.display()))?;
        let decoded = nereid_onnx::Model::decode(&onnx).with_context(|| format!("model: {}", path.display()))?;
        let inputs: Vec<String> = decoded.runtime_inputs().into_iter().map(|v| v.name.clone()).collect();
        let outputs: Vec<String> = decoded.outputs().into_iter().map(str::to_string).collect();
        let adapter = match &cfg.adapter {
            None => None,
            Some(a) => {
                let specs = profile::input_specs(&decoded).context("adapter: the model's inputs")?;
                let p = components.load_plugin(a, base, runtime).await.context("adapter.plugin")?;
                let plugin = AdapterPlugin::new(runtime, p.loaded, p.limits, &a.config).context("adapter")?;
                Some((Mutex::new(plugin), specs))
            }
        };
        let (field, plugin_cfg) = match cfg.kind {
            ServiceKind::Joint => ("router", cfg.router.as_ref()),
            ServiceKind::Split => ("splitter", cfg.splitter.as_ref()),
        };
        let plugin_cfg = plugin_cfg
            .with_context(|| format!("`{field}` is required for kind = \"{:?}\"", cfg.kind).to_lowercase())?;
        if cfg.kind == ServiceKind::Joint && cfg.splitter.is_some() {
            bail!("splitter: only for kind = \"split\"");
        }
        if cfg.kind == ServiceKind::Split && cfg.router.is_some() {
            bail!("router: only for kind = \"joint\"");
        }
        if cfg.kind == ServiceKind::Joint && cfg.compressor.is_some() {
            bail!("compressor: only for kind = \"split\" (it encodes the cut tensors)");
        }
        let codec = match &cfg.compressor {
            None => None,
            Some(c) => {
                let p = components.load_plugin(c, base, runtime).await.context("compressor.plugin")?;
                let plugin = CompressorPlugin::new(runtime, p.loaded, p.limits, &c.config).context("compressor")?;
                Some(ActivationCodec::new(plugin, p.digest))
            }
        };
        if cfg.replan_factor.is_nan() || cfg.replan_factor <= 1.0 {
            bail!("replan_factor: must be > 1 (got {})", cfg.replan_factor);
        }
        let p = components.load_plugin(plugin_cfg, base, runtime).await.with_context(|| format!("{field}.plugin"))?;
        let (loaded, limits) = (p.loaded, p.limits);
        let config: ConfigTable = plugin_cfg.config.clone();
        let kind = match cfg.kind {
            ServiceKind::Joint => Kind::Joint(Arc::new(Joint {
                serving: Mutex::new(ServingModel {
                    model: cfg.model.clone(),
                    router: RouterPlugin::new(runtime, loaded.clone(), limits, &config).context("router")?,
                }),
                configured: cfg.model.clone(),
                component: loaded,
                limits,
                config,
            })),
            ServiceKind::Split => {
                let plugin = SplitterPlugin::new(runtime, loaded.clone(), limits, &config).context("splitter")?;
                Kind::Split(Arc::new(Split {
                    model: cfg.model.clone(),
                    digest: content_digest(&onnx),
                    onnx,
                    outputs,
                    replan_factor: cfg.replan_factor,
                    probe_bytes: (cfg.probe_kib.max(1) << 10) as usize,
                    relink: (cfg.relink_secs > 0).then(|| Duration::from_secs(cfg.relink_secs)),
                    component: loaded,
                    limits,
                    config,
                    codec,
                    state: Mutex::new(SplitState {
                        plugin,
                        planning: None,
                        plan: None,
                        halves: HashMap::new(),
                        measured_mbit_s: None,
                        compression_ratio: None,
                    }),
                    planner: tokio::sync::Mutex::new(()),
                }))
            }
        };
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        Ok(Service {
            name: name.to_string(),
            inputs,
            adapter,
            cloud: CloudLink {
                http,
                base: cfg.cloud.clone().unwrap_or_else(|| edge.cloud.clone()),
                service: cfg.cloud_service.clone().unwrap_or_else(|| name.to_string()),
                token: edge.token.clone(),
                timeout: Duration::from_millis(cfg.cloud_timeout_ms),
            },
            kind,
            metrics: ServiceMetrics::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Service>> {
        self.services.get(name).cloned()
    }

    /// Registers `onnx` as `model` and starts a router instance for it (a wasi-nn context holds
    /// the models there were when its instance started), without touching what serves.
    pub fn prepare_switch(&self, service: &str, model: &str, onnx: &[u8]) -> anyhow::Result<PreparedSwitch> {
        let svc = self.services.get(service).with_context(|| format!("no service `{service}`"))?;
        let Kind::Joint(joint) = &svc.kind else { bail!("service `{service}` is not a joint service") };
        self.runtime.models().insert(model, onnx).with_context(|| format!("registering `{model}`"))?;
        let router = RouterPlugin::new(&self.runtime, joint.component.clone(), joint.limits, &joint.config)
            .with_context(|| format!("service `{service}`: a router instance for `{model}`"))?;
        Ok(PreparedSwitch {
            service: service.to_string(),
            joint: joint.clone(),
            serving: ServingModel { model: model.to_string(), router },
        })
    }

    /// Makes a prepared version serve. Requests running on the old one finish on it; the next
    /// ones run on the new one. The old model leaves the runtime's models unless it is the
    /// service's configured one.
    pub fn switch(&self, prepared: PreparedSwitch) {
        let PreparedSwitch { service, joint, serving } = prepared;
        let to = serving.model.clone();
        let old = std::mem::replace(&mut *lock(&joint.serving), serving);
        if old.model != joint.configured {
            self.runtime.models().remove(&old.model);
        }
        tracing::info!(%service, from = %old.model, %to, "serving model switched");
    }

    /// Answers one request. `forced_cut` (split only) measures a given cut instead of the plan's.
    pub async fn infer(
        self: &Arc<Self>,
        service: Arc<Service>,
        inputs: Vec<TensorData>,
        forced_cut: Option<Vec<String>>,
    ) -> anyhow::Result<InferResponse> {
        let expected = service.inputs.join(", ");
        if let Some(missing) = service.inputs.iter().find(|name| !inputs.iter().any(|t| &t.name == *name)) {
            return Err(BadRequest(format!("input `{missing}` is missing (the model's inputs: {expected})")).into());
        }
        if let Some(extra) = inputs.iter().find(|t| !service.inputs.contains(&t.name)) {
            return Err(BadRequest(format!("the model has no input `{}` (its inputs: {expected})", extra.name)).into());
        }
        service.metrics.inferences.fetch_add(1, Ordering::Relaxed);
        match &service.kind {
            Kind::Joint(joint) => self.joint(&service, joint.clone(), inputs).await,
            Kind::Split(split) => self.split(&service, split.clone(), inputs, forced_cut).await,
        }
    }

    /// Runs a blocking closure on the edge store (SQLite commits wait for the disk).
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EdgeStore) -> crate::store::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let store = self.store.clone();
        blocking(move || Ok(f(&store)?)).await
    }

    async fn joint(
        &self,
        service: &Service,
        joint: Arc<Joint>,
        inputs: Vec<TensorData>,
    ) -> anyhow::Result<InferResponse> {
        let t0 = Instant::now();
        let (inputs, mut outputs, decisions) = blocking(move || {
            let mut serving = lock(&joint.serving);
            let ServingModel { model, router } = &mut *serving;
            let outputs = router.run(model, &inputs)?;
            let first = outputs.first().context("the edge model has no output")?;
            let rows = first.shape.first().copied().unwrap_or(1).max(1);
            let mut decisions = Vec::with_capacity(rows as usize);
            for r in 0..rows {
                let row = wire::rows(first, r, r + 1);
                let tensor = crate::tensor::Tensor::from_f32(row.shape.clone(), wire::f32_values(&row)?)
                    .context("the edge model's output does not fit its shape")?;
                decisions.push(router.decide(&tensor)?);
            }
            Ok((inputs, outputs, decisions))
        })
        .await?;
        let edge_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut results = Vec::with_capacity(decisions.len());
        for (i, d) in decisions.iter().enumerate() {
            let mut row =
                RowResult { index: i as u64, computed: "edge", route: d.route, score: d.score, queued: false };
            if d.route == Route::Cloud {
                service.metrics.hard_examples.fetch_add(1, Ordering::Relaxed);
                let rows: Vec<TensorData> = inputs.iter().map(|t| wire::rows(t, i as u64, i as u64 + 1)).collect();
                let body = wire::to_safetensors(&rows)?;
                let queued_ms = now_ms();
                // In the outbox before it leaves: a crash or an outage loses nothing.
                let (svc_name, in_flight) = (service.name.clone(), self.in_flight.clone());
                let (claim, body) = self
                    .with_store(move |s| {
                        // Claimed before the entry is visible, so the outbox never sends it too.
                        let mut claimed = lock(&in_flight);
                        let id = s.enqueue(&svc_name, &body, queued_ms)?;
                        claimed.insert(id);
                        drop(claimed);
                        Ok((Claim { ids: in_flight, id }, body))
                    })
                    .await?;
                let id = claim.id;
                let headers = [(EXAMPLE_HEADER, id.to_string()), (QUEUED_HEADER, queued_ms.to_string())];
                match service.cloud.post("", body, &headers).await? {
                    CloudCall::Answered { outputs: cloud_out, .. } => {
                        self.with_store(move |s| s.delivered(id)).await?;
                        for (out, c) in outputs.iter_mut().zip(cloud_out) {
                            replace_row(out, i as u64, &c)?;
                        }
                        row.computed = "cloud";
                    }
                    CloudCall::Unreachable(why) => {
                        tracing::warn!(service = %service.name, id, "cloud unreachable, answering on the edge: {why}");
                        service.metrics.fallbacks.fetch_add(1, Ordering::Relaxed);
                        row.queued = true;
                        drop(claim);
                        self.outbox_wake.notify_one();
                    }
                }
            }
            results.push(row);
        }
        let computed = if results.iter().all(|r| r.computed == "edge") {
            "edge"
        } else if results.iter().all(|r| r.computed == "cloud") {
            "cloud"
        } else {
            "mixed"
        };
        let elapsed = t0.elapsed();
        service.metrics.observe(if computed == "edge" { "edge" } else { "cloud" }, elapsed);
        Ok(InferResponse {
            service: service.name.clone(),
            outputs: named_values(&outputs)?,
            computed,
            results,
            cut: None,
            fallback: false,
            upload_bytes: None,
            edge_ms,
            total_ms: elapsed.as_secs_f64() * 1e3,
        })
    }

    /// Delivers queued hard examples until the process ends: at once when one is queued, then
    /// every `retry` while any is left.
    pub async fn deliver_outbox(self: Arc<Self>) {
        loop {
            let delivered = self.deliver_once().await;
            match delivered {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => tracing::warn!("outbox: {e:#}"),
            }
            let _ = tokio::time::timeout(self.retry, self.outbox_wake.notified()).await;
        }
    }

    /// One pass; true if it delivered everything it tried.
    async fn deliver_once(&self) -> anyhow::Result<bool> {
        let rows = self.with_store(|s| s.outbox(64)).await?;
        if rows.is_empty() {
            return Ok(false);
        }
        for row in rows {
            if lock(&self.in_flight).contains(&row.id) {
                continue;
            }
            let Some(service) = self.services.get(&row.service) else {
                tracing::warn!(service = %row.service, id = row.id, "outbox: no such service any more; kept");
                return Ok(false);
            };
            let headers = [(EXAMPLE_HEADER, row.id.to_string()), (QUEUED_HEADER, row.queued_ms.to_string())];
            match service.cloud.post("", row.input, &headers).await {
                Ok(CloudCall::Answered { .. }) => {
                    self.with_store(move |s| s.delivered(row.id)).await?;
                    self.outbox_delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(service = %row.service, id = row.id, "outbox: hard example delivered");
                }
                Ok(CloudCall::Unreachable(_)) => return Ok(false),
                Err(e) => {
                    // Refused for good (e.g. an input the cloud's model cannot take): keeping it
                    // would block the queue forever.
                    tracing::error!(service = %row.service, id = row.id, "outbox: dropped: {e:#}");
                    self.with_store(move |s| s.delivered(row.id)).await?;
                }
            }
        }
        Ok(true)
    }

    async fn split(
        self: &Arc<Self>,
        service: &Arc<Service>,
        split: Arc<Split>,
        inputs: Vec<TensorData>,
        forced_cut: Option<Vec<String>>,
    ) -> anyhow::Result<InferResponse> {
        let t0 = Instant::now();
        self.plan_if_missing(service).await?;
        let cut = match forced_cut {
            Some(cut) => cut,
            None => lock(&split.state).plan.as_ref().map(|p| p.cut.clone()).context("no plan")?,
        };
        let (runtime, name, head_split, head_cut) =
            (self.runtime.clone(), service.name.clone(), split.clone(), cut.clone());
        let (inputs, halves, activations) = blocking(move || {
            let mut state = lock(&head_split.state);
            let halves = head_split.halves(&mut state, &runtime, &name, &head_cut)?;
            let mut activations = match &halves.head {
                Some(head) => state.plugin.run(head, &inputs)?,
                None => Vec::new(),
            };
            // Cut tensors that are model inputs travel as they came.
            activations.extend(inputs.iter().filter(|t| head_cut.contains(&t.name)).cloned());
            Ok((inputs, halves, activations))
        })
        .await?;
        let edge_ms = t0.elapsed().as_secs_f64() * 1e3;
        let answer = |outputs: &[TensorData],
                      computed: &'static str,
                      fallback: bool,
                      upload_bytes: Option<usize>|
         -> anyhow::Result<InferResponse> {
            service.metrics.observe(computed, t0.elapsed());
            Ok(InferResponse {
                service: service.name.clone(),
                outputs: named_values(outputs)?,
                computed,
                results: Vec::new(),
                cut: Some(cut.clone()),
                fallback,
                upload_bytes,
                edge_ms,
                total_ms: t0.elapsed().as_secs_f64() * 1e3,
            })
        };
        if !halves.has_tail {
            return answer(&activations, "edge", false, None);
        }
        let mut headers = vec![(CUT_HEADER, cut.join(",")), (DIGEST_HEADER, split.digest.clone())];
        let body = match &split.codec {
            Some(codec) => {
                headers.push((COMPRESSOR_HEADER, codec.digest.clone()));
                let (s, a) = (split.clone(), activations.clone());
                let encoded = blocking(move || Ok(s.codec.as_ref().context("codec")?.encode(&a)?)).await?;
                let body = wire::to_safetensors(&encoded)?;
                let raw: usize = activations.iter().map(|t| t.data.len()).sum();
                lock(&split.state).compression_ratio = Some(raw as f64 / body.len().max(1) as f64);
                body
            }
            None => wire::to_safetensors(&activations)?,
        };
        let upload = body.len();
        let sent = Instant::now();
        match service.cloud.post("/tail", body, &headers).await? {
            CloudCall::Answered { outputs, compute_ms } => {
                let transfer_ms = sent.elapsed().as_secs_f64() * 1e3 - compute_ms;
                self.observe_link(service, &split, upload, transfer_ms);
                answer(&outputs, if halves.head.is_none() { "cloud" } else { "split" }, false, Some(upload))
            }
            CloudCall::Unreachable(why) => {
                tracing::warn!(service = %service.name, "cloud unreachable, running the whole model on the edge: {why}");
                service.metrics.fallbacks.fetch_add(1, Ordering::Relaxed);
                let whole = split.clone();
                let outputs = blocking(move || Ok(lock(&whole.state).plugin.run(&whole.model, &inputs)?)).await?;
                answer(&outputs, "edge", true, None)
            }
        }
    }

    /// Folds one transfer into the bandwidth estimate and plans again when it moved by more
    /// than the service's factor from the planned bandwidth.
    fn observe_link(self: &Arc<Self>, service: &Arc<Service>, split: &Split, bytes: usize, transfer_ms: f64) {
        let replan = {
            let mut state = lock(&split.state);
            let wire_ms = transfer_ms - state.plan.as_ref().map_or(0.0, |p| p.rtt_ms);
            // Transfers shorter than the timer's noise say nothing about the bandwidth.
            if wire_ms < 1.0 || bytes < 4096 {
                return;
            }
            let sample = bytes as f64 * 8.0 / (wire_ms * 1e3);
            let est = match state.measured_mbit_s {
                Some(prev) => 0.7 * prev + 0.3 * sample,
                None => sample,
            };
            state.measured_mbit_s = Some(est);
            state.plan.as_ref().map(|p| {
                let ratio = est / p.bandwidth_mbit_s;
                (ratio > split.replan_factor || ratio < 1.0 / split.replan_factor).then_some(est)
            })
        };
        if let Some(Some(bw)) = replan {
            tracing::info!(service = %service.name, bandwidth_mbit_s = bw, "the link changed: planning again");
            // In the background: the request that saw the change is answered already.
            let (services, service) = (self.clone(), service.clone());
            tokio::spawn(async move {
                if let Err(e) = services.plan(&service, Some(bw)).await {
                    tracing::warn!(service = %service.name, "re-planning: {e:#}");
                }
            });
        }
    }

    /// Plans every split service at start (so the first request does not pay for profiling),
    /// then keeps measuring the link of those whose plan sends nothing to the cloud: no
    /// transfer would tell them the link came back or got faster.
    pub async fn plan_all(self: Arc<Self>) {
        for service in self.services.values() {
            if let Err(e) = self.plan_if_missing(service).await {
                tracing::warn!(service = %service.name, "planning at start: {e:#}");
            }
        }
        for service in self.services.values() {
            let Kind::Split(split) = &service.kind else { continue };
            let Some(every) = split.relink else { continue };
            let (services, service, split) = (self.clone(), service.clone(), split.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let ships_nothing = lock(&split.state)
                        .plan
                        .as_ref()
                        .is_none_or(|p| p.cut.iter().all(|t| split.outputs.contains(t)));
                    if ships_nothing {
                        if let Err(e) = services.plan(&service, None).await {
                            tracing::warn!(service = %service.name, "measuring the link again: {e:#}");
                        }
                    }
                }
            });
        }
    }

    /// Plans a split service unless it has a plan (or one is being made: then waits for it).
    pub async fn plan_if_missing(self: &Arc<Self>, service: &Arc<Service>) -> anyhow::Result<()> {
        let Kind::Split(split) = &service.kind else { return Ok(()) };
        let _planning = split.planner.lock().await;
        if lock(&split.state).plan.is_some() {
            return Ok(());
        }
        self.plan_locked(service, split, None).await
    }

    /// Plans a split service again: at `bandwidth` (Mbit/s) or at a new measure of the link.
    pub async fn plan(self: &Arc<Self>, service: &Arc<Service>, bandwidth: Option<f64>) -> anyhow::Result<()> {
        let Kind::Split(split) = &service.kind else {
            return Err(BadRequest(format!("`{}` is not a split service", service.name)).into());
        };
        let _planning = split.planner.lock().await;
        self.plan_locked(service, split, bandwidth).await
    }

    /// Profiles both sides (once), measures the link (unless `bandwidth` is given), and asks
    /// the splitter for the best cut. The caller holds `split.planner`.
    async fn plan_locked(
        self: &Arc<Self>,
        service: &Arc<Service>,
        split: &Arc<Split>,
        bandwidth: Option<f64>,
    ) -> anyhow::Result<()> {
        let measured = lock(&split.state).planning.is_some();
        if !measured {
            let onnx = split.onnx.clone();
            let profiled = blocking(move || Ok(profile::profile(&onnx, 20)?)).await?;
            // Without the cloud's profile, its nodes are taken to run as fast as here.
            let cloud = self.cloud_profile(service, &split.digest).await;
            let cloud_measured = cloud.is_some();
            let cloud_ms = cloud.unwrap_or_else(|| profiled.node_ms.clone());
            lock(&split.state).planning = Some(Planning {
                typed: profiled.model.encode(),
                profile: profiled.split_profile(cloud_ms),
                cloud_measured,
            });
        } else if lock(&split.state).planning.as_ref().is_some_and(|p| !p.cloud_measured) {
            if let Some(cloud_ms) = self.cloud_profile(service, &split.digest).await {
                if let Some(p) = lock(&split.state).planning.as_mut() {
                    p.profile.cloud_ms = cloud_ms;
                    p.cloud_measured = true;
                }
            }
        }
        let (bandwidth, rtt) = match bandwidth {
            Some(bw) => (bw, lock(&split.state).plan.as_ref().map_or(0.0, |p| p.rtt_ms)),
            None => match self.measure_link(service, split.probe_bytes).await {
                Ok(link) => link,
                Err(e) => {
                    tracing::warn!(service = %service.name, "measuring the link: {e:#}; planning edge-only until it answers");
                    (1e-6, 0.0)
                }
            },
        };
        let (svc, split) = (service.clone(), split.clone());
        blocking(move || {
            let mut guard = lock(&split.state);
            let state = &mut *guard;
            let planning = state.planning.as_ref().context("measured above")?;
            let effective = bandwidth * state.compression_ratio.unwrap_or(1.0);
            let cuts = state.plugin.plan(&planning.typed, &planning.profile, effective, rtt)?;
            let best = cuts.first().context("the splitter returned no cut")?.clone();
            tracing::info!(service = %svc.name, cut = %best.tensors.join(","), predicted_ms = best.predicted_ms, bandwidth_mbit_s = bandwidth, rtt_ms = rtt, "planned");
            state.measured_mbit_s = Some(bandwidth);
            state.plan =
                Some(Plan { cut: best.tensors, predicted_ms: best.predicted_ms, bandwidth_mbit_s: bandwidth, rtt_ms: rtt, cuts });
            svc.metrics.replans.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    /// The cloud's per-node times for the model, if it has the same one.
    async fn cloud_profile(&self, service: &Service, digest: &str) -> Option<BTreeMap<String, f64>> {
        #[derive(serde::Deserialize)]
        struct CloudProfile {
            digest: String,
            node_ms: BTreeMap<String, f64>,
        }
        let resp = service
            .cloud
            .http
            .get(service.cloud.url("/profile"))
            .bearer_auth(&service.cloud.token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .ok()?;
        let p: CloudProfile = resp.error_for_status().ok()?.json().await.ok()?;
        if p.digest != digest {
            tracing::warn!(service = %service.name, "the cloud's model differs from the edge's ({} vs {digest})", p.digest);
            return None;
        }
        Some(p.node_ms)
    }

    /// Round-trip time (median of 5 pings) and bandwidth (one probe upload) to the cloud.
    async fn measure_link(&self, service: &Service, probe: usize) -> anyhow::Result<(f64, f64)> {
        let ping = format!("{}/v1/ping", service.cloud.base.trim_end_matches('/'));
        let mut rtts = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let probe = service.cloud.http.get(&ping).bearer_auth(&service.cloud.token).timeout(service.cloud.timeout);
            probe.send().await?.error_for_status()?;
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        rtts.sort_by(f64::total_cmp);
        let rtt = rtts[rtts.len() / 2];
        let t = Instant::now();
        service
            .cloud
            .http
            .post(&ping)
            .bearer_auth(&service.cloud.token)
            .timeout(Duration::from_secs(120))
            .body(vec![0u8; probe])
            .send()
            .await?
            .error_for_status()?;
        let wire_ms = (t.elapsed().as_secs_f64() * 1e3 - rtt).max(0.05);
        Ok((probe as f64 * 8.0 / (wire_ms * 1e3), rtt))
    }

    /// The plan of a split service, for `GET /v1/infer/<service>/plan`.
    pub fn plan_report(&self, service: &Service) -> Option<serde_json::Value> {
        let Kind::Split(split) = &service.kind else { return None };
        let state = lock(&split.state);
        let plan = state.plan.as_ref()?;
        Some(serde_json::json!({
            "cut": plan.cut,
            "predicted_ms": plan.predicted_ms,
            "bandwidth_mbit_s": plan.bandwidth_mbit_s,
            "rtt_ms": plan.rtt_ms,
            "measured_bandwidth_mbit_s": state.measured_mbit_s,
            "cuts": plan.cuts,
        }))
    }
}

impl Split {
    /// The halves of `cut`, partitioned by the plugin and the head registered with the
    /// runtime's models (once per cut). Registering a model takes a new plugin instance to see
    /// it, so the instance is replaced then.
    fn halves(
        &self,
        state: &mut SplitState,
        runtime: &Runtime,
        service: &str,
        cut: &[String],
    ) -> anyhow::Result<Halves> {
        if let Some(h) = state.halves.get(cut) {
            return Ok(h.clone());
        }
        let typed = &state.planning.as_ref().context("a split service plans before it cuts")?.typed;
        let (head, tail) = state.plugin.partition(typed, cut)?;
        let head = match head {
            Some(bytes) => {
                let name = format!("{service}.head.{}", &content_digest(cut.join(",").as_bytes())[7..19]);
                runtime.models().insert(&name, &bytes)?;
                state.plugin = SplitterPlugin::new(runtime, self.component.clone(), self.limits, &self.config)?;
                Some(name)
            }
            None => None,
        };
        let halves = Halves { head, has_tail: tail.is_some() };
        state.halves.insert(cut.to_vec(), halves.clone());
        Ok(halves)
    }
}

fn replace_row(out: &mut TensorData, row: u64, with: &TensorData) -> anyhow::Result<()> {
    let rows = out.shape.first().copied().unwrap_or(1).max(1);
    let row_bytes = out.data.len() as u64 / rows;
    if with.data.len() as u64 != row_bytes || with.dtype != out.dtype {
        bail!("the cloud's output `{}` does not fit the edge model's ({:?} vs {:?})", with.name, with.shape, out.shape);
    }
    out.data[(row * row_bytes) as usize..((row + 1) * row_bytes) as usize].copy_from_slice(&with.data);
    Ok(())
}

fn named_values(outputs: &[TensorData]) -> anyhow::Result<Vec<NamedValue>> {
    outputs
        .iter()
        .map(|t| Ok(NamedValue { name: t.name.clone(), shape: t.shape.clone(), data: wire::f32_values(t)? }))
        .collect()
}

/// Parses a request body by content type: JSON, or safetensors.
/// A request body of a content type neither JSON nor safetensors, and no adapter to read it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnsupportedBody(pub String);

impl Services {
    /// The model's inputs from a request body: JSON, safetensors, or anything the service's
    /// adapter reads (e.g. an image).
    pub async fn decode_body(
        &self,
        service: &Arc<Service>,
        content_type: Option<&str>,
        body: axum::body::Bytes,
    ) -> anyhow::Result<Vec<TensorData>> {
        let media = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string());
        match media.as_deref() {
            Some("application/json") | None | Some("application/safetensors") | Some("application/octet-stream") => {
                parse_body(media.as_deref(), &body, &service.inputs).map_err(|e| BadRequest(format!("{e:#}")).into())
            }
            Some(other) => {
                if service.adapter.is_none() {
                    return Err(UnsupportedBody(format!(
                        "content type `{other}` is not accepted by `{}`: send application/json or application/safetensors, or give the service an `adapter`",
                        service.name
                    ))
                    .into());
                }
                let (svc, other) = (service.clone(), other.to_string());
                blocking(move || {
                    let (adapter, specs) = svc.adapter.as_ref().context("checked above")?;
                    let tensors = lock(adapter).decode(&other, &body, specs)?;
                    tensors.iter().try_for_each(wire::check)?;
                    Ok(tensors)
                })
                .await
            }
        }
    }
}

pub fn parse_body(content_type: Option<&str>, body: &[u8], inputs: &[String]) -> anyhow::Result<Vec<TensorData>> {
    match content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
        Some("application/json") | None => {
            let req: InferRequest = serde_json::from_slice(body).context("request body (JSON)")?;
            Ok(req.into_tensors(inputs)?)
        }
        Some("application/safetensors") | Some("application/octet-stream") => {
            let tensors = wire::from_safetensors(body)?;
            tensors.iter().try_for_each(wire::check)?;
            Ok(tensors)
        }
        Some(other) => {
            bail!("content type `{other}` is not accepted: send application/json or application/safetensors")
        }
    }
}
