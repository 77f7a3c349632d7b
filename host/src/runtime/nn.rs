//! wasi-nn for plugins: the tensor-heavy work of inference runs natively in ONNX Runtime or
//! OpenVINO (their shared libraries come from the `onnxruntime` and `openvino` PyPI wheels
//! `cargo xtask setup` fetches, loaded at run time), with the node's models registered by name
//! for `load-by-name`. Both read the same ONNX files.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use wasmtime_wasi_nn::backend::onnx::OnnxBackend;
use wasmtime_wasi_nn::backend::openvino::OpenvinoBackend;
use wasmtime_wasi_nn::wit::WasiNnCtx;
use wasmtime_wasi_nn::{Backend, Graph, GraphRegistry};

pub use super::onnxruntime::SessionOptions;

#[derive(Debug, Clone, thiserror::Error)]
pub enum NnError {
    #[error(
        "ONNX Runtime's library was not found (looked for {0}); `cargo xtask setup` fetches it, or set NEREID_ONNXRUNTIME"
    )]
    NoOnnxRuntime(String),
    #[error("ONNX Runtime at {path}: {message}")]
    OnnxRuntime { path: String, message: String },
    #[error(
        "OpenVINO's library was not found (looked for {0}); `cargo xtask setup` fetches it, or set NEREID_OPENVINO"
    )]
    NoOpenvino(String),
    #[error("OpenVINO at {path}: {message}")]
    Openvino { path: String, message: String },
    #[error("model `{name}` ({path}): {message}")]
    Model { name: String, path: String, message: String },
}

/// `$<env>`, else `<dir>/<file>` in the target directory of this executable (where the setup
/// puts the runtimes).
fn runtime_library(env: &str, dir: &str, file: &str) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = std::env::var_os(env)
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::current_exe().ok().and_then(|exe| {
            // target/<profile>/nereid or target/<profile>/deps/<test>
            exe.ancestors().skip(1).take(3).map(|d| d.join(dir).join(file)).find(|p| p.exists())
        }))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
}

/// Where ONNX Runtime's shared library is: `$NEREID_ONNXRUNTIME`, else `onnxruntime/` in the
/// target directory of this executable.
pub fn onnxruntime_library() -> Result<PathBuf, NnError> {
    runtime_library("NEREID_ONNXRUNTIME", "onnxruntime", "libonnxruntime.so").map_err(NnError::NoOnnxRuntime)
}

/// Where OpenVINO's C library is: `$NEREID_OPENVINO`, else `openvino/` in the target directory
/// of this executable (its other libraries and plugins next to it).
pub fn openvino_library() -> Result<PathBuf, NnError> {
    runtime_library("NEREID_OPENVINO", "openvino", "libopenvino_c.so").map_err(NnError::NoOpenvino)
}

/// Loads OpenVINO once per process.
pub fn init_openvino() -> Result<PathBuf, NnError> {
    static INIT: OnceLock<Result<PathBuf, NnError>> = OnceLock::new();
    INIT.get_or_init(|| {
        let path = openvino_library()?;
        openvino_sys::library::load_from(path.clone())
            .map_err(|message| NnError::Openvino { path: path.display().to_string(), message })?;
        Ok(path)
    })
    .clone()
}

/// Loads ONNX Runtime once per process (a library that is absent is an error here, never a panic
/// later inside a plugin call).
pub fn init_onnxruntime() -> Result<PathBuf, NnError> {
    static INIT: OnceLock<Result<PathBuf, NnError>> = OnceLock::new();
    INIT.get_or_init(|| {
        let path = onnxruntime_library()?;
        ort::init_from(path.display().to_string())
            .with_name("nereid")
            .commit()
            .map_err(|e| NnError::OnnxRuntime { path: path.display().to_string(), message: e.to_string() })?;
        Ok(path)
    })
    .clone()
}

/// The library wasi-nn runs a node's models on (both read ONNX).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NnBackend {
    /// ONNX Runtime (CPU).
    #[default]
    Onnxruntime,
    /// OpenVINO (CPU plugin, f32).
    Openvino,
}

impl NnBackend {
    /// Whether this backend's library loads here (a node without models never loads one).
    fn ready(self) -> Result<PathBuf, NnError> {
        match self {
            NnBackend::Onnxruntime => init_onnxruntime(),
            NnBackend::Openvino => init_openvino(),
        }
    }

    fn load(self, onnx: &[u8], options: SessionOptions) -> Result<Graph, String> {
        self.ready().map_err(|e| e.to_string())?;
        let graph = match self {
            NnBackend::Onnxruntime => super::onnxruntime::load_onnx(onnx, options),
            NnBackend::Openvino => super::openvino::load_onnx(onnx),
        };
        graph.map_err(|e| e.to_string())
    }

