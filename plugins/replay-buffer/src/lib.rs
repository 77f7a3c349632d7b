//! A replay buffer's policy (sampler slot): which arriving samples a bounded buffer keeps, which
//! it evicts for them, and which a training batch draws. The host stores the samples; this
//! plugin sees ids and labels.
//!
//! Policies (`policy`):
//! - `reservoir`: Vitter's algorithm R. The first `capacity` samples are kept; the n-th after
//!   that replaces a uniformly chosen held sample with probability capacity / n, so after n
//!   offers every sample is held with probability capacity / n.
//! - `class-balanced`: the class-balancing reservoir of Chrysakis and Moens (ICML 2020). When
//!   the buffer is full, a sample of a class that is not among the largest held classes evicts a
//!   random sample of a largest class; a sample of a largest class c replaces a random held
//!   sample of c with probability m_c / n_c (m_c held, n_c seen), i.e. reservoir sampling within
//!   the class. Every class gets an equal share once it has been seen often enough.
//!
//! Random choices come from a counter-based generator keyed by (`seed`, offer number), so a
//! buffer restored after a restart makes the same decisions it would have made without one.
use std::collections::BTreeMap;

use nereid_sdk::prelude::*;
use nereid_sdk::random::{below, mix};

struct ReplayBuffer {
    policy: Policy,
    capacity: usize,
    seed: u64,
    held: Vec<SampleRef>,
    offered: u64,
    /// Samples seen per label (class-balanced).
    seen: BTreeMap<i64, u64>,
}

impl Default for ReplayBuffer {
    fn default() -> Self {
        ReplayBuffer {
            policy: Policy::Reservoir,
            capacity: 1000,
            seed: 0,
            held: Vec::new(),
            offered: 0,
            seen: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Reservoir,
    ClassBalanced,
}

impl Plugin for ReplayBuffer {
    fn info() -> Info {
        Info::new("replay-buffer", "0.1.0", "Which samples a bounded replay buffer keeps, evicts and draws")
            .text("policy", Some("reservoir"), "reservoir | class-balanced")
            .integer("capacity", Some(1000), "samples the buffer holds, at least 1")
            .integer("seed", Some(0), "seed of the random choices")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.policy = match config.text("policy")? {
            "reservoir" => Policy::Reservoir,
            "class-balanced" => Policy::ClassBalanced,
            other => {
                return Err(PluginError::invalid_config(
                    "policy",
                    format!("`{other}` is not reservoir or class-balanced"),
                ))
            }
        };
        let capacity = config.i64("capacity")?;
        self.capacity = usize::try_from(capacity)
            .ok()
            .filter(|c| *c >= 1)
            .ok_or_else(|| PluginError::invalid_config("capacity", format!("must be at least 1, got {capacity}")))?;
        self.seed = config.i64("seed")? as u64;
        Ok(())
    }
}

impl ReplayBuffer {
    fn held_of(&self, label: i64) -> Vec<usize> {
        (0..self.held.len()).filter(|&i| self.held[i].label == label).collect()
    }

    /// Replaces a uniformly chosen one of `positions` with `sample`; the evicted id.
    fn replace_one_of(&mut self, positions: &[usize], sample: SampleRef, draw: u64) -> u64 {
        let at = positions[below(self.seed ^ 0x5EED, draw, positions.len() as u64) as usize];
        self.evict_at(at, sample)
    }

    /// Evicts the sample at `at` for `sample`. `held` stays in id order (a new sample has the
    /// largest id), the order a restore gives it, so positions mean the same after a restart.
    fn evict_at(&mut self, at: usize, sample: SampleRef) -> u64 {
        let evicted = self.held.remove(at).id;
        self.held.push(sample);
        evicted
    }

    fn class_balanced(&mut self, sample: SampleRef) -> Admission {
        let n = self.offered;
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        for s in &self.held {
            *counts.entry(s.label).or_default() += 1;
        }
        let largest = counts.values().copied().max().unwrap_or(0);
        let own = counts.get(&sample.label).copied().unwrap_or(0);
        if own < largest {
            // Not a largest class: a largest one gives up a random sample (ties drawn uniformly).
            let big: Vec<i64> = counts.iter().filter(|(_, c)| **c == largest).map(|(l, _)| *l).collect();
            let victim = big[below(self.seed ^ 0xB16, n, big.len() as u64) as usize];
            let positions = self.held_of(victim);
            return Admission::Keep(Some(self.replace_one_of(&positions, sample, n)));
        }
        // A largest class: reservoir sampling within the class.
        let seen = self.seen.get(&sample.label).copied().unwrap_or(1).max(1);
        if below(self.seed, n, seen) < own as u64 {
            let positions = self.held_of(sample.label);
            Admission::Keep(Some(self.replace_one_of(&positions, sample, n)))
        } else {
            Admission::Discard
        }
    }
}

impl Sampler for ReplayBuffer {
    fn restore(&mut self, held: &[SampleRef], offered: u64) -> Result<(), PluginError> {
        if held.len() > self.capacity {
            return Err(PluginError::Rejected(format!(
                "the buffer holds {} samples, more than the capacity {}: raise `capacity` or remove samples",
                held.len(),
                self.capacity
            )));
        }
        if (offered as usize) < held.len() {
            return Err(PluginError::Rejected(format!("{} samples held but only {offered} offered", held.len())));
        }
        self.held = held.to_vec();
        self.held.sort_by_key(|s| s.id);
        self.offered = offered;
        // Per-class counts of what was seen are not kept across a restart: each class is taken
        // to have been seen in proportion to what it holds.
        self.seen.clear();
        for s in held {
            *self.seen.entry(s.label).or_default() += 1;
        }
        if !held.is_empty() {
            for n in self.seen.values_mut() {
                *n = (*n * offered).div_ceil(held.len() as u64);
            }
        }
        Ok(())
    }

    fn offer(&mut self, sample: SampleRef) -> Result<Admission, PluginError> {
        if self.held.iter().any(|s| s.id == sample.id) {
            return Err(PluginError::Rejected(format!("sample {} is in the buffer already", sample.id)));
        }
        self.offered += 1;
        *self.seen.entry(sample.label).or_default() += 1;
        if self.held.len() < self.capacity {
            self.held.push(sample);
            return Ok(Admission::Keep(None));
        }
        Ok(match self.policy {
            Policy::Reservoir => {
                let j = below(self.seed, self.offered, self.offered);
                if (j as usize) < self.capacity {
                    Admission::Keep(Some(self.evict_at(j as usize, sample)))
                } else {
                    Admission::Discard
                }
            }
            Policy::ClassBalanced => self.class_balanced(sample),
        })
    }

    fn draw(&mut self, ctx: &RoundContext, count: u32) -> Result<Vec<u64>, PluginError> {
        // A partial Fisher-Yates shuffle: `count` distinct held samples, uniformly.
        let mut ids: Vec<u64> = self.held.iter().map(|s| s.id).collect();
        let take = (count as usize).min(ids.len());
        let key = mix(self.seed ^ mix(ctx.seed) ^ mix(ctx.round as u64 + 1));
        for i in 0..take {
            let j = i + below(key, i as u64, (ids.len() - i) as u64) as usize;
            ids.swap(i, j);
        }
        ids.truncate(take);
        Ok(ids)
    }
}

nereid_sdk::export_sampler!(ReplayBuffer);
