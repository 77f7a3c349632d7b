//! Client-side clipping for differential privacy, Flower's `fixedclipping_mod`: on the edge,
//! before upload, the update's difference to the global model is scaled to an L2 norm of at most
//! `clipping_norm` over the whole model, so an unclipped update never leaves the node. It is a
//! compressor (edges send the difference, the cloud decodes it unchanged); pair it with a
//! central noise aggregator (`dp-fixed-clipping` with the same norm) for the noise.
use nereid_sdk::prelude::*;
use nereid_sdk::NamedTensor;

#[derive(Default)]
struct ClientClipping {
    clip: f64,
}

impl Plugin for ClientClipping {
    fn info() -> Info {
        Info::new(
            "dp-client-clipping",
            env!("CARGO_PKG_VERSION"),
            "Clips each update's L2 norm on its edge before upload",
        )
        .float("clipping_norm", None, "L2 bound of each node's update (> 0)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.clip = config.f64("clipping_norm")?;
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(PluginError::invalid_config("clipping_norm", format!("must be > 0, got {}", self.clip)));
        }
        Ok(())
    }
}

impl Compressor for ClientClipping {
    fn encode(&mut self, _ctx: &RoundContext, update: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
        let delta = Model::new(update);
        delta.check_finite()?;
        let factor = delta.clip_by_norm(self.clip)?;
        if factor < 1.0 {
            nereid_sdk::log(nereid_sdk::LogLevel::Debug, &format!("update clipped by a factor of {factor}"));
        }
        Ok(delta.into_tensors())
    }

    fn decode(&mut self, _ctx: &RoundContext, payload: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
        Ok(payload)
    }

    fn rewrite_model(&mut self, _model: &[u8], _calibration: Vec<Vec<NamedTensor>>) -> Result<Vec<u8>, PluginError> {
        Err(PluginError::bad_state("dp-client-clipping clips updates; it does not rewrite models"))
    }
}

nereid_sdk::export_compressor!(ClientClipping);
