//! The edge's replay buffer: sample bytes in the edge's SQLite store, the keep/evict/draw policy
//! in a sampler plugin that sees ids and labels only. Samples arrive in batches (`POST
//! /v1/samples`); each batch's decisions are written in one transaction, and a batch the plugin
//! fails on changes nothing (the plugin is restored from the store before the next one).
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::error::{BadRequest, KeyReused};
use crate::components::Components;
use crate::config::ServicePlugin;
use crate::inference::wire;
use crate::runtime::bindings::types::Dtype;
use crate::runtime::{Admission, RoundContext, Runtime, SampleRef, SamplerPlugin, TensorData};
use crate::store::{EdgeStore, OfferBatch, ReplayOffer, ReplayState};
use crate::train::Dataset;

pub struct ReplayBuffer {
    store: Arc<EdgeStore>,
    sampler: Mutex<SamplerPlugin>,
    /// With an incremental-learning job: what its model can train on; every sample offered is
    /// also kept as a new sample until a round has trained on it.
    trains: Option<Trainable>,
}

/// The samples an incremental-learning job's model takes: their layout (`f32[64]`) and labels.
#[derive(Debug, Clone)]
pub struct Trainable {
    pub layout: String,
    pub classes: i64,
}

/// Largest batch of samples taken at once (a request body, an inbox file).
pub const MAX_BATCH_BYTES: u64 = 64 << 20;

/// The `x` and `y` tensors of a batch of samples (safetensors, as `POST /v1/samples` takes it).
pub fn parse_batch(body: &[u8]) -> Result<(TensorData, TensorData), BadRequest> {
    let tensors = wire::from_safetensors(body).map_err(|e| BadRequest(e.to_string()))?;
    let find = |name: &str| tensors.iter().find(|t| t.name == name).cloned();
    match (find("x"), find("y")) {
        (Some(x), Some(y)) => Ok((x, y)),
        _ => Err(BadRequest("the batch needs tensors `x` (samples) and `y` (labels)".into())),
    }
}

/// A dataset as a batch of samples: `x` f32 [n, features], `y` i64 [n].
pub fn batch_of(data: &Dataset) -> (TensorData, TensorData) {
    let x = wire::f32_tensor("x", vec![data.len() as u64, data.features as u64], &data.x);
    let y = TensorData {
        name: "y".into(),
        dtype: Dtype::I64,
        shape: vec![data.len() as u64],
        data: data.y.iter().flat_map(|&l| (l as i64).to_le_bytes()).collect(),
    };
    (x, y)
}

/// Stored `f32` samples `(id, label, bytes)` as a dataset of `features` per example.
pub fn to_dataset(samples: &[(u64, i64, Vec<u8>)], features: usize) -> anyhow::Result<Dataset> {
    let mut data = Dataset { x: Vec::with_capacity(samples.len() * features), y: Vec::new(), features };
    for (id, label, bytes) in samples {
        if bytes.len() != features * 4 {
            anyhow::bail!("sample {id} has {} bytes, the model takes {features} f32 values", bytes.len());
        }
        data.x.extend(wire::le_f32s(bytes));
        data.y.push(u32::try_from(*label).with_context(|| format!("sample {id}: label {label}"))?);
    }
    Ok(data)
}

/// What a batch of offers did, and the buffer after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OfferReport {
    pub kept: u64,
    pub discarded: u64,
    pub evicted: u64,
    pub held: u64,
    pub offered: u64,
    /// Answered from the record of the batch first sent under the same idempotency key: nothing
    /// was offered again (the HTTP answer says so in `Idempotent-Replayed: true`).
    #[serde(skip)]
    pub replayed: bool,
}

/// Where a batch comes from, so that one sent again is taken in once.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// Nothing identifies it (a request without an idempotency key, a benchmark).
    Unnamed,
    /// An inbox file or an MQTT message: the same content again is a redelivery.
    Content { digest: &'a str, name: &'a str },
    /// A request with an `Idempotency-Key` (checked: [`check_idempotency_key`]) and its body's digest.
    Keyed { key: &'a str, body_digest: &'a str },
}

