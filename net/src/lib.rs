//! nereid-net: how nereid's servers (the cloud, the edge API, the embedded registry) take
//! connections from callers they do not trust.
//!
//! [`serve`] accepts HTTP/1.1 connections for an axum router with:
//! - a bounded number of connections, in all and per peer address (past either, the
//!   connection gets a `503` and is closed before anything is parsed);
//! - a time limit on a request's headers, which is also how long an idle keep-alive connection
//!   stays open;
//! - time limits on every request body: one without a byte arriving, one for the whole body.
//!   They start when the handler first reads the body (time spent waiting for, say, an upload
//!   slot does not count). A handler sees a stalled body as a read error carrying
//!   [`BodyTimeout`] (see [`body_timeout`]);
//! - TLS when given an acceptor ([`tls`]), its handshake bounded by the header time limit; a
//!   client certificate the handshake verified reaches handlers as [`tls::PeerCertificate`].
pub mod pki;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The limits a server puts on its callers: `[http]` in cloud.toml and edge.toml, flags of
/// `nereid registry serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection is kept.
    pub header_timeout_secs: f64,
    /// Seconds a request body may go without a byte arriving.
    pub body_idle_secs: f64,
    /// Seconds a whole request body may take.
    pub body_timeout_secs: f64,
    /// Connections open at once, from everyone.
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub max_connections_per_peer: usize,
    /// Seconds requests in flight may take to finish once the server begins to shut down
    /// (SIGTERM); idle connections are closed at once.
    pub shutdown_grace_secs: f64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_timeout_secs: 30.0,
            body_idle_secs: 30.0,
            body_timeout_secs: 600.0,
            max_connections: 16_384,
            max_connections_per_peer: 512,
            shutdown_grace_secs: 10.0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LimitsError {
    #[error("`{0}` must be a positive number of seconds")]
    Seconds(&'static str),
    #[error("`{0}` must be at least 1")]
    Count(&'static str),
    #[error("`max_connections_per_peer` ({per_peer}) cannot exceed `max_connections` ({total})")]
    PerPeer { per_peer: usize, total: usize },
}

impl ServerLimits {
    /// Checks the values; the error names the key at fault.
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (key, v) in [
            ("header_timeout_secs", self.header_timeout_secs),
            ("body_idle_secs", self.body_idle_secs),
            ("body_timeout_secs", self.body_timeout_secs),
            ("shutdown_grace_secs", self.shutdown_grace_secs),
        ] {
            // A day at most: beyond that a value is a mistake, and Duration would overflow far later.
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                return Err(LimitsError::Seconds(key));
            }
        }
        if self.max_connections == 0 {
            return Err(LimitsError::Count("max_connections"));
        }
        if self.max_connections_per_peer == 0 {
            return Err(LimitsError::Count("max_connections_per_peer"));
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err(LimitsError::PerPeer { per_peer: self.max_connections_per_peer, total: self.max_connections });
        }
        Ok(())
    }

    fn secs(v: f64) -> Duration {
        Duration::from_secs_f64(v.clamp(0.001, 86_400.0))
    }

    pub fn header_timeout(&self) -> Duration {
        Self::secs(self.header_timeout_secs)
    }

    pub fn body_idle(&self) -> Duration {
        Self::secs(self.body_idle_secs)
    }

    pub fn body_total(&self) -> Duration {
        Self::secs(self.body_timeout_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Self::secs(self.shutdown_grace_secs)
    }
}

/// Whether a server takes new work: set when it starts accepting, cleared the moment it begins
/// to shut down. A host answers its readiness probe from it (liveness is another matter: a
/// server that drains is alive but not ready).
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<std::sync::atomic::AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The readiness probe's answer: 200 while the server takes new work, 503 once it drains.
    pub fn status(&self) -> axum::http::StatusCode {
        if self.is_ready() {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    }

    fn set(&self, ready: bool) {
        self.0.store(ready, std::sync::atomic::Ordering::Release);
    }
}

/// Completes when the process is asked to stop: SIGTERM (what Kubernetes and systemd send) or
/// SIGINT (Ctrl-C).
pub async fn terminated() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("SIGTERM cannot be caught ({e}): only Ctrl-C stops the server gracefully");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// A request body that stalled or took too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyTimeout {
    #[error("the request body stalled: no data for {0:?}")]
    Idle(Duration),
    #[error("the request body took longer than {0:?}")]
    Total(Duration),
}

