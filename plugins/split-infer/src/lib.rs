//! Split inference (Neurosurgeon, ASPLOS 2017): one model cut between edge and cloud where the
//! predicted end-to-end latency is least, for the link as measured now.
//!
//! `plan` enumerates the valid cuts of the model (for each prefix of its nodes in topological
//! order, the tensors the rest still needs: the first is cloud-only, the last edge-only) and
//! predicts each one's latency as
//!
//! ```text
//! edge compute(head) + (cut bytes + output bytes) * 8 / bandwidth + RTT + cloud compute(tail)
//! ```
//!
//! from per-node times the host profiled on each side. The edge-only cut never uses the link.
//! `partition` writes the head and tail ONNX models of a cut, and refuses a cut that does not
//! separate the inputs from the outputs (e.g. one branch of a residual block).
use nereid_onnx::{Link as OnnxLink, Model, Profile};
use nereid_sdk::prelude::*;
use nereid_sdk::{CutPoint, Link};

#[derive(Default)]
struct SplitInfer {
    allow_edge_only: bool,
    allow_cloud_only: bool,
    max_upload_bytes: Option<u64>,
}

impl Plugin for SplitInfer {
    fn info() -> Info {
        Info::new("split-infer", "0.1.0", "Cuts one ONNX model between edge and cloud at the least predicted latency")
            .boolean("allow_edge_only", Some(true), "whether running the whole model on the edge is a candidate")
            .boolean("allow_cloud_only", Some(true), "whether sending the raw input to the cloud is a candidate")
            .integer("max_upload_kib", Some(0), "skip cuts that send more than this per request (0: no limit)")
    }

    fn configure(&mut self, config: &Config) -> Result<(), PluginError> {
        self.allow_edge_only = config.bool("allow_edge_only")?;
        self.allow_cloud_only = config.bool("allow_cloud_only")?;
        let max = config.i64("max_upload_kib")?;
        if max < 0 {
            return Err(PluginError::invalid_config("max_upload_kib", "must be 0 (no limit) or more"));
        }
        self.max_upload_bytes = (max > 0).then_some(max as u64 * 1024);
        Ok(())
    }
}

fn model(bytes: &[u8]) -> Result<Model, PluginError> {
    Model::decode(bytes).map_err(|e| PluginError::rejected(e.to_string()))
}

impl Splitter for SplitInfer {
    fn plan(&mut self, bytes: &[u8], profile: &str, link: Link) -> Result<Vec<CutPoint>, PluginError> {
        if !(link.bandwidth_mbit_s > 0.0 && link.rtt_ms >= 0.0) {
            return Err(PluginError::rejected(format!(
                "link: bandwidth must be > 0 and RTT >= 0 (got {} Mbit/s, {} ms)",
                link.bandwidth_mbit_s, link.rtt_ms
            )));
        }
        let model = model(bytes)?;
        let profile: Profile =
            serde_json::from_str(profile).map_err(|e| PluginError::rejected(format!("profile: {e}")))?;
        let link = OnnxLink { bandwidth_mbit_s: link.bandwidth_mbit_s, rtt_ms: link.rtt_ms };
        let cuts = model.cuts();
        let last = cuts.len().saturating_sub(1);
        let mut planned = Vec::new();
        for (i, cut) in cuts.into_iter().enumerate() {
            if (i == 0 && !self.allow_cloud_only) || (i == last && !self.allow_edge_only) {
                continue;
            }
            let p = profile.predict(&model, &cut, link).map_err(|e| PluginError::rejected(e.to_string()))?;
            if self.max_upload_bytes.is_some_and(|max| p.upload_bytes > max) {
                continue;
            }
            planned.push(CutPoint { predicted_ms: p.total_ms(), tensors: p.cut });
        }
        if planned.is_empty() {
            return Err(PluginError::rejected("no cut satisfies the configuration"));
        }
        // Stable: among equal predictions the earlier cut (less edge work) comes first.
        planned.sort_by(|a, b| a.predicted_ms.total_cmp(&b.predicted_ms));
        Ok(planned)
    }

    fn partition(&mut self, bytes: &[u8], cut: &[String]) -> Result<(Vec<u8>, Vec<u8>), PluginError> {
        use nereid_onnx::Message;
        let part = model(bytes)?.partition(cut).map_err(|e| PluginError::rejected(e.to_string()))?;
        let encode = |m: Option<nereid_onnx::proto::ModelProto>| m.map(|m| m.encode_to_vec()).unwrap_or_default();
        Ok((encode(part.head), encode(part.tail)))
    }
}

nereid_sdk::export_splitter!(SplitInfer);
