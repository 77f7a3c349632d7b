//! Typed front-ends of the slots: what the cloud and edge hosts call.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::Resource;
use wasmtime::Store;

use super::bindings::{adapter, aggregator, client_objective, compressor, model, router, sampler, splitter, types};
use super::config::ConfigTable;
use super::round_updates::UpdateSource;
use super::sandbox::WithRunner;
use super::state::{PluginState, StrategyState, TensorSlot};
use super::{Limits, LoadedComponent, PluginError, Runtime, Sandbox, SlotGuest};
use crate::model_io::NamedTensors;
use crate::tensor::Tensor;

/// Where in a job a call happens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundContext {
    pub job: String,
    pub round: u32,
    pub seed: u64,
}

impl From<&RoundContext> for types::RoundContext {
    fn from(c: &RoundContext) -> Self {
        types::RoundContext { job: c.job.clone(), round: c.round, seed: c.seed }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateKind {
    Weights,
    Delta,
}

/// One client's contribution to a round.
#[derive(Debug, Clone)]
pub struct ClientUpdate {
    pub client: String,
    pub kind: UpdateKind,
    pub tensors: NamedTensors,
    pub num_examples: u64,
    pub metrics: Vec<(String, f64)>,
    /// The file the tensors were read from, where whole-round operations read them again; None
    /// keeps the tensors in memory for the round.
    pub file: Option<PathBuf>,
}

/// The end of a round: the next global model, the aggregator's metrics, and its strategy state
/// for the rounds after (to be committed with the model).
#[derive(Debug, Clone)]
pub struct AggregateResult {
    pub tensors: NamedTensors,
    pub metrics: Vec<(String, f64)>,
    pub state: NamedTensors,
}

/// The interface whole-round aggregators import (any version).
const ROUND_UPDATES: &str = "nereid:plugin/round-updates";

fn lend_all(store: &mut Store<PluginState>, tensors: &[(String, Tensor)]) -> wasmtime::Result<Vec<model::NamedTensor>> {
    tensors
        .iter()
        .map(|(name, t)| Ok(model::NamedTensor { name: name.clone(), value: store.data_mut().lend(t.clone())? }))
        .collect()
}

fn take_all(store: &mut Store<PluginState>, tensors: Vec<model::NamedTensor>) -> wasmtime::Result<NamedTensors> {
    tensors.into_iter().map(|t| Ok((t.name, store.data_mut().take(t.value)?))).collect()
}

/// What every slot's front-end shares: the struct around its sandbox, `Debug` (the plugin's
/// name), construction from a loaded component and loading from a file.
macro_rules! slot_front_end {
    ($(#[$doc:meta])* $name:ident, $guest:ty $(, $field:ident: $ty:ty)*) => {
        $(#[$doc])*
        pub struct $name {
            sandbox: Sandbox<$guest>,
            $($field: $ty,)*
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).field("plugin", &self.sandbox.name()).finish()
            }
        }

        impl $name {
            /// Instantiates `loaded` in this slot and configures it with `config`.
            pub fn new(
                runtime: &Runtime,
                loaded: LoadedComponent,
                limits: Limits,
                config: &ConfigTable,
            ) -> Result<Self, PluginError> {
                Ok($name { sandbox: Sandbox::new(runtime, loaded, limits, config)?, $($field: Default::default(),)* })
            }

            pub fn load(runtime: &Runtime, path: &Path, limits: Limits, config: &ConfigTable) -> Result<Self, PluginError> {
                Self::new(runtime, runtime.load_file(path)?, limits, config)
            }

            pub fn sandbox(&self) -> &Sandbox<$guest> {
                &self.sandbox
            }
        }
    };
}

slot_front_end!(
    /// A plugin in the aggregator slot, with its strategy state as the last finished round left it.
    AggregatorPlugin,
    aggregator::Guest,
    state: Arc<BTreeMap<String, Tensor>>
);

impl AggregatorPlugin {
    /// Starts a round from the strategy state the last finished round left (or `set_state` gave).
    /// Beginning again (a replay) drops what the round did so far.
    pub fn begin_round(&mut self, ctx: &RoundContext, global: Option<&[(String, Tensor)]>) -> Result<(), PluginError> {
        let ctx = types::RoundContext::from(ctx);
        let committed = self.state.clone();
        let r = self.sandbox.call("begin-round", |g, store| {
            let data = store.data_mut();
            data.strategy = StrategyState { committed, staged: BTreeMap::new() };
            data.round.clear();
            let global = global.map(|m| lend_all(store, m)).transpose()?;
            g.call_begin_round(store, &ctx, global.as_deref())
        })?;
        self.sandbox.check_plugin_result("begin-round", "the global model", r)
    }

    /// The strategy state the next round begins from (restored from a committed round).
    pub fn set_state(&mut self, state: NamedTensors) {
        self.state = Arc::new(state.into_iter().collect());
    }

    /// The strategy state as the last finished round left it, ordered by key.
    pub fn state(&self) -> NamedTensors {
        self.state.iter().map(|(k, t)| (k.clone(), t.clone())).collect()
    }

    /// Folds one update in. `Err(Rejected)` names the update; the plugin's state is as before.
    pub fn accumulate(&mut self, update: &ClientUpdate) -> Result<(), PluginError> {
        let kind = match update.kind {
            UpdateKind::Weights => model::UpdateKind::Weights,
            UpdateKind::Delta => model::UpdateKind::Delta,
        };
        // Only an aggregator that imports `round-updates` reads the round's updates again; for
        // the others, in-memory updates are not kept alive for the round.
        let keeps_round = self.sandbox.component().imports.iter().any(|i| i.starts_with(ROUND_UPDATES));
        let r = self.sandbox.call("accumulate", |g, store| {
            let wire = model::ClientUpdate {
                client: update.client.clone(),
                kind,
                tensors: lend_all(store, &update.tensors)?,
                num_examples: update.num_examples,
                metrics: update
                    .metrics
                    .iter()
                    .map(|(name, value)| types::Metric { name: name.clone(), value: *value })
                    .collect(),
            };
            let r = g.call_accumulate(&mut *store, &wire)?;
            if r.is_ok() && keeps_round {
                // Whole-round aggregators read it again through `round-updates`.
                let source = match &update.file {
                    Some(path) => UpdateSource::File(path.clone()),
                    None => UpdateSource::Memory(update.tensors.clone()),
                };
                store.data_mut().round.push(update.client.clone(), source);
            }
            Ok(r)
        })?;
        self.sandbox.check_plugin_result("accumulate", &format!("update `{}`", update.client), r)
    }

    pub fn finish(&mut self) -> Result<AggregateResult, PluginError> {
        let r = self.sandbox.call("finish", |g, store| {
            Ok(match g.call_finish(&mut *store)? {
                Ok(agg) => {
                    let state = store.data().strategy.merged();
                    store.data_mut().round.clear();
                    Ok(AggregateResult {
                        tensors: take_all(store, agg.tensors)?,
                        metrics: agg.metrics.into_iter().map(|m| (m.name, m.value)).collect(),
                        state: state.into_iter().collect(),
                    })
                }
                Err(e) => Err(e),
            })
        })?;
        let result = self.sandbox.check_plugin_result("finish", "the round", r)?;
        self.state = Arc::new(result.state.iter().cloned().collect());
        Ok(result)
    }

    /// What the aggregator publishes to clients with the global model.
    pub fn client_config(&mut self) -> Result<Vec<types::ConfigEntry>, PluginError> {
        self.sandbox.call("client-config", |g, store| g.call_client_config(store))
    }
}

slot_front_end!(
    /// A plugin in the client-objective slot.
    ObjectivePlugin,
    client_objective::Guest
);

impl ObjectivePlugin {
    /// Local training of a round starts from `global`, with what the aggregator published.
    pub fn begin_round(
        &mut self,
        ctx: &RoundContext,
        global: &[(String, Tensor)],
        server_config: &[types::ConfigEntry],
    ) -> Result<(), PluginError> {
        let ctx = types::RoundContext::from(ctx);
        let server_config = server_config.to_vec();
        let r = self.sandbox.call("begin-round", |g, store| {
            let global = lend_all(store, global)?;
            g.call_begin_round(store, &ctx, &global, &server_config)
        })?;
        self.sandbox.check_plugin_result("begin-round", "the global model", r)
    }

    /// The extra loss of parameter `name` at `weight`.
    pub fn penalty(&mut self, name: &str, weight: &Tensor) -> Result<f64, PluginError> {
        let r = self.sandbox.call("penalty", |g, store| {
            let w: Resource<TensorSlot> = store.data_mut().lend(weight.clone())?;
            let r = g.call_penalty(&mut *store, name, Resource::new_borrow(w.rep()));
            store.data_mut().take(w)?;
            r
        })?;
        self.sandbox.check_plugin_result("penalty", &format!("parameter `{name}`"), r)
    }

    /// Adds the extra term's gradient for parameter `name` to `gradient`.
    pub fn adjust_gradient(&mut self, name: &str, weight: &Tensor, gradient: &mut Tensor) -> Result<(), PluginError> {
        let (r, adjusted) = self.sandbox.call("adjust-gradient", |g, store| {
            let w = store.data_mut().lend(weight.clone())?;
            let grad = store.data_mut().lend(gradient.clone())?;
            let r = g.call_adjust_gradient(
                &mut *store,
                name,
                Resource::new_borrow(w.rep()),
                Resource::new_borrow(grad.rep()),
            );
            store.data_mut().take(w)?;
            let adjusted = store.data_mut().take(grad)?;
            Ok((r?, adjusted))
        })?;
        self.sandbox.check_plugin_result("adjust-gradient", &format!("parameter `{name}`"), r)?;
        *gradient = adjusted;
        Ok(())
    }
}

/// Where an inference is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Edge,
    Cloud,
}

/// A router's decision and the policy's score (e.g. a confidence).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Decision {
    pub route: Route,
    pub score: f64,
}

