//! Plugins written in Python (componentize-py, `sdk/python`): the Python FedAvg gives the Rust
//! FedAvg's result and refuses what it refuses, with the same words.
use nereid::runtime::{PluginError, RoundContext, UpdateKind};
use nereid::tensor::Tensor;

use crate::common::*;

fn ctx(round: u32) -> RoundContext {
    RoundContext { job: "python".into(), round, seed: 0 }
}

/// Deterministic values of very different magnitudes.
fn values(n: usize, k: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 31 + k * 17) % 997) as f32 - 498.0) * 1e-3 * (1.0 + k as f32 * 100.0)).collect()
}

#[test]
fn a_python_fedavg_gives_the_rust_fedavgs_result() {
    gives_the_rust_fedavgs_result("fedavg-py");
}

/// `name`'s FedAvg against the Rust one: several tensors (f32 and f64) and very unequal example
/// counts within 1e-6, then delta updates over a global model identical.
pub(crate) fn gives_the_rust_fedavgs_result(name: &str) {
    let (rt, _cache) = runtime();
    let mut other = aggregator(&rt, name, &[]);
    let mut rust = aggregator(&rt, "fedavg", &[]);
    let counts = [3u64, 700, 41, 9999, 1];
    let updates: Vec<_> = counts
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let f64s_k: Vec<f64> = values(30, k + 7).iter().map(|&v| v as f64 * 1e5).collect();
            update(
                &format!("node-{k}"),
                n,
                model(&[
                    ("conv.weight", f32s(&[16, 1, 3, 3], &values(144, k))),
                    ("dense.weight", f32s(&[100, 300], &values(30_000, k + 1))),
                    ("dense.bias", f32s(&[100], &values(100, k + 2))),
                    ("stats", f64s(&[30], &f64s_k)),
                ]),
            )
        })
        .collect();
    let mut results = Vec::new();
    for agg in [&mut other, &mut rust] {
        agg.begin_round(&ctx(1), None).expect("begin");
        for u in &updates {
            agg.accumulate(u).expect("accumulate");
        }
        results.push(agg.finish().expect("finish"));
    }
    let (py, rs) = (&results[0], &results[1]);
    let mut worst = 0f64;
    for (name, t) in &rs.tensors {
        let p = get(&py.tensors, name);
        assert_eq!((p.dtype(), p.shape()), (t.dtype(), t.shape()), "{name}");
        let (a, b): (Vec<f64>, Vec<f64>) = match (p.as_f32(), t.as_f32()) {
            (Some(a), Some(b)) => (a.iter().map(|&v| v as f64).collect(), b.iter().map(|&v| v as f64).collect()),
            _ => (p.as_f64().expect("f64").to_vec(), t.as_f64().expect("f64").to_vec()),
        };
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / y.abs().max(1.0));
        }
    }
    println!("{name} vs the rust fedavg: largest difference {worst:e}");
    assert!(worst <= 1e-6, "{worst}");
    assert_eq!(py.metrics, rs.metrics, "accepted_updates and total_weight");

    // Deltas over a global model, in a second round.
    let global = model(&[("w", f32s(&[3], &[10.0, 20.0, -5.0]))]);
    let mut outs = Vec::new();
    for agg in [&mut other, &mut rust] {
        agg.begin_round(&ctx(2), Some(&global)).expect("begin");
        for (k, n) in [(0, 1u64), (1, 3)] {
            let mut d = update(&format!("d{k}"), n, model(&[("w", f32s(&[3], &values(3, k)))]));
            d.kind = UpdateKind::Delta;
            agg.accumulate(&d).expect("delta");
        }
        outs.push(get(&agg.finish().expect("finish").tensors, "w").clone());
    }
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn a_python_fedavg_refuses_what_the_rust_one_refuses_in_the_same_words() {
    refuses_what_the_rust_fedavg_refuses(&["fedavg-py", "fedavg"]);
}

