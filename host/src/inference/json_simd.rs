//! JSON number arrays read with SIMD in two passes. Reading number by number
//! (`json_number::numbers`) branches on every digit, and a reader converting each number as it
//! finds a block's separators still branches once a number on how many a block holds (7.5 ns a
//! number on the serving benchmark's body; 3.2 ns here). The first pass classifies 64 bytes at a
//! time (AVX-512BW where the CPU has it, two AVX2 halves elsewhere), checks with bit masks that
//! every number is in the form clients send, `( |-| -)?D.F` after a `,`, and lists the
//! separators; the second converts four listed numbers at a time without a branch on their
//! lengths (each fraction's first 20 digits weighted by multiply-adds, then f64 lanes, then f32).
//! Figures in docs/benchmarks.md ("Serving concurrent requests"). A block holding anything else
//! (an exponent, several integer digits, white space after a number or other than one space
//! before it, ...) is read number by number up to its end; four numbers of which one has more
//! than 20 fraction digits or an f64 value too close to the midpoint between two f32s go one by
//! one through `json_number`'s exact reader. So both readers give the same result for every
//! input (tested). AVX2, FMA, BMI1, LZCNT and POPCNT are detected at run time (x86-64 CPUs since
//! 2013); without them arrays are read number by number.
use std::arch::x86_64::{
    __m256i, _mm256_and_si256, _mm256_castpd_si256, _mm256_castsi256_pd, _mm256_castsi256_si128, _mm256_cmpeq_epi8,
    _mm256_cmpgt_epi64, _mm256_cvtepi32_pd, _mm256_cvtpd_ps, _mm256_extracti128_si256, _mm256_fmadd_pd,
    _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_min_epu8, _mm256_movemask_epi8,
    _mm256_movemask_pd, _mm256_mul_pd, _mm256_packus_epi32, _mm256_permutevar8x32_epi32, _mm256_set1_epi32,
    _mm256_set1_epi64x, _mm256_set1_epi8, _mm256_set1_pd, _mm256_setr_epi32, _mm256_setr_epi8, _mm256_sub_epi64,
    _mm256_sub_epi8, _mm256_subs_epu8, _mm256_unpackhi_epi64, _mm256_unpacklo_epi64, _mm512_cmpeq_epi8_mask,
    _mm512_cmple_epu8_mask, _mm512_loadu_si512, _mm512_set1_epi8, _mm512_sub_epi8, _mm_and_si128, _mm_castps_si128,
    _mm_cmpgt_epi32, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi32, _mm_slli_epi32, _mm_storeu_si128, _mm_sub_epi32,
};

use super::json_number::{number_between, numbers as one_by_one, numbers_to, Reached};

/// Reads `number (, number)* ]` from `b[i..]` into `out` and returns where the `]` ends, as
/// `json_number::numbers` does.
pub(super) fn numbers(b: &[u8], i: usize, out: &mut Vec<u8>) -> Option<usize> {
    // Separators are listed as u32 offsets.
    let base = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("bmi1")
        && is_x86_feature_detected!("lzcnt")
        && is_x86_feature_detected!("popcnt");
    if u32::try_from(b.len()).is_err() || !base {
        return one_by_one(b, i, out);
    }
    if is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU has every feature `by_blocks_avx512` is compiled for.
        return unsafe { by_blocks_avx512(b, i, out) };
    }
    // SAFETY: the CPU has every feature `by_blocks_avx2` is compiled for.
    unsafe { by_blocks_avx2(b, i, out) }
}

/// Which of a block's 64 bytes are each kind of character, as bits.
struct Classes {
    comma: u64,
    close: u64,
    digit: u64,
    point: u64,
    minus: u64,
    space: u64,
}

#[inline]
#[target_feature(enable = "avx512bw")]
fn classes_avx512(block: &[u8; 64]) -> Classes {
    // SAFETY: `block` is 64 readable bytes and the load needs no alignment.
    let v = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
    let eq = |c: u8| _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(c as i8));
    Classes {
        comma: eq(b','),
        close: eq(b']'),
        digit: _mm512_cmple_epu8_mask(_mm512_sub_epi8(v, _mm512_set1_epi8(b'0' as i8)), _mm512_set1_epi8(9)),
        point: eq(b'.'),
        minus: eq(b'-'),
        space: eq(b' '),
    }
}

