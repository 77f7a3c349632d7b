//! What a plugin's store holds: its sandboxed WASI context, its resources, and the meters that
//! enforce its memory and tensor limits.
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::round_updates::RoundUpdates;
use crate::tensor::Tensor;

/// Most keys a plugin's strategy state holds, and the longest key.
pub const MAX_STATE_KEYS: usize = 4096;
pub const MAX_STATE_KEY_BYTES: usize = 256;

/// An aggregator's strategy state during a round: what the last committed round left, and the
/// changes this round made (`None`: removed), applied when the round's model is committed.
#[derive(Debug, Default, Clone)]
pub struct StrategyState {
    pub committed: Arc<std::collections::BTreeMap<String, Tensor>>,
    pub staged: std::collections::BTreeMap<String, Option<Tensor>>,
}

impl StrategyState {
    /// How many keys the state holds with this round's changes applied.
    pub fn key_count(&self) -> usize {
        let added = self.staged.iter().filter(|(k, v)| v.is_some() && !self.committed.contains_key(*k)).count();
        let removed = self.staged.iter().filter(|(k, v)| v.is_none() && self.committed.contains_key(*k)).count();
        self.committed.len() + added - removed
    }

    /// The state after this round: the committed values with this round's changes applied.
    pub fn merged(&self) -> std::collections::BTreeMap<String, Tensor> {
        let mut state = (*self.committed).clone();
        for (key, value) in &self.staged {
            match value {
                Some(t) => state.insert(key.clone(), t.clone()),
                None => state.remove(key),
            };
        }
        state
    }
}

/// A tensor in a plugin's resource table, with the bytes it was charged against the plugin's
/// tensor budget (zero for tensors the host handed in), and the `axpy` calls on it not applied
/// yet: a fold's accumulator takes several updates in one pass over its memory (see
/// [`Tensor::axpy_many`]), applied before anything reads or changes it otherwise.
pub struct TensorSlot {
    pub tensor: Tensor,
    pub charged: usize,
    pub pending: Vec<(f64, Tensor)>,
}

/// Most `axpy` calls one accumulator defers, and most bytes of inputs they may keep alive.
pub const MAX_PENDING: usize = 16;
pub const MAX_PENDING_BYTES: usize = 512 << 20;

impl TensorSlot {
    pub fn new(tensor: Tensor, charged: usize) -> TensorSlot {
        TensorSlot { tensor, charged, pending: Vec::new() }
    }

    /// Applies the deferred `axpy` calls, in the order they were made.
    pub fn settle(&mut self) -> Result<(), crate::tensor::TensorError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let terms = std::mem::take(&mut self.pending);
        self.tensor.axpy_many(&terms)
    }

    /// Defers self += alpha * x (checked now, so errors come from this call); applies the
    /// deferred calls once they hold too many inputs.
    pub fn defer_axpy(&mut self, alpha: f64, x: Tensor) -> Result<(), crate::tensor::TensorError> {
        self.tensor.check_axpy(&x)?;
        self.pending.push((alpha, x));
        let bytes: usize = self.pending.iter().map(|(_, t)| t.byte_len()).sum();
        if self.pending.len() >= MAX_PENDING || bytes >= MAX_PENDING_BYTES {
            self.settle()?;
        }
        Ok(())
    }
}

/// Marker error raised when a plugin's linear memory would grow past its limit.
#[derive(Debug, thiserror::Error)]
#[error("linear memory would grow to {desired} bytes, past the limit of {limit}")]
pub struct MemoryLimitHit {
    pub desired: usize,
    pub limit: usize,
}

pub struct MemoryLimiter {
    pub limit: usize,
    pub hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Err(wasmtime::Error::new(MemoryLimitHit { desired, limit: self.limit }));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// The last bytes a plugin wrote to stderr (a panic message, say), for error reports.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

const STDERR_TAIL: usize = 4096;

impl StderrTail {
    fn push(&self, bytes: &[u8]) {
        if let Ok(mut tail) = self.0.lock() {
            tail.extend(bytes);
            let excess = tail.len().saturating_sub(STDERR_TAIL);
            tail.drain(..excess);
        }
    }

    /// Takes what was written since the last call.
    pub fn take(&self) -> String {
        match self.0.lock() {
            Ok(mut tail) => {
                let bytes: Vec<u8> = tail.drain(..).collect();
                String::from_utf8_lossy(&bytes).trim().to_string()
            }
            Err(_) => String::new(),
        }
    }
}

#[async_trait::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Plugin instances (stores) alive in this process: a swapped-out plugin must not linger.
static LIVE_INSTANCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many plugin instances are alive in this process now.
pub fn live_instances() -> usize {
    LIVE_INSTANCES.load(std::sync::atomic::Ordering::Relaxed)
}

impl Drop for PluginState {
    fn drop(&mut self) {
        LIVE_INSTANCES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The data of one plugin instance's store.
pub struct PluginState {
    pub plugin: Arc<str>,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub memory: MemoryLimiter,
    pub tensor_bytes: usize,
    pub tensor_limit: usize,
    pub stderr: StderrTail,
    /// wasi-nn: the inference backends and the node's models.
    pub nn: wasmtime_wasi_nn::wit::WasiNnCtx,
    /// Aggregators: the strategy state this round reads and writes.
    pub strategy: StrategyState,
    /// Aggregators: the updates this round accepted so far.
    pub round: RoundUpdates,
}

impl PluginState {
    /// A sandbox with no ambient authority: no preopened directories, no environment, no
    /// arguments, no network, no stdin; stdout is discarded, stderr kept for error reports.
    pub fn new(
        plugin: Arc<str>,
        memory_limit: usize,
        tensor_limit: usize,
        nn: wasmtime_wasi_nn::wit::WasiNnCtx,
    ) -> Self {
        LIVE_INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = StderrTail::default();
        let wasi = WasiCtx::builder()
            .stdout(std::io::empty())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        PluginState {
            plugin,
            wasi,
            table: ResourceTable::new(),
            memory: MemoryLimiter { limit: memory_limit, hit: false },
            tensor_bytes: 0,
            tensor_limit,
            stderr,
            nn,
            strategy: StrategyState::default(),
            round: RoundUpdates::default(),
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}
