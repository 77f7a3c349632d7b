//! Pipeline files of `nereid model compress`: which passes (compressor plugins) rewrite a model,
//! and the data that evaluates and calibrates it.
use std::path::PathBuf;

use serde::Deserialize;

use super::ServicePlugin;

fn default_calibration_samples() -> usize {
    64
}

/// A pipeline file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// A data directory whose test split is the eval set.
    pub eval: Option<PathBuf>,
    /// A data directory whose train split provides the calibration samples.
    pub calibration: Option<PathBuf>,
    /// Or an edge's state (`edge.db`) whose replay buffer provides them (float32 samples).
    pub calibration_replay: Option<PathBuf>,
    /// How many calibration samples (the first rows of the train split, or the first held
    /// samples of the replay buffer).
    #[serde(default = "default_calibration_samples")]
    pub calibration_samples: usize,
    /// The passes, in order: a built plugin's name (looked up in the plugin directory), a
    /// `.wasm` path relative to the pipeline file, or an `oci://` reference, with its options.
    #[serde(rename = "pass")]
    pub passes: Vec<ServicePlugin>,
}
