//! Every TOML file kind through the spanned reader (syntax, unknown keys, types, then each
//! file's own checks and the line an error points at): cloud.toml, edge.toml, job files,
//! pipeline files and registries.toml.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nereid::config::{parse_str, CheckConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    if let Ok(cloud) = parse_str::<nereid::config::cloud::CloudConfig>(path, text) {
        let _ = cloud.check();
    }
    if let Ok(edge) = parse_str::<nereid::config::edge::EdgeConfig>(path, text) {
        let _ = edge.check();
    }
    if let Ok(job) = parse_str::<nereid::config::job::JobFile>(path, text) {
        let _ = nereid::config::job::check_settings(&job.job.name, &job.rounds, &job.stop, &job.model, &job.training);
    }
    let _ = parse_str::<nereid::config::pipeline::PipelineFile>(path, text);
    let _ = parse_str::<nereid_registry::RegistrySettings>(path, text);
});