/// The [`BodyTimeout`] behind an error from reading a request body, if that is what it is.
pub fn body_timeout<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyTimeout> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(t) = err.downcast_ref::<BodyTimeout>() {
            return Some(t);
        }
        next = err.source();
    }
    None
}

pin_project_lite::pin_project! {
    /// A body with an idle and a total time limit, both started by the first read.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        idle_after: Duration,
        total_after: Duration,
        idle: Option<Pin<Box<Sleep>>>,
        total: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> TimeoutBody<B> {
    pub fn new(inner: B, idle_after: Duration, total_after: Duration) -> TimeoutBody<B> {
        TimeoutBody { inner, idle_after, total_after, idle: None, total: None }
    }
}

impl<B> http_body::Body for TimeoutBody<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, BoxError>>> {
        let this = self.project();
        let now = Instant::now();
        let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(now + *this.idle_after)));
        let total = this.total.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(now + *this.total_after)));
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if frame.is_some() {
                idle.as_mut().reset(now + *this.idle_after);
            }
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if total.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout::Total(*this.total_after)))));
        }
        if idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout::Idle(*this.idle_after)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Open connections, in all and per peer address.
#[derive(Default)]
struct Peers {
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
struct Admitted {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ServerLimits) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let from_peer = open.1.get(&ip).copied().unwrap_or(0);
        if open.0 >= limits.max_connections || from_peer >= limits.max_connections_per_peer {
            return None;
        }
        open.0 += 1;
        open.1.insert(ip, from_peer + 1);
        Some(Admitted { peers: self.clone(), ip })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

const REFUSED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n";

/// Serves `router` on `listener` with `limits` (over TLS with `tls`) until the process ends (or
/// the listener fails for good). Requests carry the peer's address as
/// [`ConnectInfo<SocketAddr>`].
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    serve_until(listener, router, limits, tls, &Readiness::default(), std::future::pending()).await
}

/// As [`serve`], until `stop` completes: then `ready` is cleared, no connection is accepted any
/// more, idle connections are closed, and requests in flight get `shutdown_grace_secs` to
/// finish before this returns (the connections still open then are dropped).
pub async fn serve_until(
    listener: TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ready: &Readiness,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let peers = Arc::new(Peers::default());
    let (idle, total, header) = (limits.body_idle(), limits.body_total(), limits.header_timeout());
    let (closing, _) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    ready.set(true);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => break,
        };
        let (tcp, addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait for connections to close.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admitted) = peers.admit(addr.ip(), &limits) else {
            tracing::debug!(peer = %addr, "connection refused: too many open");
            let _ = tcp.try_write(REFUSED);
            continue;
        };
        // Small responses written in two parts would otherwise wait out the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        let router = router.clone();
        let tls = tls.clone();
        let closing = closing.subscribe();
        tokio::spawn(async move {
            let _admitted = admitted;
            let timeouts = (idle, total, header);
            let Some(acceptor) = tls else {
                serve_connection(tcp, router, addr, None, timeouts, closing).await;
                return;
            };
            // The handshake counts as the request's headers: a peer that stalls it is dropped.
            let stream = match tokio::time::timeout(header, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::info!(peer = %addr, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "TLS handshake not finished in time");
                    return;
                }
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| tls::PeerCertificate::from_der(cert));
            serve_connection(stream, router, addr, peer, timeouts, closing).await;
        });
    }
    ready.set(false);
    drop(listener);
    let _ = closing.send(true);
    let deadline = Instant::now() + limits.shutdown_grace();
    while peers.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if peers.open() > 0 {
        tracing::warn!("{} connections still open after {:?}: dropped", peers.open(), limits.shutdown_grace());
    }
    Ok(())
}

