//! Split inference's activations through a compressor plugin: the edge encodes the cut tensors
//! (e.g. INT8 with `rounding = "nearest"`), the cloud decodes them before the tail. Both sides
//! load the same component; the edge names it by digest in `x-nereid-compressor`.
use std::sync::Mutex;

use crate::inference::wire::{self, WireError};
use crate::runtime::{CompressorPlugin, PluginError, RoundContext, TensorData};
use crate::tensor::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// A compressor instance for one service, and the digest of its component.
pub struct ActivationCodec {
    plugin: Mutex<CompressorPlugin>,
    pub digest: String,
}

impl ActivationCodec {
    pub fn new(plugin: CompressorPlugin, digest: String) -> ActivationCodec {
        ActivationCodec { plugin: Mutex::new(plugin), digest }
    }

    fn run(
        &self,
        tensors: &[TensorData],
        f: impl FnOnce(
            &mut CompressorPlugin,
            &RoundContext,
            &[(String, Tensor)],
        ) -> Result<Vec<(String, Tensor)>, PluginError>,
    ) -> Result<Vec<TensorData>, CodecError> {
        let named =
            tensors.iter().map(|t| Ok((t.name.clone(), wire::to_tensor(t)?))).collect::<Result<Vec<_>, WireError>>()?;
        let ctx = RoundContext::default();
        let mut plugin = crate::lock(&self.plugin);
        Ok(f(&mut plugin, &ctx, &named)?.into_iter().map(|(n, t)| wire::from_tensor(n, &t)).collect())
    }

    /// What travels instead of the cut tensors.
    pub fn encode(&self, tensors: &[TensorData]) -> Result<Vec<TensorData>, CodecError> {
        self.run(tensors, |p, ctx, named| p.encode(ctx, named))
    }

    /// The cut tensors a payload encodes; `origin` names the sender in errors.
    pub fn decode(&self, payload: &[TensorData], origin: &str) -> Result<Vec<TensorData>, CodecError> {
        self.run(payload, |p, ctx, named| p.decode(ctx, named, origin))
    }
}
