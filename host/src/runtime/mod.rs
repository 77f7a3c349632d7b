//! The component runtime: one wasmtime engine, a sandbox per plugin instance with a time and a
//! memory limit, slot checking, and the on-disk cache of compiled components.
pub mod bindings;
mod cache;
pub mod config;
mod error;
mod host_impl;
pub mod nn;
pub mod onnxruntime;
mod openvino;
pub mod round_updates;
mod sandbox;
mod slots;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, Store};

pub use cache::{content_digest, CacheOutcome, CompileCache};
pub use error::PluginError;
pub use host_impl::MAX_CHUNK;
pub use sandbox::{describe, PluginInfo, Sandbox, SlotGuest};
pub use slots::{
    AdapterPlugin, Admission, AggregateResult, AggregatorPlugin, ClientUpdate, CompressorPlugin, CutPoint, Decision,
    InputSpec, ObjectivePlugin, RoundContext, Route, RouterPlugin, SampleRef, SamplerPlugin, SplitterPlugin,
    TensorData, UpdateKind,
};
use state::PluginState;

/// How often the engine's epoch advances; time limits are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A component's bytes and where they came from.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    /// The component's content digest (`sha256:<hex>` of its bytes).
    pub digest: String,
    /// For a registry component: the reference pinned to its manifest digest.
    pub pinned: Option<String>,
    /// What to call it in messages: the file or the reference.
    pub origin: String,
}

/// Per-plugin resource limits.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall time one call may take before it is interrupted.
    #[serde(with = "millis")]
    pub call_timeout: Duration,
    /// Largest linear memory the plugin may grow to, in bytes.
    pub memory_bytes: usize,
    /// Bytes of host tensors the plugin may create (tensors the host lends it are not counted).
    pub tensor_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { call_timeout: Duration::from_secs(5), memory_bytes: 256 << 20, tensor_bytes: 4 << 30 }
    }
}

/// Longest time limit a plugin call may be given.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Most linear memory a plugin may be given: all a 32-bit Wasm memory can address.
pub const MAX_PLUGIN_MEMORY: usize = 4 << 30;
/// Most bytes of host tensors a plugin may be allowed to create.
pub const MAX_TENSOR_BYTES: usize = 64 << 30;

impl Limits {
    /// The defaults, with a plugin section's `timeout_ms` and `memory_mib` where given.
    pub fn with_overrides(timeout_ms: Option<u64>, memory_mib: Option<usize>) -> Limits {
        let d = Limits::default();
        Limits {
            call_timeout: timeout_ms.map_or(d.call_timeout, Duration::from_millis),
            memory_bytes: memory_mib.map_or(d.memory_bytes, |m| m.saturating_mul(1 << 20)),
            tensor_bytes: d.tensor_bytes,
        }
    }

    /// Checks the limits are within what a host gives a plugin; the error names the key of a
    /// plugin section (`timeout_ms`, `memory_mib`) or of the limits (`tensor_bytes`).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.call_timeout.is_zero() || self.call_timeout > MAX_CALL_TIMEOUT {
            return Err(("timeout_ms", format!("must be between 1 and {} ms", MAX_CALL_TIMEOUT.as_millis())));
        }
        if self.memory_bytes < (1 << 20) || self.memory_bytes > MAX_PLUGIN_MEMORY {
            return Err(("memory_mib", format!("must be between 1 and {} MiB", MAX_PLUGIN_MEMORY >> 20)));
        }
        if self.tensor_bytes > MAX_TENSOR_BYTES {
            return Err(("tensor_bytes", format!("must be at most {MAX_TENSOR_BYTES}")));
        }
        Ok(())
    }
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_millis(ms))
    }
}

/// A plugin slot: where in nereid a component is used, and the world it must implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    Aggregator,
    ClientObjective,
    Sampler,
    Compressor,
    Router,
    Splitter,
    Adapter,
}

