//! Joint inference: the edge model answers through the router plugin, which sends hard
//! examples to the cloud's bigger model (through the persistent outbox); switching the model a
//! joint service serves (the incremental-learning job's deployed versions).
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};

use super::cloud_link::CloudCall;
use super::dispatch::Instances;
use super::offload::{Offload, Path};
use super::{named_values, replace_row, Claim, InferResponse, Kind, RowResult, Service, Services};
use crate::inference::wire::{self};
use crate::lock;
use crate::protocol::{EXAMPLE_HEADER, QUEUED_HEADER};
use crate::runtime::config::ConfigTable;
use crate::runtime::nn::SessionOptions;
use crate::runtime::{Decision, Limits, LoadedComponent, Route, RouterPlugin, Runtime, TensorData};
use crate::store::now_ms;

/// The id of a hard example sent without an outbox entry (the state directory is full or
/// read-only): negative, so it never meets an outbox id, and from the clock, so it differs
/// from every earlier one of this node, across restarts too (the cloud keeps an example once
/// per node and id).
fn unkept_example_id() -> i64 {
    use std::sync::atomic::AtomicI64;
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = -std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    // Strictly decreasing within this process, however close two calls are.
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let id = now.min(last - 1);
        match LAST.compare_exchange_weak(last, id, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return id,
            Err(seen) => last = seen,
        }
    }
}

pub(super) struct Joint {
    /// The model in the runtime's models the service answers with, and the router instances
    /// that run it (an incremental-learning job replaces both at once).
    pub(super) serving: Mutex<Arc<ServingModel>>,
    /// The model of edge.toml (stays registered when another one serves).
    pub(super) configured: String,
    pub(super) component: LoadedComponent,
    pub(super) limits: Limits,
    pub(super) config: ConfigTable,
    /// Router instances per served model (the service's `instances`).
    pub(super) instances: usize,
    /// How a served model's sessions run (the service's `threads`).
    pub(super) session: SessionOptions,
    /// `offload_when_faster`: the latency of each path, which picks the next request's.
    pub(super) offload: Option<Offload>,
}

#[derive(Default)]
pub(super) struct ServingModel {
    pub(super) model: String,
    pub(super) routers: Instances<RouterPlugin>,
}

/// What the edge model and the router made of one request.
pub(super) struct Routed {
    pub(super) inputs: Vec<TensorData>,
    pub(super) outputs: Vec<TensorData>,
    pub(super) decisions: Vec<Decision>,
}

/// A model version ready to serve (registered, with its own router instances), not serving yet.
pub struct PreparedSwitch {
    service: String,
    joint: Arc<Joint>,
    serving: ServingModel,
}

impl Joint {
    /// `model` (registered already) with its router instances.
    pub(super) fn serving_model(&self, runtime: &Runtime, model: &str) -> anyhow::Result<ServingModel> {
        let routers = Instances::default();
        for _ in 0..self.instances {
            routers.put(0, self.router(runtime)?);
        }
        Ok(ServingModel { model: model.to_string(), routers })
    }

    fn router(&self, runtime: &Runtime) -> anyhow::Result<RouterPlugin> {
        Ok(RouterPlugin::new(runtime, self.component.clone(), self.limits, &self.config)?)
    }

    /// Answers a batch of requests with one router instance: stacked into one model call when
    /// there are several (each alone if that fails, so one bad request fails alone).
    pub(super) fn run_batch(&self, runtime: &Runtime, batch: Vec<Vec<TensorData>>) -> Vec<anyhow::Result<Routed>> {
        let serving = lock(&self.serving).clone();
        let (generation, mut router) = match serving.routers.take(0, 0, || self.router(runtime)) {
            Ok(r) => r,
            Err(e) => return batch.iter().map(|_| Err(anyhow!("a router instance: {e:#}"))).collect(),
        };
        let answers = if batch.len() > 1 {
            match run_stacked(&mut router, &serving.model, &batch) {
                Ok(answers) => answers,
                Err(e) => {
                    tracing::debug!(model = %serving.model, "a batch of {} failed, running each alone: {e:#}", batch.len());
                    batch.into_iter().map(|inputs| route(&mut router, &serving.model, inputs)).collect()
                }
            }
        } else {
            batch.into_iter().map(|inputs| route(&mut router, &serving.model, inputs)).collect()
        };
        serving.routers.put(generation, router);
        answers
    }
}

/// The router's decision for each row of the edge model's first output.
fn decide(router: &mut RouterPlugin, outputs: &[TensorData]) -> anyhow::Result<Vec<Decision>> {
    let first = outputs.first().context("the edge model has no output")?;
    let rows = first.shape.first().copied().unwrap_or(1).max(1);
    let mut decisions = Vec::with_capacity(rows as usize);
    for r in 0..rows {
        let row = wire::rows(first, r, r + 1);
        let tensor = crate::tensor::Tensor::from_f32(row.shape.clone(), wire::f32_values(&row)?)
            .context("the edge model's output does not fit its shape")?;
        decisions.push(router.decide(&tensor)?);
    }
    Ok(decisions)
}

