//! Tensors of inference requests and responses: JSON (`{"inputs": {"x": {"shape": [..],
//! "data": [..]}}}`, float32) or safetensors (any dtype wasi-nn takes).
use std::collections::BTreeMap;

use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::runtime::bindings::types::Dtype;
use crate::runtime::TensorData;
use crate::tensor::{Buffer, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("request body: {0}")]
    Body(String),
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
}

/// One tensor in JSON: float32 values, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorValue {
    pub shape: Vec<u64>,
    #[serde(deserialize_with = "le_f32_bytes::deserialize", serialize_with = "le_f32_bytes::serialize")]
    pub data: Vec<u8>,
}

/// A JSON number array read straight into little-endian float32 bytes: serde_json checks the
/// array's syntax and hands over its text, which is then parsed number by number (correctly
/// rounded to f32, ~4x faster than serde's per-element path). This is the reader of bodies that
/// [`super::json_request::from_json`]'s one-pass reader leaves to serde.
mod le_f32_bytes {
    use serde::de::Error;
    use serde::ser::SerializeSeq;
    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let raw = <&'de serde_json::value::RawValue>::deserialize(d)?;
        parse(raw.get()).map_err(|e| D::Error::custom(format!("data: {e}")))
    }

    /// The numbers of a JSON array whose syntax serde_json has checked already, in one pass.
    fn parse(text: &str) -> Result<Vec<u8>, String> {
        match crate::inference::json_array::f32_array(text.as_bytes(), 0) {
            Some((bytes, _)) => Ok(bytes),
            None => {
                let shown: String = text.chars().take(40).collect();
                Err(format!("expected an array of numbers, got `{shown}`"))
            }
        }
    }

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(bytes.len() / 4))?;
        for v in super::le_f32s(bytes) {
            seq.serialize_element(&v)?;
        }
        seq.end()
    }
}

/// A JSON inference request: named inputs (`{"inputs": {"x": {"shape", "data"}}}`), or one
/// unnamed tensor (`{"shape", "data"}`) for a model with one input.
#[derive(Debug, Clone, PartialEq)]
pub enum InferRequest {
    Named { inputs: BTreeMap<String, TensorValue> },
    Single(TensorValue),
}

// By hand rather than `#[serde(untagged)]`, which buffers the whole document as generic values
// before it tries each form (a third of the request's cost on a 64x64 image).
impl<'de> Deserialize<'de> for InferRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<InferRequest, D::Error> {
        use serde::de::{Error, MapAccess, Visitor};
        struct Request;
        impl<'de> Visitor<'de> for Request {
            type Value = InferRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"{"inputs": {name: {"shape", "data"}}} or {"shape", "data"}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InferRequest, A::Error> {
                let (mut inputs, mut shape, mut data) = (None, None, None);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "inputs" if inputs.is_none() => inputs = Some(map.next_value()?),
                        "shape" if shape.is_none() => shape = Some(map.next_value()?),
                        "data" if data.is_none() => {
                            data = Some(map.next_value::<DataField>()?.0);
                        }
                        "inputs" | "shape" | "data" => return Err(A::Error::custom(format!("`{key}` given twice"))),
                        other => {
                            return Err(A::Error::unknown_field(other, &["inputs", "shape", "data"]));
                        }
                    }
                }
                match (inputs, shape, data) {
                    (Some(inputs), None, None) => Ok(InferRequest::Named { inputs }),
                    (None, Some(shape), Some(data)) => Ok(InferRequest::Single(TensorValue { shape, data })),
                    (Some(_), _, _) => {
                        Err(A::Error::custom("`inputs` names every tensor: no `shape` or `data` beside it"))
                    }
                    (None, None, _) => Err(A::Error::missing_field("shape")),
                    (None, Some(_), None) => Err(A::Error::missing_field("data")),
                }
            }
        }
        d.deserialize_map(Request)
    }
}

struct DataField(Vec<u8>);

impl<'de> Deserialize<'de> for DataField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DataField, D::Error> {
        le_f32_bytes::deserialize(d).map(DataField)
    }
}

pub fn element_size(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 | Dtype::I32 => 4,
        Dtype::F64 | Dtype::I64 => 8,
        Dtype::U8 | Dtype::I8 => 1,
    }
}

/// The ONNX element type (`TensorProto.DataType`) of a dtype.
pub fn onnx_element(dtype: Dtype) -> i32 {
    use nereid_onnx::proto::data_type;
    match dtype {
        Dtype::F32 => data_type::FLOAT,
        Dtype::F64 => data_type::DOUBLE,
        Dtype::I64 => data_type::INT64,
        Dtype::I32 => data_type::INT32,
        Dtype::U8 => data_type::UINT8,
        Dtype::I8 => data_type::INT8,
    }
}

