//! The strategy library: server optimizers, robust aggregators and their host-kept state, each
//! against the figures Flower's own tests pin and against float64 references written here.
use nereid::aggregate::{run_round, RoundReport};
use nereid::model_io::{self, NamedTensors};
use nereid::runtime::{AggregatorPlugin, RoundContext};
use toml::Value;

use crate::common::*;

fn ctx(round: u32) -> RoundContext {
    RoundContext { job: "strategies".into(), round, seed: 11 }
}

/// One round of `plugin` over `updates` (weights, example counts) from `global`.
fn round_of(
    plugin: &mut AggregatorPlugin,
    round: u32,
    global: &NamedTensors,
    updates: &[(Vec<f32>, u64)],
) -> RoundReport {
    let ups: Vec<_> = updates
        .iter()
        .enumerate()
        .map(|(k, (w, n))| update(&format!("client-{k}"), *n, model(&[("w", f32s(&[w.len() as u64], w))])))
        .collect();
    run_round(plugin, &ctx(round), Some(global), ups.len(), |i| Ok(ups[i].clone())).expect("round")
}

fn values(m: &NamedTensors) -> Vec<f32> {
    get(m, "w").as_f32().expect("f32").to_vec()
}

fn flat(v: f32, n: usize) -> Vec<f32> {
    vec![v; n]
}

/// Flower's fixture: three clients of 5 examples around a global model of 0.1.
fn flower_round(name: &str, cfg: &[(&str, Value)], updates: &[f32]) -> Vec<f32> {
    let (rt, _dir) = runtime();
    let mut p = aggregator(&rt, name, cfg);
    let global = model(&[("w", f32s(&[4], &flat(0.1, 4)))]);
    let ups: Vec<(Vec<f32>, u64)> = updates.iter().map(|v| (flat(*v, 4), 5)).collect();
    values(&round_of(&mut p, 1, &global, &ups).result.tensors)
}

#[test]
fn each_strategy_gives_the_figure_flowers_tests_pin() {
    let adagrad = flower_round(
        "fedadagrad",
        &[("eta", Value::Float(0.1)), ("eta_l", Value::Float(0.316)), ("tau", Value::Float(0.5))],
        &[0.2, 1.0],
    );
    assert_eq!(adagrad, flat(0.15, 4), "fedadagrad_test.py");
    assert_eq!(flower_round("fedmedian", &[], &[0.2, 1.0, 0.5]), flat(0.5, 4), "fedmedian_test.py");
    let krum = [("num_malicious_clients", Value::Integer(1))];
    assert_eq!(flower_round("krum", &krum, &[0.2, 0.7, 1.0]), flat(0.7, 4), "krum_test.py");
    let multikrum = [("num_malicious_clients", Value::Integer(1)), ("num_clients_to_keep", Value::Integer(2))];
    assert_eq!(flower_round("krum", &multikrum, &[0.2, 0.5, 1.0]), flat(0.35, 4), "multikrum_test.py");
    // bulyan_test.py: f = 0 keeps all six and averages them.
    let bulyan =
        flower_round("bulyan", &[("num_malicious_clients", Value::Integer(0))], &[0.2, 0.5, 0.7, 12.0, 0.1, 0.1]);
    let mean = ((0.2f64 + 0.5 + 0.7 + 12.0 + 0.1 + 0.1) / 6.0) as f32;
    assert!(bulyan.iter().all(|v| (v - mean).abs() <= f32::EPSILON * 4.0), "{bulyan:?} vs {mean}");
}

