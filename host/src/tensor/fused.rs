//! Several `axpy` calls on one accumulator in one pass over its memory, on every core: a fold's
//! accumulator takes a round's updates at once, and a mean computed from a sum nobody has
//! written yet takes that sum's updates directly (the sum is never stored).
use std::sync::Arc;

use super::{Buffer, Element, Stored, Tensor, TensorError};

/// One deferred `self += alpha * x`.
#[derive(Debug, Clone)]
pub enum Term {
    /// alpha * x.
    Scaled(f64, Tensor),
    /// alpha * s, where s = sum_k beta_k * y_k accumulated in f64 from zeros, in order: the value
    /// of an f64 accumulator whose deferred terms these are. At least one term, all of one shape.
    ScaledSum(f64, Vec<(f64, Tensor)>),
}

impl Term {
    /// Bytes of inputs only this term keeps alive (held by no other tensor): what deferring it
    /// costs in memory.
    pub fn bytes_kept_alive(&self) -> usize {
        let alone = |x: &Tensor| if Arc::strong_count(&x.data) == 1 { x.byte_len() } else { 0 };
        match self {
            Term::Scaled(_, x) => alone(x),
            Term::ScaledSum(_, ys) => ys.iter().map(|(_, y)| alone(y)).sum(),
        }
    }

    /// A tensor of the term's shape and of float type, for checking it against an accumulator.
    fn like(&self) -> Option<&Tensor> {
        match self {
            Term::Scaled(_, x) => Some(x),
            Term::ScaledSum(_, ys) => ys.first().map(|(_, y)| y),
        }
    }
}

/// A term's inputs, held for the pass so that a term that is the accumulator itself reads its
/// old values (copy-on-write).
enum Held {
    One(Arc<Stored>),
    Sum(Vec<(f64, Arc<Stored>)>),
}

/// A term's inputs as the kernel reads them.
enum Source<'a> {
    One(&'a Buffer),
    Sum(Vec<(f64, &'a Buffer)>),
}

/// Elements of one block: the accumulator's block (and a sum's) stays in cache while the inputs
/// stream through it.
const BLOCK: usize = 4096;

/// `fused` compiled for AVX2 where the CPU has it (the portable build targets SSE2, two f64
/// lanes): the same operations, in the same order, so the same bits, on twice the lanes.
fn fused_best<A: Element>(acc: &mut [A], offset: usize, terms: &[(f64, Source<'_>)], from_zero: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn fused_avx2<A: Element>(acc: &mut [A], offset: usize, terms: &[(f64, Source<'_>)], from_zero: bool) {
            fused(acc, offset, terms, from_zero)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU was just found to support AVX2.
            unsafe { fused_avx2(acc, offset, terms, from_zero) };
            return;
        }
    }
    fused(acc, offset, terms, from_zero)
}

/// block += alpha * x[range], each element computed in f64 and stored in the block's type.
#[inline(always)]
fn add_scaled<A: Element>(block: &mut [A], alpha: f64, x: &Buffer, range: std::ops::Range<usize>) {
    match x {
        Buffer::F32(v) => {
            for (a, x) in block.iter_mut().zip(&v[range]) {
                *a = A::from_f64(a.to_f64() + alpha * *x as f64);
            }
        }
        Buffer::F64(v) => {
            for (a, x) in block.iter_mut().zip(&v[range]) {
                *a = A::from_f64(a.to_f64() + alpha * *x);
            }
        }
        _ => unreachable!("check_axpy admitted float inputs only"),
    }
}

