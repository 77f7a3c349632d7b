//! nereid: an edge-AI host in which every algorithm is a sandboxed WebAssembly component.
pub mod aggregate;
pub mod cloud;
pub mod components;
pub mod edge;
pub mod inference;
pub mod job;
pub mod link;
pub mod model_io;
pub mod protocol;
pub mod runtime;
pub mod store;
pub mod tensor;
pub mod train;
