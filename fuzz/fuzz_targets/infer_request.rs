//! Bodies of `POST /v1/infer/<service>`: JSON (straight into f32) and safetensors, as the edge
//! reads them before any model runs. The first byte picks the content type. A JSON body the
//! one-pass reader takes must read the same through serde.
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
    if let Some(one_pass) = nereid::inference::json_request::read(body) {
        let serde = serde_json::from_slice::<nereid::inference::wire::InferRequest>(body);
        assert_eq!(Some(one_pass), serde.ok(), "serde reads another request from {:?}", String::from_utf8_lossy(body));
    }
});
