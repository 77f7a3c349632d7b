//! The round's accepted updates, for aggregators that need all of them at once (medians, Krum,
//! Bulyan). The host keeps where each update is (its file on disk, or its tensors for in-memory
//! runs) and computes over them element range by element range: a call holds at most
//! `CHUNK_BUDGET` values of the inputs plus its result, whatever the number of updates.
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::model_io::{self, NamedTensors};
use crate::tensor::{DType, Tensor};

/// Values of all the updates one step of a call holds at once (64 MiB of f64).
pub const CHUNK_BUDGET: usize = 1 << 23;

/// Where an accepted update's tensors are.
#[derive(Debug, Clone)]
pub enum UpdateSource {
    /// A safetensors file (the cloud's stored uploads, `plugin aggregate`'s inputs).
    File(PathBuf),
    /// Tensors in memory (tests, benchmarks).
    Memory(NamedTensors),
}

/// The updates an aggregator accepted this round, in the order it accepted them.
#[derive(Debug, Default)]
pub struct RoundUpdates {
    accepted: Vec<(String, UpdateSource)>,
}

/// One tensor of an opened update: where its elements are.
struct Slice {
    dtype: DType,
    /// Byte offset in the file (File) or index into the tensors (Memory).
    at: usize,
}

enum Opened<'a> {
    File { file: std::fs::File, path: &'a Path, tensors: Vec<Slice> },
    Memory(Vec<&'a Tensor>),
}

impl Opened<'_> {
    /// Appends elements `range` of tensor `t` to `out` as f64.
    fn read(&self, t: usize, range: Range<usize>, out: &mut Vec<f64>) -> Result<(), String> {
        match self {
            Opened::Memory(tensors) => {
                let tensor = tensors[t];
                let r = u32::try_from(range.len()).map_err(|_| "a chunk is too large".to_string())?;
                out.extend(tensor.read(range.start as u64, r, u32::MAX).map_err(|e| e.to_string())?);
            }
            Opened::File { file, path, tensors } => {
                let s = &tensors[t];
                let size = s.dtype.size();
                let mut bytes = vec![0u8; range.len() * size];
                file.read_exact_at(&mut bytes, (s.at + range.start * size) as u64)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let buffer = crate::tensor::Buffer::from_le_bytes(s.dtype, &bytes)
                    .ok_or_else(|| format!("{}: elements cut short", path.display()))?;
                let tensor = Tensor::new(vec![range.len() as u64], buffer).ok_or("a chunk lost its length")?;
                out.extend(tensor.to_f64_vec());
            }
        }
        Ok(())
    }
}

/// The layout every update of a call shares: each tensor's name, dtype and shape.
type Layout = Vec<(String, DType, Vec<u64>)>;

impl RoundUpdates {
    /// Forgets the round's updates (a new round, or a replay).
    pub fn clear(&mut self) {
        self.accepted.clear();
    }

    /// Records an update the aggregator accepted.
    pub fn push(&mut self, client: String, source: UpdateSource) {
        self.accepted.push((client, source));
    }

    pub fn count(&self) -> usize {
        self.accepted.len()
    }

    /// Opens the updates `indices` and checks they share one layout (the first's).
    fn open(&self, indices: &[u32]) -> Result<(Layout, Vec<Opened<'_>>), String> {
        if indices.is_empty() {
            return Err("no update was given".into());
        }
        // Distinct indices bound a call by the round's own updates, whatever a plugin asks.
        let mut seen = std::collections::HashSet::with_capacity(indices.len());
        if let Some(twice) = indices.iter().find(|i| !seen.insert(**i)) {
            return Err(format!("update {twice} is given twice"));
        }
        let mut layout: Option<Layout> = None;
        let mut opened = Vec::with_capacity(indices.len());
        for &i in indices {
            let (client, source) = self.accepted.get(i as usize).ok_or_else(|| {
                format!("update {i} does not exist: the round accepted {} so far", self.accepted.len())
            })?;
            let (names, open): (Layout, Opened) = match source {
                UpdateSource::Memory(tensors) => (
                    tensors.iter().map(|(n, t)| (n.clone(), t.dtype(), t.shape().to_vec())).collect(),
                    Opened::Memory(tensors.iter().map(|(_, t)| t).collect()),
                ),
                UpdateSource::File(path) => {
                    let io = |e: std::io::Error| format!("update `{client}` ({}): {e}", path.display());
                    let mut file = std::fs::File::open(path).map_err(io)?;
                    let len = file.metadata().map_err(io)?.len();
                    let header = model_io::read_header(&mut file, len, path).map_err(|e| e.to_string())?;
                    let names = header.tensors.iter().map(|(n, d, s, _)| (n.clone(), *d, s.clone())).collect();
                    let tensors = header
                        .tensors
                        .iter()
                        .map(|(_, dtype, _, range)| Slice { dtype: *dtype, at: header.data_start + range.start })
                        .collect();
                    (names, Opened::File { file, path, tensors })
                }
            };
            let opened_one = match &layout {
                None => {
                    layout = Some(names);
                    open
                }
                Some(first) => reorder(first, &names, open).map_err(|m| format!("update `{client}`: {m}"))?,
            };
            opened.push(opened_one);
        }
        let layout = layout.ok_or("no update was given")?;
        if let Some((name, dtype, _)) = layout.iter().find(|(_, d, _)| !d.is_float()) {
            return Err(format!("tensor `{name}` is {dtype}: whole-round operations take f32 and f64 tensors"));
        }
        Ok((layout, opened))
    }

