//! The plugins of the cloud's jobs: one live aggregator instance per running job, resolution of
//! `oci://` plugins to pinned digests, and hot swap at round boundaries (a re-applied job, or a
//! followed tag that moved), where a new plugin that fails to load, is of the wrong slot or
//! refuses its config leaves the old one running.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nereid_registry::Reference;

use crate::components::Components;
use crate::config::job::{JobSpec, PluginRef};
use crate::lock;
use crate::protocol::SwapRow;
use crate::runtime::config::config_value_to_toml;
use crate::runtime::config::ConfigTable;
use crate::runtime::{AggregatorPlugin, CompressorPlugin, LoadedComponent, ObjectivePlugin, Runtime, SamplerPlugin};
use crate::store::{now_ms, CloudStore};

/// A job's aggregator instance, the instances of the stages after it (`aggregator.then`), and
/// what to call the chain (pinned references or digests, joined by ` -> `).
#[derive(Clone)]
pub struct LiveAggregator {
    pub plugin: Arc<Mutex<AggregatorPlugin>>,
    pub then: Arc<Mutex<Vec<AggregatorPlugin>>>,
    pub label: String,
}

/// An aggregator chain's instances: the first stage and the ones after it.
pub type Chain = (AggregatorPlugin, Vec<AggregatorPlugin>);

/// A job's client-selection sampler and the plugin it was built from.
type Selector = (PluginRef, Arc<Mutex<SamplerPlugin>>);

pub struct JobPlugins {
    runtime: Runtime,
    components: Components,
    live: Mutex<HashMap<String, LiveAggregator>>,
    /// Each job's compressor instance (decoding is stateless: one instance serves every node).
    compressors: Mutex<HashMap<String, Arc<Mutex<CompressorPlugin>>>>,
    /// Each job's client-selection sampler, with the plugin it was built from (a swap rebuilds).
    selectors: Mutex<HashMap<String, Selector>>,
    /// Aggregator chains an apply validated, waiting for their job's next round boundary.
    pending: Mutex<HashMap<String, Chain>>,
    /// What each job's aggregator publishes to clients (FedProx's `mu`).
    published: Mutex<HashMap<String, ConfigTable>>,
    /// The round at whose boundary each job's followed tags were last checked.
    tags_checked: Mutex<HashMap<String, u32>>,
    /// Pinned references already refused, so a bad tag is reported once.
    refused: Mutex<HashSet<String>>,
    pub swaps: AtomicU64,
}

/// What to call a plugin in summaries: its pinned reference, else its digest.
pub fn label(p: &PluginRef) -> String {
    p.pinned.clone().unwrap_or_else(|| p.digest.clone())
}

/// What to call a job's aggregator chain: its stages' labels joined by ` -> `.
pub fn chain_label(spec: &JobSpec) -> String {
    spec.aggregator_chain().map(label).collect::<Vec<_>>().join(" -> ")
}

fn same_chain(a: &JobSpec, b: &JobSpec) -> bool {
    a.aggregator == b.aggregator && a.aggregator_then == b.aggregator_then
}

