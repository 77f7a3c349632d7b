//! A plugin author's path: `nereid plugin new` writes a project for a slot in Rust, Python or
//! JavaScript, `nereid plugin build` builds it into a component of that slot and runs the slot's
//! checks, and build + push + job apply put it into a running job.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

const ALL_SLOTS: [&str; 7] =
    ["aggregator", "client-objective", "sampler", "compressor", "router", "splitter", "adapter"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is in the workspace").to_path_buf()
}

/// `nereid` with the toolchains `cargo xtask plugins` installed, a shared target dir for the
/// Rust projects (the SDK compiles once) and the compile cache in `cache`.
fn nereid_in(cache: &Path, args: &[&str]) -> Output {
    let target = plugin_dir().ancestors().nth(2).expect("target/wasm32-wasip2/plugin").join("plugin-projects");
    Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(args)
        .env("NEREID_CACHE_DIR", cache)
        .env("NEREID_COMPONENTIZE_PY", root().join("target/py-plugin/bin/componentize-py"))
        .env("NEREID_COMPONENTIZE_JS", root().join("target/js-plugin/node_modules/.bin/componentize-js"))
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("nereid")
}

fn succeeds(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// For every slot `lang` has a template for: new, build (the slot's checks pass), and
/// `plugin inspect` accepts the component for that slot and no other.
fn every_slot_builds(lang: &str, slots: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let cache = dir.path().join("cache");
    for slot in slots {
        let project = dir.path().join(format!("{lang}-{slot}"));
        let p = project.to_str().expect("utf-8");
        succeeds(nereid_in(&cache, &["plugin", "new", p, "--slot", slot, "--lang", lang]), "plugin new");
        let report: serde_json::Value =
            serde_json::from_str(&succeeds(nereid_in(&cache, &["plugin", "build", p, "--json"]), "plugin build"))
                .expect("a JSON report");
        assert_eq!(report["slot"], *slot, "{report}");
        let checks = report["checks"].as_array().expect("checks");
        assert!(!checks.is_empty(), "{lang} {slot}: the slot's checks ran: {report}");
        println!(
            "{lang} {slot}: {} KB, built in {:.1} s",
            report["bytes"].as_u64().unwrap_or(0) / 1024,
            report["build_seconds"].as_f64().unwrap_or(0.0)
        );
        let wasm = project.join(format!("{lang}-{slot}.wasm"));
        let inspected: serde_json::Value = serde_json::from_str(&succeeds(
            nereid_in(&cache, &["plugin", "inspect", wasm.to_str().expect("utf-8"), "--json"]),
            "plugin inspect",
        ))
        .expect("JSON");
        assert_eq!(inspected["slots"], serde_json::json!([slot]), "{lang} {slot}: {inspected}");
        assert_eq!(inspected["name"], format!("{lang}-{slot}"));
    }
    dir
}

/// The splitter template (its own ONNX codec in Python and JavaScript) plans the same cuts with
/// the same predicted latencies as the Rust `split-infer` on the same profiled model.
fn plans_as_split_infer(wasm: &Path) {
    use nereid::runtime::{Limits, SplitterPlugin};
    use nereid_onnx::Message;
    let (rt, _cache) = runtime();
    let spec = nereid::train::ModelSpec::Mlp { inputs: 12, hidden: vec![10, 6], classes: 4 };
    let onnx = nereid::inference::export::to_onnx(&spec, &spec.init(5)).expect("onnx").encode_to_vec();
    let profiled = nereid::inference::profile::profile(&onnx, 3).expect("profile");
    let split = profiled.split_profile(profiled.node_ms.iter().map(|(n, ms)| (n.clone(), ms / 4.0)).collect());
    let typed = profiled.model.encode();
    let mut plans = Vec::new();
    for path in [wasm.to_path_buf(), plugin("split-infer")] {
        let mut p = SplitterPlugin::load(&rt, &path, Limits::default(), &config(&[])).expect("loads");
        plans.push(p.plan(&typed, &split, 20.0, 3.0).expect("plan"));
    }
    assert!(plans[1].len() >= 4, "{:?}", plans[1]);
    assert_eq!(plans[0].len(), plans[1].len(), "{plans:?}");
    for (a, b) in plans[0].iter().zip(&plans[1]) {
        assert_eq!(a.tensors, b.tensors, "{plans:?}");
        assert!((a.predicted_ms - b.predicted_ms).abs() <= 1e-9 * b.predicted_ms.max(1.0), "{a:?} vs {b:?}");
    }
}

#[test]
fn plugin_new_and_build_make_a_rust_component_of_each_slot() {
    let dir = every_slot_builds("rust", &ALL_SLOTS);
    plans_as_split_infer(&dir.path().join("rust-splitter/rust-splitter.wasm"));
}

#[test]
fn plugin_new_and_build_make_a_python_component_of_each_slot() {
    let dir = every_slot_builds("python", &ALL_SLOTS);
    plans_as_split_infer(&dir.path().join("python-splitter/python-splitter.wasm"));
}

#[test]
fn plugin_new_and_build_make_a_javascript_component_of_each_slot() {
    let dir = every_slot_builds("javascript", &ALL_SLOTS);
    plans_as_split_infer(&dir.path().join("javascript-splitter/javascript-splitter.wasm"));
}

/// The slot checks fail a plugin that breaks the contract, naming the check and the fault; a
/// project whose manifest is wrong is refused naming the file and the key; a slot without a
/// template in a language is refused saying why.
#[test]
fn plugin_build_fails_a_plugin_that_breaks_its_slots_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    let cache = dir.path().join("cache");
    let new = |name: &str, slot: &str, lang: &str| {
        let p = dir.path().join(name);
        succeeds(
            nereid_in(&cache, &["plugin", "new", p.to_str().expect("utf-8"), "--slot", slot, "--lang", lang]),
            "new",
        );
        p
    };
    let edit = |file: PathBuf, from: &str, to: &str| {
        let text = std::fs::read_to_string(&file).expect("source");
        assert!(text.contains(from), "{}: {from}", file.display());
        std::fs::write(&file, text.replace(from, to)).expect("write");
    };
    let fails = |project: &Path, words: &[&str]| {
        let out = nereid_in(&cache, &["plugin", "build", project.to_str().expect("utf-8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: the build should fail", project.display());
        for w in words {
            assert!(err.contains(w), "{}: expected `{w}` in: {err}", project.display());
        }
    };
    // A sampler that evicts a sample it never held.
    let sampler = new("bad-sampler", "sampler", "python");
    edit(sampler.join("app.py"), "evicted, held[j] = held[j], sample.id", "evicted, held[j] = 10**9, sample.id");
    edit(sampler.join("plugin.toml"), "[config]\n", "[config]\ncapacity = 10\n");
    fails(&sampler, &["evicts only held samples", "evicted 1000000000, which is not held"]);
    // An aggregator that loses a tensor of the model.
    let aggregator = new("bad-aggregator", "aggregator", "javascript");
    edit(
        aggregator.join("app.js"),
        "return fold.finish();",
        "const a = fold.finish();\n    a.tensors.pop();\n    return a;",
    );
    fails(&aggregator, &["keeps the model's layout", "the aggregate has no tensor `layer.bias`"]);
    // A compressor whose decode is not the inverse of its encode.
    let compressor = new("bad-compressor", "compressor", "rust");
    edit(compressor.join("src/lib.rs"), "w.scale(scale)?;", "w.scale(f64::NAN)?;");
    fails(&compressor, &["decode(encode(update))", "has NaN or Inf"]);
    // plugin.toml names another slot than the built component implements.
    edit(
        sampler.join("plugin.toml"),
        "slot = \"sampler\"\nlanguage = \"python\"\nworld = \"sampler-plugin\"",
        "slot = \"router\"\nlanguage = \"python\"",
    );
    let out = nereid_in(&cache, &["plugin", "test", sampler.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("plugin.toml says slot router, but the component implements world `sampler-plugin`"),
        "{err}"
    );
    edit(sampler.join("plugin.toml"), "slot = \"router\"", "slot = \"mixer\"");
    fails(&sampler, &["plugin.toml", "slot", "unknown slot `mixer`"]);
    let out = nereid_in(&cache, &["plugin", "new", dir.path().join("m").to_str().expect("utf-8"), "--slot", "mixer"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown slot `mixer`: one of aggregator, client-objective"),
        "{err}"
    );
}

/// From nothing to a plugin in a live job: `plugin new`, write the code, then three commands —
/// `plugin build`, `push`, `job apply` — and the job's next rounds are folded by it.
#[test]
fn three_commands_take_a_new_python_aggregator_into_a_running_job() {
    use crate::cluster::Cluster;
    use crate::oci::{aggregators, embedded, swap_job, wait_rounds_by};
    let reg = embedded(None, false);
    let h = reg.host.clone();
    let c = Cluster::running(2);
    let cache = c.path("cache");
    let fedavg = plugin("fedavg");
    c.apply("authored", &swap_job("authored", fedavg.to_str().expect("utf-8"), false, None));
    c.wait_until("authored", "a round", |s| s.rounds_done >= 1);

    let project = c.path("trimmed");
    let p = project.to_str().expect("utf-8");
    succeeds(nereid_in(&cache, &["plugin", "new", p, "--slot", "aggregator", "--lang", "python"]), "new");
    // The author's code: FedAvg whose weights are capped at 1,000 examples per node.
    let app = project.join("app.py");
    let code = std::fs::read_to_string(&app).expect("app.py").replace(
        "    def accumulate(self, update):\n        fold.add(update)",
        "    def accumulate(self, update):\n        if update.num_examples == 0:\n            raise sdk.rejected(\"zero examples\")\n        fold.add_weighted(update, float(min(update.num_examples, 1000)))",
    );
    assert!(code.contains("add_weighted"));
    std::fs::write(&app, code).expect("write");

    // 1. build (and the slot's checks), 2. push, 3. job apply.
    succeeds(nereid_in(&cache, &["plugin", "build", p]), "plugin build");
    let reference = format!("oci://{h}/team/trimmed:0.1.0");
    let pushed: serde_json::Value = serde_json::from_str(&succeeds(
        nereid_in(&cache, &["push", project.join("trimmed.wasm").to_str().expect("utf-8"), &reference, "--json"]),
        "push",
    ))
    .expect("JSON");
    let pinned = pushed["reference"].as_str().expect("pinned").to_string();
    let job = c.path("authored.toml");
    std::fs::write(&job, swap_job("authored", &reference, false, None)).expect("job");
    let out = c.nereid(&["job", "apply", job.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let s = wait_rounds_by(&c, "authored", &pinned, 2);
    let labels = aggregators(&s);
    let first = labels.iter().position(|l| *l == pinned).expect("a round by the new plugin");
    assert!(first >= 1 && labels[first..].iter().all(|l| *l == pinned), "{labels:?}");
    assert!(s.history.iter().all(|h| h.participants.len() == 2), "{s:?}");
    assert!(c.nereid(&["job", "stop", "authored"]).status.success());
}
