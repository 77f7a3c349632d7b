//! Update encodings: INT8 with a per-tensor scale, and top-k sparsification with error feedback.
//!
//! A payload is a list of named tensors; tensor `w` of the update travels as
//! - INT8: `w#int8` (i8, w's shape) and `w#scale` (f32 scalar): w ~ scale * q, q in [-127, 127];
//! - top-k: `w#indices` (i32 [k], flat positions), `w#values` (f32 [k]) and `w#shape` (i64);
//! - a tensor that is not floating point travels as it is, under its own name.
use std::collections::HashMap;

use nereid_sdk::random::{mix, uniform};
use nereid_sdk::{max_chunk, DType, NamedTensor, PluginError, RoundContext, Tensor};

/// How a value between two INT8 steps is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Up with probability equal to the distance from the lower step: unbiased, so the errors
    /// of many clients average out instead of adding up.
    Stochastic,
    Nearest,
}

fn name_key(name: &str) -> u64 {
    // FNV-1a: a stable key per tensor name, so each tensor has its own random stream.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Every element, read in chunks of at most `max-chunk`.
fn read_chunks<T>(
    t: &Tensor,
    mut read: impl FnMut(u64, u32) -> Result<Vec<T>, nereid_sdk::TensorError>,
) -> Result<Vec<T>, PluginError> {
    let n = t.numel();
    let chunk = max_chunk() as u64;
    let mut out = Vec::with_capacity(n as usize);
    let mut offset = 0;
    while offset < n {
        let count = chunk.min(n - offset) as u32;
        out.extend(read(offset, count)?);
        offset += count as u64;
    }
    Ok(out)
}

pub fn read_all(t: &Tensor) -> Result<Vec<f32>, PluginError> {
    if t.dtype() == DType::F32 {
        read_chunks(t, |offset, count| t.read_f32(offset, count))
    } else {
        Ok(read_f64(t)?.into_iter().map(|v| v as f32).collect())
    }
}

/// Every element as f64 (exact for the integer tensors of a payload, unlike f32).
fn read_f64(t: &Tensor) -> Result<Vec<f64>, PluginError> {
    read_chunks(t, |offset, count| t.read(offset, count))
}

fn write_all(t: &Tensor, values: &[f64]) -> Result<(), PluginError> {
    for (i, chunk) in values.chunks(max_chunk() as usize).enumerate() {
        t.write((i * max_chunk() as usize) as u64, chunk)?;
    }
    Ok(())
}

fn tensor(dtype: DType, shape: &[u64], values: &[f64]) -> Result<Tensor, PluginError> {
    let t = Tensor::zeros(dtype, shape)?;
    write_all(&t, values)?;
    Ok(t)
}

/// INT8 and top-k would hide a NaN or an infinity (as 0, or as a huge value): refused instead.
fn finite(name: &str, values: &[f32]) -> Result<(), PluginError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(PluginError::rejected(format!("tensor `{name}`: element {i} is {}", values[i]))),
        None => Ok(()),
    }
}

fn is_float(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The symmetric INT8 code of `values`: scale = max|x| / 127, q = x / scale rounded.
pub fn int8_quantize(values: &[f32], rounding: Rounding, key: u64) -> (Vec<i8>, f32) {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 && max.is_finite() { max / 127.0 } else { 1.0 };
    let q = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let x = (v / scale) as f64;
            let r = match rounding {
                Rounding::Nearest => x.round(),
                Rounding::Stochastic => (x + uniform(key, i as u64)).floor(),
            };
            r.clamp(-127.0, 127.0) as i8
        })
        .collect();
    (q, scale)
}

pub fn encode_int8(
    ctx: &RoundContext,
    update: Vec<NamedTensor>,
    rounding: Rounding,
) -> Result<Vec<NamedTensor>, PluginError> {
    let mut out = Vec::with_capacity(update.len() * 2);
    for t in update {
        if !is_float(&t.value) {
            out.push(t);
            continue;
        }
        let values = read_all(&t.value)?;
        finite(&t.name, &values)?;
        let key = mix(ctx.seed ^ name_key(&t.name) ^ (ctx.round as u64) << 32);
        let (q, scale) = int8_quantize(&values, rounding, key);
        let q: Vec<f64> = q.into_iter().map(f64::from).collect();
        let shape = t.value.shape();
        out.push(NamedTensor { name: format!("{}#int8", t.name), value: tensor(DType::I8, &shape, &q)? });
        out.push(NamedTensor { name: format!("{}#scale", t.name), value: tensor(DType::F32, &[], &[scale as f64])? });
    }
    Ok(out)
}

/// Top-k with error feedback: what was not sent is added to the next update of the same tensor.
#[derive(Default)]
pub struct TopK {
    pub fraction: f64,
    pub error_feedback: bool,
    residual: HashMap<String, Vec<f32>>,
}

impl TopK {
    pub fn new(fraction: f64, error_feedback: bool) -> TopK {
        TopK { fraction, error_feedback, residual: HashMap::new() }
    }

