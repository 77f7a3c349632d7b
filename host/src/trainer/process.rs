//! The trainer's process: started by the edge with the socket's path and a one-time token in its
//! environment, connected back over a Unix socket only the edge's user can open, stopped (its
//! whole process group) when it misbehaves, and started again for the next task.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::RngCore;

use super::wire::{self, FromTrainer, WireError};
use super::TrainerError;
use crate::config::edge::TrainerConfig;

/// How often a wait checks the clock, the cancel flag and whether the process still runs.
const TICK: Duration = Duration::from_millis(100);
/// What of the trainer's log an error quotes.
const LOG_TAIL_BYTES: u64 = 2048;

/// A started trainer, connected.
pub struct Running {
    child: Child,
    stream: UnixStream,
}

pub struct TrainerProcess {
    config: TrainerConfig,
    base: PathBuf,
    node: String,
    socket: PathBuf,
    listener: UnixListener,
    log: PathBuf,
    pid_file: PathBuf,
    running: Option<Running>,
}

impl TrainerProcess {
    /// Prepares the socket in `dir` (the edge's state directory); a trainer left running by an
    /// edge that was killed is stopped first.
    pub fn new(config: TrainerConfig, base: &Path, dir: &Path, node: &str) -> Result<TrainerProcess, TrainerError> {
        let start = |message: String| TrainerError::Start(message);
        std::fs::create_dir_all(dir).map_err(|e| start(format!("{}: {e}", dir.display())))?;
        let socket = dir.join("trainer.sock");
        // sun_path holds 108 bytes with its NUL.
        if socket.as_os_str().len() > 100 {
            return Err(start(format!("the socket path {} is too long for a Unix socket", socket.display())));
        }
        let pid_file = dir.join("trainer.pid");
        stop_leftover(&pid_file, &socket);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|e| start(format!("{}: {e}", socket.display())))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| start(format!("{}: {e}", socket.display())))?;
        listener.set_nonblocking(true).map_err(|e| start(e.to_string()))?;
        Ok(TrainerProcess {
            config,
            base: base.to_path_buf(),
            node: node.to_string(),
            socket,
            listener,
            log: dir.join("trainer.log"),
            pid_file,
            running: None,
        })
    }

    pub fn task_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.task_timeout_secs)
    }

    /// The connected trainer, started if it is not running.
    pub fn connect(&mut self, cancel: &AtomicBool) -> Result<&mut Running, TrainerError> {
        if let Some(r) = &mut self.running {
            if r.child.try_wait().ok().flatten().is_none() {
                return Ok(self.running.as_mut().expect("checked above"));
            }
            self.running = None;
        }
        let mut token = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut token);
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let workdir = self.base.join(self.config.workdir.as_deref().unwrap_or(Path::new(".")));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| TrainerError::Start(format!("{}: {e}", self.log.display())))?;
        let log2 = log.try_clone().map_err(|e| TrainerError::Start(e.to_string()))?;
        let mut child = Command::new(&self.config.command[0])
            .args(&self.config.command[1..])
            .current_dir(&workdir)
            .envs(&self.config.env)
            .env("NEREID_TRAINER_SOCKET", &self.socket)
            .env("NEREID_TRAINER_TOKEN", &token)
            .env("NEREID_NODE", &self.node)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: stopping it stops what it started too.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                TrainerError::Start(format!("cannot run {:?} in {}: {e}", self.config.command, workdir.display()))
            })?;
        let _ = std::fs::write(&self.pid_file, child.id().to_string());
        tracing::info!(node = %self.node, pid = child.id(), command = ?self.config.command, "trainer started");
        let deadline = Instant::now() + Duration::from_secs_f64(self.config.start_timeout_secs);
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(self.fail(child, TrainerError::Start(e.to_string()))),
            }
            if let Ok(Some(status)) = child.try_wait() {
                let tail = log_tail(&self.log);
                return Err(TrainerError::Exited { status: status.to_string(), log_tail: tail });
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(self.fail(child, TrainerError::Cancelled));
            }
            if Instant::now() > deadline {
                let secs = self.config.start_timeout_secs;
                return Err(self.fail(
                    child,
                    TrainerError::Start(format!(
                        "it did not connect within {secs} s (trainer.start_timeout_secs); its log ends: {}",
                        log_tail(&self.log)
                    )),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stream.set_nonblocking(false).map_err(|e| TrainerError::Start(e.to_string()))?;
        let mut running = Running { child, stream };
        let hello = running.receive::<FromTrainer>(deadline, cancel, 4096, &self.log);
        match hello {
            Ok((FromTrainer::Hello { protocol, token: given, name }, _)) => {
                if given != token {
                    return Err(self.fail(running.child, TrainerError::Protocol("it sent a wrong token".into())));
                }
                if protocol != wire::PROTOCOL {
                    return Err(self.fail(
                        running.child,
                        TrainerError::Protocol(format!(
                            "it speaks protocol {protocol}, this edge speaks {}",
                            wire::PROTOCOL
                        )),
                    ));
                }
                let name: String = name.unwrap_or_default().chars().take(64).collect();
                tracing::info!(node = %self.node, trainer = ?name, "trainer connected");
                // A trainer that stops reading cannot hold a task's send past the task's limit.
                if let Err(e) = running.stream.set_write_timeout(Some(self.task_timeout())) {
                    return Err(self.fail(running.child, TrainerError::Start(format!("the socket: {e}"))));
                }
            }
            Ok((other, _)) => {
                return Err(self.fail(
                    running.child,
                    TrainerError::Protocol(format!("its first message is {}, not hello", super::kind_of(&other))),
                ))
            }
            Err(e) => return Err(self.fail(running.child, e)),
        }
        Ok(self.running.insert(running))
    }

    /// Stops the trainer (after an error that leaves it in an unknown state).
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            kill_group(r.child);
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }

    fn fail(&mut self, child: Child, e: TrainerError) -> TrainerError {
        kill_group(child);
        let _ = std::fs::remove_file(&self.pid_file);
        e
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for TrainerProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Running {
    pub fn send(&mut self, message: &impl serde::Serialize, payload: &[u8]) -> Result<(), TrainerError> {
        wire::write_frame(&mut self.stream, message, payload)
            .map_err(|e| TrainerError::Protocol(format!("cannot send it the task: {e}")))
    }

    /// The next message, waiting at most until `deadline`, or until `cancel` is set, or the
    /// process ends.
    pub fn receive<T: serde::de::DeserializeOwned>(
        &mut self,
        deadline: Instant,
        cancel: &AtomicBool,
        max_payload: u64,
        log: &Path,
    ) -> Result<(T, Vec<u8>), TrainerError> {
        let mut watched = Watched { running: self, deadline, cancel, stopped: None };
        let read = wire::read_frame(&mut watched, max_payload);
        if let Some(stopped) = watched.stopped.take() {
            return Err(match stopped {
                Stopped::Exited(status) => TrainerError::Exited { status, log_tail: log_tail(log) },
                other => other.into(),
            });
        }
        read.map_err(|e| match e {
            WireError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                TrainerError::Protocol("it closed the connection in the middle of the task".into())
            }
            other => TrainerError::Protocol(other.to_string()),
        })
    }
}

enum Stopped {
    TimedOut,
    Cancelled,
    Exited(String),
}

impl From<Stopped> for TrainerError {
    fn from(s: Stopped) -> TrainerError {
        match s {
            Stopped::TimedOut => TrainerError::TimedOut,
            Stopped::Cancelled => TrainerError::Cancelled,
            Stopped::Exited(status) => TrainerError::Exited { status, log_tail: String::new() },
        }
    }
}

/// The connection as a reader that gives up at the deadline, on cancel, or when the process
/// ended (a read of a dead trainer's socket would wait for ever if it left a child holding it).
struct Watched<'a> {
    running: &'a mut Running,
    deadline: Instant,
    cancel: &'a AtomicBool,
    stopped: Option<Stopped>,
}

