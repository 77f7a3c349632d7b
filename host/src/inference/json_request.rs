//! JSON inference requests read in one pass: a 64x64 RGB image is 12,288 numbers (about 240 KB
//! as Python and serde_json write float32 values), and reading them was most of what a JSON
//! request cost over a safetensors one (serde_json checking the array's syntax, then each number
//! parsed into f32). Here the request's few keys and its number arrays are read together, each
//! number into f32 by a short path that is exact or steps aside. Any body this reader does not
//! take as it is (escapes in a name, a key twice, an unknown key, a syntax error, ...) goes to the
//! serde reader, which accepts the same language and words the errors; both give the same result
//! for every body this one takes (tested, and checked by the `infer_request` fuzz target).
use std::collections::BTreeMap;

use super::json_array::f32_array;
use super::json_number::{number_end, skip_space};
use super::wire::{InferRequest, TensorValue};

/// A cursor over a request body; every method returns None where the body leaves the form this
/// reader takes.
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn skip_space(&mut self) {
        self.i = skip_space(self.b, self.i);
    }

    /// Skips white space and takes `c`.
    fn eat(&mut self, c: u8) -> Option<()> {
        self.skip_space();
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    /// Skips white space and tells whether `c` is next (taking it if so).
    fn next_is(&mut self, c: u8) -> bool {
        self.eat(c).is_some()
    }

    /// A string without escapes or control characters.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.b.get(self.i)? {
                b'"' => break,
                b'\\' | 0..=0x1F => return None,
                _ => self.i += 1,
            }
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        self.i += 1;
        Some(text)
    }

    /// `{ key: value, ... }`, calling `member` with each key; `member` reads the value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.next_is(b'}') {
            return Some(());
        }
        loop {
            let key = self.plain_string()?;
            self.eat(b':')?;
            member(self, key)?;
            if !self.next_is(b',') {
                return self.eat(b'}');
            }
        }
    }

    /// `[ item, ... ]`, calling `item` at the start of each (white space skipped).
    fn array(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.next_is(b']') {
            return Some(());
        }
        loop {
            self.skip_space();
            item(self)?;
            if !self.next_is(b',') {
                return self.eat(b']');
            }
        }
    }

    /// An array of non-negative integers that fit u64.
    fn shape(&mut self) -> Option<Vec<u64>> {
        let mut shape = Vec::new();
        self.array(|r| {
            let start = r.i;
            let end = number_end(r.b, start)?;
            let text = std::str::from_utf8(&r.b[start..end]).ok()?;
            // Only plain digits: serde reads `1.0`, `1e2` or `-0` as no u64 at all.
            if !text.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            shape.push(text.parse().ok()?);
            r.i = end;
            Some(())
        })?;
        Some(shape)
    }

    /// An array of numbers as little-endian f32 bytes.
    fn data(&mut self) -> Option<Vec<u8>> {
        self.skip_space();
        let (bytes, end) = f32_array(self.b, self.i)?;
        self.i = end;
        Some(bytes)
    }

    /// `{"shape": [..], "data": [..]}`, in either order, each once.
    fn tensor(&mut self) -> Option<TensorValue> {
        let (mut shape, mut data) = (None, None);
        self.object(|r, key| match key {
            "shape" if shape.is_none() => r.shape().map(|s| shape = Some(s)),
            "data" if data.is_none() => r.data().map(|d| data = Some(d)),
            _ => None,
        })?;
        Some(TensorValue { shape: shape?, data: data? })
    }
}

/// A JSON request body: read in one pass when it is in the plain form clients send, else by
/// serde (which words the errors).
pub fn from_json(body: &[u8]) -> Result<InferRequest, serde_json::Error> {
    match read(body) {
        Some(request) => Ok(request),
        None => serde_json::from_slice(body),
    }
}

