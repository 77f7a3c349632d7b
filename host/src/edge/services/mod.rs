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
//!
//! Here: the services and their loading, request dispatch and body decoding; [`joint`] (joint
//! inference, switching a service's model, the outbox), [`split`] (split inference and
//! planning), [`cloud_link`] (calls to the cloud's side of a service).
mod cloud_link;
mod dispatch;
mod joint;
mod offload;
mod split;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use super::error::{BadRequest, Overloaded, UnsupportedBody};
use crate::components::Components;
use crate::config::edge::{self as edge_config, EdgeConfig, ServiceConfig, ServiceKind};
use crate::inference::codec::ActivationCodec;
use crate::inference::profile;
use crate::inference::{json_request, wire};
use crate::lock;
use crate::runtime::config::ConfigTable;
use crate::runtime::nn::SessionOptions;
use crate::runtime::{
    content_digest, AdapterPlugin, CompressorPlugin, InputSpec, Route, Runtime, SplitterPlugin, TensorData,
};
use crate::store::EdgeStore;
use cloud_link::CloudLink;
use dispatch::{Dispatcher, Instances};
pub use joint::PreparedSwitch;
use joint::{Joint, Routed};
use offload::Offload;
use split::{HeadRan, HeadRun, Split, SplitState};

/// A joint service's requests: inputs in, the edge model's outputs and the router's decisions out.
type JointDispatch = Dispatcher<Vec<TensorData>, Routed>;
/// A split service's model runs on the edge (heads, and the whole model when the cloud is away).
type SplitDispatch = Dispatcher<HeadRun, HeadRan>;

/// Counters of one service, for `/metrics`.
#[derive(Default)]
pub struct ServiceMetrics {
    pub inferences: AtomicU64,
    pub hard_examples: AtomicU64,
    pub fallbacks: AtomicU64,
    /// Joint with `offload_when_faster`: requests sent whole to the cloud.
    pub offloads: AtomicU64,
    pub replans: AtomicU64,
    /// Requests refused with 503 because the service's queue was full.
    pub refused: AtomicU64,
    /// Hard examples neither delivered nor kept (cloud unreachable, state directory full).
    pub dropped: AtomicU64,
    /// Per route ("edge", "cloud", "split"): the latency of the requests answered.
    pub latency: Mutex<BTreeMap<&'static str, prometheus_client::metrics::histogram::Histogram>>,
}

impl ServiceMetrics {
    fn observe(&self, route: &'static str, elapsed: Duration) {
        let histogram =
            crate::lock(&self.latency).entry(route).or_insert_with(crate::metrics::latency_histogram).clone();
        histogram.observe(elapsed.as_secs_f64());
    }
}

/// One answered example (a row of the batch).
#[derive(Debug, Clone, Serialize)]
pub struct RowResult {
    pub index: u64,
    /// Where this row's outputs were computed: "edge" or "cloud".
    pub computed: &'static str,
    /// The router's decision and score (None: the request was offloaded, the router did not run).
    pub route: Route,
    pub score: Option<f64>,
    /// The cloud could not be reached: the edge answered and the example waits in the outbox.
    pub queued: bool,
    /// The cloud could not be reached and the state directory is full or read-only: the edge
    /// answered and the example was not kept.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dropped: bool,
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
    /// Joint with `offload_when_faster`: the whole request went to the cloud, the edge model did
    /// not run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub offloaded: bool,
    /// Split: bytes of cut tensors sent to the cloud (after the service's compressor, if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_bytes: Option<usize>,
    pub edge_ms: f64,
    pub total_ms: f64,
}

// Arcs, so a blocking task can hold its service's half without the whole service.
enum Kind {
    Joint(Arc<Joint>, JointDispatch),
    Split(Arc<Split>, SplitDispatch),
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

    /// Requests waiting for a free instance.
    pub fn waiting(&self) -> usize {
        match &self.kind {
            Kind::Joint(_, d) => d.waiting(),
            Kind::Split(_, d) => d.waiting(),
        }
    }

