//! The cloud host: jobs, rounds, the HTTP API edges and operators talk to, and Prometheus metrics.
//!
//! A round: select clients among the nodes that polled recently (seeded, so the same nodes give
//! the same selection), publish the global model v(r-1), persist every accepted update before
//! acknowledging it, close on quorum (every selected node uploaded) or at the deadline (if at least
//! `min_clients` did), fold the updates into the aggregator in node-name order — so the same set
//! of updates gives a bit-identical v(r) whatever the arrival order, and a restarted cloud replays
//! exactly what it had — then commit v(r) and the round's summary in one transaction.
mod inference;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::seq::SliceRandom;
use rand::SeedableRng;

mod plugins;

use crate::aggregate::{Rejection, RoundError, RoundFold};
use crate::components::Components;
use crate::job::JobSpec;
use crate::model_io;
use crate::protocol::*;
use crate::runtime::{content_digest, ClientUpdate, RoundContext, Runtime, UpdateKind};
use crate::store::{now_ms, CloudStore, Inserted, JobRow, StoreError};
use plugins::{JobPlugins, LiveAggregator};

/// An HTTP error with a JSON body.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn err(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

#[derive(Default)]
struct Counters {
    updates_accepted: AtomicU64,
    updates_duplicate: AtomicU64,
    updates_refused: AtomicU64,
    unauthorized: AtomicU64,
    rounds_closed: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Per (job, round): bytes sent and received, for the round summary.
type Traffic = HashMap<(String, u32), (u64, u64)>;

pub struct Cloud {
    store: CloudStore,
    inference: inference::CloudInference,
    plugins: JobPlugins,
    admin_sha: String,
    online_ms: i64,
    counters: Counters,
    /// When each node last made a request. Soft state, kept in memory: it is refreshed by every
    /// poll, so writing it to disk (an fsync per request) would buy nothing.
    last_seen: Mutex<HashMap<String, i64>>,
    traffic: Mutex<Traffic>,
    /// The newest model each job served, shared by every download of it.
    served: Mutex<HashMap<String, (u32, Bytes)>>,
    /// The fold of each job's open round, as far as it got.
    folds: Mutex<HashMap<String, ActiveFold>>,
    wake: tokio::sync::Notify,
    /// Upload bodies held in memory at once; further uploads wait (TCP backpressure), which
    /// bounds the cloud's memory whatever the number of clients.
    upload_slots: tokio::sync::Semaphore,
    max_upload: usize,
}

/// Upload bodies read at once.
const UPLOAD_SLOTS: usize = 4;

/// A round's fold in progress. Updates are fed in node-name order (the round's selection,
/// sorted): each one as soon as it and every selected node before it have arrived, like a
/// reorder buffer, so folding goes on while uploads arrive and the result is the same whatever
/// the arrival order. Updates waiting for an earlier node wait on disk.
struct ActiveFold {
    round: u32,
    /// The aggregator this round began with; a swap takes effect at the next round.
    aggregator: LiveAggregator,
    order: Vec<String>,
    next: usize,
    fold: RoundFold,
}

enum Caller {
    Admin,
    Node(String),
}

impl Cloud {
    fn caller(&self, headers: &HeaderMap) -> ApiResult<Caller> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let refuse = || {
            self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            err(StatusCode::UNAUTHORIZED, "missing or invalid bearer token")
        };
        let Some(token) = token else { return Err(refuse()) };
        let sha = token_sha256(token);
        if sha == self.admin_sha {
            return Ok(Caller::Admin);
        }
        match self.store.node_for_token(&sha)? {
            Some(node) => {
                if let Ok(mut seen) = self.last_seen.lock() {
                    seen.insert(node.clone(), now_ms());
                }
                Ok(Caller::Node(node))
            }
            None => Err(refuse()),
        }
    }

    fn admin(&self, headers: &HeaderMap) -> ApiResult<()> {
        match self.caller(headers)? {
            Caller::Admin => Ok(()),
            Caller::Node(n) => Err(err(StatusCode::FORBIDDEN, format!("node `{n}` may not manage jobs"))),
        }
    }

    fn node(&self, headers: &HeaderMap) -> ApiResult<String> {
        match self.caller(headers)? {
            Caller::Node(n) => Ok(n),
            Caller::Admin => Err(err(StatusCode::FORBIDDEN, "this endpoint is for nodes")),
        }
    }

    /// Nodes that made a request since `since_ms`, sorted.
    fn online_since(&self, since_ms: i64) -> Vec<String> {
        let mut online: Vec<String> = self
            .last_seen
            .lock()
            .map(|seen| seen.iter().filter(|(_, t)| **t >= since_ms).map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        online.sort();
        online
    }

    fn traffic(&self, job: &str, round: u32, up: u64, down: u64) {
        if let Ok(mut t) = self.traffic.lock() {
            let e = t.entry((job.to_string(), round)).or_default();
            e.0 += up;
            e.1 += down;
        }
        self.counters.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.counters.bytes_down.fetch_add(down, Ordering::Relaxed);
    }
}

fn spec_of(row: &JobRow) -> ApiResult<JobSpec> {
    serde_json::from_str(&row.spec).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, format!("stored job spec: {e}")))
}

