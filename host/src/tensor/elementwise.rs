//! Element-wise operations for server optimizers (Adam's moments, Yogi's sign) and Gaussian noise
//! for differential privacy: computed in f64 per element, stored in the tensor's own type.
use std::sync::Arc;

use rand::SeedableRng;
use rand_distr::Distribution;

use super::{float_only, Buffer, Element, Tensor, TensorError};

impl Tensor {
    /// self = f(self, other) per element.
    fn zip_with(&mut self, other: &Tensor, op: &str, f: impl Fn(f64, f64) -> f64) -> Result<(), TensorError> {
        float_only(op, self.dtype())?;
        float_only(op, other.dtype())?;
        self.same_shape(other, op)?;
        fn kernel<A: Element, B: Element>(a: &mut [A], b: &[B], f: &impl Fn(f64, f64) -> f64) {
            for (a, b) in a.iter_mut().zip(b) {
                *a = A::from_f64(f(a.to_f64(), b.to_f64()));
            }
        }
        // Cloned first so that an operation with itself reads the old values.
        let other = Arc::clone(&other.data);
        match (self.buf_mut(), &other.buf) {
            (Buffer::F32(a), Buffer::F32(b)) => kernel(a, b, &f),
            (Buffer::F32(a), Buffer::F64(b)) => kernel(a, b, &f),
            (Buffer::F64(a), Buffer::F32(b)) => kernel(a, b, &f),
            (Buffer::F64(a), Buffer::F64(b)) => kernel(a, b, &f),
            _ => unreachable!("float_only checked both operands"),
        }
        Ok(())
    }

    /// self = f(self) per element.
    fn map(&mut self, op: &str, f: impl Fn(f64) -> f64) -> Result<(), TensorError> {
        float_only(op, self.dtype())?;
        match self.buf_mut() {
            Buffer::F32(v) => v.iter_mut().for_each(|x| *x = f(*x as f64) as f32),
            Buffer::F64(v) => v.iter_mut().for_each(|x| *x = f(*x)),
            _ => unreachable!("float_only checked the operand"),
        }
        Ok(())
    }

    /// self *= other, element-wise.
    pub fn mul(&mut self, other: &Tensor) -> Result<(), TensorError> {
        self.zip_with(other, "mul", |a, b| a * b)
    }

    /// self /= other, element-wise.
    pub fn div(&mut self, other: &Tensor) -> Result<(), TensorError> {
        self.zip_with(other, "div", |a, b| a / b)
    }

    /// self = sqrt(self), element-wise.
    pub fn sqrt(&mut self) -> Result<(), TensorError> {
        self.map("sqrt", f64::sqrt)
    }

    /// self += value, element-wise.
    pub fn add_scalar(&mut self, value: f64) -> Result<(), TensorError> {
        self.map("add-scalar", |x| x + value)
    }

    /// self = sign(self): -1, 0 or 1 (NaN stays NaN), as numpy's `sign`.
    pub fn sign(&mut self) -> Result<(), TensorError> {
        self.map("sign", |x| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        })
    }

    /// self += N(0, stddev^2) per element, from a ChaCha20 stream seeded by `seed`.
    pub fn add_gaussian(&mut self, stddev: f64, seed: u64) -> Result<(), TensorError> {
        float_only("add-gaussian", self.dtype())?;
        let normal = rand_distr::Normal::new(0.0, stddev)
            .map_err(|_| TensorError::Unsupported(format!("add-gaussian needs a finite stddev >= 0, got {stddev}")))?;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        match self.buf_mut() {
            Buffer::F32(v) => v.iter_mut().for_each(|x| *x = (*x as f64 + normal.sample(&mut rng)) as f32),
            Buffer::F64(v) => v.iter_mut().for_each(|x| *x += normal.sample(&mut rng)),
            _ => unreachable!("float_only checked the operand"),
        }
        Ok(())
    }
}

/// Elements of one block of a fused `axpy_many`: the accumulator's block stays in cache while
/// the inputs stream through it.
const BLOCK: usize = 4096;

/// `fused` compiled for AVX2 where the CPU has it (the portable build targets SSE2, two f64
/// lanes): the same operations, in the same order, so the same bits, on twice the lanes.
fn fused_best<A: Element>(acc: &mut [A], offset: usize, terms: &[(f64, &Buffer)]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn fused_avx2<A: Element>(acc: &mut [A], offset: usize, terms: &[(f64, &Buffer)]) {
            fused(acc, offset, terms)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU was just found to support AVX2.
            unsafe { fused_avx2(acc, offset, terms) };
            return;
        }
    }
    fused(acc, offset, terms)
}

/// acc += alpha_k * x_k for each term in order, block by block: element for element the same
/// operations, in the same order, as one `axpy` per term, with one pass over `acc`.
#[inline(always)]
fn fused<A: Element>(acc: &mut [A], offset: usize, terms: &[(f64, &Buffer)]) {
    for (b, block) in acc.chunks_mut(BLOCK).enumerate() {
        let range = offset + b * BLOCK..offset + b * BLOCK + block.len();
        for (alpha, x) in terms {
            let alpha = *alpha;
            match x {
                Buffer::F32(v) => {
                    for (a, x) in block.iter_mut().zip(&v[range.clone()]) {
                        *a = A::from_f64(a.to_f64() + alpha * *x as f64);
                    }
                }
                Buffer::F64(v) => {
                    for (a, x) in block.iter_mut().zip(&v[range.clone()]) {
                        *a = A::from_f64(a.to_f64() + alpha * *x);
                    }
                }
                _ => unreachable!("check_axpy admitted float inputs only"),
            }
        }
    }
}

