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
use crate::tensor::{DType, Tensor, TensorError, Term};

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
    pending: Vec<Term>,
    /// The tensor is zeros not written yet (its buffer holds leftovers): the first settle writes
    /// the deferred sum over it, so a new accumulator costs no separate pass to zero it.
    unfilled: bool,
}

impl From<Tensor> for TensorSlot {
    fn from(tensor: Tensor) -> TensorSlot {
        TensorSlot::new(tensor, 0)
    }
}

/// Most `axpy` calls one accumulator defers.
pub const MAX_PENDING: usize = 16;
/// Deferred calls are applied once the inputs that only they keep alive (updates a fold read and
/// let go of) take as many bytes as the accumulator, or this many for a smaller one: a cloud folding
/// 10M-parameter updates from disk held up to 512 MiB of them before (a dozen updates), while a
/// fold over inputs held elsewhere anyway still takes 16 in one pass.
pub const MIN_PENDING_BYTES: usize = 64 << 20;

impl TensorSlot {
    pub fn new(tensor: Tensor, charged: usize) -> TensorSlot {
        TensorSlot { tensor, charged, pending: Vec::new(), unfilled: false }
    }

    /// A slot for zeros of `dtype` and `shape`, written when first settled.
    pub fn zeros(dtype: DType, shape: Vec<u64>) -> Result<TensorSlot, TensorError> {
        Ok(TensorSlot { tensor: Tensor::unfilled(dtype, shape)?, charged: 0, pending: Vec::new(), unfilled: true })
    }

    /// Applies the deferred `axpy` calls, in the order they were made (writes the zeros first
    /// if the tensor is unfilled).
    pub fn settle(&mut self) -> Result<(), TensorError> {
        let terms = std::mem::take(&mut self.pending);
        if std::mem::take(&mut self.unfilled) {
            return self.tensor.assign_many(&terms);
        }
        if terms.is_empty() {
            return Ok(());
        }
        self.tensor.axpy_many(&terms)
    }

    /// `alpha` times this tensor as a term of another's `axpy`. While this one is an f64
    /// accumulator of deferred terms only, the term is those terms: a mean computed from a sum
    /// then reads the inputs once and the sum is never written (the sum's own value is still
    /// computed if it is read later). Otherwise this tensor, settled.
    pub fn as_term(&mut self, alpha: f64) -> Result<Term, TensorError> {
        if self.unfilled && self.tensor.dtype() == DType::F64 && !self.pending.is_empty() {
            let inner: Option<Vec<(f64, Tensor)>> = self
                .pending
                .iter()
                .map(|t| match t {
                    Term::Scaled(b, y) => Some((*b, y.clone())),
                    Term::ScaledSum(..) => None,
                })
                .collect();
            if let Some(inner) = inner {
                return Ok(Term::ScaledSum(alpha, inner));
            }
        }
        self.settle()?;
        Ok(Term::Scaled(alpha, self.tensor.clone()))
    }