    /// Computes every element of every tensor as `step` of that element's values in the updates
    /// (in the order of `indices`; `step` may reorder them), returned in each tensor's type.
    fn per_element(&self, indices: &[u32], step: impl Fn(&mut [f64]) -> f64 + Sync) -> Result<NamedTensors, String> {
        let (layout, opened) = self.open(indices)?;
        let n = opened.len();
        let chunk = (CHUNK_BUDGET / n).max(1024);
        let mut result = Vec::with_capacity(layout.len());
        let mut values = Vec::with_capacity(chunk * n);
        for (t, (name, dtype, shape)) in layout.iter().enumerate() {
            let numel = crate::tensor::numel(shape).and_then(|c| usize::try_from(c).ok()).ok_or("shape overflows")?;
            let mut out = vec![0.0f64; numel];
            let mut start = 0;
            while start < numel {
                let end = (start + chunk).min(numel);
                values.clear();
                for u in &opened {
                    u.read(t, start..end, &mut values)?;
                }
                let c = end - start;
                crate::tensor::for_each_part(&mut out[start..end], 4096, |offset, part| {
                    let mut column = vec![0.0f64; n];
                    for (k, slot) in part.iter_mut().enumerate() {
                        for (u, v) in column.iter_mut().enumerate() {
                            *v = values[u * c + offset + k];
                        }
                        *slot = step(&mut column);
                    }
                });
                start = end;
            }
            let tensor = Tensor::from_f64(shape.clone(), out).ok_or("a result lost its shape")?.cast(*dtype);
            result.push((name.clone(), tensor));
        }
        Ok(result)
    }

    /// Squared L2 distances between the updates `indices`, row-major n x n.
    pub fn pairwise_distances(&self, indices: &[u32]) -> Result<Vec<f64>, String> {
        let (layout, opened) = self.open(indices)?;
        let n = opened.len();
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect();
        let mut sums = vec![0.0f64; pairs.len()];
        let chunk = (CHUNK_BUDGET / n).max(1024);
        let mut values = Vec::with_capacity(chunk * n);
        for (t, (_, _, shape)) in layout.iter().enumerate() {
            let numel = crate::tensor::numel(shape).and_then(|c| usize::try_from(c).ok()).ok_or("shape overflows")?;
            let mut start = 0;
            while start < numel {
                let end = (start + chunk).min(numel);
                let c = end - start;
                values.clear();
                for u in &opened {
                    u.read(t, start..end, &mut values)?;
                }
                // Each core sums every pair over its share of the chunk's elements.
                let partials = parallel_map(c, |range| {
                    pairs
                        .iter()
                        .map(|&(i, j)| {
                            let (a, b) = (
                                &values[i * c + range.start..i * c + range.end],
                                &values[j * c + range.start..j * c + range.end],
                            );
                            a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>()
                        })
                        .collect::<Vec<f64>>()
                });
                for part in partials {
                    sums.iter_mut().zip(part).for_each(|(s, p)| *s += p);
                }
                start = end;
            }
        }
        let mut matrix = vec![0.0f64; n * n];
        for ((i, j), d) in pairs.into_iter().zip(sums) {
            matrix[i * n + j] = d;
            matrix[j * n + i] = d;
        }
        Ok(matrix)
    }

    /// Per element: the mean of the sorted values of rank lo..hi.
    pub fn rank_mean(&self, indices: &[u32], lo: u32, hi: u32) -> Result<NamedTensors, String> {
        let n = indices.len();
        let (lo, hi) = (lo as usize, hi as usize);
        if !(lo < hi && hi <= n) {
            return Err(format!("ranks {lo}..{hi} are not a non-empty range within the {n} updates"));
        }
        self.per_element(indices, move |column| {
            column.sort_unstable_by(f64::total_cmp);
            column[lo..hi].iter().sum::<f64>() / (hi - lo) as f64
        })
    }

