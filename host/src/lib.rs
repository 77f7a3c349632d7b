//! nereid: an edge-AI host in which every algorithm is a sandboxed WebAssembly component.
pub mod aggregate;
pub mod cloud;
pub mod components;
pub mod edge;
pub mod files;
pub mod inference;
pub mod job;
pub mod link;
pub mod model_io;
pub mod names;
pub mod protocol;
pub mod runtime;
pub mod store;
pub mod tensor;
pub mod train;

/// Model- and sample-sized buffers come and go (updates every round, sample batches on an
/// edge); glibc would keep freed ones in per-thread arenas (RSS that never shrinks). Serving them
/// with mmap returns them to the OS on free. Called first thing by the cloud and the edge.
pub fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before other threads
    // allocate model-sized buffers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
