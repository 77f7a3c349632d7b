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

/// Parses safetensors bytes; tensors come in the order of their data in the file. `origin` names
/// the source in errors.
pub fn decode(bytes: &[u8], origin: &Path) -> Result<NamedTensors, ModelIoError> {
    let format =
        |e: safetensors::SafeTensorError| ModelIoError::Format { path: origin.to_path_buf(), message: e.to_string() };
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(format)?;
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

pub fn read(path: &Path) -> Result<NamedTensors, ModelIoError> {
    let bytes = std::fs::read(path).map_err(|source| ModelIoError::Io { path: path.to_path_buf(), source })?;
    decode(&bytes, path)
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
        Cow::Owned(self.tensor.buffer().to_le_bytes())
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
    fn garbage_is_a_format_error_naming_the_source() {
        let err = decode(b"not a model", Path::new("bad.safetensors")).expect_err("garbage");
        assert!(err.to_string().starts_with("bad.safetensors: not a valid safetensors file"), "{err}");
    }
}
