//! FedAvg: exact numbers, precision, and every rejection case.
use nereid::aggregate::run_round;
use nereid::runtime::{PluginError, RoundContext, UpdateKind};
use nereid::tensor::Tensor;

use crate::common::*;

fn ctx() -> RoundContext {
    RoundContext { job: "test".into(), round: 1, seed: 0 }
}

#[test]
fn weighted_average_matches_hand_computation() {
    let (rt, _cache) = runtime();
    let mut agg = aggregator(&rt, "fedavg", &[]);
    agg.begin_round(&ctx(), None).expect("begin");
    // Unequal example counts 1, 2, 5 (total 8), two tensors, one of them 2-D.
    agg.accumulate(&update(
        "a",
        1,
        model(&[("w", f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0])), ("b", f32s(&[2], &[8.0, 0.0]))]),
    ))
    .expect("a");
    agg.accumulate(&update(
        "b",
        2,
        model(&[("w", f32s(&[2, 2], &[3.0, 0.0, 1.0, 2.0])), ("b", f32s(&[2], &[0.0, 4.0]))]),
    ))
    .expect("b");
    agg.accumulate(&update(
        "c",
        5,
        model(&[("w", f32s(&[2, 2], &[-1.0, 4.0, 0.0, 0.75])), ("b", f32s(&[2], &[1.5, -1.5]))]),
    ))
    .expect("c");
    let out = agg.finish().expect("finish");
    // w: (1*[1,2,3,4] + 2*[3,0,1,2] + 5*[-1,4,0,0.75]) / 8 = [2, 22, 5, 11.75]/8
    assert_eq!(get(&out.tensors, "w").as_f32(), Some(&[0.25, 2.75, 0.625, 1.46875][..]));
    // b: (1*[8,0] + 2*[0,4] + 5*[1.5,-1.5]) / 8 = [15.5, 0.5]/8
    assert_eq!(get(&out.tensors, "b").as_f32(), Some(&[1.9375, 0.0625][..]));
    assert_eq!(get(&out.tensors, "w").shape(), &[2, 2]);
    let metric = |k: &str| out.metrics.iter().find(|(n, _)| n == k).map(|m| m.1);
    assert_eq!(metric("accepted_updates"), Some(3.0));
    assert_eq!(metric("total_weight"), Some(8.0));
}

#[test]
fn f64_models_stay_f64_and_match_a_float64_reference() {
    let (rt, _cache) = runtime();
    let mut agg = aggregator(&rt, "fedavg", &[]);
    agg.begin_round(&ctx(), None).expect("begin");
    let n = 10_000;
    let mut reference = vec![0f64; n];
    let counts = [3u64, 700, 41, 9999];
    let mut total = 0f64;
    for (k, count) in counts.iter().enumerate() {
        // Values of very different magnitudes, where f32 accumulation would lose digits.
        let w: Vec<f64> = (0..n).map(|i| ((i * 31 + k * 17) % 997) as f64 * 1e-3 + (k as f64) * 1e4).collect();
        for (r, x) in reference.iter_mut().zip(&w) {
            *r += *count as f64 * x;
        }
        total += *count as f64;
        agg.accumulate(&update(&format!("c{k}"), *count, model(&[("w", f64s(&[n as u64], &w))]))).expect("accumulate");
    }
    let out = agg.finish().expect("finish");
    let got = get(&out.tensors, "w").as_f64().expect("f64 in, f64 out");
    for (g, r) in got.iter().zip(&reference) {
        let r = r / total;
        assert!((g - r).abs() <= 1e-12 * r.abs().max(1.0), "{g} vs {r}");
    }
}

#[test]
fn f32_result_is_within_1e6_of_a_float64_reference() {
    let (rt, _cache) = runtime();
    let mut agg = aggregator(&rt, "fedavg", &[]);
    agg.begin_round(&ctx(), None).expect("begin");
    let n = 50_000;
    let mut reference = vec![0f64; n];
    let mut total = 0f64;
    for k in 0..20u64 {
        let w: Vec<f32> = (0..n).map(|i| (((i as u64 * 7919 + k * 104_729) % 10_007) as f32 - 5000.0) * 1e-3).collect();
        let count = 1 + k * k * 37;
        for (r, x) in reference.iter_mut().zip(&w) {
            *r += count as f64 * *x as f64;
        }
        total += count as f64;
        agg.accumulate(&update(&format!("c{k}"), count, model(&[("w", f32s(&[n as u64], &w))]))).expect("accumulate");
    }
    let out = agg.finish().expect("finish");
    let got = get(&out.tensors, "w").as_f32().expect("f32 in, f32 out");
    for (g, r) in got.iter().zip(&reference) {
        let r = r / total;
        assert!((*g as f64 - r).abs() <= 1e-6 * r.abs().max(1e-3), "{g} vs {r}");
    }
}

