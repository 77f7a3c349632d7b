//! Child `nereid` processes (a cloud, edges, a registry) of this very binary, for the demo and
//! the benchmarks, through the harness the end-to-end tests use too.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
pub use nereid_harness::Fleet;

use nereid::client::CloudClient as Api;

/// Starts `nereid <role> --config <config>` (this binary).
pub fn spawn(role: &str, config: &Path, log: &Path, cache: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    nereid_harness::spawn(&exe, &[role], config, log, cache).with_context(|| format!("starting `nereid {role}`"))
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(nereid_harness::free_port()?)
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
