//! The cloud host: jobs, rounds, the HTTP API edges and operators talk to, and Prometheus metrics.
//!
//! A round: select clients among the nodes that polled recently (seeded, so the same nodes give
//! the same selection), publish the global model v(r-1), persist every accepted update before
//! acknowledging it, close on quorum (every selected node uploaded or reported a failure) or at
//! the deadline (if at least `min_clients` did), fold the updates into the aggregator in
//! node-name order — so the same set of updates gives a bit-identical v(r) whatever the arrival
//! order, and a restarted cloud replays exactly what it had — then commit v(r) and the round's
//! summary in one transaction.
//!
//! Here: the [`Cloud`] (its state, authentication, serving); [`api`] (the handlers of jobs,
//! tasks, models and metrics), [`uploads`] (updates and failures), [`inference`] (hard
//! examples, split tails), [`rounds`] (the round engine and the job loop), [`plugins`] (each
//! job's plugin instances and hot swap), [`board`] (running jobs and open rounds in memory, for
//! polls), [`nodes`] (token hashes and presence in memory), [`relay`] (a regional aggregator's
//! rounds taken from an upper cloud and results sent up), [`error`].
mod api;
mod board;
mod error;
mod inference;
mod nodes;
mod plugins;
mod relay;
mod rounds;
mod selection;
mod uploads;

pub use uploads::decompress_update;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::components::Components;
use crate::config::cloud::NodeAuth;
use crate::config::job::JobSpec;
use crate::config::CloudConfig;
use crate::protocol::*;
use crate::runtime::Runtime;
use crate::store::{CloudStore, JobRow};
use anyhow::Context;
use error::{err, ApiResult};
use nereid_net::tls::PeerCertificate;
use plugins::JobPlugins;

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
    http: crate::metrics::HttpMetrics,
    /// Running jobs and their open rounds as polls need them (see [`board`]).
    board: board::Board,
    tokens: nodes::Tokens,
    presence: nodes::Presence,
    /// Cancelled when the cloud begins to shut down: long polls answer at once.
    stopping: tokio_util::sync::CancellationToken,
    traffic: Mutex<Traffic>,
    /// The newest model each job served, shared by every download of it.
    served: Mutex<HashMap<String, (u32, Bytes)>>,
    /// Each job's open round: its fold as far as it got, the global model it starts from.
    rounds: rounds::Rounds,
    wake: tokio::sync::Notify,
    /// Wakes a regional aggregator's relay: a round closed, its result can go up.
    relay_wake: tokio::sync::Notify,
    /// Nodes that are regional aggregators (`region = true`): their tasks carry the job's spec.
    regions: HashSet<String>,
    /// Upload bodies held in memory at once; further uploads wait (TCP backpressure), which
    /// bounds the cloud's memory whatever the number of clients.
    upload_slots: tokio::sync::Semaphore,
    /// Nodes with an upload in progress (one each).
    uploading: uploads::Uploading,
    max_upload: usize,
    node_auth: NodeAuth,
    ready: nereid_net::Readiness,
}

/// Upload bodies read at once.
const UPLOAD_SLOTS: usize = 4;
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
    let peer = req.extensions().get::<PeerCertificate>().cloned();
    match cloud.caller(req.headers(), peer.as_ref()) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