#[inline]
#[target_feature(enable = "avx2")]
fn classes_avx2(block: &[u8; 64]) -> Classes {
    // SAFETY: `block` is 64 readable bytes and the loads need no alignment.
    let halves = unsafe {
        [
            _mm256_loadu_si256(block.as_ptr().cast::<__m256i>()),
            _mm256_loadu_si256(block.as_ptr().add(32).cast::<__m256i>()),
        ]
    };
    let bits = |lanes: [__m256i; 2]| {
        u64::from(_mm256_movemask_epi8(lanes[0]) as u32) | u64::from(_mm256_movemask_epi8(lanes[1]) as u32) << 32
    };
    let eq = |c: u8| bits(halves.map(|h| _mm256_cmpeq_epi8(h, _mm256_set1_epi8(c as i8))));
    let (zero, nine) = (_mm256_set1_epi8(b'0' as i8), _mm256_set1_epi8(9));
    let digit = bits(halves.map(|h| {
        let t = _mm256_sub_epi8(h, zero);
        _mm256_cmpeq_epi8(_mm256_min_epu8(t, nine), t)
    }));
    Classes { comma: eq(b','), close: eq(b']'), digit, point: eq(b'.'), minus: eq(b'-'), space: eq(b' ') }
}

#[target_feature(enable = "avx2,fma,bmi1,lzcnt,popcnt,avx512bw")]
fn by_blocks_avx512(b: &[u8], start: usize, out: &mut Vec<u8>) -> Option<usize> {
    two_passes(b, start, out, |block| classes_avx512(block))
}

#[target_feature(enable = "avx2,fma,bmi1,lzcnt,popcnt")]
fn by_blocks_avx2(b: &[u8], start: usize, out: &mut Vec<u8>) -> Option<usize> {
    two_passes(b, start, out, |block| classes_avx2(block))
}

/// Separators listed before their numbers are converted.
const BATCH: usize = 1024;

/// The two passes over `b[start..]` (`start` just after a `[` or a `,`), with `classes` telling
/// each 64-byte block's characters apart; inlined into callers compiled for `four`'s features.
#[inline(always)]
fn two_passes(b: &[u8], mut start: usize, out: &mut Vec<u8>, classes: impl Fn(&[u8; 64]) -> Classes) -> Option<usize> {
    // Room for a whole block's separators past BATCH, four written at a time.
    let mut seps = [0u32; BATCH + 68];
    loop {
        let mut block = start;
        // Whether the byte before the block was a separator (the one before `start` is), a
        // space, a minus, an integer digit or a digit.
        let (mut sep_before, mut space_before, mut minus_before, mut integer_before, mut digit_before) =
            (1u64, 0u64, 0u64, 0u64, 0u64);
        let mut found = 0;
        // Whether the array's `]` was found, and the block holding what this reader leaves to
        // the number-by-number one.
        let (mut closed, mut other) = (false, None);
        while found <= BATCH {
            let Some(bytes) = b.get(block..).and_then(|rest| rest.first_chunk::<64>()) else { break };
            let Classes { comma, close, digit, point, minus, space } = classes(bytes);
            // Past the array's `]` nothing is the array's.
            let (mut seps_here, region) = if close != 0 {
                let last = close & close.wrapping_neg();
                ((comma & (last - 1)) | last, last | (last - 1))
            } else {
                (comma, !0)
            };
            let after_sep = (comma << 1) | sep_before;
            let after_space = (space << 1) | space_before;
            let after_minus = (minus << 1) | minus_before;
            let integer = digit & (after_sep | after_space | after_minus);
            // A space only after a separator, a minus only after one or a space, a point right
            // after each integer digit and nowhere else, a separator only after a digit (so a
            // point is followed by a digit), and nothing but these characters.
            let wrong = (space & !after_sep)
                | (minus & !(after_sep | after_space))
                | (point ^ ((integer << 1) | integer_before))
                | ((comma | (close & region)) & !((digit << 1) | digit_before))
                | !(digit | point | minus | space | comma | close);
            if wrong & region != 0 {
                other = Some(block);
                break;
            }
            (sep_before, space_before, minus_before, integer_before, digit_before) =
                (comma >> 63, space >> 63, minus >> 63, integer >> 63, digit >> 63);
            let count = seps_here.count_ones() as usize;
            // u32: checked by `numbers`.
            let base = block as u32;
            let mut k = found;
            // Four at a time: one branch for the usual block of four numbers or fewer.
            loop {
                for slot in &mut seps[k..k + 4] {
                    *slot = base + seps_here.trailing_zeros();
                    seps_here &= seps_here.wrapping_sub(1);
                }
                k += 4;
                if seps_here == 0 {
                    break;
                }
            }
            found += count;
            if close != 0 {
                closed = true;
                break;
            }
            block += 64;
        }
        start = convert(b, start, &seps[..found], out)?;
        if closed {
            // Just past the `]`, the last separator.
            return Some(start);
        }
        let stop = match other {
            Some(block) => block + 64,
            None if found > BATCH => continue,
            // Fewer than 64 bytes left.
            None => b.len(),
        };
        match numbers_to(b, start, out, stop)? {
            Reached::End(end) => return Some(end),
            Reached::Stop(next) => start = next,
        }
    }
}

