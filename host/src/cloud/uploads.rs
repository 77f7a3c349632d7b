//! Uploads of updates: checked before a slot is taken, one per node, streamed to a file and
//! fsynced, decoded (with a compressor) and checked before their row commits; and a node's
//! report that it cannot make its update.
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::board::Standing;
use super::error::{err, retry_later, ApiError, ApiResult};
use super::{node_seed, spec_of, Caller, Cloud};
use crate::config::job::JobSpec;
use crate::model_io;
use crate::protocol::*;
use crate::runtime::{CompressorPlugin, RoundContext};
use crate::store::{Inserted, StoreError};
use crate::tensor::Tensor;
use crate::train::ModelSpec;

/// The nodes uploading now: one upload per node at a time, so one node cannot take every slot.
#[derive(Default)]
pub struct Uploading(Mutex<HashSet<String>>);

/// A node's claim on uploading; dropping it (also when the request is abandoned) lets go.
struct UploadClaim<'a> {
    uploading: &'a Uploading,
    node: String,
}

impl Uploading {
    fn claim(&self, node: &str) -> Option<UploadClaim<'_>> {
        let mut set = crate::lock(&self.0);
        set.insert(node.to_string()).then(|| UploadClaim { uploading: self, node: node.to_string() })
    }
}

impl Drop for UploadClaim<'_> {
    fn drop(&mut self) {
        crate::lock(&self.uploading.0).remove(&self.node);
    }
}

/// How long an upload waits for a slot before the node is told to come back.
pub(super) const SLOT_WAIT: Duration = Duration::from_secs(30);

