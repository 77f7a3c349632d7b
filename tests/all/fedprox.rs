//! FedProx: the proximal term and its gradient against hand computations, and the server side.
use nereid::runtime::bindings::types::{ConfigEntry, ConfigValue};
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{Limits, ObjectivePlugin, PluginError, RoundContext};

use crate::common::*;

fn objective(cfg: &[(&str, toml::Value)]) -> (ObjectivePlugin, tempfile::TempDir) {
    let (rt, dir) = runtime();
    let p = ObjectivePlugin::load(&rt, &plugin("fedprox"), Limits::default(), &config(cfg))
        .expect("fedprox loads as client-objective");
    (p, dir)
}

fn mu(value: f64) -> Vec<ConfigEntry> {
    vec![ConfigEntry { key: "mu".into(), value: ConfigValue::Float(value) }]
}

#[test]
fn proximal_term_and_gradient_match_hand_computation() {
    let (mut obj, _dir) = objective(&[]);
    let global = model(&[("w", f32s(&[3], &[1.0, 2.0, 3.0])), ("b", f32s(&[1], &[0.0]))]);
    obj.begin_round(&RoundContext::default(), &global, &mu(0.5)).expect("begin");

    let w = f32s(&[3], &[2.0, 0.0, 3.5]);
    // mu/2 * ||w - w_g||^2 = 0.25 * (1 + 4 + 0.25) = 1.3125  (squared norm, not the norm: 0.25*sqrt(5.25))
    assert_eq!(obj.penalty("w", &w).expect("penalty"), 1.3125);
    // gradient += mu * (w - w_g) = 0.5 * [1, -2, 0.5]
    let mut g = f32s(&[3], &[0.1, 0.2, 0.3]);
    obj.adjust_gradient("w", &w, &mut g).expect("adjust");
    let got = g.as_f32().expect("f32");
    for (a, b) in got.iter().zip([0.6f32, -0.8, 0.55]) {
        assert!((a - b).abs() < 1e-6, "{got:?}");
    }
    // At the global model the term and its gradient vanish.
    assert_eq!(obj.penalty("b", &f32s(&[1], &[0.0])).expect("penalty"), 0.0);
    let mut gb = f32s(&[1], &[0.7]);
    obj.adjust_gradient("b", &f32s(&[1], &[0.0]), &mut gb).expect("adjust");
    assert_eq!(gb.as_f32(), Some(&[0.7f32][..]));
}

#[test]
fn mu_comes_from_the_server_else_from_the_plugins_own_config() {
    let global = model(&[("w", f32s(&[1], &[0.0]))]);
    let w = f32s(&[1], &[2.0]);

    let (mut own, _d1) = objective(&[("mu", toml::Value::Float(1.0))]);
    own.begin_round(&RoundContext::default(), &global, &[]).expect("begin");
    assert_eq!(own.penalty("w", &w).expect("penalty"), 2.0); // 1/2 * 4

    let (mut published, _d2) = objective(&[("mu", toml::Value::Float(1.0))]);
    published.begin_round(&RoundContext::default(), &global, &mu(0.25)).expect("begin");
    assert_eq!(published.penalty("w", &w).expect("penalty"), 0.5); // 0.25/2 * 4
}

#[test]
fn unknown_parameters_are_rejected_by_name() {
    let (mut obj, _dir) = objective(&[]);
    obj.begin_round(&RoundContext::default(), &model(&[("w", f32s(&[1], &[0.0]))]), &[]).expect("begin");
    let err = obj.penalty("nope", &f32s(&[1], &[1.0])).expect_err("not in the global model");
    assert!(matches!(&err, PluginError::Rejected { subject, .. } if subject == "parameter `nope`"), "{err}");
}

#[test]
fn server_side_aggregates_like_fedavg_and_publishes_mu() {
    let (rt, _dir) = runtime();
    let mut prox = aggregator(&rt, "fedprox", &[("mu", toml::Value::Float(0.3))]);
    let mut avg = aggregator(&rt, "fedavg", &[]);
    for agg in [&mut prox, &mut avg] {
        agg.begin_round(&RoundContext::default(), None).expect("begin");
        agg.accumulate(&update("a", 2, model(&[("w", f32s(&[2], &[1.0, 5.0]))]))).expect("a");
        agg.accumulate(&update("b", 6, model(&[("w", f32s(&[2], &[3.0, -1.0]))]))).expect("b");
    }
    let (p, a) = (prox.finish().expect("prox"), avg.finish().expect("avg"));
    assert_eq!(get(&p.tensors, "w"), get(&a.tensors, "w"));
    assert_eq!(get(&p.tensors, "w").as_f32(), Some(&[2.5f32, 0.5][..]));
    let published = prox.client_config().expect("client config");
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].key, "mu");
    assert!(matches!(published[0].value, ConfigValue::Float(v) if v == 0.3));
}

#[test]
fn bad_mu_is_refused_naming_the_key() {
    let (rt, _dir) = runtime();
    let negative = config(&[("mu", toml::Value::Float(-1.0))]);
    let err = nereid::runtime::AggregatorPlugin::load(&rt, &plugin("fedprox"), Limits::default(), &negative)
        .expect_err("negative");
    assert!(matches!(&err, PluginError::InvalidConfig { key, .. } if key == "mu"), "{err}");
    assert!(err.to_string().contains(">= 0"), "{err}");

    let text: ConfigTable = config(&[("mu", toml::Value::String("big".into()))]);
    let err =
        nereid::runtime::AggregatorPlugin::load(&rt, &plugin("fedprox"), Limits::default(), &text).expect_err("text");
    assert_eq!(
        err.to_string(),
        "plugin `fedprox`: invalid configuration: key `mu`: expected a number, got string `\"big\"`"
    );

    let unknown = config(&[("nu", toml::Value::Float(1.0))]);
    let err = nereid::runtime::AggregatorPlugin::load(&rt, &plugin("fedprox"), Limits::default(), &unknown)
        .expect_err("unknown");
    assert!(err.to_string().contains("key `nu`: unknown option; this plugin accepts: mu"), "{err}");
}