/// A tensor passed by value to and from models.
pub type TensorData = types::TensorData;

impl<G: SlotGuest> Sandbox<WithRunner<G>> {
    /// Runs `model` (registered with the runtime's models) through the plugin and wasi-nn.
    pub fn run_model(&mut self, model: &str, inputs: &[TensorData]) -> Result<Vec<TensorData>, PluginError> {
        let r = self.call("run", |g, store| g.runner.call_run(store, model, inputs))?;
        self.check_plugin_result("run", &format!("model `{model}`"), r)
    }
}

slot_front_end!(
    /// A plugin in the router slot (joint inference: edge answer or hard example for the cloud).
    RouterPlugin,
    WithRunner<router::Guest>
);

impl RouterPlugin {
    /// Decides from the edge model's output.
    pub fn decide(&mut self, output: &Tensor) -> Result<Decision, PluginError> {
        let r = self.sandbox.call("decide", |g, store| {
            let t: Resource<TensorSlot> = store.data_mut().lend(output.clone())?;
            let r = g.slot.call_decide(&mut *store, Resource::new_borrow(t.rep()));
            store.data_mut().take(t)?;
            r
        })?;
        let d = self.sandbox.check_plugin_result("decide", "the edge model's output", r)?;
        let route = match d.route {
            router::Route::Edge => Route::Edge,
            router::Route::Cloud => Route::Cloud,
        };
        Ok(Decision { route, score: d.score })
    }

