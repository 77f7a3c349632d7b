//! nereid: an edge-AI host in which every algorithm is a sandboxed WebAssembly component.
pub mod aggregate;
pub mod client;
pub mod cloud;
pub mod components;
pub mod config;
pub mod edge;
pub mod files;
pub mod inference;
pub mod link;
pub mod metrics;
pub mod model_io;
pub mod names;
pub mod privacy;
pub mod protocol;
pub mod runtime;
pub mod store;
pub mod tensor;
pub mod train;
pub mod trainer;

/// Locks `m`, also after a thread panicked while holding it. Every shared map and counter of
/// the hosts is left consistent between statements (a panic loses at most an update to a cache
/// or a counter, which the store or the next request puts right), so the one way this crate
/// treats a poisoned lock is to go on with what it holds.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
