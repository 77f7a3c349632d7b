//! The edge's HTTP API: `POST /v1/infer/<service>` (JSON, safetensors, or what the service's
//! adapter reads), `GET /v1/infer/<service>/plan` (split services), `POST /v1/samples` and
//! `GET /v1/samples` (the replay buffer), `GET /v1/incremental` and `GET /v1/models` (the
//! incremental-learning job and its model versions), `GET /metrics`, `GET /v1/health`.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::error::ApiError;
use super::incremental::IncrementalJob;
use super::node::Node;
use super::replay::{check_idempotency_key, parse_batch, Origin};
use super::services::ServiceMetrics;
use crate::config::edge::{ApiRight, EdgeApiConfig};
use crate::metrics::{Labels, Scrape};
use crate::protocol::{routes, token_sha256, CUT_HEADER};

type ApiResult<T> = Result<T, ApiError>;

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    ApiError::new(status, message).into_response()
}

fn no_service(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no service `{name}`"))
}

async fn infer(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let services = &node.services;
    let service = services.get(&name).ok_or_else(|| no_service(&name))?;
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let inputs = services.decode_body(&service, content_type, body).await?;
    let forced_cut = headers
        .get(CUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect::<Vec<_>>());
    Ok(Json(services.infer(service, inputs, forced_cut).await?).into_response())
}

/// `POST /v1/samples`: labelled samples for the replay buffer, as safetensors with `x`
/// [samples, ...] (any element type) and `y` [samples] (integer labels). With an
/// `Idempotency-Key` header, a retry of a batch (its answer lost) is answered as the first
/// time and takes nothing in again.
async fn offer_samples(State(node): State<Arc<Node>>, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    let replay = node.replay.clone().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "this edge has no replay buffer ([replay] in edge.toml)")
    })?;
    let key = match headers.get(IDEMPOTENCY_KEY) {
        Some(value) => Some(check_idempotency_key(value.as_bytes()).map_err(anyhow::Error::from)?.to_string()),
        None => None,
    };
    let (x, y) = parse_batch(&body).map_err(anyhow::Error::from)?;
    let report = tokio::task::spawn_blocking(move || {
        let keyed = key.map(|key| (key, crate::runtime::content_digest(&body)));
        let origin = match &keyed {
            Some((key, body_digest)) => Origin::Keyed { key, body_digest },
            None => Origin::Unnamed,
        };
        replay.offer(&x, &y, origin)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))??;
    let replayed = report.replayed;
    let mut response = Json(report).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", axum::http::HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The header with which a client names a sample batch so that sending it again is safe.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// `GET /v1/samples`: what the replay buffer holds.
async fn sample_stats(State(node): State<Arc<Node>>) -> ApiResult<Response> {
    let replay = node.replay.as_ref().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "this edge has no replay buffer ([replay] in edge.toml)")
    })?;
    Ok(Json(replay.stats()?).into_response())
}

/// Answers with what `f` reads from the incremental-learning job (off the async threads: it
/// reads the store), or 404 if the edge has none.
async fn from_job<T: serde::Serialize + Send + 'static>(
    node: Arc<Node>,
    f: impl FnOnce(&IncrementalJob) -> anyhow::Result<T> + Send + 'static,
) -> ApiResult<Response> {
    let job = node.incremental.clone().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "this edge has no incremental-learning job ([incremental] in edge.toml)")
    })?;
    let answer = tokio::task::spawn_blocking(move || f(&job))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))??;
    Ok(Json(answer).into_response())
}

/// `GET /v1/incremental`: what the incremental-learning job is doing.
async fn incremental_status(State(node): State<Arc<Node>>) -> ApiResult<Response> {
    from_job(node, |job| job.status()).await
}

/// `GET /v1/models`: every model version of the incremental-learning job, its metrics and the
/// decision, and which one serves.
async fn model_versions(State(node): State<Arc<Node>>) -> ApiResult<Response> {
    from_job(node, |job| job.versions()).await
}

/// `GET /v1/infer/<service>/plan`: a split service's plan (made now if it has none), or where a
/// joint service with `offload_when_faster` sends requests and why.
async fn plan(State(node): State<Arc<Node>>, Path(name): Path<String>) -> ApiResult<Response> {
    let services = &node.services;
    let service = services.get(&name).ok_or_else(|| no_service(&name))?;
    services.plan_if_missing(&service).await.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let report = services.plan_report(&service).ok_or_else(|| {
        let why =
            format!("`{name}` has no plan: it is neither a split service nor a joint one with offload_when_faster");
        ApiError::new(StatusCode::BAD_REQUEST, why)
    })?;
    Ok(Json(report).into_response())
}

