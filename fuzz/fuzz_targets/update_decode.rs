//! Updates through a compressor as the cloud decodes them: the upload's safetensors, the
//! quantize plugin's `decode` (int8 and top-k payloads) in its sandbox, then the decoded
//! difference checked against the job's model and added to the global model
//! (`cloud::decompress_update`). The first byte picks the round.
#![no_main]
use std::cell::RefCell;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nereid::runtime::{CompressorPlugin, Limits, RoundContext};
use nereid::tensor::{DType, Tensor};
use nereid::train::ModelSpec;

struct Fixture {
    plugin: CompressorPlugin,
    model: ModelSpec,
    global: nereid::model_io::NamedTensors,
}

thread_local! {
    static FIXTURE: RefCell<Fixture> = RefCell::new({
        // Each process loads its plugin once: no compile cache.
        let runtime = nereid::runtime::Runtime::new(None).expect("the plugin runtime");
        let plugin =
            CompressorPlugin::load(&runtime, &nereid_fuzz::plugin("quantize"), Limits::default(), &Default::default())
                .expect("the quantize plugin");
        // The seeds' model: 8 features, 2 classes (`dense.0.weight` [2, 8], `dense.0.bias` [2]).
        let model = ModelSpec::Mlp { inputs: 8, hidden: vec![], classes: 2 };
        let global = model
            .parameters()
            .into_iter()
            .map(|(name, shape)| (name, Tensor::zeros(DType::F32, shape).expect("a small tensor")))
            .collect();
        Fixture { plugin, model, global }
    });
}

// Compiling the plugin takes seconds: done before the first input, so that libFuzzer does not
// time it as that input's run (it reported it as a slow unit).
fuzz_target!(init: FIXTURE.with(|_| ()), |data: &[u8]| {
    let Some((&round, body)) = data.split_first() else { return };
    let Ok(payload) = nereid::model_io::decode(body, Path::new("upload.safetensors")) else { return };
    let ctx = RoundContext { job: "fuzz".into(), round: round.into(), seed: 7 };
    FIXTURE.with_borrow_mut(|f| {
        let _ = nereid::cloud::decompress_update(&mut f.plugin, &ctx, &payload, "fuzz", &f.model, &f.global);
    });
});
