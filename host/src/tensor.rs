//! Host-owned tensors and the native operations plugins call on them.
//!
//! Buffers are reference-counted and copied on write, so handing a model to a plugin, or a
//! plugin duplicating a tensor, costs nothing until one side writes.
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    I32,
    I64,
    U8,
    I8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 | DType::I8 => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::I8 => "i8",
        })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("dtype mismatch: {0}")]
    DtypeMismatch(String),
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
}

/// The elements of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    I8(Vec<i8>),
}

/// Numbers a buffer can hold, converted through f64 for mixed-type arithmetic.
trait Element: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            #[inline(always)]
            fn to_f64(self) -> f64 { self as f64 }
            #[inline(always)]
            fn from_f64(v: f64) -> Self { v as $t }
        }
    )*};
}
element!(f32, f64, i32, i64, u8, i8);

/// Runs `$body` with `$v` bound to the typed vector inside a `Buffer`.
macro_rules! with_vec {
    ($buf:expr, $v:ident => $body:expr) => {
        match $buf {
            Buffer::F32($v) => $body,
            Buffer::F64($v) => $body,
            Buffer::I32($v) => $body,
            Buffer::I64($v) => $body,
            Buffer::U8($v) => $body,
            Buffer::I8($v) => $body,
        }
    };
}

