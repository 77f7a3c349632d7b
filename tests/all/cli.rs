//! The `nereid` binary end to end.
use std::path::Path;
use std::process::{Command, Output};

use nereid::model_io;

use crate::common::*;

fn nereid(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(args)
        .env("NEREID_CACHE_DIR", cache)
        .env("NEREID_PLUGIN_DIR", plugin_dir())
        .output()
        .expect("run nereid")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "nereid failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "nereid should have failed:\n{}", text(&out.stdout));
    text(&out.stderr)
}

#[test]
fn help_lists_the_commands() {
    let dir = tempfile::tempdir().expect("tmp");
    let help = ok(nereid(dir.path(), &["--help"]));
    for cmd in ["plugin", "bench", "demo"] {
        assert!(help.contains(cmd), "{help}");
    }
    let plugin_help = ok(nereid(dir.path(), &["plugin", "aggregate", "--help"]));
    for flag in ["--plugin", "--config", "--global", "--update", "--output", "--timeout-ms", "--memory-mib"] {
        assert!(plugin_help.contains(flag), "{plugin_help}");
    }
}

#[test]
fn inspect_shows_world_name_version_schema_and_imports() {
    let dir = tempfile::tempdir().expect("tmp");
    let fedprox = plugin("fedprox");
    let out = ok(nereid(dir.path(), &["plugin", "inspect", fedprox.to_str().expect("utf-8 path")]));
    assert!(out.contains("world `strategy-plugin` (aggregator and client-objective)"), "{out}");
    assert!(out.contains("fedprox"), "{out}");
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    assert!(out.contains("mu") && out.contains("float") && out.contains("default 0.01"), "{out}");
    assert!(out.contains("nereid:plugin/tensors@0.1.0"), "{out}");

    let json = ok(nereid(dir.path(), &["plugin", "inspect", "--json", plugin("fedavg").to_str().expect("utf-8")]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["name"], "fedavg");
    assert_eq!(v["slots"], serde_json::json!(["aggregator"]));
    assert!(v["digest"].as_str().expect("digest").starts_with("sha256:"));
    assert_eq!(v["config"], serde_json::json!([]));
}

#[test]
fn aggregate_runs_a_plugin_offline_over_safetensors_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let write = |name: &str, w: &[f32], b: f32| {
        let path = d.join(name);
        model_io::write(&path, &model(&[("w", f32s(&[2], w)), ("b", f32s(&[1], &[b]))]), None).expect("write");
        path.display().to_string()
    };
    let a = write("a.safetensors", &[1.0, 2.0], 0.0);
    let b = write("b.safetensors", &[3.0, 6.0], 4.0);
    let nan = write("nan.safetensors", &[f32::NAN, 0.0], 0.0);
    let out_path = d.join("out.safetensors");
    let out = ok(nereid(
        d,
        &[
            "plugin",
            "aggregate",
            "--plugin",
            plugin("fedprox").to_str().expect("utf-8"),
            "--config",
            "mu=0.5",
            "--update",
            &format!("{a}=1"),
            "--update",
            &format!("{nan}=5"),
            "--update",
            &format!("{b}=3"),
            "--output",
            out_path.to_str().expect("utf-8"),
        ],
    ));
    assert!(out.contains("accepted 2 of 3 updates"), "{out}");
    assert!(out.contains("rejected") && out.contains("nan.safetensors") && out.contains("NaN or Inf"), "{out}");
    let result = model_io::read(&out_path).expect("output");
    assert_eq!(get(&result, "w").as_f32(), Some(&[2.5f32, 5.0][..]));
    assert_eq!(get(&result, "b").as_f32(), Some(&[3.0f32][..]));

    // JSON report; the second run's load hits the compile cache.
    let json = ok(nereid(
        d,
        &[
            "plugin",
            "aggregate",
            "--json",
            "--plugin",
            plugin("fedprox").to_str().expect("utf-8"),
            "--update",
            &format!("{a}=1"),
            "--output",
            out_path.to_str().expect("utf-8"),
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["plugin"], "fedprox");
    assert_eq!(v["accepted"], serde_json::json!([a]));
    assert_eq!(v["compile_cache"], "hit");
}

#[test]
fn aggregate_with_deltas_needs_and_uses_the_global_model() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let global = d.join("global.safetensors");
    model_io::write(&global, &model(&[("w", f32s(&[2], &[10.0, 10.0]))]), None).expect("write");
    let delta = d.join("d.safetensors");
    model_io::write(&delta, &model(&[("w", f32s(&[2], &[1.0, -1.0]))]), None).expect("write");
    let out_path = d.join("out.safetensors");
    let args = |with_global: bool| {
        let mut v = vec!["plugin", "aggregate", "--kind", "delta", "--plugin"];
        let p = plugin("fedavg").display().to_string();
        let u = format!("{}=4", delta.display());
        let mut owned = vec![p, "--update".to_string(), u, "--output".to_string(), out_path.display().to_string()];
        if with_global {
            owned.extend(["--global".to_string(), global.display().to_string()]);
        }
        v.extend(owned.iter().map(|s| Box::leak(s.clone().into_boxed_str()) as &str));
        v
    };
    let err = fails(nereid(d, &args(false)));
    assert!(err.contains("no update was accepted this round") && err.contains("needs a global model"), "{err}");
    ok(nereid(d, &args(true)));
    assert_eq!(get(&model_io::read(&out_path).expect("read"), "w").as_f32(), Some(&[11.0f32, 9.0][..]));
}

#[test]
fn aggregate_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let out = d.join("o.safetensors").display().to_string();
    let fedprox = plugin("fedprox").display().to_string();
    let err =
        fails(nereid(d, &["plugin", "aggregate", "--plugin", &fedprox, "--update", "x.safetensors", "--output", &out]));
    assert!(err.contains("--update `x.safetensors`: expected FILE.safetensors=NUM_EXAMPLES"), "{err}");
    let err = fails(nereid(
        d,
        &["plugin", "aggregate", "--plugin", &fedprox, "--update", "x.safetensors=many", "--output", &out],
    ));
    assert!(err.contains("`many` is not a whole number"), "{err}");
    let err = fails(nereid(
        d,
        &[
            "plugin",
            "aggregate",
            "--plugin",
            &fedprox,
            "--config",
            "mu=-2",
            "--update",
            "x.safetensors=1",
            "--output",
            &out,
        ],
    ));
    assert!(err.contains("key `mu`"), "{err}");
    let err = fails(nereid(
        d,
        &["plugin", "aggregate", "--plugin", "missing.wasm", "--update", "x.safetensors=1", "--output", &out],
    ));
    assert!(err.contains("missing.wasm"), "{err}");
    let err = fails(nereid(d, &["plugin", "inspect", d.join("o.safetensors").to_str().expect("utf-8")]));
    assert!(err.contains("o.safetensors"), "{err}");
    // Every update unreadable: the round has nothing to average, and says so.
    let err = fails(nereid(
        d,
        &["plugin", "aggregate", "--plugin", &fedprox, "--update", "x.safetensors=1", "--output", &out],
    ));
    assert!(err.contains("no update was accepted"), "{err}");
}