impl Cloud {
    /// The caller of a request: the operator (admin token), or a node known by its token, by
    /// the certificate it presented, or by both, as `node_auth` says.
    fn caller(&self, headers: &HeaderMap, peer: Option<&PeerCertificate>) -> ApiResult<Caller> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let refuse = |why: String| {
            self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            err(StatusCode::UNAUTHORIZED, why)
        };
        let sha = token.map(token_sha256);
        if sha.as_deref() == Some(self.admin_sha.as_str()) {
            return Ok(Caller::Admin);
        }
        let by_token = match &sha {
            Some(sha) => match self.tokens.node(&self.store, sha)? {
                Some(node) => Some(node),
                None => return Err(refuse("invalid bearer token".into())),
            },
            None => None,
        };
        let by_certificate = || -> ApiResult<String> {
            let Some(name) = peer.and_then(PeerCertificate::name) else {
                return Err(refuse("this cloud knows nodes by their client certificates: none was presented".into()));
            };
            crate::names::check(crate::names::Kind::Node, name)
                .map_err(|e| refuse(format!("the client certificate's name is not a node name: {e}")))?;
            Ok(name.to_string())
        };
        let node = match self.node_auth {
            NodeAuth::Token => by_token.ok_or_else(|| refuse("missing or invalid bearer token".into()))?,
            NodeAuth::Certificate => by_certificate()?,
            NodeAuth::TokenAndCertificate => {
                let named = by_certificate()?;
                let Some(node) = by_token else { return Err(refuse("missing bearer token".into())) };
                if node != named {
                    return Err(refuse(format!(
                        "the token is node `{node}`'s but the client certificate names `{named}`"
                    )));
                }
                node
            }
        };
        self.presence.seen(&node);
        Ok(Caller::Node(node))
    }

    /// Nodes that made a request since `since_ms` or wait in a long poll, sorted.
    fn online_since(&self, since_ms: i64) -> Vec<String> {
        self.presence.online_since(since_ms)
    }

    /// Ends a job in the store and takes it off the board at once.
    fn finish_job(&self, name: &str, status: &str, reason: &str) -> crate::store::Result<()> {
        self.store.finish_job(name, status, reason)?;
        self.board.remove(name);
        Ok(())
    }

    fn traffic(&self, job: &str, round: u32, up: u64, down: u64) {
        let mut traffic = crate::lock(&self.traffic);
        let e = traffic.entry((job.to_string(), round)).or_default();
        e.0 += up;
        e.1 += down;
        drop(traffic);
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

/// Opens the state, registers the configured node tokens, resumes running jobs and serves the
/// API until the process ends.
pub async fn serve(
    config: CloudConfig,
    base: &Path,
    cache_dir: Option<PathBuf>,
    registry_cache: PathBuf,
) -> anyhow::Result<()> {
    crate::return_large_buffers_to_the_os();
    match crate::raise_open_files_limit() {
        Ok(n) if (n as usize) < config.http.max_connections + 64 => tracing::warn!(
            "this process may open {n} files: fewer than [http] max_connections ({}) allows connections",
            config.http.max_connections
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("raising the limit on open files: {e}"),
    }
    let store = CloudStore::open(&base.join(&config.state))?.keeping_model_versions(config.keep_model_versions);
    let configured: Vec<(String, String)> = config
        .nodes
        .iter()
        .filter(|(_, e)| !e.token.is_empty())
        .map(|(node, e)| (node.clone(), token_sha256(e.token.expose())))
        .collect();
    store.set_node_tokens(&configured)?;
    store.collect_update_files()?;
    let runtime = Runtime::new(cache_dir)?;
    let components = Components::new(registry_cache, &config.registries)?;
    let models = config.models.as_ref().map(|m| base.join(m));
    let inference =
        inference::CloudInference::load(models.as_deref(), &config.services, base, &runtime, &components).await?;
    let tokens = nodes::Tokens::load(&store)?;
    let cloud = Arc::new(Cloud {
        inference,
        board: board::Board::default(),
        tokens,
        presence: nodes::Presence::default(),
        stopping: tokio_util::sync::CancellationToken::new(),
        store,
        plugins: JobPlugins::new(runtime, components),
        admin_sha: token_sha256(config.admin_token.expose()),
        online_ms: (config.online_secs * 1000.0) as i64,
        counters: Counters::default(),
        traffic: Mutex::new(HashMap::new()),
        rounds: rounds::Rounds::default(),
        served: Mutex::new(HashMap::new()),
        wake: tokio::sync::Notify::new(),
        relay_wake: tokio::sync::Notify::new(),
        regions: config.nodes.iter().filter(|(_, e)| e.region).map(|(n, _)| n.clone()).collect(),
        upload_slots: tokio::sync::Semaphore::new(UPLOAD_SLOTS),
        uploading: uploads::Uploading::default(),
        max_upload: config.max_upload_mib << 20,
        node_auth: config.node_auth,
        ready: nereid_net::Readiness::default(),
        http: crate::metrics::HttpMetrics::default(),
    });
    for row in cloud.store.jobs()?.into_iter().filter(|j| j.status == "running") {
        let spec: JobSpec = serde_json::from_str(&row.spec)?;
        let c = cloud.clone();
        tokio::task::spawn_blocking(move || c.plugins.aggregator(&c.store, &spec).map(drop)).await??;
        // Who was online died with the last process; the nodes of a round still open were in
        // touch when it opened and are expected back, so they count as seen now. Otherwise the
        // first nodes to poll again would be the only ones the next round could select.
        if let Some(open) = cloud.store.unclosed_round(&row.name)? {
            open.selected.iter().for_each(|node| cloud.presence.seen(node));
        }
        tracing::info!(job = %row.name, round = row.next_round, "resuming job");
        tokio::spawn(rounds::run_job(cloud.clone(), row.name.clone()));
    }
    tokio::spawn(refresh_tokens(cloud.clone()));
    if let Some(upstream) = config.upstream.clone() {
        tokio::spawn(relay::Relay::connect(upstream)?.run(cloud.clone()));
    }
    let app = router(cloud.clone(), cloud.max_upload);
    let addr: SocketAddr = config.listen.parse().map_err(|e| anyhow::anyhow!("listen = {:?}: {e}", config.listen))?;
    let tls = match &config.tls {
        Some(tls) => Some(tls.relative_to(base).acceptor().context("cloud.toml [tls]")?),
        None => {
            nereid_net::tls::check_plaintext(
                "the cloud's API",
                &config.listen,
                config.allow_plaintext,
                "allow_plaintext = true",
            )
            .context("cloud.toml")?;
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("cloud listening on {scheme}://{}", listener.local_addr()?);
    // Stopped by SIGTERM: new connections refused, requests in flight finish. A round's state
    // is committed transaction by transaction, so what is not finished is resumed at the next
    // start as after a crash.
    let stopping = cloud.stopping.clone();
    tokio::spawn(async move {
        nereid_net::terminated().await;
        stopping.cancel();
    });
    nereid_net::serve_until(listener, app, config.http.clone(), tls, &cloud.ready, cloud.stopping.cancelled()).await?;
    tracing::info!("cloud stopped");
    Ok(())
}

/// Reads the node tokens again now and then (see [`nodes::Tokens`]), off the async threads.
async fn refresh_tokens(cloud: Arc<Cloud>) {
    loop {
        tokio::time::sleep(nodes::TOKEN_REFRESH).await;
        let c = cloud.clone();
        match tokio::task::spawn_blocking(move || c.tokens.refresh(&c.store)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("reading the node tokens: {e}"),
            Err(e) => tracing::warn!("reading the node tokens: {e}"),
        }
    }
}

async fn ready(State(cloud): State<Arc<Cloud>>) -> StatusCode {
    cloud.ready.status()
}

/// Largest JSON body of the API (a job spec, a failure report).
const MAX_JSON_BODY: usize = 1 << 20;
/// Largest `/v1/ping` probe.
const MAX_PING_BODY: usize = 16 << 20;

fn router(cloud: Arc<Cloud>, max_upload: usize) -> Router {
    let limit = DefaultBodyLimit::max;
    // Every route but these three authenticates first: no body is read for an unknown caller.
    let open = Router::new()
        .route(routes::HEALTH, get(api::health))
        .route(routes::READY, get(ready))
        .route(routes::METRICS, get(api::metrics));
    let authenticated = Router::new()
        .route(routes::TASK, get(api::task))
        .route(routes::COMPONENTS, post(api::put_component).layer(limit(crate::files::MAX_COMPONENT_BYTES as usize)))
        .route(routes::COMPONENT, get(api::component))
        .route(routes::INITIAL_WEIGHTS, post(api::put_initial_weights).layer(limit(max_upload)))
        .route(routes::JOBS, get(api::list_jobs).post(api::submit_job).layer(limit(MAX_JSON_BODY)))
        .route(routes::JOB, get(api::get_job))
        .route(routes::JOB_STOP, post(api::stop_job))
        .route(routes::MODEL, get(api::model))
        .route(routes::ROUND, get(api::round_state))
        .route(routes::UPDATE, post(uploads::upload))
        .route(routes::FAILURE, post(uploads::report_failure).layer(limit(MAX_JSON_BODY)))
        .route(routes::PING, get(inference::ping).post(inference::ping).layer(limit(MAX_PING_BODY)))
        .route(routes::INFER, post(inference::infer).layer(limit(max_upload)))
        .route(routes::TAIL, post(inference::tail).layer(limit(max_upload)))
        .route(routes::PROFILE, get(inference::profile))
        .route(routes::HARD_EXAMPLES, get(inference::hard_examples))
        .route_layer(axum::middleware::from_fn_with_state(cloud.clone(), authenticate));
    open.merge(authenticated)
        .layer(axum::middleware::from_fn_with_state(cloud.http.clone(), crate::metrics::observe_request))
        .with_state(cloud)
}
