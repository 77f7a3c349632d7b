//! Reproducible randomness for plugins (wasm32-wasip2 has no `rand` to lean on): splitmix64, as
//! a sequence (`SplitMix64`) or as counter-keyed streams (`uniform`, `below`): the value for
//! (key, counter) does not depend on what was drawn before, so a plugin restored after a restart
//! draws exactly what it would have drawn without one.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function: a well-mixed 64-bit value from any input.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from 64 random bits (their top 53).
pub fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform number in [0, 1) for element `counter` of the stream `key`.
pub fn uniform(key: u64, counter: u64) -> f64 {
    unit(mix(key ^ mix(counter)))
}

/// A uniform integer in [0, n) from the stream (`key`, `counter`), without modulo bias.
pub fn below(key: u64, counter: u64, n: u64) -> u64 {
    let mut k = 0u64;
    loop {
        let x = mix(mix(key ^ mix(counter)).wrapping_add(k));
        // Reject the top partial range so every residue is equally likely.
        let zone = u64::MAX - u64::MAX % n;
        if x < zone {
            return x % n;
        }
        k += 1;
    }
}

/// splitmix64 as a sequence from a seed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let z = mix(self.0);
        self.0 = self.0.wrapping_add(GOLDEN);
        z
    }

    /// A uniform number in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        unit(self.next_u64())
    }
}
