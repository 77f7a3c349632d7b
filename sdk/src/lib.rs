//! # nereid-sdk
//!
//! Everything a nereid plugin author depends on. A plugin is a Rust `cdylib` built for
//! `wasm32-wasip2`; it implements one slot trait and exports it with one macro:
//!
//! ```ignore
//! use nereid_sdk::prelude::*;
//!
//! #[derive(Default)]
//! struct Mean { sum: Option<Model>, n: u64 }
//!
//! impl Plugin for Mean {
//!     fn info() -> Info { Info::new("mean", "0.1.0", "Unweighted mean of client weights") }
//! }
//!
//! impl Aggregator for Mean {
//!     fn begin_round(&mut self, _: &RoundContext, _: Option<Model>) -> Result<(), PluginError> {
//!         *self = Self::default();
//!         Ok(())
//!     }
//!     fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
//!         let sum = match &self.sum { Some(s) => s, None => self.sum.insert(update.model.zeros_like(Some(DType::F64))?) };
//!         sum.axpy(1.0, &update.model)?;
//!         self.n += 1;
//!         Ok(())
//!     }
//!     fn finish(&mut self) -> Result<Aggregate, PluginError> {
//!         let sum = self.sum.take().ok_or_else(|| PluginError::BadState("no update".into()))?;
//!         sum.scale(1.0 / self.n as f64)?;
//!         Ok(Aggregate::new(sum))
//!     }
//! }
//!
//! nereid_sdk::export_aggregator!(Mean);
//! ```
//!
//! Tensors are owned by the host: [`Tensor`] is a handle, and its methods (`axpy`, `scale`,
//! `dot`, `l2_norm`, ...) run natively in the host at memory speed. Custom element-wise math
//! reads and writes bounded chunks (`read`/`write`, `read_f32`/`write_f32`).

extern crate self as nereid_sdk;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Raw bindings of the interfaces every plugin imports (generated from `wit/nereid.wit`).
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "imports",
    });
}

include!(concat!(env!("OUT_DIR"), "/generate.rs"));

mod config;
pub mod dp;
mod export;
pub mod fold;
mod model;
pub mod nn;
mod plugin;
pub mod random;
pub mod round;
pub mod server_opt;
pub mod state;

pub use bindings::nereid::plugin::host::LogLevel;
pub use bindings::nereid::plugin::model::{ClientUpdate, NamedTensor, UpdateKind};
pub use bindings::nereid::plugin::tensors::{max_chunk, Tensor, TensorError};
pub use bindings::nereid::plugin::types::{
    ConfigEntry, ConfigField, ConfigKind, ConfigProblem, ConfigValue, Dtype as DType, Metric, PluginError, PluginInfo,
    RoundContext, TensorData,
};
pub use config::{Config, Info};
pub use fold::WeightedMean;
pub use model::{Aggregate, Layout, Model, Update};
pub use plugin::{
    Adapter, Admission, Aggregator, ClientObjective, Compressor, CutPoint, Decision, InputSpec, Link, Plugin, Route,
    Router, SampleRef, Sampler, Splitter,
};

#[doc(hidden)]
pub use export::glue as __glue;

/// The names a plugin usually needs: `use nereid_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::{
        log, Adapter, Admission, Aggregate, Aggregator, ClientObjective, Compressor, Config, ConfigValue, DType,
        Decision, Info, Layout, Metric, Model, Plugin, PluginError, RoundContext, Route, Router, SampleRef, Sampler,
        Splitter, Tensor, Update, UpdateKind, WeightedMean,
    };
}

/// Writes to the host's log under the plugin's name.
pub fn log(level: LogLevel, message: &str) {
    bindings::nereid::plugin::host::log(level, message);
}

impl TensorData {
    /// A float32 tensor from its values (row-major).
    pub fn f32(name: &str, shape: Vec<u64>, values: &[f32]) -> TensorData {
        TensorData {
            name: name.into(),
            dtype: DType::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The values of a float32 tensor; `None` for another element type.
    pub fn f32_values(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32)
            .then(|| self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}

impl PluginError {
    /// The input (a client update, a sample) is refused; the host goes on without it.
    pub fn rejected(message: impl Into<String>) -> Self {
        PluginError::Rejected(message.into())
    }

    /// A configuration value is refused; `key` names it.
    pub fn invalid_config(key: impl Into<String>, message: impl Into<String>) -> Self {
        PluginError::InvalidConfig(ConfigProblem { key: key.into(), message: message.into() })
    }

    /// The call came at the wrong moment.
    pub fn bad_state(message: impl Into<String>) -> Self {
        PluginError::BadState(message.into())
    }
}

impl From<TensorError> for PluginError {
    fn from(e: TensorError) -> Self {
        let message = match e {
            TensorError::DtypeMismatch(m) => format!("dtype mismatch: {m}"),
            TensorError::ShapeMismatch(m) => format!("shape mismatch: {m}"),
            TensorError::OutOfBounds(m) => format!("out of bounds: {m}"),
            TensorError::Unsupported(m) => format!("unsupported: {m}"),
            TensorError::OutOfMemory(m) => format!("out of memory: {m}"),
        };
        PluginError::Internal(format!("tensor operation failed: {message}"))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::I8 => "i8",
        })
    }
}
