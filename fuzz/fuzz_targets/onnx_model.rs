//! ONNX models (the model store, switched versions, a split service's tails): decoding, the
//! cuts of the graph, a partition at each of the first cuts, and a latency prediction for it.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use nereid_onnx::{Link, Model, Profile};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::decode(data) else { return };
    let _ = model.runtime_inputs();
    let _ = model.with_all_outputs();
    let tensors = model.intermediate_tensors();
    let bytes: BTreeMap<String, u64> = tensors.iter().map(|t| (t.to_string(), 4)).collect();
    let nodes: BTreeMap<String, f64> = model.graph().node.iter().map(|n| (n.name.clone(), 1.0)).collect();
    let profile = Profile { edge_ms: nodes.clone(), cloud_ms: nodes, tensor_bytes: bytes };
    let link = Link { bandwidth_mbit_s: 10.0, rtt_ms: 4.0 };
    for cut in model.cuts().iter().take(8) {
        let _ = model.partition(cut);
        let _ = profile.predict(&model, cut, link);
    }
    let _ = model.partition(&tensors.iter().take(2).map(|t| t.to_string()).collect::<Vec<_>>());
});
