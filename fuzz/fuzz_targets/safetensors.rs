//! Safetensors from outside (uploads, models, samples): the whole-buffer decoder, the streaming
//! header reader, and the wire decoder of inference requests and sample batches.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let origin = Path::new("fuzz.safetensors");
    let _ = nereid::model_io::decode(data, origin);
    let mut reader = std::io::Cursor::new(data);
    let _ = nereid::model_io::read_header(&mut reader, data.len() as u64, origin);
    if let Ok(tensors) = nereid::inference::wire::from_safetensors(data) {
        for t in &tensors {
            let _ = nereid::inference::wire::check(t);
        }
    }
});
