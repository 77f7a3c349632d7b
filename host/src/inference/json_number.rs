//! JSON numbers read straight into f32, correctly rounded: a short exact path for the numbers
//! clients write (float32 values printed through f64, 17 significant digits), fast_float for
//! the rest. Used by both readers of JSON inference bodies (the one-pass one and serde's).

/// Exact powers of ten as f64 (10^22 is the last one f64 holds exactly).
pub(super) const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// Eight ASCII digits at `b[i..]` as their value, if all eight are digits.
#[inline(always)]
fn eight_digits(b: &[u8], i: usize) -> Option<u64> {
    let chunk: [u8; 8] = b.get(i..i + 8)?.try_into().ok()?;
    let v = u64::from_le_bytes(chunk);
    let all_digits = (v & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030
        && (v.wrapping_add(0x0606_0606_0606_0606) & 0xF0F0_F0F0_F0F0_F0F0) == 0x3030_3030_3030_3030;
    if !all_digits {
        return None;
    }
    let mut v = v - 0x3030_3030_3030_3030;
    v = (v * 10) + (v >> 8);
    v = ((v & 0x0000_00FF_0000_00FF).wrapping_mul(0x000F_4240_0000_0064)
        + ((v >> 16) & 0x0000_00FF_0000_00FF).wrapping_mul(0x0000_2710_0000_0001))
        >> 32;
    Some(v)
}

/// The JSON number at `b[i..]` as f32 and where it ends, when its value is sure to be the
/// correctly rounded one: at most 19 significant digits, a power of ten f64 holds exactly, and an
/// f64 approximation (within two units in its last place) that is not next to a point halfway
/// between two f32s. None otherwise, or when `b[i..]` does not start with a JSON number.
#[inline]
fn short_f32(b: &[u8], mut i: usize) -> Option<(f32, usize)> {
    let negative = b.get(i) == Some(&b'-');
    i += usize::from(negative);
    let (mut mantissa, mut digits, mut exponent) = (0u64, 0u32, 0i32);
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while let Some(c @ b'0'..=b'9') = b.get(i) {
                if digits >= 19 {
                    return None;
                }
                mantissa = mantissa * 10 + u64::from(c - b'0');
                digits += 1;
                i += 1;
            }
        }
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        if mantissa == 0 {
            // Zeros before a fraction's first digit are not significant.
            while b.get(i) == Some(&b'0') {
                i += 1;
            }
        }
        while digits + 8 <= 19 {
            let Some(v) = eight_digits(b, i) else { break };
            mantissa = mantissa * 100_000_000 + v;
            digits += 8;
            i += 8;
        }
        while let Some(c @ b'0'..=b'9') = b.get(i) {
            if digits >= 19 {
                return None;
            }
            mantissa = mantissa * 10 + u64::from(c - b'0');
            digits += u32::from(mantissa != 0);
            i += 1;
        }
        if i == start {
            return None;
        }
        exponent -= i32::try_from(i - start).ok()?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        let minus = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        let mut e = 0i32;
        while let Some(c @ b'0'..=b'9') = b.get(i) {
            if e > 10_000 {
                return None;
            }
            e = e * 10 + i32::from(c - b'0');
            i += 1;
        }
        if i == start {
            return None;
        }
        exponent += if minus { -e } else { e };
    }
    if mantissa == 0 {
        return Some((if negative { -0.0 } else { 0.0 }, i));
    }
    let power = POW10.get(exponent.unsigned_abs() as usize)?;
    // One rounding turning the mantissa into f64 and one in the division or product: within two
    // units in the last place of the exact value.
    let approx = if exponent < 0 { mantissa as f64 / power } else { mantissa as f64 * power };
    let v = sure_f32(approx)?;
    Some((if negative { -v } else { v }, i))
}

/// The f32 an exact value rounds to, from `approx`, its f64 approximation within two units in the
/// last place; None when that is not sure: `approx` next to the midpoint between two f32s, or
/// outside f32's normal range.
#[inline(always)]
pub(super) fn sure_f32(approx: f64) -> Option<f32> {
    // The 29 bits an f64's mantissa has past an f32's: the exact value rounds to the same f32 as
    // `approx` unless `approx` is this close to the midpoint between two f32s.
    let past_f32 = approx.to_bits() & ((1 << 29) - 1);
    if past_f32.abs_diff(1 << 28) <= 8 || !(f64::from(f32::MIN_POSITIVE)..=f64::from(f32::MAX)).contains(&approx) {
        return None;
    }
    Some(approx as f32)
}