impl Slot {
    pub const ALL: [Slot; 7] = [
        Slot::Aggregator,
        Slot::ClientObjective,
        Slot::Sampler,
        Slot::Compressor,
        Slot::Router,
        Slot::Splitter,
        Slot::Adapter,
    ];

    /// The interface a component of this slot exports.
    pub fn interface(self) -> &'static str {
        match self {
            Slot::Aggregator => "nereid:plugin/aggregator@0.1.0",
            Slot::ClientObjective => "nereid:plugin/client-objective@0.1.0",
            Slot::Sampler => "nereid:plugin/sampler@0.1.0",
            Slot::Compressor => "nereid:plugin/compressor@0.1.0",
            Slot::Router => "nereid:plugin/router@0.1.0",
            Slot::Splitter => "nereid:plugin/splitter@0.1.0",
            Slot::Adapter => "nereid:plugin/adapter@0.1.0",
        }
    }

    /// The slot's name as configs and the CLI spell it (`client-objective`).
    pub fn name(self) -> &'static str {
        self.world().trim_end_matches("-plugin")
    }

    /// The slot named `name` (as [`Slot::name`] spells it).
    pub fn named(name: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The world of `wit/nereid.wit` a component of this slot implements.
    pub fn world(self) -> &'static str {
        match self {
            Slot::Aggregator => "aggregator-plugin",
            Slot::ClientObjective => "client-objective-plugin",
            Slot::Sampler => "sampler-plugin",
            Slot::Compressor => "compressor-plugin",
            Slot::Router => "router-plugin",
            Slot::Splitter => "splitter-plugin",
            Slot::Adapter => "adapter-plugin",
        }
    }
}

/// The version of the plugin contract (`package nereid:plugin@...` in `wit/nereid.wit`) this
/// host implements.
pub const CONTRACT_VERSION: &str = "0.1.0";

/// Refuses a component that imports or exports an interface of another version of the contract:
/// while the contract is 0.x every version may change its types, so the versions must be equal
/// (an older or a newer plugin is named with both versions, not left to fail at linking).
fn check_contract<'a>(origin: &str, names: impl Iterator<Item = &'a String>) -> Result<(), PluginError> {
    for name in names {
        let Some(rest) = name.strip_prefix("nereid:plugin/") else { continue };
        let built = rest.split_once('@').map_or("(no version)", |(_, v)| v);
        if built != CONTRACT_VERSION {
            return Err(PluginError::Contract {
                origin: origin.to_string(),
                built: built.to_string(),
                host: CONTRACT_VERSION,
            });
        }
    }
    Ok(())
}

/// The world(s) a set of exported slots amounts to, for messages.
pub fn describe_worlds(slots: &[Slot]) -> String {
    match slots {
        [] => "no nereid slot (it exports no nereid:plugin slot interface)".to_string(),
        [Slot::Aggregator, Slot::ClientObjective] => {
            "world `strategy-plugin` (aggregator and client-objective)".to_string()
        }
        [one] => format!("world `{}`", one.world()),
        many => format!("the slots {}", many.iter().map(|s| format!("`{}`", s.world())).collect::<Vec<_>>().join(", ")),
    }
}

/// A compiled component, ready to instantiate.
#[derive(Clone)]
pub struct LoadedComponent {
    /// Where it came from (a path or a reference), for messages.
    pub origin: String,
    /// `sha256:<hex>` of the component's bytes.
    pub digest: String,
    pub slots: Vec<Slot>,
    pub imports: Vec<String>,
    pub cache: CacheOutcome,
    pub component: Component,
    pub(crate) pre: InstancePre<PluginState>,
}

struct Inner {
    engine: Engine,
    linker: Linker<PluginState>,
    cache: CompileCache,
    models: nn::Models,
}

