//! Split inference: the splitter plugin plans where to cut the model from both sides' profiles
//! and the measured link, the edge runs the head, the cloud the tail; the plan follows the link.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::super::error::BadRequest;
use super::cloud_link::CloudCall;
use super::dispatch::Instances;
use super::{blocking, named_values, InferResponse, Kind, Service, Services, SplitDispatch};
use crate::inference::codec::ActivationCodec;
use crate::inference::profile;
use crate::inference::wire::{self};
use crate::lock;
use crate::protocol::{COMPRESSOR_HEADER, CUT_HEADER, DIGEST_HEADER};
use crate::runtime::config::ConfigTable;
use crate::runtime::nn::SessionOptions;
use crate::runtime::{content_digest, CutPoint, Limits, LoadedComponent, Runtime, SplitterPlugin, TensorData};

/// The halves of one cut, ready to run. Cut tensors that are model inputs are sent as they came.
#[derive(Clone)]
pub(super) struct Halves {
    /// The head's name in the runtime's models (none for the cloud-only cut).
    pub(super) head: Option<String>,
    /// Whether anything runs in the cloud (not for the edge-only cut).
    pub(super) has_tail: bool,
}

pub(super) struct Plan {
    pub(super) cut: Vec<String>,
    pub(super) predicted_ms: f64,
    pub(super) bandwidth_mbit_s: f64,
    pub(super) rtt_ms: f64,
    pub(super) cuts: Vec<CutPoint>,
}

/// What plans are made from, measured once: the model with every tensor typed (encoded, as the
/// plugin takes it) and both sides' profile.
pub(super) struct Planning {
    pub(super) typed: Vec<u8>,
    pub(super) profile: nereid_onnx::Profile,
    /// Whether `profile.cloud_ms` is the cloud's (else this node's, until the cloud answers).
    pub(super) cloud_measured: bool,
}

/// A model run on the edge: a head (or the whole model), its inputs, and the generation of the
/// node's models it was registered by (an instance must be at least as new to see it).
pub(super) struct HeadRun {
    pub(super) model: String,
    pub(super) inputs: Vec<TensorData>,
    pub(super) generation: u64,
}

/// The inputs back, and the model's outputs.
pub(super) type HeadRan = (Vec<TensorData>, Vec<TensorData>);

pub(super) struct SplitState {
    /// Plans and partitions (model runs take instances of their own).
    pub(super) plugin: SplitterPlugin,
    pub(super) planning: Option<Planning>,
    pub(super) plan: Option<Plan>,
    pub(super) halves: HashMap<Vec<String>, Halves>,
    /// Exponentially weighted bandwidth seen on transfers, Mbit/s.
    pub(super) measured_mbit_s: Option<f64>,
    /// Float32 bytes of the cut tensors over the bytes the compressor made of them, on the last
    /// transfer: plans count transfers as float32 bytes / (bandwidth x this).
    pub(super) compression_ratio: Option<f64>,
}

pub(super) struct Split {
    pub(super) model: String,
    pub(super) onnx: Vec<u8>,
    pub(super) digest: String,
    /// The model's outputs: the cut that runs everything on the edge.
    pub(super) outputs: Vec<String>,
    pub(super) replan_factor: f64,
    pub(super) probe_bytes: usize,
    pub(super) relink: Option<Duration>,
    pub(super) component: LoadedComponent,
    pub(super) limits: Limits,
    pub(super) config: ConfigTable,
    /// Encodes the cut tensors before they travel.
    pub(super) codec: Option<ActivationCodec>,
    /// How the model's and the heads' sessions run (the service's `threads`).
    pub(super) session: SessionOptions,
    /// Instances that run heads, one per running request.
    pub(super) runners: Instances<SplitterPlugin>,
    pub(super) state: Mutex<SplitState>,
    /// Held while planning, so a request arriving during the start-up plan waits for it.
    pub(super) planner: tokio::sync::Mutex<()>,
}

