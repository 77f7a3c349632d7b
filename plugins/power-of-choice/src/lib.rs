//! Power-of-Choice client selection (Cho, Wang and Joshi, "Towards Understanding Biased Client
//! Selection in Federated Learning", AISTATS 2022): each round, draw `candidates` nodes uniformly
//! without replacement, then keep the `count` of them with the highest local loss, so training
//! leans toward the nodes the model serves worst.
//!
//! It is a sampler: the cloud's `[client_selection]` hands it the online nodes as samples (`id`:
//! the node's position among them, `label`: its last reported training loss in millionths, -1
//! when it has reported none: such nodes go first, so every node is tried) and `draw`s the
//! round's selection. As an edge's replay sampler it keeps every sample and draws the
//! highest-labelled of a random candidate set likewise.
use nereid_sdk::prelude::*;
use nereid_sdk::random::{below, mix};

#[derive(Default)]
struct PowerOfChoice {
    candidates: f64,
    seed: u64,
    held: Vec<SampleRef>,
}

impl Plugin for PowerOfChoice {
    fn info() -> Info {
        Info::new(
            "power-of-choice",
            env!("CARGO_PKG_VERSION"),
            "Selects the highest-loss nodes of a random candidate set",
        )
        .float("candidates", Some(2.0), "Candidate set size as a multiple of the selection (d / m >= 1)")
        .integer("seed", Some(0), "Mixed with the round's seed for the candidate draw")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.candidates = config.f64("candidates")?;
        if !(self.candidates.is_finite() && self.candidates >= 1.0) {
            return Err(PluginError::invalid_config("candidates", format!("must be >= 1, got {}", self.candidates)));
        }
        self.seed = config.i64("seed")? as u64;
        Ok(())
    }
}

impl Sampler for PowerOfChoice {
    fn restore(&mut self, held: &[SampleRef], _offered: u64) -> Result<(), PluginError> {
        self.held = held.to_vec();
        self.held.sort_by_key(|s| s.id);
        Ok(())
    }

    fn offer(&mut self, sample: SampleRef) -> Result<Admission, PluginError> {
        if self.held.iter().any(|s| s.id == sample.id) {
            return Err(PluginError::rejected(format!("sample {} is held already", sample.id)));
        }
        self.held.push(sample);
        Ok(Admission::Keep(None))
    }

    fn draw(&mut self, ctx: &RoundContext, count: u32) -> Result<Vec<u64>, PluginError> {
        let n = self.held.len();
        let take = (count as usize).min(n);
        let d = ((take as f64 * self.candidates).ceil() as usize).clamp(take, n);
        // d candidates, uniformly without replacement (a partial Fisher-Yates shuffle).
        let mut pool = self.held.clone();
        let key = mix(self.seed ^ mix(ctx.seed) ^ mix(ctx.round as u64 + 1));
        for i in 0..d {
            let j = i + below(key, i as u64, (n - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(d);
        // Highest loss first; never-reported (-1) before every reported one; ties by id.
        let rank = |s: &SampleRef| if s.label < 0 { i64::MAX } else { s.label };
        pool.sort_by(|a, b| rank(b).cmp(&rank(a)).then(a.id.cmp(&b.id)));
        Ok(pool.into_iter().take(take).map(|s| s.id).collect())
    }
}

nereid_sdk::export_sampler!(PowerOfChoice);
