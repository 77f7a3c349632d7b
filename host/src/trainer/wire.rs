//! The trainer protocol's frames and messages. A frame is a little-endian u32 header length,
//! that many bytes of JSON (the message, tagged by `type`), a little-endian u64 payload length
//! and that many bytes of safetensors (empty for a message without tensors). Nothing else is
//! ever parsed from the trainer: no pickle, no code.
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The protocol version this edge speaks; a trainer says which one it speaks in its hello.
pub const PROTOCOL: u32 = 1;
/// Longest JSON header of a frame.
pub const MAX_HEADER: u32 = 1 << 20;

/// What a task tells the trainer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskInfo {
    pub job: String,
    pub round: u32,
    pub node: String,
    /// Seed the trainer should train with: the same task gets the same seed, so a seeded trainer
    /// makes the same update when a task runs again after a crash.
    pub seed: u64,
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: crate::train::OptimizerKind,
    /// What the job's aggregator publishes to clients (e.g. FedProx's `mu`).
    pub server_config: serde_json::Value,
}

/// How many examples the `samples` frame holds: `new` arrived since the last round,
/// `replayed` were drawn from the replay buffer (`examples` = both).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct SampleCounts {
    pub examples: u64,
    pub new: u64,
    pub replayed: u64,
}

/// From the edge to the trainer.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToTrainer<'a> {
    /// Train the model in the payload. `evaluate_first`: evaluate it before training and send
    /// the evaluation with the result. `objective`: the job has a client objective; send each
    /// step's gradients (`adjust_gradients`) and use the adjusted ones. `samples`: train on the
    /// samples of the `samples` frame that follows (an incremental round), not on local data.
    Fit { task: &'a TaskInfo, evaluate_first: bool, objective: bool, samples: Option<SampleCounts> },
    /// Right after a `fit` that announced samples: the payload holds `x` (float32, one row per
    /// example in the model's input shape) and `y` (int64 class labels).
    Samples,
    /// The adjusted gradients (payload), answering `adjust_gradients`.
    Gradients,
}

/// From the trainer to the edge.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromTrainer {
    /// The first message on a connection.
    Hello {
        protocol: u32,
        /// The value of `NEREID_TRAINER_TOKEN` the edge started it with.
        token: String,
        #[serde(default)]
        name: Option<String>,
    },
    /// Mid-fit: the payload holds `param/<name>` and `grad/<name>` for the tensors whose
    /// gradients the client objective should adjust.
    AdjustGradients,
    /// The trained weights (payload) and what the trainer measured.
    FitResult {
        num_examples: Option<u64>,
        #[serde(default)]
        metrics: BTreeMap<String, f64>,
        #[serde(default)]
        evaluation: Option<EvaluateResult>,
    },
    /// The trainer could not do the task (its exception, in its words).
    Error {
        message: String,
        #[serde(default)]
        kind: Option<String>,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvaluateResult {
    pub loss: f64,
    pub num_examples: Option<u64>,
    /// e.g. `accuracy`.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("a frame header of {0} bytes (at most {MAX_HEADER}): not a protocol frame")]
    HeaderTooLong(u32),
    #[error("a message that is not one of the protocol's: {0}")]
    Message(String),
    #[error("{got} bytes of tensors, more than the {max} this task allows")]
    PayloadTooLarge { got: u64, max: u64 },
}

pub fn write_frame(w: &mut impl Write, message: &impl Serialize, payload: &[u8]) -> io::Result<()> {
    let header = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut head = Vec::with_capacity(header.len() + 12);
    head.extend_from_slice(&(header.len() as u32).to_le_bytes());
    head.extend_from_slice(&header);
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one frame; its payload may be at most `max_payload` bytes.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read, max_payload: u64) -> Result<(T, Vec<u8>), WireError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(WireError::HeaderTooLong(len));
    }
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header)?;
    let message = serde_json::from_slice(&header).map_err(|e| {
        let shown: String = String::from_utf8_lossy(&header[..header.len().min(120)]).chars().take(120).collect();
        WireError::Message(format!("{e} (header starts {shown:?})"))
    })?;
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > max_payload {
        return Err(WireError::PayloadTooLarge { got: len, max: max_payload });
    }
    let mut payload = Vec::new();
    r.take(len).read_to_end(&mut payload)?;
    if payload.len() as u64 != len {
        return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok((message, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_not_a_frame() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &serde_json::json!({"type": "adjust_gradients"}), b"tensors").expect("write");
        let (m, payload): (FromTrainer, _) = read_frame(&mut buf.as_slice(), 100).expect("read");
        assert!(matches!(m, FromTrainer::AdjustGradients));
        assert_eq!(payload, b"tensors");
        assert!(matches!(
            read_frame::<FromTrainer>(&mut buf.as_slice(), 3),
            Err(WireError::PayloadTooLarge { got: 7, max: 3 })
        ));
        let garbage = b"Epoch 1/5 loss=0.3\n".repeat(4);
        assert!(matches!(read_frame::<FromTrainer>(&mut garbage.as_slice(), 100), Err(WireError::HeaderTooLong(_))));
        let mut unknown = Vec::new();
        write_frame(&mut unknown, &serde_json::json!({"type": "fit_result", "weights": [1]}), b"").expect("write");
        assert!(matches!(read_frame::<FromTrainer>(&mut unknown.as_slice(), 100), Err(WireError::Message(_))));
    }
}
