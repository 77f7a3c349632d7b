//! Child `nereid` processes (a cloud, edges) for the demo and the benchmarks.
use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::api::Api;

/// Child processes, killed when the owner ends however it ends.
pub struct Fleet(pub Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn spawn(role: &str, config: &Path, log: &Path, cache: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(log)?;
    Command::new(exe)
        .args([role, "--config"])
        .arg(config)
        .env("NEREID_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting `nereid {role}`"))
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `nereid cloud` with `work/cloud.toml` (logging to `work/cloud.log`) and waits until it
/// answers on `api`.
pub fn start_cloud(work: &Path, cache: &Path, api: &Api, rt: &tokio::runtime::Runtime) -> anyhow::Result<Fleet> {
    let log = work.join("cloud.log");
    let fleet = Fleet(vec![spawn("cloud", &work.join("cloud.toml"), &log, cache)?]);
    let started = Instant::now();
    while !rt.block_on(api.health()) {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the cloud did not come up; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(fleet)
}

/// Starts the embedded registry (`nereid registry serve`) on a free loopback port, serving
/// `root`, and waits until it answers; returns the process and its `host:port`.
pub fn start_registry(root: &Path, log: &Path) -> anyhow::Result<(Child, String)> {
    let host = format!("127.0.0.1:{}", free_port()?);
    let mut child = Command::new(std::env::current_exe()?)
        .args(["registry", "serve", "--root"])
        .arg(root)
        .args(["--addr", &host])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting `nereid registry serve`")?;
    let started = Instant::now();
    while std::net::TcpStream::connect(&host).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the registry exited ({status}); see {}", log.display());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the registry did not come up; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, host))
}
