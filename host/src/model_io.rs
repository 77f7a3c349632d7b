//! Models on disk and on the wire: safetensors files of named tensors.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::tensor::{Buffer, DType, Tensor};

/// An ordered list of named tensors.
pub type NamedTensors = Vec<(String, Tensor)>;

#[derive(Debug, thiserror::Error)]
pub enum ModelIoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}` has element type {dtype}, which nereid does not handle")]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
}

fn to_safetensors(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::I32 => safetensors::Dtype::I32,
        DType::I64 => safetensors::Dtype::I64,
        DType::U8 => safetensors::Dtype::U8,
        DType::I8 => safetensors::Dtype::I8,
    }
}

fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
    Some(match dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::I32 => DType::I32,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::I8 => DType::I8,
        _ => return None,
    })
}

/// Most tensors a safetensors file (a model, an update) may hold.
pub const MAX_FILE_TENSORS: usize = 65_536;
/// Most dimensions of a tensor anywhere nereid reads one (files and request bodies; ONNX
/// Runtime itself allows fewer).
pub const MAX_RANK: usize = 32;

fn check_counts(count: usize, ranks: impl Iterator<Item = (String, usize)>, origin: &Path) -> Result<(), ModelIoError> {
    let bad = |message: String| ModelIoError::Format { path: origin.to_path_buf(), message };
    if count > MAX_FILE_TENSORS {
        return Err(bad(format!("{count} tensors; a file holds at most {MAX_FILE_TENSORS}")));
    }
    for (name, rank) in ranks {
        if rank > MAX_RANK {
            return Err(bad(format!("tensor `{name}`: {rank} dimensions; at most {MAX_RANK}")));
        }
    }
    Ok(())
}

/// Parses safetensors bytes; tensors come in the order of their data in the file. `origin` names
/// the source in errors.
pub fn decode(bytes: &[u8], origin: &Path) -> Result<NamedTensors, ModelIoError> {
    let format =
        |e: safetensors::SafeTensorError| ModelIoError::Format { path: origin.to_path_buf(), message: e.to_string() };
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(format)?;
    let infos = metadata.tensors();
    check_counts(infos.len(), infos.iter().map(|(name, info)| (name.clone(), info.shape.len())), origin)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(format)?;
    metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let view = st.tensor(&name).map_err(format)?;
            let dtype = from_safetensors(view.dtype()).ok_or_else(|| ModelIoError::UnsupportedDtype {
                path: origin.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            let shape: Vec<u64> = view.shape().iter().map(|d| *d as u64).collect();
            let bad = |message: &str| ModelIoError::Format {
                path: origin.to_path_buf(),
                message: format!("tensor `{name}`: {message}"),
            };
            let (buffer, finite) =
                Buffer::from_le_bytes_checked(dtype, view.data()).ok_or_else(|| bad("data is not whole elements"))?;
            let tensor =
                Tensor::with_finite(shape, buffer, Some(finite)).ok_or_else(|| bad("data does not match the shape"))?;
            Ok((name, tensor))
        })
        .collect()
}

/// The header of a safetensors file: each tensor's name, type, shape and byte range (relative to
/// the data section), in data order; the metadata; where the data section starts.
pub struct Header {
    pub tensors: Vec<(String, DType, Vec<u64>, std::ops::Range<usize>)>,
    pub metadata: HashMap<String, String>,
    pub data_start: usize,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (usize, usize),
}

fn dtype_named(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "U8" => DType::U8,
        "I8" => DType::I8,
        _ => return None,
    })
}

/// Reads and checks the header of the safetensors file `file` of `len` bytes, leaving the
/// reader at the start of the data.
pub fn read_header(file: &mut impl std::io::Read, len: u64, origin: &Path) -> Result<Header, ModelIoError> {
    let bad = |message: String| ModelIoError::Format { path: origin.to_path_buf(), message };
    let io = |source| ModelIoError::Io { path: origin.to_path_buf(), source };
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return Err(bad(format!("a header of {n} bytes does not fit a file of {len}")));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(io)?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| bad(format!("header: {e}")))?;
    let ranks =
        raw.iter().map(|(name, v)| (name.clone(), v.get("shape").and_then(|s| s.as_array()).map_or(0, Vec::len)));
    check_counts(raw.len().saturating_sub(usize::from(raw.contains_key("__metadata__"))), ranks, origin)?;
    let mut metadata = HashMap::new();
    let mut tensors = Vec::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| bad(format!("__metadata__: {e}")))?;
            continue;
        }
        let e: RawEntry = serde_json::from_value(value).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let dtype = dtype_named(&e.dtype).ok_or_else(|| ModelIoError::UnsupportedDtype {
            path: origin.to_path_buf(),
            tensor: name.clone(),
            dtype: e.dtype.clone(),
        })?;
        let want = crate::tensor::numel(&e.shape).and_then(|c| c.checked_mul(dtype.size() as u64));
        let (start, end) = e.data_offsets;
        if end < start || want != Some((end - start) as u64) {
            return Err(bad(format!("tensor `{name}`: its byte range does not match its shape")));
        }
        tensors.push((name, dtype, e.shape, start..end));
    }
    tensors.sort_by_key(|t| t.3.start);
    let data_len = len - 8 - n;
    let mut expected = 0;
    for t in &tensors {
        if t.3.start != expected {
            return Err(bad(format!("tensor `{}`: the data is not contiguous", t.0)));
        }
        expected = t.3.end;
    }
    if expected as u64 != data_len {
        return Err(bad(format!("the data section has {data_len} bytes, the tensors take {expected}")));
    }
    Ok(Header { tensors, metadata, data_start: 8 + n as usize })
}

/// Reads a safetensors file tensor by tensor, in bounded chunks: memory for the decoded tensors
/// only, and the all-finite flag found on the way.
pub fn read(path: &Path) -> Result<NamedTensors, ModelIoError> {
    use std::io::Read;
    let io = |source| ModelIoError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let header = read_header(&mut reader, len, path)?;
    let mut chunk = vec![0u8; 1 << 16];
    header
        .tensors
        .into_iter()
        .map(|(name, dtype, shape, range)| {
            let mut bytes_left = range.len();
            let mut buffer = Buffer::with_capacity(dtype, range.len() / dtype.size());
            let mut finite = true;
            // Chunks are a multiple of every element size, so elements never straddle two.
            while bytes_left > 0 {
                let take = bytes_left.min(chunk.len());
                reader.read_exact(&mut chunk[..take]).map_err(io)?;
                finite &= buffer.append_le(&chunk[..take]).ok_or_else(|| ModelIoError::Format {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}`: data is not whole elements"),
                })?;
                bytes_left -= take;
            }
            let tensor = Tensor::with_finite(shape, buffer, Some(finite)).ok_or_else(|| ModelIoError::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: data does not match the shape"),
            })?;
            Ok((name, tensor))
        })
        .collect()
}