/// The longest idempotency key a sample request may carry.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// An `Idempotency-Key` is 1 to [`MAX_IDEMPOTENCY_KEY`] visible ASCII characters (a UUID, say).
pub fn check_idempotency_key(key: &[u8]) -> Result<&str, BadRequest> {
    let visible = key.iter().all(|b| b.is_ascii_graphic());
    match std::str::from_utf8(key) {
        Ok(k) if visible && (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len()) => Ok(k),
        _ => Err(BadRequest(format!(
            "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))),
    }
}

/// The buffer's contents: how many samples it holds (per label), how many were offered.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayStats {
    pub held: u64,
    pub offered: u64,
    pub per_label: BTreeMap<i64, u64>,
    /// SHA-256 of the held ids in order (decimal, comma-separated): equal digests, equal contents.
    pub held_digest: String,
    /// Element type and per-sample shape, e.g. `u8[224,224,3]` (fixed by the first sample kept).
    pub layout: Option<String>,
}

fn restore(sampler: &mut SamplerPlugin, state: &ReplayState) -> anyhow::Result<()> {
    let held: Vec<SampleRef> = state.held.iter().map(|&(id, label)| SampleRef { id, label }).collect();
    sampler.restore(&held, state.offered).context("restoring the sampler from the store")
}

/// `x`'s per-sample layout as text, e.g. `u8[224,224,3]`.
fn layout(x: &TensorData) -> String {
    let dims: Vec<String> = x.shape.iter().skip(1).map(u64::to_string).collect();
    format!("{}[{}]", wire::dtype_name(x.dtype), dims.join(","))
}

impl ReplayBuffer {
    /// Loads the sampler (edge.toml's `[replay]`) and gives it what the store holds.
    pub async fn load(
        cfg: &ServicePlugin,
        base: &Path,
        runtime: &Runtime,
        components: &Components,
        store: Arc<EdgeStore>,
    ) -> anyhow::Result<ReplayBuffer> {
        let p = components.load_plugin(cfg, base, runtime).await.context("replay.plugin")?;
        let sampler = SamplerPlugin::new(runtime, p.loaded, p.limits, &cfg.config).context("replay")?;
        Self::new(sampler, store)
    }

    /// A buffer over `store` with `sampler` as its policy, restored to what the store holds.
    pub fn new(mut sampler: SamplerPlugin, store: Arc<EdgeStore>) -> anyhow::Result<ReplayBuffer> {
        let state = store.replay_state()?;
        restore(&mut sampler, &state)?;
        tracing::info!(held = state.held.len(), offered = state.offered, "replay buffer restored");
        Ok(ReplayBuffer { store, sampler: Mutex::new(sampler), trains: None })
    }

    /// From now on every offered sample must fit `trains` and is kept for the incremental job;
    /// refused if the buffer holds samples of another layout.
    pub fn feed_training(&mut self, trains: Trainable) -> anyhow::Result<()> {
        let (held, _, layout) = self.store.replay_summary()?;
        if let Some(layout) = layout.filter(|l| held > 0 && *l != trains.layout) {
            anyhow::bail!("the replay buffer holds {layout} samples; the job's model takes {}", trains.layout);
        }
        self.trains = Some(trains);
        Ok(())
    }

    /// Offers a batch: `x` [n, ...] (any element type) with labels `y` [n] (integers). The
    /// samples get ids in arrival order; the sampler decides each. A batch under an idempotency
    /// key taken in before is answered with what it did then, offered nothing again.
    pub fn offer(&self, x: &TensorData, y: &TensorData, origin: Origin) -> anyhow::Result<OfferReport> {
        let n = *x.shape.first().ok_or_else(|| BadRequest("`x` must be [samples, ...]".into()))? as usize;
        let labels: Vec<i64> = match (y.dtype, y.shape.as_slice()) {
            (Dtype::I64, [m]) if *m as usize == n => {
                y.data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect()
            }
            (Dtype::I32, [m]) if *m as usize == n => {
                y.data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as i64).collect()
            }
            _ => {
                return Err(BadRequest(format!("`y` must be [{n}] integers (i64 or i32), one label per sample")).into())
            }
        };
        wire::check(x).map_err(|e| BadRequest(e.to_string()))?;
        let layout = layout(x);
        if let Some(t) = &self.trains {
            if layout != t.layout {
                return Err(BadRequest(format!(
                    "samples are {layout}; the incremental job's model takes {}",
                    t.layout
                ))
                .into());
            }
            if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| !(0..t.classes).contains(*l)) {
                return Err(BadRequest(format!("sample {i}: label {l} is outside 0..{}", t.classes)).into());
            }
        }
        let per_sample = x.data.len().checked_div(n).unwrap_or(0);
        // Batches are taken in one at a time under this lock: a retry of a keyed batch finds
        // the first one's record, even when both arrive at once.
        let mut sampler = crate::lock(&self.sampler);
        if let Origin::Keyed { key, body_digest } = origin {
            if let Some((digest, report)) = self.store.sample_request(key)? {
                if digest != body_digest {
                    return Err(KeyReused(key.to_string()).into());
                }
                let report: OfferReport = serde_json::from_str(&report).context("the recorded answer of a batch")?;
                return Ok(OfferReport { replayed: true, ..report });
            }
        }
        let (held_before, offered_before, held_layout) = self.store.replay_summary()?;
        if let Some(held) = held_layout.as_deref().filter(|l| *l != layout && held_before > 0) {
            return Err(BadRequest(format!("the buffer holds {held} samples; these are {layout}")).into());
        }
        let mut offers = Vec::with_capacity(n);
        let (mut kept, mut evicted) = (0, 0);
        for (i, &label) in labels.iter().enumerate() {
            let id = offered_before + 1 + i as u64;
            let decision = match sampler.offer(SampleRef { id, label }) {
                Ok(d) => d,
                Err(e) => {
                    // The plugin may have taken part of the batch in: back to what the store says.
                    restore(&mut sampler, &self.store.replay_state()?)?;
                    return Err(
                        anyhow::Error::from(e).context(format!("sample {i} of the batch; nothing of it was kept"))
                    );
                }
            };
            let keep = match decision {
                Admission::Keep(evict) => {
                    kept += 1;
                    evicted += u64::from(evict.is_some());
                    Some(evict)
                }
                Admission::Discard => None,
            };
            offers.push(ReplayOffer { id, label, bytes: &x.data[i * per_sample..(i + 1) * per_sample], keep });
        }
        let offered = offered_before + n as u64;
        let held = (held_before + kept).saturating_sub(evicted);
        let report = OfferReport { kept, discarded: n as u64 - kept, evicted, held, offered, replayed: false };
        let recorded = serde_json::to_string(&report).context("a batch's answer")?;
        let batch = OfferBatch {
            keep_new: self.trains.is_some(),
            source: match origin {
                Origin::Content { digest, name } => Some((digest, name)),
                _ => None,
            },
            request: match origin {
                Origin::Keyed { key, body_digest } => Some((key, body_digest, recorded.as_str())),
                _ => None,
            },
        };
        if let Err(e) = self.store.record_offers(&offers, offered, &layout, &batch) {
            restore(&mut sampler, &self.store.replay_state()?)?;
            return Err(e.into());
        }
        Ok(report)
    }

    pub fn stats(&self) -> anyhow::Result<ReplayStats> {
        let state = self.store.replay_state()?;
        let mut per_label = BTreeMap::new();
        for (_, label) in &state.held {
            *per_label.entry(*label).or_insert(0) += 1;
        }
        let ids: Vec<String> = state.held.iter().map(|(id, _)| id.to_string()).collect();
        let held_digest = crate::runtime::content_digest(ids.join(",").as_bytes());
        Ok(ReplayStats {
            held: state.held.len() as u64,
            offered: state.offered,
            per_label,
            held_digest,
            layout: state.layout,
        })
    }

    /// `count` held samples the sampler draws for a training batch: (id, label, bytes).
    pub fn draw(&self, ctx: &RoundContext, count: u32) -> anyhow::Result<Vec<(u64, i64, Vec<u8>)>> {
        let ids = crate::lock(&self.sampler).draw(ctx, count)?;
        Ok(self.store.replay_samples(&ids)?)
    }
}
