//! The host functions plugins import: tensor operations and logging.
use wasmtime::component::Resource;

use super::bindings::nereid::plugin::{host, model, round_updates, strategy_state, tensors, types};
use super::state::{PluginState, TensorSlot, MAX_STATE_KEYS, MAX_STATE_KEY_BYTES};
use crate::tensor::{self, DType, Tensor};

/// Elements one chunk read or write moves at most (4 MiB of f32).
pub const MAX_CHUNK: u32 = 1 << 20;

impl From<types::Dtype> for DType {
    fn from(d: types::Dtype) -> Self {
        match d {
            types::Dtype::F32 => DType::F32,
            types::Dtype::F64 => DType::F64,
            types::Dtype::I32 => DType::I32,
            types::Dtype::I64 => DType::I64,
            types::Dtype::U8 => DType::U8,
            types::Dtype::I8 => DType::I8,
        }
    }
}

impl From<DType> for types::Dtype {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => types::Dtype::F32,
            DType::F64 => types::Dtype::F64,
            DType::I32 => types::Dtype::I32,
            DType::I64 => types::Dtype::I64,
            DType::U8 => types::Dtype::U8,
            DType::I8 => types::Dtype::I8,
        }
    }
}

impl From<tensor::TensorError> for tensors::TensorError {
    fn from(e: tensor::TensorError) -> Self {
        match e {
            tensor::TensorError::DtypeMismatch(m) => tensors::TensorError::DtypeMismatch(m),
            tensor::TensorError::ShapeMismatch(m) => tensors::TensorError::ShapeMismatch(m),
            tensor::TensorError::OutOfBounds(m) => tensors::TensorError::OutOfBounds(m),
            tensor::TensorError::Unsupported(m) => tensors::TensorError::Unsupported(m),
            tensor::TensorError::OutOfMemory(m) => tensors::TensorError::OutOfMemory(m),
        }
    }
}

type TensorResult<T> = Result<T, tensors::TensorError>;

impl PluginState {
    /// Puts a tensor the host hands in (not charged to the plugin's budget).
    pub fn lend(&mut self, tensor: Tensor) -> wasmtime::Result<Resource<TensorSlot>> {
        Ok(self.table.push(TensorSlot::new(tensor, 0))?)
    }

    /// Takes a tensor the plugin hands back, releasing its charge.
    pub fn take(&mut self, handle: Resource<TensorSlot>) -> wasmtime::Result<Tensor> {
        let mut slot = self.table.delete(handle)?;
        self.tensor_bytes = self.tensor_bytes.saturating_sub(slot.charged);
        // Checked when deferred: applying them cannot fail.
        slot.settle().map_err(wasmtime::Error::msg)?;
        Ok(slot.tensor)
    }

    /// Puts a tensor the plugin created, charging it to the plugin's tensor budget.
    fn create(&mut self, tensor: impl Into<TensorSlot>) -> wasmtime::Result<TensorResult<Resource<TensorSlot>>> {
        let mut slot = tensor.into();
        let bytes = slot.tensor.byte_len();
        if self.tensor_bytes.saturating_add(bytes) > self.tensor_limit {
            return Ok(Err(tensors::TensorError::OutOfMemory(format!(
                "{bytes} more bytes of tensors would pass the plugin's tensor limit of {} ({} in use)",
                self.tensor_limit, self.tensor_bytes
            ))));
        }
        self.tensor_bytes += bytes;
        slot.charged = bytes;
        Ok(Ok(self.table.push(slot)?))
    }

    /// The tensor behind `handle`, with its deferred `axpy` calls applied.
    fn get(&mut self, handle: &Resource<TensorSlot>) -> wasmtime::Result<&mut Tensor> {
        let slot = self.table.get_mut(handle)?;
        slot.settle().map_err(wasmtime::Error::msg)?;
        Ok(&mut slot.tensor)
    }

    /// The tensor behind `handle` for its type and shape only: its deferred calls, which change
    /// neither, stay deferred.
    fn peek(&self, handle: &Resource<TensorSlot>) -> wasmtime::Result<&Tensor> {
        Ok(&self.table.get(handle)?.tensor)
    }

    /// Runs `op` on the tensor behind `this` with a cheap (copy-on-write) copy of `other`.
    fn binary<T>(
        &mut self,
        this: &Resource<TensorSlot>,
        other: &Resource<TensorSlot>,
        op: impl FnOnce(&mut Tensor, &Tensor) -> Result<T, tensor::TensorError>,
    ) -> wasmtime::Result<TensorResult<T>> {
        let other = self.get(other)?.clone();
        let this = self.get(this)?;
        Ok(op(this, &other).map_err(Into::into))
    }

    fn unary<T>(
        &mut self,
        this: &Resource<TensorSlot>,
        op: impl FnOnce(&mut Tensor) -> Result<T, tensor::TensorError>,
    ) -> wasmtime::Result<TensorResult<T>> {
        let this = self.get(this)?;
        Ok(op(this).map_err(Into::into))
    }
}

impl types::Host for PluginState {}
impl model::Host for PluginState {}

