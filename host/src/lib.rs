//! nereid: an edge-AI host in which every algorithm is a sandboxed WebAssembly component.
pub mod aggregate;
pub mod client;
pub mod cloud;
pub mod components;
pub mod config;
pub mod cpu_quota;
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

/// [`lock`] for the reading side of a `RwLock`.
pub(crate) fn read<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for the writing side of a `RwLock`.
pub(crate) fn write<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// Raises this process's soft limit on open files to its hard limit (as Go's runtime does): a
/// server keeps a descriptor per connected node, and distributions start processes at 1,024.
/// Returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Model- and sample-sized buffers come and go (updates every round, sample batches on an
/// edge); glibc would keep freed ones in per-thread arenas (RSS that never shrinks). Serving them
/// with mmap returns them to the OS on free. Setting that threshold also fixes glibc's trim
/// threshold at its 128 KB default, so the pages of every request's buffers (a 240 KB JSON body
/// is served from the heap) were handed back and faulted in again: up to 8 MiB may stay free at
/// a heap's top instead (4% of an edge's JSON serving throughput, `nereid bench serve`). Called
/// first thing by the cloud and the edge.
pub fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before other threads
    // allocate model-sized buffers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
