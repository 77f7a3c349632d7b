//! Bodies of `POST /v1/infer/<service>`: JSON (straight into f32) and safetensors, as the edge
//! reads them before any model runs. The first byte picks the content type. A JSON body the
//! one-pass reader takes must read the same through serde, and every array of numbers in a body
//! the same by the SIMD reader as number by number.
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
    // Both readers of JSON bodies read arrays with the SIMD reader, so it is checked here apart.
    for at in body.iter().enumerate().filter(|(_, &c)| c == b'[').map(|(at, _)| at).take(8) {
        let simd = nereid::inference::json_array::f32_array(body, at);
        let one_by_one = nereid::inference::json_array::f32_array_number_by_number(body, at);
        assert_eq!(simd, one_by_one, "the array at {at} of {:?}", String::from_utf8_lossy(body));
    }
});
