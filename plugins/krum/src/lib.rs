//! Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
//! Gradient Descent", NeurIPS 2017), as Flower's `Krum`: each update's score is the sum of its
//! squared L2 distances to its n - f - 2 nearest other updates (f = `num_malicious_clients`);
//! Krum returns the update with the lowest score, Multi-Krum (`num_clients_to_keep` = m > 0) the
//! example-weighted mean of the m lowest.
//!
//! The host computes the pairwise distances over its round store in bounded chunks
//! (`round-updates`), so the plugin holds no update: memory for the n x n distances only.
use nereid_sdk::prelude::*;
use nereid_sdk::round::{self, krum_scores, ranked, Roster};

#[derive(Default)]
struct Krum {
    malicious: usize,
    keep: usize,
    roster: Roster,
}

impl Plugin for Krum {
    fn info() -> Info {
        Info::new("krum", env!("CARGO_PKG_VERSION"), "Krum / Multi-Krum: the updates nearest their neighbours")
            .integer("num_malicious_clients", Some(0), "Byzantine clients to tolerate (f >= 0)")
            .integer("num_clients_to_keep", Some(0), "Multi-Krum: average the m best updates (0: Krum, the best one)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.malicious = config.count("num_malicious_clients")?;
        self.keep = config.count("num_clients_to_keep")?;
        Ok(())
    }
}

impl Aggregator for Krum {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.roster = Roster::begin(global.as_ref());
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.roster.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        self.roster.require_any()?;
        let n = self.roster.len();
        let all = round::all();
        let distances = round::pairwise_distances(&all)?;
        let members: Vec<usize> = (0..n).collect();
        let order = ranked(&krum_scores(&distances, &members, self.malicious));
        let chosen: Vec<usize> = order.into_iter().take(self.keep.clamp(1, n)).collect();
        let names: Vec<&str> = chosen.iter().map(|&i| self.roster.clients[i].as_str()).collect();
        nereid_sdk::log(nereid_sdk::LogLevel::Info, &format!("krum keeps {}", names.join(", ")));
        let indices: Vec<u32> = chosen.iter().map(|&i| i as u32).collect();
        let weights: Vec<f64> =
            if self.keep == 0 { vec![1.0] } else { chosen.iter().map(|&i| self.roster.examples[i] as f64).collect() };
        let model = round::weighted_mean(&indices, &weights)?;
        Ok(Aggregate::new(model).with_metric("accepted_updates", n as f64).with_metric("selected", chosen.len() as f64))
    }
}

nereid_sdk::export_aggregator!(Krum);