impl tensors::Host for PluginState {
    fn max_chunk(&mut self) -> wasmtime::Result<u32> {
        Ok(MAX_CHUNK)
    }
}

impl tensors::HostTensor for PluginState {
    fn zeros(&mut self, dtype: types::Dtype, shape: Vec<u64>) -> wasmtime::Result<TensorResult<Resource<TensorSlot>>> {
        let bytes = tensor::numel(&shape).and_then(|n| n.checked_mul(DType::from(dtype).size() as u64));
        match bytes {
            Some(b) if b <= self.tensor_limit.saturating_sub(self.tensor_bytes) as u64 => {}
            _ => {
                return Ok(Err(tensors::TensorError::OutOfMemory(format!(
                    "a {shape:?} tensor would pass the plugin's tensor limit of {} bytes",
                    self.tensor_limit
                ))))
            }
        }
        match TensorSlot::zeros(dtype.into(), shape) {
            Ok(slot) => self.create(slot),
            Err(e) => Ok(Err(e.into())),
        }
    }

    fn zeros_like(
        &mut self,
        other: Resource<TensorSlot>,
        dtype: Option<types::Dtype>,
    ) -> wasmtime::Result<TensorResult<Resource<TensorSlot>>> {
        let other = self.peek(&other)?;
        let dtype = dtype.unwrap_or_else(|| other.dtype().into());
        let shape = other.shape().to_vec();
        self.zeros(dtype, shape)
    }

