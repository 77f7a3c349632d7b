//! The plugin contract as a WIT package: published to the embedded registry in the layout `wkg`
//! uses and fetched back with `wkg get`; and the host's rule for plugins built against another
//! version of it.
use std::path::Path;
use std::process::Command;

use nereid::runtime::{PluginError, CONTRACT_VERSION};

use crate::cluster::http;
use crate::common::*;
use crate::oci::{embedded, wkg};

fn wkg_ok(args: &[&str]) -> String {
    let out = Command::new(wkg()).args(args).output().expect("run wkg");
    assert!(out.status.success(), "wkg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A copy of `wit/` (wkg writes a lock file beside the WIT it builds), its version replaced.
fn wit_copy(dir: &Path, version: &str) -> std::path::PathBuf {
    let to = dir.join(format!("wit-{version}"));
    let status = Command::new("cp").arg("-r").arg(root().join("wit")).arg(&to).status().expect("cp");
    assert!(status.success());
    let file = to.join("nereid.wit");
    let text = std::fs::read_to_string(&file).expect("wit");
    let line = format!("package nereid:plugin@{CONTRACT_VERSION};");
    assert!(text.contains(&line), "wit/nereid.wit declares the host's contract version {CONTRACT_VERSION}");
    std::fs::write(&file, text.replace(&line, &format!("package nereid:plugin@{version};"))).expect("write");
    to
}

#[test]
fn the_contract_round_trips_through_wkg_from_the_embedded_registry() {
    let reg = embedded(None, false);
    let h = reg.host.clone();
    let dir = tempfile::tempdir().expect("tmp");
    let wit = wit_copy(dir.path(), CONTRACT_VERSION);
    let config = dir.path().join("wkg.toml");
    std::fs::write(
        &config,
        format!(
            "[namespace_registries]\nnereid = {{ registry = \"{h}\", metadata = {{ preferredProtocol = \"oci\", \
             \"oci\" = {{ registry = \"{h}\", namespacePrefix = \"contracts/\" }} }} }}\n\n\
             [registry.\"{h}\"]\ntype = \"oci\"\n[registry.\"{h}\".oci]\nprotocol = \"http\"\n"
        ),
    )
    .expect("config");
    let (config, cache) = (config.display().to_string(), dir.path().join("wkg-cache").display().to_string());
    let package = dir.path().join("package.wasm").display().to_string();
    wkg_ok(&["build", "-d", &wit.display().to_string(), "-o", &package, "--config", &config, "--cache", &cache]);
    wkg_ok(&["publish", &package, "--config", &config, "--cache", &cache]);
    let fetched = dir.path().join("fetched.wasm");
    let spec = format!("nereid:plugin@{CONTRACT_VERSION}");
    let fresh_cache = dir.path().join("fresh-cache").display().to_string();
    let got = |out: &Path, format: &str| {
        wkg_ok(&[
            "get",
            &spec,
            "-o",
            &out.display().to_string(),
            "--format",
            format,
            "--config",
            &config,
            "--cache",
            &fresh_cache,
        ])
    };
    got(&fetched, "wasm");
    assert_eq!(std::fs::read(&fetched).expect("fetched"), std::fs::read(&package).expect("package"));
    let text = dir.path().join("fetched.wit");
    got(&text, "wit");
    let wit_text = std::fs::read_to_string(&text).expect("wit text");
    assert!(wit_text.contains(&format!("package nereid:plugin@{CONTRACT_VERSION};")), "{wit_text}");
    for world in
        ["aggregator-plugin", "client-objective-plugin", "sampler-plugin", "compressor-plugin", "adapter-plugin"]
    {
        assert!(wit_text.contains(&format!("world {world}")), "{world} in {wit_text}");
    }
    // It is stored where the layout says: <prefix><namespace>/<name>:<version>.
    let (code, _) =
        http("GET", &format!("http://{h}/v2/contracts/nereid/plugin/manifests/{CONTRACT_VERSION}"), None, Vec::new());
    assert_eq!(code, 200);
}

/// A plugin built against an older or a newer contract is refused when it is loaded (and by
/// `plugin inspect`) with both versions named; one built against this version loads.
#[test]
fn a_plugin_built_against_another_contract_version_is_refused_naming_both() {
    let dir = tempfile::tempdir().expect("tmp");
    let componentize = venv_python("py-plugin", "componentize-py").with_file_name("componentize-py");
    let (rt, _cache) = runtime();
    for version in ["0.0.9", "0.2.0", CONTRACT_VERSION] {
        let wit = wit_copy(dir.path(), version);
        let out = dir.path().join(format!("fedavg-{version}.wasm"));
        let built = Command::new(&componentize)
            .arg("-d")
            .arg(&wit)
            .args(["-w", "aggregator-plugin", "componentize", "-p"])
            .arg(root().join("plugins/fedavg-py"))
            .arg("-p")
            .arg(root().join("sdk/python"))
            .args(["app", "-o"])
            .arg(&out)
            .output()
            .expect("componentize-py");
        assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
        match rt.load_file(&out) {
            Ok(loaded) if version == CONTRACT_VERSION => assert_eq!(loaded.slots.len(), 1),
            Ok(_) => panic!("a plugin of contract {version} loaded"),
            Err(e @ PluginError::Contract { .. }) if version != CONTRACT_VERSION => {
                let message = e.to_string();
                assert!(
                    message.contains(&format!("nereid:plugin@{version}"))
                        && message.contains(&format!("this host speaks nereid:plugin@{CONTRACT_VERSION}")),
                    "{message}"
                );
                let inspect = Command::new(env!("CARGO_BIN_EXE_nereid"))
                    .args(["plugin", "inspect"])
                    .arg(&out)
                    .output()
                    .expect("nereid");
                assert!(!inspect.status.success());
                assert!(String::from_utf8_lossy(&inspect.stderr).contains(&format!("nereid:plugin@{version}")));
            }
            Err(e) => panic!("contract {version}: {e}"),
        }
    }
}