impl Buffer {
    pub fn zeros(dtype: DType, len: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(pool::zeroed(len)),
            DType::F64 => Buffer::F64(pool::zeroed(len)),
            DType::I32 => Buffer::I32(vec![0; len]),
            DType::I64 => Buffer::I64(vec![0; len]),
            DType::U8 => Buffer::U8(vec![0; len]),
            DType::I8 => Buffer::I8(vec![0; len]),
        }
    }

    /// `len` elements whose values are arbitrary for floats (see [`pool::leftovers`]); zeros for
    /// the other types.
    fn leftovers(dtype: DType, len: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(pool::leftovers(len)),
            DType::F64 => Buffer::F64(pool::leftovers(len)),
            other => Buffer::zeros(other, len),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Buffer::F32(_) => DType::F32,
            Buffer::F64(_) => DType::F64,
            Buffer::I32(_) => DType::I32,
            Buffer::I64(_) => DType::I64,
            Buffer::U8(_) => DType::U8,
            Buffer::I8(_) => DType::I8,
        }
    }

    pub fn len(&self) -> usize {
        with_vec!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes (the safetensors layout).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        with_vec!(self, v => v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Little-endian bytes, borrowed without a copy on little-endian machines.
    pub fn le_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(with_vec!(self, v => bytemuck::cast_slice(v)))
        } else {
            std::borrow::Cow::Owned(self.to_le_bytes())
        }
    }

    /// An empty buffer with room for `len` elements (a kept one of the pool's for large float
    /// buffers: a cloud reading a round's updates from disk reuses those it folded already).
    pub fn with_capacity(dtype: DType, len: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(pool::emptied(len)),
            DType::F64 => Buffer::F64(pool::emptied(len)),
            DType::I32 => Buffer::I32(Vec::with_capacity(len)),
            DType::I64 => Buffer::I64(Vec::with_capacity(len)),
            DType::U8 => Buffer::U8(Vec::with_capacity(len)),
            DType::I8 => Buffer::I8(Vec::with_capacity(len)),
        }
    }

    /// Appends little-endian elements; returns whether they are all finite, or None if the bytes
    /// are not whole elements.
    pub fn append_le(&mut self, bytes: &[u8]) -> Option<bool> {
        let size = self.dtype().size();
        if !bytes.len().is_multiple_of(size) {
            return None;
        }
        macro_rules! append {
            ($v:ident, $t:ty) => {{
                let start = $v.len();
                $v.extend(bytes.chunks_exact(size).map(|c| <$t>::from_le_bytes(c.try_into().expect("whole elements"))));
                $v[start..].iter().fold(true, |ok, x| ok & Element::to_f64(*x).is_finite())
            }};
        }
        Some(match self {
            Buffer::F32(v) => append!(v, f32),
            Buffer::F64(v) => append!(v, f64),
            Buffer::I32(v) => append!(v, i32),
            Buffer::I64(v) => append!(v, i64),
            Buffer::U8(v) => append!(v, u8),
            Buffer::I8(v) => append!(v, i8),
        })
    }

    /// Parses little-endian bytes; `None` if the length is not a multiple of the element size.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Option<Buffer> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return None;
        }
        macro_rules! parse {
            ($t:ty, $variant:ident) => {
                Buffer::$variant(
                    bytes
                        .chunks_exact(std::mem::size_of::<$t>())
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunks_exact yields whole elements")))
                        .collect(),
                )
            };
        }
        Some(match dtype {
            DType::F32 => parse!(f32, F32),
            DType::F64 => parse!(f64, F64),
            DType::I32 => parse!(i32, I32),
            DType::I64 => parse!(i64, I64),
            DType::U8 => parse!(u8, U8),
            DType::I8 => parse!(i8, I8),
        })
    }

    /// True when no element is NaN or infinite (integers always are finite).
    pub fn all_finite(&self) -> bool {
        // Folded per chunk rather than `all` so the check vectorizes.
        fn check<T: Copy>(v: &[T], finite: impl Fn(T) -> bool) -> bool {
            v.chunks(4096).all(|c| c.iter().fold(true, |ok, x| ok & finite(*x)))
        }
        match self {
            Buffer::F32(v) => check(v, f32::is_finite),
            Buffer::F64(v) => check(v, f64::is_finite),
            _ => true,
        }
    }

    /// Parses little-endian bytes and, in the same pass, finds whether every element is finite.
    pub fn from_le_bytes_checked(dtype: DType, bytes: &[u8]) -> Option<(Buffer, bool)> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return None;
        }
        fn floats<T: Copy>(
            bytes: &[u8],
            parse: impl Fn(&[u8]) -> T,
            finite: impl Fn(T) -> bool,
            size: usize,
        ) -> (Vec<T>, bool) {
            let mut out = Vec::with_capacity(bytes.len() / size);
            let mut ok = true;
            for block in bytes.chunks(size * 4096) {
                let start = out.len();
                out.extend(block.chunks_exact(size).map(&parse));
                ok &= out[start..].iter().fold(true, |acc, x| acc & finite(*x));
            }
            (out, ok)
        }
        Some(match dtype {
            DType::F32 => {
                let (v, ok) = floats(bytes, |c| f32::from_le_bytes(c.try_into().expect("4 bytes")), f32::is_finite, 4);
                (Buffer::F32(v), ok)
            }
            DType::F64 => {
                let (v, ok) = floats(bytes, |c| f64::from_le_bytes(c.try_into().expect("8 bytes")), f64::is_finite, 8);
                (Buffer::F64(v), ok)
            }
            other => (Buffer::from_le_bytes(other, bytes)?, true),
        })
    }

    fn cast(&self, dtype: DType) -> Buffer {
        fn conv<A: Element, B: Element>(src: &[A]) -> Vec<B> {
            src.iter().map(|x| B::from_f64(x.to_f64())).collect()
        }
        if self.dtype() == dtype {
            return self.clone();
        }
        /// Into a kept buffer where there is one, so a cast every update reuses memory.
        fn conv_pooled<A: Element, B: Element + pool::Pooled>(src: &[A]) -> Vec<B> {
            let mut out = pool::zeroed::<B>(src.len());
            out.iter_mut().zip(src).for_each(|(o, x)| *o = B::from_f64(x.to_f64()));
            out
        }
        with_vec!(self, v => match dtype {
            DType::F32 => Buffer::F32(conv_pooled(v)),
            DType::F64 => Buffer::F64(conv_pooled(v)),
            DType::I32 => Buffer::I32(conv(v)),
            DType::I64 => Buffer::I64(conv(v)),
            DType::U8 => Buffer::U8(conv(v)),
            DType::I8 => Buffer::I8(conv(v)),
        })
    }
}

