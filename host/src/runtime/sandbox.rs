//! One plugin in its sandbox: instantiation, configuration, calls under a time and memory limit,
//! and a fresh instance after a call that trapped, timed out or ran out of memory.
use std::sync::Arc;

use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, Trap};

use super::bindings::{
    adapter, aggregator, client_objective, compressor, plugin, router, runner, sampler, splitter, types,
};
use super::config::{self, ConfigTable};
use super::state::{MemoryLimitHit, PluginState};
use super::{deadline_ticks, describe_worlds, Limits, LoadedComponent, PluginError, Runtime, Slot};

/// What a plugin says of itself (`describe`).
pub type PluginInfo = types::PluginInfo;

/// The exports of one slot's interface, loaded from an instance.
pub trait SlotGuest: Sized + 'static {
    const SLOT: Slot;
    type Indices: Send + Sync;
    fn indices(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self::Indices>;
    fn load(indices: &Self::Indices, store: &mut Store<PluginState>, instance: &Instance) -> wasmtime::Result<Self>;
}

/// Every slot's generated guest is loaded the same way; only the interface and the slot differ.
macro_rules! slot_guest {
    ($($interface:ident => $slot:ident),+ $(,)?) => {$(
        impl SlotGuest for $interface::Guest {
            const SLOT: Slot = Slot::$slot;
            type Indices = $interface::GuestIndices;
            fn indices(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self::Indices> {
                $interface::GuestIndices::new(pre)
            }
            fn load(
                indices: &Self::Indices,
                store: &mut Store<PluginState>,
                instance: &Instance,
            ) -> wasmtime::Result<Self> {
                indices.load(store, instance)
            }
        }
    )+};
}

slot_guest!(
    aggregator => Aggregator,
    client_objective => ClientObjective,
    router => Router,
    splitter => Splitter,
    adapter => Adapter,
    sampler => Sampler,
    compressor => Compressor,
);

/// A slot's interface together with `runner`, which the inference slots (router, splitter) also
/// export.
pub struct WithRunner<G> {
    pub slot: G,
    pub runner: runner::Guest,
}

impl<G: SlotGuest> SlotGuest for WithRunner<G> {
    const SLOT: Slot = G::SLOT;
    type Indices = (G::Indices, runner::GuestIndices);
    fn indices(pre: &InstancePre<PluginState>) -> wasmtime::Result<Self::Indices> {
        Ok((G::indices(pre)?, runner::GuestIndices::new(pre)?))
    }
    fn load(indices: &Self::Indices, store: &mut Store<PluginState>, instance: &Instance) -> wasmtime::Result<Self> {
        Ok(WithRunner { slot: G::load(&indices.0, store, instance)?, runner: indices.1.load(store, instance)? })
    }
}

/// Instantiates `loaded` in whatever slot it implements and asks it to `describe` itself.
pub fn describe(runtime: &Runtime, loaded: &LoadedComponent, limits: &Limits) -> Result<PluginInfo, PluginError> {
    let fail =
        |call: &'static str, e: wasmtime::Error, state: &PluginState| classify(&loaded.origin, limits, call, e, state);
    let instantiate =
        |e: wasmtime::Error| PluginError::Instantiate { origin: loaded.origin.clone(), message: format!("{e:#}") };
    let indices = plugin::GuestIndices::new(&loaded.pre).map_err(instantiate)?;
    let mut store = runtime.store(Arc::from(loaded.origin.as_str()), limits);
    store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
    let instance = loaded.pre.instantiate(&mut store).map_err(|e| fail("instantiate", e, store.data()))?;
    let meta = indices.load(&mut store, &instance).map_err(instantiate)?;
    meta.call_describe(&mut store).map_err(|e| fail("describe", e, store.data()))
}

struct Live<G> {
    store: Store<PluginState>,
    meta: plugin::Guest,
    guest: G,
}

/// A plugin loaded into one slot.
pub struct Sandbox<G: SlotGuest> {
    runtime: Runtime,
    loaded: LoadedComponent,
    limits: Limits,
    meta_indices: plugin::GuestIndices,
    slot_indices: G::Indices,
    name: Arc<str>,
    info: Option<PluginInfo>,
    config: Option<Vec<types::ConfigEntry>>,
    live: Option<Live<G>>,
    instantiations: u64,
}

fn classify(
    plugin: &str,
    limits: &Limits,
    call: &'static str,
    error: wasmtime::Error,
    state: &PluginState,
) -> PluginError {
    let plugin = plugin.to_string();
    if state.memory.hit || error.downcast_ref::<MemoryLimitHit>().is_some() {
        return PluginError::OutOfMemory { plugin, call, limit: limits.memory_bytes };
    }
    if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return PluginError::Timeout { plugin, call, limit: limits.call_timeout };
    }
    let stderr = state.stderr.take();
    let mut message = format!("{error:#}");
    if !stderr.is_empty() {
        message = format!("{message}; the plugin's stderr: {stderr}");
    }
    PluginError::Trap { plugin, call, message }
}