/// The seed of one node's training in one round.
pub fn node_seed(job_seed: u64, round: u32, node: &str) -> u64 {
    let mut h = sha2::Sha256::new();
    use sha2::Digest;
    h.update(job_seed.to_le_bytes());
    h.update(round.to_le_bytes());
    h.update(node.as_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("32-byte digest"))
}

// ---- handlers -------------------------------------------------------------------------------

async fn health() -> &'static str {
    "ok"
}

async fn task(State(cloud): State<Arc<Cloud>>, headers: HeaderMap) -> ApiResult<Json<TaskResponse>> {
    let node = cloud.node(&headers)?;
    for row in cloud.store.jobs()?.into_iter().filter(|j| j.status == "running") {
        let Some(round) = cloud.store.round(&row.name, row.next_round)? else { continue };
        if round.closed_ms.is_some() || !round.selected.contains(&node) {
            continue;
        }
        if cloud.store.update_nodes(&row.name, round.round)?.contains(&node) {
            continue;
        }
        let spec = spec_of(&row)?;
        let server_config = cloud.plugins.published(&spec.name);
        return Ok(Json(TaskResponse {
            task: Some(Task {
                job: spec.name.clone(),
                round: round.round,
                model_version: round.round - 1,
                seed: node_seed(spec.seed, round.round, &node),
                model: spec.model.clone(),
                training: spec.training.for_node(&node),
                client_objective: spec.client_objective.clone(),
                compressor: spec.compressor.clone(),
                server_config,
                deadline_ms: round.deadline_ms,
            }),
        }));
    }
    Ok(Json(TaskResponse { task: None }))
}

async fn model(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    UrlPath((job, version)): UrlPath<(String, u32)>,
) -> ApiResult<Bytes> {
    let caller = cloud.caller(&headers)?;
    let cached =
        cloud.served.lock().ok().and_then(|m| m.get(&job).filter(|(v, _)| *v == version).map(|(_, b)| b.clone()));
    let bytes = match cached {
        Some(b) => b,
        None => {
            let b =
                Bytes::from(cloud.store.model(&job, version)?.ok_or_else(|| {
                    err(StatusCode::NOT_FOUND, format!("job `{job}` has no model version {version}"))
                })?);
            if let Ok(mut m) = cloud.served.lock() {
                if m.get(&job).is_none_or(|(v, _)| *v < version) {
                    m.insert(job.clone(), (version, b.clone()));
                }
            }
            b
        }
    };
    if let Caller::Node(_) = caller {
        // A node fetches v(r-1) to train round r.
        cloud.traffic(&job, version + 1, 0, bytes.len() as u64);
    }
    Ok(bytes)
}

async fn component(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    UrlPath(digest): UrlPath<String>,
) -> ApiResult<Vec<u8>> {
    cloud.caller(&headers)?;
    cloud.store.component(&digest)?.ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no component {digest}")))
}

async fn put_component(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    cloud.admin(&headers)?;
    let digest = content_digest(&body);
    cloud.store.put_component(&digest, &body)?;
    Ok(Json(serde_json::json!({ "digest": digest })))
}

