//! The SDK's promises: a complete aggregator in under 40 lines, and the README's custom plugin is
//! real code that builds and runs.
use std::path::Path;

use nereid::runtime::RoundContext;

use crate::common::*;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is in the workspace")
}

#[test]
fn fedavg_is_a_complete_aggregator_in_under_40_lines() {
    let source = std::fs::read_to_string(workspace().join("plugins/fedavg/src/lib.rs")).expect("fedavg source");
    let lines = source.lines().count();
    assert!(lines < 40, "plugins/fedavg/src/lib.rs has {lines} lines");
    assert!(source.contains("use nereid_sdk::prelude::*;"), "fedavg depends on the SDK alone");
    let manifest = std::fs::read_to_string(workspace().join("plugins/fedavg/Cargo.toml")).expect("manifest");
    let deps = manifest.split("[dependencies]").nth(1).expect("dependencies").split("\n[").next().expect("table");
    let names: Vec<&str> =
        deps.lines().filter_map(|l| l.split('=').next()).map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(names, vec!["nereid-sdk"]);
}

#[test]
fn the_readme_example_plugin_is_the_tested_one() {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let source =
        std::fs::read_to_string(workspace().join("tests/fixtures/clipped-mean/src/lib.rs")).expect("example source");
    assert!(readme.contains(&source), "README.md must show tests/fixtures/clipped-mean/src/lib.rs verbatim");
}

#[test]
fn the_readme_example_plugin_clips_and_averages() {
    let (rt, _dir) = runtime();
    let mut p = aggregator(&rt, "clipped-mean", &[("max_norm", toml::Value::Float(1.0))]);
    let global = model(&[("w", f32s(&[2], &[1.0, 1.0]))]);
    p.begin_round(&RoundContext::default(), Some(&global)).expect("begin");
    // Client a moves the model by [3, 4] (norm 5): clipped to [0.6, 0.8]. Client b moves it by
    // [0.5, 0] (norm 0.5): kept. Weights 1 and 3.
    p.accumulate(&update("a", 1, model(&[("w", f32s(&[2], &[4.0, 5.0]))]))).expect("a");
    p.accumulate(&update("b", 3, model(&[("w", f32s(&[2], &[1.5, 1.0]))]))).expect("b");
    let out = p.finish().expect("finish");
    // 1 + (0.6 + 1.5)/4, 1 + (0.8 + 0)/4
    let w = get(&out.tensors, "w").as_f32().expect("f32");
    assert!((w[0] - 1.525).abs() < 1e-6 && (w[1] - 1.2).abs() < 1e-6, "{w:?}");
    // The global model the host lent it is untouched (copy-on-write).
    assert_eq!(get(&global, "w").as_f32(), Some(&[1.0f32, 1.0][..]));
}