async fn metrics(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let services = &node.services;
    let per = |f: &dyn Fn(&ServiceMetrics) -> u64| -> Vec<(Labels, u64)> {
        services.services.iter().map(|(n, s)| (vec![("service", n.clone())], f(&s.metrics))).collect()
    };
    let mut scrape = Scrape::new();
    type Counter = fn(&ServiceMetrics) -> &AtomicU64;
    let counters: [(&str, &str, Counter); 7] = [
        ("nereid_inferences", "Inference requests answered.", |m| &m.inferences),
        ("nereid_hard_examples", "Examples the router sent to the cloud (joint inference).", |m| &m.hard_examples),
        ("nereid_cloud_fallbacks", "Requests the edge answered alone because the cloud was unreachable.", |m| {
            &m.fallbacks
        }),
        ("nereid_split_plans", "Split plans made (the first, and one per link change).", |m| &m.replans),
        ("nereid_offloads", "Requests sent whole to the cloud because its answers came back sooner.", |m| &m.offloads),
        ("nereid_inference_refused", "Requests refused with 503: the service's queue was full.", |m| &m.refused),
        (
            "nereid_hard_examples_dropped",
            "Hard examples neither delivered nor kept: the cloud was unreachable and the state directory full.",
            |m| &m.dropped,
        ),
    ];
    for (name, help, counter) in counters {
        scrape.counter(name, help, per(&|m| counter(m).load(Ordering::Relaxed)));
    }
    let ratio = per(&|m| m.inferences.load(Ordering::Relaxed))
        .into_iter()
        .zip(per(&|m| m.hard_examples.load(Ordering::Relaxed)))
        .map(|((labels, n), (_, h))| (labels, if n == 0 { 0.0 } else { h as f64 / n as f64 }));
    scrape.gauge("nereid_upload_ratio", "Hard examples per example (joint inference).", ratio);
    let waiting = services.services.iter().map(|(n, s)| (vec![("service", n.clone())], s.waiting() as f64));
    scrape.gauge("nereid_inference_waiting", "Requests waiting for a free instance of the service.", waiting);
    let batches = services.services.iter().map(|(n, s)| (vec![("service", n.clone())], s.batches()));
    scrape.counter(
        "nereid_inference_batches",
        "Batches the service ran on the edge (requests stacked into one call).",
        batches,
    );
    let mut latency = Vec::new();
    for (n, s) in &services.services {
        for (route, histogram) in crate::lock(&s.metrics.latency).iter() {
            latency.push((vec![("service", n.clone()), ("route", route.to_string())], histogram.clone()));
        }
    }
    scrape.histogram("nereid_inference_latency_seconds", "End-to-end latency per service and route.", latency);
    let pending = node.store.outbox_len().unwrap_or(0);
    scrape.gauge("nereid_outbox_pending", "Hard examples waiting for the cloud.", [(vec![], pending as f64)]);
    scrape.counter(
        "nereid_outbox_delivered",
        "Hard examples the outbox delivered late.",
        [(vec![], services.outbox_delivered.load(Ordering::Relaxed))],
    );
    scrape.http(&node.http);
    scrape.response(&headers)
}

/// Who may call the edge's API, from `[api]` of edge.toml.
pub struct ApiAuth {
    open: bool,
    /// sha256 of each client's token -> the client's name and rights.
    tokens: HashMap<String, (String, Vec<ApiRight>)>,
}

impl ApiAuth {
    pub fn new(config: Option<&EdgeApiConfig>) -> anyhow::Result<ApiAuth> {
        let Some(config) = config else { return Ok(ApiAuth { open: false, tokens: HashMap::new() }) };
        let mut tokens = HashMap::new();
        for (name, client) in &config.clients {
            if client.token.is_empty() {
                anyhow::bail!("[api.clients.{name}]: no token");
            }
            tokens.insert(token_sha256(client.token.expose()), (name.clone(), client.allow.clone()));
        }
        Ok(ApiAuth { open: config.open, tokens })
    }

    /// What a request needs: inference, sending samples, or reading.
    fn right(method: &axum::http::Method, path: &str) -> ApiRight {
        match (method, path) {
            (&axum::http::Method::POST, p) if p.starts_with("/v1/infer/") => ApiRight::Infer,
            (&axum::http::Method::POST, routes::SAMPLES) => ApiRight::Samples,
            _ => ApiRight::Read,
        }
    }

    /// None if the request may do `right`; else its refusal (401 or 403).
    fn check(&self, headers: &HeaderMap, right: ApiRight) -> Option<Response> {
        if self.open {
            return None;
        }
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match token.and_then(|t| self.tokens.get(&token_sha256(t))) {
            None => Some(error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token")),
            Some((_, rights)) if rights.contains(&right) => None,
            Some((client, _)) => {
                Some(error(StatusCode::FORBIDDEN, format!("client `{client}` may not {}", right.verb())))
            }
        }
    }
}

/// Refuses a request whose token does not allow it, before its body is read.
async fn authenticate(
    State(auth): State<Arc<ApiAuth>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let right = ApiAuth::right(req.method(), req.uri().path());
    match auth.check(req.headers(), right) {
        None => next.run(req).await,
        Some(refused) => refused,
    }
}

pub fn router(node: Arc<Node>, auth: Arc<ApiAuth>, ready: nereid_net::Readiness) -> Router {
    let body_limit = axum::extract::DefaultBodyLimit::max(super::replay::MAX_BATCH_BYTES as usize);
    let authenticated = Router::new()
        .route(routes::INFER, post(infer))
        .route(routes::PLAN, get(plan))
        .route(routes::SAMPLES, post(offer_samples).get(sample_stats))
        .route(routes::INCREMENTAL, get(incremental_status))
        .route(routes::MODELS, get(model_versions))
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    Router::new()
        .route(routes::HEALTH, get(|| async { "ok" }))
        .route(routes::READY, get(move || async move { ready.status() }))
        .route(routes::METRICS, get(metrics))
        .merge(authenticated)
        .layer(body_limit)
        .layer(axum::middleware::from_fn_with_state(node.http.clone(), crate::metrics::observe_request))
        .with_state(node)
}

/// Starts `node` and serves its API on `listen` until `stop` completes (then as
/// [`nereid_net::serve_until`]).
pub async fn serve(
    listen: &str,
    node: Arc<Node>,
    auth: ApiAuth,
    limits: nereid_net::ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("edge API listening on {scheme}://{}", listener.local_addr()?);
    if auth.open {
        tracing::warn!("the edge API is open: anyone who reaches {listen} may call it ([api] open = true)");
    }
    node.start();
    let ready = nereid_net::Readiness::default();
    nereid_net::serve_until(listener, router(node, Arc::new(auth), ready.clone()), limits, tls, &ready, stop).await?;
    Ok(())
}
