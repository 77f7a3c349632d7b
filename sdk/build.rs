//! Bakes the WIT contract into `__nereid_generate!`, so a plugin crate generates the bindings for
//! its own world's exports without a path to `wit/` and without depending on wit-bindgen itself.
//! (wit-bindgen's cross-crate export macros cannot be used here: two worlds of one crate that
//! export the same interface would define the same `#[macro_export]` name.)
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let wit = manifest.join("../wit/nereid.wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    let text = fs::read_to_string(&wit).unwrap_or_else(|e| panic!("reading {}: {e}", wit.display()));
    assert!(!text.contains("\"####"), "nereid.wit may not contain the raw-string terminator");
    let generated = format!(
        r#####"
/// Generates, in the calling crate, the export bindings of one nereid world. The imports are
/// mapped to the SDK's own bindings so every plugin shares the SDK's `Tensor` and value types.
#[doc(hidden)]
#[macro_export]
macro_rules! __nereid_generate {{
    ($world:tt) => {{
        ::nereid_sdk::__wit_bindgen::generate!({{
            inline: r####"{text}"####,
            world: $world,
            runtime_path: "::nereid_sdk::__wit_bindgen::rt",
            with: {{
                "nereid:plugin/types@0.1.0": ::nereid_sdk::bindings::nereid::plugin::types,
                "nereid:plugin/tensors@0.1.0": ::nereid_sdk::bindings::nereid::plugin::tensors,
                "nereid:plugin/model@0.1.0": ::nereid_sdk::bindings::nereid::plugin::model,
                "nereid:plugin/host@0.1.0": ::nereid_sdk::bindings::nereid::plugin::host,
            }},
        }});
    }};
}}
"#####
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("generate.rs");
    fs::write(&out, generated).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