    /// Batches run on the edge so far (one per request without batching).
    pub fn batches(&self) -> u64 {
        match &self.kind {
            Kind::Joint(_, d) => d.batches(),
            Kind::Split(_, d) => d.batches(),
        }
    }
}

/// Every inference service of an edge, and the outbox of hard examples they share.
pub struct Services {
    pub services: BTreeMap<String, Arc<Service>>,
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

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
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
        let mut threads_of: HashMap<&str, (&str, u32)> = HashMap::new();
        for (name, cfg) in &edge.services {
            if let Some((other, threads)) = threads_of.insert(&cfg.model, (name, cfg.threads)) {
                if threads != cfg.threads {
                    bail!(
                        "[services.{name}] threads: model `{}` is served by `{other}` with threads = {threads}, here with {} (a model's sessions run one way)",
                        cfg.model,
                        cfg.threads
                    );
                }
            }
        }
        let mut services = BTreeMap::new();
        for (name, cfg) in &edge.services {
            let service = Self::load_one(name, cfg, edge, base, runtime, components)
                .await
                .with_context(|| format!("[services.{name}]"))?;
            services.insert(name.clone(), Arc::new(service));
        }
        let services = Services {
            services,
            store,
            runtime: runtime.clone(),
            outbox_delivered: AtomicU64::new(0),
            outbox_wake: tokio::sync::Notify::new(),
            in_flight: Arc::default(),
            retry: Duration::from_millis(edge.outbox_retry_ms),
        };
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
        if cfg.kind == ServiceKind::Split && cfg.offload_when_faster {
            bail!("offload_when_faster: only for kind = \"joint\" (a split service's plan already weighs sending the input against computing here)");
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
        let sizes = concurrency(cfg, &decoded)?;
        let relink = (cfg.relink_secs > 0).then(|| Duration::from_secs(cfg.relink_secs));
        let session = SessionOptions { intra_threads: Some(cfg.threads as usize) };
        runtime
            .models()
            .insert_with(&cfg.model, &onnx, session)
            .with_context(|| format!("model: {}", path.display()))?;
        let p = components.load_plugin(plugin_cfg, base, runtime).await.with_context(|| format!("{field}.plugin"))?;
        let (loaded, limits) = (p.loaded, p.limits);
        let config: ConfigTable = plugin_cfg.config.clone();
        let kind = match cfg.kind {
            ServiceKind::Joint => {
                let mut joint = Joint {
                    serving: Mutex::default(),
                    configured: cfg.model.clone(),
                    component: loaded,
                    limits,
                    config,
                    instances: sizes.0,
                    session,
                    offload: cfg.offload_when_faster.then(|| Offload::new(relink)),
                };
                joint.serving = Mutex::new(Arc::new(joint.serving_model(runtime, &cfg.model).context("router")?));
                let joint = Arc::new(joint);
                let (j, rt) = (joint.clone(), runtime.clone());
                let work = Arc::new(move |batch: Vec<Vec<TensorData>>| j.run_batch(&rt, batch));
                Kind::Joint(joint, Dispatcher::new(name, sizes, dispatch::stackable, work)?)
            }
            ServiceKind::Split => {
                let plugin = SplitterPlugin::new(runtime, loaded.clone(), limits, &config).context("splitter")?;
                let split = Arc::new(Split {
                    model: cfg.model.clone(),
                    digest: content_digest(&onnx),
                    onnx,
                    outputs,
                    replan_factor: cfg.replan_factor,
                    probe_bytes: (cfg.probe_kib.max(1) << 10) as usize,
                    relink,
                    component: loaded,
                    limits,
                    config,
                    codec,
                    session,
                    runners: Instances::default(),
                    state: Mutex::new(SplitState {
                        plugin,
                        planning: None,
                        plan: None,
                        halves: HashMap::new(),
                        measured_mbit_s: None,
                        compression_ratio: None,
                    }),
                    planner: tokio::sync::Mutex::new(()),
                });
                let (sp, rt) = (split.clone(), runtime.clone());
                let work = Arc::new(move |batch: Vec<HeadRun>| batch.into_iter().map(|run| sp.run(&rt, run)).collect());
                Kind::Split(split, Dispatcher::new(name, sizes, |_, _| false, work)?)
            }
        };
        let cloud_base = cfg.cloud.clone().unwrap_or_else(|| edge.cloud.clone());
        let http = crate::client::cloud_http(&cloud_base, &edge.cloud_tls, edge.allow_plaintext)
            .with_context(|| format!("services.{name}.cloud"))?
            .build()?;
        Ok(Service {
            name: name.to_string(),
            inputs,
            adapter,
            cloud: CloudLink {
                http,
                base: cloud_base,
                service: cfg.cloud_service.clone().unwrap_or_else(|| name.to_string()),
                token: edge.token.expose().to_string(),
                timeout: Duration::from_millis(cfg.cloud_timeout_ms),
            },
            kind,
            metrics: ServiceMetrics::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Service>> {
        self.services.get(name).cloned()
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
        let answer = match &service.kind {
            Kind::Joint(joint, dispatch) => self.joint(&service, joint, dispatch, inputs).await,
            Kind::Split(split, dispatch) => self.split(&service, split.clone(), dispatch, inputs, forced_cut).await,
        };
        if answer.as_ref().is_err_and(|e| e.is::<Overloaded>()) {
            service.metrics.refused.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    /// Runs a blocking closure on the edge store (SQLite commits wait for the disk).
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EdgeStore) -> crate::store::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let store = self.store.clone();
        blocking(move || Ok(f(&store)?)).await
    }
}

/// A service's (instances, queue, batch_max), checked against the limits and the model.
fn concurrency(cfg: &ServiceConfig, model: &nereid_onnx::Model) -> anyhow::Result<(usize, usize, usize)> {
    let instances = cfg.instances();
    if !(1..=edge_config::MAX_INSTANCES).contains(&instances) {
        bail!("instances: must be 1..={} (got {instances})", edge_config::MAX_INSTANCES);
    }
    if !(1..=edge_config::MAX_THREADS).contains(&cfg.threads) {
        bail!("threads: must be 1..={} (got {})", edge_config::MAX_THREADS, cfg.threads);
    }
    if !(1..=edge_config::MAX_QUEUE).contains(&cfg.queue) {
        bail!("queue: must be 1..={} (got {})", edge_config::MAX_QUEUE, cfg.queue);
    }
    if !(1..=edge_config::MAX_BATCH).contains(&cfg.batch_max) {
        bail!("batch_max: must be 1..={} (got {})", edge_config::MAX_BATCH, cfg.batch_max);
    }
    if cfg.batch_max > 1 {
        if cfg.kind != ServiceKind::Joint {
            bail!("batch_max: only for kind = \"joint\" (a split request's cut tensors travel alone)");
        }
        let specs = profile::input_specs(model).context("batch_max: the model's inputs")?;
        if let Some(fixed) = specs.iter().find(|s| !matches!(s.shape.first(), Some(None))) {
            bail!(
                "batch_max: the model's input `{}` has a fixed first dimension ({:?}): requests cannot be stacked",
                fixed.name,
                fixed.shape
            );
        }
    }
    Ok((instances as usize, cfg.queue as usize, cfg.batch_max as usize))
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
                    adapt(&mut lock(adapter), &other, &body, specs)
                })
                .await
            }
        }
    }
}

/// The model's inputs from a body `adapter` reads (e.g. an image), checked as a JSON or
/// safetensors body's would be.
pub fn adapt(
    adapter: &mut AdapterPlugin,
    content_type: &str,
    body: &[u8],
    inputs: &[InputSpec],
) -> anyhow::Result<Vec<TensorData>> {
    let tensors = adapter.decode(content_type, body, inputs)?;
    tensors.iter().try_for_each(wire::check)?;
    Ok(tensors)
}

/// Parses a request body by content type: JSON (`{"shape", "data"}` or named inputs), or
/// safetensors.
pub fn parse_body(content_type: Option<&str>, body: &[u8], inputs: &[String]) -> anyhow::Result<Vec<TensorData>> {
    match content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
        Some("application/json") | None => {
            let req = json_request::from_json(body).context("request body (JSON)")?;
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
