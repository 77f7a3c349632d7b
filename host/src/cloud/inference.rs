//! The cloud's side of inference: hard examples of joint inference (answered by the service's
//! model and kept), tails of split inference (the model cut where the edge says, by the same
//! library the splitter plugin uses), the model's profile, and `/v1/ping` for link probes.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use nereid_onnx::Message;

use super::{err, ApiResult, Caller, Cloud};
use crate::components::Components;
use crate::config::cloud::CloudServiceConfig;
use crate::inference::codec::ActivationCodec;
use crate::inference::profile::{self, Typed};
use crate::inference::{wire, NativeModel};
use crate::protocol::{COMPRESSOR_HEADER, COMPUTE_HEADER, CUT_HEADER, DIGEST_HEADER, EXAMPLE_HEADER, QUEUED_HEADER};
use crate::runtime::{content_digest, CompressorPlugin, Runtime};

struct CloudService {
    onnx: Vec<u8>,
    digest: String,
    full: NativeModel,
    /// Typed once, on the first tail request: what tails are cut from.
    typed: OnceLock<Result<Typed, String>>,
    /// Timed once, on the first profile request.
    node_ms: OnceLock<Result<BTreeMap<String, f64>, String>>,
    tails: Mutex<HashMap<Vec<String>, Arc<NativeModel>>>,
    /// Decodes cut tensors edges encoded with the same component.
    codec: Option<ActivationCodec>,
}

#[derive(Default)]
pub struct CloudInference {
    services: BTreeMap<String, Arc<CloudService>>,
}

impl CloudInference {
    /// The services of cloud.toml; `base` is the directory relative plugin paths start from.
    pub async fn load(
        models: Option<&Path>,
        services: &BTreeMap<String, CloudServiceConfig>,
        base: &Path,
        runtime: &Runtime,
        components: &Components,
    ) -> anyhow::Result<CloudInference> {
        let mut loaded = BTreeMap::new();
        for (name, cfg) in services {
            let dir = models.ok_or_else(|| anyhow::anyhow!("[services.{name}]: `models` is not set in cloud.toml"))?;
            let path = dir.join(&cfg.model).join("model.onnx");
            let onnx = crate::files::read_limited(&path, crate::files::MAX_MODEL_BYTES)
                .map_err(|e| anyhow::anyhow!("[services.{name}] model: reading {}: {e}", path.display()))?;
            let full = NativeModel::new(&onnx)
                .map_err(|e| anyhow::anyhow!("[services.{name}] model {}: {e}", path.display()))?;
            let codec = match &cfg.compressor {
                None => None,
                Some(c) => {
                    let at = |e: &dyn std::fmt::Display| anyhow::anyhow!("[services.{name}] compressor: {e:#}");
                    let p = components.load_plugin(c, base, runtime).await.map_err(|e| at(&e))?;
                    let plugin = CompressorPlugin::new(runtime, p.loaded, p.limits, &c.config).map_err(|e| at(&e))?;
                    Some(ActivationCodec::new(plugin, p.digest))
                }
            };
            loaded.insert(
                name.clone(),
                Arc::new(CloudService {
                    digest: content_digest(&onnx),
                    onnx,
                    full,
                    typed: OnceLock::new(),
                    node_ms: OnceLock::new(),
                    tails: Mutex::new(HashMap::new()),
                    codec,
                }),
            );
        }
        Ok(CloudInference { services: loaded })
    }

    fn service(&self, name: &str) -> ApiResult<Arc<CloudService>> {
        self.services
            .get(name)
            .cloned()
            .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no inference service `{name}`")))
    }
}

impl CloudService {
    fn typed(&self) -> Result<&Typed, String> {
        self.typed.get_or_init(|| profile::typed(&self.onnx).map_err(|e| e.to_string())).as_ref().map_err(Clone::clone)
    }

    fn node_ms(&self) -> Result<&BTreeMap<String, f64>, String> {
        self.node_ms
            .get_or_init(|| {
                let typed = self.typed()?;
                profile::time(&typed.model, 20).map(|t| t.node_ms).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn tail(&self, cut: &[String]) -> Result<Arc<NativeModel>, String> {
        if let Some(t) = crate::lock(&self.tails).get(cut) {
            return Ok(t.clone());
        }
        let part = self.typed()?.model.partition(cut).map_err(|e| e.to_string())?;
        let tail = part.tail.ok_or("the cut leaves nothing to run in the cloud (it is the model's outputs)")?;
        let model = Arc::new(NativeModel::new(&tail.encode_to_vec()).map_err(|e| e.to_string())?);
        crate::lock(&self.tails).insert(cut.to_vec(), model.clone());
        Ok(model)
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn tensors(body: &[u8]) -> ApiResult<Vec<crate::runtime::TensorData>> {
    wire::from_safetensors(body).map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))
}

fn answer(outputs: &[crate::runtime::TensorData], compute_ms: f64) -> ApiResult<Response> {
    let body = wire::to_safetensors(outputs).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(COMPUTE_HEADER, format!("{compute_ms:.3}"))], body).into_response())
}

