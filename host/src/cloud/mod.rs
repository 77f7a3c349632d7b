//! The cloud host: jobs, rounds, the HTTP API edges and operators talk to, and Prometheus metrics.
//!
//! A round: select clients among the nodes that polled recently (seeded, so the same nodes give
//! the same selection), publish the global model v(r-1), persist every accepted update before
//! acknowledging it, close on quorum (every selected node uploaded) or at the deadline (if at least
//! `min_clients` did), fold the updates into the aggregator in node-name order — so the same set
//! of updates gives a bit-identical v(r) whatever the arrival order, and a restarted cloud replays
//! exactly what it had — then commit v(r) and the round's summary in one transaction.
mod inference;

use std::collections::{BTreeMap, HashMap, HashSet};
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
use axum::{Extension, Json, Router};
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
    /// Nodes with an upload in progress (one each).
    uploading: Uploading,
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

/// Who a request is from, established before its body is read (see [`authenticate`]).
#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    Node(String),
}

impl Caller {
    fn admin(&self) -> ApiResult<()> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Node(n) => Err(err(StatusCode::FORBIDDEN, format!("node `{n}` may not manage jobs"))),
        }
    }

    fn node(&self) -> ApiResult<String> {
        match self {
            Caller::Node(n) => Ok(n.clone()),
            Caller::Admin => Err(err(StatusCode::FORBIDDEN, "this endpoint is for nodes")),
        }
    }
}

/// Refuses a request without a valid token before anything reads its body, and hands the
/// handler who it is from.
async fn authenticate(
    State(cloud): State<Arc<Cloud>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match cloud.caller(req.headers()) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
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

async fn task(State(cloud): State<Arc<Cloud>>, Extension(caller): Extension<Caller>) -> ApiResult<Json<TaskResponse>> {
    let node = caller.node()?;
    for row in cloud.store.jobs()?.into_iter().filter(|j| j.status == "running") {
        let Some(round) = cloud.store.round(&row.name, row.next_round)? else { continue };
        if round.closed_ms.is_some() || !round.selected.contains(&node) {
            continue;
        }
        if cloud.store.update_nodes(&row.name, round.round)?.contains(&node) {
            continue;
        }
        // A node that could not make its update this round is not asked again: it takes the
        // next job's task instead.
        if cloud.store.failures(&row.name, round.round)?.iter().any(|(n, _)| *n == node) {
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
    Extension(caller): Extension<Caller>,
    UrlPath((job, version)): UrlPath<(String, u32)>,
) -> ApiResult<Bytes> {
    if let Caller::Node(node) = &caller {
        // A node gets v(r-1) only to train round r, and only if it was selected for it.
        let selected = version
            .checked_add(1)
            .map(|r| cloud.store.round(&job, r))
            .transpose()?
            .flatten()
            .is_some_and(|r| r.selected.contains(node));
        if !selected {
            return Err(err(
                StatusCode::FORBIDDEN,
                format!("node `{node}` takes no part in the round of job `{job}` that starts from version {version}"),
            ));
        }
    }
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

async fn component(State(cloud): State<Arc<Cloud>>, UrlPath(digest): UrlPath<String>) -> ApiResult<Vec<u8>> {
    cloud.store.component(&digest)?.ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no component {digest}")))
}

async fn put_component(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    caller.admin()?;
    let digest = content_digest(&body);
    cloud.store.put_component(&digest, &body)?;
    Ok(Json(serde_json::json!({ "digest": digest })))
}

/// The nodes uploading now: one upload per node at a time, so one node cannot take every slot.
#[derive(Default)]
struct Uploading(Mutex<HashSet<String>>);

/// A node's claim on uploading; dropping it (also when the request is abandoned) lets go.
struct UploadClaim<'a> {
    uploading: &'a Uploading,
    node: String,
}

impl Uploading {
    fn claim(&self, node: &str) -> Option<UploadClaim<'_>> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(node.to_string()).then(|| UploadClaim { uploading: self, node: node.to_string() })
    }
}

impl Drop for UploadClaim<'_> {
    fn drop(&mut self) {
        self.uploading.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.node);
    }
}

