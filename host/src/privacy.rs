//! The privacy accountant: Rényi differential privacy of the Poisson-subsampled Gaussian
//! mechanism (Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian
//! Mechanism", 2019), composed over a job's rounds and converted to (epsilon, delta) with the
//! bound of Balle et al. ("Hypothesis Testing Interpretations and Renyi Differential Privacy",
//! 2020), as Google's `dp_accounting` does.
//!
//! Each round that a differential-privacy aggregator ran is one step: it reports its noise
//! multiplier z (noise standard deviation over the clipping norm of one client's contribution)
//! and the round's sampling rate q (nodes selected over nodes online).

/// The integer Rényi orders the accountant tracks.
pub fn orders() -> std::ops::RangeInclusive<u32> {
    2..=256
}

/// log(exp(a) + exp(b)) without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

fn log_binomial(n: u32, k: u32) -> f64 {
    let lgamma = |x: f64| libm_lgamma(x);
    lgamma(n as f64 + 1.0) - lgamma(k as f64 + 1.0) - lgamma((n - k) as f64 + 1.0)
}

/// ln Γ(x) for x >= 1 (Lanczos, g = 7, n = 9): plenty for binomial coefficients up to 256.
fn libm_lgamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// RDP at integer order `alpha` of one step of the Gaussian mechanism with noise multiplier
/// `z`, Poisson-sampled with probability `q`.
pub fn rdp_step(q: f64, z: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if z <= 0.0 {
        return f64::INFINITY;
    }
    let alpha_f = alpha as f64;
    if q >= 1.0 {
        return alpha_f / (2.0 * z * z);
    }
    // log A_alpha = log sum_i C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 z^2))
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let i_f = i as f64;
        let coef = log_binomial(alpha, i) + i_f * q.ln() + (alpha_f - i_f) * (-q).ln_1p();
        log_a = log_add(log_a, coef + (i_f * i_f - i_f) / (2.0 * z * z));
    }
    log_a / (alpha_f - 1.0)
}

/// epsilon for `delta` from the RDP `rdp[k]` at order `orders()[k]` (the smallest over orders).
pub fn epsilon(rdp: &[f64], delta: f64) -> f64 {
    let eps = orders()
        .zip(rdp)
        .map(|(alpha, r)| {
            let a = alpha as f64;
            r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln()
        })
        .fold(f64::INFINITY, f64::min);
    eps.max(0.0)
}

/// The privacy a job spent: RDP summed over its private rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    rdp: Vec<f64>,
    pub steps: u32,
}

impl Default for Accountant {
    fn default() -> Self {
        Accountant { rdp: vec![0.0; orders().count()], steps: 0 }
    }
}

impl Accountant {
    /// Adds one round with sampling rate `q` and noise multiplier `z`.
    pub fn step(&mut self, q: f64, z: f64) {
        for (r, alpha) in self.rdp.iter_mut().zip(orders()) {
            *r += rdp_step(q, z, alpha);
        }
        self.steps += 1;
    }

    /// epsilon at `delta` for the rounds so far.
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon(&self.rdp, delta)
    }

    /// The RDP at order `alpha` so far.
    pub fn rdp_at(&self, alpha: u32) -> Option<f64> {
        orders().position(|a| a == alpha).map(|k| self.rdp[k])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampled_gaussian_matches_dp_accountings_published_values() {
        // dp_accounting's rdp_privacy_accountant_test: q = 0.01, z = 2.5, 50 steps.
        let mut a = Accountant::default();
        for _ in 0..50 {
            a.step(0.01, 2.5);
        }
        for (alpha, want) in [(5, 2.18075656e-03), (50, 2.38460375e-02), (100, 1.67416308e02)] {
            let got = a.rdp_at(alpha).expect("tracked order");
            assert!((got - want).abs() <= 1e-4 * want, "order {alpha}: {got} vs {want}");
        }
    }

    #[test]
    fn epsilon_from_rdp_matches_dp_accountings_hand_computed_value() {
        // Constant RDP 1.1 over orders 2..32 is pure DP: epsilon 1.32783806176 at delta 1e-5.
        let rdp: Vec<f64> = orders().map(|a| if a <= 32 { 1.1 } else { f64::INFINITY }).collect();
        assert!((epsilon(&rdp, 1e-5) - 1.32783806176).abs() < 1e-9);
    }

    #[test]
    fn no_sampling_is_the_gaussian_and_more_rounds_cost_more() {
        assert_eq!(rdp_step(1.0, 2.0, 4), 4.0 / 8.0);
        assert_eq!(rdp_step(0.0, 2.0, 4), 0.0);
        assert_eq!(rdp_step(0.5, 0.0, 4), f64::INFINITY);
        let mut a = Accountant::default();
        a.step(0.1, 1.0);
        let one = a.epsilon(1e-5);
        a.step(0.1, 1.0);
        assert!(a.epsilon(1e-5) > one && one > 0.0);
    }
}
