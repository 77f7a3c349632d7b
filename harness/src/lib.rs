//! nereid-harness: what the demo, the benchmarks and the end-to-end tests share to run nereid
//! as processes (a cloud, edges, a registry) on one machine: starting a role with its config, a
//! log and a cache of its own; free ports; resident memory read from `/proc`. Not part of the
//! product: the `nereid` binary uses it only for `demo` and `bench`.
use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Child processes, killed (and reaped) when the owner ends however it ends.
#[derive(Default)]
pub struct Fleet(pub Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `exe <args...> --config <config>` with its own cache directory (`NEREID_CACHE_DIR`,
/// as on separate machines), its stderr (the log) to `log`, stdin and stdout closed.
pub fn spawn(exe: &Path, args: &[&str], config: &Path, log: &Path, cache: &Path) -> io::Result<Child> {
    Command::new(exe)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("NEREID_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
}

/// A loopback port nobody listens on now.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A memory figure of process `pid` in KiB, from `/proc/<pid>/status`: `field` is e.g.
/// `"VmRSS:"` (resident now) or `"VmHWM:"` (the peak). Linux only.
pub fn rss_kib(pid: u32, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no `{field}` in /proc/{pid}/status")))
}

/// CPU time process `pid` has used so far (user + system), in seconds, from `/proc/<pid>/stat`.
/// Linux only.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted after it.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15, the 12th and 13th after the name; in USER_HZ (100).
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok((user + system) as f64 / 100.0),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("no CPU times in /proc/{pid}/stat"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_time() {
        let t0 = cpu_seconds(std::process::id()).expect("stat");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(150) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(cpu_seconds(std::process::id()).expect("stat") > t0);
    }

    #[test]
    fn this_process_has_a_resident_size() {
        let kib = rss_kib(std::process::id(), "VmRSS:").expect("VmRSS");
        assert!(kib > 100, "{kib}");
        assert!(rss_kib(std::process::id(), "NoSuch:").is_err());
    }
}