#[test]
fn delta_updates_are_added_to_the_global_model() {
    let (rt, _cache) = runtime();
    let mut agg = aggregator(&rt, "fedavg", &[]);
    let global = model(&[("w", f32s(&[2], &[10.0, 20.0]))]);
    agg.begin_round(&ctx(), Some(&global)).expect("begin");
    let mut d1 = update("a", 1, model(&[("w", f32s(&[2], &[1.0, -1.0]))]));
    d1.kind = UpdateKind::Delta;
    let mut d2 = update("b", 3, model(&[("w", f32s(&[2], &[-1.0, 3.0]))]));
    d2.kind = UpdateKind::Delta;
    agg.accumulate(&d1).expect("a");
    agg.accumulate(&d2).expect("b");
    let weights = update("c", 1, model(&[("w", f32s(&[2], &[0.0, 0.0]))]));
    let err = agg.accumulate(&weights).expect_err("mixing kinds");
    assert!(err.to_string().contains("update `c`"), "{err}");
    let out = agg.finish().expect("finish");
    // 10 + (1 - 3)/4, 20 + (-1 + 9)/4
    assert_eq!(get(&out.tensors, "w").as_f32(), Some(&[9.5, 22.0][..]));
}

#[test]
fn every_bad_update_is_rejected_by_name_and_the_others_still_count() {
    let (rt, _cache) = runtime();
    let mut agg = aggregator(&rt, "fedavg", &[]);
    let good = |v: f32| model(&[("w", f32s(&[2], &[v, v])), ("b", f32s(&[1], &[v]))]);
    let cases: Vec<(&str, u64, _, &str)> = vec![
        ("missing", 1, model(&[("w", f32s(&[2], &[1.0, 1.0]))]), "tensor `b` is missing"),
        (
            "extra",
            1,
            model(&[("w", f32s(&[2], &[1.0, 1.0])), ("b", f32s(&[1], &[1.0])), ("x", f32s(&[1], &[1.0]))]),
            "unexpected extra tensor `x`",
        ),
        (
            "shape",
            1,
            model(&[("w", f32s(&[3], &[1.0, 1.0, 1.0])), ("b", f32s(&[1], &[1.0]))]),
            "tensor `w` has shape [3], expected [2]",
        ),
        (
            "dtype",
            1,
            model(&[("w", f64s(&[2], &[1.0, 1.0])), ("b", f32s(&[1], &[1.0]))]),
            "tensor `w` has dtype f64, expected f32",
        ),
        (
            "nan",
            1,
            model(&[("w", f32s(&[2], &[1.0, f32::NAN])), ("b", f32s(&[1], &[1.0]))]),
            "tensor `w` contains NaN or Inf",
        ),
        (
            "inf",
            1,
            model(&[("w", f32s(&[2], &[1.0, 1.0])), ("b", f32s(&[1], &[f32::NEG_INFINITY]))]),
            "tensor `b` contains NaN or Inf",
        ),
        ("zero", 0, good(5.0), "zero examples"),
    ];
    agg.begin_round(&ctx(), None).expect("begin");
    agg.accumulate(&update("first", 1, good(1.0))).expect("first");
    for (client, n, tensors, expected) in &cases {
        let err = agg.accumulate(&update(client, *n, tensors.clone())).expect_err(client);
        match &err {
            PluginError::Rejected { plugin, subject, message } => {
                assert_eq!(plugin, "fedavg");
                assert_eq!(subject, &format!("update `{client}`"));
                assert!(message.contains(expected), "{client}: {message}");
            }
            other => panic!("{client}: expected a rejection, got {other}"),
        }
    }
    agg.accumulate(&update("last", 3, good(3.0))).expect("last");
    let out = agg.finish().expect("finish");
    // Only `first` (n=1, 1.0) and `last` (n=3, 3.0) count: (1 + 9) / 4 = 2.5
    assert_eq!(get(&out.tensors, "w").as_f32(), Some(&[2.5, 2.5][..]));
    assert_eq!(get(&out.tensors, "b").as_f32(), Some(&[2.5][..]));
}

#[test]
fn the_global_model_fixes_the_layout_of_the_first_update() {
    let (rt, _cache) = runtime();
    let mut agg = aggregator(&rt, "fedavg", &[]);
    let global = model(&[("w", f32s(&[2], &[0.0, 0.0]))]);
    agg.begin_round(&ctx(), Some(&global)).expect("begin");
    let err = agg.accumulate(&update("a", 1, model(&[("w", f32s(&[3], &[1.0, 1.0, 1.0]))]))).expect_err("wrong shape");
    assert!(err.to_string().contains("shape [3], expected [2]"), "{err}");
}

#[test]
fn a_round_with_no_accepted_update_fails_clearly() {
    let (rt, _cache) = runtime();
    let mut agg = aggregator(&rt, "fedavg", &[]);
    agg.begin_round(&ctx(), None).expect("begin");
    let err = agg.finish().expect_err("nothing to average");
    assert!(matches!(err, PluginError::BadState { .. }), "{err}");
    assert!(err.to_string().contains("no update was accepted"), "{err}");
}

#[test]
fn result_does_not_depend_on_which_instance_saw_the_updates() {
    // The same updates in two orders give the same model (to the last bit for these values).
    let (rt, _cache) = runtime();
    let ups: Vec<_> = (0..5u64)
        .map(|k| update(&format!("c{k}"), k + 1, model(&[("w", f32s(&[3], &[k as f32, 0.5 * k as f32, -(k as f32)]))])))
        .collect();
    let run = |order: &[usize]| {
        let mut agg = aggregator(&rt, "fedavg", &[]);
        let report = run_round(&mut agg, &ctx(), None, order.len(), |i| Ok(ups[order[i]].clone())).expect("round");
        get(&report.result.tensors, "w").clone()
    };
    let a: Tensor = run(&[0, 1, 2, 3, 4]);
    let b: Tensor = run(&[4, 2, 0, 3, 1]);
    assert_eq!(a, b);
}
