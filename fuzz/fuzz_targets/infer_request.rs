//! Bodies of `POST /v1/infer/<service>`: JSON (straight into f32) and safetensors, as the edge
//! reads them before any model runs. The first byte picks the content type.
#![no_main]
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 4] =
    [Some("application/json"), None, Some("application/safetensors"), Some("application/json; charset=utf-8")];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let inputs = ["image".to_string(), "x".to_string()];
    let content_type = TYPES[pick as usize % TYPES.len()];
    let _ = nereid::edge::services::parse_body(content_type, body, &inputs);
    let _ = nereid::edge::services::parse_body(content_type, body, &inputs[..1]);
});