async fn upload(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    UrlPath((job, round)): UrlPath<(String, u32)>,
    body: axum::body::Body,
) -> ApiResult<Json<UploadResponse>> {
    let node = cloud.node(&headers)?;
    let _slot = cloud.upload_slots.acquire().await.map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let refused = |status: StatusCode, message: String| {
        cloud.counters.updates_refused.fetch_add(1, Ordering::Relaxed);
        err(status, message)
    };
    let row = cloud.store.job(&job)?.ok_or_else(|| refused(StatusCode::NOT_FOUND, format!("no job `{job}`")))?;
    let r = cloud
        .store
        .round(&job, round)?
        .ok_or_else(|| refused(StatusCode::CONFLICT, format!("job `{job}` has not opened round {round}")))?;
    if cloud.store.update(&job, round, &node)?.is_some() {
        cloud.counters.updates_duplicate.fetch_add(1, Ordering::Relaxed);
        return Ok(Json(UploadResponse { status: "duplicate".into() }));
    }
    if r.closed_ms.is_some() {
        return Err(refused(
            StatusCode::CONFLICT,
            format!("round {round} of job `{job}` is closed; the job is at round {}", row.next_round),
        ));
    }
    if !r.selected.contains(&node) {
        return Err(refused(StatusCode::FORBIDDEN, format!("node `{node}` was not selected for round {round}")));
    }
    let spec = spec_of(&row)?;
    // Streamed to its file and fsynced: the cloud holds no more than a chunk of an update.
    let path = cloud.store.new_update_file(&job, round, &node);
    let written = receive(body, &path, cloud.max_upload).await;
    let fail = |e: ApiError| {
        let _ = std::fs::remove_file(&path);
        cloud.counters.updates_refused.fetch_add(1, Ordering::Relaxed);
        e
    };
    let len = written.map_err(fail)?;
    let origin = format!("update from `{node}`");
    let header = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut f =
                std::fs::File::open(&path).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            model_io::read_header(&mut f, len, Path::new(&origin))
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))
        })
        .await
        .map_err(|e| fail(err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))?
        .map_err(fail)?
    };
    if spec.compressor.is_some() {
        // What arrived is the encoded difference to the global model: decoded here, before it
        // is accepted, and stored as the weights it stands for (the fold is the same either way).
        let (c, spec, node, path, metadata) =
            (cloud.clone(), spec.clone(), node.clone(), path.clone(), header.metadata.clone());
        tokio::task::spawn_blocking(move || decode_update(&c, &spec, round, &node, &path, metadata))
            .await
            .map_err(|e| fail(err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))?
            .map_err(|e| fail(err(StatusCode::BAD_REQUEST, e)))?;
    } else {
        let layout: Vec<_> = header.tensors.iter().map(|(n, d, s, _)| (n.clone(), *d, s.clone())).collect();
        if let Err(e) = spec.model.check_layout(&layout) {
            return Err(fail(err(StatusCode::BAD_REQUEST, format!("update from `{node}`: {e}"))));
        }
    }
    let num_examples: u64 = header
        .metadata
        .get(META_NUM_EXAMPLES)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| fail(err(StatusCode::BAD_REQUEST, format!("the update has no `{META_NUM_EXAMPLES}`"))))?;
    let metrics = header.metadata.get(META_METRICS).cloned().unwrap_or_else(|| "{}".into());
    if serde_json::from_str::<UpdateMetrics>(&metrics).is_err() {
        return Err(fail(err(StatusCode::BAD_REQUEST, format!("`{META_METRICS}` is not valid metrics JSON"))));
    }
    // The file is durable; committing its row makes the update accepted.
    let inserted = cloud.store.insert_update(&job, round, &node, num_examples, &metrics, &path)?;
    let body_len = len;
    let status = match inserted {
        Inserted::New => {
            cloud.counters.updates_accepted.fetch_add(1, Ordering::Relaxed);
            cloud.traffic(&job, round, body_len, 0);
            cloud.wake.notify_waiters();
            "accepted"
        }
        Inserted::Duplicate => {
            cloud.counters.updates_duplicate.fetch_add(1, Ordering::Relaxed);
            "duplicate"
        }
    };
    Ok(Json(UploadResponse { status: status.into() }))
}

/// Decodes the compressed update in `path` with the job's compressor and rewrites the file as
/// the weights it encodes: the global model plus the decoded difference.
fn decode_update(
    cloud: &Cloud,
    spec: &JobSpec,
    round: u32,
    node: &str,
    path: &Path,
    metadata: HashMap<String, String>,
) -> Result<(), String> {
    let origin = format!("update from `{node}`");
    let payload = model_io::read(path).map_err(|e| format!("{origin}: {e}"))?;
    let plugin = cloud
        .plugins
        .compressor(&cloud.store, spec)
        .map_err(|e| format!("the job's compressor: {e:#}"))?
        .ok_or_else(|| "the job has no compressor".to_string())?;
    let ctx = RoundContext { job: spec.name.clone(), round, seed: node_seed(spec.seed, round, node) };
    let delta = plugin
        .lock()
        .map_err(|_| "compressor lock poisoned".to_string())?
        .decode(&ctx, &payload, &origin)
        .map_err(|e| e.to_string())?;
    let layout: Vec<_> = delta.iter().map(|(n, t)| (n.clone(), t.dtype(), t.shape().to_vec())).collect();
    spec.model.check_layout(&layout).map_err(|e| format!("{origin}, decoded: {e}"))?;
    let mut weights = global_model(cloud, &spec.name, round).map_err(|e| e.to_string())?;
    for (name, w) in &mut weights {
        let d =
            delta.iter().find(|(n, _)| n == name).map(|(_, d)| d).ok_or_else(|| format!("{origin}: no `{name}`"))?;
        w.axpy(1.0, d).map_err(|e| format!("{origin}: `{name}`: {e}"))?;
    }
    model_io::write(path, &weights, Some(metadata)).map_err(|e| e.to_string())
}

