//! Sample batches of the replay buffer (`POST /v1/samples`, MQTT payloads, inbox files).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nereid::edge::replay::parse_batch(data);
});