/// A buffer and, once known, whether all its elements are finite. Decoding fills the flag in
/// the same pass that reads the bytes, so validating an update costs no extra pass over memory.
#[derive(Clone, Debug)]
struct Stored {
    buf: Buffer,
    finite: std::sync::OnceLock<bool>,
}

impl Drop for Stored {
    fn drop(&mut self) {
        pool::recycle(std::mem::replace(&mut self.buf, Buffer::U8(Vec::new())));
    }
}

impl std::ops::Deref for Stored {
    type Target = Buffer;
    fn deref(&self) -> &Buffer {
        &self.buf
    }
}

/// A dense tensor: a shape and a shared, copy-on-write buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<u64>,
    data: Arc<Stored>,
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape && (Arc::ptr_eq(&self.data, &other.data) || self.data.buf == other.data.buf)
    }
}

fn stored(buf: Buffer, finite: Option<bool>) -> Arc<Stored> {
    let cell = std::sync::OnceLock::new();
    if let Some(f) = finite {
        let _ = cell.set(f);
    }
    Arc::new(Stored { buf, finite: cell })
}

/// Runs `f(offset, part)` over `v` split between the machine's cores (on this thread alone when
/// `v` is shorter than `min_len`).
pub fn for_each_part<T: Send>(v: &mut [T], min_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads < 2 || v.len() < min_len.max(2) {
        f(0, v);
        return;
    }
    let per = v.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (k, part) in v.chunks_mut(per).enumerate() {
            let f = &f;
            scope.spawn(move || f(k * per, part));
        }
    });
}

/// Number of elements of `shape`, or None on overflow.
pub fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d))
}

fn float_only(op: &str, dtype: DType) -> Result<(), TensorError> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(TensorError::Unsupported(format!("{op} is defined for f32 and f64 tensors, not {dtype}")))
    }
}

impl Tensor {
    /// A tensor over `data` with `shape`; None if the element count does not match.
    pub fn new(shape: Vec<u64>, data: Buffer) -> Option<Tensor> {
        Tensor::with_finite(shape, data, None)
    }

    /// As `new`, with the all-finite flag when the caller already knows it.
    pub fn with_finite(shape: Vec<u64>, data: Buffer, finite: Option<bool>) -> Option<Tensor> {
        (numel(&shape)? == data.len() as u64).then(|| Tensor { shape, data: stored(data, finite) })
    }

    /// The buffer for writing (copied first if shared); forgets the cached all-finite flag.
    fn buf_mut(&mut self) -> &mut Buffer {
        let s = Arc::make_mut(&mut self.data);
        s.finite = std::sync::OnceLock::new();
        &mut s.buf
    }

    pub fn from_f32(shape: Vec<u64>, data: Vec<f32>) -> Option<Tensor> {
        Tensor::new(shape, Buffer::F32(data))
    }

    pub fn from_f64(shape: Vec<u64>, data: Vec<f64>) -> Option<Tensor> {
        Tensor::new(shape, Buffer::F64(data))
    }

    pub fn zeros(dtype: DType, shape: Vec<u64>) -> Result<Tensor, TensorError> {
        let n = numel(&shape).ok_or_else(|| TensorError::OutOfMemory(format!("shape {shape:?} overflows")))?;
        let n = usize::try_from(n).map_err(|_| TensorError::OutOfMemory(format!("shape {shape:?} is too large")))?;
        Ok(Tensor { shape, data: stored(Buffer::zeros(dtype, n), Some(true)) })
    }