/// Streams a request body into `path` (at most `max` bytes) and fsyncs it; returns its length.
async fn receive(body: axum::body::Body, path: &Path, max: usize) -> Result<u64, ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let internal = |e: std::io::Error| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    // tokio buffers up to 2 MiB per file before handing a write to its blocking pool; with
    // UPLOAD_SLOTS uploads at once that would add up.
    file.set_max_buf_size(1 << 18);
    let mut stream = body.into_data_stream();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| err(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")))?;
        total += chunk.len();
        if total > max {
            return Err(err(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the update is larger than the cloud's limit of {max} bytes"),
            ));
        }
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.sync_all().await.map_err(internal)?;
    Ok(total as u64)
}

/// Applies a job: creates it, or — for a running job whose plugins changed — checks the new
/// plugins and switches to them at the next round boundary (the old ones keep serving until then,
/// and for good if the new ones are refused).
async fn submit_job(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    Json(req): Json<SubmitJob>,
) -> ApiResult<Json<JobSummary>> {
    cloud.admin(&headers)?;
    let mut spec = req.spec;
    spec.model.validate().map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    // Registry plugins are resolved here, once: every node gets the same pinned digest.
    cloud.plugins.resolve(&cloud.store, &mut spec).await.map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    for (_, p) in spec.plugins() {
        if cloud.store.component(&p.digest)?.is_none() {
            return Err(err(StatusCode::BAD_REQUEST, format!("component {} was not uploaded", p.digest)));
        }
    }
    let summary = |status: &str, note: Option<String>| JobSummary {
        name: spec.name.clone(),
        status: status.into(),
        rounds_done: 0,
        max_rounds: spec.stop.rounds,
        note,
    };
    if let Some(row) = cloud.store.job(&spec.name)? {
        if row.status != "running" {
            return Err(err(
                StatusCode::CONFLICT,
                format!("a job named `{}` exists already ({})", row.name, row.status),
            ));
        }
        let current = spec_of(&row)?;
        let changed = changed_fields(&current, &spec);
        if !changed.is_empty() {
            return Err(err(
                StatusCode::CONFLICT,
                format!(
                    "job `{}` is running: only its plugins ([aggregator], [client_objective]) can change, not {}",
                    spec.name,
                    changed.join(", ")
                ),
            ));
        }
        if current == spec {
            return Ok(Json(JobSummary {
                rounds_done: row.next_round - 1,
                ..summary("running", Some("unchanged".into()))
            }));
        }
        let (c, cur, new) = (cloud.clone(), current.clone(), spec.clone());
        tokio::task::spawn_blocking(move || c.plugins.prepare(&c.store, &cur, &new))
            .await
            .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| err(StatusCode::BAD_REQUEST, format!("{e:#}; the running plugins are unchanged")))?;
        let json = serde_json::to_string(&spec).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        cloud.store.set_pending_spec(&spec.name, &json)?;
        tracing::info!(job = %spec.name, "new plugins applied; they take over at the next round boundary");
        cloud.wake.notify_waiters();
        let note = "the new plugins take over at the next round boundary".to_string();
        return Ok(Json(JobSummary { rounds_done: row.next_round - 1, ..summary("running", Some(note)) }));
    }
    let (c, s2) = (cloud.clone(), spec.clone());
    tokio::task::spawn_blocking(move || c.plugins.aggregator(&c.store, &s2).map(drop))
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("aggregator: {e:#}")))?;
    let initial = model_io::encode(&spec.model.init(spec.seed), None)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let json = serde_json::to_string(&spec).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match cloud.store.insert_job(&spec.name, &json, &initial) {
        Err(StoreError::JobExists(n)) => {
            return Err(err(StatusCode::CONFLICT, format!("a job named `{n}` exists already")))
        }
        other => other?,
    }
    tracing::info!(job = %spec.name, "job applied");
    tokio::spawn(run_job(cloud.clone(), spec.name.clone()));
    Ok(Json(summary("running", None)))
}

/// The parts of a job other than its plugins that differ between `a` and `b`.
fn changed_fields(a: &JobSpec, b: &JobSpec) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("job.seed", a.seed == b.seed);
    check("[rounds]", a.rounds == b.rounds);
    check("[stop]", a.stop == b.stop);
    check("[model]", a.model == b.model);
    check("[training]", a.training == b.training);
    check("[client_objective] (added or removed)", a.client_objective.is_some() == b.client_objective.is_some());
    // Updates in flight are coded with the job's compressor: it stays for the whole job.
    check("[compressor]", a.compressor == b.compressor);
    out
}

async fn list_jobs(State(cloud): State<Arc<Cloud>>, headers: HeaderMap) -> ApiResult<Json<Vec<JobSummary>>> {
    cloud.admin(&headers)?;
    let jobs = cloud
        .store
        .jobs()?
        .iter()
        .map(|row| {
            let spec = spec_of(row)?;
            Ok(JobSummary {
                name: row.name.clone(),
                status: row.status.clone(),
                rounds_done: row.next_round - 1,
                max_rounds: spec.stop.rounds,
                note: None,
            })
        })
        .collect::<ApiResult<_>>()?;
    Ok(Json(jobs))
}