/// acc += alpha_k * x_k for each term in order, block by block: element for element the same
/// operations, in the same order, as one `axpy` per term (a sum's own terms first, into an f64
/// block from zeros), with one pass over `acc`. With `from_zero`, each block is set to zero
/// first, in cache, so acc's old values are never read.
#[inline(always)]
fn fused<A: Element>(acc: &mut [A], offset: usize, terms: &[(f64, Source<'_>)], from_zero: bool) {
    let mut sum = Vec::new();
    if terms.iter().any(|(_, s)| matches!(s, Source::Sum(_))) {
        sum = vec![0f64; BLOCK.min(acc.len())];
    }
    for (b, block) in acc.chunks_mut(BLOCK).enumerate() {
        if from_zero {
            block.fill(A::from_f64(0.0));
        }
        let range = offset + b * BLOCK..offset + b * BLOCK + block.len();
        for (alpha, x) in terms {
            match x {
                Source::One(x) => add_scaled(block, *alpha, x, range.clone()),
                Source::Sum(ys) => {
                    let sum = &mut sum[..block.len()];
                    sum.fill(0.0);
                    for (beta, y) in ys {
                        add_scaled(sum, *beta, y, range.clone());
                    }
                    for (a, s) in block.iter_mut().zip(sum.iter()) {
                        *a = A::from_f64(a.to_f64() + alpha * s);
                    }
                }
            }
        }
    }
}

/// Runs `fused` over `acc` split between the machine's cores.
fn fused_parallel<A: Element>(acc: &mut [A], terms: &[(f64, Source<'_>)], from_zero: bool) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads < 2 || acc.len() < 16 * BLOCK {
        fused_best(acc, 0, terms, from_zero);
        return;
    }
    let per = acc.len().div_ceil(threads).next_multiple_of(BLOCK);
    std::thread::scope(|scope| {
        for (k, part) in acc.chunks_mut(per).enumerate() {
            scope.spawn(move || fused_best(part, k * per, terms, from_zero));
        }
    });
}

impl Tensor {
    /// Checks that `term` can be added to self (float types, one shape).
    pub fn check_term(&self, term: &Term) -> Result<(), TensorError> {
        let Some(x) = term.like() else {
            return Err(TensorError::Unsupported("a deferred sum without terms".into()));
        };
        if let Term::ScaledSum(_, ys) = term {
            for (_, y) in ys {
                x.same_shape(y, "axpy")?;
            }
        }
        self.check_axpy(x)
    }

    /// self += alpha_k * x_k for every term, in order: the result of one `axpy` per term, bit
    /// for bit, in one pass over self's memory and on every core.
    pub fn axpy_many(&mut self, terms: &[Term]) -> Result<(), TensorError> {
        self.fused_terms(terms, false)
    }

    /// self = sum_k alpha_k * x_k, in order: bit for bit what `axpy_many` gives on a tensor of
    /// zeros, without reading self's old values (a [`Tensor::unfilled`] accumulator).
    pub fn assign_many(&mut self, terms: &[Term]) -> Result<(), TensorError> {
        self.fused_terms(terms, true)
    }

    fn fused_terms(&mut self, terms: &[Term], from_zero: bool) -> Result<(), TensorError> {
        for term in terms {
            self.check_term(term)?;
        }
        let held: Vec<(f64, Held)> = terms
            .iter()
            .map(|t| match t {
                Term::Scaled(a, x) => (*a, Held::One(Arc::clone(&x.data))),
                Term::ScaledSum(a, ys) => (*a, Held::Sum(ys.iter().map(|(b, y)| (*b, Arc::clone(&y.data))).collect())),
            })
            .collect();
        let sources: Vec<(f64, Source<'_>)> = held
            .iter()
            .map(|(a, h)| match h {
                Held::One(x) => (*a, Source::One(&x.buf)),
                Held::Sum(ys) => (*a, Source::Sum(ys.iter().map(|(b, y)| (*b, &y.buf)).collect())),
            })
            .collect();
        match self.buf_mut() {
            Buffer::F64(a) => fused_parallel(a, &sources, from_zero),
            Buffer::F32(a) => fused_parallel(a, &sources, from_zero),
            // Without terms (check_term admits float accumulators only).
            Buffer::I32(v) if from_zero => v.fill(0),
            Buffer::I64(v) if from_zero => v.fill(0),
            Buffer::U8(v) if from_zero => v.fill(0),
            Buffer::I8(v) if from_zero => v.fill(0),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::DType;
    use super::*;

    fn scaled(terms: &[(f64, Tensor)]) -> Vec<Term> {
        terms.iter().map(|(a, x)| Term::Scaled(*a, x.clone())).collect()
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
        for dtype in [DType::F64, DType::F32] {
            let mut one_by_one = x(9).cast(dtype);
            for (a, t) in &terms {
                one_by_one.axpy(*a, t).expect("axpy");
            }
            let mut fused = x(9).cast(dtype);
            fused.axpy_many(&scaled(&terms)).expect("fused");
            assert_eq!(fused, one_by_one, "{dtype}");
        }
        // From an unfilled tensor (here holding garbage) as from zeros, a -0.0 term included.
        let mut zeros = Tensor::zeros(DType::F64, vec![n as u64]).expect("zeros");
        zeros.axpy_many(&scaled(&terms)).expect("fused");
        let mut garbage = Tensor::from_f64(vec![n as u64], vec![f64::NAN; n]).expect("garbage");
        garbage.assign_many(&scaled(&terms)).expect("assigned");
        assert_eq!(garbage, zeros);
        let neg = Tensor::from_f32(vec![2], vec![-0.0, 1.0]).expect("x");
        let mut from_zero = Tensor::from_f32(vec![2], vec![5.0, 5.0]).expect("a");
        from_zero.assign_many(&[Term::Scaled(1.0, neg.clone())]).expect("assigned");
        let mut plain = Tensor::zeros(DType::F32, vec![2]).expect("zeros");
        plain.axpy(1.0, &neg).expect("axpy");
        assert_eq!(from_zero.as_f32().map(|v| v[0].to_bits()), plain.as_f32().map(|v| v[0].to_bits()));
        // With itself as a term: the old values, as axpy(alpha, self) reads them.
        let mut a = x(1);
        let mut b = x(1);
        b.axpy(2.0, &x(1)).expect("axpy");
        let itself = a.clone();
        a.axpy_many(&[Term::Scaled(2.0, itself)]).expect("fused");
        assert_eq!(a, b);
    }

    #[test]
    fn a_sum_taken_as_a_term_is_bit_for_bit_the_sum_stored_first() {
        let n = 70_001usize;
        let x = |k: usize| {
            Tensor::from_f32(vec![n as u64], (0..n).map(|i| ((i * 31 + k * 997) % 513) as f32 * 0.013 - 3.1).collect())
                .expect("x")
        };
        let inner: Vec<(f64, Tensor)> = (0..4).map(|k| (17.0 + k as f64, x(k))).collect();
        // The fold as it was: the f64 sum stored, then the mean in f32 from it.
        let mut sum = Tensor::zeros(DType::F64, vec![n as u64]).expect("zeros");
        for (b, y) in &inner {
            sum.axpy(*b, y).expect("axpy");
        }
        let scale = 1.0 / 74.0;
        for start in [Tensor::zeros(DType::F32, vec![n as u64]).expect("zeros"), x(7)] {
            let mut stored = start.clone();
            stored.axpy(scale, &sum).expect("axpy");
            stored.axpy(0.5, &x(8)).expect("axpy");
            let mut fused = start.clone();
            fused.axpy_many(&[Term::ScaledSum(scale, inner.clone()), Term::Scaled(0.5, x(8))]).expect("fused");
            assert_eq!(fused, stored);
        }
        // Terms of another shape are refused.
        let other = Tensor::from_f32(vec![3], vec![1.0; 3]).expect("other");
        let mut acc = Tensor::zeros(DType::F32, vec![n as u64]).expect("zeros");
        let bad = Term::ScaledSum(1.0, vec![(1.0, x(0)), (1.0, other)]);
        assert!(matches!(acc.axpy_many(&[bad]), Err(TensorError::ShapeMismatch(_))));
    }
}