    fn dtype(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<types::Dtype> {
        Ok(self.peek(&this)?.dtype().into())
    }

    fn shape(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<Vec<u64>> {
        Ok(self.peek(&this)?.shape().to_vec())
    }

    fn numel(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<u64> {
        Ok(self.peek(&this)?.numel())
    }

    fn duplicate(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<Resource<TensorSlot>>> {
        let copy = self.get(&this)?.clone();
        self.create(copy)
    }

    fn cast(
        &mut self,
        this: Resource<TensorSlot>,
        dtype: types::Dtype,
    ) -> wasmtime::Result<TensorResult<Resource<TensorSlot>>> {
        let cast = self.get(&this)?.cast(dtype.into());
        self.create(cast)
    }

    fn axpy(
        &mut self,
        this: Resource<TensorSlot>,
        alpha: f64,
        x: Resource<TensorSlot>,
    ) -> wasmtime::Result<TensorResult<()>> {
        // Deferred: a fold's accumulator then takes several updates in one pass.
        let term = match self.table.get_mut(&x)?.as_term(alpha) {
            Ok(term) => term,
            Err(e) => return Ok(Err(e.into())),
        };
        Ok(self.table.get_mut(&this)?.defer(term).map_err(Into::into))
    }

    fn scale(&mut self, this: Resource<TensorSlot>, alpha: f64) -> wasmtime::Result<TensorResult<()>> {
        self.unary(&this, |a| a.scale(alpha))
    }

    fn add(&mut self, this: Resource<TensorSlot>, other: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<()>> {
        self.binary(&this, &other, |a, b| a.axpy(1.0, b))
    }

    fn sub(&mut self, this: Resource<TensorSlot>, other: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<()>> {
        self.binary(&this, &other, |a, b| a.axpy(-1.0, b))
    }

    fn dot(&mut self, this: Resource<TensorSlot>, other: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<f64>> {
        self.binary(&this, &other, |a, b| a.dot(b))
    }

    fn l2_norm(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<f64>> {
        Ok(self.get(&this)?.l2_norm().map_err(Into::into))
    }

    fn clip_by_norm(&mut self, this: Resource<TensorSlot>, max_norm: f64) -> wasmtime::Result<TensorResult<f64>> {
        self.unary(&this, |a| a.clip_by_norm(max_norm))
    }

    fn all_finite(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<bool> {
        Ok(self.get(&this)?.all_finite())
    }

    fn read(
        &mut self,
        this: Resource<TensorSlot>,
        offset: u64,
        count: u32,
    ) -> wasmtime::Result<TensorResult<Vec<f64>>> {
        Ok(self.get(&this)?.read(offset, count, MAX_CHUNK).map_err(Into::into))
    }

    fn write(
        &mut self,
        this: Resource<TensorSlot>,
        offset: u64,
        values: Vec<f64>,
    ) -> wasmtime::Result<TensorResult<()>> {
        self.unary(&this, |a| a.write(offset, &values, MAX_CHUNK))
    }

    fn read_f32(
        &mut self,
        this: Resource<TensorSlot>,
        offset: u64,
        count: u32,
    ) -> wasmtime::Result<TensorResult<Vec<f32>>> {
        Ok(self.get(&this)?.read_f32(offset, count, MAX_CHUNK).map_err(Into::into))
    }

    fn write_f32(
        &mut self,
        this: Resource<TensorSlot>,
        offset: u64,
        values: Vec<f32>,
    ) -> wasmtime::Result<TensorResult<()>> {
        self.unary(&this, |a| a.write_f32(offset, &values, MAX_CHUNK))
    }

    fn mul(&mut self, this: Resource<TensorSlot>, other: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<()>> {
        self.binary(&this, &other, |a, b| a.mul(b))
    }

    fn div(&mut self, this: Resource<TensorSlot>, other: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<()>> {
        self.binary(&this, &other, |a, b| a.div(b))
    }

    fn sqrt(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<()>> {
        self.unary(&this, |a| a.sqrt())
    }

    fn add_scalar(&mut self, this: Resource<TensorSlot>, value: f64) -> wasmtime::Result<TensorResult<()>> {
        self.unary(&this, |a| a.add_scalar(value))
    }

    fn sign(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<TensorResult<()>> {
        self.unary(&this, |a| a.sign())
    }

    fn add_gaussian(
        &mut self,
        this: Resource<TensorSlot>,
        stddev: f64,
        seed: u64,
    ) -> wasmtime::Result<TensorResult<()>> {
        self.unary(&this, |a| a.add_gaussian(stddev, seed))
    }

    fn drop(&mut self, this: Resource<TensorSlot>) -> wasmtime::Result<()> {
        // Its deferred calls are dropped with it: nothing can read it any more.
        let slot = self.table.delete(this)?;
        self.tensor_bytes = self.tensor_bytes.saturating_sub(slot.charged);
        Ok(())
    }
}

impl strategy_state::Host for PluginState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Resource<TensorSlot>>> {
        match self.strategy.committed.get(&key).cloned() {
            Some(t) => Ok(Some(self.lend(t)?)),
            None => Ok(None),
        }
    }

    fn put(&mut self, key: String, value: Resource<TensorSlot>) -> wasmtime::Result<Result<(), String>> {
        if key.is_empty() || key.len() > MAX_STATE_KEY_BYTES {
            return Ok(Err(format!("a state key is 1 to {MAX_STATE_KEY_BYTES} bytes, `{key}` is {}", key.len())));
        }
        let known = self.strategy.committed.contains_key(&key) || self.strategy.staged.contains_key(&key);
        if !known && self.strategy.key_count() >= MAX_STATE_KEYS {
            return Ok(Err(format!("the strategy state holds at most {MAX_STATE_KEYS} keys")));
        }
        // Copy-on-write: the plugin may go on changing its tensor without changing the state.
        let tensor = self.get(&value)?.clone();
        self.strategy.staged.insert(key, Some(tensor));
        Ok(Ok(()))
    }

    fn remove(&mut self, key: String) -> wasmtime::Result<()> {
        self.strategy.staged.insert(key, None);
        Ok(())
    }
}

impl PluginState {
    /// Hands a whole-round result to the plugin as new tensors, charged to its budget.
    fn hand_over(
        &mut self,
        tensors: crate::model_io::NamedTensors,
    ) -> wasmtime::Result<Result<Vec<model::NamedTensor>, String>> {
        let mut out = Vec::with_capacity(tensors.len());
        for (name, tensor) in tensors {
            match self.create(tensor)? {
                Ok(value) => out.push(model::NamedTensor { name, value }),
                Err(e) => {
                    for t in out {
                        self.take(t.value)?;
                    }
                    let (tensors::TensorError::OutOfMemory(m)
                    | tensors::TensorError::DtypeMismatch(m)
                    | tensors::TensorError::ShapeMismatch(m)
                    | tensors::TensorError::OutOfBounds(m)
                    | tensors::TensorError::Unsupported(m)) = e;
                    return Ok(Err(m));
                }
            }
        }
        Ok(Ok(out))
    }
}

impl round_updates::Host for PluginState {
    fn count(&mut self) -> wasmtime::Result<u32> {
        Ok(self.round.count() as u32)
    }

    fn pairwise_distances(&mut self, updates: Vec<u32>) -> wasmtime::Result<Result<Vec<f64>, String>> {
        Ok(self.round.pairwise_distances(&updates))
    }

    fn rank_mean(
        &mut self,
        updates: Vec<u32>,
        lo: u32,
        hi: u32,
    ) -> wasmtime::Result<Result<Vec<model::NamedTensor>, String>> {
        match self.round.rank_mean(&updates, lo, hi) {
            Ok(t) => self.hand_over(t),
            Err(e) => Ok(Err(e)),
        }
    }

    fn median_nearest_mean(
        &mut self,
        updates: Vec<u32>,
        count: u32,
    ) -> wasmtime::Result<Result<Vec<model::NamedTensor>, String>> {
        match self.round.median_nearest_mean(&updates, count) {
            Ok(t) => self.hand_over(t),
            Err(e) => Ok(Err(e)),
        }
    }

    fn weighted_mean(
        &mut self,
        updates: Vec<u32>,
        weights: Vec<f64>,
    ) -> wasmtime::Result<Result<Vec<model::NamedTensor>, String>> {
        match self.round.weighted_mean(&updates, &weights) {
            Ok(t) => self.hand_over(t),
            Err(e) => Ok(Err(e)),
        }
    }
}

impl host::Host for PluginState {
    fn log(&mut self, level: host::LogLevel, message: String) -> wasmtime::Result<()> {
        let plugin = &*self.plugin;
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            host::LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            host::LogLevel::Info => tracing::info!(plugin, "{message}"),
            host::LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            host::LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
        Ok(())
    }
}