#[test]
fn demo_runs_both_plugins_and_checks_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = ok(nereid(dir.path(), &["plugin", "demo", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["accepted"].as_array().expect("accepted").len(), 5);
        assert_eq!(run["rejected"].as_array().expect("rejected").len(), 3);
        assert!(run["max_relative_error_vs_f64_reference"].as_f64().expect("error") <= 1e-6);
    }
    assert_eq!(runs[1]["published_to_clients"], serde_json::json!([["mu", "0.1"]]));
    let prox = &v["fedprox_client_term"];
    assert!((prox["penalty"].as_f64().expect("p") - prox["penalty_by_hand"].as_f64().expect("h")).abs() < 1e-9);
    let human = ok(nereid(dir.path(), &["plugin", "demo"]));
    assert!(human.contains("fedavg") && human.contains("edge-nan"), "{human}");
}

#[test]
fn the_demo_trains_across_processes_to_at_least_90_percent() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = ok(nereid(dir.path(), &["demo", "--json", "--rounds", "12"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4);
    for (run, name) in runs.iter().zip(["fedavg", "fedavg+int8", "fedavg+top-k", "fedprox"]) {
        assert_eq!(run["strategy"], name);
        let rounds = run["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 12);
        for key in ["round", "accuracy", "loss", "participants", "bytes_up", "bytes_down"] {
            assert!(!rounds[0][key].is_null(), "{key}");
        }
        assert!(run["final_accuracy"].as_f64().expect("accuracy") >= 0.90, "{name}: {}", run["final_accuracy"]);
    }
    // Compressed updates: INT8 at least 3.5x fewer bytes than float32 and within 1 point of its
    // final accuracy; top-k 10% fewer still.
    let uploaded = |i: usize| -> f64 {
        runs[i]["rounds"].as_array().expect("rounds").iter().map(|r| r["bytes_up"].as_f64().expect("bytes")).sum()
    };
    let accuracy = |i: usize| runs[i]["final_accuracy"].as_f64().expect("accuracy");
    assert!(uploaded(0) / uploaded(1) >= 3.5, "INT8: {} -> {} bytes", uploaded(0), uploaded(1));
    assert!((accuracy(1) - accuracy(0)).abs() <= 0.01, "INT8: {} vs {}", accuracy(1), accuracy(0));
    assert!(uploaded(0) / uploaded(2) >= 4.0, "top-k: {} -> {} bytes", uploaded(0), uploaded(2));
    assert_eq!(v["nodes"].as_array().expect("nodes").len(), 3);
    // The plugins came from the embedded registry, pinned by digest.
    let components = v["components"].as_array().expect("components");
    assert_eq!(components.len(), 3);
    for c in components {
        assert!(c.as_str().expect("reference").contains("@sha256:"), "{c}");
    }
}

#[test]
fn bench_swap_reports_warm_swap_against_a_cold_pull() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = ok(nereid(dir.path(), &["bench", "swap", "--swaps", "6", "--cold", "1", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let (warm, cold) = (v["warm_swap_median_ms"].as_f64().expect("warm"), v["cold_total_ms"].as_f64().expect("cold"));
    assert!(warm > 0.0 && cold > 0.0, "{v}");
    assert!((v["warm_over_cold"].as_f64().expect("ratio") - warm / cold).abs() < 1e-9);
}

#[test]
fn bench_reports_ratios_against_the_native_loop() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = ok(nereid(
        dir.path(),
        &["bench", "aggregate", "--updates", "3", "--elements", "10000", "--repeat", "1", "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let timings = v["timings"].as_array().expect("timings");
    let named = |prefix: &str| timings.iter().find(|t| t["name"].as_str().is_some_and(|n| n.starts_with(prefix)));
    assert_eq!(timings.len(), 3, "{timings:?}");
    assert_eq!(named("native loop").expect("the native loop")["ratio_to_native"], 1.0);
    assert!(named("fedavg plugin").expect("the plugin")["ratio_to_native"].as_f64().expect("ratio") > 0.0);
    assert!(named("reading every input once").is_some());
    assert!(v["plugin_over_read_once"].as_f64().expect("ratio") > 0.0);
    assert_eq!(v["max_abs_diff_plugin_vs_native"], 0.0);
}
