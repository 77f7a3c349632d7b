//! A node's local data: labelled examples from CSV or .npy files, the UCI digits for the demo, and
//! the seeded splits (hold-out, Dirichlet non-IID) the demo and tests use.
//!
//! Layout of a node's data directory, for each split `train` and `test`, either
//! - `<split>.csv`: one example per line, the features then the class label (an integer
//!   0..classes) in the last column; a first line that is not numeric is a header and skipped; or
//! - `<split>_x.npy` (float32 or float64, shape [examples, ...features]) and `<split>_y.npy`
//!   (integers, shape [examples]).
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Csv { path: PathBuf, line: usize, message: String },
    #[error("{path}: {message}")]
    Npy { path: PathBuf, message: String },
    #[error("{dir}: no {split} data: expected {split}.csv or {split}_x.npy with {split}_y.npy")]
    Missing { dir: PathBuf, split: String },
    #[error("{origin}: examples have {got} features, the model takes {want}")]
    Features { origin: String, got: usize, want: usize },
    #[error("{origin}: label {label} is outside 0..{classes}")]
    Label { origin: String, label: u32, classes: usize },
}

/// Labelled examples, features flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub features: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.features..(i + 1) * self.features]
    }

    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            x: idx.iter().flat_map(|i| self.row(*i).iter().copied()).collect(),
            y: idx.iter().map(|i| self.y[*i]).collect(),
            features: self.features,
        }
    }

    /// The examples whose class is in `classes` (in their order).
    pub fn of_classes(&self, classes: std::ops::Range<u32>) -> Dataset {
        let idx: Vec<usize> = (0..self.len()).filter(|&i| classes.contains(&self.y[i])).collect();
        self.subset(&idx)
    }

    /// The 1,797 UCI handwritten digits (8x8 images, features scaled to 0..1), shipped inside
    /// the `smartcore` crate.
    pub fn digits() -> Dataset {
        let d = smartcore::dataset::digits::load_dataset();
        Dataset {
            x: d.data.iter().map(|v| v / 16.0).collect(),
            y: d.target.iter().map(|t| *t as u32).collect(),
            features: d.num_features,
        }
    }

    /// Checks the examples against a model's input length and class count; `origin` names the
    /// data in errors.
    pub fn check(&self, origin: &str, features: usize, classes: usize) -> Result<(), DataError> {
        if self.features != features {
            return Err(DataError::Features { origin: origin.into(), got: self.features, want: features });
        }
        if let Some(label) = self.y.iter().find(|l| **l as usize >= classes) {
            return Err(DataError::Label { origin: origin.into(), label: *label, classes });
        }
        Ok(())
    }

    /// A seeded shuffle split into (rest, held out) with `fraction` of the examples held out.
    pub fn holdout(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let held = (self.len() as f64 * fraction).round() as usize;
        (self.subset(&idx[held..]), self.subset(&idx[..held]))
    }

    /// Splits among `nodes` non-IID: for each class, the shares of the nodes are drawn from a
    /// symmetric Dirichlet(alpha) distribution (small alpha: each node sees few classes; large
    /// alpha: close to IID). Seeded; every example goes to exactly one node.
    pub fn dirichlet_split(&self, nodes: usize, alpha: f64, seed: u64) -> Vec<Dataset> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let gamma = Gamma::new(alpha, 1.0).expect("alpha > 0");
        let classes = self.y.iter().copied().max().map_or(0, |m| m as usize + 1);
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); nodes];
        for class in 0..classes {
            let mut idx: Vec<usize> = (0..self.len()).filter(|i| self.y[*i] as usize == class).collect();
            idx.shuffle(&mut rng);
            let draws: Vec<f64> = (0..nodes).map(|_| gamma.sample(&mut rng).max(1e-12)).collect();
            let total: f64 = draws.iter().sum();
            let mut start = 0;
            let mut cumulative = 0.0;
            for (node, d) in draws.iter().enumerate() {
                cumulative += d / total;
                let end = if node + 1 == nodes { idx.len() } else { (cumulative * idx.len() as f64).round() as usize };
                parts[node].extend_from_slice(&idx[start..end.max(start)]);
                start = end.max(start);
            }
        }
        parts
            .into_iter()
            .map(|mut p| {
                p.sort_unstable();
                self.subset(&p)
            })
            .collect()
    }

    pub fn write_csv(&self, path: &Path) -> Result<(), DataError> {
        let mut out = String::new();
        for i in 0..self.len() {
            for v in self.row(i) {
                out.push_str(&format!("{v},"));
            }
            out.push_str(&format!("{}\n", self.y[i]));
        }
        std::fs::write(path, out).map_err(|source| DataError::Io { path: path.into(), source })
    }

    pub fn read_csv(path: &Path) -> Result<Dataset, DataError> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.into(), source })?;
        let mut data = Dataset { x: Vec::new(), y: Vec::new(), features: 0 };
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let numbers: Result<Vec<f64>, _> = fields.iter().map(|f| f.parse::<f64>()).collect();
            let Ok(numbers) = numbers else {
                if n == 0 {
                    continue; // a header
                }
                return Err(DataError::Csv {
                    path: path.into(),
                    line: line_no,
                    message: "a field is not a number".into(),
                });
            };
            let err = |message: String| DataError::Csv { path: path.into(), line: line_no, message };
            let (label, features) = numbers.split_last().ok_or_else(|| err("empty line".into()))?;
            if features.is_empty() {
                return Err(err("a line needs features and a label".into()));
            }
            if data.features == 0 {
                data.features = features.len();
            } else if features.len() != data.features {
                return Err(err(format!("{} features, earlier lines have {}", features.len(), data.features)));
            }
            if label.fract() != 0.0 || *label < 0.0 || *label > u32::MAX as f64 {
                return Err(err(format!("the label {label} is not a class number")));
            }
            data.x.extend(features.iter().map(|v| *v as f32));
            data.y.push(*label as u32);
        }
        Ok(data)
    }

    pub fn read_npy(x_path: &Path, y_path: &Path) -> Result<Dataset, DataError> {
        let npy = |path: &Path, e: candle_core::Error| DataError::Npy { path: path.into(), message: e.to_string() };
        let x = candle_core::Tensor::read_npy(x_path).map_err(|e| npy(x_path, e))?;
        let y = candle_core::Tensor::read_npy(y_path).map_err(|e| npy(y_path, e))?;
        let examples = x.dims().first().copied().unwrap_or(0);
        let features: usize = x.dims().iter().skip(1).product();
        let xs = x
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| npy(x_path, e))?;
        let ys = y
            .to_dtype(candle_core::DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| npy(y_path, e))?;
        if ys.len() != examples {
            return Err(DataError::Npy {
                path: y_path.into(),
                message: format!("{} labels for {examples} examples in {}", ys.len(), x_path.display()),
            });
        }
        let y = ys
            .iter()
            .map(|l| {
                if l.fract() == 0.0 && *l >= 0.0 && *l <= u32::MAX as f64 {
                    Ok(*l as u32)
                } else {
                    Err(DataError::Npy { path: y_path.into(), message: format!("the label {l} is not a class number") })
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Dataset { x: xs, y, features })
    }

    /// Split `split` ("train" or "test") of a node's data directory.
    pub fn load(dir: &Path, split: &str) -> Result<Dataset, DataError> {
        let csv = dir.join(format!("{split}.csv"));
        if csv.is_file() {
            return Dataset::read_csv(&csv);
        }
        let (x, y) = (dir.join(format!("{split}_x.npy")), dir.join(format!("{split}_y.npy")));
        if x.is_file() && y.is_file() {
            return Dataset::read_npy(&x, &y);
        }
        Err(DataError::Missing { dir: dir.into(), split: split.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_load_and_split() {
        let d = Dataset::digits();
        assert_eq!((d.len(), d.features), (1797, 64));
        assert!(d.x.iter().all(|v| (0.0..=1.0).contains(v)));
        let (train, test) = d.holdout(0.2, 1);
        assert_eq!((train.len(), test.len()), (1438, 359));
        let parts = train.dirichlet_split(3, 0.5, 7);
        assert_eq!(parts.iter().map(Dataset::len).sum::<usize>(), train.len());
        assert_eq!(parts, train.dirichlet_split(3, 0.5, 7), "seeded");
        // Non-IID: with alpha 0.5 the class histograms of the nodes differ a lot.
        let hist = |p: &Dataset| (0..10).map(|c| p.y.iter().filter(|y| **y == c).count()).collect::<Vec<_>>();
        assert_ne!(hist(&parts[0]), hist(&parts[1]));
    }

    #[test]
    fn csv_round_trip_and_errors_name_the_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = Dataset { x: vec![0.5, 1.0, 0.25, 0.0], y: vec![1, 0], features: 2 };
        let path = dir.path().join("train.csv");
        d.write_csv(&path).expect("write");
        assert_eq!(Dataset::load(dir.path(), "train").expect("read"), d);
        std::fs::write(&path, "a,b,label\n1,2,0\n1,x,1\n").expect("write");
        let e = Dataset::read_csv(&path).expect_err("bad field");
        assert!(e.to_string().ends_with("train.csv:3: a field is not a number"), "{e}");
        std::fs::write(&path, "1,2,0\n1,1\n").expect("write");
        assert!(Dataset::read_csv(&path)
            .expect_err("ragged")
            .to_string()
            .contains(":2: 1 features, earlier lines have 2"));
        assert!(Dataset::load(&dir.path().join("none"), "test")
            .expect_err("missing")
            .to_string()
            .contains("no test data"));
        assert!(d.check("node", 3, 2).is_err());
        assert!(d.check("node", 2, 1).expect_err("label").to_string().contains("label 1 is outside 0..1"));
    }

    #[test]
    fn npy_files_load() {
        let dir = tempfile::tempdir().expect("tmp");
        let x = candle_core::Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (3, 2), &candle_core::Device::Cpu)
            .expect("x");
        let y = candle_core::Tensor::from_slice(&[2i64, 0, 1], 3, &candle_core::Device::Cpu).expect("y");
        x.write_npy(dir.path().join("test_x.npy")).expect("write");
        y.write_npy(dir.path().join("test_y.npy")).expect("write");
        let d = Dataset::load(dir.path(), "test").expect("load");
        assert_eq!(d, Dataset { x: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], y: vec![2, 0, 1], features: 2 });
    }
}
