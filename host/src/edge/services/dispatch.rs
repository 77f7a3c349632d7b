//! Admission and batching of one service's requests: `instances` worker threads each run one
//! batch at a time (with their own plugin instance and model session), at most `queue`
//! requests wait, and a request past that is refused at once (503 with Retry-After) instead of
//! parking a thread. A worker takes the oldest waiting request and, besides it, the waiting
//! requests whose inputs can be stacked with it, up to `batch_max`, and runs them as one call.
//! Workers go from one batch to the next without a trip through the async runtime, so an
//! instance does not sit idle between requests while others wait.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::anyhow;
use tokio::sync::oneshot;

use super::super::error::Overloaded;
use crate::lock;
use crate::runtime::TensorData;

/// Runs a batch of requests: one answer per request, in order.
pub(super) type Work<I, O> = dyn Fn(Vec<I>) -> Vec<anyhow::Result<O>> + Send + Sync;

struct Waiting<I, O> {
    inputs: I,
    reply: oneshot::Sender<anyhow::Result<O>>,
}

struct Queue<I, O> {
    waiting: VecDeque<Waiting<I, O>>,
    closed: bool,
}

struct Shared<I, O> {
    service: String,
    queue: Mutex<Queue<I, O>>,
    ready: Condvar,
    bound: usize,
    batch_max: usize,
    /// Whether two requests may run in one batch.
    stackable: fn(&I, &I) -> bool,
    work: Arc<Work<I, O>>,
    /// Batches started (model calls, when each request is one).
    batches: AtomicU64,
}

pub(super) struct Dispatcher<I, O> {
    shared: Arc<Shared<I, O>>,
}

/// Whether two requests' inputs stack along the first axis: the same names, types and shapes
/// but for the first dimension.
#[allow(clippy::ptr_arg)] // the dispatcher compares its requests' input type as it is
pub(super) fn stackable(a: &Vec<TensorData>, b: &Vec<TensorData>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.dtype == y.dtype
                && x.shape.len() == y.shape.len()
                && !x.shape.is_empty()
                && x.shape[1..] == y.shape[1..]
        })
}

impl<I: Send + 'static, O: Send + 'static> Dispatcher<I, O> {
    /// Starts `instances` workers for `service`.
    pub(super) fn new(
        service: &str,
        (instances, queue, batch_max): (usize, usize, usize),
        stackable: fn(&I, &I) -> bool,
        work: Arc<Work<I, O>>,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            service: service.to_string(),
            queue: Mutex::new(Queue { waiting: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
            bound: queue,
            batch_max: batch_max.max(1),
            stackable,
            work,
            batches: AtomicU64::new(0),
        });
        for k in 0..instances.max(1) {
            let worker = shared.clone();
            std::thread::Builder::new()
                .name(format!("infer-{service}-{k}"))
                .spawn(move || worker.serve())
                .map_err(|e| anyhow!("service `{service}`: starting worker {k}: {e}"))?;
        }
        Ok(Dispatcher { shared })
    }

    /// Batches started so far.
    pub(super) fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Requests waiting for a worker right now.
    pub(super) fn waiting(&self) -> usize {
        lock(&self.shared.queue).waiting.len()
    }

    /// Answers one request's inputs, in a batch with others if they stack.
    pub(super) async fn submit(&self, inputs: I) -> anyhow::Result<O> {
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = lock(&self.shared.queue);
            if queue.waiting.len() >= self.shared.bound {
                return Err(Overloaded { service: self.shared.service.clone(), queue: self.shared.bound }.into());
            }
            queue.waiting.push_back(Waiting { inputs, reply });
        }
        self.shared.ready.notify_one();
        answer
            .await
            .map_err(|_| anyhow!("service `{}`: the request's batch ended without an answer", self.shared.service))?
    }
}

impl<I, O> Drop for Dispatcher<I, O> {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
    }
}

impl<I, O> Shared<I, O> {
    /// One worker: the next batch, until the service is dropped.
    fn serve(&self) {
        loop {
            let batch = {
                let mut queue = lock(&self.queue);
                loop {
                    if queue.closed {
                        return;
                    }
                    let batch = self.take_batch(&mut queue.waiting);
                    if !batch.is_empty() {
                        break batch;
                    }
                    queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.batches.fetch_add(1, Ordering::Relaxed);
            let (inputs, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|w| (w.inputs, w.reply)).unzip();
            let count = replies.len();
            // A panic in the host's own code fails this batch's requests, not the worker.
            let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.work)(inputs)));
            match answers {
                Ok(answers) if answers.len() == count => {
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
                Ok(answers) => {
                    for reply in replies {
                        let _ = reply.send(Err(anyhow!(
                            "service `{}`: a batch of {count} requests got {} answers",
                            self.service,
                            answers.len()
                        )));
                    }
                }
                Err(_) => {
                    for reply in replies {
                        let _ = reply.send(Err(anyhow!("service `{}`: the batch's worker panicked", self.service)));
                    }
                }
            }
        }
    }

    /// The oldest waiting requests that stack, up to `batch_max` (requests whose caller left are
    /// dropped unanswered).
    fn take_batch(&self, waiting: &mut VecDeque<Waiting<I, O>>) -> Vec<Waiting<I, O>> {
        let mut batch: Vec<Waiting<I, O>> = Vec::new();
        while batch.len() < self.batch_max {
            let Some(next) = waiting.front() else { break };
            if next.reply.is_closed() {
                waiting.pop_front();
                continue;
            }
            if let Some(first) = batch.first() {
                if !(self.stackable)(&first.inputs, &next.inputs) {
                    break;
                }
            }
            batch.extend(waiting.pop_front());
        }
        batch
    }
}

/// Plugin instances of one kind, each used by one batch at a time. An instance is made when
/// none is idle; `fresh_since` discards idle ones made before a given generation of the node's
/// models (they would not see a model registered since).
pub(super) struct Instances<P> {
    idle: Mutex<Vec<(u64, P)>>,
}

impl<P> Default for Instances<P> {
    fn default() -> Self {
        Instances { idle: Mutex::new(Vec::new()) }
    }
}

impl<P> Instances<P> {
    /// An idle instance made at `fresh_since` or later, else a new one from `make` (given the
    /// current generation, read before it makes the instance).
    pub(super) fn take(
        &self,
        fresh_since: u64,
        current: u64,
        make: impl FnOnce() -> anyhow::Result<P>,
    ) -> anyhow::Result<(u64, P)> {
        let mut idle = lock(&self.idle);
        idle.retain(|(g, _)| *g >= fresh_since);
        match idle.pop() {
            Some(found) => Ok(found),
            None => {
                drop(idle);
                Ok((current, make()?))
            }
        }
    }

    pub(super) fn put(&self, generation: u64, instance: P) {
        lock(&self.idle).push((generation, instance));
    }
}
