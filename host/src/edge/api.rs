//! The edge's HTTP API: `POST /v1/infer/<service>` (JSON, safetensors, or what the service's
//! adapter reads), `GET /v1/infer/<service>/plan` (split services), `POST /v1/samples` and
//! `GET /v1/samples` (the replay buffer), `GET /v1/incremental` and `GET /v1/models` (the
//! incremental-learning job and its model versions), `GET /metrics`, `GET /v1/health`.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use std::collections::HashMap;

use super::services::{is_bad_request, ServiceMetrics, Services, UnsupportedBody};
use crate::protocol::{token_sha256, ApiRight, EdgeApiConfig, CUT_HEADER};

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(serde_json::json!({ "error": message.to_string() }))).into_response()
}

async fn infer(
    State(services): State<Arc<Services>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(service) = services.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no service `{name}`"));
    };
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let inputs = match services.decode_body(&service, content_type, body).await {
        Ok(t) => t,
        Err(e) if e.is::<UnsupportedBody>() => return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("{e:#}")),
        Err(e) if is_bad_request(&e) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let forced_cut = headers
        .get(CUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect::<Vec<_>>());
    match services.infer(service, inputs, forced_cut).await {
        Ok(r) => Json(r).into_response(),
        Err(e) if is_bad_request(&e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// `POST /v1/samples`: labelled samples for the replay buffer, as safetensors with `x`
/// [samples, ...] (any element type) and `y` [samples] (integer labels).
async fn offer_samples(State(services): State<Arc<Services>>, body: Bytes) -> Response {
    if services.replay.is_none() {
        return error(StatusCode::NOT_FOUND, "this edge has no replay buffer ([replay] in edge.toml)");
    }
    let (x, y) = match super::replay::parse_batch(&body) {
        Ok(batch) => batch,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let services = services.clone();
    let offered = tokio::task::spawn_blocking(move || services.replay.as_ref().map(|r| r.offer(&x, &y, None))).await;
    match offered {
        Ok(Some(Ok(report))) => Json(report).into_response(),
        Ok(Some(Err(e))) if is_bad_request(&e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Ok(Some(Err(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Ok(None) => error(StatusCode::NOT_FOUND, "no replay buffer"),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `GET /v1/samples`: what the replay buffer holds.
async fn sample_stats(State(services): State<Arc<Services>>) -> Response {
    match services.replay.as_ref().map(|r| r.stats()) {
        Some(Ok(stats)) => Json(stats).into_response(),
        Some(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        None => error(StatusCode::NOT_FOUND, "this edge has no replay buffer ([replay] in edge.toml)"),
    }
}

/// Answers with what `f` reads from the incremental-learning job (off the async threads: it
/// reads the store), or 404 if the edge has none.
async fn from_job<T: serde::Serialize + Send + 'static>(
    services: Arc<Services>,
    f: impl FnOnce(&super::incremental::Job) -> anyhow::Result<T> + Send + 'static,
) -> Response {
    let read = tokio::task::spawn_blocking(move || services.incremental.as_ref().map(f)).await;
    match read {
        Ok(Some(Ok(answer))) => Json(answer).into_response(),
        Ok(Some(Err(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Ok(None) => {
            error(StatusCode::NOT_FOUND, "this edge has no incremental-learning job ([incremental] in edge.toml)")
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `GET /v1/incremental`: what the incremental-learning job is doing.
async fn incremental_status(State(services): State<Arc<Services>>) -> Response {
    from_job(services, |job| job.status()).await
}

/// `GET /v1/models`: every model version of the incremental-learning job, its metrics and the
/// decision, and which one serves.
async fn model_versions(State(services): State<Arc<Services>>) -> Response {
    from_job(services, |job| job.versions()).await
}

async fn plan(State(services): State<Arc<Services>>, Path(name): Path<String>) -> Response {
    let Some(service) = services.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no service `{name}`"));
    };
    if let Err(e) = services.plan_if_missing(&service).await {
        return error(StatusCode::BAD_REQUEST, format!("{e:#}"));
    }
    match services.plan_report(&service) {
        Some(p) => Json(p).into_response(),
        None => error(StatusCode::BAD_REQUEST, format!("`{name}` is not a split service")),
    }
}

async fn metrics(State(services): State<Arc<Services>>) -> Response {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in rows {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let per = |f: &dyn Fn(&ServiceMetrics) -> String| -> Vec<(String, String)> {
        services
            .services
            .iter()
            .map(|(n, s)| (format!("{{service=\"{}\"}}", crate::names::escape_label(n)), f(&s.metrics)))
            .collect()
    };
    type Counter = fn(&ServiceMetrics) -> &AtomicU64;
    let counters: [(&str, &str, Counter); 4] = [
        ("nereid_inferences_total", "Inference requests answered.", |m| &m.inferences),
        ("nereid_hard_examples_total", "Examples the router sent to the cloud (joint inference).", |m| {
            &m.hard_examples
        }),
        ("nereid_cloud_fallbacks_total", "Requests the edge answered alone because the cloud was unreachable.", |m| {
            &m.fallbacks
        }),
        ("nereid_split_plans_total", "Split plans made (the first, and one per link change).", |m| &m.replans),
    ];
    for (name, help, counter) in counters {
        family(name, "counter", help, per(&|m| counter(m).load(Ordering::Relaxed).to_string()));
    }
    family(
        "nereid_upload_ratio",
        "gauge",
        "Hard examples per example (joint inference).",
        per(&|m| {
            let n = m.inferences.load(Ordering::Relaxed);
            let h = m.hard_examples.load(Ordering::Relaxed);
            if n == 0 {
                "0".into()
            } else {
                (h as f64 / n as f64).to_string()
            }
        }),
    );
    let mut sums = Vec::new();
    let mut counts = Vec::new();
    for (n, s) in &services.services {
        for (route, (count, secs)) in s.metrics.latency.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let labels = format!("{{service=\"{}\",route=\"{route}\"}}", crate::names::escape_label(n));
            sums.push((labels.clone(), secs.to_string()));
            counts.push((labels, count.to_string()));
        }
    }
    out.push_str("# HELP nereid_inference_latency_seconds End-to-end latency per service and route.\n# TYPE nereid_inference_latency_seconds summary\n");
    for (l, v) in sums {
        out.push_str(&format!("nereid_inference_latency_seconds_sum{l} {v}\n"));
    }
    for (l, v) in counts {
        out.push_str(&format!("nereid_inference_latency_seconds_count{l} {v}\n"));
    }
    let pending = services.store.outbox_len().unwrap_or(0);
    out.push_str(&format!(
        "# HELP nereid_outbox_pending Hard examples waiting for the cloud.\n# TYPE nereid_outbox_pending gauge\nnereid_outbox_pending {pending}\n"
    ));
    out.push_str(&format!(
        "# HELP nereid_outbox_delivered_total Hard examples the outbox delivered late.\n# TYPE nereid_outbox_delivered_total counter\nnereid_outbox_delivered_total {}\n",
        services.outbox_delivered.load(Ordering::Relaxed)
    ));
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
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
            let token = client.resolve_token().map_err(|e| anyhow::anyhow!("[api.clients.{name}]: {e}"))?;
            tokens.insert(token_sha256(&token), (name.clone(), client.allow.clone()));
        }
        Ok(ApiAuth { open: config.open, tokens })
    }

    /// What a request needs: inference, sending samples, or reading.
    fn right(method: &axum::http::Method, path: &str) -> ApiRight {
        match (method, path) {
            (&axum::http::Method::POST, p) if p.starts_with("/v1/infer/") => ApiRight::Infer,
            (&axum::http::Method::POST, "/v1/samples") => ApiRight::Samples,
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

pub fn router(services: Arc<Services>, auth: Arc<ApiAuth>) -> Router {
    let body_limit = axum::extract::DefaultBodyLimit::max(super::replay::MAX_BATCH_BYTES as usize);
    let authenticated = Router::new()
        .route("/v1/infer/{service}", post(infer))
        .route("/v1/infer/{service}/plan", get(plan))
        .route("/v1/samples", post(offer_samples).get(sample_stats))
        .route("/v1/incremental", get(incremental_status))
        .route("/v1/models", get(model_versions))
        .route_layer(axum::middleware::from_fn_with_state(auth, authenticate));
    Router::new()
        .route("/v1/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .merge(authenticated)
        .layer(body_limit)
        .with_state(services)
}

/// Serves the edge API on `listen` until the process ends.
pub async fn serve(
    listen: &str,
    services: Arc<Services>,
    auth: ApiAuth,
    limits: nereid_net::ServerLimits,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))?;
    tracing::info!("edge API listening on {}", listener.local_addr()?);
    if auth.open {
        tracing::warn!("the edge API is open: anyone who reaches {listen} may call it ([api] open = true)");
    }
    tokio::spawn(services.clone().deliver_outbox());
    tokio::spawn(services.clone().plan_all());
    tokio::spawn(super::incremental::run(services.clone()));
    tokio::spawn(super::mqtt::subscribe(services.clone()));
    nereid_net::serve(listener, router(services, Arc::new(auth)), limits).await?;
    Ok(())
}