fn job_status(cloud: &Cloud, name: &str) -> ApiResult<JobStatus> {
    let row = cloud.store.job(name)?.ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no job `{name}`")))?;
    let spec = spec_of(&row)?;
    let rounds = cloud.store.rounds(name)?;
    let history: Vec<RoundSummary> =
        rounds.iter().filter_map(|r| r.summary.as_deref()).filter_map(|s| serde_json::from_str(s).ok()).collect();
    let current = match rounds.iter().find(|r| r.closed_ms.is_none()) {
        Some(r) if row.status == "running" => Some(CurrentRound {
            round: r.round,
            selected: r.selected.clone(),
            received: cloud.store.update_nodes(name, r.round)?,
            folded: folded(cloud, name, r.round),
            deadline_ms: r.deadline_ms,
        }),
        _ => None,
    };
    let online_since = now_ms() - cloud.online_ms;
    let last_seen = cloud.last_seen.lock().map(|m| m.clone()).unwrap_or_default();
    let nodes = cloud
        .store
        .nodes()?
        .into_iter()
        .map(|n| {
            let seen = last_seen.get(&n).copied();
            let state = match &current {
                Some(c) if c.received.contains(&n) => "uploaded",
                Some(c) if c.selected.contains(&n) => "training",
                _ if seen.is_none_or(|s| s < online_since) => "offline",
                _ => "idle",
            };
            NodeStatus { name: n, last_seen_ms: seen, state: state.into() }
        })
        .collect();
    Ok(JobStatus {
        name: row.name.clone(),
        status: row.status.clone(),
        reason: row.reason.clone(),
        rounds_done: row.next_round - 1,
        max_rounds: spec.stop.rounds,
        aggregator: plugins::label(&spec.aggregator),
        client_objective: spec.client_objective.as_ref().map(plugins::label),
        compressor: spec.compressor.as_ref().map(plugins::label),
        bytes_up_total: history.iter().map(|h| h.bytes_up).sum(),
        swap_pending: row.pending_spec.is_some(),
        swaps: cloud.store.swaps(name)?,
        current,
        nodes,
        history,
    })
}