    /// Runs the edge model on `inputs` through the plugin and wasi-nn.
    pub fn run(&mut self, model: &str, inputs: &[TensorData]) -> Result<Vec<TensorData>, PluginError> {
        self.sandbox.run_model(model, inputs)
    }
}

/// The head and tail ONNX models of a cut (`None` for an empty half).
pub type Halves = (Option<Vec<u8>>, Option<Vec<u8>>);

/// One candidate cut and its predicted latency.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CutPoint {
    pub tensors: Vec<String>,
    pub predicted_ms: f64,
}

slot_front_end!(
    /// A plugin in the splitter slot (split inference: where to cut a model).
    SplitterPlugin,
    WithRunner<splitter::Guest>
);

impl SplitterPlugin {
    /// The valid cuts with predicted latencies, best first.
    pub fn plan(
        &mut self,
        model: &[u8],
        profile: &nereid_onnx::Profile,
        bandwidth_mbit_s: f64,
        rtt_ms: f64,
    ) -> Result<Vec<CutPoint>, PluginError> {
        let profile = serde_json::to_string(profile).map_err(|e| PluginError::Internal {
            plugin: self.sandbox.name().to_string(),
            call: "plan",
            message: format!("encoding the profile: {e}"),
        })?;
        let link = splitter::Link { bandwidth_mbit_s, rtt_ms };
        let r = self.sandbox.call("plan", |g, store| g.slot.call_plan(store, model, &profile, link))?;
        let cuts = self.sandbox.check_plugin_result("plan", "the model", r)?;
        Ok(cuts.into_iter().map(|c| CutPoint { tensors: c.tensors, predicted_ms: c.predicted_ms }).collect())
    }

    /// The head and tail ONNX models of `cut` (`None` for an empty half).
    pub fn partition(&mut self, model: &[u8], cut: &[String]) -> Result<Halves, PluginError> {
        let r = self.sandbox.call("partition", |g, store| g.slot.call_partition(store, model, cut))?;
        let (head, tail) = self.sandbox.check_plugin_result("partition", "the cut", r)?;
        Ok(((!head.is_empty()).then_some(head), (!tail.is_empty()).then_some(tail)))
    }

    /// Runs `model` (e.g. a registered head) through the plugin and wasi-nn.
    pub fn run(&mut self, model: &str, inputs: &[TensorData]) -> Result<Vec<TensorData>, PluginError> {
        self.sandbox.run_model(model, inputs)
    }
}

/// What an adapter is told of one model input: its name, element type and shape (None for a
/// dimension the model leaves open).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub dtype: types::Dtype,
    pub shape: Vec<Option<u64>>,
}