/// Where the JSON number at `b[i..]` ends (`-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`).
pub(super) fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > start).then_some(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match b.get(i) {
        Some(b'0') => i + 1,
        Some(b'1'..=b'9') => digits(i)?,
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        i = digits(i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(i)?;
    }
    Some(i)
}

/// The JSON number at `b[i..]` correctly rounded to f32, and where it ends; None if there is no
/// JSON number there. Values past f32's range are infinite, as fast_float and Rust read them.
#[inline]
pub fn f32_number(b: &[u8], i: usize) -> Option<(f32, usize)> {
    if let Some(found) = short_f32(b, i) {
        return Some(found);
    }
    let end = number_end(b, i)?;
    let v: f32 = fast_float2::parse(&b[i..end]).ok()?;
    Some((v, end))
}

/// Where JSON white space from `b[i..]` ends.
pub(super) fn skip_space(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Reads `number (, number)* ]` from `b[i..]` (white space allowed around each number) into
/// `out`, number by number, and returns where the `]` ends.
pub(super) fn numbers(b: &[u8], i: usize, out: &mut Vec<u8>) -> Option<usize> {
    match numbers_to(b, i, out, usize::MAX)? {
        Reached::End(end) => Some(end),
        Reached::Stop(_) => None,
    }
}

/// Where reading numbers one by one stopped.
#[derive(Debug, PartialEq)]
pub(super) enum Reached {
    /// The array's end: just past its `]`.
    End(usize),
    /// Just past a `,`, at or past the position asked for.
    Stop(usize),
}

/// Reads `number (, number)* ]` from `b[i..]` as `numbers` does, stopping early after the first
/// `,` that ends at or past `stop`.
pub(super) fn numbers_to(b: &[u8], mut i: usize, out: &mut Vec<u8>, stop: usize) -> Option<Reached> {
    loop {
        let (v, end) = f32_number(b, skip_space(b, i))?;
        out.extend_from_slice(&v.to_le_bytes());
        i = skip_space(b, end);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => return Some(Reached::End(i + 1)),
            _ => return None,
        }
        if i >= stop {
            return Some(Reached::Stop(i));
        }
    }
}

/// The one JSON number filling `b[start..sep]`, white space allowed around it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn number_between(b: &[u8], start: usize, sep: usize) -> Option<f32> {
    let (v, end) = f32_number(b, skip_space(b, start))?;
    (skip_space(b, end) == sep).then_some(v)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// xorshift64: the same numbers on every run.
    pub(in crate::inference) fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn numbers_read_to_the_same_f32_as_fast_float_in_every_form() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let (mut short, mut plain, mut midpoints) = (0, 0, 0);
        for k in 0..400_000 {
            let r = next(&mut x);
            let text = match k % 7 {
                // float32 values as Python and serde_json write them (through f64), and as f32
                0 => format!("{}", f64::from(f32::from_bits((r >> 32) as u32 & 0xFF7F_FFFF))),
                1 => format!("{}", f32::from_bits((r >> 32) as u32 & 0xFF7F_FFFF)),
                2 => format!("{:e}", f64::from_bits(r & 0xFFEF_FFFF_FFFF_FFFF)),
                3 => format!("{}", (r % 2_000_000) as f64 / 1e6 - 1.0),
                4 => format!("{:.*}", (r % 25) as usize, ((r >> 20) % 100_000) as f64 / 997.0),
                // near the midpoints between f32s, where the short path must step aside
                5 => {
                    let f = f32::from_bits((r >> 33) as u32 & 0x7F7F_FFFF);
                    let mid = (f64::from(f) + f64::from(f32::from_bits(f.to_bits() + 1))) / 2.0;
                    format!("{mid:e}")
                }
                _ => format!("{}e{}", r % 100_000_000_000_000_000, (r >> 40) % 60) + if r & 1 == 0 { "" } else { "1" },
            };
            let want: (f32, usize) = fast_float2::parse_partial(text.as_bytes()).expect("fast_float reads it");
            let (got, end) = f32_number(text.as_bytes(), 0).expect(&text);
            assert_eq!((got.to_bits(), end), (want.0.to_bits(), want.1), "{text}");
            let took = short_f32(text.as_bytes(), 0).is_some();
            short += usize::from(took);
            match k % 7 {
                3 => plain += usize::from(took),
                5 => midpoints += usize::from(took),
                _ => {}
            }
        }
        // The short path takes the plain numbers clients send and steps aside at midpoints.
        assert!(plain > 400_000 / 7 * 99 / 100, "{plain}");
        assert_eq!(midpoints, 0);
        assert!(short > 100_000, "{short}");
    }

    #[test]
    fn what_is_not_a_json_number_is_not_read_as_one() {
        for text in ["", "-", "+1", ".5", "1.", "1e", "1e+", "nan", "inf", "-x", "\"1\""] {
            assert_eq!(f32_number(text.as_bytes(), 0), None, "{text}");
        }
        // A number ends where JSON's grammar ends it; what follows is the caller's to judge.
        assert_eq!(f32_number(b"01", 0), Some((0.0, 1)));
        assert_eq!(f32_number(b"-0.0,", 0).map(|(v, e)| (v.to_bits(), e)), Some(((-0.0f32).to_bits(), 4)));
        assert_eq!(f32_number(b"1e39]", 0), Some((f32::INFINITY, 4)));
        assert_eq!(f32_number(b"1e-50", 0), Some((0.0, 5)));
    }
}