    fn backend(self) -> Backend {
        match self {
            NnBackend::Onnxruntime => Backend::from(OnnxBackend::default()),
            NnBackend::Openvino => Backend::from(OpenvinoBackend::default()),
        }
    }
}

/// The models of a node, loaded once and shared by every plugin instance. Models registered
/// later (the halves of a split model) are seen by instances created after they were.
#[derive(Clone, Default)]
pub struct Models {
    graphs: Arc<RwLock<HashMap<String, Graph>>>,
    /// Counts registrations: an instance started before the last one may not see every model.
    generation: Arc<AtomicU64>,
    backend: NnBackend,
    /// Whether plugins may load models of their own (wasi-nn `load` of ONNX bytes).
    guest_load: bool,
}

/// One instance's view of the shared models (graphs are reference-counted).
struct InstanceModels(HashMap<String, Graph>);

impl GraphRegistry for InstanceModels {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.get(name)
    }
    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.0.get_mut(name)
    }
}

impl Models {
    /// No models yet; those registered later run on `backend`.
    pub fn new(backend: NnBackend) -> Models {
        Models { graphs: Arc::default(), generation: Arc::default(), backend, guest_load: false }
    }

    /// No registered models, but plugins may load ONNX models they build (wasi-nn `load`), e.g.
    /// a quantization pass running a calibration model; they run on `backend`.
    pub fn for_guest_models(backend: NnBackend) -> Result<Models, NnError> {
        backend.ready()?;
        Ok(Models { graphs: Arc::default(), generation: Arc::default(), backend, guest_load: true })
    }

    /// Every `<dir>/<name>/model.onnx`, registered as `<name>`, on `backend`.
    pub fn load_dir(dir: &Path, backend: NnBackend) -> Result<Models, NnError> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| NnError::Model { name: "*".into(), path: dir.display().to_string(), message: e.to_string() })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("model.onnx").is_file())
            .collect();
        entries.sort();
        if !entries.is_empty() {
            backend.ready()?;
        }
        let models = Models::new(backend);
        for path in entries {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let file = path.join("model.onnx");
            crate::names::check(crate::names::Kind::Model, &name).map_err(|e| NnError::Model {
                name: name.clone(),
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let onnx = crate::files::read_limited(&file, crate::files::MAX_MODEL_BYTES).map_err(|e| {
                NnError::Model { name: name.clone(), path: file.display().to_string(), message: e.to_string() }
            })?;
            let graph = backend.load(&onnx, SessionOptions::default()).map_err(|message| NnError::Model {
                name: name.clone(),
                path: file.display().to_string(),
                message,
            })?;
            models.graphs.write().unwrap_or_else(|e| e.into_inner()).insert(name, graph);
        }
        Ok(models)
    }

    /// The backend the models run on.
    pub fn backend(&self) -> NnBackend {
        self.backend
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Graph>> {
        // A panic while holding the lock cannot leave the map half-written (insert is atomic).
        self.graphs.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Registers an ONNX model under `name` (replacing one of that name).
    pub fn insert(&self, name: &str, onnx: &[u8]) -> Result<(), NnError> {
        self.insert_with(name, onnx, SessionOptions::default())
    }

    /// Registers an ONNX model under `name` (replacing one of that name) whose sessions run with
    /// `options` (ONNX Runtime; OpenVINO's CPU plugin sizes its own threads).
    pub fn insert_with(&self, name: &str, onnx: &[u8], options: SessionOptions) -> Result<(), NnError> {
        let graph = self.backend.load(onnx, options).map_err(|message| NnError::Model {
            name: name.to_string(),
            path: "(registered by the host)".into(),
            message,
        })?;
        self.graphs.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), graph);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Changes with every registration: an instance whose wasi-nn context was made at an older
    /// generation may miss a model registered since.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Forgets the model `name` (plugin instances started with it keep their own handle).
    pub fn remove(&self, name: &str) {
        self.graphs.write().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// A wasi-nn context for one plugin instance: these models and, if there are any (or plugins
    /// may load their own), their backend (a node without models never loads a runtime, which
    /// costs ~20 MB of memory).
    pub fn context(&self) -> WasiNnCtx {
        let graphs = self.read().clone();
        let backends: Vec<Backend> = if (!graphs.is_empty() || self.guest_load) && self.backend.ready().is_ok() {
            vec![self.backend.backend()]
        } else {
            Vec::new()
        };
        let registry = InstanceModels(graphs);
        WasiNnCtx::new(backends, registry.into())
    }
}