impl Services {
    pub(super) async fn split(
        self: &Arc<Self>,
        service: &Arc<Service>,
        split: Arc<Split>,
        dispatch: &SplitDispatch,
        inputs: Vec<TensorData>,
        forced_cut: Option<Vec<String>>,
    ) -> anyhow::Result<InferResponse> {
        let t0 = Instant::now();
        self.plan_if_missing(service).await?;
        let cut = match forced_cut {
            Some(cut) => cut,
            None => lock(&split.state).plan.as_ref().map(|p| p.cut.clone()).context("no plan")?,
        };
        let known = lock(&split.state).halves.get(&cut).cloned();
        let halves = match known {
            Some(h) => h,
            None => {
                let (runtime, name, s, c) = (self.runtime.clone(), service.name.clone(), split.clone(), cut.clone());
                blocking(move || s.halves(&mut lock(&s.state), &runtime, &name, &c)).await?
            }
        };
        let (inputs, mut activations) = match &halves.head {
            Some(head) => {
                let generation = self.runtime.models().generation();
                dispatch.submit(HeadRun { model: head.clone(), inputs, generation }).await?
            }
            None => (inputs, Vec::new()),
        };
        // Cut tensors that are model inputs travel as they came.
        activations.extend(inputs.iter().filter(|t| cut.contains(&t.name)).cloned());
        let edge_ms = t0.elapsed().as_secs_f64() * 1e3;
        let answer = |outputs: &[TensorData],
                      computed: &'static str,
                      fallback: bool,
                      upload_bytes: Option<usize>|
         -> anyhow::Result<InferResponse> {
            service.metrics.observe(computed, t0.elapsed());
            Ok(InferResponse {
                service: service.name.clone(),
                outputs: named_values(outputs)?,
                computed,
                results: Vec::new(),
                cut: Some(cut.clone()),
                fallback,
                offloaded: false,
                upload_bytes,
                edge_ms,
                total_ms: t0.elapsed().as_secs_f64() * 1e3,
            })
        };
        if !halves.has_tail {
            return answer(&activations, "edge", false, None);
        }
        let mut headers = vec![(CUT_HEADER, cut.join(",")), (DIGEST_HEADER, split.digest.clone())];
        let body = match &split.codec {
            Some(codec) => {
                headers.push((COMPRESSOR_HEADER, codec.digest.clone()));
                let (s, a) = (split.clone(), activations.clone());
                let encoded = blocking(move || Ok(s.codec.as_ref().context("codec")?.encode(&a)?)).await?;
                let body = wire::to_safetensors(&encoded)?;
                let raw: usize = activations.iter().map(|t| t.data.len()).sum();
                lock(&split.state).compression_ratio = Some(raw as f64 / body.len().max(1) as f64);
                body
            }
            None => wire::to_safetensors(&activations)?,
        };
        let upload = body.len();
        let sent = Instant::now();
        match service.cloud.post("/tail", body, &headers).await? {
            CloudCall::Answered { outputs, compute_ms } => {
                let transfer_ms = sent.elapsed().as_secs_f64() * 1e3 - compute_ms;
                self.observe_link(service, &split, upload, transfer_ms);
                answer(&outputs, if halves.head.is_none() { "cloud" } else { "split" }, false, Some(upload))
            }
            CloudCall::Unreachable(why) => {
                tracing::warn!(service = %service.name, "cloud unreachable, running the whole model on the edge: {why}");
                service.metrics.fallbacks.fetch_add(1, Ordering::Relaxed);
                let generation = self.runtime.models().generation();
                let (_, outputs) = dispatch.submit(HeadRun { model: split.model.clone(), inputs, generation }).await?;
                answer(&outputs, "edge", true, None)
            }
        }
    }

    /// Folds one transfer into the bandwidth estimate and plans again when it moved by more
    /// than the service's factor from the planned bandwidth.
    fn observe_link(self: &Arc<Self>, service: &Arc<Service>, split: &Split, bytes: usize, transfer_ms: f64) {
        let replan = {
            let mut state = lock(&split.state);
            let wire_ms = transfer_ms - state.plan.as_ref().map_or(0.0, |p| p.rtt_ms);
            // Transfers shorter than the timer's noise say nothing about the bandwidth.
            if wire_ms < 1.0 || bytes < 4096 {
                return;
            }
            let sample = bytes as f64 * 8.0 / (wire_ms * 1e3);
            let est = match state.measured_mbit_s {
                Some(prev) => 0.7 * prev + 0.3 * sample,
                None => sample,
            };
            state.measured_mbit_s = Some(est);
            state.plan.as_ref().map(|p| {
                let ratio = est / p.bandwidth_mbit_s;
                (ratio > split.replan_factor || ratio < 1.0 / split.replan_factor).then_some(est)
            })
        };
        if let Some(Some(bw)) = replan {
            tracing::info!(service = %service.name, bandwidth_mbit_s = bw, "the link changed: planning again");
            // In the background: the request that saw the change is answered already.
            let (services, service) = (self.clone(), service.clone());
            tokio::spawn(async move {
                if let Err(e) = services.plan(&service, Some(bw)).await {
                    tracing::warn!(service = %service.name, "re-planning: {e:#}");
                }
            });
        }
    }