impl<G: SlotGuest> Sandbox<G> {
    /// Instantiates `loaded` into slot `G::SLOT`, asks it to describe itself, checks `table`
    /// against its schema and configures it. Refuses a component of another world.
    pub fn new(
        runtime: &Runtime,
        loaded: LoadedComponent,
        limits: Limits,
        table: &ConfigTable,
    ) -> Result<Self, PluginError> {
        if !loaded.slots.contains(&G::SLOT) {
            return Err(PluginError::WrongSlot {
                origin: loaded.origin.clone(),
                expected: G::SLOT.world(),
                actual: describe_worlds(&loaded.slots),
            });
        }
        let instantiate =
            |e: wasmtime::Error| PluginError::Instantiate { origin: loaded.origin.clone(), message: format!("{e:#}") };
        let meta_indices = plugin::GuestIndices::new(&loaded.pre).map_err(instantiate)?;
        let slot_indices = G::indices(&loaded.pre).map_err(instantiate)?;
        let mut sandbox = Sandbox {
            runtime: runtime.clone(),
            name: Arc::from(loaded.origin.as_str()),
            loaded,
            limits,
            meta_indices,
            slot_indices,
            info: None,
            config: None,
            live: None,
            instantiations: 0,
        };
        let info = sandbox.call_meta("describe", |meta, store| meta.call_describe(store))?;
        sandbox.name = Arc::from(info.name.as_str());
        if let Some(live) = sandbox.live.as_mut() {
            live.store.data_mut().plugin = sandbox.name.clone();
        }
        let entries = config::check(&info.config_schema, table).map_err(|p| PluginError::InvalidConfig {
            plugin: info.name.clone(),
            key: p.key,
            message: p.message,
        })?;
        sandbox.info = Some(info);
        let result = sandbox.call_meta("configure", |meta, store| meta.call_configure(store, &entries))?;
        sandbox.check_plugin_result("configure", "its configuration", result)?;
        sandbox.config = Some(entries);
        Ok(sandbox)
    }

    /// The plugin's name from `describe` (its file before that).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn info(&self) -> Option<&PluginInfo> {
        self.info.as_ref()
    }

    pub fn component(&self) -> &LoadedComponent {
        &self.loaded
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many instances were created so far (1 plus one per lost instance that was called again).
    pub fn instantiations(&self) -> u64 {
        self.instantiations
    }

    fn ensure_live(&mut self) -> Result<&mut Live<G>, PluginError> {
        if self.live.is_none() {
            let mut store = self.runtime.store(self.name.clone(), &self.limits);
            store.set_epoch_deadline(deadline_ticks(self.limits.call_timeout));
            let fail = |e: wasmtime::Error, store: &Store<PluginState>| {
                classify(&self.name, &self.limits, "instantiate", e, store.data())
            };
            let instance = self.loaded.pre.instantiate(&mut store).map_err(|e| fail(e, &store))?;
            let meta = self.meta_indices.load(&mut store, &instance).map_err(|e| fail(e, &store))?;
            let guest = G::load(&self.slot_indices, &mut store, &instance).map_err(|e| fail(e, &store))?;
            let mut live = Live { store, meta, guest };
            self.instantiations += 1;
            if let Some(entries) = &self.config {
                // A replacement instance gets the configuration the first one accepted.
                live.store.set_epoch_deadline(deadline_ticks(self.limits.call_timeout));
                match live.meta.call_configure(&mut live.store, entries) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(self.plugin_error("configure", "its configuration", e)),
                    Err(e) => return Err(classify(&self.name, &self.limits, "configure", e, live.store.data())),
                }
            }
            self.live = Some(live);
        }
        Ok(self.live.as_mut().expect("set above"))
    }

    fn run<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&plugin::Guest, &G, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let ticks = deadline_ticks(self.limits.call_timeout);
        let limits = self.limits;
        let name = self.name.clone();
        let live = self.ensure_live()?;
        live.store.set_epoch_deadline(ticks);
        live.store.data_mut().memory.hit = false;
        let outcome = f(&live.meta, &live.guest, &mut live.store);
        match outcome {
            Ok(r) => Ok(r),
            Err(e) => {
                let err = classify(&name, &limits, call, e, live.store.data());
                // The instance may be in any state: drop it (and its memory); the next call
                // starts a fresh one.
                self.live = None;
                tracing::warn!(plugin = %self.name, call, "{err}");
                Err(err)
            }
        }
    }

    fn call_meta<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&plugin::Guest, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.run(call, |meta, _, store| f(meta, store))
    }

    /// Runs one call of the slot's interface under the plugin's limits.
    pub fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&G, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.run(call, |_, guest, store| f(guest, store))
    }

    /// Turns an error the plugin returned into a host error naming the plugin and `subject`.
    pub fn plugin_error(&self, call: &'static str, subject: &str, e: types::PluginError) -> PluginError {
        let plugin = self.name.to_string();
        match e {
            types::PluginError::InvalidConfig(p) => {
                PluginError::InvalidConfig { plugin, key: p.key, message: p.message }
            }
            types::PluginError::Rejected(message) => {
                PluginError::Rejected { plugin, subject: subject.to_string(), message }
            }
            types::PluginError::BadState(message) => PluginError::BadState { plugin, call, message },
            types::PluginError::Internal(message) => PluginError::Internal { plugin, call, message },
        }
    }

    pub fn check_plugin_result<T>(
        &self,
        call: &'static str,
        subject: &str,
        r: Result<T, types::PluginError>,
    ) -> Result<T, PluginError> {
        r.map_err(|e| self.plugin_error(call, subject, e))
    }
}
