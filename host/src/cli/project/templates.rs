//! What `nereid plugin new` writes: the project's source from a template of its slot and
//! language, and, under `.nereid/`, the contract (WIT) and the SDK of the language, as this
//! binary was built with them, so the project builds without this repository.
use nereid::config::project::Language;
use nereid::runtime::Slot;

/// A file of a new project: its path in the project and its content.
pub type File = (String, String);

/// The contract, under `.nereid/wit/`.
const WIT: &[(&str, &str)] = &[
    ("nereid.wit", include_str!("../../../../wit/nereid.wit")),
    ("deps/wasi-nn/wasi-nn.wit", include_str!("../../../../wit/deps/wasi-nn/wasi-nn.wit")),
];

/// The Rust SDK's sources, under `.nereid/sdk/` (its Cargo.toml is written for the project).
const RUST_SDK: &[(&str, &str)] = &[
    ("build.rs", include_str!("../../../../sdk/build.rs")),
    ("src/lib.rs", include_str!("../../../../sdk/src/lib.rs")),
    ("src/config.rs", include_str!("../../../../sdk/src/config.rs")),
    ("src/dp.rs", include_str!("../../../../sdk/src/dp.rs")),
    ("src/export.rs", include_str!("../../../../sdk/src/export.rs")),
    ("src/fold.rs", include_str!("../../../../sdk/src/fold.rs")),
    ("src/model.rs", include_str!("../../../../sdk/src/model.rs")),
    ("src/nn.rs", include_str!("../../../../sdk/src/nn.rs")),
    ("src/plugin.rs", include_str!("../../../../sdk/src/plugin.rs")),
    ("src/random.rs", include_str!("../../../../sdk/src/random.rs")),
    ("src/round.rs", include_str!("../../../../sdk/src/round.rs")),
    ("src/server_opt.rs", include_str!("../../../../sdk/src/server_opt.rs")),
    ("src/state.rs", include_str!("../../../../sdk/src/state.rs")),
];

/// nereid-onnx's sources, under `.nereid/onnx/`, for a Rust splitter.
const ONNX_CRATE: &[(&str, &str)] = &[
    ("src/lib.rs", include_str!("../../../../onnx/src/lib.rs")),
    ("src/graph.rs", include_str!("../../../../onnx/src/graph.rs")),
    ("src/profile.rs", include_str!("../../../../onnx/src/profile.rs")),
    ("src/proto.rs", include_str!("../../../../onnx/src/proto.rs")),
];

const PYTHON_SDK: &[(&str, &str)] = &[
    ("nereid_plugin/__init__.py", include_str!("../../../../sdk/python/nereid_plugin/__init__.py")),
    ("nereid_plugin/random.py", include_str!("../../../../sdk/python/nereid_plugin/random.py")),
    ("nereid_plugin/nn.py", include_str!("../../../../sdk/python/nereid_plugin/nn.py")),
    ("nereid_plugin/onnx.py", include_str!("../../../../sdk/python/nereid_plugin/onnx.py")),
];

const JS_SDK: &str = include_str!("../../../../sdk/js/nereid-plugin.js");
const JS_NN: &str = include_str!("../../../../sdk/js/nereid-nn.js");
const JS_ONNX: &str = include_str!("../../../../sdk/js/nereid-onnx.js");

/// The `nereid:sdk` worlds (the inference slots with their wasi-nn imports), under
/// `.nereid/wit-nn/` with the contract and wasi-nn as its dependencies: what Python and
/// JavaScript routers and splitters build against.
const WIT_NN: &str = include_str!("../../../../sdk/wit-nn/nereid-sdk.wit");

/// Where a project's WIT is, for its toolchain.
pub fn wit_dir(language: Language, slot: Slot) -> &'static str {
    if language != Language::Rust && matches!(slot, Slot::Router | Slot::Splitter) {
        ".nereid/wit-nn"
    } else {
        ".nereid/wit"
    }
}

/// The crates the vendored SDK and nereid-onnx build with (the workspace's pins).
const WIT_BINDGEN: &str = "=0.61.1";
const ONNX_DEPENDENCIES: &str = concat!(
    "prost = { version = \"0.14\", default-features = false, features = [\"std\", \"derive\"] }\n",
    "thiserror = \"2.0\"\n",
    "serde = { version = \"1.0\", features = [\"derive\"] }\n",
);