    /// Plans every split service at start (so the first request does not pay for profiling),
    /// then keeps measuring the link of those whose plan sends nothing to the cloud: no
    /// transfer would tell them the link came back or got faster.
    pub async fn plan_all(self: Arc<Self>) {
        for service in self.services.values() {
            if let Err(e) = self.plan_if_missing(service).await {
                tracing::warn!(service = %service.name, "planning at start: {e:#}");
            }
        }
        for service in self.services.values() {
            let Kind::Split(split, _) = &service.kind else { continue };
            let Some(every) = split.relink else { continue };
            let (services, service, split) = (self.clone(), service.clone(), split.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let ships_nothing = lock(&split.state)
                        .plan
                        .as_ref()
                        .is_none_or(|p| p.cut.iter().all(|t| split.outputs.contains(t)));
                    if ships_nothing {
                        if let Err(e) = services.plan(&service, None).await {
                            tracing::warn!(service = %service.name, "measuring the link again: {e:#}");
                        }
                    }
                }
            });
        }
    }

    /// Plans a split service unless it has a plan (or one is being made: then waits for it).
    pub async fn plan_if_missing(self: &Arc<Self>, service: &Arc<Service>) -> anyhow::Result<()> {
        let Kind::Split(split, _) = &service.kind else { return Ok(()) };
        let _planning = split.planner.lock().await;
        if lock(&split.state).plan.is_some() {
            return Ok(());
        }
        self.plan_locked(service, split, None).await
    }

    /// Plans a split service again: at `bandwidth` (Mbit/s) or at a new measure of the link.
    pub async fn plan(self: &Arc<Self>, service: &Arc<Service>, bandwidth: Option<f64>) -> anyhow::Result<()> {
        let Kind::Split(split, _) = &service.kind else {
            return Err(BadRequest(format!("`{}` is not a split service", service.name)).into());
        };
        let _planning = split.planner.lock().await;
        self.plan_locked(service, split, bandwidth).await
    }

    /// Profiles both sides (once), measures the link (unless `bandwidth` is given), and asks
    /// the splitter for the best cut. The caller holds `split.planner`.
    async fn plan_locked(
        self: &Arc<Self>,
        service: &Arc<Service>,
        split: &Arc<Split>,
        bandwidth: Option<f64>,
    ) -> anyhow::Result<()> {
        let measured = lock(&split.state).planning.is_some();
        if !measured {
            let onnx = split.onnx.clone();
            let profiled = blocking(move || Ok(profile::profile(&onnx, 20)?)).await?;
            // Without the cloud's profile, its nodes are taken to run as fast as here.
            let cloud = self.cloud_profile(service, &split.digest).await;
            let cloud_measured = cloud.is_some();
            let cloud_ms = cloud.unwrap_or_else(|| profiled.node_ms.clone());
            lock(&split.state).planning = Some(Planning {
                typed: profiled.model.encode(),
                profile: profiled.split_profile(cloud_ms),
                cloud_measured,
            });
        } else if lock(&split.state).planning.as_ref().is_some_and(|p| !p.cloud_measured) {
            if let Some(cloud_ms) = self.cloud_profile(service, &split.digest).await {
                if let Some(p) = lock(&split.state).planning.as_mut() {
                    p.profile.cloud_ms = cloud_ms;
                    p.cloud_measured = true;
                }
            }
        }
        let (bandwidth, rtt) = match bandwidth {
            Some(bw) => (bw, lock(&split.state).plan.as_ref().map_or(0.0, |p| p.rtt_ms)),
            None => match self.measure_link(service, split.probe_bytes).await {
                Ok(link) => link,
                Err(e) => {
                    tracing::warn!(service = %service.name, "measuring the link: {e:#}; planning edge-only until it answers");
                    (1e-6, 0.0)
                }
            },
        };
        let (svc, split) = (service.clone(), split.clone());
        blocking(move || {
            let mut guard = lock(&split.state);
            let state = &mut *guard;
            let planning = state.planning.as_ref().context("measured above")?;
            let effective = bandwidth * state.compression_ratio.unwrap_or(1.0);
            let cuts = state.plugin.plan(&planning.typed, &planning.profile, effective, rtt)?;
            let best = cuts.first().context("the splitter returned no cut")?.clone();
            tracing::info!(service = %svc.name, cut = %best.tensors.join(","), predicted_ms = best.predicted_ms, bandwidth_mbit_s = bandwidth, rtt_ms = rtt, "planned");
            state.measured_mbit_s = Some(bandwidth);
            state.plan =
                Some(Plan { cut: best.tensors, predicted_ms: best.predicted_ms, bandwidth_mbit_s: bandwidth, rtt_ms: rtt, cuts });
            svc.metrics.replans.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    /// The cloud's per-node times for the model, if it has the same one.
    async fn cloud_profile(&self, service: &Service, digest: &str) -> Option<BTreeMap<String, f64>> {
        let (cloud_digest, node_ms) = service.cloud.profile().await?;
        if cloud_digest != digest {
            tracing::warn!(service = %service.name, "the cloud's model differs from the edge's ({cloud_digest} vs {digest})");
            return None;
        }
        Some(node_ms)
    }

    /// Round-trip time (median of 5 pings) and bandwidth (one probe upload) to the cloud.
    async fn measure_link(&self, service: &Service, probe: usize) -> anyhow::Result<(f64, f64)> {
        service.cloud.measure(probe).await
    }

    /// The plan of a split service, for `GET /v1/infer/<service>/plan`.
    pub fn plan_report(&self, service: &Service) -> Option<serde_json::Value> {
        let split = match &service.kind {
            Kind::Split(split, _) => split,
            Kind::Joint(joint, _) => return joint.offload.as_ref().map(|o| o.report()),
        };
        let state = lock(&split.state);
        let plan = state.plan.as_ref()?;
        Some(serde_json::json!({
            "cut": plan.cut,
            "predicted_ms": plan.predicted_ms,
            "bandwidth_mbit_s": plan.bandwidth_mbit_s,
            "rtt_ms": plan.rtt_ms,
            "measured_bandwidth_mbit_s": state.measured_mbit_s,
            "cuts": plan.cuts,
        }))
    }
}

impl Split {
    /// Runs a head (or the whole model) with an instance made after it was registered.
    pub(super) fn run(&self, runtime: &Runtime, run: HeadRun) -> anyhow::Result<HeadRan> {
        let make = || Ok(SplitterPlugin::new(runtime, self.component.clone(), self.limits, &self.config)?);
        let (generation, mut runner) = self.runners.take(run.generation, runtime.models().generation(), make)?;
        let outputs = runner.run(&run.model, &run.inputs);
        self.runners.put(generation, runner);
        Ok((run.inputs, outputs?))
    }

    /// The halves of `cut`, partitioned by the plugin and the head registered with the
    /// runtime's models (once per cut). Registering a model takes a new plugin instance to see
    /// it, so the instance is replaced then.
    fn halves(
        &self,
        state: &mut SplitState,
        runtime: &Runtime,
        service: &str,
        cut: &[String],
    ) -> anyhow::Result<Halves> {
        if let Some(h) = state.halves.get(cut) {
            return Ok(h.clone());
        }
        let typed = &state.planning.as_ref().context("a split service plans before it cuts")?.typed;
        let (head, tail) = state.plugin.partition(typed, cut)?;
        let head = match head {
            Some(bytes) => {
                let name = format!("{service}.head.{}", &content_digest(cut.join(",").as_bytes())[7..19]);
                runtime.models().insert_with(&name, &bytes, self.session)?;
                state.plugin = SplitterPlugin::new(runtime, self.component.clone(), self.limits, &self.config)?;
                Some(name)
            }
            None => None,
        };
        let halves = Halves { head, has_tail: tail.is_some() };
        state.halves.insert(cut.to_vec(), halves.clone());
        Ok(halves)
    }
}