/// The engine, the linker with nereid's host functions and WASI, and the compile cache.
/// Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// A runtime whose compiled components are cached under `cache_dir` (None: no cache).
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        Runtime::with_models(cache_dir, nn::Models::default())
    }

    /// A runtime whose plugins can run `models` through wasi-nn (`load-by-name`).
    pub fn with_models(cache_dir: Option<PathBuf>, models: nn::Models) -> anyhow::Result<Runtime> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("creating the wasmtime engine: {e:#}"))?;
        spawn_epoch_ticker(&engine);

        let mut linker = Linker::<PluginState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("linking WASI: {e:#}"))?;
        bindings::HostBindings::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| anyhow::anyhow!("linking nereid host functions: {e:#}"))?;
        wasmtime_wasi_nn::wit::add_to_linker(&mut linker, |s: &mut PluginState| {
            wasmtime_wasi_nn::wit::WasiNnView::new(&mut s.table, &mut s.nn)
        })
        .map_err(|e| anyhow::anyhow!("linking wasi-nn: {e:#}"))?;
        Ok(Runtime { inner: Arc::new(Inner { engine, linker, cache: CompileCache::new(cache_dir), models }) })
    }

    /// A runtime with the default cache directory (see [`CompileCache::default_dir`]).
    pub fn with_default_cache() -> anyhow::Result<Runtime> {
        Runtime::new(CompileCache::default_dir())
    }

    /// The node's models plugins reach through wasi-nn.
    pub fn models(&self) -> &nn::Models {
        &self.inner.models
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn cache(&self) -> &CompileCache {
        &self.inner.cache
    }

    pub fn load_file(&self, path: &Path) -> Result<LoadedComponent, PluginError> {
        let bytes = crate::files::read_limited(path, crate::files::MAX_COMPONENT_BYTES)
            .map_err(|source| PluginError::Read { path: path.to_path_buf(), source })?;
        self.load_bytes(&bytes, &path.display().to_string())
    }

    pub fn load_bytes(&self, bytes: &[u8], origin: &str) -> Result<LoadedComponent, PluginError> {
        // Checked before wasmtime sees the bytes: it would parse text as WAT and quote it back.
        if !bytes.starts_with(b"\0asm") {
            return Err(PluginError::Compile {
                origin: origin.to_string(),
                message: "not a WebAssembly binary (it does not begin with `\\0asm`)".into(),
            });
        }
        let digest = content_digest(bytes);
        let (component, cache) = self.inner.cache.load(&self.inner.engine, bytes, &digest, origin)?;
        let ty = component.component_type();
        let exports: Vec<String> = ty.exports(&self.inner.engine).map(|(name, _)| name.to_string()).collect();
        let slots = Slot::ALL.into_iter().filter(|s| exports.iter().any(|e| e == s.interface())).collect();
        let imports: Vec<String> = ty.imports(&self.inner.engine).map(|(name, _)| name.to_string()).collect();
        check_contract(origin, imports.iter().chain(&exports))?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Instantiate { origin: origin.to_string(), message: format!("{e:#}") })?;
        Ok(LoadedComponent { origin: origin.to_string(), digest, slots, imports, cache, component, pre })
    }

    /// The linker plugins are instantiated with (WASI p2, nereid's host functions, wasi-nn).
    pub fn linker(&self) -> &Linker<PluginState> {
        &self.inner.linker
    }

    /// A fresh store for one instance of `plugin`, with its memory limit and wasi-nn context.
    pub fn store(&self, plugin: Arc<str>, limits: &Limits) -> Store<PluginState> {
        let state = PluginState::new(plugin, limits.memory_bytes, limits.tensor_bytes, self.inner.models.context());
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.memory);
        store
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped, so that a call
/// past its deadline is interrupted wherever it is in guest code.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("nereid-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        })
        .expect("spawning the epoch thread");
}

/// Ticks for a time limit, rounded up, at least one.
pub(crate) fn deadline_ticks(limit: Duration) -> u64 {
    (limit.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64).max(1)
}