struct View<'a> {
    tensor: &'a Tensor,
    shape: Vec<usize>,
}

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        to_safetensors(self.tensor.dtype())
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.tensor.buffer().le_bytes()
    }
    fn data_len(&self) -> usize {
        self.tensor.byte_len()
    }
}

/// Serializes to safetensors bytes with `metadata` in the header.
pub fn encode(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let views = tensors
        .iter()
        .map(|(name, t)| (name.as_str(), View { tensor: t, shape: t.shape().iter().map(|d| *d as usize).collect() }));
    safetensors::serialize(views, metadata)
}

/// Writes atomically (a temporary file renamed into place).
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelIoError> {
    let bytes = encode(tensors, metadata)
        .map_err(|e| ModelIoError::Format { path: path.to_path_buf(), message: e.to_string() })?;
    let io = |source| ModelIoError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_and_order() {
        let model = vec![
            ("z.weight".to_string(), Tensor::from_f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).expect("shape")),
            ("a.bias".to_string(), Tensor::from_f64(vec![2], vec![0.5, -0.5]).expect("shape")),
        ];
        let bytes = encode(&model, None).expect("encode");
        let back = decode(&bytes, Path::new("mem")).expect("decode");
        let mut sorted_back = back.clone();
        sorted_back.sort_by(|a, b| a.0.cmp(&b.0));
        let mut sorted = model.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(sorted_back, sorted);
    }

    #[test]
    fn files_past_the_tensor_and_rank_caps_are_refused_naming_the_cap() {
        let one = || Tensor::from_f32(vec![1], vec![1.0]).expect("shape");
        let many: NamedTensors = (0..=MAX_FILE_TENSORS).map(|i| (format!("t{i}"), one())).collect();
        let bytes = encode(&many, None).expect("encode");
        let origin = Path::new("many.safetensors");
        let e = decode(&bytes, origin).expect_err("too many").to_string();
        assert!(e.contains("many.safetensors") && e.contains("65537 tensors; a file holds at most 65536"), "{e}");
        let e = read_header(&mut std::io::Cursor::new(&bytes), bytes.len() as u64, origin).err().expect("too many");
        assert!(e.to_string().contains("65537 tensors"), "{e}");

        let deep = vec![("deep".to_string(), Tensor::from_f32(vec![1; 33], vec![1.0]).expect("shape"))];
        let bytes = encode(&deep, None).expect("encode");
        let e = decode(&bytes, origin).expect_err("rank").to_string();
        assert!(e.contains("tensor `deep`: 33 dimensions; at most 32"), "{e}");
        let e = read_header(&mut std::io::Cursor::new(&bytes), bytes.len() as u64, origin).err().expect("rank");
        assert!(e.to_string().contains("tensor `deep`: 33 dimensions"), "{e}");
        let at_cap = vec![("ok".to_string(), Tensor::from_f32(vec![1; 32], vec![1.0]).expect("shape"))];
        decode(&encode(&at_cap, None).expect("encode"), origin).expect("rank 32 is read");
    }

    #[test]
    fn garbage_is_a_format_error_naming_the_source() {
        let err = decode(b"not a model", Path::new("bad.safetensors")).expect_err("garbage");
        assert!(err.to_string().starts_with("bad.safetensors: not a valid safetensors file"), "{err}");
    }
}
