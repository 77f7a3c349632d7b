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