pub(super) async fn upload(
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
    // Everything that needs no body is checked before the upload takes a slot: from the board
    // when the round awaits the node (no SQLite lock), from the store otherwise, for the reason.
    let spec = match cloud.board.standing(&job, round, &node) {
        Standing::Awaited(spec) => spec,
        Standing::Other => {
            match admission_from_store(&cloud, &job, round, &node).map_err(IntoResponse::into_response)? {
                Some(spec) => Arc::new(spec),
                None => {
                    cloud.counters.updates_duplicate.fetch_add(1, Ordering::Relaxed);
                    return Ok(Json(UploadResponse { status: "duplicate".into() }));
                }
            }
        }
    };
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

/// Whether the store takes an upload from `node` for `round` of `job`: the job's spec, `None`
/// for an update it has already, or the refusal.
fn admission_from_store(cloud: &Cloud, job: &str, round: u32, node: &str) -> ApiResult<Option<JobSpec>> {
    let refused = |status: StatusCode, message: String| {
        cloud.counters.updates_refused.fetch_add(1, Ordering::Relaxed);
        err(status, message)
    };
    let row = cloud.store.job(job)?.ok_or_else(|| refused(StatusCode::NOT_FOUND, format!("no job `{job}`")))?;
    let r = cloud
        .store
        .round(job, round)?
        .ok_or_else(|| refused(StatusCode::CONFLICT, format!("job `{job}` has not opened round {round}")))?;
    if cloud.store.update(job, round, node)?.is_some() {
        return Ok(None);
    }
    if r.closed_ms.is_some() {
        return Err(refused(
            StatusCode::CONFLICT,
            format!("round {round} of job `{job}` is closed; the job is at round {}", row.next_round),
        ));
    }
    if !r.selected.iter().any(|n| n == node) {
        return Err(refused(StatusCode::FORBIDDEN, format!("node `{node}` was not selected for round {round}")));
    }
    if cloud.store.failures(job, round)?.iter().any(|(n, _)| n == node) {
        return Err(refused(StatusCode::CONFLICT, format!("node `{node}` reported that it failed round {round}")));
    }
    spec_of(&row).map(Some)
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
    // A region's update stands for all its nodes' examples, each of which its own cloud bounded.
    let region = cloud.regions.contains(node);
    let max = if region { crate::config::job::caps::MAX_EXAMPLES } else { spec.rounds.max_examples };
    if !(1..=max).contains(&num_examples) {
        let bound = if region { "for a region" } else { "([rounds] max_examples)" };
        return Err(fail(err(
            StatusCode::BAD_REQUEST,
            format!(
                "update from `{node}`: `{META_NUM_EXAMPLES}` is {num_examples}; job `{job}` takes 1 to {max} \
                 examples per update {bound}"
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
    // The round's bytes are counted with the commit, under the same lock: a round that closes
    // right after counts them.
    let commit = || {
        let inserted = cloud.store.insert_update(job, round, node, num_examples, &metrics, &settled)?;
        if inserted == Inserted::New {
            cloud.traffic(job, round, len, 0);
        }
        Ok::<_, StoreError>(inserted)
    };
    let inserted = cloud.board.record(job, round, commit).ok_or_else(|| {
        let _ = std::fs::remove_file(&settled);
        err(StatusCode::CONFLICT, format!("round {round} of job `{job}` closed while the update arrived"))
    })??;
    let status = match inserted {
        Inserted::New => {
            cloud.counters.updates_accepted.fetch_add(1, Ordering::Relaxed);
            cloud.board.answered(job, round, node);
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
pub(super) async fn report_failure(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath((job, round)): UrlPath<(String, u32)>,
    Json(report): Json<FailureReport>,
) -> ApiResult<Json<UploadResponse>> {
    let node = caller.node()?;
    if !cloud.board.selected(&job, round, &node) {
        // Not an open round the node takes part in: the store says why.
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
    }
    let reason = report.sanitized_reason();
    let recorded = cloud
        .board
        .record(&job, round, || cloud.store.record_failure(&job, round, &node, &reason))
        .ok_or_else(|| err(StatusCode::CONFLICT, format!("round {round} of job `{job}` is closed")))??;
    let status = if recorded {
        cloud.board.answered(&job, round, &node);
        tracing::warn!(job = %job, round, node = %node, "the node failed the round: {reason}");
        cloud.wake.notify_waiters();
        "recorded"
    } else {
        "duplicate"
    };
    Ok(Json(UploadResponse { status: status.into() }))
}

/// Decodes the compressed update in `path` with the job's compressor and rewrites the file as
/// the weights it encodes: the global model plus the decoded difference.
pub(super) fn decode_update(
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
    // Decoded once per round, for every upload of it.
    let global = cloud.rounds.global(&cloud.store, spec, round).map_err(|e| e.to_string())?;
    let weights = decompress_update(&mut crate::lock(&plugin), &ctx, &payload, &origin, &spec.model, &global)?;
    model_io::write(path, &weights, Some(metadata)).map_err(|e| e.to_string())
}

/// The weights a compressed update encodes: `global` plus the difference `plugin` decodes from
/// `payload`, which must have every parameter of `model`; `origin` names the update in errors.
pub fn decompress_update(
    plugin: &mut CompressorPlugin,
    ctx: &RoundContext,
    payload: &[(String, Tensor)],
    origin: &str,
    model: &ModelSpec,
    global: &[(String, Tensor)],
) -> Result<model_io::NamedTensors, String> {
    let delta = plugin.decode(ctx, payload, origin).map_err(|e| e.to_string())?;
    let layout: Vec<_> = delta.iter().map(|(n, t)| (n.clone(), t.dtype(), t.shape().to_vec())).collect();
    model.check_layout(&layout).map_err(|e| format!("{origin}, decoded: {e}"))?;
    let mut weights = global.to_vec();
    for (name, w) in &mut weights {
        let d =
            delta.iter().find(|(n, _)| n == name).map(|(_, d)| d).ok_or_else(|| format!("{origin}: no `{name}`"))?;
        w.axpy(1.0, d).map_err(|e| format!("{origin}: `{name}`: {e}"))?;
    }
    Ok(weights)
}

/// Streams a request body into `path` (at most `max` bytes) and fsyncs it; returns its length.
pub(super) async fn receive(body: axum::body::Body, path: &Path, max: usize) -> Result<u64, ApiError> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let internal = super::error::io_error;
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
    // tokio's file reports a failed background write at the next write or flush, and
    // `sync_all` does neither: without this flush an upload whose last write hit a full disk
    // was kept cut short, and then refused as malformed (found by the soak test).
    file.flush().await.map_err(internal)?;
    file.sync_all().await.map_err(internal)?;
    Ok(total as u64)
}