/// The dtype of an ONNX element type, if tensors of it can travel.
pub fn dtype_of_onnx(element: i32) -> Option<Dtype> {
    [Dtype::F32, Dtype::F64, Dtype::I64, Dtype::I32, Dtype::U8, Dtype::I8]
        .into_iter()
        .find(|d| onnx_element(*d) == element)
}

pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::F64 => "f64",
        Dtype::I32 => "i32",
        Dtype::I64 => "i64",
        Dtype::U8 => "u8",
        Dtype::I8 => "i8",
    }
}

/// Checks that the bytes match the shape and dtype.
pub fn check(t: &TensorData) -> Result<(), WireError> {
    if t.shape.len() > MAX_RANK {
        let message = format!("{} dimensions; at most {MAX_RANK}", t.shape.len());
        return Err(WireError::Tensor { name: t.name.clone(), message });
    }
    let numel = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let expected = numel.and_then(|n| n.checked_mul(element_size(t.dtype) as u64));
    if expected != Some(t.data.len() as u64) {
        return Err(WireError::Tensor {
            name: t.name.clone(),
            message: format!(
                "shape {:?} of {} needs {} bytes, got {}",
                t.shape,
                dtype_name(t.dtype),
                expected.map(|e| e.to_string()).unwrap_or_else(|| "too many".into()),
                t.data.len()
            ),
        });
    }
    Ok(())
}

