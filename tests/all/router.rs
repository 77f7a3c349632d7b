//! The router slot (joint inference) with the hard-example-mining plugin: every policy against
//! decisions and scores computed by hand.
use nereid::runtime::{Decision, Limits, PluginError, Route, RouterPlugin, Runtime};

use crate::common::*;

fn router(runtime: &Runtime, cfg: &[(&str, toml::Value)]) -> Result<RouterPlugin, PluginError> {
    RouterPlugin::load(runtime, &plugin("hard-example-mining"), Limits::default(), &config(cfg))
}

fn decide(r: &mut RouterPlugin, p: &[f32]) -> Decision {
    r.decide(&f32s(&[1, p.len() as u64], p)).expect("decision")
}

fn text(s: &str) -> toml::Value {
    toml::Value::String(s.into())
}

// Hand computations (natural logs):
//   p1 = [0.7, 0.2, 0.1]: max 0.7; sum p ln p = -0.2496725 - 0.3218876 - 0.2302585 = -0.8018186,
//       / ln 3 (1.0986123) = -0.7298467, conf = 0.2701533
//   p2 = [0.96, 0.02, 0.02]: max 0.96; sum p ln p = -0.0391891 - 2 * 0.0782405 = -0.1956701,
//       / ln 3 = -0.1781065, conf = 0.8218935
//   p3 = [0.25; 4]: max 0.25; conf = 1 + ln 0.25 / ln 4 = 0
//   p4 = [0, 1, 0]: max 1; conf = 1 (0 ln 0 = 0)
const P1: [f32; 3] = [0.7, 0.2, 0.1];
const P2: [f32; 3] = [0.96, 0.02, 0.02];
const P3: [f32; 4] = [0.25; 4];
const P4: [f32; 3] = [0.0, 1.0, 0.0];

#[test]
fn max_probability_and_cross_entropy_policies_match_hand_computations() {
    let (runtime, _dir) = runtime();
    let mut max_p = router(&runtime, &[("policy", text("max-probability")), ("threshold", 0.8.into())]).expect("loads");
    let mut ce = router(&runtime, &[("policy", text("cross-entropy")), ("threshold", 0.5.into())]).expect("loads");
    let cases: [(&[f32], f64, Route, f64, Route); 4] = [
        (&P1, 0.7, Route::Cloud, 0.2701533, Route::Cloud),
        (&P2, 0.96, Route::Edge, 0.8218935, Route::Edge),
        (&P3, 0.25, Route::Cloud, 0.0, Route::Cloud),
        (&P4, 1.0, Route::Edge, 1.0, Route::Edge),
    ];
    for (p, max_score, max_route, conf, ce_route) in cases {
        let d = decide(&mut max_p, p);
        assert_eq!(d.route, max_route, "max-probability on {p:?}");
        assert!((d.score - max_score).abs() < 1e-6, "{p:?}: {}", d.score);
        let d = decide(&mut ce, p);
        assert_eq!(d.route, ce_route, "cross-entropy on {p:?}");
        assert!((d.score - conf).abs() < 1e-6, "{p:?}: {} vs {conf}", d.score);
    }
    // The threshold decides: p2's confidence 0.82 is hard under 0.9.
    let mut strict = router(&runtime, &[("policy", text("cross-entropy")), ("threshold", 0.9.into())]).expect("loads");
    assert_eq!(decide(&mut strict, &P2).route, Route::Cloud);
    // Logits: softmax([2, 1, 0.1]) = [0.6590012, 0.2424330, 0.0985659].
    let mut logits =
        router(&runtime, &[("policy", text("max-probability")), ("input", text("logits"))]).expect("loads");
    let d = decide(&mut logits, &[2.0, 1.0, 0.1]);
    assert_eq!(d.route, Route::Cloud);
    assert!((d.score - 0.6590012).abs() < 1e-6, "{}", d.score);
}

#[test]
fn random_edge_only_and_cloud_only_policies() {
    let (runtime, _dir) = runtime();
    let draw = |seed: i64| -> Vec<Route> {
        let mut r = router(&runtime, &[("policy", text("random")), ("probability", 0.3.into()), ("seed", seed.into())])
            .expect("loads");
        (0..10_000).map(|_| decide(&mut r, &P2).route).collect()
    };
    let a = draw(42);
    let share = a.iter().filter(|r| **r == Route::Cloud).count() as f64 / a.len() as f64;
    // 3 standard deviations of a binomial share at n = 10,000, p = 0.3: 0.0137.
    assert!((share - 0.3).abs() < 0.0137, "share {share}");
    assert_eq!(a, draw(42), "the same seed gives the same decisions");
    assert_ne!(a, draw(43));
    let mut edge = router(&runtime, &[("policy", text("edge-only"))]).expect("loads");
    let mut cloud = router(&runtime, &[("policy", text("cloud-only"))]).expect("loads");
    for p in [&P1[..], &P3[..], &P4[..]] {
        assert_eq!(decide(&mut edge, p), Decision { route: Route::Edge, score: 1.0 });
        assert_eq!(decide(&mut cloud, p), Decision { route: Route::Cloud, score: 0.0 });
    }
}

#[test]
fn bad_outputs_and_configs_are_refused() {
    let (runtime, _dir) = runtime();
    let mut r = router(&runtime, &[]).expect("defaults");
    let e = r.decide(&f32s(&[2], &[0.5, 0.6])).expect_err("not a distribution");
    assert!(e.to_string().contains("not a probability vector"), "{e}");
    assert!(r.decide(&f32s(&[1], &[1.0])).is_err(), "one class is no choice");
    assert_eq!(decide(&mut r, &P2).route, Route::Edge, "the instance still serves");
    let e = router(&runtime, &[("policy", text("oracle"))]).expect_err("unknown policy");
    assert!(matches!(&e, PluginError::InvalidConfig { key, .. } if key == "policy"), "{e}");
    let e = router(&runtime, &[("threshold", 1.5.into())]).expect_err("out of range");
    assert!(matches!(&e, PluginError::InvalidConfig { key, .. } if key == "threshold"), "{e}");
}