    pub fn encode(&mut self, update: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
        let mut out = Vec::with_capacity(update.len() * 3);
        for t in update {
            if !is_float(&t.value) {
                out.push(t);
                continue;
            }
            let mut acc = read_all(&t.value)?;
            finite(&t.name, &acc)?;
            if self.error_feedback {
                if let Some(r) = self.residual.get(&t.name).filter(|r| r.len() == acc.len()) {
                    acc.iter_mut().zip(r).for_each(|(a, r)| *a += r);
                }
            }
            let n = acc.len();
            let k = ((self.fraction * n as f64).ceil() as usize).clamp(1.min(n), n);
            let mut order: Vec<usize> = (0..n).collect();
            if k < n {
                // Largest magnitudes first; ties broken by position so the choice is deterministic.
                order.select_nth_unstable_by(k, |&a, &b| acc[b].abs().total_cmp(&acc[a].abs()).then(a.cmp(&b)));
                order.truncate(k);
            }
            order.sort_unstable();
            let values: Vec<f64> = order.iter().map(|&i| acc[i] as f64).collect();
            let indices: Vec<f64> = order.iter().map(|&i| i as f64).collect();
            if self.error_feedback {
                for &i in &order {
                    acc[i] = 0.0;
                }
                self.residual.insert(t.name.clone(), acc);
            }
            let shape: Vec<f64> = t.value.shape().iter().map(|&d| d as f64).collect();
            let k = order.len() as u64;
            out.push(NamedTensor { name: format!("{}#indices", t.name), value: tensor(DType::I32, &[k], &indices)? });
            out.push(NamedTensor { name: format!("{}#values", t.name), value: tensor(DType::F32, &[k], &values)? });
            out.push(NamedTensor {
                name: format!("{}#shape", t.name),
                value: tensor(DType::I64, &[shape.len() as u64], &shape)?,
            });
        }
        Ok(out)
    }
}

fn part<'a>(parts: &'a HashMap<&str, &Tensor>, base: &str, suffix: &str) -> Result<&'a Tensor, PluginError> {
    parts
        .get(suffix)
        .copied()
        .ok_or_else(|| PluginError::rejected(format!("tensor `{base}`: `{base}#{suffix}` is missing from the payload")))
}

/// Inverts either encoding (a payload says which by its tensor names).
pub fn decode(payload: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, PluginError> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<(String, &Tensor)>> = HashMap::new();
    let mut plain = Vec::new();
    for t in &payload {
        match t.name.rsplit_once('#') {
            Some((base, suffix)) => {
                if !groups.contains_key(base) {
                    order.push(base.to_string());
                }
                groups.entry(base.to_string()).or_default().push((suffix.to_string(), &t.value));
            }
            None => plain.push(t.name.clone()),
        }
    }
    let mut out = Vec::new();
    for base in order {
        let parts: HashMap<&str, &Tensor> = groups[&base].iter().map(|(s, t)| (s.as_str(), *t)).collect();
        let value =
            if parts.contains_key("int8") {
                let q = part(&parts, &base, "int8")?;
                let scale = read_all(part(&parts, &base, "scale")?)?;
                let [scale] = scale[..] else {
                    return Err(PluginError::rejected(format!("tensor `{base}`: the scale must be one number")));
                };
                if !scale.is_finite() {
                    return Err(PluginError::rejected(format!("tensor `{base}`: the scale is not finite")));
                }
                let values: Vec<f64> = read_f64(q)?.into_iter().map(|v| v * scale as f64).collect();
                tensor(DType::F32, &q.shape(), &values)?
            } else {
                let shape: Vec<u64> = read_f64(part(&parts, &base, "shape")?)?
                    .into_iter()
                    .map(|d| {
                        if d >= 0.0 {
                            Ok(d as u64)
                        } else {
                            Err(PluginError::rejected(format!("tensor `{base}`: negative dimension")))
                        }
                    })
                    .collect::<Result<_, _>>()?;
                let indices = read_f64(part(&parts, &base, "indices")?)?;
                let values = read_all(part(&parts, &base, "values")?)?;
                if indices.len() != values.len() {
                    return Err(PluginError::rejected(format!(
                        "tensor `{base}`: {} indices for {} values",
                        indices.len(),
                        values.len()
                    )));
                }
                let n =
                    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).filter(|&n| n <= 1 << 31).ok_or_else(
                        || PluginError::rejected(format!("tensor `{base}`: shape {shape:?} is too large")),
                    )? as usize;
                let mut dense = vec![0f64; n];
                for (&i, &v) in indices.iter().zip(&values) {
                    let slot = dense.get_mut(i as usize).filter(|_| i >= 0.0).ok_or_else(|| {
                        PluginError::rejected(format!("tensor `{base}`: index {i} is outside its {n} elements"))
                    })?;
                    *slot = v as f64;
                }
                tensor(DType::F32, &shape, &dense)?
            };
        out.push(NamedTensor { name: base, value });
    }
    let mut payload = payload;
    for name in plain {
        if let Some(pos) = payload.iter().position(|t| t.name == name) {
            out.push(payload.swap_remove(pos));
        }
    }
    Ok(out)
}