slot_front_end!(
    /// A plugin in the adapter slot (raw payloads to a model's input tensors).
    AdapterPlugin,
    adapter::Guest
);

impl AdapterPlugin {
    /// The model's input tensors from a raw payload.
    pub fn decode(
        &mut self,
        content_type: &str,
        payload: &[u8],
        inputs: &[InputSpec],
    ) -> Result<Vec<TensorData>, PluginError> {
        let specs: Vec<adapter::InputSpec> = inputs
            .iter()
            .map(|i| adapter::InputSpec {
                name: i.name.clone(),
                dtype: i.dtype,
                shape: i.shape.iter().map(|d| d.map_or(-1, |d| d as i64)).collect(),
            })
            .collect();
        let r = self.sandbox.call("decode", |g, store| g.call_decode(store, content_type, payload, &specs))?;
        self.sandbox.check_plugin_result("decode", &format!("the {content_type} payload"), r)
    }
}

/// A sample as a sampler sees it: its id in the node's store and its label.
pub type SampleRef = sampler::SampleRef;

/// What a sampler does with an offered sample: keep it (evicting the held sample with the given
/// id, if any) or discard it.
pub type Admission = sampler::Admission;

slot_front_end!(
    /// A plugin in the sampler slot (which samples a replay buffer keeps, and which it draws).
    SamplerPlugin,
    sampler::Guest
);

impl SamplerPlugin {
    /// Rebuilds the policy's state after a restart: what the buffer holds, how many were offered.
    pub fn restore(&mut self, held: &[SampleRef], offered: u64) -> Result<(), PluginError> {
        let r = self.sandbox.call("restore", |g, store| g.call_restore(store, held, offered))?;
        self.sandbox.check_plugin_result("restore", "the buffer", r)
    }

    /// Whether the buffer keeps `sample`, and what it evicts for it.
    pub fn offer(&mut self, sample: SampleRef) -> Result<Admission, PluginError> {
        let r = self.sandbox.call("offer", |g, store| g.call_offer(store, sample))?;
        self.sandbox.check_plugin_result("offer", &format!("sample {}", sample.id), r)
    }

    /// Ids of buffered samples for a training batch of `count`.
    pub fn draw(&mut self, ctx: &RoundContext, count: u32) -> Result<Vec<u64>, PluginError> {
        let ctx = types::RoundContext::from(ctx);
        let r = self.sandbox.call("draw", |g, store| g.call_draw(store, &ctx, count))?;
        self.sandbox.check_plugin_result("draw", "the buffer", r)
    }
}

slot_front_end!(
    /// A plugin in the compressor slot (update encoding before upload and decoding after, model
    /// rewriting: quantization, pruning).
    CompressorPlugin,
    compressor::Guest
);

impl CompressorPlugin {
    /// What travels instead of `tensors` (e.g. INT8 values and their scales).
    pub fn encode(&mut self, ctx: &RoundContext, tensors: &[(String, Tensor)]) -> Result<NamedTensors, PluginError> {
        let ctx = types::RoundContext::from(ctx);
        let r = self.sandbox.call("encode", |g, store| {
            let lent = lend_all(store, tensors)?;
            Ok(match g.call_encode(&mut *store, &ctx, &lent)? {
                Ok(out) => Ok(take_all(store, out)?),
                Err(e) => Err(e),
            })
        })?;
        self.sandbox.check_plugin_result("encode", "the update", r)
    }

    /// The tensors `payload` encodes; `origin` names the payload in errors (e.g. the node).
    pub fn decode(
        &mut self,
        ctx: &RoundContext,
        payload: &[(String, Tensor)],
        origin: &str,
    ) -> Result<NamedTensors, PluginError> {
        let ctx = types::RoundContext::from(ctx);
        let r = self.sandbox.call("decode", |g, store| {
            let lent = lend_all(store, payload)?;
            Ok(match g.call_decode(&mut *store, &ctx, &lent)? {
                Ok(out) => Ok(take_all(store, out)?),
                Err(e) => Err(e),
            })
        })?;
        self.sandbox.check_plugin_result("decode", origin, r)
    }

    /// The rewritten ONNX model; `calibration` holds sample inputs (one list of named input
    /// tensors per sample) for passes that measure activation ranges.
    pub fn rewrite_model(&mut self, model: &[u8], calibration: &[NamedTensors]) -> Result<Vec<u8>, PluginError> {
        let r = self.sandbox.call("rewrite-model", |g, store| {
            let lent = calibration.iter().map(|s| lend_all(store, s)).collect::<wasmtime::Result<Vec<_>>>()?;
            g.call_rewrite_model(&mut *store, model, &lent)
        })?;
        self.sandbox.check_plugin_result("rewrite-model", "the model", r)
    }
}