/// Converts the numbers ending at `seps` (their form checked, the first starting at `start`)
/// into `out`; returns where the number after the last starts.
#[inline(always)]
fn convert(b: &[u8], mut start: usize, seps: &[u32], out: &mut Vec<u8>) -> Option<usize> {
    let old = out.len();
    out.resize(old + 4 * seps.len(), 0);
    let (groups, rest) = seps.as_chunks::<4>();
    let (slots, rest_slots) = out[old..].as_chunks_mut::<16>();
    for (group, slot) in groups.iter().zip(slots) {
        // SAFETY: `two_passes` is inlined only into functions compiled for every feature `four` is.
        start = if unsafe { four(b, group, slot) } {
            group[3] as usize + 1
        } else {
            one_at_a_time(b, start, group, slot.as_chunks_mut::<4>().0)?
        };
    }
    one_at_a_time(b, start, rest, rest_slots.as_chunks_mut::<4>().0)
}

/// The numbers ending at `seps` (the first starting at `start`) by the exact reader, one at a
/// time, into `values`; returns where the number after the last starts.
fn one_at_a_time(b: &[u8], mut start: usize, seps: &[u32], values: &mut [[u8; 4]]) -> Option<usize> {
    for (&sep, value) in seps.iter().zip(values) {
        *value = number_between(b, start, sep as usize)?.to_le_bytes();
        start = sep as usize + 1;
    }
    Some(start)
}

/// 24 lanes kept, then 32 cleared: loaded from `20 - f`, a number's lanes up to its `f`th
/// fraction digit (at most 20).
static KEEP: [u8; 56] = {
    let mut t = [0u8; 56];
    let mut k = 0;
    while k < 24 {
        t[k] = 0xFF;
        k += 1;
    }
    t
};