    /// Per element: the mean of the `count` values nearest the median.
    pub fn median_nearest_mean(&self, indices: &[u32], count: u32) -> Result<NamedTensors, String> {
        let n = indices.len();
        let count = count as usize;
        if !(1..=n).contains(&count) {
            return Err(format!("count {count} is not between 1 and the {n} updates"));
        }
        self.per_element(indices, move |column| {
            column.sort_unstable_by(f64::total_cmp);
            let median = if n % 2 == 1 { column[n / 2] } else { (column[n / 2 - 1] + column[n / 2]) / 2.0 };
            // Nearest first; equal distances in value order, so the result does not depend on
            // the order updates arrived in.
            column.sort_by(|a, b| (a - median).abs().total_cmp(&(b - median).abs()).then(a.total_cmp(b)));
            column[..count].iter().sum::<f64>() / count as f64
        })
    }

    /// sum_i w_i * update_i / sum_i w_i.
    pub fn weighted_mean(&self, indices: &[u32], weights: &[f64]) -> Result<NamedTensors, String> {
        if weights.len() != indices.len() {
            return Err(format!("{} weights for {} updates", weights.len(), indices.len()));
        }
        if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err("weights must be finite and >= 0".into());
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Err("the weights sum to zero".into());
        }
        let weights = weights.to_vec();
        self.per_element(indices, move |column| column.iter().zip(&weights).map(|(v, w)| v * w).sum::<f64>() / total)
    }
}

/// Orders `open`'s tensors as `first` names them, checking names, types and shapes match.
fn reorder<'a>(first: &Layout, names: &Layout, open: Opened<'a>) -> Result<Opened<'a>, String> {
    if names.len() != first.len() {
        return Err(format!("{} tensors where the first update has {}", names.len(), first.len()));
    }
    let mut order = Vec::with_capacity(first.len());
    for (name, dtype, shape) in first {
        let k = names.iter().position(|(n, _, _)| n == name).ok_or_else(|| format!("tensor `{name}` is missing"))?;
        let (_, d, s) = &names[k];
        if d != dtype || s != shape {
            return Err(format!("tensor `{name}` is {d} {s:?} where the first update's is {dtype} {shape:?}"));
        }
        order.push(k);
    }
    Ok(match open {
        Opened::Memory(tensors) => Opened::Memory(order.iter().map(|&k| tensors[k]).collect()),
        Opened::File { file, path, mut tensors } => {
            let mut picked: Vec<Option<Slice>> = tensors.drain(..).map(Some).collect();
            let tensors =
                order.iter().map(|&k| picked[k].take().ok_or("a tensor named twice")).collect::<Result<_, _>>()?;
            Opened::File { file, path, tensors }
        }
    })
}

/// Runs `f` over `0..len` split between the machine's cores; the parts' results in order.
fn parallel_map<T: Send>(len: usize, f: impl Fn(Range<usize>) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads < 2 || len < 4096 {
        return vec![f(0..len)];
    }
    let per = len.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..len)
            .step_by(per)
            .map(|start| {
                let f = &f;
                scope.spawn(move || f(start..(start + per).min(len)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(values: &[f32]) -> UpdateSource {
        let t = Tensor::from_f32(vec![values.len() as u64], values.to_vec()).expect("tensor");
        UpdateSource::Memory(vec![("w".to_string(), t)])
    }

    #[test]
    fn statistics_over_the_round_and_the_indices_a_plugin_may_give() {
        let mut round = RoundUpdates::default();
        for (k, v) in [[0.0, 4.0], [3.0, 0.0], [1.0, 1.0]].iter().enumerate() {
            round.push(format!("c{k}"), memory(v));
        }
        let d = round.pairwise_distances(&[0, 1, 2]).expect("distances");
        assert_eq!(d, vec![0.0, 25.0, 10.0, 25.0, 0.0, 5.0, 10.0, 5.0, 0.0]);
        let median = round.rank_mean(&[0, 1, 2], 1, 2).expect("median");
        assert_eq!(median[0].1.as_f32().expect("f32"), &[1.0, 1.0]);
        let mean = round.weighted_mean(&[0, 1], &[1.0, 3.0]).expect("mean");
        assert_eq!(mean[0].1.as_f32().expect("f32"), &[2.25, 1.0]);
        // A plugin cannot make the host do more than the round holds.
        assert!(round.pairwise_distances(&[0, 0]).expect_err("twice").contains("given twice"));
        assert!(round.rank_mean(&[0, 3], 0, 1).expect_err("no such update").contains("does not exist"));
        assert!(round.rank_mean(&[0, 1], 1, 1).is_err());
        assert!(round.median_nearest_mean(&[0, 1], 3).is_err());
        assert!(round.weighted_mean(&[0, 1], &[0.0, 0.0]).is_err());
    }
}