/// The template of `slot` in `language`.
fn source(language: Language, slot: Slot) -> &'static str {
    match (language, slot) {
        (Language::Rust, Slot::Aggregator) => include_str!("templates/rust/aggregator.rs"),
        (Language::Rust, Slot::ClientObjective) => include_str!("templates/rust/client-objective.rs"),
        (Language::Rust, Slot::Sampler) => include_str!("templates/rust/sampler.rs"),
        (Language::Rust, Slot::Compressor) => include_str!("templates/rust/compressor.rs"),
        (Language::Rust, Slot::Router) => include_str!("templates/rust/router.rs"),
        (Language::Rust, Slot::Adapter) => include_str!("templates/rust/adapter.rs"),
        (Language::Rust, Slot::Splitter) => include_str!("templates/rust/splitter.rs"),
        (Language::Python, Slot::Aggregator) => include_str!("templates/python/aggregator.py"),
        (Language::Python, Slot::ClientObjective) => include_str!("templates/python/client-objective.py"),
        (Language::Python, Slot::Sampler) => include_str!("templates/python/sampler.py"),
        (Language::Python, Slot::Compressor) => include_str!("templates/python/compressor.py"),
        (Language::Python, Slot::Adapter) => include_str!("templates/python/adapter.py"),
        (Language::Python, Slot::Router) => include_str!("templates/python/router.py"),
        (Language::Python, Slot::Splitter) => include_str!("templates/python/splitter.py"),
        (Language::Javascript, Slot::Router) => include_str!("templates/javascript/router.js"),
        (Language::Javascript, Slot::Splitter) => include_str!("templates/javascript/splitter.js"),
        (Language::Javascript, Slot::Aggregator) => include_str!("templates/javascript/aggregator.js"),
        (Language::Javascript, Slot::ClientObjective) => include_str!("templates/javascript/client-objective.js"),
        (Language::Javascript, Slot::Sampler) => include_str!("templates/javascript/sampler.js"),
        (Language::Javascript, Slot::Compressor) => include_str!("templates/javascript/compressor.js"),
        (Language::Javascript, Slot::Adapter) => include_str!("templates/javascript/adapter.js"),
    }
}

/// Every file of a new project named `name`.
pub fn project(name: &str, slot: Slot, language: Language) -> Vec<File> {
    let code = source(language, slot).replace("{{name}}", name);
    let mut files: Vec<File> = vec![
        (
            "plugin.toml".into(),
            format!(
                "# A nereid plugin project: `nereid plugin build` builds it into {name}.wasm and runs the\n\
                 # checks of its slot (`nereid plugin test`).\n\
                 name = \"{name}\"\n\
                 slot = \"{slot}\"\n\
                 language = \"{language}\"\n\
                 world = \"{world}\"\n\n\
                 # The plugin's options for the checks, as a job would set them (e.g. mu = 0.1).\n\
                 [config]\n",
                slot = slot.name(),
                language = language.name(),
                world = slot.world(),
            ),
        ),
        (".gitignore".into(), "/target/\n/*.wasm\n__pycache__/\n".into()),
    ];
    files.extend(WIT.iter().map(|(path, text)| (format!(".nereid/wit/{path}"), text.to_string())));
    if wit_dir(language, slot) == ".nereid/wit-nn" {
        files.push((".nereid/wit-nn/nereid-sdk.wit".into(), WIT_NN.to_string()));
        files.extend(WIT.iter().map(|(path, text)| {
            let path = if *path == "nereid.wit" { "deps/nereid-plugin/nereid.wit" } else { path };
            (format!(".nereid/wit-nn/{path}"), text.to_string())
        }));
    }
    match language {
        Language::Rust => {
            files.push(("src/lib.rs".into(), code));
            let onnx = if slot == Slot::Splitter {
                files.push((
                    ".nereid/onnx/Cargo.toml".into(),
                    format!(
                        "[package]\nname = \"nereid-onnx\"\nversion = \"{}\"\nedition = \"2021\"\npublish = false\n\n\
                         [dependencies]\n{ONNX_DEPENDENCIES}",
                        env!("CARGO_PKG_VERSION")
                    ),
                ));
                files.extend(ONNX_CRATE.iter().map(|(path, text)| (format!(".nereid/onnx/{path}"), text.to_string())));
                "nereid-onnx = { path = \".nereid/onnx\" }\nserde_json = \"1.0\"\n"
            } else {
                ""
            };
            files.push((
                "Cargo.toml".into(),
                format!(
                    "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
                     [lib]\ncrate-type = [\"cdylib\"]\n\n\
                     [dependencies]\nnereid-sdk = {{ path = \".nereid/sdk\" }}\n{onnx}\n\
                     [profile.release]\nstrip = true\n\n\
                     # A project of its own, also inside another workspace.\n[workspace]\n"
                ),
            ));
            files.push((
                ".nereid/sdk/Cargo.toml".into(),
                format!(
                    "[package]\nname = \"nereid-sdk\"\nversion = \"{version}\"\nedition = \"2021\"\n\
                     description = \"Write nereid plugins as WebAssembly components (the SDK of nereid {version})\"\n\
                     build = \"build.rs\"\npublish = false\n\n\
                     [dependencies]\nwit-bindgen = \"{WIT_BINDGEN}\"\n",
                    version = env!("CARGO_PKG_VERSION"),
                ),
            ));
            files.extend(RUST_SDK.iter().map(|(path, text)| (format!(".nereid/sdk/{path}"), text.to_string())));
        }
        Language::Python => {
            files.push(("app.py".into(), code));
            files.extend(PYTHON_SDK.iter().map(|(path, text)| (format!(".nereid/python/{path}"), text.to_string())));
        }
        Language::Javascript => {
            let code = code
                .replace("{{sdk}}", "./.nereid/nereid-plugin.js")
                .replace("{{nn}}", "./.nereid/nereid-nn.js")
                .replace("{{onnx}}", "./.nereid/nereid-onnx.js");
            files.push(("app.js".into(), code));
            files.push((".nereid/nereid-plugin.js".into(), JS_SDK.to_string()));
            files.push((".nereid/nereid-nn.js".into(), JS_NN.to_string()));
            files.push((".nereid/nereid-onnx.js".into(), JS_ONNX.to_string()));
        }
    }
    files
}
