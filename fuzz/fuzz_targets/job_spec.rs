//! Job specs as the cloud's API takes them (`POST /v1/jobs`, JSON): decoding and the checks the
//! cloud makes before it accepts a job.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<nereid::config::job::JobSpec>(data) {
        let _ = spec.validate();
    }
});