/// Serves HTTP/1.1 requests on one connection (plain or TLS).
async fn serve_connection<IO>(
    io: IO,
    router: axum::Router,
    addr: std::net::SocketAddr,
    peer: Option<tls::PeerCertificate>,
    (idle, total, header): (Duration, Duration, Duration),
    mut closing: tokio::sync::watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = router.into_service::<Body>().map_request(move |req: axum::http::Request<Incoming>| {
        let mut req = req.map(|b| Body::new(TimeoutBody::new(b, idle, total)));
        req.extensions_mut().insert(ConnectInfo(addr));
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let closed = async move {
        while !*closing.borrow_and_update() {
            if closing.changed().await.is_err() {
                // The server is gone without closing: nothing to wait for.
                std::future::pending::<()>().await;
            }
        }
    };
    let served = tokio::select! {
        r = conn.as_mut() => r,
        () = closed => {
            // Finishes the request in flight, if any, then closes; an idle connection closes now.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(peer = %addr, "connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_len(body: axum::body::Bytes) -> String {
        body.len().to_string()
    }

    async fn server(limits: ServerLimits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = axum::Router::new().route("/", post(echo_len));
        tokio::spawn(serve(listener, router, limits, None));
        addr
    }

    fn quick() -> ServerLimits {
        ServerLimits {
            header_timeout_secs: 0.3,
            body_idle_secs: 0.3,
            body_timeout_secs: 1.0,
            max_connections: 4,
            max_connections_per_peer: 2,
            shutdown_grace_secs: 1.0,
        }
    }

    /// Reads what the server sends until it closes the connection (or 5 s pass).
    async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> (String, bool) {
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await.is_ok();
        (String::from_utf8_lossy(&out).into_owned(), closed)
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_dropped() {
        let addr = server(quick()).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        let (_, closed) = read_to_close(&mut tcp).await;
        assert!(closed, "the connection is closed after the header timeout");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let addr = server(quick()).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await.expect("write");
        let (text, closed) = read_to_close(&mut tcp).await;
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with('3'), "{text}");
        assert!(closed, "closed once idle");
    }

    #[tokio::test]
    async fn a_stalled_body_fails_the_request_and_a_trickling_one_hits_the_total_limit() {
        let addr = server(quick()).await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").await.expect("write");
        let (text, closed) = read_to_close(&mut tcp).await;
        assert!(text.contains("stalled"), "{text}");
        assert!(closed);

        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n").await.expect("write");
        let trickle = async {
            for _ in 0..100 {
                if tcp.write_all(b"a").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), trickle).await;
        let (text, _) = read_to_close(&mut tcp).await;
        assert!(text.contains("longer than"), "{text}");
    }

    #[tokio::test]
    async fn connections_past_the_per_peer_bound_are_refused_and_places_come_back() {
        let addr = server(ServerLimits { header_timeout_secs: 5.0, ..quick() }).await;
        let a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let b = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (text, closed) = read_to_close(&mut c).await;
        assert!(text.starts_with("HTTP/1.1 503") && closed, "{text}");
        drop((a, b));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // (This crate's reqwest has rustls without a default provider: the client brings its own.)
        let client = tls::ClientTls::default().http_client().expect("client").build().expect("client");
        let resp = client.post(format!("http://{addr}/")).body("four").send().await.expect("send");
        assert_eq!(resp.text().await.expect("body"), "4");
    }

    #[tokio::test]
    async fn a_stop_lets_the_request_in_flight_finish_and_refuses_new_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            "done"
        };
        let router = axum::Router::new().route("/", axum::routing::get(slow));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ready = Readiness::default();
        let server = {
            let ready = ready.clone();
            tokio::spawn(async move {
                serve_until(listener, router, quick(), None, &ready, async {
                    let _ = stopped.await;
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(ready.is_ready());
        let client = tls::ClientTls::default().http_client().expect("client").build().expect("client");
        let in_flight = tokio::spawn({
            let client = client.clone();
            async move { client.get(format!("http://{addr}/")).send().await?.text().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!ready.is_ready(), "not ready once stopping");
        assert!(client.get(format!("http://{addr}/")).send().await.is_err(), "no new connection");
        assert_eq!(in_flight.await.expect("join").expect("the request in flight finishes"), "done");
        server.await.expect("join").expect("served");
    }

    #[test]
    fn limits_are_checked_by_key() {
        assert_eq!(ServerLimits::default().validate(), Ok(()));
        let bad = ServerLimits { body_idle_secs: f64::NAN, ..ServerLimits::default() };
        assert_eq!(bad.validate(), Err(LimitsError::Seconds("body_idle_secs")));
        let bad = ServerLimits { max_connections_per_peer: 0, ..ServerLimits::default() };
        assert_eq!(bad.validate(), Err(LimitsError::Count("max_connections_per_peer")));
    }
}