fn route(router: &mut RouterPlugin, model: &str, inputs: Vec<TensorData>) -> anyhow::Result<Routed> {
    let outputs = router.run(model, &inputs)?;
    let decisions = decide(router, &outputs)?;
    Ok(Routed { inputs, outputs, decisions })
}

/// Runs requests whose inputs stack (same names, types and trailing shapes) as one call.
fn run_stacked(
    router: &mut RouterPlugin,
    model: &str,
    batch: &[Vec<TensorData>],
) -> anyhow::Result<Vec<anyhow::Result<Routed>>> {
    let rows: Vec<u64> = batch
        .iter()
        .map(|inputs| inputs.first().and_then(|t| t.shape.first()).copied())
        .collect::<Option<_>>()
        .context("an input without a first dimension")?;
    let total: u64 = rows.iter().sum();
    let stacked: Vec<TensorData> = batch[0]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut shape = t.shape.clone();
            shape[0] = total;
            let data = batch.iter().flat_map(|inputs| inputs[i].data.iter().copied()).collect();
            TensorData { name: t.name.clone(), dtype: t.dtype, shape, data }
        })
        .collect();
    let outputs = router.run(model, &stacked)?;
    if let Some(o) = outputs.iter().find(|o| o.shape.first() != Some(&total)) {
        bail!("output `{}` has shape {:?} for {total} stacked rows", o.name, o.shape);
    }
    let decisions = decide(router, &outputs)?;
    let mut start = 0;
    Ok(batch
        .iter()
        .zip(rows)
        .map(|(inputs, n)| {
            let answer = Routed {
                inputs: inputs.clone(),
                outputs: outputs.iter().map(|o| wire::rows(o, start, start + n)).collect(),
                decisions: decisions[start as usize..(start + n) as usize].to_vec(),
            };
            start += n;
            Ok(answer)
        })
        .collect())
}

impl Services {
    /// Registers `onnx` as `model` and starts a router instance for it (a wasi-nn context holds
    /// the models there were when its instance started), without touching what serves.
    pub fn prepare_switch(&self, service: &str, model: &str, onnx: &[u8]) -> anyhow::Result<PreparedSwitch> {
        let svc = self.services.get(service).with_context(|| format!("no service `{service}`"))?;
        let Kind::Joint(joint, _) = &svc.kind else { bail!("service `{service}` is not a joint service") };
        self.runtime
            .models()
            .insert_with(model, onnx, joint.session)
            .with_context(|| format!("registering `{model}`"))?;
        let serving = joint
            .serving_model(&self.runtime, model)
            .with_context(|| format!("service `{service}`: router instances for `{model}`"))?;
        Ok(PreparedSwitch { service: service.to_string(), joint: joint.clone(), serving })
    }

    /// Makes a prepared version serve. Requests running on the old one finish on it; the next
    /// ones run on the new one. The old model leaves the runtime's models unless it is the
    /// service's configured one.
    pub fn switch(&self, prepared: PreparedSwitch) {
        let PreparedSwitch { service, joint, serving } = prepared;
        let to = serving.model.clone();
        let old = std::mem::replace(&mut *lock(&joint.serving), Arc::new(serving));
        if old.model != joint.configured {
            self.runtime.models().remove(&old.model);
        }
        tracing::info!(%service, from = %old.model, %to, "serving model switched");
    }

