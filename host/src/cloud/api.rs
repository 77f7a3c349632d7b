//! The handlers of the cloud's API, but for uploads ([`super::uploads`]) and inference
//! ([`super::inference`]): tasks, models, components, jobs, round state and metrics.
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};

use super::board::Standing;
use super::error::{err, ApiResult};
use super::{node_seed, plugins, rounds, spec_of, Caller, Cloud};
use crate::config::job::JobSpec;
use crate::metrics::Scrape;
use crate::model_io;
use crate::protocol::*;
use crate::runtime::content_digest;
use crate::store::{now_ms, StoreError};

// ---- handlers -------------------------------------------------------------------------------

pub(super) async fn health() -> &'static str {
    "ok"
}

/// `GET /v1/task[?wait=N]`: the first running job whose open round awaits the caller. With
/// `wait`, a long poll: held until such a task appears, the wait ends, or the cloud stops.
pub(super) async fn task(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> ApiResult<Json<TaskResponse>> {
    let node = caller.node()?;
    let wait = wait_of(query)?;
    let offer = long_poll(&cloud, Some(&node), wait, |board| board.offer(&node)).await;
    let task = offer.map(|o| {
        let spec = &o.spec;
        Task {
            job: spec.name.clone(),
            round: o.round,
            model_version: o.round - 1,
            seed: node_seed(spec.seed, o.round, &node),
            model: spec.model.clone(),
            training: spec.training.for_node(&node),
            client_objective: spec.client_objective.clone(),
            compressor: spec.compressor.clone(),
            server_config: cloud.plugins.published(&spec.name),
            deadline_ms: o.deadline_ms,
            region: cloud.regions.contains(&node).then(|| Box::new(JobSpec::clone(spec))),
        }
    });
    Ok(Json(TaskResponse { task }))
}

/// The wait a long poll asked for, refused past [`MAX_WAIT_SECS`].
fn wait_of(query: Result<Query<WaitQuery>, QueryRejection>) -> ApiResult<Duration> {
    let Query(q) = query.map_err(|e| err(StatusCode::BAD_REQUEST, format!("the query: {}", e.body_text())))?;
    if q.wait > MAX_WAIT_SECS {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("`wait` is {} seconds; the cloud holds a request at most {MAX_WAIT_SECS}", q.wait),
        ));
    }
    Ok(Duration::from_secs(q.wait.into()))
}

/// Asks `check` of the board now and after each change of it, until it answers, `wait` has
/// passed or the cloud stops. A node counts as online while it waits.
async fn long_poll<T>(
    cloud: &Cloud,
    node: Option<&str>,
    wait: Duration,
    mut check: impl FnMut(&super::board::Board) -> Option<T>,
) -> Option<T> {
    let mut changes = cloud.board.changes();
    changes.borrow_and_update();
    if let Some(found) = check(&cloud.board) {
        return Some(found);
    }
    if wait.is_zero() {
        return None;
    }
    let _waiting = node.map(|n| cloud.presence.waiting(n));
    let until = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return None },
            () = tokio::time::sleep_until(until) => return None,
            () = cloud.stopping.cancelled() => return None,
        }
        changes.borrow_and_update();
        if let Some(found) = check(&cloud.board) {
            return Some(found);
        }
    }
}