#[test]
fn the_trimmed_mean_cuts_each_end_as_flowers_test_does() {
    let (rt, _dir) = runtime();
    let mut p = aggregator(&rt, "fedtrimmedavg", &[("beta", Value::Float(0.25))]);
    let global = model(&[("w", f32s(&[4], &flat(0.0, 4)))]);
    let ups = [
        (vec![0.5, 0.5, 0.5, 0.5], 1),
        (vec![1.0, 0.2, 0.5, 1.0], 5),
        (vec![0.2, 0.5, 1.0, 0.2], 2),
        (vec![0.5, 1.0, 0.2, 0.5], 9),
    ];
    assert_eq!(values(&round_of(&mut p, 1, &global, &ups).result.tensors), flat(0.5, 4), "fedtrimmedavg_test.py");
    // A 0-dim tensor keeps its shape: [0.5, 1, 2, 100] -> mean(1, 2).
    let scalar = |v: f32| model(&[("w", f32s(&[], &[v]))]);
    let ups: Vec<_> =
        [0.5f32, 1.0, 2.0, 100.0].iter().enumerate().map(|(k, v)| update(&format!("c{k}"), 1, scalar(*v))).collect();
    let report = run_round(&mut p, &ctx(1), Some(&scalar(0.0)), 4, |i| Ok(ups[i].clone())).expect("round");
    let w = get(&report.result.tensors, "w");
    assert_eq!((w.shape(), w.as_f32().expect("f32")), (&[][..], &[1.5f32][..]));
}

#[test]
fn fedavgm_with_rate_one_and_no_momentum_is_fedavg_and_otherwise_steps_with_momentum() {
    let (rt, _dir) = runtime();
    let global = model(&[("w", f32s(&[3], &[0.1, -0.2, 0.3]))]);
    let ups = [(vec![0.5, 0.1, -0.4], 10), (vec![0.2, 0.9, 0.0], 30)];
    let mut avg = aggregator(&rt, "fedavg", &[]);
    let mut m0 = aggregator(&rt, "fedavgm", &[]);
    assert_eq!(round_of(&mut m0, 1, &global, &ups).result.tensors, round_of(&mut avg, 1, &global, &ups).result.tensors);

    // Three rounds with lr 0.7 and momentum 0.9 against float64: v = mu v + (w - avg), w -= lr v.
    let (lr, mu) = (0.7, 0.9);
    let mut p = aggregator(
        &rt,
        "fedavgm",
        &[("server_learning_rate", Value::Float(lr)), ("server_momentum", Value::Float(mu))],
    );
    let mut w = vec![0.1f64, -0.2, 0.3];
    let mut v: Option<Vec<f64>> = None;
    for round in 1..=3u32 {
        let updates: Vec<(Vec<f32>, u64)> =
            ups.iter().map(|(u, n)| (u.iter().map(|x| x + 0.1 * round as f32).collect(), *n)).collect();
        let g_model = model(&[("w", f32s(&[3], &w.iter().map(|x| *x as f32).collect::<Vec<_>>()))]);
        let got = values(&round_of(&mut p, round, &g_model, &updates).result.tensors);
        let wf: Vec<f64> = w.iter().map(|x| *x as f32 as f64).collect();
        let avg: Vec<f64> =
            (0..3).map(|i| updates.iter().map(|(u, n)| u[i] as f64 * *n as f64).sum::<f64>() / 40.0).collect();
        let g: Vec<f64> = (0..3).map(|i| wf[i] - avg[i]).collect();
        let next_v: Vec<f64> = match &v {
            Some(v) => (0..3).map(|i| mu * v[i] + g[i]).collect(),
            None => g,
        };
        w = (0..3).map(|i| wf[i] - lr * next_v[i]).collect();
        v = Some(next_v);
        for i in 0..3 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "round {round}: {got:?} vs {w:?}");
        }
    }
}

