//! JSON arrays of numbers read into little-endian f32 bytes: the one walk over `[n, n, ...]`
//! both readers of JSON inference bodies use (the one-pass one and serde's). On x86-64 with AVX2
//! and FMA the numbers are checked 64 bytes at a time and converted four at a time
//! ([`super::json_simd`]), elsewhere one by one ([`super::json_number`]).
use super::json_number::skip_space;

/// The JSON array of numbers at `b[at..]` (`at` on its `[`) as little-endian f32 bytes, and where
/// it ends; None if there is no such array there.
pub fn f32_array(b: &[u8], at: usize) -> Option<(Vec<u8>, usize)> {
    #[cfg(target_arch = "x86_64")]
    let numbers = super::json_simd::numbers;
    #[cfg(not(target_arch = "x86_64"))]
    let numbers = super::json_number::numbers;
    array_with(b, at, numbers)
}

/// `f32_array` read number by number everywhere: the reference the SIMD reader is checked
/// against (its unit tests and the `infer_request` fuzz target).
pub fn f32_array_number_by_number(b: &[u8], at: usize) -> Option<(Vec<u8>, usize)> {
    array_with(b, at, super::json_number::numbers)
}

fn array_with(
    b: &[u8],
    at: usize,
    numbers: fn(&[u8], usize, &mut Vec<u8>) -> Option<usize>,
) -> Option<(Vec<u8>, usize)> {
    if b.get(at) != Some(&b'[') {
        return None;
    }
    let mut bytes = Vec::with_capacity((b.len() - at) / 2);
    let i = skip_space(b, at + 1);
    if b.get(i) == Some(&b']') {
        return Some((bytes, i + 1));
    }
    let end = numbers(b, at + 1, &mut bytes)?;
    Some((bytes, end))
}
