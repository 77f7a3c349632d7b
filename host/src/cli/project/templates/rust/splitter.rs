//! {{name}}: a splitter (split inference, edge, when the link changes): where to cut one ONNX
//! model between edge and cloud. As written it is Neurosurgeon's rule (ASPLOS 2017): every valid
//! cut, predicted as edge compute + transfer + RTT + cloud compute from the host's profile, best
//! first. The graph work is `nereid-onnx` (under .nereid/onnx). `nereid plugin build` builds it
//! and runs the slot's checks.
use nereid_onnx::{Link as OnnxLink, Message, Model, Profile};
use nereid_sdk::prelude::*;
use nereid_sdk::{CutPoint, Link};

#[derive(Default)]
struct Planner;

impl Plugin for Planner {
    fn info() -> Info {
        Info::new("{{name}}", env!("CARGO_PKG_VERSION"), "Cuts a model where the predicted latency is least")
    }
}

fn model(bytes: &[u8]) -> Result<Model, PluginError> {
    Model::decode(bytes).map_err(|e| PluginError::rejected(e.to_string()))
}

impl Splitter for Planner {
    fn plan(&mut self, bytes: &[u8], profile: &str, link: Link) -> Result<Vec<CutPoint>, PluginError> {
        let model = model(bytes)?;
        let profile: Profile =
            serde_json::from_str(profile).map_err(|e| PluginError::rejected(format!("profile: {e}")))?;
        let link = OnnxLink { bandwidth_mbit_s: link.bandwidth_mbit_s, rtt_ms: link.rtt_ms };
        let mut planned = Vec::new();
        for cut in model.cuts() {
            let p = profile.predict(&model, &cut, link).map_err(|e| PluginError::rejected(e.to_string()))?;
            planned.push(CutPoint { predicted_ms: p.total_ms(), tensors: p.cut });
        }
        planned.sort_by(|a, b| a.predicted_ms.total_cmp(&b.predicted_ms));
        Ok(planned)
    }

    fn partition(&mut self, bytes: &[u8], cut: &[String]) -> Result<(Vec<u8>, Vec<u8>), PluginError> {
        let part = model(bytes)?.partition(cut).map_err(|e| PluginError::rejected(e.to_string()))?;
        let encode = |m: Option<nereid_onnx::proto::ModelProto>| m.map(|m| m.encode_to_vec()).unwrap_or_default();
        Ok((encode(part.head), encode(part.tail)))
    }
}

nereid_sdk::export_splitter!(Planner);