/// Float64 references of the adaptive optimizers (Flower's formulas), one round.
struct Adaptive {
    kind: &'static str,
    eta: f64,
    beta_1: f64,
    beta_2: f64,
    tau: f64,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Adaptive {
    fn step(&mut self, round: u32, w: &[f64], delta: &[f64]) -> Vec<f64> {
        for ((m, v), d) in self.m.iter_mut().zip(self.v.iter_mut()).zip(delta) {
            let d2 = d * d;
            match self.kind {
                "fedadagrad" => {
                    *m = *d;
                    *v += d2;
                }
                "fedadam" => {
                    *m = self.beta_1 * *m + (1.0 - self.beta_1) * d;
                    *v = self.beta_2 * *v + (1.0 - self.beta_2) * d2;
                }
                _ => {
                    *m = self.beta_1 * *m + (1.0 - self.beta_1) * d;
                    // numpy's sign: 0 at 0.
                    let sign = match *v - d2 {
                        x if x > 0.0 => 1.0,
                        x if x < 0.0 => -1.0,
                        _ => 0.0,
                    };
                    *v -= (1.0 - self.beta_2) * d2 * sign;
                }
            }
        }
        let t = round as f64 + 1.0;
        let eta = if self.kind == "fedadam" {
            self.eta * (1.0 - self.beta_2.powf(t)).sqrt() / (1.0 - self.beta_1.powf(t))
        } else {
            self.eta
        };
        (0..w.len()).map(|i| w[i] + eta * self.m[i] / (self.v[i].sqrt() + self.tau)).collect()
    }
}

#[test]
fn the_adaptive_optimizers_follow_a_float64_reference_over_rounds() {
    let (rt, _dir) = runtime();
    for kind in ["fedadagrad", "fedadam", "fedyogi"] {
        let (eta, beta_1, beta_2, tau) = (0.05, 0.9, 0.99, 1e-3);
        let mut cfg = vec![("eta", Value::Float(eta)), ("tau", Value::Float(tau))];
        if kind != "fedadagrad" {
            cfg.extend([("beta_1", Value::Float(beta_1)), ("beta_2", Value::Float(beta_2))]);
        }
        let mut p = aggregator(&rt, kind, &cfg);
        let mut reference = Adaptive { kind, eta, beta_1, beta_2, tau, m: vec![0.0; 4], v: vec![0.0; 4] };
        let mut w = vec![0.3f64, -0.1, 0.0, 0.8];
        for round in 1..=4u32 {
            let ups: Vec<(Vec<f32>, u64)> = (0..3)
                .map(|k| {
                    ((0..4).map(|i| (w[i] + 0.05 * (k as f64 - i as f64) * round as f64) as f32).collect(), 10 + k)
                })
                .collect();
            let wf: Vec<f64> = w.iter().map(|x| *x as f32 as f64).collect();
            let g = model(&[("w", f32s(&[4], &wf.iter().map(|x| *x as f32).collect::<Vec<_>>()))]);
            let got = values(&round_of(&mut p, round, &g, &ups).result.tensors);
            let total: f64 = ups.iter().map(|(_, n)| *n as f64).sum();
            let delta: Vec<f64> =
                (0..4).map(|i| ups.iter().map(|(u, n)| u[i] as f64 * *n as f64).sum::<f64>() / total - wf[i]).collect();
            w = reference.step(round, &wf, &delta);
            for i in 0..4 {
                // f32 storage of the model and the moments between steps.
                assert!(
                    (got[i] as f64 - w[i]).abs() < 1e-4 * (1.0 + w[i].abs()),
                    "{kind} round {round}: {got:?} vs {w:?}"
                );
            }
            w = got.iter().map(|x| *x as f64).collect();
            reference.m = reference.m.iter().map(|x| *x as f32 as f64).collect();
            reference.v = reference.v.iter().map(|x| *x as f32 as f64).collect();
        }
    }
}

#[test]
fn an_optimizers_state_survives_a_new_instance_bit_for_bit() {
    let (rt, _dir) = runtime();
    let global = model(&[("w", f32s(&[3], &[0.1, 0.2, 0.3]))]);
    let round1 = [(vec![0.4, 0.1, 0.0], 5), (vec![0.2, 0.5, 0.9], 7)];
    let round2 = [(vec![0.3, 0.3, 0.1], 4), (vec![0.0, 0.6, 0.7], 9)];
    for kind in ["fedadam", "fedyogi", "fedadagrad"] {
        let mut kept = aggregator(&rt, kind, &[]);
        let first = round_of(&mut kept, 1, &global, &round1);
        assert!(!first.result.state.is_empty(), "{kind} keeps moments in the host's state");
        let v1 = first.result.tensors.clone();
        let continued = round_of(&mut kept, 2, &v1, &round2).result;

        // A restarted cloud: a fresh instance given the committed state.
        let bytes = model_io::encode(&first.result.state, None).expect("encode");
        let mut fresh = aggregator(&rt, kind, &[]);
        fresh.set_state(model_io::decode(&bytes, std::path::Path::new("state")).expect("decode"));
        let restored = round_of(&mut fresh, 2, &v1, &round2).result;
        assert_eq!(restored.tensors, continued.tensors, "{kind}: bit-identical with the restored state");
        assert_eq!(restored.state, continued.state);

        // Without it the moments start over and the model differs: the state is what matters.
        let mut amnesic = aggregator(&rt, kind, &[]);
        assert_ne!(round_of(&mut amnesic, 2, &v1, &round2).result.tensors, continued.tensors, "{kind}");
    }
}

/// Honest updates around 1.0 and `bad` of them scaled by 100.
fn attacked(n: usize, bad: usize, len: usize) -> Vec<(Vec<f32>, u64)> {
    (0..n)
        .map(|k| {
            let honest: Vec<f32> = (0..len).map(|i| 1.0 + 0.01 * (((k * 7 + i * 3) % 11) as f32 - 5.0)).collect();
            let w = if k < bad { honest.iter().map(|x| x * 100.0).collect() } else { honest };
            (w, 10)
        })
        .collect()
}

#[test]
fn krum_and_bulyan_pick_the_honest_updates_when_some_are_scaled_by_100() {
    let (rt, _dir) = runtime();
    let global = model(&[("w", f32s(&[16], &flat(1.0, 16)))]);
    let in_honest_range = |w: &[f32]| w.iter().all(|x| (0.94..=1.06).contains(x));
    let ups = attacked(6, 1, 16);
    let mut krum = aggregator(&rt, "krum", &[("num_malicious_clients", Value::Integer(1))]);
    let out = values(&round_of(&mut krum, 1, &global, &ups).result.tensors);
    assert!(in_honest_range(&out), "krum: {out:?}");
    assert!(ups[1..].iter().any(|(w, _)| *w == out), "krum returns one honest update as it is");
    let mut multi = aggregator(
        &rt,
        "krum",
        &[("num_malicious_clients", Value::Integer(1)), ("num_clients_to_keep", Value::Integer(3))],
    );
    assert!(in_honest_range(&values(&round_of(&mut multi, 1, &global, &ups).result.tensors)));

    let ups = attacked(7, 1, 16);
    let mut bulyan = aggregator(&rt, "bulyan", &[("num_malicious_clients", Value::Integer(1))]);
    let out = values(&round_of(&mut bulyan, 1, &global, &ups).result.tensors);
    assert!(in_honest_range(&out), "bulyan: {out:?}");
    // FedAvg is dragged away by the one attacker.
    let mut avg = aggregator(&rt, "fedavg", &[]);
    assert!(!in_honest_range(&values(&round_of(&mut avg, 1, &global, &ups).result.tensors)));
    let mut median = aggregator(&rt, "fedmedian", &[]);
    assert!(in_honest_range(&values(&round_of(&mut median, 1, &global, &ups).result.tensors)));

    // Too few updates for f = 2 (4f + 3 = 11): refused with the reason.
    let mut strict = aggregator(&rt, "bulyan", &[("num_malicious_clients", Value::Integer(2))]);
    let e = run_round(&mut strict, &ctx(1), Some(&global), 7, |i| {
        Ok(update(&format!("c{i}"), 10, model(&[("w", f32s(&[16], &ups[i].0))])))
    })
    .expect_err("refused");
    assert!(e.to_string().contains("at least 11 updates"), "{e}");
}

#[test]
fn whole_round_statistics_over_stored_files_equal_a_float64_reference_across_chunks() {
    // Four updates of 2.2M elements: more than the host's chunk of values per call, so the
    // median is computed in several element ranges and on both cores, from the files.
    let dir = tempfile::tempdir().expect("dir");
    let len = 2_200_000usize;
    let updates: Vec<Vec<f32>> =
        (0..4).map(|k| (0..len).map(|i| ((i * (k + 3) + k * 17) % 1000) as f32 / 250.0 - 2.0).collect()).collect();
    let mut args: Vec<String> = vec!["plugin".into(), "aggregate".into(), "--plugin".into()];
    args.push(plugin("fedmedian").display().to_string());
    for (k, u) in updates.iter().enumerate() {
        let path = dir.path().join(format!("u{k}.safetensors"));
        model_io::write(&path, &model(&[("w", f32s(&[len as u64], u))]), None).expect("write");
        args.extend(["--update".into(), format!("{}={}", path.display(), k + 1)]);
    }
    let out_path = dir.path().join("median.safetensors");
    args.extend(["--output".into(), out_path.display().to_string(), "--timeout-ms".into(), "60000".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = nereid(&refs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = model_io::read(&out_path).expect("median");
    let got = get(&got, "w").as_f32().expect("f32");
    for i in (0..len).step_by(997).chain([len - 1]) {
        let mut column: Vec<f64> = updates.iter().map(|u| u[i] as f64).collect();
        column.sort_by(f64::total_cmp);
        let median = ((column[1] + column[2]) / 2.0) as f32;
        assert_eq!(got[i], median, "element {i}");
    }
}

#[test]
fn a_private_rounds_noise_has_the_configured_deviation() {
    // Four identical updates within the bound: what the plugin adds beyond their mean is its
    // noise, N(0, (z C / n)^2) per element = 0.25^2 here.
    let (rt, _dir) = runtime();
    let (z, c, n, len) = (1.0, 1.0, 4usize, 200_000usize);
    let cfg = [("noise_multiplier", Value::Float(z)), ("clipping_norm", Value::Float(c))];
    let mut p = aggregator(&rt, "dp-fixed-clipping", &cfg);
    let global = model(&[("w", f32s(&[len as u64], &flat(0.0, len)))]);
    let step = 0.5 / (len as f32).sqrt(); // the delta's norm is 0.5 < C
    let ups: Vec<(Vec<f32>, u64)> = (0..n).map(|k| (flat(step, len), 10 + k as u64)).collect();
    let report = round_of(&mut p, 1, &global, &ups);
    let noise: Vec<f64> = values(&report.result.tensors).iter().map(|v| *v as f64 - step as f64).collect();
    let mean = noise.iter().sum::<f64>() / len as f64;
    let sd = (noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (len - 1) as f64).sqrt();
    let want = z * c / n as f64;
    // The sample deviation's standard error is want / sqrt(2 len) = 0.0004: 5 of them.
    assert!((sd - want).abs() < 5.0 * want / (2.0 * len as f64).sqrt(), "deviation {sd}, configured {want}");
    assert!(mean.abs() < 5.0 * want / (len as f64).sqrt(), "mean {mean}");
    let metric = |name: &str| report.result.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    assert_eq!(metric("dp_noise_multiplier"), Some(z));
    assert_eq!(metric("dp_clipped_updates"), Some(0.0));
    // The same round again draws the same noise (a replay after a crash is bit-identical).
    let mut again = aggregator(&rt, "dp-fixed-clipping", &cfg);
    assert_eq!(round_of(&mut again, 1, &global, &ups).result.tensors, report.result.tensors);
}

#[test]
fn the_clipping_bound_holds_for_every_update_on_the_server_and_on_the_edge() {
    let (rt, _dir) = runtime();
    let c = 1.5;
    let global = model(&[("a", f32s(&[3], &[0.1, 0.2, 0.3])), ("b", f32s(&[2], &[1.0, -1.0]))]);
    let norm = |m: &NamedTensors| -> f64 {
        m.iter()
            .map(|(name, t)| {
                let g = get(&global, name).to_f64_vec();
                t.to_f64_vec().iter().zip(g).map(|(x, y)| (x - y).powi(2)).sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let cfg = [("noise_multiplier", Value::Float(0.0)), ("clipping_norm", Value::Float(c))];
    for scale in [0.1f32, 1.0, 3.0, 100.0, 1e4] {
        // One update per round: the round's result is that update clipped (no noise at z = 0).
        let mut p = aggregator(&rt, "dp-fixed-clipping", &cfg);
        let up = model(&[
            ("a", f32s(&[3], &[0.1 + scale, 0.2 - scale, 0.3 + 0.5 * scale])),
            ("b", f32s(&[2], &[1.0 + scale, -1.0])),
        ]);
        let raw = norm(&up);
        let r = run_round(&mut p, &ctx(1), Some(&global), 1, |_| Ok(update("k", 5, up.clone()))).expect("round");
        let clipped = norm(&r.result.tensors);
        assert!(clipped <= c * (1.0 + 1e-6), "scale {scale}: norm {clipped} > {c}");
        if raw <= c {
            assert!((clipped - raw).abs() < 1e-6, "an update within the bound is unchanged");
        } else {
            assert!((clipped - c).abs() < 1e-5 * c, "scaled to the bound: {clipped}");
        }
    }

    // On the edge: the compressor clips the difference before it is encoded for upload.
    let mut edge = nereid::runtime::CompressorPlugin::load(
        &rt,
        &plugin("dp-client-clipping"),
        nereid::runtime::Limits::default(),
        &config(&[("clipping_norm", Value::Float(c))]),
    )
    .expect("loads");
    let delta = model(&[("a", f32s(&[3], &[30.0, -40.0, 0.0])), ("b", f32s(&[2], &[0.0, 0.0]))]);
    let sent = edge.encode(&ctx(1), &delta).expect("encode");
    let sent_norm: f64 = sent.iter().flat_map(|(_, t)| t.to_f64_vec()).map(|x| x * x).sum::<f64>().sqrt();
    assert!((sent_norm - c).abs() < 1e-5, "{sent_norm}");
    let received = edge.decode(&ctx(1), &sent, "edge-1").expect("decode");
    assert_eq!(received, sent, "the cloud takes the clipped difference as it came");
}

#[test]
fn adaptive_clipping_moves_its_norm_toward_the_quantile_and_keeps_it_in_the_state() {
    let (rt, _dir) = runtime();
    let cfg = [
        ("noise_multiplier", Value::Float(0.5)),
        ("initial_clipping_norm", Value::Float(0.1)),
        ("clipped_count_stddev", Value::Float(0.5)),
    ];
    let mut p = aggregator(&rt, "dp-adaptive-clipping", &cfg);
    let global = model(&[("w", f32s(&[4], &flat(0.0, 4)))]);
    // Deltas of norm 1 and 2: all far above 0.1, so the norm grows round after round.
    let ups = [(flat(0.5, 4), 5), (flat(1.0, 4), 5), (flat(0.5, 4), 5), (flat(1.0, 4), 5)];
    let mut norms = Vec::new();
    for round in 1..=3 {
        let r = round_of(&mut p, round, &global, &ups).result;
        let metric = |name: &str| r.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v).expect(name);
        norms.push(metric("dp_clipping_norm"));
        assert_eq!(metric("dp_clipped_updates"), 4.0);
        let (_, kept) = r.state.iter().find(|(k, _)| k == "clipping_norm").expect("kept in the host's state");
        assert_eq!(kept.to_f64_vec(), vec![metric("dp_next_clipping_norm")]);
    }
    assert!(norms[0] == 0.1 && norms[1] > norms[0] && norms[2] > norms[1], "{norms:?}");
    // Too little noise on the count for the configured multiplier: refused with the reason.
    let mut bad = aggregator(&rt, "dp-adaptive-clipping", &[("noise_multiplier", Value::Float(1.0))]);
    let e = run_round(&mut bad, &ctx(1), Some(&global), 2, |i| {
        Ok(update(&format!("c{i}"), 5, model(&[("w", f32s(&[4], &ups[i].0))])))
    })
    .expect_err("refused");
    assert!(e.to_string().contains("clipped_count_stddev"), "{e}");
}