/// How long an upload waits for a slot before the node is told to come back.
const SLOT_WAIT: Duration = Duration::from_secs(30);

fn retry_later(message: String) -> Response {
    let mut resp = err(StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
    resp
}

async fn upload(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath((job, round)): UrlPath<(String, u32)>,
    body: axum::body::Body,
) -> Result<Json<UploadResponse>, Response> {
    let node = caller.node().map_err(IntoResponse::into_response)?;
    let refused = |status: StatusCode, message: String| {
        cloud.counters.updates_refused.fetch_add(1, Ordering::Relaxed);
        err(status, message).into_response()
    };
    let internal = |e: StoreError| ApiError::from(e).into_response();
    // Everything that needs no body is checked before the upload takes a slot.
    let row = cloud
        .store
        .job(&job)
        .map_err(internal)?
        .ok_or_else(|| refused(StatusCode::NOT_FOUND, format!("no job `{job}`")))?;
    let r = cloud
        .store
        .round(&job, round)
        .map_err(internal)?
        .ok_or_else(|| refused(StatusCode::CONFLICT, format!("job `{job}` has not opened round {round}")))?;
    if cloud.store.update(&job, round, &node).map_err(internal)?.is_some() {
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
    if cloud.store.failures(&job, round).map_err(internal)?.iter().any(|(n, _)| *n == node) {
        return Err(refused(StatusCode::CONFLICT, format!("node `{node}` reported that it failed round {round}")));
    }
    let spec = spec_of(&row).map_err(IntoResponse::into_response)?;
    let Some(_claim) = cloud.uploading.claim(&node) else {
        return Err(refused(StatusCode::TOO_MANY_REQUESTS, format!("an upload from node `{node}` is in progress")));
    };
    let _slot = match tokio::time::timeout(SLOT_WAIT, cloud.upload_slots.acquire()).await {
        Ok(Ok(permit)) => permit,
        _ => return Err(retry_later(format!("every upload slot is busy; node `{node}` should try again"))),
    };
    accept_upload(&cloud, &spec, round, &node, body).await.map_err(|e| {
        cloud.counters.updates_refused.fetch_add(1, Ordering::Relaxed);
        e.into_response()
    })
}

/// Receives, checks and records one update (the caller holds an upload slot).
async fn accept_upload(
    cloud: &Arc<Cloud>,
    spec: &JobSpec,
    round: u32,
    node: &str,
    body: axum::body::Body,
) -> ApiResult<Json<UploadResponse>> {
    let job = &spec.name;
    // Streamed to its file and fsynced: the cloud holds no more than a chunk of an update.
    let path = cloud.store.new_update_file();
    let written = receive(body, &path, cloud.max_upload).await;
    let fail = |e: ApiError| {
        let _ = std::fs::remove_file(&path);
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
    // Cheap checks first; a compressed update is decoded only if they pass.
    if spec.compressor.is_none() {
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
    let max = spec.rounds.max_examples;
    if !(1..=max).contains(&num_examples) {
        return Err(fail(err(
            StatusCode::BAD_REQUEST,
            format!(
                "update from `{node}`: `{META_NUM_EXAMPLES}` is {num_examples}; job `{job}` takes 1 to {max} \
                 examples per update ([rounds] max_examples)"
            ),
        )));
    }
    let metrics = header.metadata.get(META_METRICS).cloned().unwrap_or_else(|| "{}".into());
    let parsed = serde_json::from_str::<UpdateMetrics>(&metrics)
        .map_err(|e| format!("`{META_METRICS}` is not valid metrics JSON: {e}"))
        .and_then(|m| m.validate(max).map_err(|e| format!("`{META_METRICS}`: {e}")));
    if let Err(e) = parsed {
        return Err(fail(err(StatusCode::BAD_REQUEST, format!("update from `{node}`: {e}"))));
    }
    if spec.compressor.is_some() {
        // What arrived is the encoded difference to the global model: decoded here, before it
        // is accepted, and stored as the weights it stands for (the fold is the same either way).
        let (c, spec, node, path, metadata) =
            (cloud.clone(), spec.clone(), node.to_string(), path.clone(), header.metadata.clone());
        tokio::task::spawn_blocking(move || decode_update(&c, &spec, round, &node, &path, metadata))
            .await
            .map_err(|e| fail(err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))?
            .map_err(|e| fail(err(StatusCode::BAD_REQUEST, e)))?;
    }
    // The file is durable; committing its row makes the update accepted.
    let settled = cloud.store.settle_update_file(&path).map_err(|e| fail(e.into()))?;
    let inserted = cloud.store.insert_update(job, round, node, num_examples, &metrics, &settled)?;
    let status = match inserted {
        Inserted::New => {
            cloud.counters.updates_accepted.fetch_add(1, Ordering::Relaxed);
            cloud.traffic(job, round, len, 0);
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

/// `POST /v1/jobs/<job>/rounds/<round>/failure`: a selected node could not make its update
/// (a bad task, a trainer that failed, an update the cloud refused). The round stops waiting
/// for it and the node is not given this round's task again.
async fn report_failure(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath((job, round)): UrlPath<(String, u32)>,
    Json(report): Json<FailureReport>,
) -> ApiResult<Json<UploadResponse>> {
    let node = caller.node()?;
    let r = cloud
        .store
        .round(&job, round)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("job `{job}` has no round {round}")))?;
    if !r.selected.contains(&node) {
        return Err(err(StatusCode::FORBIDDEN, format!("node `{node}` was not selected for round {round}")));
    }
    if r.closed_ms.is_some() {
        return Err(err(StatusCode::CONFLICT, format!("round {round} of job `{job}` is closed")));
    }
    let reason = report.sanitized_reason();
    let status = if cloud.store.record_failure(&job, round, &node, &reason)? {
        tracing::warn!(job = %job, round, node = %node, "the node failed the round: {reason}");
        cloud.wake.notify_waiters();
        "recorded"
    } else {
        "duplicate"
    };
    Ok(Json(UploadResponse { status: status.into() }))
}

/// `GET /v1/jobs/<job>/rounds/<round>`: whether the round still waits for the calling node
/// (an edge stops training when it does not).
async fn round_state(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath((job, round)): UrlPath<(String, u32)>,
) -> ApiResult<Json<RoundState>> {
    let running = cloud.store.job(&job)?.is_some_and(|j| j.status == "running");
    let r = cloud.store.round(&job, round)?;
    let open = running && r.as_ref().is_some_and(|r| r.closed_ms.is_none());
    let waits = match (&caller, &r) {
        (Caller::Node(node), Some(r)) if open => {
            r.selected.contains(node)
                && !cloud.store.update_nodes(&job, round)?.contains(node)
                && !cloud.store.failures(&job, round)?.iter().any(|(n, _)| n == node)
        }
        (Caller::Admin, _) => open,
        _ => false,
    };
    Ok(Json(RoundState { open, waits_for_caller: waits }))
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
        let chunk = chunk.map_err(|e| match nereid_net::body_timeout(&e) {
            Some(t) => err(StatusCode::REQUEST_TIMEOUT, format!("reading the upload: {t}")),
            None => err(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")),
        })?;
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
    Extension(caller): Extension<Caller>,
    Json(req): Json<SubmitJob>,
) -> ApiResult<Json<JobSummary>> {
    caller.admin()?;
    let mut spec = req.spec;
    // The same checks `job apply` made (a client need not be nereid's CLI).
    let bad = |e: String| {
        err(StatusCode::BAD_REQUEST, format!("job `{}`: {e}", spec.name.chars().take(64).collect::<String>()))
    };
    spec.validate().map_err(|e| bad(e.to_string()))?;
    let model_bytes = spec.model.parameter_count().saturating_mul(4);
    if model_bytes > cloud.max_upload as u64 {
        return Err(bad(format!(
            "key `model.kind`: the model's weights are {model_bytes} bytes as f32, more than the cloud takes in one \
             upload ({} bytes, max_upload_mib in cloud.toml)",
            cloud.max_upload
        )));
    }
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

async fn list_jobs(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<JobSummary>>> {
    caller.admin()?;
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
            failed: cloud.store.failures(name, r.round)?.into_iter().collect(),
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
                Some(c) if c.failed.contains_key(&n) => "failed",
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
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<JobStatus>> {
    caller.admin()?;
    Ok(Json(job_status(&cloud, &name)?))
}

async fn stop_job(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<JobStatus>> {
    caller.admin()?;
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
        let job = crate::names::escape_label(&row.name);
        out.push_str(&format!("nereid_job_round{{job=\"{job}\"}} {}\n", row.next_round - 1));
        let last = cloud.store.rounds(&row.name)?.into_iter().rev().find_map(|r| r.summary);
        if let Some(acc) = last.and_then(|s| serde_json::from_str::<RoundSummary>(&s).ok()).and_then(|s| s.accuracy) {
            out.push_str(&format!("nereid_job_accuracy{{job=\"{job}\"}} {acc}\n"));
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
    // A NaN or an infinity would poison the global model whatever the aggregator.
    if let Some((name, _)) = tensors.iter().find(|(_, t)| !t.all_finite()) {
        return Err(reject(format!("tensor `{name}` holds NaN or infinite values")));
    }
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
/// How a round ends.
enum Closing {
    /// Fold what arrived into v(round).
    Aggregate,
    /// Every selected node answered but fewer than `min_clients` sent an update: v(round) is
    /// v(round - 1), and the updates that came are left out.
    TooFew,
}

fn close(
    cloud: &Cloud,
    spec: &JobSpec,
    round: u32,
    selected: &[String],
    closed_by: &str,
    opened_ms: i64,
    closing: Closing,
) -> anyhow::Result<(Vec<u8>, RoundSummary)> {
    let failures = cloud.store.failures(&spec.name, round)?;
    let failed = |rejected: &mut Vec<Rejection>| {
        rejected.extend(
            failures
                .iter()
                .map(|(node, reason)| Rejection { update: node.clone(), reason: format!("the node failed: {reason}") }),
        )
    };
    let metrics_of: HashMap<String, (u64, UpdateMetrics)> = cloud
        .store
        .update_metrics(&spec.name, round)?
        .into_iter()
        .map(|(node, n, metrics)| (node, (n, parse_metrics(&metrics))))
        .collect();
    if let Closing::TooFew = closing {
        if let Ok(mut f) = cloud.folds.lock() {
            f.remove(&spec.name);
        }
        let model = cloud
            .store
            .model(&spec.name, round - 1)?
            .ok_or_else(|| anyhow::anyhow!("model version {} is missing", round - 1))?;
        let mut rejected: Vec<Rejection> = metrics_of
            .keys()
            .map(|node| Rejection {
                update: node.clone(),
                reason: format!(
                    "left out: only {} of the {} nodes the round needs sent an update",
                    metrics_of.len(),
                    spec.rounds.min_clients
                ),
            })
            .collect();
        rejected.sort_by(|a, b| a.update.cmp(&b.update));
        failed(&mut rejected);
        let summary = RoundSummary {
            round,
            closed_by: closed_by.into(),
            rejected,
            duration_ms: now_ms() - opened_ms,
            aggregator: plugins::label(&spec.aggregator),
            ..RoundSummary::default()
        };
        return Ok((model, summary));
    }
    advance(cloud, spec, round, selected, true)?;
    let active = cloud
        .folds
        .lock()
        .map_err(|_| anyhow::anyhow!("fold map poisoned"))?
        .remove(&spec.name)
        .ok_or_else(|| anyhow::anyhow!("round {round} has no fold"))?;
    let mut plugin = active.aggregator.plugin.lock().map_err(|_| anyhow::anyhow!("aggregator lock poisoned"))?;
    let (model, accepted, mut rejected, agg_metrics) = match active.fold.finish(&mut plugin) {
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
    failed(&mut rejected);
    let weighted = |f: &dyn Fn(&UpdateMetrics) -> f64, w: &dyn Fn(&(u64, UpdateMetrics)) -> u64| {
        let total: u64 = accepted.iter().filter_map(|n| metrics_of.get(n)).map(w).fold(0, u64::saturating_add);
        (total > 0).then(|| {
            accepted.iter().filter_map(|n| metrics_of.get(n)).map(|m| f(&m.1) * w(m) as f64).sum::<f64>() / total as f64
        })
    };
    let (up, down) =
        cloud.traffic.lock().ok().and_then(|t| t.get(&(spec.name.clone(), round)).copied()).unwrap_or_default();
    let summary = RoundSummary {
        round,
        examples: accepted.iter().filter_map(|n| metrics_of.get(n)).fold(0u64, |sum, m| sum.saturating_add(m.0)),
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
        let failed: HashSet<String> = cloud.store.failures(name, r)?.into_iter().map(|(n, _)| n).collect();
        // Every selected node sent its update or said it cannot.
        let answered = round.selected.iter().all(|n| received.contains(n) || failed.contains(n));
        let late = now_ms() >= round.deadline_ms;
        let enough = received.len() >= spec.rounds.min_clients;
        let (closed_by, closing) = if answered && enough {
            ("quorum", Closing::Aggregate)
        } else if answered {
            ("failures", Closing::TooFew)
        } else if late && enough {
            ("deadline", Closing::Aggregate)
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
            tokio::task::spawn_blocking(move || close(&cloud2, &spec2, r, &selected, &closed_by, opened, closing))
                .await??;
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
        uploading: Uploading::default(),
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
    nereid_net::serve(listener, app, config.http.clone()).await?;
    Ok(())
}

/// Largest JSON body of the API (a job spec, a failure report).
const MAX_JSON_BODY: usize = 1 << 20;
/// Largest `/v1/ping` probe.
const MAX_PING_BODY: usize = 16 << 20;

fn router(cloud: Arc<Cloud>, max_upload: usize) -> Router {
    let limit = DefaultBodyLimit::max;
    // Every route but these two authenticates first: no body is read for an unknown caller.
    let open = Router::new().route("/v1/health", get(health)).route("/metrics", get(metrics));
    let authenticated = Router::new()
        .route("/v1/task", get(task))
        .route("/v1/components", post(put_component).layer(limit(crate::files::MAX_COMPONENT_BYTES as usize)))
        .route("/v1/components/{digest}", get(component))
        .route("/v1/jobs", get(list_jobs).post(submit_job).layer(limit(MAX_JSON_BODY)))
        .route("/v1/jobs/{job}", get(get_job))
        .route("/v1/jobs/{job}/stop", post(stop_job))
        .route("/v1/jobs/{job}/models/{version}", get(model))
        .route("/v1/jobs/{job}/rounds/{round}", get(round_state))
        .route("/v1/jobs/{job}/rounds/{round}/update", post(upload))
        .route("/v1/jobs/{job}/rounds/{round}/failure", post(report_failure).layer(limit(MAX_JSON_BODY)))
        .route("/v1/ping", get(inference::ping).post(inference::ping).layer(limit(MAX_PING_BODY)))
        .route("/v1/infer/{service}", post(inference::infer).layer(limit(max_upload)))
        .route("/v1/infer/{service}/tail", post(inference::tail).layer(limit(max_upload)))
        .route("/v1/infer/{service}/profile", get(inference::profile))
        .route("/v1/infer/{service}/hard-examples", get(inference::hard_examples))
        .route_layer(axum::middleware::from_fn_with_state(cloud.clone(), authenticate));
    open.merge(authenticated).with_state(cloud)
}