    /// Defers self += term (checked now, so errors come from this call); applies the deferred
    /// calls once there are too many or they alone keep too many bytes alive.
    pub fn defer(&mut self, term: Term) -> Result<(), TensorError> {
        self.tensor.check_term(&term)?;
        self.pending.push(term);
        let alive: usize = self.pending.iter().map(Term::bytes_kept_alive).sum();
        let count: usize = self
            .pending
            .iter()
            .map(|t| match t {
                Term::Scaled(..) => 1,
                Term::ScaledSum(_, ys) => ys.len(),
            })
            .sum();
        if count >= MAX_PENDING || alive >= MIN_PENDING_BYTES.max(self.tensor.byte_len()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mean_taken_from_a_deferred_sum_equals_the_mean_of_the_stored_sum() {
        let n = 50_000usize;
        let x = |k: usize| {
            Tensor::from_f32(vec![n as u64], (0..n).map(|i| ((i * 13 + k * 101) % 89) as f32 * 0.7 - 30.0).collect())
                .expect("x")
        };
        let weights = [3.0, 10.0, 7.0];
        // As computed one call at a time.
        let mut sum = Tensor::zeros(DType::F64, vec![n as u64]).expect("zeros");
        for (k, w) in weights.iter().enumerate() {
            sum.axpy(*w, &x(k)).expect("axpy");
        }
        let mut expected = Tensor::zeros(DType::F32, vec![n as u64]).expect("zeros");
        expected.axpy(0.05, &sum).expect("axpy");

        let deferred_sum = || {
            let mut slot = TensorSlot::zeros(DType::F64, vec![n as u64]).expect("slot");
            for (k, w) in weights.iter().enumerate() {
                slot.defer(Term::Scaled(*w, x(k))).expect("defer");
            }
            slot
        };
        // The sum never written (dropped), or read afterwards: the same mean either way.
        for read_the_sum_after in [false, true] {
            let mut sum_slot = deferred_sum();
            let mut mean = TensorSlot::zeros(DType::F32, vec![n as u64]).expect("slot");
            let term = sum_slot.as_term(0.05).expect("term");
            assert!(matches!(term, Term::ScaledSum(..)), "a deferred sum is taken as its terms");
            mean.defer(term).expect("defer");
            if read_the_sum_after {
                sum_slot.settle().expect("settle");
                assert_eq!(sum_slot.tensor, sum);
            }
            drop(sum_slot);
            mean.settle().expect("settle");
            assert_eq!(mean.tensor, expected);
        }
        // An f32 accumulator rounds at every step: it is settled and taken as it is.
        let mut f32_sum = TensorSlot::zeros(DType::F32, vec![n as u64]).expect("slot");
        f32_sum.defer(Term::Scaled(1.0, x(0))).expect("defer");
        assert!(matches!(f32_sum.as_term(1.0).expect("term"), Term::Scaled(..)));
        // A new slot read before anything is added to it is zeros, though its buffer may be a
        // kept one full of NaN (large buffers are kept when dropped).
        let big = (8 << 20) / 8;
        drop(Tensor::from_f64(vec![big as u64], vec![f64::NAN; big]).expect("garbage"));
        let mut fresh = TensorSlot::zeros(DType::F64, vec![big as u64]).expect("slot");
        fresh.settle().expect("settle");
        assert_eq!(fresh.tensor, Tensor::zeros(DType::F64, vec![big as u64]).expect("zeros"));
    }

    #[test]
    fn deferred_calls_keep_alive_at_most_the_accumulators_bytes_of_inputs_let_go_of() {
        // 32 MiB inputs into a 64 MiB accumulator (f64 of 8M elements): inputs nobody else holds
        // (a fold's updates read from disk) are applied two at a time; inputs held elsewhere too
        // cost nothing to defer and wait for the count limit. The sums are the same either way.
        let n = 8 << 20;
        let x = |k: usize| Tensor::from_f32(vec![n as u64], vec![k as f32 + 0.25; n]).expect("x");
        let mut let_go = TensorSlot::zeros(DType::F64, vec![n as u64]).expect("slot");
        let mut pending = Vec::new();
        for k in 0..5 {
            let_go.defer(Term::Scaled(1.5, x(k))).expect("defer");
            pending.push(let_go.pending.len());
        }
        assert_eq!(pending, [1, 0, 1, 0, 1], "settled once two 32 MiB inputs were only its own");
        let held: Vec<Tensor> = (0..5).map(x).collect();
        let mut kept = TensorSlot::zeros(DType::F64, vec![n as u64]).expect("slot");
        for t in &held {
            kept.defer(Term::Scaled(1.5, t.clone())).expect("defer");
        }
        assert_eq!(kept.pending.len(), 5, "nothing settled: the inputs are held anyway");
        let_go.settle().expect("settle");
        kept.settle().expect("settle");
        assert_eq!(let_go.tensor, kept.tensor);
        assert_eq!(let_go.tensor.read(0, 1, 1).expect("read"), vec![1.5 * (0.25 + 1.25 + 2.25 + 3.25 + 4.25)]);
    }
}