/// Each of `names` (the Rust FedAvg last) refuses the same malformed updates in the same words,
/// and the refused updates leave its fold as it was.
pub(crate) fn refuses_what_the_rust_fedavg_refuses(names: &[&str]) {
    let (rt, _cache) = runtime();
    let good = |v: f32| model(&[("w", f32s(&[2], &[v, v])), ("b", f32s(&[1], &[v]))]);
    let mut delta = update("delta", 1, good(1.0));
    delta.kind = UpdateKind::Delta;
    let cases: Vec<nereid::runtime::ClientUpdate> = vec![
        update("missing", 1, model(&[("w", f32s(&[2], &[1.0, 1.0]))])),
        update(
            "extra",
            1,
            model(&[("w", f32s(&[2], &[1.0, 1.0])), ("b", f32s(&[1], &[1.0])), ("x", f32s(&[1], &[1.0]))]),
        ),
        update("shape", 1, model(&[("w", f32s(&[3], &[1.0, 1.0, 1.0])), ("b", f32s(&[1], &[1.0]))])),
        update("dtype", 1, model(&[("w", f64s(&[2], &[1.0, 1.0])), ("b", f32s(&[1], &[1.0]))])),
        update("nan", 1, model(&[("w", f32s(&[2], &[1.0, f32::NAN])), ("b", f32s(&[1], &[1.0]))])),
        update("zero", 0, good(5.0)),
        delta,
    ];
    let mut words: Vec<Vec<String>> = Vec::new();
    let mut finals: Vec<Tensor> = Vec::new();
    for &name in names {
        let mut agg = aggregator(&rt, name, &[]);
        agg.begin_round(&ctx(1), None).expect("begin");
        agg.accumulate(&update("first", 1, good(1.0))).expect("first");
        let mut said = Vec::new();
        for case in &cases {
            match agg.accumulate(case).expect_err(&case.client) {
                PluginError::Rejected { plugin, subject, message } => {
                    assert_eq!(plugin, name);
                    assert_eq!(subject, format!("update `{}`", case.client));
                    said.push(message);
                }
                other => panic!("{name} {}: expected a rejection, got {other}", case.client),
            }
        }
        agg.accumulate(&update("last", 3, good(3.0))).expect("last");
        finals.push(get(&agg.finish().expect("finish").tensors, "w").clone());
        words.push(said);
    }
    assert_eq!(words[0], words[1], "the same refusals in the same words");
    assert_eq!(finals[0], finals[1]);
    assert_eq!(finals[0].as_f32(), Some(&[2.5, 2.5][..]), "the refused updates left the fold as it was");
}

fn misbehave(
    rt: &nereid::runtime::Runtime,
    fixture: &str,
    mode: &str,
    limits: nereid::runtime::Limits,
) -> nereid::runtime::AggregatorPlugin {
    let cfg = config(&[("mode", toml::Value::String(mode.into())), ("trigger", toml::Value::String("bad".into()))]);
    nereid::runtime::AggregatorPlugin::load(rt, &plugin(fixture), limits, &cfg).expect("loads")
}

fn small(v: f32) -> nereid::model_io::NamedTensors {
    model(&[("w", f32s(&[2], &[v, v]))])
}

/// The call limit stops a Python loop; the memory limit a Python allocation without bound; the
/// next call runs on a fresh instance and the fold goes on.
#[test]
fn a_python_plugin_that_loops_or_hogs_memory_is_stopped_and_the_host_goes_on() {
    stopped_by_the_limits_and_the_host_goes_on("misbehave-py");
}

