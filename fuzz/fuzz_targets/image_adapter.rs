//! Image request bodies as the edge reads them for a service with an adapter: the image-adapter
//! plugin decodes PNG or JPEG in its sandbox into the model's input, which the host then checks
//! (`edge::services::adapt`). The first byte picks the content type, the model's input (fixed
//! or open sizes, grey or RGB) and the plugin's layout.
#![no_main]
use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use nereid::runtime::bindings::types::Dtype;
use nereid::runtime::{AdapterPlugin, InputSpec, Limits};

const TYPES: [&str; 3] = ["image/png", "image/jpeg", "image/gif"];

/// The inputs a model may declare, in NCHW (NHWC is the same dimensions moved).
const SHAPES: [[Option<u64>; 4]; 4] = [
    [Some(1), Some(3), Some(8), Some(8)],
    [Some(1), Some(1), Some(16), Some(16)],
    [Some(1), Some(3), None, None],
    [None, Some(1), Some(4), None],
];

thread_local! {
    static ADAPTERS: RefCell<[AdapterPlugin; 2]> = RefCell::new({
        // Each process loads its plugin once: no compile cache.
        let runtime = nereid::runtime::Runtime::new(None).expect("the plugin runtime");
        let path = nereid_fuzz::plugin("image-adapter");
        [("nchw", "0.5,0.4,0.3", "0.25"), ("nhwc", "0", "1")].map(|(layout, mean, std)| {
            let config = [("layout", layout), ("mean", mean), ("std", std)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), toml::Value::String(v.into())))
                .collect();
            AdapterPlugin::load(&runtime, &path, Limits::default(), &config).expect("the image-adapter plugin")
        })
    });
}

// Compiling the plugin takes seconds: done before the first input, so that libFuzzer does not
// time it as that input's run (it reported it as a slow unit).
fuzz_target!(init: ADAPTERS.with(|_| ()), |data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let content_type = TYPES[pick as usize % TYPES.len()];
    let nhwc = pick & 0x80 != 0;
    let mut shape = SHAPES[(pick as usize / TYPES.len()) % SHAPES.len()].to_vec();
    if nhwc {
        shape = vec![shape[0], shape[2], shape[3], shape[1]];
    }
    let inputs = [InputSpec { name: "image".into(), dtype: Dtype::F32, shape }];
    ADAPTERS.with_borrow_mut(|adapters| {
        let _ = nereid::edge::services::adapt(&mut adapters[usize::from(nhwc)], content_type, body, &inputs);
    });
});