    pub(super) async fn joint(
        &self,
        service: &Service,
        joint: &Joint,
        dispatch: &super::JointDispatch,
        inputs: Vec<TensorData>,
    ) -> anyhow::Result<InferResponse> {
        let start = Instant::now();
        if let Some(offload) = &joint.offload {
            if offload.choose(start) == Path::Cloud {
                if let Some(answer) = self.offload(service, offload, &inputs).await? {
                    return Ok(answer);
                }
            }
        }
        let t0 = Instant::now();
        let Routed { inputs, mut outputs, decisions } = dispatch.submit(inputs).await?;
        let edge_ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Some(offload) = &joint.offload {
            offload.measured(Path::Edge, edge_ms);
        }
        let mut results = Vec::with_capacity(decisions.len());
        for (i, d) in decisions.iter().enumerate() {
            let mut row = RowResult {
                index: i as u64,
                computed: "edge",
                route: d.route,
                score: Some(d.score),
                queued: false,
                dropped: false,
            };
            if d.route == Route::Cloud {
                service.metrics.hard_examples.fetch_add(1, Ordering::Relaxed);
                let rows: Vec<TensorData> = inputs.iter().map(|t| wire::rows(t, i as u64, i as u64 + 1)).collect();
                let body = wire::to_safetensors(&rows)?;
                let queued_ms = now_ms();
                // In the outbox before it leaves: a crash or an outage loses nothing. With the
                // state directory full or read-only it leaves unkept, under an id of its own.
                let (svc_name, in_flight, stored) = (service.name.clone(), self.in_flight.clone(), body.clone());
                let kept = self
                    .with_store(move |s| {
                        // Claimed before the entry is visible, so the outbox never sends it too.
                        let mut claimed = lock(&in_flight);
                        let id = s.enqueue(&svc_name, &stored, queued_ms)?;
                        claimed.insert(id);
                        drop(claimed);
                        Ok(Claim { ids: in_flight, id })
                    })
                    .await;
                let (claim, id) = match kept {
                    Ok(claim) => {
                        let id = claim.id;
                        (Some(claim), id)
                    }
                    Err(e) if crate::store::is_storage_error(&e) => {
                        tracing::warn!(service = %service.name, "hard example not kept (the state directory is full or read-only), sent as it is: {e:#}");
                        (None, unkept_example_id())
                    }
                    Err(e) => return Err(e),
                };
                let headers = [(EXAMPLE_HEADER, id.to_string()), (QUEUED_HEADER, queued_ms.to_string())];
                match service.cloud.post("", body, &headers).await? {
                    CloudCall::Answered { outputs: cloud_out, .. } => {
                        if claim.is_some() {
                            if let Err(e) = self.with_store(move |s| s.delivered(id)).await {
                                // The cloud keeps it once however often it comes: the outbox
                                // sending it again (once it can mark it) is harmless.
                                tracing::warn!(service = %service.name, id, "marking a hard example delivered: {e:#}");
                            }
                        }
                        for (out, c) in outputs.iter_mut().zip(cloud_out) {
                            replace_row(out, i as u64, &c)?;
                        }
                        row.computed = "cloud";
                    }
                    CloudCall::Unreachable(why) => {
                        tracing::warn!(service = %service.name, id, "cloud unreachable, answering on the edge: {why}");
                        service.metrics.fallbacks.fetch_add(1, Ordering::Relaxed);
                        match claim {
                            Some(claim) => {
                                row.queued = true;
                                drop(claim);
                                self.outbox_wake.notify_one();
                            }
                            None => {
                                tracing::warn!(service = %service.name, "hard example dropped: the cloud is unreachable and the state directory is full or read-only");
                                service.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                                row.dropped = true;
                            }
                        }
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
        let elapsed = start.elapsed();
        service.metrics.observe(if computed == "edge" { "edge" } else { "cloud" }, elapsed);
        Ok(InferResponse {
            service: service.name.clone(),
            outputs: named_values(&outputs)?,
            computed,
            results,
            cut: None,
            fallback: false,
            offloaded: false,
            upload_bytes: None,
            edge_ms,
            total_ms: elapsed.as_secs_f64() * 1e3,
        })
    }

    /// Sends the whole request to the cloud's service and answers with its outputs, timing the
    /// round trip for `offload`. None when the cloud does not answer or refuses: the caller then
    /// runs the edge model, and the cloud is left alone until it is due to be measured again.
    /// Nothing is kept in the outbox: the request is no hard example (the router never saw it).
    async fn offload(
        &self,
        service: &Service,
        offload: &Offload,
        inputs: &[TensorData],
    ) -> anyhow::Result<Option<InferResponse>> {
        let t0 = Instant::now();
        let body = wire::to_safetensors(inputs)?;
        let outputs = match service.cloud.post("", body, &[]).await {
            Ok(CloudCall::Answered { outputs, .. }) => outputs,
            Ok(CloudCall::Unreachable(why)) => {
                tracing::warn!(service = %service.name, "offloading: the cloud did not answer, running on the edge: {why}");
                offload.cloud_failed();
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(service = %service.name, "offloading: {e:#}; running on the edge");
                offload.cloud_failed();
                return Ok(None);
            }
        };
        let elapsed = t0.elapsed();
        offload.measured(Path::Cloud, elapsed.as_secs_f64() * 1e3);
        service.metrics.offloads.fetch_add(1, Ordering::Relaxed);
        service.metrics.observe("cloud", elapsed);
        let rows = outputs.first().and_then(|o| o.shape.first()).copied().unwrap_or(1);
        let results = (0..rows)
            .map(|index| RowResult {
                index,
                computed: "cloud",
                route: Route::Cloud,
                score: None,
                queued: false,
                dropped: false,
            })
            .collect();
        Ok(Some(InferResponse {
            service: service.name.clone(),
            outputs: named_values(&outputs)?,
            computed: "cloud",
            results,
            cut: None,
            fallback: false,
            offloaded: true,
            upload_bytes: None,
            edge_ms: 0.0,
            total_ms: elapsed.as_secs_f64() * 1e3,
        }))
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
}
