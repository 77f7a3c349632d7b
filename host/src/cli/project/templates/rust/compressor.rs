//! {{name}}: a compressor (both ends of an upload). As written it sends every f32 tensor as INT8
//! with one scale per tensor (max |x| / 127, rounded to nearest): 4x fewer bytes. Its math reads
//! and writes the host's tensors in chunks. `nereid plugin build` builds it and runs the slot's
//! checks.
use nereid_sdk::prelude::*;
use nereid_sdk::{max_chunk, NamedTensor};

#[derive(Default)]
struct Codec;

impl Plugin for Codec {
    fn info() -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), "INT8 updates with a scale per tensor")
    }
}

const SCALE: &str = ".scale";

impl Compressor for Codec {
    fn encode(&mut self, _ctx: &RoundContext, update: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
        let mut payload = Vec::new();
        for t in update {
            if t.value.dtype() != DType::F32 {
                payload.push(t); // sent as it is
                continue;
            }
            let (n, chunk) = (t.value.numel(), u64::from(max_chunk()));
            let mut max_abs = 0f32;
            for offset in (0..n).step_by(chunk as usize) {
                let values = t.value.read_f32(offset, chunk.min(n - offset) as u32)?;
                max_abs = values.iter().fold(max_abs, |m, v| m.max(v.abs()));
            }
            let scale = if max_abs > 0.0 { f64::from(max_abs) / 127.0 } else { 1.0 };
            let q = Tensor::zeros_like(&t.value, Some(DType::I8))?;
            for offset in (0..n).step_by(chunk as usize) {
                let values = t.value.read_f32(offset, chunk.min(n - offset) as u32)?;
                let rounded: Vec<f64> = values.iter().map(|v| (f64::from(*v) / scale).round()).collect();
                q.write(offset, &rounded)?;
            }
            let s = Tensor::zeros(DType::F64, &[])?;
            s.write(0, &[scale])?;
            payload.push(NamedTensor { name: format!("{}{SCALE}", t.name), value: s });
            payload.push(NamedTensor { name: t.name, value: q });
        }
        Ok(payload)
    }

    fn decode(&mut self, _ctx: &RoundContext, payload: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
        let scale_of = |name: &str| payload.iter().find(|t| t.name == format!("{name}{SCALE}"));
        let mut update = Vec::new();
        for t in payload.iter().filter(|t| !t.name.ends_with(SCALE)) {
            let value = match (t.value.dtype(), scale_of(&t.name)) {
                (DType::I8, Some(s)) => {
                    let scale = s.value.read(0, 1)?.first().copied().unwrap_or(f64::NAN);
                    if !(scale.is_finite() && scale > 0.0) {
                        return Err(PluginError::rejected(format!("`{}{SCALE}` is {scale}", t.name)));
                    }
                    let w = t.value.cast(DType::F32)?;
                    w.scale(scale)?;
                    w
                }
                (DType::I8, None) => return Err(PluginError::rejected(format!("`{}` has no `{SCALE}`", t.name))),
                _ => t.value.duplicate()?,
            };
            update.push(NamedTensor { name: t.name.clone(), value });
        }
        Ok(update)
    }

    fn rewrite_model(&mut self, _model: &[u8], _calibration: Vec<Vec<NamedTensor>>) -> Result<Vec<u8>, PluginError> {
        Err(PluginError::rejected("{{name}} encodes updates; it does not rewrite models"))
    }
}

nereid_sdk::export_compressor!(Codec);
