//! What a cut's latency is predicted from: per-node compute time on each side, the size of every
//! tensor, and the link.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Model, OnnxError};

/// Measured on one model (see `nereid model plan`): node names are those of [`Model`] (unnamed
/// nodes are named `<op_type>_<index>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Milliseconds per node on the edge.
    pub edge_ms: BTreeMap<String, f64>,
    /// Milliseconds per node in the cloud.
    pub cloud_ms: BTreeMap<String, f64>,
    /// Bytes of every tensor for one request (inputs, intermediates and outputs).
    pub tensor_bytes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub bandwidth_mbit_s: f64,
    pub rtt_ms: f64,
}

/// The predicted cost of one cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub cut: Vec<String>,
    pub edge_ms: f64,
    pub transfer_ms: f64,
    pub cloud_ms: f64,
    /// Bytes sent to the cloud (the cut tensors).
    pub upload_bytes: u64,
}

impl Prediction {
    pub fn total_ms(&self) -> f64 {
        self.edge_ms + self.transfer_ms + self.cloud_ms
    }
}

impl Profile {
    /// Edge compute of the head + (cut bytes up and output bytes back) / bandwidth + one round
    /// trip + cloud compute of the tail. A cut with no tail (edge-only) never touches the link.
    pub fn predict(&self, model: &Model, cut: &[String], link: Link) -> Result<Prediction, OnnxError> {
        let part = model.partition(cut)?;
        let sum =
            |nodes: &[String], times: &BTreeMap<String, f64>| nodes.iter().filter_map(|n| times.get(n)).sum::<f64>();
        let bytes = |tensors: Vec<&str>| -> Result<u64, OnnxError> {
            tensors.into_iter().try_fold(0u64, |acc, t| {
                self.tensor_bytes
                    .get(t)
                    .map(|b| acc + b)
                    .ok_or_else(|| OnnxError::Invalid(format!("the profile has no size for tensor `{t}`")))
            })
        };
        let upload_bytes = bytes(cut.iter().map(String::as_str).collect())?;
        let transfer_ms = if part.tail.is_none() {
            0.0
        } else {
            let down = bytes(model.outputs())?;
            let bits = (upload_bytes + down) as f64 * 8.0;
            bits / (link.bandwidth_mbit_s.max(1e-9) * 1e6) * 1e3 + link.rtt_ms
        };
        Ok(Prediction {
            cut: cut.to_vec(),
            edge_ms: sum(&part.head_nodes, &self.edge_ms),
            transfer_ms,
            cloud_ms: sum(&part.tail_nodes, &self.cloud_ms),
            upload_bytes: if part.tail.is_none() { 0 } else { upload_bytes },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{data_type, Dim, GraphProto, ModelProto, NodeProto, ValueInfoProto};

    #[test]
    fn prediction_adds_head_transfer_and_tail() {
        let t = |n: &str| ValueInfoProto::tensor(n, data_type::FLOAT, &[Dim::Fixed(1000)]);
        let graph = GraphProto {
            node: vec![NodeProto::new("Relu", "r1", &["x"], &["a"]), NodeProto::new("Relu", "r2", &["a"], &["y"])],
            input: vec![t("x")],
            output: vec![t("y")],
            value_info: vec![t("a")],
            ..Default::default()
        };
        let model = Model::new(ModelProto { graph: Some(graph), ..Default::default() }).expect("model");
        let profile = Profile {
            edge_ms: [("r1".to_string(), 4.0), ("r2".to_string(), 6.0)].into(),
            cloud_ms: [("r1".to_string(), 1.0), ("r2".to_string(), 1.5)].into(),
            tensor_bytes: [("x".to_string(), 4000), ("a".to_string(), 1000), ("y".to_string(), 500)].into(),
        };
        let link = Link { bandwidth_mbit_s: 1.0, rtt_ms: 2.0 };
        let mid = profile.predict(&model, &["a".to_string()], link).expect("cut a");
        assert_eq!((mid.edge_ms, mid.cloud_ms, mid.upload_bytes), (4.0, 1.5, 1000));
        // (1000 + 500) bytes * 8 / 1 Mbit/s = 12 ms, plus the round trip.
        assert!((mid.transfer_ms - 14.0).abs() < 1e-9);
        let edge_only = profile.predict(&model, &["y".to_string()], link).expect("cut y");
        assert_eq!((edge_only.total_ms(), edge_only.upload_bytes), (10.0, 0));
        let cloud_only = profile.predict(&model, &["x".to_string()], link).expect("cut x");
        assert!((cloud_only.total_ms() - (2.5 + 36.0 + 2.0)).abs() < 1e-9);
    }
}