/// `fixture` (an aggregator with `mode` spin or hog on the update named `bad`) is stopped by the
/// call and memory limits; the next call runs on a fresh instance.
pub(crate) fn stopped_by_the_limits_and_the_host_goes_on(fixture: &str) {
    use nereid::runtime::Limits;
    use std::time::{Duration, Instant};
    let (rt, _cache) = runtime();
    let cases = [
        ("spin", Limits { call_timeout: Duration::from_millis(500), ..Limits::default() }),
        ("hog", Limits { memory_bytes: 128 << 20, ..Limits::default() }),
    ];
    for (mode, limits) in cases {
        let mut p = misbehave(&rt, fixture, mode, limits);
        p.begin_round(&ctx(1), None).expect("begin");
        p.accumulate(&update("ok", 1, small(1.0))).expect("ok");
        let started = Instant::now();
        let err = p.accumulate(&update("bad", 1, small(2.0))).expect_err(mode);
        println!("{mode}: stopped after {:?}: {err}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(30), "{mode}: stopped near its limit");
        match mode {
            "spin" => assert!(matches!(&err, PluginError::Timeout { call: "accumulate", .. }), "{err}"),
            _ => assert!(matches!(&err, PluginError::OutOfMemory { call: "accumulate", .. }), "{err}"),
        }
        assert!(err.instance_lost(), "{mode}: {err}");
        p.begin_round(&ctx(2), None).expect("a fresh instance");
        p.accumulate(&update("ok", 2, small(4.0))).expect("works again");
        assert_eq!(get(&p.finish().expect("finish").tensors, "w").as_f32(), Some(&[4.0f32, 4.0][..]));
    }
}

/// The Python FedProx's client objective trains the digits MLP exactly as the Rust one does
/// (the same host operations on the same tensors), and mu > 0 changes training: it stays closer
/// to the global model.
#[test]
fn a_python_fedprox_changes_training_as_the_rust_one_does() {
    use nereid::runtime::bindings::types::{ConfigEntry, ConfigValue};
    use nereid::runtime::{Limits, ObjectivePlugin};
    use nereid::train::{self, Dataset, ModelSpec, OptimizerKind, TrainParams};
    let (rt, _cache) = runtime();
    let (data, _) = Dataset::digits().holdout(0.5, 1);
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![16], classes: 10 };
    let global = spec.init(3);
    let params = TrainParams { epochs: 2, batch_size: 32, learning_rate: 0.1, optimizer: OptimizerKind::Sgd };
    let distance = |m: &nereid::model_io::NamedTensors| -> f64 {
        m.iter()
            .zip(&global)
            .map(|((_, a), (_, b))| {
                let (a, b) = (a.as_f32().expect("f32"), b.as_f32().expect("f32"));
                a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let run = |name: &str, mu: f64| {
        let mut obj = ObjectivePlugin::load(&rt, &plugin(name), Limits::default(), &config(&[])).expect("loads");
        let published = [ConfigEntry { key: "mu".into(), value: ConfigValue::Float(mu) }];
        obj.begin_round(&ctx(1), &global, &published).expect("begin");
        train::train(&spec, &global, &data, &params, 7, Some(&mut obj), |_, _| {}).expect("trains")
    };
    let plain = train::train(&spec, &global, &data, &params, 7, None, |_, _| {}).expect("trains");
    let (py, rs) = (run("fedprox-py", 0.5), run("fedprox", 0.5));
    assert_eq!(py.model, rs.model, "the same training, step by step");
    assert_eq!(py.penalty, rs.penalty);
    assert_eq!(run("fedprox-py", 0.0).model, plain.model, "mu = 0 trains as without an objective");
    let (d_plain, d_prox) = (distance(&plain.model), distance(&py.model));
    println!("distance to the global model: without the objective {d_plain:.4}, with mu = 0.5 {d_prox:.4}");
    assert!(d_prox < d_plain * 0.9, "{d_prox} vs {d_plain}");
}

/// A Python aggregator pushed to the embedded registry replaces the Rust FedAvg in a running
/// job at a round boundary; the job goes on with it.
#[test]
fn a_python_aggregator_from_the_registry_is_swapped_into_a_running_job() {
    use crate::cluster::Cluster;
    use crate::oci::{aggregators, embedded, push, swap_job, wait_rounds_by};
    let reg = embedded(None, false);
    let h = reg.host.clone();
    let c = Cluster::running(2);
    let cache = c.path("cache");
    let rust = push(&cache, &plugin("fedavg"), &format!("oci://{h}/ns/agg:rust"));
    let python = push(&cache, &plugin("fedavg-py"), &format!("oci://{h}/ns/agg:python"));
    c.apply("py-swap", &swap_job("py-swap", &format!("oci://{h}/ns/agg:rust"), false, None));
    c.wait_until("py-swap", "two rounds", |s| s.rounds_done >= 2);
    let path = c.path("py-swap.toml");
    std::fs::write(&path, swap_job("py-swap", &format!("oci://{h}/ns/agg:python"), false, None)).expect("job");
    let out = c.nereid(&["job", "apply", path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = wait_rounds_by(&c, "py-swap", &python, 3);
    let labels = aggregators(&s);
    let first = labels.iter().position(|l| *l == python).expect("a round by the Python plugin");
    assert!(first >= 2 && labels[..first].iter().all(|l| *l == rust), "{labels:?}");
    assert!(labels[first..].iter().all(|l| *l == python), "{labels:?}");
    assert!(s.history.iter().all(|h| h.participants.len() == 2), "every round folded both nodes: {s:?}");
    let out = c.nereid(&["job", "stop", "py-swap"]);
    assert!(out.status.success());
}

fn sampler(rt: &nereid::runtime::Runtime, name: &str, capacity: i64, seed: i64) -> nereid::runtime::SamplerPlugin {
    let mut cfg = vec![("capacity", toml::Value::from(capacity)), ("seed", toml::Value::from(seed))];
    if name == "replay-buffer" {
        cfg.push(("policy", toml::Value::String("reservoir".into())));
    }
    nereid::runtime::SamplerPlugin::load(rt, &plugin(name), nereid::runtime::Limits::default(), &config(&cfg))
        .expect("loads")
}

/// Offers ids 0..n (labels id % 3) and returns the admissions and the ids held at the end.
fn offer_all(s: &mut nereid::runtime::SamplerPlugin, n: u64) -> (Vec<Option<Option<u64>>>, Vec<u64>) {
    use nereid::runtime::{Admission, SampleRef};
    let mut held = Vec::new();
    let mut decisions = Vec::new();
    for id in 0..n {
        let a = s.offer(SampleRef { id, label: (id % 3) as i64 }).expect("offer");
        decisions.push(match a {
            Admission::Keep(None) => {
                held.push(id);
                Some(None)
            }
            Admission::Keep(Some(evicted)) => {
                let at = held.iter().position(|h| *h == evicted).expect("evicts a held sample");
                held[at] = id;
                Some(Some(evicted))
            }
            Admission::Discard => None,
        });
    }
    held.sort();
    (decisions, held)
}

/// The Python reservoir decides and draws exactly as the Rust `replay-buffer`'s reservoir (the
/// same algorithm on the same counter-keyed random streams), and passes the same chi-square test
/// of uniformity.
#[test]
fn a_python_reservoir_sampler_decides_as_the_rust_one_and_is_uniform() {
    let (rt, _cache) = runtime();
    for seed in [0i64, 7, -3] {
        let mut py = sampler(&rt, "reservoir-py", 20, seed);
        let mut rs = sampler(&rt, "replay-buffer", 20, seed);
        let (a, b) = (offer_all(&mut py, 500), offer_all(&mut rs, 500));
        assert_eq!(a, b, "seed {seed}: the same admissions and evictions");
        let round = RoundContext { job: "j".into(), round: 4, seed: 99 };
        assert_eq!(py.draw(&round, 8).expect("draw"), rs.draw(&round, 8).expect("draw"), "seed {seed}");
    }
    // Uniformity: after n offers each sample is held with probability capacity / n. Over 200
    // seeded runs each of 50 samples is held ~40 times; 85.35 is the 0.999 quantile of
    // chi-square with 49 degrees of freedom (the seeds are fixed, so is the outcome).
    let (n, capacity, runs) = (50u64, 10i64, 200i64);
    let mut counts = vec![0u64; n as usize];
    for seed in 0..runs {
        let mut s = sampler(&rt, "reservoir-py", capacity, seed);
        let (_, held) = offer_all(&mut s, n);
        assert_eq!(held.len(), capacity as usize);
        for id in held {
            counts[id as usize] += 1;
        }
    }
    let expected = (runs * capacity) as f64 / n as f64;
    let chi2: f64 = counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
    println!("python reservoir: chi-square {chi2:.1} over {n} samples, {runs} runs (0.999 quantile 85.35)");
    assert!(chi2 < 85.35, "chi-square {chi2} (counts {counts:?})");
}