async fn get_job(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<JobStatus>> {
    cloud.admin(&headers)?;
    Ok(Json(job_status(&cloud, &name)?))
}

async fn stop_job(
    State(cloud): State<Arc<Cloud>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<JobStatus>> {
    cloud.admin(&headers)?;
    cloud.store.job(&name)?.ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no job `{name}`")))?;
    cloud.store.finish_job(&name, "stopped", "stopped by an operator")?;
    cloud.wake.notify_waiters();
    Ok(Json(job_status(&cloud, &name)?))
}

async fn metrics(State(cloud): State<Arc<Cloud>>) -> ApiResult<String> {
    let c = &cloud.counters;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: &AtomicU64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n", v.load(Ordering::Relaxed)));
    };
    counter("nereid_updates_accepted_total", "Client updates persisted and acknowledged.", &c.updates_accepted);
    counter("nereid_updates_duplicate_total", "Uploads of an update the cloud already had.", &c.updates_duplicate);
    counter("nereid_updates_refused_total", "Uploads refused (malformed, late, not selected).", &c.updates_refused);
    counter("nereid_unauthorized_requests_total", "Requests without a valid token.", &c.unauthorized);
    counter("nereid_rounds_closed_total", "Rounds closed.", &c.rounds_closed);
    counter("nereid_upload_bytes_total", "Bytes of accepted updates.", &c.bytes_up);
    counter("nereid_download_bytes_total", "Bytes of global models sent.", &c.bytes_down);
    counter("nereid_plugin_swaps_total", "Plugins swapped in running jobs.", &cloud.plugins.swaps);
    out.push_str(&format!(
        "# HELP nereid_plugin_instances Plugin instances alive in this process.\n# TYPE nereid_plugin_instances gauge\nnereid_plugin_instances {}\n",
        crate::runtime::state::live_instances()
    ));
    out.push_str("# HELP nereid_job_round Rounds closed per job.\n# TYPE nereid_job_round gauge\n");
    out.push_str("# HELP nereid_job_accuracy Accuracy of the newest evaluated global model per job.\n# TYPE nereid_job_accuracy gauge\n");
    for row in cloud.store.jobs()? {
        out.push_str(&format!("nereid_job_round{{job=\"{}\"}} {}\n", row.name, row.next_round - 1));
        let last = cloud.store.rounds(&row.name)?.into_iter().rev().find_map(|r| r.summary);
        if let Some(acc) = last.and_then(|s| serde_json::from_str::<RoundSummary>(&s).ok()).and_then(|s| s.accuracy) {
            out.push_str(&format!("nereid_job_accuracy{{job=\"{}\"}} {acc}\n", row.name));
        }
    }
    Ok(out)
}

// ---- the round loop ---------------------------------------------------------------------------

fn parse_metrics(json: &str) -> UpdateMetrics {
    serde_json::from_str(json).unwrap_or_default()
}

fn load_update(cloud: &Cloud, job: &str, round: u32, node: &str) -> Result<ClientUpdate, Rejection> {
    let reject = |reason: String| Rejection { update: node.to_string(), reason };
    let row = cloud
        .store
        .update(job, round, node)
        .map_err(|e| reject(e.to_string()))?
        .ok_or_else(|| reject("gone".into()))?;
    let tensors = model_io::read(&row.file).map_err(|e| reject(e.to_string()))?;
    Ok(ClientUpdate {
        client: node.to_string(),
        kind: UpdateKind::Weights,
        tensors,
        num_examples: row.num_examples,
        metrics: Vec::new(),
    })
}

fn global_model(cloud: &Cloud, job: &str, round: u32) -> anyhow::Result<model_io::NamedTensors> {
    let bytes =
        cloud.store.model(job, round - 1)?.ok_or_else(|| anyhow::anyhow!("model version {} is missing", round - 1))?;
    Ok(model_io::decode(&bytes, Path::new("global model"))?)
}

/// Feeds the round's fold every update that can go in now: the next ones in node-name order that
/// have arrived; with `closing`, also those after nodes that never sent one.
fn advance(cloud: &Cloud, spec: &JobSpec, round: u32, selected: &[String], closing: bool) -> anyhow::Result<()> {
    let mut folds = cloud.folds.lock().map_err(|_| anyhow::anyhow!("fold map poisoned"))?;
    let stale = folds.get(&spec.name).is_none_or(|f| f.round != round);
    if stale {
        let aggregator = cloud.plugins.aggregator(&cloud.store, spec)?;
        let mut plugin = aggregator.plugin.lock().map_err(|_| anyhow::anyhow!("aggregator lock poisoned"))?;
        // A new round, or a restarted cloud: begin again from the persisted state.
        let mut order = selected.to_vec();
        order.sort();
        let ctx = RoundContext { job: spec.name.clone(), round, seed: spec.seed.wrapping_add(round as u64) };
        let global = global_model(cloud, &spec.name, round)?;
        let fold = RoundFold::begin(&mut plugin, ctx, Some(&global))?;
        drop(plugin);
        folds.insert(spec.name.clone(), ActiveFold { round, aggregator, order, next: 0, fold });
    }
    let active = folds.get_mut(&spec.name).expect("inserted above");
    let instance = active.aggregator.plugin.clone();
    let mut plugin = instance.lock().map_err(|_| anyhow::anyhow!("aggregator lock poisoned"))?;
    let received = cloud.store.update_nodes(&spec.name, round)?;
    let order = active.order.clone();
    let load = |j: usize| load_update(cloud, &spec.name, round, &order[j]);
    let global = || {
        global_model(cloud, &spec.name, round)
            .map(Some)
            .map_err(|e| RoundError::Replay { update: "the global model".into(), reason: e.to_string() })
    };
    while active.next < order.len() {
        let node = &order[active.next];
        if received.contains(node) {
            active.fold.feed(&mut plugin, active.next, &load, &global)?;
        } else if !closing {
            break;
        }
        active.next += 1;
    }
    Ok(())
}

/// Nodes whose updates the open round's fold took in so far.
fn folded(cloud: &Cloud, job: &str, round: u32) -> Vec<String> {
    cloud
        .folds
        .lock()
        .ok()
        .and_then(|f| f.get(job).filter(|a| a.round == round).map(|a| a.fold.accepted().map(str::to_string).collect()))
        .unwrap_or_default()
}

/// Folds what is left of round `round` and ends it: v(round) and the round's summary.
fn close(
    cloud: &Cloud,
    spec: &JobSpec,
    round: u32,
    selected: &[String],
    closed_by: &str,
    opened_ms: i64,
) -> anyhow::Result<(Vec<u8>, RoundSummary)> {
    advance(cloud, spec, round, selected, true)?;
    let active = cloud
        .folds
        .lock()
        .map_err(|_| anyhow::anyhow!("fold map poisoned"))?
        .remove(&spec.name)
        .ok_or_else(|| anyhow::anyhow!("round {round} has no fold"))?;
    let mut plugin = active.aggregator.plugin.lock().map_err(|_| anyhow::anyhow!("aggregator lock poisoned"))?;
    let metrics_of: HashMap<String, (u64, UpdateMetrics)> = cloud
        .store
        .update_metrics(&spec.name, round)?
        .into_iter()
        .map(|(node, n, metrics)| (node, (n, parse_metrics(&metrics))))
        .collect();
    let (model, accepted, rejected, agg_metrics) = match active.fold.finish(&mut plugin) {
        Ok(report) => (
            model_io::encode(&report.result.tensors, None)?,
            report.accepted,
            report.rejected,
            report.result.metrics.into_iter().collect(),
        ),
        // Nothing usable arrived: the global model stays as it was.
        Err(RoundError::NothingAccepted(rejected)) => (
            cloud
                .store
                .model(&spec.name, round - 1)?
                .ok_or_else(|| anyhow::anyhow!("model version {} is missing", round - 1))?,
            Vec::new(),
            rejected,
            BTreeMap::new(),
        ),
        Err(e) => return Err(e.into()),
    };
    let weighted = |f: &dyn Fn(&UpdateMetrics) -> f64, w: &dyn Fn(&(u64, UpdateMetrics)) -> u64| {
        let total: u64 = accepted.iter().filter_map(|n| metrics_of.get(n)).map(w).sum();
        (total > 0).then(|| {
            accepted.iter().filter_map(|n| metrics_of.get(n)).map(|m| f(&m.1) * w(m) as f64).sum::<f64>() / total as f64
        })
    };
    let (up, down) =
        cloud.traffic.lock().ok().and_then(|t| t.get(&(spec.name.clone(), round)).copied()).unwrap_or_default();
    let summary = RoundSummary {
        round,
        examples: accepted.iter().filter_map(|n| metrics_of.get(n)).map(|m| m.0).sum(),
        accuracy: weighted(&|m| m.eval_accuracy, &|m| m.1.eval_examples),
        loss: weighted(&|m| m.eval_loss, &|m| m.1.eval_examples),
        train_loss: weighted(&|m| m.train_loss, &|m| m.0),
        participants: accepted,
        rejected,
        bytes_up: up,
        bytes_down: down,
        closed_by: closed_by.into(),
        aggregator_metrics: agg_metrics,
        duration_ms: now_ms() - opened_ms,
        aggregator: active.aggregator.label.clone(),
    };
    Ok((model, summary))
}

async fn run_job(cloud: Arc<Cloud>, name: String) {
    if let Err(e) = job_loop(&cloud, &name).await {
        tracing::error!(job = %name, "job failed: {e:#}");
        let _ = cloud.store.finish_job(&name, "failed", &format!("{e:#}"));
    }
}

async fn job_loop(cloud: &Arc<Cloud>, name: &str) -> anyhow::Result<()> {
    let progress = indicatif::ProgressBar::new(0);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:20}] {pos}/{len} updates {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let Some(row) = cloud.store.job(name)? else { return Ok(()) };
        if row.status != "running" {
            progress.finish_and_clear();
            if let Ok(mut f) = cloud.folds.lock() {
                f.remove(name);
            }
            if let Ok(mut m) = cloud.served.lock() {
                m.remove(name);
            }
            cloud.plugins.forget(name);
            return Ok(());
        }
        let spec: JobSpec = serde_json::from_str(&row.spec)?;
        let r = row.next_round;
        if r > spec.stop.rounds {
            cloud.store.finish_job(name, "done", &format!("ran {} rounds", spec.stop.rounds))?;
            continue;
        }
        if spec.stop.wall_secs.is_some_and(|w| (now_ms() - row.created_ms) as f64 > w * 1000.0) {
            cloud.store.finish_job(name, "done", "wall time limit reached")?;
            continue;
        }
        let round = match cloud.store.round(name, r)? {
            Some(round) => round,
            None => {
                if cloud.plugins.at_round_boundary(&cloud.store, &spec, row.pending_spec.is_some(), r).await? {
                    continue;
                }
                let online = cloud.online_since(now_ms() - cloud.online_ms);
                if online.len() < spec.rounds.min_clients {
                    wait(cloud).await;
                    continue;
                }
                let count = ((online.len() as f64 * spec.rounds.fraction).ceil() as usize)
                    .clamp(spec.rounds.min_clients, online.len());
                let mut chosen = online.clone();
                chosen.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed ^ (r as u64).rotate_left(32)));
                chosen.truncate(count);
                chosen.sort();
                let deadline = now_ms() + (spec.rounds.deadline_secs * 1000.0) as i64;
                cloud.store.open_round(name, r, &chosen, deadline)?;
                tracing::info!(job = name, round = r, selected = ?chosen, "round opened");
                continue;
            }
        };
        {
            let (c, spec2, selected) = (cloud.clone(), spec.clone(), round.selected.clone());
            tokio::task::spawn_blocking(move || advance(&c, &spec2, r, &selected, false)).await??;
        }
        let received = cloud.store.update_nodes(name, r)?;
        progress.set_prefix(format!("{name} round {r}"));
        progress.set_length(round.selected.len() as u64);
        progress.set_position(received.len() as u64);
        let quorum = round.selected.iter().all(|n| received.contains(n));
        let late = now_ms() >= round.deadline_ms;
        let closed_by = if quorum {
            "quorum"
        } else if late && received.len() >= spec.rounds.min_clients {
            "deadline"
        } else {
            if late {
                progress.set_message(format!("past the deadline, waiting for {} updates", spec.rounds.min_clients));
            }
            wait(cloud).await;
            continue;
        };
        let cloud2 = cloud.clone();
        let spec2 = spec.clone();
        let closed_by = closed_by.to_string();
        let opened = round.opened_ms;
        let selected = round.selected.clone();
        let (model, summary) =
            tokio::task::spawn_blocking(move || close(&cloud2, &spec2, r, &selected, &closed_by, opened)).await??;
        let summary_json = serde_json::to_string(&summary)?;
        cloud.store.close_round(name, r, &model, &summary_json)?;
        cloud.counters.rounds_closed.fetch_add(1, Ordering::Relaxed);
        let c = cloud.clone();
        tokio::task::spawn_blocking(move || c.store.collect_update_files()).await??;
        if let Ok(mut t) = cloud.traffic.lock() {
            t.remove(&(name.to_string(), r));
        }
        tracing::info!(
            job = name,
            round = r,
            participants = summary.participants.len(),
            accuracy = summary.accuracy,
            closed_by = summary.closed_by,
            "round closed"
        );
        if let (Some(target), Some(acc)) = (spec.stop.target_accuracy, summary.accuracy) {
            if acc >= target {
                cloud.store.finish_job(name, "done", &format!("accuracy {acc:.4} reached the target {target}"))?;
            }
        }
    }
}

