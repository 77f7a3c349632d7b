//! nereid: an edge-AI host in which every algorithm is a sandboxed WebAssembly component.
pub mod aggregate;
pub mod model_io;
pub mod runtime;
pub mod tensor;
pub mod train;
