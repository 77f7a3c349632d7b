//! The strategy state the host keeps across rounds for an aggregator: what a server optimizer's
//! moments or an adaptive clipping norm need to survive a cloud restart or a lost instance.
//!
//! `get` reads the state as the last committed round left it; `put` and `remove` take effect
//! when this round's model is committed, so a round that is replayed reads the same state again.
use crate::bindings::nereid::plugin::strategy_state;
use crate::{DType, Layout, Model, NamedTensor, PluginError, Tensor};

/// The tensor stored under `key`, if any.
pub fn get(key: &str) -> Option<Tensor> {
    strategy_state::get(key)
}

/// Stores `value` under `key` for the rounds after this one.
pub fn put(key: &str, value: &Tensor) -> Result<(), PluginError> {
    strategy_state::put(key, value).map_err(|m| PluginError::Internal(format!("strategy state `{key}`: {m}")))
}

/// Removes `key` for the rounds after this one.
pub fn remove(key: &str) {
    strategy_state::remove(key)
}

/// A number stored with `put_scalar`.
pub fn scalar(key: &str) -> Option<f64> {
    let t = get(key)?;
    t.read(0, 1).ok()?.first().copied()
}

/// Stores one number (an f64 scalar tensor) under `key`.
pub fn put_scalar(key: &str, value: f64) -> Result<(), PluginError> {
    let t = Tensor::zeros(DType::F64, &[])?;
    t.write(0, &[value])?;
    put(key, &t)
}

/// A model stored with `put_model(prefix, ..)`, if every tensor of `layout` is there with its
/// shape; None if none is (the first round). A partial or reshaped one is an error.
pub fn model(prefix: &str, layout: &Layout) -> Result<Option<Model>, PluginError> {
    let mut tensors = Vec::with_capacity(layout.entries.len());
    for (name, _, shape) in &layout.entries {
        let key = format!("{prefix}/{name}");
        match get(&key) {
            Some(t) if t.shape() == *shape => tensors.push(NamedTensor { name: name.clone(), value: t }),
            Some(t) => {
                return Err(PluginError::bad_state(format!(
                    "strategy state `{key}` has shape {:?}, the model's tensor {shape:?}",
                    t.shape()
                )))
            }
            None if tensors.is_empty() => continue,
            None => return Err(PluginError::bad_state(format!("strategy state `{key}` is missing"))),
        }
    }
    if tensors.is_empty() {
        return Ok(None);
    }
    if tensors.len() != layout.entries.len() {
        return Err(PluginError::bad_state(format!("strategy state `{prefix}` lacks some of the model's tensors")));
    }
    Ok(Some(Model::new(tensors)))
}

/// Stores every tensor of `model` under `prefix/<tensor name>`.
pub fn put_model(prefix: &str, model: &Model) -> Result<(), PluginError> {
    for (name, t) in model.iter() {
        put(&format!("{prefix}/{name}"), t)?;
    }
    Ok(())
}
