//! Shared helpers: where the built components are, runtimes with a private cache, models.
use std::path::PathBuf;

use nereid::model_io::NamedTensors;
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{AggregatorPlugin, ClientUpdate, Limits, Runtime, UpdateKind};
use nereid::tensor::Tensor;

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The python of a virtual environment `cargo xtask test` makes under target/ (`what` it holds,
/// for the message if it is missing).
pub fn venv_python(dir: &str, what: &str) -> PathBuf {
    let python = root().join("target").join(dir).join("bin/python");
    assert!(python.is_file(), "{} is missing: `cargo xtask test` makes it ({what})", python.display());
    python
}

/// The directory `cargo xtask plugins` writes components to.
pub fn plugin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NEREID_PLUGIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/all-<hash> -> target/wasm32-wasip2/plugin
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.ancestors().nth(3).expect("the test runs from target/<profile>/deps");
    target.join("wasm32-wasip2").join("plugin")
}

pub fn plugin(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("nereid_{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins with `cargo xtask plugins` (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A runtime with its own empty compile cache, and the directory that holds it.
pub fn runtime() -> (Runtime, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = Runtime::new(Some(dir.path().to_path_buf())).expect("runtime");
    (runtime, dir)
}

pub fn config(pairs: &[(&str, toml::Value)]) -> ConfigTable {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

pub fn aggregator(runtime: &Runtime, name: &str, cfg: &[(&str, toml::Value)]) -> AggregatorPlugin {
    AggregatorPlugin::load(runtime, &plugin(name), Limits::default(), &config(cfg)).expect("plugin loads")
}

pub fn f32s(shape: &[u64], values: &[f32]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), values.to_vec()).expect("shape matches the values")
}

pub fn f64s(shape: &[u64], values: &[f64]) -> Tensor {
    Tensor::from_f64(shape.to_vec(), values.to_vec()).expect("shape matches the values")
}

pub fn model(tensors: &[(&str, Tensor)]) -> NamedTensors {
    tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect()
}

pub fn update(client: &str, n: u64, tensors: NamedTensors) -> ClientUpdate {
    ClientUpdate {
        client: client.into(),
        kind: UpdateKind::Weights,
        tensors,
        num_examples: n,
        metrics: Vec::new(),
        file: None,
    }
}

pub fn get<'a>(m: &'a NamedTensors, name: &str) -> &'a Tensor {
    &m.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor `{name}`")).1
}

/// Runs the `nereid` binary with the built plugins as its plugin directory.
pub fn nereid(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(args)
        .env("NEREID_PLUGIN_DIR", plugin_dir())
        .output()
        .expect("nereid")
}
