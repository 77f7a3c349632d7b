//! {{name}}: a sampler (a replay buffer's policy, edge, per arriving sample). As written it is
//! reservoir sampling (Vitter's algorithm R): every sample offered so far is held with the same
//! probability capacity / offered. `nereid plugin build` builds it and runs the slot's checks.
use nereid_sdk::prelude::*;
use nereid_sdk::random::{below, mix};

#[derive(Default)]
struct Policy {
    capacity: usize,
    seed: u64,
    held: Vec<u64>,
    offered: u64,
}

impl Plugin for Policy {
    fn info() -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), "Reservoir sampling for a bounded replay buffer")
            .integer("capacity", Some(1000), "Samples the buffer holds, at least 1")
            .integer("seed", Some(0), "Seed of the random choices")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        let capacity = config.i64("capacity")?;
        if capacity < 1 {
            return Err(PluginError::invalid_config("capacity", format!("must be at least 1, got {capacity}")));
        }
        self.capacity = capacity as usize;
        self.seed = config.i64("seed")? as u64;
        Ok(())
    }
}

impl Sampler for Policy {
    fn restore(&mut self, held: &[SampleRef], offered: u64) -> Result<(), PluginError> {
        if held.len() > self.capacity {
            return Err(PluginError::rejected(format!("{} samples held, capacity {}", held.len(), self.capacity)));
        }
        self.held = held.iter().map(|s| s.id).collect();
        self.offered = offered.max(held.len() as u64);
        Ok(())
    }

    fn offer(&mut self, sample: SampleRef) -> Result<Admission, PluginError> {
        self.offered += 1;
        if self.held.len() < self.capacity {
            self.held.push(sample.id);
            return Ok(Admission::Keep(None));
        }
        let j = below(self.seed, self.offered, self.offered) as usize;
        if j < self.capacity {
            let evicted = std::mem::replace(&mut self.held[j], sample.id);
            return Ok(Admission::Keep(Some(evicted)));
        }
        Ok(Admission::Discard)
    }

    fn draw(&mut self, ctx: &RoundContext, count: u32) -> Result<Vec<u64>, PluginError> {
        // A partial Fisher-Yates shuffle: `count` distinct held samples, uniformly.
        let mut ids = self.held.clone();
        let take = (count as usize).min(ids.len());
        let key = mix(self.seed ^ mix(ctx.seed) ^ mix(u64::from(ctx.round)));
        for i in 0..take {
            let j = i + below(key, i as u64, (ids.len() - i) as u64) as usize;
            ids.swap(i, j);
        }
        ids.truncate(take);
        Ok(ids)
    }
}

nereid_sdk::export_sampler!(Policy);
