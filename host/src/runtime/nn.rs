//! wasi-nn for plugins: the tensor-heavy work of inference runs natively in ONNX Runtime (its
//! shared library comes from the `onnxruntime` PyPI wheel `cargo xtask setup` fetches, loaded at
//! run time), with the node's models registered by name for `load-by-name`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use wasmtime_wasi_nn::backend::onnx::OnnxBackend;
use wasmtime_wasi_nn::backend::{BackendFromDir, BackendInner};
use wasmtime_wasi_nn::wit::{ExecutionTarget, WasiNnCtx};
use wasmtime_wasi_nn::{Backend, Graph, GraphRegistry};

#[derive(Debug, Clone, thiserror::Error)]
pub enum NnError {
    #[error(
        "ONNX Runtime's library was not found (looked for {0}); `cargo xtask setup` fetches it, or set NEREID_ONNXRUNTIME"
    )]
    NoOnnxRuntime(String),
    #[error("ONNX Runtime at {path}: {message}")]
    OnnxRuntime { path: String, message: String },
    #[error("model `{name}` ({path}): {message}")]
    Model { name: String, path: String, message: String },
}

/// Where ONNX Runtime's shared library is: `$NEREID_ONNXRUNTIME`, else `onnxruntime/` in the
/// target directory of this executable (where the setup puts it).
pub fn onnxruntime_library() -> Result<PathBuf, NnError> {
    let candidates: Vec<PathBuf> = std::env::var_os("NEREID_ONNXRUNTIME")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::current_exe().ok().and_then(|exe| {
            // target/<profile>/nereid or target/<profile>/deps/<test>
            exe.ancestors()
                .skip(1)
                .take(3)
                .map(|d| d.join("onnxruntime").join("libonnxruntime.so"))
                .find(|p| p.exists())
        }))
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        NnError::NoOnnxRuntime(candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
    })
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

/// The models of a node, loaded once and shared by every plugin instance. Models registered
/// later (the halves of a split model) are seen by instances created after they were.
#[derive(Clone, Default)]
pub struct Models {
    graphs: Arc<RwLock<HashMap<String, Graph>>>,
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
    /// Every `<dir>/<name>/model.onnx`, registered as `<name>`.
    pub fn load_dir(dir: &Path) -> Result<Models, NnError> {
        let mut graphs = HashMap::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| NnError::Model { name: "*".into(), path: dir.display().to_string(), message: e.to_string() })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("model.onnx").is_file())
            .collect();
        entries.sort();
        if !entries.is_empty() {
            init_onnxruntime()?;
        }
        for path in entries {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let graph = OnnxBackend::default().load_from_dir(&path, ExecutionTarget::Cpu).map_err(|e| {
                NnError::Model { name: name.clone(), path: path.display().to_string(), message: e.to_string() }
            })?;
            graphs.insert(name, graph);
        }
        Ok(Models { graphs: Arc::new(RwLock::new(graphs)) })
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
        init_onnxruntime()?;
        let graph = OnnxBackend::default().load(&[onnx], ExecutionTarget::Cpu).map_err(|e| NnError::Model {
            name: name.to_string(),
            path: "(registered by the host)".into(),
            message: e.to_string(),
        })?;
        self.graphs.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), graph);
        Ok(())
    }

    /// A wasi-nn context for one plugin instance: these models and, if there are any, the ONNX
    /// backend (a node without models never loads ONNX Runtime, which costs ~20 MB of memory).
    pub fn context(&self) -> WasiNnCtx {
        let graphs = self.read().clone();
        let backends: Vec<Backend> = if !graphs.is_empty() && init_onnxruntime().is_ok() {
            vec![Backend::from(OnnxBackend::default())]
        } else {
            Vec::new()
        };
        let registry = InstanceModels(graphs);
        WasiNnCtx::new(backends, registry.into())
    }
}