    /// A tensor whose every element the caller writes before anything reads it (see
    /// [`Tensor::assign_many`]): its values are arbitrary until then.
    pub fn unfilled(dtype: DType, shape: Vec<u64>) -> Result<Tensor, TensorError> {
        let n = numel(&shape).ok_or_else(|| TensorError::OutOfMemory(format!("shape {shape:?} overflows")))?;
        let n = usize::try_from(n).map_err(|_| TensorError::OutOfMemory(format!("shape {shape:?} is too large")))?;
        Ok(Tensor { shape, data: stored(Buffer::leftovers(dtype, n), None) })
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    pub fn numel(&self) -> u64 {
        self.data.len() as u64
    }

    /// Bytes the elements take.
    pub fn byte_len(&self) -> usize {
        self.data.len() * self.dtype().size()
    }

    pub fn buffer(&self) -> &Buffer {
        &self.data.buf
    }

    /// The elements as f32, if that is the tensor's type.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data.buf {
            Buffer::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements as f64, if that is the tensor's type.
    pub fn as_f64(&self) -> Option<&[f64]> {
        match &self.data.buf {
            Buffer::F64(v) => Some(v),
            _ => None,
        }
    }

    /// All elements converted to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        with_vec!(&self.data.buf, v => v.iter().map(|x| x.to_f64()).collect())
    }

    pub fn cast(&self, dtype: DType) -> Tensor {
        if self.dtype() == dtype {
            return self.clone();
        }
        Tensor { shape: self.shape.clone(), data: stored(self.data.cast(dtype), None) }
    }

    fn same_shape(&self, other: &Tensor, op: &str) -> Result<(), TensorError> {
        if self.shape == other.shape {
            Ok(())
        } else {
            Err(TensorError::ShapeMismatch(format!("{op}: shapes {:?} and {:?} differ", self.shape, other.shape)))
        }
    }

    /// Whether self += alpha * x is defined: both float, same shape.
    pub fn check_axpy(&self, x: &Tensor) -> Result<(), TensorError> {
        float_only("axpy", self.dtype())?;
        float_only("axpy", x.dtype())?;
        self.same_shape(x, "axpy")
    }

    /// self += alpha * x, computed in f64 and stored in self's type.
    pub fn axpy(&mut self, alpha: f64, x: &Tensor) -> Result<(), TensorError> {
        self.check_axpy(x)?;
        fn kernel<A: Element, B: Element>(a: &mut [A], alpha: f64, b: &[B]) {
            for (a, b) in a.iter_mut().zip(b) {
                *a = A::from_f64(a.to_f64() + alpha * b.to_f64());
            }
        }
        // Cloned first so that axpy(alpha, self) reads the old values (copy-on-write).
        let x = Arc::clone(&x.data);
        match (self.buf_mut(), &x.buf) {
            (Buffer::F64(a), Buffer::F32(b)) => kernel(a, alpha, b),
            (Buffer::F64(a), Buffer::F64(b)) => kernel(a, alpha, b),
            (Buffer::F32(a), Buffer::F32(b)) => kernel(a, alpha, b),
            (Buffer::F32(a), Buffer::F64(b)) => kernel(a, alpha, b),
            _ => unreachable!("float_only checked both operands"),
        }
        Ok(())
    }

    /// self *= alpha.
    pub fn scale(&mut self, alpha: f64) -> Result<(), TensorError> {
        float_only("scale", self.dtype())?;
        match self.buf_mut() {
            Buffer::F32(v) => v.iter_mut().for_each(|x| *x = (*x as f64 * alpha) as f32),
            Buffer::F64(v) => v.iter_mut().for_each(|x| *x *= alpha),
            _ => unreachable!("float_only checked the operand"),
        }
        Ok(())
    }

    /// sum_i self_i * other_i in f64.
    pub fn dot(&self, other: &Tensor) -> Result<f64, TensorError> {
        float_only("dot", self.dtype())?;
        float_only("dot", other.dtype())?;
        self.same_shape(other, "dot")?;
        fn kernel<A: Element, B: Element>(a: &[A], b: &[B]) -> f64 {
            a.iter().zip(b).map(|(a, b)| a.to_f64() * b.to_f64()).sum()
        }
        Ok(match (&self.data.buf, &other.data.buf) {
            (Buffer::F32(a), Buffer::F32(b)) => kernel(a, b),
            (Buffer::F32(a), Buffer::F64(b)) => kernel(a, b),
            (Buffer::F64(a), Buffer::F32(b)) => kernel(a, b),
            (Buffer::F64(a), Buffer::F64(b)) => kernel(a, b),
            _ => unreachable!("float_only checked both operands"),
        })
    }