/// The request in `body` if it is in the plain form this reader takes; None sends the body to
/// the serde reader.
pub fn read(body: &[u8]) -> Option<InferRequest> {
    let mut r = Reader { b: body, i: 0 };
    let (mut inputs, mut shape, mut data) = (None::<BTreeMap<String, TensorValue>>, None, None);
    r.object(|r, key| match key {
        "inputs" if inputs.is_none() => {
            let mut named = BTreeMap::new();
            r.object(|r, name| {
                let t = r.tensor()?;
                named.insert(name.to_string(), t).is_none().then_some(())
            })?;
            inputs = Some(named);
            Some(())
        }
        "shape" if shape.is_none() => r.shape().map(|s| shape = Some(s)),
        "data" if data.is_none() => r.data().map(|d| data = Some(d)),
        _ => None,
    })?;
    r.skip_space();
    if r.i != body.len() {
        return None;
    }
    match (inputs, shape, data) {
        (Some(inputs), None, None) => Some(InferRequest::Named { inputs }),
        (None, Some(shape), Some(data)) => Some(InferRequest::Single(TensorValue { shape, data })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::json_number::tests::next;
    use super::*;

    #[test]
    fn bodies_read_here_read_the_same_through_serde_and_the_rest_go_there() {
        let mut x = 7u64;
        let mut bodies: Vec<String> = vec![
            r#"{"shape": [2, 2], "data": [1, 2, 3, 4.5]}"#.into(),
            r#" { "inputs" : { "b" : {"shape":[1],"data":[-0.5]} , "a": {"data": [1e3, 2], "shape": [2]}} } "#.into(),
            "{\"data\":[\t0.1 ,3,-2.5e-3,\r\n1E2 ],\"shape\":[4]}".into(),
            r#"{"data": [ ], "shape": [0]}"#.into(),
            r#"{"inputs": {}}"#.into(),
            r#"{"inputs": {"é": {"shape": [18446744073709551615], "data": [0]}}}"#.into(),
        ];
        // Random well-formed bodies, then each cut short and with one byte changed.
        for _ in 0..300 {
            let n = next(&mut x) % 40;
            let data: Vec<String> = (0..n)
                .map(|_| {
                    let r = next(&mut x);
                    match r % 3 {
                        0 => format!("{}", f64::from(f32::from_bits((r >> 32) as u32 & 0xBF7F_FFFF))),
                        1 => format!("{}", (r % 2000) as f32 / 500.0 - 1.0),
                        _ => format!("{:e}", (r >> 11) as f64 / (1u64 << 40) as f64),
                    }
                })
                .collect();
            bodies.push(format!(r#"{{"inputs": {{"x": {{"shape": [{n}], "data": [{}]}}}}}}"#, data.join(", ")));
        }
        let mut mutated = Vec::new();
        for body in &bodies {
            let b = body.as_bytes();
            for _ in 0..20 {
                let at = next(&mut x) as usize % b.len();
                let mut changed = b.to_vec();
                changed[at] = b"{}[]\",:0-.e \\x1"[next(&mut x) as usize % 15];
                mutated.push(changed);
                mutated.push(b[..at].to_vec());
            }
        }
        let (mut here, mut there) = (0, 0);
        for body in bodies.iter().map(|b| b.as_bytes().to_vec()).chain(mutated) {
            let serde = serde_json::from_slice::<InferRequest>(&body);
            match read(&body) {
                Some(fast) => {
                    here += 1;
                    let serde =
                        serde.unwrap_or_else(|e| panic!("{}: serde refuses ({e})", String::from_utf8_lossy(&body)));
                    assert_eq!(fast, serde, "{}", String::from_utf8_lossy(&body));
                }
                None => there += 1,
            }
        }
        assert!(here > 300 && there > 3000, "{here} read here, {there} sent to serde");
    }

    #[test]
    fn what_this_reader_does_not_take_is_left_to_serde() {
        for body in [
            r#"{"shape": [1], "data": [1], "extra": 1}"#,
            r#"{"shape": [1], "data": [1], "data": [2]}"#,
            r#"{"shape": [1]}"#,
            r#"{"shape": [1.0], "data": [1]}"#,
            r#"{"shape": [-0], "data": [1]}"#,
            r#"{"shape": [18446744073709551616], "data": [1]}"#,
            r#"{"inputs": {"x": {"shape": [1], "data": [1]}, "x": {"shape": [1], "data": [2]}}}"#,
            r#"{"inputs": {"a\u0062": {"shape": [1], "data": [1]}}}"#,
            r#"{"inputs": {}, "shape": [1]}"#,
            "{\"shape\": [1], \"data\": [1]}\x0c",
            r#"{"shape": [1], "data": [1]} {}"#,
            r#"[1, 2]"#,
        ] {
            assert!(read(body.as_bytes()).is_none(), "{body}");
        }
    }
}
