//! A shaped TCP link on loopback: a proxy that gives traffic through it a bandwidth and a
//! propagation delay, the way a real uplink would, so split inference can be measured (and
//! benchmarked) under 1, 10 or 100 Mbit/s on one machine without root or `tc`.
//!
//! Each direction is one serial link shared by every connection through the proxy: a chunk
//! leaves when the link has finished sending what came before it (its serialisation takes
//! bytes / bandwidth) and arrives the one-way delay later.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What the link does to traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// Bandwidth of each direction, Mbit/s.
    pub mbit_s: f64,
    /// Delay added to each direction, ms (the round trip gains twice this).
    pub one_way_delay_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link shaper: bandwidth must be > 0 Mbit/s (got {0})")]
    Bandwidth(f64),
    #[error("link shaper: delay must be >= 0 ms (got {0})")]
    Delay(f64),
    #[error("link shaper: {0}")]
    Io(#[from] std::io::Error),
}

fn check(profile: LinkProfile) -> Result<LinkProfile, LinkError> {
    if !(profile.mbit_s > 0.0 && profile.mbit_s.is_finite()) {
        return Err(LinkError::Bandwidth(profile.mbit_s));
    }
    if !(profile.one_way_delay_ms >= 0.0 && profile.one_way_delay_ms.is_finite()) {
        return Err(LinkError::Delay(profile.one_way_delay_ms));
    }
    Ok(profile)
}

/// One direction of the link: when it is free to send again.
struct Direction {
    free_at: Mutex<Instant>,
}

struct Shared {
    profile: Mutex<LinkProfile>,
    /// True while the link is cut: open connections are dropped and new ones closed at once.
    cut: tokio::sync::watch::Sender<bool>,
    up: Direction,
    down: Direction,
}

impl Shared {
    fn profile(&self) -> LinkProfile {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running shaper: connections to [`LinkShaper::addr`] reach `upstream` through the link.
/// Dropping it stops accepting (open connections end with their peers).
pub struct LinkShaper {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for LinkShaper {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// Small enough that a chunk's serialisation at 1 Mbit/s (33 ms) keeps the pacing smooth.
const CHUNK: usize = 4096;

impl LinkShaper {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` through the link.
    pub async fn start(upstream: SocketAddr, profile: LinkProfile) -> Result<LinkShaper, LinkError> {
        let shared = Arc::new(Shared {
            profile: Mutex::new(check(profile)?),
            cut: tokio::sync::watch::channel(false).0,
            up: Direction { free_at: Mutex::new(Instant::now()) },
            down: Direction { free_at: Mutex::new(Instant::now()) },
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let link = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                if *link.cut.borrow() {
                    continue;
                }
                let link = link.clone();
                tokio::spawn(async move {
                    match TcpStream::connect(upstream).await {
                        Ok(server) => relay(client, server, link).await,
                        Err(e) => tracing::debug!("link shaper: connecting to {upstream}: {e}"),
                    }
                });
            }
        });
        Ok(LinkShaper { addr, shared, accept })
    }

    /// The address to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link (every open connection through it is dropped, new ones are closed as
    /// they come) or restores it: an outage, for fault tests.
    pub fn cut(&self, cut: bool) {
        self.shared.cut.send_replace(cut);
    }

    /// Changes the link for traffic from now on.
    pub fn set(&self, profile: LinkProfile) -> Result<(), LinkError> {
        *self.shared.profile.lock().unwrap_or_else(|e| e.into_inner()) = check(profile)?;
        Ok(())
    }
}

async fn relay(client: TcpStream, server: TcpStream, link: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut cut = link.cut.subscribe();
    let up = pump(client_read, server_write, link.clone(), true);
    let down = pump(server_read, client_write, link, false);
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        // Dropping the pumps drops both connections.
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

/// Moves one direction's bytes: a reader takes chunks in as they come, a writer lets each out
/// at its arrival time. The queue between them is bounded, so a sender far ahead of the link
/// is held back by TCP as it would be by a real one.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Shared>,
    upstream: bool,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let profile = link.profile();
            let direction = if upstream { &link.up } else { &link.down };
            let sent = {
                let mut free_at = direction.free_at.lock().unwrap_or_else(|e| e.into_inner());
                let start = (*free_at).max(Instant::now());
                *free_at = start + Duration::from_secs_f64(n as f64 * 8.0 / (profile.mbit_s * 1e6));
                *free_at
            };
            let arrives = sent + Duration::from_secs_f64(profile.one_way_delay_ms / 1e3);
            if tx.send((arrives, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((arrives, bytes)) = rx.recv().await {
            tokio::time::sleep_until(arrives).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Sends `bytes` through the link and reads them back: the elapsed time.
    async fn round_trip(addr: SocketAddr, bytes: usize) -> Duration {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let data = vec![7u8; bytes];
        let t = Instant::now();
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&data).await.expect("write");
        };
        let read = async {
            let mut got = vec![0u8; bytes];
            r.read_exact(&mut got).await.expect("read");
            assert_eq!(got, data);
        };
        tokio::join!(write, read);
        t.elapsed()
    }

    // The link's pacing is exact on paper: 64 KiB at 8 Mbit/s is 65.5 ms each way, pipelined
    // through the echo, plus 2 x 10 ms of delay. Scheduling only adds, so the lower bound is
    // firm; the upper bound is loose for a busy machine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paces_to_the_bandwidth_and_adds_the_delay() {
        let shaper =
            LinkShaper::start(echo().await, LinkProfile { mbit_s: 8.0, one_way_delay_ms: 10.0 }).await.expect("shaper");
        let took = round_trip(shaper.addr(), 64 << 10).await.as_secs_f64() * 1e3;
        let serialise = (64 << 10) as f64 * 8.0 / 8e6 * 1e3;
        assert!(took >= serialise + 20.0, "{took} ms");
        assert!(took < 3.0 * (serialise + 20.0), "{took} ms");

        shaper.set(LinkProfile { mbit_s: 80.0, one_way_delay_ms: 0.0 }).expect("set");
        let faster = round_trip(shaper.addr(), 64 << 10).await.as_secs_f64() * 1e3;
        assert!(faster < took / 2.0, "{faster} ms at 80 Mbit/s vs {took} ms at 8");
    }

    #[tokio::test]
    async fn refuses_a_link_without_bandwidth() {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let e = LinkShaper::start(addr, LinkProfile { mbit_s: 0.0, one_way_delay_ms: 1.0 }).await.err();
        assert!(matches!(e, Some(LinkError::Bandwidth(_))), "{e:?}");
    }

    #[tokio::test]
    async fn a_cut_link_drops_its_connections_and_a_restored_one_carries_again() {
        let link =
            LinkShaper::start(echo().await, LinkProfile { mbit_s: 1000.0, one_way_delay_ms: 0.0 }).await.expect("link");
        let mut open = TcpStream::connect(link.addr()).await.expect("connect");
        open.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        open.read_exact(&mut got).await.expect("echo");
        link.cut(true);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the open connection ends: {read:?}");
        let mut new = TcpStream::connect(link.addr()).await.expect("accepted, then closed");
        let _ = new.write_all(b"ping").await;
        let read = tokio::time::timeout(Duration::from_secs(5), new.read(&mut got)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a new one is closed: {read:?}");
        link.cut(false);
        assert!(round_trip(link.addr(), 1000).await < Duration::from_secs(5), "carries again");
    }
}
