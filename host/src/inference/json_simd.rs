//! JSON number arrays read with AVX2, 32 bytes at a time. Reading number by number
//! (`json_number::numbers`) branches on every digit, so its speed depends on how well the CPU
//! guesses each number's length: numbers of varying lengths (float32 values in their shortest
//! form) cost it half again as much as Python's regular 17 digits. Here a block's separators
//! (`,` and `]`) come from two compares, and each number between two separators is checked and
//! converted without a branch on its length (figures in docs/benchmarks.md, "Serving
//! concurrent requests"). A number in the form clients send, `-?D.F` with at most 19 digits and
//! a space before it at most, is read here; any other (exponents, several integer digits,
//! white space after it, anything that is not a number) by `json_number`'s reader, so both give
//! the same result for every input (tested). AVX2 is detected at run time (x86-64 CPUs since
//! 2013); without it, and on other CPUs, arrays are read number by number.
use std::arch::x86_64::{
    __m256i, _mm256_and_si256, _mm256_cmpeq_epi8, _mm256_cmpgt_epi8, _mm256_extract_epi64, _mm256_loadu_si256,
    _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_min_epu8, _mm256_movemask_epi8, _mm256_packus_epi32,
    _mm256_set1_epi16, _mm256_set1_epi32, _mm256_set1_epi8, _mm256_setr_epi8, _mm256_sub_epi8,
};

use super::json_number::{number_between, numbers as one_by_one, sure_f32, POW10};

/// 10^k as u64, k = 0..=19.
const POW10_U64: [u64; 20] = {
    let mut t = [1u64; 20];
    let mut k = 1;
    while k < 20 {
        t[k] = t[k - 1] * 10;
        k += 1;
    }
    t
};

/// Reads `number (, number)* ]` from `b[i..]` into `out` and returns where the `]` ends, as
/// `json_number::numbers` does.
pub(super) fn numbers(b: &[u8], i: usize, out: &mut Vec<u8>) -> Option<usize> {
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the one feature `by_blocks` is compiled for.
        return unsafe { by_blocks(b, i, out) };
    }
    one_by_one(b, i, out)
}

/// The 32 bytes at `b[at..]`; returns None from the calling function if there are fewer.
macro_rules! load {
    ($b:expr, $at:expr) => {{
        let chunk: &[u8; 32] = $b.get($at..)?.first_chunk::<32>()?;
        // SAFETY: `chunk` is 32 readable bytes and the load needs no alignment.
        unsafe { _mm256_loadu_si256(chunk.as_ptr().cast::<__m256i>()) }
    }};
}

#[target_feature(enable = "avx2")]
fn by_blocks(b: &[u8], mut start: usize, out: &mut Vec<u8>) -> Option<usize> {
    let byte = |c: u8| _mm256_set1_epi8(c as i8);
    let (comma, close, dot, minus, space, zero, nine) =
        (byte(b','), byte(b']'), byte(b'.'), byte(b'-'), byte(b' '), byte(b'0'), byte(9));
    let mut block = start;
    while block + 32 <= b.len() {
        let v = load!(b, block);
        let mut separators = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, comma)) as u32;
        let closing = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, close)) as u32;
        if closing != 0 {
            // The array's `]`: the last separator; commas past it are not the array's.
            let last = 1u32 << closing.trailing_zeros();
            separators = (separators & (last - 1)) | last;
        }
        while separators != 0 {
            let sep = block + separators.trailing_zeros() as usize;
            separators &= separators - 1;
            let mut value = None;
            if sep >= 32 && start + 32 <= b.len() {
                let w = load!(b, start);
                let t = _mm256_sub_epi8(w, zero);
                let digits = _mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_min_epu8(t, nine), t)) as u32;
                let minuses = _mm256_movemask_epi8(_mm256_cmpeq_epi8(w, minus)) as u32;
                let spaces = _mm256_movemask_epi8(_mm256_cmpeq_epi8(w, space)) as u32;
                let point = (_mm256_movemask_epi8(_mm256_cmpeq_epi8(w, dot)) as u32).trailing_zeros() as usize;
                // Before the integer digit: nothing, `-`, ` ` or ` -`.
                let prefix = match point {
                    1 => true,
                    2 => (minuses | spaces) & 1 != 0,
                    3 => spaces & (minuses >> 1) & 1 != 0,
                    _ => false,
                };
                let fraction = (sep - start).wrapping_sub(point + 1);
                if prefix && digits >> (point - 1) & 1 != 0 && (1..=19).contains(&fraction) {
                    let integer = u64::from(b[start + point - 1] - b'0');
                    let wanted = ((1u32 << fraction) - 1) << (point + 1);
                    // 19 digits at most, so the value fits a u64.
                    if digits & wanted == wanted && (integer == 0 || fraction <= 18) {
                        let negative = (minuses << 1) >> (point - 1) & 1;
                        value = plain(b, sep, fraction, integer, negative);
                    }
                }
            }
            let value = match value {
                Some(v) => v,
                None => number_between(b, start, sep)?,
            };
            out.extend_from_slice(&value.to_le_bytes());
            start = sep + 1;
        }
        if closing != 0 {
            return Some(start);
        }
        block += 32;
    }
    one_by_one(b, start, out)
}