/// Runs `fused` over `acc` split between the machine's cores.
fn fused_parallel<A: Element>(acc: &mut [A], terms: &[(f64, &Buffer)]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads < 2 || acc.len() < 16 * BLOCK {
        fused_best(acc, 0, terms);
        return;
    }
    let per = acc.len().div_ceil(threads).next_multiple_of(BLOCK);
    std::thread::scope(|scope| {
        for (k, part) in acc.chunks_mut(per).enumerate() {
            scope.spawn(move || fused_best(part, k * per, terms));
        }
    });
}

impl Tensor {
    /// self += alpha_k * x_k for every term, in order: the result of one `axpy` per term, bit
    /// for bit, in one pass over self's memory and on every core.
    pub fn axpy_many(&mut self, terms: &[(f64, Tensor)]) -> Result<(), TensorError> {
        for (_, x) in terms {
            self.check_axpy(x)?;
        }
        // Held here so that a term that is self reads the old values (copy-on-write).
        let held: Vec<(f64, Arc<super::Stored>)> = terms.iter().map(|(a, x)| (*a, Arc::clone(&x.data))).collect();
        let bufs: Vec<(f64, &Buffer)> = held.iter().map(|(a, s)| (*a, &s.buf)).collect();
        match self.buf_mut() {
            Buffer::F64(a) => fused_parallel(a, &bufs),
            Buffer::F32(a) => fused_parallel(a, &bufs),
            _ => unreachable!("check_axpy admitted a float accumulator only"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_f32(vec![v.len() as u64], v.to_vec()).expect("tensor")
    }

    #[test]
    fn the_adam_step_from_its_parts() {
        // x + eta * m / (sqrt(v) + tau) with x = 0.1, m = 0.5, v = 0.25, eta = 0.1, tau = 0.5.
        let mut den = t(&[0.25, 4.0]);
        den.sqrt().expect("sqrt");
        den.add_scalar(0.5).expect("add");
        let mut step = t(&[0.5, -5.0]);
        step.div(&den).expect("div");
        let mut x = t(&[0.1, 0.1]);
        x.axpy(0.1, &step).expect("axpy");
        assert_eq!(x.as_f32().expect("f32"), &[0.15, -0.1]);
    }

    #[test]
    fn a_fused_axpy_is_bit_for_bit_the_sequence_of_axpys() {
        let n = 100_003usize; // not a multiple of the block, and split between threads
        let x = |k: usize| {
            Tensor::from_f32(
                vec![n as u64],
                (0..n).map(|i| ((i * 7919 + k * 104729) % 1000) as f32 * 1e-3 - 0.5).collect(),
            )
            .expect("x")
        };
        let terms: Vec<(f64, Tensor)> = (0..5).map(|k| (0.1 + k as f64 * 0.37, x(k))).collect();
        for dtype in [super::super::DType::F64, super::super::DType::F32] {
            let mut one_by_one = x(9).cast(dtype);
            for (a, t) in &terms {
                one_by_one.axpy(*a, t).expect("axpy");
            }
            let mut fused = x(9).cast(dtype);
            fused.axpy_many(&terms).expect("fused");
            assert_eq!(fused, one_by_one, "{dtype}");
        }
        // With itself as a term: the old values, as axpy(alpha, self) reads them.
        let mut a = x(1);
        let mut b = x(1);
        b.axpy(2.0, &x(1)).expect("axpy");
        let itself = a.clone();
        a.axpy_many(&[(2.0, itself)]).expect("fused");
        assert_eq!(a, b);
    }

    #[test]
    fn sign_and_products() {
        let mut a = t(&[-2.0, 0.0, 3.0]);
        let b = a.clone();
        a.mul(&b).expect("square");
        assert_eq!(a.as_f32().expect("f32"), &[4.0, 0.0, 9.0]);
        let mut s = t(&[-2.0, 0.0, 3.0]);
        s.sign().expect("sign");
        assert_eq!(s.as_f32().expect("f32"), &[-1.0, 0.0, 1.0]);
        assert!(matches!(a.mul(&t(&[1.0])), Err(TensorError::ShapeMismatch(_))));
    }

    #[test]
    fn gaussian_noise_has_its_deviation_and_repeats_with_its_seed() {
        let n = 200_000usize;
        let mut a = Tensor::zeros(super::super::DType::F64, vec![n as u64]).expect("zeros");
        a.add_gaussian(2.5, 7).expect("noise");
        let v = a.as_f64().expect("f64");
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        // The sample deviation's standard error is about sigma / sqrt(2n) = 0.004: 5 of them.
        assert!((var.sqrt() - 2.5).abs() < 0.02, "stddev {}", var.sqrt());
        assert!(mean.abs() < 5.0 * 2.5 / (n as f64).sqrt(), "mean {mean}");
        let mut b = Tensor::zeros(super::super::DType::F64, vec![n as u64]).expect("zeros");
        b.add_gaussian(2.5, 7).expect("noise");
        assert_eq!(a, b);
        let mut c = Tensor::zeros(super::super::DType::F64, vec![n as u64]).expect("zeros");
        c.add_gaussian(2.5, 8).expect("noise");
        assert_ne!(a, c);
        assert!(a.add_gaussian(f64::NAN, 1).is_err());
    }
}
