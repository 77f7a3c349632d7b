//! `nereid plugin demo`: both plugins over generated client updates of a small MLP, checked against a
//! float64 reference computed natively, including updates the aggregator must refuse.
use std::path::PathBuf;

use anyhow::{ensure, Context};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use nereid::aggregate::{run_round, Rejection};
use nereid::model_io::NamedTensors;
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{AggregatorPlugin, ClientUpdate, Limits, ObjectivePlugin, RoundContext, Runtime, UpdateKind};
use nereid::tensor::Tensor;

#[derive(Args)]
pub struct DemoArgs {
    /// Directory of the built plugins [default: $NEREID_PLUGIN_DIR, else target/wasm32-wasip2/plugin].
    #[arg(long, value_name = "DIR")]
    plugins_dir: Option<PathBuf>,
    /// Number of well-behaved clients.
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// FedProx's mu.
    #[arg(long, default_value_t = 0.1)]
    mu: f64,
    /// Seed of the generated model and updates.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct AggregationRun {
    plugin: String,
    accepted: Vec<String>,
    rejected: Vec<Rejection>,
    max_relative_error_vs_f64_reference: f64,
    published_to_clients: Vec<(String, String)>,
}

#[derive(Serialize)]
struct ProximalCheck {
    mu: f64,
    penalty: f64,
    penalty_by_hand: f64,
    max_gradient_error: f64,
}

#[derive(Serialize)]
struct DemoReport {
    clients: Vec<(String, u64)>,
    parameters: u64,
    runs: Vec<AggregationRun>,
    fedprox_client_term: ProximalCheck,
}

const LAYOUT: [(&str, &[u64]); 4] =
    [("fc1.weight", &[64, 32]), ("fc1.bias", &[32]), ("fc2.weight", &[32, 10]), ("fc2.bias", &[10])];

fn random_model(rng: &mut impl Rng, scale: f32) -> NamedTensors {
    LAYOUT
        .iter()
        .map(|(name, shape)| {
            let n: u64 = shape.iter().product();
            let data = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
            (name.to_string(), Tensor::from_f32(shape.to_vec(), data).expect("shape matches"))
        })
        .collect()
}

fn perturb(base: &NamedTensors, rng: &mut impl Rng) -> NamedTensors {
    base.iter()
        .map(|(name, t)| {
            let data = t.as_f32().expect("f32 model").iter().map(|x| x + rng.gen_range(-0.1f32..0.1)).collect();
            (name.clone(), Tensor::from_f32(t.shape().to_vec(), data).expect("same shape"))
        })
        .collect()
}

/// sum_k n_k w_k / sum_k n_k in f64, per tensor.
fn reference(updates: &[ClientUpdate]) -> Vec<Vec<f64>> {
    let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
    (0..LAYOUT.len())
        .map(|i| {
            let mut acc = vec![0f64; updates[0].tensors[i].1.numel() as usize];
            for u in updates {
                for (a, x) in acc.iter_mut().zip(u.tensors[i].1.to_f64_vec()) {
                    *a += u.num_examples as f64 * x;
                }
            }
            acc.iter().map(|a| a / total).collect()
        })
        .collect()
}

fn max_relative_error(result: &NamedTensors, expected: &[Vec<f64>]) -> anyhow::Result<f64> {
    let mut worst = 0f64;
    for ((name, _), exp) in LAYOUT.iter().zip(expected) {
        let got =
            result.iter().find(|(n, _)| n == name).with_context(|| format!("the result has no tensor `{name}`"))?;
        for (g, e) in got.1.to_f64_vec().iter().zip(exp) {
            worst = worst.max((g - e).abs() / e.abs().max(1e-12));
        }
    }
    Ok(worst)
}