/// The four numbers ending at `seps` (ascending, each in the form `( |-| -)?D.F` after a
/// separator) as f32 into `slot`; false, writing nothing, when one of them has more than 20
/// fraction digits, is not in reach of the loads, follows the array's `[` directly or is too
/// close to the midpoint between two f32s to round from f64.
#[inline]
#[target_feature(enable = "avx2,fma,bmi1,lzcnt,popcnt")]
fn four(b: &[u8], seps: &[u32; 4], slot: &mut [u8; 16]) -> bool {
    let (first, last) = (seps[0] as usize, seps[3] as usize);
    if first < 32 || last + 32 > b.len() {
        return false;
    }
    let dot = _mm256_set1_epi8(b'.' as i8);
    // Lane 1 (the byte before the integer digit) less ',' saturated: 1 for `-`, 0 for `,` and
    // ` `, 47 for `[`; the digits less '0'; the point saturated to 0.
    let mut less = [b'0' as i8; 32];
    less[1] = b',' as i8;
    // SAFETY: `less` is 32 readable bytes.
    let less = unsafe { _mm256_loadu_si256(less.as_ptr().cast::<__m256i>()) };
    // Pairs of lanes: (nothing, sign) (integer digit, point) (digit, digit)...
    let weights = _mm256_setr_epi8(
        0, 1, 1, 0, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1,
    );
    let hundred = _mm256_set1_epi32(0x0001_0064);
    let mut fours = [_mm256_set1_epi32(0); 4];
    let mut too_long = false;
    for (&sep, fours) in seps.iter().zip(&mut fours) {
        let sep = sep as usize;
        // SAFETY: 32 <= first <= sep and sep + 32 <= last + 32 <= b.len().
        let before = unsafe { _mm256_loadu_si256(b.as_ptr().add(sep - 32).cast::<__m256i>()) };
        let fraction = (_mm256_movemask_epi8(_mm256_cmpeq_epi8(before, dot)) as u32).leading_zeros() as usize;
        // Checked once for the four: one branch instead of four.
        too_long |= fraction > 20;
        let fraction = fraction.min(20);
        let point = sep - fraction - 1;
        // SAFETY: point >= 32 - 21 >= 3, and point - 3 + 32 < sep + 32 <= b.len();
        // 20 - fraction + 32 <= 56.
        let (window, keep) = unsafe {
            (
                _mm256_loadu_si256(b.as_ptr().add(point - 3).cast::<__m256i>()),
                _mm256_loadu_si256(KEEP.as_ptr().add(20 - fraction).cast::<__m256i>()),
            )
        };
        let digits = _mm256_and_si256(_mm256_subs_epu8(window, less), keep);
        // Lanes 0-3: sign * 100 + integer digit; then the fraction's digits in fours.
        *fours = _mm256_madd_epi16(_mm256_maddubs_epi16(digits, weights), hundred);
    }
    // Eights of digits, numbers A and B in x, C and D in y:
    // x = [A0 A1 B0 B1 | A2 0 B2 0], A0 = sign * 10^6 + integer digit and fraction digits 1-4,
    // A1 = digits 5-12, A2 = digits 13-20.
    let ten_thousand = _mm256_set1_epi32(0x0001_2710);
    let x = _mm256_madd_epi16(_mm256_packus_epi32(fours[0], fours[1]), ten_thousand);
    let y = _mm256_madd_epi16(_mm256_packus_epi32(fours[2], fours[3]), ten_thousand);
    let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let (x, y) = (_mm256_permutevar8x32_epi32(x, order), _mm256_permutevar8x32_epi32(y, order));
    if too_long {
        return false;
    }
    // [A0 B0 C0 D0 | A1 B1 C1 D1] and [A2 B2 C2 D2 | ...]
    let (g01, g2) = (_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y));
    let g0 = _mm256_castsi256_si128(g01);
    if _mm_movemask_epi8(_mm_cmpgt_epi32(g0, _mm_set1_epi32(1_999_999))) != 0 {
        // A `[` before the integer digit.
        return false;
    }
    let negative = _mm_cmpgt_epi32(g0, _mm_set1_epi32(999_999));
    let g0 = _mm_sub_epi32(g0, _mm_and_si128(negative, _mm_set1_epi32(1_000_000)));
    // Each step rounds once: within a few units in the last place of the exact value.
    let approx = _mm256_fmadd_pd(
        _mm256_cvtepi32_pd(g0),
        _mm256_set1_pd(1e-4),
        _mm256_fmadd_pd(
            _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(g01)),
            _mm256_set1_pd(1e-12),
            _mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(g2)), _mm256_set1_pd(1e-20)),
        ),
    );
    // As `json_number::sure_f32`: the exact value rounds to the same f32 as `approx` unless
    // `approx` is this close to the midpoint between two f32s (its 29 bits past an f32's near
    // 2^28). Every value here is 0 or between 10^-20 and 10, inside f32's normal range.
    const GUARD: i64 = 1 << 9;
    let past_f32 = _mm256_and_si256(_mm256_castpd_si256(approx), _mm256_set1_epi64x((1 << 29) - 1));
    let from_below = _mm256_sub_epi64(past_f32, _mm256_set1_epi64x((1 << 28) - GUARD));
    let near = _mm256_and_si256(
        _mm256_cmpgt_epi64(_mm256_set1_epi64x(2 * GUARD + 1), from_below),
        _mm256_cmpgt_epi64(from_below, _mm256_set1_epi64x(-1)),
    );
    if _mm256_movemask_pd(_mm256_castsi256_pd(near)) != 0 {
        return false;
    }
    let values = _mm_or_si128(_mm_castps_si128(_mm256_cvtpd_ps(approx)), _mm_slli_epi32::<31>(negative));
    // SAFETY: `slot` is 16 writable bytes and the store needs no alignment.
    unsafe { _mm_storeu_si128(slot.as_mut_ptr().cast(), values) };
    true
}

#[cfg(test)]
mod tests {
    use super::super::json_number::tests::next;
    use super::*;

    /// Reads the array in `text` by blocks with both first passes (AVX-512 where the CPU has it)
    /// and one by one, and checks the results are the same.
    fn assert_read_alike(text: &[u8]) -> Option<usize> {
        assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"), "run on a CPU with AVX2 and FMA");
        let at = text.iter().position(|&c| c == b'[')?;
        let mut one = Vec::new();
        let want = one_by_one(text, at + 1, &mut one).map(|end| (end, one));
        let mut by_avx2 = Vec::new();
        // SAFETY: the CPU has AVX2 and FMA (asserted).
        let got = unsafe { by_blocks_avx2(text, at + 1, &mut by_avx2) };
        // What is written before a refusal is thrown away by the caller.
        assert_eq!(got.map(|end| (end, by_avx2)), want, "AVX2: {}", String::from_utf8_lossy(text));
        if is_x86_feature_detected!("avx512bw") {
            let mut by_avx512 = Vec::new();
            // SAFETY: the CPU has AVX-512BW, AVX2 and FMA.
            let got = unsafe { by_blocks_avx512(text, at + 1, &mut by_avx512) };
            assert_eq!(got.map(|end| (end, by_avx512)), want, "AVX-512: {}", String::from_utf8_lossy(text));
        }
        want.map(|(end, _)| end)
    }