pub(super) async fn model(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath((job, version)): UrlPath<(String, u32)>,
) -> ApiResult<Bytes> {
    if let Caller::Node(node) = &caller {
        // A node gets v(r-1) only to train round r, and only if it was selected for it.
        let selected = match version.checked_add(1) {
            None => false,
            Some(r) if cloud.board.selected(&job, r, node) => true,
            Some(r) => cloud.store.round(&job, r)?.is_some_and(|r| r.selected.contains(node)),
        };
        if !selected {
            return Err(err(
                StatusCode::FORBIDDEN,
                format!("node `{node}` takes no part in the round of job `{job}` that starts from version {version}"),
            ));
        }
    }
    let cached = crate::lock(&cloud.served).get(&job).filter(|(v, _)| *v == version).map(|(_, b)| b.clone());
    let bytes = match cached {
        Some(b) => b,
        None => {
            let b = Bytes::from(cloud.store.model(&job, version)?.ok_or_else(|| {
                let kept = match cloud.store.kept_model_versions() {
                    Some(n) => format!(" (this cloud keeps each job's newest {n}: `keep_model_versions`)"),
                    None => String::new(),
                };
                err(StatusCode::NOT_FOUND, format!("job `{job}` has no model version {version}{kept}"))
            })?);
            {
                let mut m = crate::lock(&cloud.served);
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

pub(super) async fn component(State(cloud): State<Arc<Cloud>>, UrlPath(digest): UrlPath<String>) -> ApiResult<Vec<u8>> {
    cloud.store.component(&digest)?.ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no component {digest}")))
}

pub(super) async fn put_component(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    caller.admin()?;
    let digest = content_digest(&body);
    cloud.store.put_component(&digest, &body)?;
    Ok(Json(serde_json::json!({ "digest": digest })))
}

/// `POST /v1/initial-weights`: an external model's initial weights (safetensors, every tensor
/// f32 and finite), kept by content digest for the job that names them in `[model] init`.
pub(super) async fn put_initial_weights(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    caller.admin()?;
    let weights = model_io::decode(&body, std::path::Path::new("initial weights"))
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    crate::config::job::check_initial_weights(&weights).map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    let digest = content_digest(&body);
    cloud.store.put_initial_weights(&digest, &body)?;
    Ok(Json(serde_json::json!({ "digest": digest })))
}

/// The version-0 model of a new job: seeded for a built-in model, the weights uploaded with it for
/// an external one (which must have exactly the tensors the job names).
fn initial_model(cloud: &Cloud, spec: &JobSpec) -> ApiResult<Vec<u8>> {
    let weights = match &spec.model {
        crate::train::ModelSpec::External { init, tensors } => {
            let bytes = cloud.store.initial_weights(init)?.ok_or_else(|| {
                err(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "model.init: no initial weights {init} on the cloud (POST them to {} first)",
                        routes::INITIAL_WEIGHTS
                    ),
                )
            })?;
            let weights = model_io::decode(&bytes, std::path::Path::new("initial weights"))
                .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            spec.model.check(&weights).map_err(|e| err(StatusCode::BAD_REQUEST, format!("model.init: {e}")))?;
            if weights.len() != tensors.len() {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    format!("model.init: the weights have {} tensors, the job names {}", weights.len(), tensors.len()),
                ));
            }
            weights
        }
        model => model.init(spec.seed),
    };
    model_io::encode(&weights, None).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// `GET /v1/jobs/<job>/rounds/<round>[?wait=N]`: whether the round still waits for the calling
/// node (an edge stops training when it does not). With `wait`, a long poll: held while the
/// round waits for the caller, up to the wait.
pub(super) async fn round_state(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath((job, round)): UrlPath<(String, u32)>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> ApiResult<Json<RoundState>> {
    let wait = wait_of(query)?;
    let state = |board: &super::board::Board| {
        let open = board.is_open(&job, round);
        let waits = match &caller {
            Caller::Node(node) => matches!(board.standing(&job, round, node), Standing::Awaited(_)),
            Caller::Admin => open,
        };
        RoundState { open, waits_for_caller: waits }
    };
    let who = match &caller {
        Caller::Node(node) => Some(node.as_str()),
        Caller::Admin => None,
    };
    let changed = long_poll(&cloud, who, wait, |board| Some(state(board)).filter(|s| !s.waits_for_caller)).await;
    Ok(Json(changed.unwrap_or_else(|| state(&cloud.board))))
}

/// Applies a job: creates it, or — for a running job whose plugins changed — checks the new
/// plugins and switches to them at the next round boundary (the old ones keep serving until then,
/// and for good if the new ones are refused).
pub(super) async fn submit_job(
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
    let initial = initial_model(&cloud, &spec)?;
    let json = serde_json::to_string(&spec).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match cloud.store.insert_job(&spec.name, &json, &initial) {
        Err(StoreError::JobExists(n)) => {
            return Err(err(StatusCode::CONFLICT, format!("a job named `{n}` exists already")))
        }
        other => other?,
    }
    tracing::info!(job = %spec.name, "job applied");
    tokio::spawn(rounds::run_job(cloud.clone(), spec.name.clone()));
    Ok(Json(summary("running", None)))
}

/// The parts of a job other than its plugins that differ between `a` and `b`.
pub(super) fn changed_fields(a: &JobSpec, b: &JobSpec) -> Vec<&'static str> {
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

pub(super) async fn list_jobs(
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

/// The page of history a status query asked for, refused past [`MAX_HISTORY_PAGE`].
fn history_page(query: Result<Query<HistoryQuery>, QueryRejection>) -> ApiResult<(Option<u32>, u32)> {
    let Query(q) = query.map_err(|e| err(StatusCode::BAD_REQUEST, format!("the query: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(DEFAULT_HISTORY_PAGE);
    if !(1..=MAX_HISTORY_PAGE).contains(&limit) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("`limit` is {limit}; a page holds 1 to {MAX_HISTORY_PAGE} rounds"),
        ));
    }
    Ok((q.from, limit))
}

pub(super) fn job_status(cloud: &Cloud, name: &str, (from, limit): (Option<u32>, u32)) -> ApiResult<JobStatus> {
    let row = cloud.store.job(name)?.ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no job `{name}`")))?;
    let spec = spec_of(&row)?;
    let (page, history_next) = cloud.store.summaries(name, from, limit)?;
    let history: Vec<RoundSummary> = page.iter().filter_map(|(_, s)| serde_json::from_str(s).ok()).collect();
    let current = match cloud.store.unclosed_round(name)? {
        Some(r) if row.status == "running" => Some(CurrentRound {
            round: r.round,
            selected: r.selected.clone(),
            received: cloud.store.update_nodes(name, r.round)?,
            folded: cloud.rounds.folded(name, r.round),
            failed: cloud.store.failures(name, r.round)?.into_iter().collect(),
            deadline_ms: r.deadline_ms,
        }),
        _ => None,
    };
    let online_since = now_ms() - cloud.online_ms;
    let last_seen = cloud.presence.last_seen();
    // A fleet's round lists thousands of nodes: looked up by hash, not by scanning.
    let as_set = |names: Option<&Vec<String>>| -> HashSet<String> { names.into_iter().flatten().cloned().collect() };
    let received = as_set(current.as_ref().map(|c| &c.received));
    let selected = as_set(current.as_ref().map(|c| &c.selected));
    let nodes = cloud
        .store
        .nodes()?
        .into_iter()
        .map(|n| {
            let seen = last_seen.get(&n).copied();
            let state = match &current {
                Some(_) if received.contains(&n) => "uploaded",
                Some(c) if c.failed.contains_key(&n) => "failed",
                Some(_) if selected.contains(&n) => "training",
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
        aggregator: plugins::chain_label(&spec),
        client_objective: spec.client_objective.as_ref().map(plugins::label),
        compressor: spec.compressor.as_ref().map(plugins::label),
        bytes_up_total: cloud.store.bytes_up_total(name)?,
        swap_pending: row.pending_spec.is_some(),
        swaps: cloud.store.swaps(name)?,
        current,
        nodes,
        history,
        history_next,
    })
}

pub(super) async fn get_job(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Json<JobStatus>> {
    caller.admin()?;
    let page = history_page(query)?;
    Ok(Json(job_status(&cloud, &name, page)?))
}

pub(super) async fn stop_job(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<JobStatus>> {
    caller.admin()?;
    cloud.store.job(&name)?.ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no job `{name}`")))?;
    cloud.finish_job(&name, "stopped", "stopped by an operator")?;
    cloud.wake.notify_waiters();
    Ok(Json(job_status(&cloud, &name, (None, DEFAULT_HISTORY_PAGE))?))
}

pub(super) async fn metrics(State(cloud): State<Arc<Cloud>>, headers: HeaderMap) -> ApiResult<Response> {
    let c = &cloud.counters;
    let mut scrape = Scrape::new();
    let counters = [
        ("nereid_updates_accepted", "Client updates persisted and acknowledged.", &c.updates_accepted),
        ("nereid_updates_duplicate", "Uploads of an update the cloud already had.", &c.updates_duplicate),
        ("nereid_updates_refused", "Uploads refused (malformed, late, not selected).", &c.updates_refused),
        ("nereid_unauthorized_requests", "Requests without a valid token.", &c.unauthorized),
        ("nereid_rounds_closed", "Rounds closed.", &c.rounds_closed),
        ("nereid_upload_bytes", "Bytes of accepted updates.", &c.bytes_up),
        ("nereid_download_bytes", "Bytes of global models sent.", &c.bytes_down),
        ("nereid_plugin_swaps", "Plugins swapped in running jobs.", &cloud.plugins.swaps),
    ];
    for (name, help, v) in counters {
        scrape.counter(name, help, [(vec![], v.load(Ordering::Relaxed))]);
    }
    scrape.gauge(
        "nereid_plugin_instances",
        "Plugin instances alive in this process.",
        [(vec![], crate::runtime::state::live_instances() as f64)],
    );
    let (mut rounds, mut accuracy, mut epsilon) = (Vec::new(), Vec::new(), Vec::new());
    for row in cloud.store.jobs()? {
        let job = || vec![("job", row.name.clone())];
        rounds.push((job(), f64::from(row.next_round - 1)));
        let summaries: Vec<RoundSummary> = cloud
            .store
            .rounds(&row.name)?
            .into_iter()
            .filter_map(|r| r.summary.and_then(|s| serde_json::from_str(&s).ok()))
            .collect();
        if let Some(acc) = summaries.last().and_then(|s| s.accuracy) {
            accuracy.push((job(), acc));
        }
        if let Some(p) = summaries.iter().rev().find_map(|s| s.privacy.as_ref()) {
            let mut labels = job();
            labels.push(("delta", p.delta.to_string()));
            epsilon.push((labels, p.epsilon));
        }
    }
    scrape.gauge("nereid_job_round", "Rounds closed per job.", rounds);
    scrape.gauge("nereid_job_accuracy", "Accuracy of the newest evaluated global model per job.", accuracy);
    scrape.gauge("nereid_privacy_epsilon", "Differential privacy spent per job (epsilon at the job's delta).", epsilon);
    scrape.http(&cloud.http);
    Ok(scrape.response(&headers))
}
