//! {{name}}: an adapter (edge, per request): a raw payload to the model's input tensors. As
//! written it takes `application/octet-stream` bodies of little-endian f32 values for a model
//! with one f32 input, and fills the input's open dimension (the batch) from the payload's length.
//! `nereid plugin build` builds it and runs the slot's checks.
use nereid_sdk::prelude::*;
use nereid_sdk::{InputSpec, TensorData};

#[derive(Default)]
struct Decoder;

impl Plugin for Decoder {
    fn info() -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), "Raw little-endian f32 values to a model's input")
    }
}

impl Adapter for Decoder {
    fn decode(&mut self, content_type: &str, payload: &[u8], inputs: &[InputSpec]) -> Result<Vec<TensorData>, PluginError> {
        if content_type != "application/octet-stream" {
            return Err(PluginError::rejected(format!("expected application/octet-stream, got {content_type}")));
        }
        let [input] = inputs else {
            return Err(PluginError::rejected(format!("the model has {} inputs; this adapter feeds one", inputs.len())));
        };
        if input.dtype != DType::F32 || payload.len() % 4 != 0 {
            return Err(PluginError::rejected("expected f32 values (a multiple of 4 bytes) for an f32 input"));
        }
        let fixed: u64 = input.shape.iter().flatten().product();
        let values = payload.len() as u64 / 4;
        let open = input.shape.iter().filter(|d| d.is_none()).count();
        if fixed == 0 || values % fixed != 0 || open > 1 || (open == 0 && values != fixed) {
            return Err(PluginError::rejected(format!("{values} values do not fill input `{}`", input.name)));
        }
        let shape = input.shape.iter().map(|d| d.unwrap_or(values / fixed)).collect();
        Ok(vec![TensorData { name: input.name.clone(), dtype: DType::F32, shape, data: payload.to_vec() }])
    }
}

nereid_sdk::export_adapter!(Decoder);
