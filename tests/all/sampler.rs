//! The sampler slot with the replay-buffer plugin: reservoir uniformity (a chi-square test over
//! many seeded runs), class balance, the same decisions after a restore, and draws.
use nereid::runtime::{Admission, Limits, PluginError, RoundContext, Runtime, SampleRef, SamplerPlugin};

use crate::common::*;

fn sampler(runtime: &Runtime, policy: &str, capacity: i64, seed: i64) -> Result<SamplerPlugin, PluginError> {
    let cfg = [("policy", toml::Value::String(policy.into())), ("capacity", capacity.into()), ("seed", seed.into())];
    SamplerPlugin::load(runtime, &plugin("replay-buffer"), Limits::default(), &config(&cfg))
}

/// Offers `stream` and mirrors the buffer the host would keep (the plugin's evictions applied
/// in place); also returns every admission.
fn run(s: &mut SamplerPlugin, held: &mut Vec<SampleRef>, stream: &[SampleRef]) -> Vec<Admission> {
    stream
        .iter()
        .map(|&sample| {
            let a = s.offer(sample).expect("offer");
            match a {
                Admission::Keep(None) => held.push(sample),
                Admission::Keep(Some(evicted)) => {
                    let at = held.iter().position(|h| h.id == evicted).expect("evicts a held sample");
                    held[at] = sample;
                }
                Admission::Discard => {}
            }
            a
        })
        .collect()
}

/// Admissions as comparable values: None for discard, Some(evicted) for keep.
fn decisions(admissions: &[Admission]) -> Vec<Option<Option<u64>>> {
    admissions
        .iter()
        .map(|a| match a {
            Admission::Keep(evicted) => Some(*evicted),
            Admission::Discard => None,
        })
        .collect()
}

fn ids(held: &[SampleRef]) -> Vec<(u64, i64)> {
    held.iter().map(|s| (s.id, s.label)).collect()
}

fn stream(n: u64, label: impl Fn(u64) -> i64) -> Vec<SampleRef> {
    (0..n).map(|id| SampleRef { id, label: label(id) }).collect()
}

// After n offers every sample is held with probability capacity / n: over R seeded runs each of
// the n samples is held ~R * capacity / n times. Chi-square with n - 1 = 49 degrees of freedom:
// 85.35 is its 0.999 quantile, so a correct sampler fails this one time in a thousand (the seeds
// are fixed, so the outcome is too).
#[test]
fn reservoir_keeps_every_sample_with_equal_probability() {
    let (runtime, _dir) = runtime();
    let (n, capacity, runs) = (50u64, 10usize, 1000u64);
    let mut counts = vec![0u64; n as usize];
    for seed in 0..runs {
        let mut s = sampler(&runtime, "reservoir", capacity as i64, seed as i64).expect("loads");
        let mut held = Vec::new();
        run(&mut s, &mut held, &stream(n, |_| 0));
        assert_eq!(held.len(), capacity);
        for h in held {
            counts[h.id as usize] += 1;
        }
    }
    let expected = (runs * capacity as u64) as f64 / n as f64;
    let chi2: f64 = counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
    eprintln!("reservoir: chi-square {chi2:.1} over {n} samples, {runs} runs (0.999 quantile 85.35)");
    assert!(chi2 < 85.35, "chi-square {chi2} (counts {counts:?})");
    // Not uniform at all would be far off: e.g. keeping the first `capacity` samples.
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
}

#[test]
fn class_balanced_reservoir_gives_each_class_an_equal_share() {
    let (runtime, _dir) = runtime();
    // 70% class 0, 20% class 1, 10% class 2, interleaved.
    let labels = |id: u64| match id % 10 {
        0..=6 => 0,
        7 | 8 => 1,
        _ => 2,
    };
    let data = stream(600, labels);
    let share = |policy: &str| {
        let mut s = sampler(&runtime, policy, 30, 3).expect("loads");
        let mut held = Vec::new();
        run(&mut s, &mut held, &data);
        let mut per_class = [0usize; 3];
        for h in &held {
            per_class[h.label as usize] += 1;
        }
        per_class
    };
    let balanced = share("class-balanced");
    assert_eq!(balanced, [10, 10, 10], "class-balanced");
    let uniform = share("reservoir");
    eprintln!("held per class of a 70/20/10% stream: class-balanced {balanced:?}, reservoir {uniform:?}");
    assert_eq!(uniform.iter().sum::<usize>(), 30);
    assert!(uniform[0] > 15, "the plain reservoir follows the stream: {uniform:?}");
}

#[test]
fn a_restored_buffer_decides_as_if_it_had_not_restarted() {
    let (runtime, _dir) = runtime();
    for policy in ["reservoir", "class-balanced"] {
        let data = stream(400, |id| (id % 7 % 3) as i64);
        let mut whole = sampler(&runtime, policy, 25, 9).expect("loads");
        let mut held_whole = Vec::new();
        let all = run(&mut whole, &mut held_whole, &data);

        let mut first = sampler(&runtime, policy, 25, 9).expect("loads");
        let mut held = Vec::new();
        let mut admissions = run(&mut first, &mut held, &data[..200]);
        let mut restarted = sampler(&runtime, policy, 25, 9).expect("loads");
        restarted.restore(&held, 200).expect("restore");
        admissions.extend(run(&mut restarted, &mut held, &data[200..]));
        if policy == "reservoir" {
            assert_eq!(decisions(&admissions), decisions(&all), "{policy}");
            assert_eq!(ids(&held), ids(&held_whole), "{policy}");
        } else {
            // Per-class counts of what was seen are estimated after a restart; the buffer
            // stays balanced.
            let mut per_class = [0usize; 3];
            held.iter().for_each(|h| per_class[h.label as usize] += 1);
            assert!(per_class.iter().all(|&c| (8..=9).contains(&c)), "{policy}: {per_class:?}");
        }
    }
    // A buffer larger than the capacity is refused by name.
    let mut small = sampler(&runtime, "reservoir", 2, 0).expect("loads");
    let held = stream(3, |_| 0);
    let e = small.restore(&held, 3).expect_err("over capacity");
    assert!(e.to_string().contains("more than the capacity 2"), "{e}");
}

#[test]
fn draws_are_distinct_held_samples_and_repeat_for_the_same_round() {
    let (runtime, _dir) = runtime();
    let mut s = sampler(&runtime, "reservoir", 40, 1).expect("loads");
    let mut held = Vec::new();
    run(&mut s, &mut held, &stream(100, |id| (id % 4) as i64));
    let ctx = |round| RoundContext { job: "incremental".into(), round, seed: 5 };
    let batch = s.draw(&ctx(1), 16).expect("draw");
    assert_eq!(batch.len(), 16);
    let mut distinct = batch.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 16, "no sample twice in a batch");
    assert!(batch.iter().all(|id| held.iter().any(|h| h.id == *id)), "only held samples");
    assert_eq!(s.draw(&ctx(1), 16).expect("draw"), batch, "the same round draws the same batch");
    assert_ne!(s.draw(&ctx(2), 16).expect("draw"), batch, "another round another batch");
    assert_eq!(s.draw(&ctx(1), 100).expect("draw").len(), 40, "at most what is held");
    let again = s.offer(held[0]).expect_err("an id held twice");
    assert!(again.to_string().contains("in the buffer already"), "{again}");
}