    /// Random arrays of numbers in every form, with every separator spacing, some with bytes
    /// changed: read the same by blocks as one by one.
    #[test]
    fn arrays_read_by_blocks_read_as_one_number_at_a_time() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut read = 0;
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
            let separator = [",", ", ", " , ", ",\n", ", -", ",  "][(next(&mut x) % 6) as usize];
            let mut text =
                format!("{}[{}]", " ".repeat((next(&mut x) % 40) as usize), items.join(separator)).into_bytes();
            if round % 3 == 0 {
                for _ in 0..1 + next(&mut x) % 3 {
                    let at = next(&mut x) as usize % text.len();
                    text[at] = b"[],-.e 0x\"1"[(next(&mut x) % 11) as usize];
                }
            }
            text.extend(std::iter::repeat_n(b'}', (next(&mut x) % 40) as usize));
            read += usize::from(assert_read_alike(&text).is_some());
        }
        // Both outcomes were seen.
        assert!(read > 20_000 && read < 35_000, "{read}");
    }

    /// Arrays in the form the second pass converts four at a time, of every magnitude down to
    /// 10^-8, in 0 to 25 fraction digits, many on or a few units of f64 off the midpoint between
    /// two f32s: read
    /// the same as one by one, and most numbers are converted in groups of four.
    #[test]
    fn plain_arrays_converted_four_at_a_time_read_as_one_number_at_a_time() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let (mut numbers_seen, mut grouped) = (0, 0);
        for round in 0..20_000 {
            let items: Vec<String> = (0..next(&mut x) % 80)
                .map(|_| {
                    let r = next(&mut x);
                    let scale = [1.0f32, 0.1, 0.01, 1e-3, 1e-4, 1e-6, 1e-8, 9.99][(r >> 61) as usize];
                    let f = ((r >> 8) as u32 as f32 / u32::MAX as f32) * scale * if r & 1 == 0 { 1.0 } else { -1.0 };
                    let midpoint = (f64::from(f) + f64::from(f32::from_bits(f.to_bits() + 1))) / 2.0;
                    match (r >> 56) % 7 {
                        0 => format!("{}", f64::from(f)),
                        // A few units in f64's last place off a midpoint, in 20 digits: where
                        // converting through f64 could round to the wrong f32.
                        1 => {
                            let off = f64::from_bits(midpoint.to_bits().wrapping_add((r >> 40) % 9).wrapping_sub(4));
                            format!("{off:.20}")
                        }
                        2 => format!("{f}"),
                        3 => format!("{:.*}", ((r >> 30) % 26) as usize, f),
                        4 => format!("{:.*}", 17 + ((r >> 30) % 10) as usize, midpoint),
                        _ => format!("{:.*}", ((r >> 30) % 26) as usize, midpoint),
                    }
                })
                .collect();
            let separator = [",", ", "][(next(&mut x) % 2) as usize];
            let mut text =
                format!("{}[{}]", " ".repeat((next(&mut x) % 40) as usize), items.join(separator)).into_bytes();
            if round % 11 == 0 {
                let at = next(&mut x) as usize % text.len();
                text[at] = b"[],-.e 0x\"1"[(next(&mut x) % 11) as usize];
            }
            text.extend(std::iter::repeat_n(b'}', (next(&mut x) % 40) as usize));
            assert_read_alike(&text);
            numbers_seen += items.len();
        }
        // Groups of four taken by `four`, on a Python-like body of 17-digit values in (-1, 1).
        let body = format!(
            "[{}]",
            (0..4096u32)
                .map(|i| format!("{}", f64::from((i.wrapping_mul(2_654_435_761) % 2000) as f32 / 1000.0 - 1.0)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let seps: Vec<u32> =
            body.bytes().enumerate().filter(|(_, c)| *c == b',' || *c == b']').map(|(i, _)| i as u32).collect();
        for group in seps.as_chunks::<4>().0 {
            let mut slot = [0u8; 16];
            // SAFETY: the CPU has AVX2 and FMA (asserted by `assert_read_alike`).
            grouped += 4 * usize::from(unsafe { four(body.as_bytes(), group, &mut slot) });
        }
        assert!(numbers_seen > 700_000, "{numbers_seen}");
        assert!(grouped > 4000, "{grouped} of 4096 converted four at a time");
    }
}
