//! Inference shared by the edge and the cloud: tensors on the wire (JSON and safetensors),
//! ONNX Runtime sessions run natively by the host (the cloud's models and tails, profiling),
//! and the profile split inference plans from.
pub mod codec;
pub mod compress;
pub mod export;
pub mod initializers;
pub mod json_array;
pub mod json_number;
pub mod json_request;
#[cfg(target_arch = "x86_64")]
mod json_simd;
pub mod native;
pub mod profile;
pub mod wire;

pub use native::NativeModel;
