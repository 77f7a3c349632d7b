//! Hard example mining for joint inference: from the edge model's class probabilities (or
//! logits), decide whether the edge's answer stands or the example goes to the cloud.
//!
//! Policies (`policy`):
//! - `max-probability`: hard if the top class probability is below `threshold`;
//! - `cross-entropy` (Sedna's CrossEntropyFilter): conf = 1 + sum(p log p) / log K, hard if
//!   conf is below `threshold` (conf is 1 for a one-hot output, 0 for a uniform one);
//! - `random`: hard with probability `probability`, from a generator seeded with `seed`;
//! - `edge-only`, `cloud-only`.
//!
//! The output is read as one distribution over its K = numel elements.
use nereid_sdk::prelude::*;
use nereid_sdk::random::SplitMix64;

#[derive(Default)]
struct HardExampleMining {
    policy: Policy,
    threshold: f64,
    probability: f64,
    logits: bool,
    /// The `random` policy's generator.
    random: SplitMix64,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum Policy {
    #[default]
    MaxProbability,
    CrossEntropy,
    Random,
    EdgeOnly,
    CloudOnly,
}

impl Plugin for HardExampleMining {
    fn info() -> Info {
        Info::new("hard-example-mining", "0.1.0", "Routes an edge inference to the cloud when it is a hard example")
            .text(
                "policy",
                Some("max-probability"),
                "max-probability | cross-entropy | random | edge-only | cloud-only",
            )
            .float("threshold", Some(0.8), "max-probability, cross-entropy: hard below this score, in [0, 1]")
            .float("probability", Some(0.1), "random: share of examples sent to the cloud, in [0, 1]")
            .integer("seed", Some(0), "random: seed of the generator")
            .text("input", Some("probabilities"), "probabilities | logits (softmax applied first)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.policy = match config.text("policy")? {
            "max-probability" => Policy::MaxProbability,
            "cross-entropy" => Policy::CrossEntropy,
            "random" => Policy::Random,
            "edge-only" => Policy::EdgeOnly,
            "cloud-only" => Policy::CloudOnly,
            other => {
                return Err(PluginError::invalid_config(
                    "policy",
                    format!("`{other}` is not one of max-probability, cross-entropy, random, edge-only, cloud-only"),
                ))
            }
        };
        let unit = |key: &str| -> Result<f64, PluginError> {
            let v = config.f64(key)?;
            if (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(PluginError::invalid_config(key, format!("must be in [0, 1], got {v}")))
            }
        };
        self.threshold = unit("threshold")?;
        self.probability = unit("probability")?;
        self.random = SplitMix64::new(config.i64("seed")? as u64);
        self.logits = match config.text("input")? {
            "probabilities" => false,
            "logits" => true,
            other => {
                return Err(PluginError::invalid_config("input", format!("`{other}` is not probabilities or logits")))
            }
        };
        Ok(())
    }
}

impl HardExampleMining {
    fn distribution(&self, output: &Tensor) -> Result<Vec<f64>, PluginError> {
        let k = output.numel();
        if k < 2 || k > u64::from(nereid_sdk::max_chunk()) {
            return Err(PluginError::rejected(format!(
                "expected a distribution over 2..={} classes, got {k} values",
                nereid_sdk::max_chunk()
            )));
        }
        let mut p = output.read(0, k as u32)?;
        if p.iter().any(|v| !v.is_finite()) {
            return Err(PluginError::rejected("the edge model's output is not finite"));
        }
        if self.logits {
            let max = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            p.iter_mut().for_each(|v| *v = (*v - max).exp());
            let sum: f64 = p.iter().sum();
            p.iter_mut().for_each(|v| *v /= sum);
        } else {
            let sum: f64 = p.iter().sum();
            if p.iter().any(|v| *v < 0.0) || (sum - 1.0).abs() > 1e-3 {
                return Err(PluginError::rejected(format!(
                    "the edge model's output is not a probability vector (sum {sum}); set input = \"logits\" for raw scores"
                )));
            }
        }
        Ok(p)
    }
}

impl Router for HardExampleMining {
    fn decide(&mut self, output: &Tensor) -> Result<Decision, PluginError> {
        let by_score = |score: f64, threshold: f64| Decision {
            route: if score < threshold { Route::Cloud } else { Route::Edge },
            score,
        };
        Ok(match self.policy {
            Policy::EdgeOnly => Decision { route: Route::Edge, score: 1.0 },
            Policy::CloudOnly => Decision { route: Route::Cloud, score: 0.0 },
            Policy::Random => {
                let u = self.random.next_f64();
                Decision { route: if u < self.probability { Route::Cloud } else { Route::Edge }, score: u }
            }
            Policy::MaxProbability => {
                let p = self.distribution(output)?;
                by_score(p.iter().cloned().fold(0.0, f64::max), self.threshold)
            }
            Policy::CrossEntropy => {
                let p = self.distribution(output)?;
                let k = p.len() as f64;
                let sum: f64 = p.iter().filter(|v| **v > 0.0).map(|v| v * v.ln()).sum();
                by_score(1.0 + sum / k.ln(), self.threshold)
            }
        })
    }
}

nereid_sdk::export_router!(HardExampleMining);