pub fn run(args: DemoArgs, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = args.plugins_dir.clone().unwrap_or_else(crate::cli::default_plugin_dir);
    let runtime = Runtime::new(cache_dir)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let global = random_model(&mut rng, 0.5);

    let mut updates: Vec<ClientUpdate> = (0..args.clients)
        .map(|k| ClientUpdate {
            client: format!("edge-{k}"),
            kind: UpdateKind::Weights,
            tensors: perturb(&global, &mut rng),
            num_examples: rng.gen_range(20..400),
            metrics: Vec::new(),
            file: None,
        })
        .collect();
    let good = updates.clone();
    // Updates the aggregators must refuse while counting the others.
    let mut poisoned = perturb(&global, &mut rng);
    poisoned[2].1 = Tensor::from_f32(vec![32, 10], vec![f32::NAN; 320]).expect("shape");
    updates.push(ClientUpdate {
        client: "edge-nan".into(),
        kind: UpdateKind::Weights,
        tensors: poisoned,
        num_examples: 100,
        metrics: Vec::new(),
        file: None,
    });
    let mut misshapen = perturb(&global, &mut rng);
    misshapen[1].1 = Tensor::from_f32(vec![16], vec![0.0; 16]).expect("shape");
    updates.push(ClientUpdate {
        client: "edge-shape".into(),
        kind: UpdateKind::Weights,
        tensors: misshapen,
        num_examples: 100,
        metrics: Vec::new(),
        file: None,
    });
    updates.push(ClientUpdate {
        client: "edge-empty".into(),
        kind: UpdateKind::Weights,
        tensors: perturb(&global, &mut rng),
        num_examples: 0,
        metrics: Vec::new(),
        file: None,
    });

    let expected = reference(&good);
    let ctx = RoundContext { job: "demo".into(), round: 1, seed: args.seed };
    let mut runs = Vec::new();
    for (name, config) in [
        ("fedavg", ConfigTable::new()),
        ("fedprox", ConfigTable::from([("mu".to_string(), toml::Value::Float(args.mu))])),
    ] {
        let path = crate::cli::plugin_path(&dir, name);
        let mut plugin = AggregatorPlugin::load(&runtime, &path, Limits::default(), &config)
            .with_context(|| format!("loading {} (build the plugins with `cargo xtask plugins`)", path.display()))?;
        let report = run_round(&mut plugin, &ctx, Some(&global), updates.len(), |i| Ok(updates[i].clone()))?;
        let published = plugin
            .client_config()?
            .iter()
            .map(|e| (e.key.clone(), nereid::runtime::config::value_label(&e.value)))
            .collect();
        runs.push(AggregationRun {
            plugin: name.to_string(),
            accepted: report.accepted,
            rejected: report.rejected,
            max_relative_error_vs_f64_reference: max_relative_error(&report.result.tensors, &expected)?,
            published_to_clients: published,
        });
    }

    // FedProx on the client: penalty and gradient of mu/2 ||w - w_global||^2 on one local step.
    let fedprox = crate::cli::plugin_path(&dir, "fedprox");
    let mut objective = ObjectivePlugin::load(&runtime, &fedprox, Limits::default(), &ConfigTable::new())?;
    let server = AggregatorPlugin::load(
        &runtime,
        &fedprox,
        Limits::default(),
        &ConfigTable::from([("mu".to_string(), toml::Value::Float(args.mu))]),
    )?
    .client_config()?;
    objective.begin_round(&ctx, &global, &server)?;
    let local = &good[0].tensors;
    let (mut penalty, mut by_hand, mut grad_err) = (0f64, 0f64, 0f64);
    for ((name, w), (_, wg)) in local.iter().zip(&global) {
        penalty += objective.penalty(name, w)?;
        let diff: Vec<f64> = w.to_f64_vec().iter().zip(wg.to_f64_vec()).map(|(a, b)| a - b).collect();
        by_hand += 0.5 * args.mu * diff.iter().map(|d| d * d).sum::<f64>();
        let g0: Vec<f32> = (0..w.numel()).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut grad = Tensor::from_f32(w.shape().to_vec(), g0.clone()).expect("shape");
        objective.adjust_gradient(name, w, &mut grad)?;
        for ((g, g0), d) in grad.to_f64_vec().iter().zip(&g0).zip(&diff) {
            grad_err = grad_err.max((g - (*g0 as f64 + args.mu * d)).abs());
        }
    }

    let report = DemoReport {
        clients: updates.iter().map(|u| (u.client.clone(), u.num_examples)).collect(),
        parameters: global.iter().map(|(_, t)| t.numel()).sum(),
        runs,
        fedprox_client_term: ProximalCheck {
            mu: args.mu,
            penalty,
            penalty_by_hand: by_hand,
            max_gradient_error: grad_err,
        },
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    for run in &report.runs {
        ensure!(run.accepted.len() == args.clients, "{}: expected {} accepted updates", run.plugin, args.clients);
        ensure!(
            run.max_relative_error_vs_f64_reference <= 1e-6,
            "{}: result differs from the f64 reference",
            run.plugin
        );
    }
    ensure!((penalty - by_hand).abs() <= 1e-9 * by_hand.max(1.0), "fedprox penalty differs from the hand computation");
    ensure!(grad_err <= 1e-6, "fedprox gradient differs from the hand computation");
    Ok(())
}

fn print_report(r: &DemoReport) {
    println!("nereid demo: one aggregation round of a {}-parameter MLP (4 tensors, f32)", r.parameters);
    println!(
        "clients and example counts: {}",
        r.clients.iter().map(|(c, n)| format!("{c}={n}")).collect::<Vec<_>>().join(" ")
    );
    println!();
    println!(
        "{:<10} {:>9} {:>9}  {:>26}  published to clients",
        "plugin", "accepted", "rejected", "max rel. error vs f64 ref"
    );
    for run in &r.runs {
        let published: Vec<String> = run.published_to_clients.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<10} {:>9} {:>9}  {:>26.2e}  {}",
            run.plugin,
            run.accepted.len(),
            run.rejected.len(),
            run.max_relative_error_vs_f64_reference,
            if published.is_empty() { "-".to_string() } else { published.join(" ") }
        );
    }
    if let Some(run) = r.runs.first() {
        println!();
        println!("refused by {} (the other updates still count):", run.plugin);
        for rej in &run.rejected {
            println!("  {}: {}", rej.update, rej.reason);
        }
    }
    let p = &r.fedprox_client_term;
    println!();
    println!(
        "fedprox client term, mu = {}: penalty mu/2*||w - w_global||^2 = {:.6} (by hand {:.6}); gradient",
        p.mu, p.penalty, p.penalty_by_hand
    );
    println!("  += mu*(w - w_global): max error {:.1e}", p.max_gradient_error);
}