async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| err(StatusCode::BAD_REQUEST, e))
}

/// `POST /v1/infer/<service>`: a hard example (safetensors). Kept once per (node, id) when it
/// carries an outbox id, and answered by the service's model.
pub async fn infer(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let node = caller.node()?;
    let service = cloud.inference.service(&name)?;
    let inputs = tensors(&body)?;
    if let Some(id) = header(&headers, EXAMPLE_HEADER) {
        let id: i64 =
            id.parse().map_err(|_| err(StatusCode::BAD_REQUEST, format!("{EXAMPLE_HEADER}: not an integer")))?;
        let queued: i64 = header(&headers, QUEUED_HEADER).and_then(|q| q.parse().ok()).unwrap_or(0);
        if !cloud.store.save_hard_example(&node, id, &name, &body, queued)? {
            tracing::debug!(node, id, service = name, "hard example redelivered: already kept");
        }
    }
    let t = Instant::now();
    let outputs = run_blocking(move || service.full.run(&inputs).map_err(|e| e.to_string())).await?;
    answer(&outputs, t.elapsed().as_secs_f64() * 1e3)
}

/// `POST /v1/infer/<service>/tail`: the cut tensors (safetensors) of a split model, cut where
/// the `x-nereid-cut` header says; the model must be the one the edge cut (`x-nereid-model-digest`).
pub async fn tail(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let node = caller.node()?;
    let service = cloud.inference.service(&name)?;
    let digest = header(&headers, DIGEST_HEADER).unwrap_or_default();
    if digest != service.digest {
        return Err(err(
            StatusCode::CONFLICT,
            format!(
                "service `{name}` runs model {}, the edge cut {digest:?}: deploy the same model on both",
                service.digest
            ),
        ));
    }
    let cut: Vec<String> = header(&headers, CUT_HEADER)
        .ok_or_else(|| err(StatusCode::BAD_REQUEST, format!("{CUT_HEADER} is missing")))?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let mut inputs = tensors(&body)?;
    let encoded_with = header(&headers, COMPRESSOR_HEADER).map(str::to_string);
    match (&encoded_with, &service.codec) {
        (None, _) => {}
        (Some(d), Some(codec)) if *d == codec.digest => {}
        (Some(d), Some(codec)) => {
            return Err(err(
                StatusCode::CONFLICT,
                format!("service `{name}` decodes with compressor {}, the edge encoded with {d}: give both the same plugin", codec.digest),
            ))
        }
        (Some(d), None) => {
            return Err(err(
                StatusCode::CONFLICT,
                format!("service `{name}` has no compressor; the edge encoded with {d}: give [services.{name}] the same `compressor`"),
            ))
        }
    }
    let (outputs, compute_ms) = run_blocking(move || {
        if encoded_with.is_some() {
            let codec = service.codec.as_ref().ok_or("no compressor")?;
            inputs = codec.decode(&inputs, &format!("cut tensors from `{node}`")).map_err(|e| e.to_string())?;
        }
        let tail = service.tail(&cut)?;
        let t = Instant::now();
        let out = tail.run(&inputs).map_err(|e| e.to_string())?;
        Ok((out, t.elapsed().as_secs_f64() * 1e3))
    })
    .await?;
    answer(&outputs, compute_ms)
}

/// `GET /v1/infer/<service>/profile`: the model's digest and per-node milliseconds here.
pub async fn profile(State(cloud): State<Arc<Cloud>>, UrlPath(name): UrlPath<String>) -> ApiResult<Response> {
    let service = cloud.inference.service(&name)?;
    let s = service.clone();
    let node_ms = run_blocking(move || s.node_ms().cloned()).await?;
    Ok(Json(serde_json::json!({ "digest": service.digest, "node_ms": node_ms })).into_response())
}

/// `GET /v1/infer/<service>/hard-examples`: the kept hard examples, `[[node, id], ...]`.
pub async fn hard_examples(
    State(cloud): State<Arc<Cloud>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    if let Caller::Node(n) = caller {
        return Err(err(StatusCode::FORBIDDEN, format!("node `{n}` may not list hard examples")));
    }
    cloud.inference.service(&name)?;
    Ok(Json(cloud.store.hard_examples(&name)?).into_response())
}

/// `GET|POST /v1/ping`: the number of bytes received, for round-trip and bandwidth probes (by
/// authenticated callers only: a probe's body is read whole).
pub async fn ping(body: Bytes) -> impl IntoResponse {
    body.len().to_string()
}