impl JobPlugins {
    pub fn new(runtime: Runtime, components: Components) -> JobPlugins {
        JobPlugins {
            runtime,
            components,
            live: Mutex::new(HashMap::new()),
            compressors: Mutex::new(HashMap::new()),
            selectors: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            tags_checked: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashSet::new()),
            swaps: AtomicU64::new(0),
        }
    }

    /// Loads plugin `p` of slot `slot` from the components the cloud stores.
    fn load(&self, store: &CloudStore, job: &str, slot: &str, p: &PluginRef) -> anyhow::Result<LoadedComponent> {
        let bytes =
            store.component(&p.digest)?.ok_or_else(|| anyhow::anyhow!("component {} is not stored", p.digest))?;
        Ok(self.runtime.load_bytes(&bytes, &format!("{job} {slot} {}", label(p)))?)
    }

    fn build_aggregator(&self, store: &CloudStore, job: &str, p: &PluginRef) -> anyhow::Result<AggregatorPlugin> {
        let loaded = self.load(store, job, "aggregator", p)?;
        Ok(AggregatorPlugin::new(&self.runtime, loaded, p.limits, &p.config)?)
    }

    fn build_chain(&self, store: &CloudStore, spec: &JobSpec) -> anyhow::Result<Chain> {
        let first = self.build_aggregator(store, &spec.name, &spec.aggregator).map_err(|e| e.context("aggregator"))?;
        let then = spec
            .aggregator_then
            .iter()
            .enumerate()
            .map(|(i, p)| {
                self.build_aggregator(store, &spec.name, p).map_err(|e| e.context(format!("aggregator.then[{i}]")))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok((first, then))
    }

    fn build_selector(&self, store: &CloudStore, job: &str, p: &PluginRef) -> anyhow::Result<SamplerPlugin> {
        let loaded = self.load(store, job, "client selection", p)?;
        Ok(SamplerPlugin::new(&self.runtime, loaded, p.limits, &p.config)?)
    }

    /// The job's client-selection sampler (None: the built-in uniform selection), built once
    /// and rebuilt when the job's spec names another plugin (a swap).
    pub fn selector(&self, store: &CloudStore, spec: &JobSpec) -> anyhow::Result<Option<Arc<Mutex<SamplerPlugin>>>> {
        let Some(p) = &spec.client_selection else {
            lock(&self.selectors).remove(&spec.name);
            return Ok(None);
        };
        if let Some((built_from, s)) = lock(&self.selectors).get(&spec.name) {
            if built_from == p {
                return Ok(Some(s.clone()));
            }
        }
        let plugin = Arc::new(Mutex::new(self.build_selector(store, &spec.name, p)?));
        lock(&self.selectors).insert(spec.name.clone(), (p.clone(), plugin.clone()));
        Ok(Some(plugin))
    }

    fn check_objective(&self, store: &CloudStore, job: &str, p: &PluginRef) -> anyhow::Result<()> {
        let loaded = self.load(store, job, "client objective", p)?;
        ObjectivePlugin::new(&self.runtime, loaded, p.limits, &p.config)?;
        Ok(())
    }

    /// Makes `plugin` the job's aggregator; the one it replaces is dropped once the round that
    /// holds it (if any) lets go of it.
    fn install(&self, job: &str, (mut plugin, then): Chain, label: String) -> anyhow::Result<LiveAggregator> {
        let published = plugin.client_config()?;
        {
            let mut p = lock(&self.published);
            p.insert(
                job.to_string(),
                published.iter().map(|e| (e.key.clone(), config_value_to_toml(&e.value))).collect(),
            );
        }
        let live = LiveAggregator { plugin: Arc::new(Mutex::new(plugin)), then: Arc::new(Mutex::new(then)), label };
        {
            let mut map = lock(&self.live);
            map.insert(job.to_string(), live.clone());
        }
        Ok(live)
    }

    /// The job's aggregator, instantiated once and kept (the compile cache makes a restart cheap).
    pub fn aggregator(&self, store: &CloudStore, spec: &JobSpec) -> anyhow::Result<LiveAggregator> {
        if let Some(a) = lock(&self.live).get(&spec.name).cloned() {
            return Ok(a);
        }
        let chain = self.build_chain(store, spec)?;
        self.install(&spec.name, chain, chain_label(spec))
    }

    /// The job's compressor (None for a job without one), instantiated once and kept.
    pub fn compressor(
        &self,
        store: &CloudStore,
        spec: &JobSpec,
    ) -> anyhow::Result<Option<Arc<Mutex<CompressorPlugin>>>> {
        let Some(p) = &spec.compressor else { return Ok(None) };
        if let Some(c) = lock(&self.compressors).get(&spec.name).cloned() {
            return Ok(Some(c));
        }
        let loaded = self.load(store, &spec.name, "compressor", p)?;
        let plugin = Arc::new(Mutex::new(CompressorPlugin::new(&self.runtime, loaded, p.limits, &p.config)?));
        {
            let mut m = lock(&self.compressors);
            m.insert(spec.name.clone(), plugin.clone());
        }
        Ok(Some(plugin))
    }

    pub fn published(&self, job: &str) -> ConfigTable {
        lock(&self.published).get(job).cloned().unwrap_or_default()
    }

    /// Drops the instances of a job that ended.
    pub fn forget(&self, job: &str) {
        {
            let mut m = lock(&self.live);
            m.remove(job);
        }
        {
            let mut m = lock(&self.pending);
            m.remove(job);
        }
        {
            let mut m = lock(&self.compressors);
            m.remove(job);
        }
        lock(&self.selectors).remove(job);
    }

    /// Pins each `oci://` plugin of `spec` to the manifest digest its reference names now, pulls
    /// it (verified) and keeps its bytes, so the job never depends on the tag again.
    pub async fn resolve(&self, store: &CloudStore, spec: &mut JobSpec) -> Result<(), String> {
        for (slot, p) in spec.plugins_mut() {
            let Some(source) = p.source.clone() else { continue };
            let reference = Reference::parse(&source).map_err(|e| format!("{slot}: {e}"))?;
            let fetched =
                self.components.fetch_reference(&reference, None).await.map_err(|e| format!("{slot}: {e}"))?;
            store.put_component(&fetched.digest, &fetched.bytes).map_err(|e| e.to_string())?;
            p.digest = fetched.digest;
            p.pinned = fetched.pinned;
        }
        Ok(())
    }

    /// Checks the plugins of `new` that differ from `current` (load, slot, config) and keeps a
    /// new aggregator ready for the round boundary. Errors leave everything as it was.
    pub fn prepare(&self, store: &CloudStore, current: &JobSpec, new: &JobSpec) -> anyhow::Result<()> {
        if let Some(p) = new.client_objective.as_ref().filter(|_| new.client_objective != current.client_objective) {
            self.check_objective(store, &new.name, p).map_err(|e| e.context("client_objective"))?;
        }
        if let Some(p) = new.client_selection.as_ref().filter(|_| new.client_selection != current.client_selection) {
            self.build_selector(store, &new.name, p).map_err(|e| e.context("client_selection"))?;
        }
        if !same_chain(new, current) {
            let chain = self.build_chain(store, new)?;
            {
                let mut pending = lock(&self.pending);
                pending.insert(new.name.clone(), chain);
            }
        }
        Ok(())
    }

    /// At the boundary before round `round`: switches to a pending spec (`pending`: the job's
    /// row, just read, has one), or to a followed tag's new digest. Returns true if the job's
    /// spec changed.
    pub async fn at_round_boundary(
        &self,
        store: &CloudStore,
        spec: &JobSpec,
        pending: bool,
        round: u32,
    ) -> anyhow::Result<bool> {
        let name = &spec.name;
        let promoted = if pending { store.promote_pending_spec(name)? } else { None };
        if let Some(json) = promoted {
            let new: JobSpec = serde_json::from_str(&json)?;
            let prepared = lock(&self.pending).remove(name);
            self.switch(store, spec, &new, round, prepared)?;
            return Ok(true);
        }
        let first_check = lock(&self.tags_checked).insert(name.clone(), round) != Some(round);
        if !first_check {
            return Ok(false);
        }
        let mut new = spec.clone();
        let mut moved = false;
        for (slot, p) in new.plugins_mut() {
            let Some(source) = p.source.clone().filter(|_| p.follow_tag) else { continue };
            let Ok(reference) = Reference::parse(&source) else { continue };
            let pinned_ref = match self.components.pin(&reference).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(job = %name, %source, "cannot check the followed tag: {e}");
                    continue;
                }
            };
            let pinned = pinned_ref.to_string();
            if Some(&pinned) == p.pinned.as_ref() || lock(&self.refused).contains(&pinned) {
                continue;
            }
            let refuse = |error: String| {
                tracing::warn!(job = %name, %slot, to = %pinned, "the moved tag's plugin is refused; the old one keeps running: {error}");
                {
                    let mut r = lock(&self.refused);
                    r.insert(pinned.clone());
                }
                let swap = SwapRow {
                    round,
                    slot: slot.clone(),
                    from: label(p),
                    to: pinned.clone(),
                    error: Some(error),
                    at_ms: now_ms(),
                };
                store.record_swap(name, &swap)
            };
            let fetched = match self.components.fetch_reference(&pinned_ref, None).await {
                Ok(f) => f,
                Err(e) => {
                    refuse(e.to_string())?;
                    continue;
                }
            };
            store.put_component(&fetched.digest, &fetched.bytes)?;
            let candidate = PluginRef { digest: fetched.digest, pinned: fetched.pinned, ..p.clone() };
            let checked = match slot.as_str() {
                s if s.starts_with("aggregator") => self.build_aggregator(store, name, &candidate).map(drop),
                "client_selection" => self.build_selector(store, name, &candidate).map(drop),
                _ => self.check_objective(store, name, &candidate),
            };
            if let Err(e) = checked {
                refuse(format!("{e:#}"))?;
                continue;
            }
            *p = candidate;
            moved = true;
        }
        if !moved {
            return Ok(false);
        }
        store.set_spec(name, &serde_json::to_string(&new)?)?;
        self.switch(store, spec, &new, round, None)?;
        Ok(true)
    }

    /// Records and performs the switch from `old` to `new` (whose plugins were checked).
    fn switch(
        &self,
        store: &CloudStore,
        old: &JobSpec,
        new: &JobSpec,
        round: u32,
        prepared: Option<Chain>,
    ) -> anyhow::Result<()> {
        let record = |slot: &str, from: String, to: String| {
            tracing::info!(job = %new.name, round, slot, %from, %to, "plugin swapped");
            self.swaps.fetch_add(1, Ordering::Relaxed);
            store.record_swap(&new.name, &SwapRow { round, slot: slot.into(), from, to, error: None, at_ms: now_ms() })
        };
        if !same_chain(new, old) {
            let chain = match prepared {
                Some(c) => c,
                None => self.build_chain(store, new)?,
            };
            self.install(&new.name, chain, chain_label(new))?;
            record("aggregator", chain_label(old), chain_label(new))?;
        }
        if new.client_selection != old.client_selection {
            let name = |p: &Option<PluginRef>| p.as_ref().map_or_else(|| "uniform".to_string(), label);
            // `selector` builds the new one when the next round opens.
            record("client_selection", name(&old.client_selection), name(&new.client_selection))?;
        }
        if new.client_objective != old.client_objective {
            let name = |p: &Option<PluginRef>| p.as_ref().map_or_else(|| "none".to_string(), label);
            // Edges switch when they take round `round`'s task, which carries the new plugin.
            record("client_objective", name(&old.client_objective), name(&new.client_objective))?;
        }
        Ok(())
    }
}