    /// sqrt(sum_i self_i^2) in f64.
    pub fn l2_norm(&self) -> Result<f64, TensorError> {
        self.dot(self).map(f64::sqrt)
    }

    /// Scales self so its L2 norm is at most `max_norm`; returns the factor applied.
    pub fn clip_by_norm(&mut self, max_norm: f64) -> Result<f64, TensorError> {
        if max_norm.is_nan() || max_norm < 0.0 {
            return Err(TensorError::Unsupported(format!("clip-by-norm needs max-norm >= 0, got {max_norm}")));
        }
        let norm = self.l2_norm()?;
        if norm <= max_norm {
            return Ok(1.0);
        }
        let factor = max_norm / norm;
        self.scale(factor)?;
        Ok(factor)
    }

    /// True when no element is NaN or infinite.
    pub fn all_finite(&self) -> bool {
        *self.data.finite.get_or_init(|| self.data.buf.all_finite())
    }

    fn chunk_range(&self, offset: u64, count: u64, max: u32) -> Result<std::ops::Range<usize>, TensorError> {
        let len = self.numel();
        if count > u64::from(max) {
            return Err(TensorError::OutOfBounds(format!("a chunk moves at most {max} elements, asked for {count}")));
        }
        match offset.checked_add(count) {
            Some(end) if end <= len => Ok(offset as usize..end as usize),
            _ => Err(TensorError::OutOfBounds(format!("elements [{offset}, {offset}+{count}) of a tensor of {len}"))),
        }
    }

    /// Elements [offset, offset + count) as f64.
    pub fn read(&self, offset: u64, count: u32, max: u32) -> Result<Vec<f64>, TensorError> {
        let r = self.chunk_range(offset, u64::from(count), max)?;
        Ok(with_vec!(&self.data.buf, v => v[r].iter().map(|x| x.to_f64()).collect()))
    }

    /// Overwrites elements from `offset`, converting to the tensor's type.
    pub fn write(&mut self, offset: u64, values: &[f64], max: u32) -> Result<(), TensorError> {
        let r = self.chunk_range(offset, values.len() as u64, max)?;
        with_vec!(self.buf_mut(), v => {
            for (dst, src) in v[r].iter_mut().zip(values) {
                *dst = Element::from_f64(*src);
            }
        });
        Ok(())
    }

    pub fn read_f32(&self, offset: u64, count: u32, max: u32) -> Result<Vec<f32>, TensorError> {
        let r = self.chunk_range(offset, u64::from(count), max)?;
        match &self.data.buf {
            Buffer::F32(v) => Ok(v[r].to_vec()),
            other => Err(TensorError::DtypeMismatch(format!("read-f32 on a {} tensor", other.dtype()))),
        }
    }

    pub fn write_f32(&mut self, offset: u64, values: &[f32], max: u32) -> Result<(), TensorError> {
        let r = self.chunk_range(offset, values.len() as u64, max)?;
        match self.buf_mut() {
            Buffer::F32(v) => {
                v[r].copy_from_slice(values);
                Ok(())
            }
            other => Err(TensorError::DtypeMismatch(format!("write-f32 on a {} tensor", other.dtype()))),
        }
    }
}

mod elementwise;
mod fused;
mod pool;

pub use fused::Term;

#[cfg(test)]
mod tests {
    use super::*;

    fn f32t(v: &[f32]) -> Tensor {
        Tensor::from_f32(vec![v.len() as u64], v.to_vec()).expect("shape matches")
    }