impl Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stopped = Some(Stopped::TimedOut);
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.running.stream.set_read_timeout(Some(left.min(TICK)))?;
            match self.running.stream.read(buf) {
                Ok(0) => {
                    // The other end closed: if the process is gone, say how it ended.
                    std::thread::sleep(Duration::from_millis(50));
                    if let Ok(Some(status)) = self.running.child.try_wait() {
                        self.stopped = Some(Stopped::Exited(status.to_string()));
                    }
                    return Ok(0);
                }
                Ok(n) => return Ok(n),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if self.cancel.load(Ordering::Relaxed) {
                self.stopped = Some(Stopped::Cancelled);
                return Err(io::ErrorKind::Interrupted.into());
            }
            if let Ok(Some(status)) = self.running.child.try_wait() {
                self.stopped = Some(Stopped::Exited(status.to_string()));
                return Err(io::ErrorKind::BrokenPipe.into());
            }
        }
    }
}

impl Write for Running {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

fn kill_group(mut child: Child) {
    // SAFETY: killpg only sends a signal; the group is the child's own (process_group(0)).
    unsafe {
        libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Stops the process group a killed edge's trainer left (its pid file names it, and it was
/// started with this socket: a pid the system gave to another program since is left alone).
fn stop_leftover(pid_file: &Path, socket: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else { return };
    if let Ok(pid) = text.trim().parse::<libc::pid_t>() {
        let mark = format!("NEREID_TRAINER_SOCKET={}", socket.display());
        let ours = std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == mark.as_bytes()));
        if pid > 1 && ours {
            // SAFETY: a signal to the group the pid file names: the trainer this edge started.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

/// The end of the trainer's log, for an error message.
fn log_tail(log: &Path) -> String {
    use std::io::Seek;
    let Ok(mut f) = File::open(log) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(io::SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut tail = Vec::new();
    let _ = f.take(LOG_TAIL_BYTES).read_to_end(&mut tail);
    let text = String::from_utf8_lossy(&tail);
    text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ")
}
