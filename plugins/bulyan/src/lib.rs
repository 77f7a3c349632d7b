//! Bulyan (El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in Byzantium",
//! ICML 2018), as Flower's `Bulyan` over Krum: with n updates and f = `num_malicious_clients`
//! (n >= 4f + 3),
//!
//!   1. select theta = n - 2f updates by running Krum repeatedly on the ones not yet selected;
//!   2. per element, the mean of the beta = theta - 2f selected values nearest their median.
//!
//! The host computes the distances and the per-element statistics over its round store in
//! bounded chunks (`round-updates`): the plugin holds the n x n distances only.
use nereid_sdk::prelude::*;
use nereid_sdk::round::{self, krum_scores, ranked, Roster};

#[derive(Default)]
struct Bulyan {
    malicious: usize,
    roster: Roster,
}

impl Plugin for Bulyan {
    fn info() -> Info {
        Info::new("bulyan", env!("CARGO_PKG_VERSION"), "Bulyan: Krum selection, then a trimmed mean around the median")
            .integer("num_malicious_clients", Some(0), "Byzantine clients to tolerate (f >= 0; needs n >= 4f + 3)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.malicious = config.count("num_malicious_clients")?;
        Ok(())
    }
}

impl Aggregator for Bulyan {
    fn begin_round(&mut self, _ctx: &RoundContext, global: Option<Model>) -> Result<(), PluginError> {
        self.roster = Roster::begin(global.as_ref());
        Ok(())
    }

    fn accumulate(&mut self, update: Update) -> Result<(), PluginError> {
        self.roster.add(&update)
    }

    fn finish(&mut self) -> Result<Aggregate, PluginError> {
        let (n, f) = (self.roster.len(), self.malicious);
        if n < 4 * f + 3 {
            return Err(PluginError::bad_state(format!(
                "Bulyan with num_malicious_clients = {f} needs at least {} updates (4f + 3); the round accepted {n}",
                4 * f + 3
            )));
        }
        let distances = round::pairwise_distances(&round::all())?;
        let theta = n - 2 * f;
        let mut remaining: Vec<usize> = (0..n).collect();
        let mut selected = Vec::with_capacity(theta);
        while selected.len() < theta {
            let best = ranked(&krum_scores(&distances, &remaining, f))[0];
            selected.push(remaining.remove(best));
        }
        let beta = theta - 2 * f;
        let indices: Vec<u32> = selected.iter().map(|&i| i as u32).collect();
        let model = round::median_nearest_mean(&indices, beta as u32)?;
        Ok(Aggregate::new(model)
            .with_metric("accepted_updates", n as f64)
            .with_metric("selected", theta as f64)
            .with_metric("averaged_per_element", beta as f64))
    }
}

nereid_sdk::export_aggregator!(Bulyan);