async fn wait(cloud: &Cloud) {
    let _ = tokio::time::timeout(Duration::from_millis(100), cloud.wake.notified()).await;
}

/// Opens the state, registers the configured node tokens, resumes running jobs and serves the
/// API until the process ends.
pub async fn serve(
    config: CloudConfig,
    base: &Path,
    cache_dir: Option<PathBuf>,
    registry_cache: PathBuf,
) -> anyhow::Result<()> {
    crate::return_large_buffers_to_the_os();
    let store = CloudStore::open(&base.join(&config.state))?;
    for (node, entry) in &config.nodes {
        store.set_node_token(node, &token_sha256(&entry.token))?;
    }
    store.collect_update_files()?;
    let runtime = Runtime::new(cache_dir)?;
    let components = Components::new(registry_cache, &config.registries)?;
    let models = config.models.as_ref().map(|m| base.join(m));
    let inference =
        inference::CloudInference::load(models.as_deref(), &config.services, base, &runtime, &components).await?;
    let cloud = Arc::new(Cloud {
        inference,
        store,
        plugins: JobPlugins::new(runtime, components),
        admin_sha: token_sha256(&config.admin_token),
        online_ms: (config.online_secs * 1000.0) as i64,
        counters: Counters::default(),
        last_seen: Mutex::new(HashMap::new()),
        traffic: Mutex::new(HashMap::new()),
        folds: Mutex::new(HashMap::new()),
        served: Mutex::new(HashMap::new()),
        wake: tokio::sync::Notify::new(),
        upload_slots: tokio::sync::Semaphore::new(UPLOAD_SLOTS),
        max_upload: config.max_upload_mib << 20,
    });
    for row in cloud.store.jobs()?.into_iter().filter(|j| j.status == "running") {
        let spec: JobSpec = serde_json::from_str(&row.spec)?;
        let c = cloud.clone();
        tokio::task::spawn_blocking(move || c.plugins.aggregator(&c.store, &spec).map(drop)).await??;
        tracing::info!(job = %row.name, round = row.next_round, "resuming job");
        tokio::spawn(run_job(cloud.clone(), row.name.clone()));
    }
    let app = router(cloud.clone(), cloud.max_upload);
    let addr: SocketAddr = config.listen.parse().map_err(|e| anyhow::anyhow!("listen = {:?}: {e}", config.listen))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    tracing::info!("cloud listening on {}", listener.local_addr()?);
    // Small responses written in two parts would otherwise wait out the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, app).await?;
    Ok(())
}

fn router(cloud: Arc<Cloud>, max_upload: usize) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/task", get(task))
        .route("/v1/components", post(put_component))
        .route("/v1/components/{digest}", get(component))
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/jobs/{job}", get(get_job))
        .route("/v1/jobs/{job}/stop", post(stop_job))
        .route("/v1/jobs/{job}/models/{version}", get(model))
        .route("/v1/jobs/{job}/rounds/{round}/update", post(upload))
        .route("/v1/ping", get(inference::ping).post(inference::ping))
        .route("/v1/infer/{service}", post(inference::infer))
        .route("/v1/infer/{service}/tail", post(inference::tail))
        .route("/v1/infer/{service}/profile", get(inference::profile))
        .route("/v1/infer/{service}/hard-examples", get(inference::hard_examples))
        .layer(DefaultBodyLimit::max(max_upload))
        .with_state(cloud)
}