/// `integer.fraction` (the fraction's digits checked, ending at `b[sep]`, `sep >= 32`) as f32,
/// when that is sure to be the correctly rounded value (see `json_number::short_f32`).
#[inline]
#[target_feature(enable = "avx2")]
fn plain(b: &[u8], sep: usize, fraction: usize, integer: u64, negative: u32) -> Option<f32> {
    // The fraction's digits, the last in lane 31, everything before them zeroed; then pairs,
    // fours and eights of digits combined by multiply-adds.
    let lane = _mm256_setr_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29,
        30, 31,
    );
    let t = _mm256_sub_epi8(load!(b, sep - 32), _mm256_set1_epi8(b'0' as i8));
    let keep = _mm256_cmpgt_epi8(lane, _mm256_set1_epi8(31 - fraction as i8));
    let pairs = _mm256_maddubs_epi16(_mm256_and_si256(t, keep), _mm256_set1_epi16(0x010A));
    let fours = _mm256_madd_epi16(pairs, _mm256_set1_epi32(0x0001_0064));
    let fours = _mm256_packus_epi32(fours, fours);
    let eights = _mm256_madd_epi16(fours, _mm256_set1_epi32(0x0001_2710));
    // Lanes 0..16 hold digits 0-7 and 8-15 of the 32, lanes 16..32 digits 16-23 and 24-31;
    // digits 0-12 are zero (19 digits at most).
    let low = _mm256_extract_epi64::<0>(eights) as u64;
    let high = _mm256_extract_epi64::<2>(eights) as u64;
    let mantissa = (low >> 32) * POW10_U64[16]
        + (high & 0xFFFF_FFFF) * POW10_U64[8]
        + (high >> 32)
        + integer * POW10_U64[fraction];
    if mantissa == 0 {
        return Some(f32::from_bits(negative << 31));
    }
    // As i64: one instruction to f64 where a u64 needs several.
    let v = sure_f32(i64::try_from(mantissa).ok()? as f64 / POW10[fraction])?;
    Some(f32::from_bits(v.to_bits() | negative << 31))
}

#[cfg(test)]
mod tests {
    use super::super::json_number::tests::next;
    use super::*;

    /// Random arrays of numbers in every form, with every separator spacing, some with one byte
    /// changed: read the same by blocks as one by one.
    #[test]
    fn arrays_read_by_blocks_read_as_one_number_at_a_time() {
        assert!(std::is_x86_feature_detected!("avx2"), "this test checks the AVX2 reader: run it on a CPU with AVX2");
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let (mut read, mut plain_numbers) = (0, 0);
        for round in 0..40_000 {
            let items: Vec<String> = (0..next(&mut x) % 60)
                .map(|_| {
                    let r = next(&mut x);
                    let f = f32::from_bits(r as u32 & 0xBF7F_FFFF);
                    match r >> 60 {
                        0..=5 => format!("{}", f64::from(f)),
                        6 => format!("{f}"),
                        7 => format!("{}", ((r >> 8) % 100_000) as f64 / 1000.0 - 50.0),
                        8 => format!("{f:e}"),
                        9 => format!("{}", (r >> 20) % 300),
                        10 => format!("{:.*}", ((r >> 30) % 22) as usize, ((r >> 8) % 10_000) as f64 / 1e4),
                        11 => {
                            let next_up = f32::from_bits(f.to_bits() + 1);
                            format!("{:.19}", (f64::from(f) + f64::from(next_up)) / 2.0)
                        }
                        _ => format!("{:.*}", ((r >> 30) % 22) as usize, ((r >> 8) % 100_000) as f64 / 1e4),
                    }
                })
                .collect();
            let separator = [",", ", ", " , ", ",\n"][(next(&mut x) % 4) as usize];
            let mut text =
                format!("{}[{}]", " ".repeat((next(&mut x) % 40) as usize), items.join(separator)).into_bytes();
            if round % 7 == 0 {
                let at = next(&mut x) as usize % text.len();
                text[at] = b"[],-.e 0x\"1"[(next(&mut x) % 11) as usize];
            }
            text.extend(std::iter::repeat_n(b'}', (next(&mut x) % 40) as usize));
            let Some(at) = text.iter().position(|&c| c == b'[') else { continue };
            let (mut by_blocks, mut one) = (Vec::new(), Vec::new());
            let got = numbers(&text, at + 1, &mut by_blocks);
            let want = one_by_one(&text, at + 1, &mut one);
            // What is written before a refusal is thrown away by the caller.
            assert_eq!(
                got.map(|end| (end, by_blocks)),
                want.map(|end| (end, one)),
                "{}",
                String::from_utf8_lossy(&text)
            );
            read += usize::from(want.is_some());
            // `-?D.F` with 19 digits at most: the block reader's own form.
            plain_numbers += items
                .iter()
                .map(|i| i.trim_start_matches('-').as_bytes())
                .filter(|i| i.len() <= 21 && i.get(1) == Some(&b'.') && !i.contains(&b'e'))
                .count();
        }
        // Both outcomes were seen, and plenty of numbers were in the block reader's own form.
        assert!(read > 30_000 && read < 40_000, "{read}");
        assert!(plain_numbers > 200_000, "{plain_numbers}");
    }
}
