//! # nereid-onnx
//!
//! ONNX models as data, for the host and for plugins (it builds for wasm32-wasip2): the protobuf
//! messages ([`proto`]), and the cuts of a graph split inference needs ([`Model::cuts`],
//! [`Model::partition`]), with the profile a cut's latency is predicted from ([`Profile`]).
mod graph;
mod profile;
pub mod proto;

pub use graph::{Model, Partition, MAX_NODES};
pub use profile::{Link, Prediction, Profile};
pub use prost::Message;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OnnxError {
    #[error("not an ONNX model: {0}")]
    Decode(String),
    #[error("the model has no graph")]
    NoGraph,
    #[error("invalid graph: {0}")]
    Invalid(String),
    #[error("invalid cut: {0}")]
    BadCut(String),
    #[error("tensor `{0}` has no type in the model (no value_info); profile the model first so its tensors are typed")]
    NoType(String),
}
