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
    ("src/export.rs", include_str!("../../../../sdk/src/export.rs")),
    ("src/fold.rs", include_str!("../../../../sdk/src/fold.rs")),
    ("src/model.rs", include_str!("../../../../sdk/src/model.rs")),
    ("src/nn.rs", include_str!("../../../../sdk/src/nn.rs")),
    ("src/plugin.rs", include_str!("../../../../sdk/src/plugin.rs")),
    ("src/random.rs", include_str!("../../../../sdk/src/random.rs")),
];

const PYTHON_SDK: &[(&str, &str)] = &[
    ("nereid_plugin/__init__.py", include_str!("../../../../sdk/python/nereid_plugin/__init__.py")),
    ("nereid_plugin/random.py", include_str!("../../../../sdk/python/nereid_plugin/random.py")),
];

const JS_SDK: &str = include_str!("../../../../sdk/js/nereid-plugin.js");

/// The wit-bindgen the Rust SDK is built with (the workspace's pin).
const WIT_BINDGEN: &str = "=0.61.1";

/// The template of `slot` in `language`, or why there is none.
fn source(language: Language, slot: Slot) -> Result<&'static str, String> {
    let found = match (language, slot) {
        (Language::Rust, Slot::Aggregator) => Some(include_str!("templates/rust/aggregator.rs")),
        (Language::Rust, Slot::ClientObjective) => Some(include_str!("templates/rust/client-objective.rs")),
        (Language::Rust, Slot::Sampler) => Some(include_str!("templates/rust/sampler.rs")),
        (Language::Rust, Slot::Compressor) => Some(include_str!("templates/rust/compressor.rs")),
        (Language::Rust, Slot::Router) => Some(include_str!("templates/rust/router.rs")),
        (Language::Rust, Slot::Adapter) => Some(include_str!("templates/rust/adapter.rs")),
        (Language::Python, Slot::Aggregator) => Some(include_str!("templates/python/aggregator.py")),
        (Language::Python, Slot::ClientObjective) => Some(include_str!("templates/python/client-objective.py")),
        (Language::Python, Slot::Sampler) => Some(include_str!("templates/python/sampler.py")),
        (Language::Python, Slot::Compressor) => Some(include_str!("templates/python/compressor.py")),
        (Language::Python, Slot::Adapter) => Some(include_str!("templates/python/adapter.py")),
        (Language::Javascript, Slot::Aggregator) => Some(include_str!("templates/javascript/aggregator.js")),
        (Language::Javascript, Slot::ClientObjective) => Some(include_str!("templates/javascript/client-objective.js")),
        (Language::Javascript, Slot::Sampler) => Some(include_str!("templates/javascript/sampler.js")),
        (Language::Javascript, Slot::Compressor) => Some(include_str!("templates/javascript/compressor.js")),
        (Language::Javascript, Slot::Adapter) => Some(include_str!("templates/javascript/adapter.js")),
        _ => None,
    };
    found.ok_or_else(|| match slot {
        Slot::Splitter => "no template for the splitter slot yet: start from plugins/split-infer (Rust)".to_string(),
        _ => format!(
            "no {} template for the {} slot: its `runner` export needs wasi-nn bindings, which only the Rust SDK \
             has so far (use --lang rust)",
            language.name(),
            slot.name()
        ),
    })
}

/// Every file of a new project named `name`.
pub fn project(name: &str, slot: Slot, language: Language) -> Result<Vec<File>, String> {
    let code = source(language, slot)?.replace("{{name}}", name);
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
    match language {
        Language::Rust => {
            files.push(("src/lib.rs".into(), code));
            files.push((
                "Cargo.toml".into(),
                format!(
                    "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
                     [lib]\ncrate-type = [\"cdylib\"]\n\n\
                     [dependencies]\nnereid-sdk = {{ path = \".nereid/sdk\" }}\n\n\
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
            files.push(("app.js".into(), code.replace("{{sdk}}", "./.nereid/nereid-plugin.js")));
            files.push((".nereid/nereid-plugin.js".into(), JS_SDK.to_string()));
        }
    }
    Ok(files)
}