pub fn f32_tensor(name: &str, shape: Vec<u64>, values: &[f32]) -> TensorData {
    TensorData {
        name: name.into(),
        dtype: Dtype::F32,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub fn f32_values(t: &TensorData) -> Result<Vec<f32>, WireError> {
    if t.dtype != Dtype::F32 {
        return Err(WireError::Tensor {
            name: t.name.clone(),
            message: format!("is {}, not f32", dtype_name(t.dtype)),
        });
    }
    Ok(le_f32s(&t.data))
}

/// Little-endian float32 values (a stored sample, a tensor's data).
pub fn le_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A by-value tensor as a host tensor (what plugins are lent).
pub fn to_tensor(t: &TensorData) -> Result<Tensor, WireError> {
    check(t)?;
    let buffer = Buffer::from_le_bytes(t.dtype.into(), &t.data)
        .ok_or_else(|| WireError::Tensor { name: t.name.clone(), message: "data does not fit the type".into() })?;
    Tensor::new(t.shape.clone(), buffer)
        .ok_or_else(|| WireError::Tensor { name: t.name.clone(), message: "data does not fit the shape".into() })
}

/// A host tensor as a by-value tensor named `name`.
pub fn from_tensor(name: String, t: &Tensor) -> TensorData {
    TensorData { name, dtype: t.dtype().into(), shape: t.shape().to_vec(), data: t.buffer().to_le_bytes() }
}

impl InferRequest {
    /// The request's tensors; `inputs` names the model's inputs (for the single-tensor form).
    pub fn into_tensors(self, inputs: &[String]) -> Result<Vec<TensorData>, WireError> {
        let named: Vec<(String, TensorValue)> = match self {
            InferRequest::Named { inputs } => inputs.into_iter().collect(),
            InferRequest::Single(t) => match inputs {
                [only] => vec![(only.clone(), t)],
                _ => {
                    return Err(WireError::Body(format!(
                        "the model has {} inputs ({}): name them in `inputs`",
                        inputs.len(),
                        inputs.join(", ")
                    )))
                }
            },
        };
        named
            .into_iter()
            .map(|(name, v)| {
                let t = TensorData { name, dtype: Dtype::F32, shape: v.shape, data: v.data };
                check(&t)?;
                Ok(t)
            })
            .collect()
    }
}

/// Largest safetensors header of a request body (inference inputs, a batch of samples, a cut's
/// tensors): a request names a few tensors, and the header is parsed whole before its data.
pub const MAX_REQUEST_HEADER: u64 = 1 << 20;
/// Most tensors one request body may hold.
pub const MAX_REQUEST_TENSORS: usize = 1024;
pub use crate::model_io::MAX_RANK;

/// Reads a safetensors body.
pub fn from_safetensors(bytes: &[u8]) -> Result<Vec<TensorData>, WireError> {
    let header_len = bytes.first_chunk::<8>().map(|n| u64::from_le_bytes(*n));
    if let Some(n) = header_len.filter(|&n| n > MAX_REQUEST_HEADER) {
        return Err(WireError::Body(format!(
            "safetensors: a header of {n} bytes; a request's is at most {MAX_REQUEST_HEADER}"
        )));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| WireError::Body(format!("safetensors: {e}")))?;
    if st.len() > MAX_REQUEST_TENSORS {
        return Err(WireError::Body(format!(
            "safetensors: {} tensors; a request holds at most {MAX_REQUEST_TENSORS}",
            st.len()
        )));
    }
    let mut out = Vec::new();
    for (name, view) in st.iter() {
        if view.shape().len() > MAX_RANK {
            return Err(WireError::Tensor {
                name: name.to_string(),
                message: format!("{} dimensions; at most {MAX_RANK}", view.shape().len()),
            });
        }
        let dtype = match view.dtype() {
            StDtype::F32 => Dtype::F32,
            StDtype::F64 => Dtype::F64,
            StDtype::I32 => Dtype::I32,
            StDtype::I64 => Dtype::I64,
            StDtype::U8 => Dtype::U8,
            StDtype::I8 => Dtype::I8,
            other => {
                return Err(WireError::Tensor {
                    name: name.to_string(),
                    message: format!("dtype {other:?} is not supported"),
                })
            }
        };
        out.push(TensorData {
            name: name.to_string(),
            dtype,
            shape: view.shape().iter().map(|&d| d as u64).collect(),
            data: view.data().to_vec(),
        });
    }
    // safetensors orders by name; keep that (deterministic).
    Ok(out)
}

pub fn to_safetensors(tensors: &[TensorData]) -> Result<Vec<u8>, WireError> {
    let views = tensors
        .iter()
        .map(|t| {
            let dtype = match t.dtype {
                Dtype::F32 => StDtype::F32,
                Dtype::F64 => StDtype::F64,
                Dtype::I32 => StDtype::I32,
                Dtype::I64 => StDtype::I64,
                Dtype::U8 => StDtype::U8,
                Dtype::I8 => StDtype::I8,
            };
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            TensorView::new(dtype, shape, &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| WireError::Tensor { name: t.name.clone(), message: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| WireError::Body(e.to_string()))
}

/// Rows `[start, end)` of a tensor along its first axis.
pub fn rows(t: &TensorData, start: u64, end: u64) -> TensorData {
    let rows = t.shape.first().copied().unwrap_or(1).max(1);
    let row_bytes = t.data.len() as u64 / rows;
    let mut shape = t.shape.clone();
    if let Some(first) = shape.first_mut() {
        *first = end - start;
    }
    TensorData {
        name: t.name.clone(),
        dtype: t.dtype,
        shape,
        data: t.data[(start * row_bytes) as usize..(end * row_bytes) as usize].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors body of `n` scalar f32 tensors, and one of a tensor of `rank` dimensions of 1.
    fn bodies(n: usize, rank: usize) -> (Vec<u8>, Vec<u8>) {
        let many: Vec<TensorData> = (0..n).map(|i| f32_tensor(&format!("t{i}"), vec![], &[1.0])).collect();
        let deep = f32_tensor("deep", vec![1; rank], &[1.0]);
        (to_safetensors(&many).expect("encode"), to_safetensors(&[deep]).expect("encode"))
    }

    #[test]
    fn request_bodies_past_the_header_tensor_and_rank_caps_are_refused_naming_the_cap() {
        let (at_cap, rank_at_cap) = bodies(MAX_REQUEST_TENSORS, MAX_RANK);
        assert_eq!(from_safetensors(&at_cap).expect("at the cap").len(), MAX_REQUEST_TENSORS);
        check(&from_safetensors(&rank_at_cap).expect("rank at the cap")[0]).expect("checks");
        let (past, rank_past) = bodies(MAX_REQUEST_TENSORS + 1, MAX_RANK + 1);
        let e = from_safetensors(&past).expect_err("too many tensors").to_string();
        assert!(e.contains("1025 tensors") && e.contains("at most 1024"), "{e}");
        let e = from_safetensors(&rank_past).expect_err("rank").to_string();
        assert!(e.contains("`deep`") && e.contains("33 dimensions; at most 32"), "{e}");
        let json: InferRequest = serde_json::from_str(&format!(r#"{{"shape": {:?}, "data": [2]}}"#, vec![1; 33]))
            .expect("the JSON form parses");
        let e = json.into_tensors(&["x".into()]).expect_err("rank").to_string();
        assert!(e.contains("33 dimensions; at most 32"), "{e}");
        // The header's length is checked before the header is read.
        let mut huge = (MAX_REQUEST_HEADER + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let e = from_safetensors(&huge).expect_err("header").to_string();
        assert!(e.contains("a header of 1048577 bytes") && e.contains("at most 1048576"), "{e}");
    }

    #[test]
    fn json_and_safetensors_carry_the_same_tensor() {
        let req: InferRequest =
            serde_json::from_str(r#"{"shape": [2, 2], "data": [1, 2, 3, 4.5]}"#).expect("single tensor form");
        let t = req.into_tensors(&["x".into()]).expect("one input");
        assert_eq!(f32_values(&t[0]).expect("f32"), [1.0, 2.0, 3.0, 4.5]);
        let back = from_safetensors(&to_safetensors(&t).expect("encode")).expect("decode");
        assert_eq!(back.len(), 1);
        assert_eq!((&back[0].name, &back[0].shape, &back[0].data), (&t[0].name, &t[0].shape, &t[0].data));
        assert_eq!(f32_values(&rows(&t[0], 1, 2)).expect("f32"), [3.0, 4.5]);
    }

    #[test]
    fn json_requests_decode_straight_to_f32_and_refuse_what_they_do_not_know() {
        let named: InferRequest = serde_json::from_str(
            r#"{"inputs": {"b": {"shape": [1], "data": [-0.5]}, "a": {"data": [1e3, 2], "shape": [2]}}}"#,
        )
        .expect("named form, keys in any order");
        let t = named.into_tensors(&["a".into(), "b".into()]).expect("two inputs");
        assert_eq!((t[0].name.as_str(), f32_values(&t[0]).expect("f32")), ("a", vec![1000.0, 2.0]));
        assert_eq!((t[1].name.as_str(), f32_values(&t[1]).expect("f32")), ("b", vec![-0.5]));
        let single: InferRequest =
            serde_json::from_str(r#"{"data": [ 0.1 ,3,-2.5e-3, 1E2 ], "shape": [4]}"#).expect("data first");
        assert_eq!(
            f32_values(&single.into_tensors(&["x".into()]).expect("one")[0]).expect("f32"),
            [0.1f32, 3.0, -2.5e-3, 100.0]
        );
        let empty: InferRequest = serde_json::from_str(r#"{"data": [ ], "shape": [0]}"#).expect("no values");
        assert!(empty.into_tensors(&["x".into()]).expect("one")[0].data.is_empty());
        for (body, says) in [
            (r#"{"shape": [1], "data": [1], "extra": 1}"#, "unknown field `extra`"),
            (r#"{"shape": [1], "data": [1], "data": [2]}"#, "`data` given twice"),
            (r#"{"shape": [1]}"#, "missing field `data`"),
            (r#"{"data": [1]}"#, "missing field `shape`"),
            (r#"{"shape": [1], "data": ["1"]}"#, "data: expected an array of numbers, got `[\"1\"]`"),
            (r#"{"shape": [1], "data": [[1]]}"#, "data: expected an array of numbers"),
            (r#"{"shape": [1], "data": 1}"#, "data: expected an array of numbers, got `1`"),
            (r#"{"shape": [1], "data": [1,]}"#, "expected value"),
            (r#"{"shape": [1], "data": [1, nan]}"#, "expected ident"),
            (r#"{"inputs": {}, "shape": [1]}"#, "no `shape` or `data` beside it"),
            (r#"{"inputs": {"x": {"shape": [1], "data": [1], "dims": 2}}}"#, "unknown field `dims`"),
            (r#"[1, 2]"#, "invalid type: sequence"),
        ] {
            let err = serde_json::from_str::<InferRequest>(body).expect_err(body).to_string();
            assert!(err.contains(says), "{body}: {err}");
        }
    }

    #[test]
    fn a_shape_that_does_not_fit_the_data_is_named() {
        let req: InferRequest =
            serde_json::from_str(r#"{"inputs": {"x": {"shape": [3], "data": [1, 2]}}}"#).expect("named form");
        let err = req.into_tensors(&["x".into()]).expect_err("3 != 2");
        assert_eq!(err.to_string(), "tensor `x`: shape [3] of f32 needs 12 bytes, got 8");
        let req: InferRequest = serde_json::from_str(r#"{"shape": [1], "data": [1]}"#).expect("single");
        let err = req.into_tensors(&["a".into(), "b".into()]).expect_err("two inputs");
        assert!(err.to_string().contains("name them in `inputs`"), "{err}");
    }
}