    #[test]
    fn axpy_accumulates_mixed_precision() {
        let mut acc = Tensor::zeros(DType::F64, vec![3]).expect("small");
        acc.axpy(2.0, &f32t(&[1.0, 2.0, 3.0])).expect("axpy");
        acc.axpy(0.5, &f32t(&[4.0, 4.0, 4.0])).expect("axpy");
        assert_eq!(acc.as_f64(), Some(&[4.0, 6.0, 8.0][..]));
    }

    #[test]
    fn axpy_with_itself_reads_old_values() {
        let mut a = f32t(&[1.0, 2.0]);
        let b = a.clone();
        a.axpy(1.0, &b).expect("axpy");
        assert_eq!(a.as_f32(), Some(&[2.0, 4.0][..]));
        assert_eq!(b.as_f32(), Some(&[1.0, 2.0][..]), "copy-on-write keeps the other handle intact");
    }

    #[test]
    fn shape_and_dtype_errors() {
        let mut a = f32t(&[1.0, 2.0]);
        assert!(matches!(a.axpy(1.0, &f32t(&[1.0])), Err(TensorError::ShapeMismatch(_))));
        let ints = Tensor::new(vec![2], Buffer::I32(vec![1, 2])).expect("shape");
        assert!(matches!(a.axpy(1.0, &ints), Err(TensorError::Unsupported(_))));
    }

    #[test]
    fn finite_flag_follows_writes() {
        let mut a = f32t(&[1.0, 2.0]);
        assert!(a.all_finite());
        a.write(1, &[f64::INFINITY], 16).expect("write");
        assert!(!a.all_finite(), "a write forgets the cached flag");
        let mut b = Tensor::zeros(DType::F64, vec![2]).expect("small");
        assert!(b.all_finite());
        b.axpy(1.0, &a).expect("axpy");
        assert!(!b.all_finite());
    }

    #[test]
    fn norms_and_clipping() {
        let mut a = f32t(&[3.0, 4.0]);
        assert_eq!(a.l2_norm(), Ok(5.0));
        assert_eq!(a.dot(&f32t(&[1.0, 1.0])), Ok(7.0));
        assert_eq!(a.clip_by_norm(10.0), Ok(1.0));
        assert_eq!(a.clip_by_norm(1.0), Ok(0.2));
        assert!((a.l2_norm().expect("norm") - 1.0).abs() < 1e-6);
    }

    #[test]
    fn chunks_are_bounded() {
        let mut a = f32t(&[1.0, 2.0, 3.0]);
        assert_eq!(a.read(1, 2, 16), Ok(vec![2.0, 3.0]));
        assert!(matches!(a.read(2, 2, 16), Err(TensorError::OutOfBounds(_))));
        assert!(matches!(a.read(0, 3, 2), Err(TensorError::OutOfBounds(_))));
        assert!(matches!(a.read(u64::MAX, 2, 16), Err(TensorError::OutOfBounds(_))));
        a.write(0, &[9.0], 16).expect("write");
        a.write_f32(2, &[7.0], 16).expect("write");
        assert_eq!(a.as_f32(), Some(&[9.0, 2.0, 7.0][..]));
    }

    #[test]
    fn bytes_round_trip() {
        let a = f32t(&[1.5, -2.0]);
        let b = Buffer::from_le_bytes(DType::F32, &a.buffer().to_le_bytes()).expect("aligned");
        assert_eq!(&b, a.buffer());
        let (c, finite) = Buffer::from_le_bytes_checked(DType::F32, &a.buffer().to_le_bytes()).expect("aligned");
        assert_eq!((&c, finite), (a.buffer(), true));
        let nan = Tensor::from_f32(vec![2], vec![1.0, f32::NAN]).expect("shape");
        let (_, finite) = Buffer::from_le_bytes_checked(DType::F32, &nan.buffer().to_le_bytes()).expect("aligned");
        assert!(!finite);
        assert!(Buffer::from_le_bytes(DType::F32, &[0, 1, 2]).is_none());
    }
}
