//! A CPU quota for a process: a cgroup of its own whose CFS bandwidth limit gives it a share of
//! one core, so an edge can be made slower than the cloud on one machine (`nereid bench split
//! --edge-cpu`, and the offloading tests).
//!
//! The quota is 1 ms (the kernel's smallest) and the period 1 ms / share: with the default 100 ms
//! period a 2 ms inference either runs at full speed or waits up to 80 ms for the next period,
//! and the per-node times the edge profiles would be noise; with periods of a few ms every
//! kernel is stretched by about the same factor. Still, a request's latency moves in steps of a
//! period, so timings need requests of several periods' CPU and medians.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const QUOTA_US: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CpuQuotaError {
    #[error("{0} is not a share of one core in [0.01, 1]")]
    Share(f64),
    #[error("no cgroup cpu controller is mounted (v2 cpu.max or v1 cpu.cfs_quota_us)")]
    NoController,
    #[error("{what} {}: {source} (needs root or a delegated cgroup)", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CpuQuotaError {
    let path = path.to_path_buf();
    move |source| CpuQuotaError::Io { what, path, source }
}

/// A cgroup removed when dropped (after the processes in it have exited or left).
pub struct CpuQuota {
    dir: PathBuf,
    /// `cgroup.procs` of the group, ready for `entry` between fork and exec.
    procs: CString,
    /// The share of one core the group gets (the quota as written, over the period).
    pub share: f64,
}

impl CpuQuota {
    /// A group limited to `share` of one core (0.01..=1), under cgroup v2's `cpu.max` or v1's
    /// `cpu.cfs_quota_us`, whichever this machine mounts.
    pub fn new(share: f64) -> Result<CpuQuota, CpuQuotaError> {
        if !(0.01..=1.0).contains(&share) {
            return Err(CpuQuotaError::Share(share));
        }
        let period_us = (QUOTA_US as f64 / share).round() as u64;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("nereid-quota-{}-{n}", std::process::id());
        let (dir, settings): (PathBuf, Vec<(&str, String)>) =
            if Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
                (Path::new("/sys/fs/cgroup").join(&name), vec![("cpu.max", format!("{QUOTA_US} {period_us}"))])
            } else if Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").is_file() {
                (
                    Path::new("/sys/fs/cgroup/cpu").join(&name),
                    vec![("cpu.cfs_period_us", period_us.to_string()), ("cpu.cfs_quota_us", QUOTA_US.to_string())],
                )
            } else {
                return Err(CpuQuotaError::NoController);
            };
        std::fs::create_dir(&dir).map_err(io("creating the cgroup", &dir))?;
        let procs_path = dir.join("cgroup.procs");
        let procs = CString::new(procs_path.as_os_str().as_bytes())
            .map_err(|e| io("the cgroup's path", &procs_path)(std::io::Error::other(e)))?;
        let group = CpuQuota { procs, dir, share: QUOTA_US as f64 / period_us as f64 };
        for (file, value) in settings {
            let path = group.dir.join(file);
            std::fs::write(&path, &value).map_err(io("writing the quota to", &path))?;
        }
        Ok(group)
    }

    /// Moves a running process (all its threads) into the group.
    pub fn add(&self, pid: u32) -> Result<(), CpuQuotaError> {
        let path = self.dir.join("cgroup.procs");
        std::fs::write(&path, pid.to_string()).map_err(io("moving a process into", &path))
    }

    /// Moves a process back to the parent group: it runs at full speed again.
    pub fn release(&self, pid: u32) -> Result<(), CpuQuotaError> {
        let path = self.dir.parent().unwrap_or(Path::new("/sys/fs/cgroup")).join("cgroup.procs");
        std::fs::write(&path, pid.to_string()).map_err(io("moving a process back into", &path))
    }

    /// What moves the calling process into the group, for `pre_exec`: only raw syscalls and no
    /// allocation, so it can run between fork and exec and the child is limited from its first
    /// instruction.
    pub fn entry(&self) -> impl Fn() -> std::io::Result<()> + Send + Sync + 'static {
        let procs = self.procs.clone();
        move || {
            // SAFETY: `procs` is a NUL-terminated path; open, write and close take plain buffers.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" names the writing process, in cgroup v1 and v2 alike.
                let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 2 {
                    return Err(err);
                }
            }
            Ok(())
        }
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!("removing the cgroup {}: {e}", self.dir.display());
        }
    }
}
