//! Developer tasks. `cargo xtask demo` and `cargo xtask test` are the README's two commands: each
//! does its own idempotent setup (the wasm32-wasip2 target, the plugin components) first.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod deps;

const USAGE: &str = "usage: cargo xtask <setup|plugins|demo|test|bench|deps> [-- extra arguments]

  setup     install what is missing: the wasm32-wasip2 Rust target, the Debian packages the
            build needs (libssl-dev, pkg-config), ONNX Runtime's shared library from the
            `onnxruntime` PyPI wheel (into target/onnxruntime/) and OpenVINO's runtime from the
            `openvino` wheel (into target/openvino/)
  plugins   setup, then build every plugin and test fixture into target/wasm32-wasip2/plugin/
            (Rust ones with cargo, Python ones with componentize-py from PyPI in target/py-plugin,
            JavaScript ones with componentize-js from npm in target/js-plugin)
  demo      plugins, then run `nereid demo` (extra arguments are passed on, e.g. -- --json)
  test      plugins and the test tools (Debian's docker-registry, apache2-utils, mosquitto,
            mosquitto-clients, podman, skopeo, iproute2 and e2fsprogs; kubectl: Debian's
            kubernetes-client unless one is installed; `cargo install wkg`, the `onnx` Python package, Python
            environments: target/py-k8s (kubernetes-validate), and with clients/python target/py
            (numpy, safetensors) and target/py-torch (PyTorch 2.15 with only the libraries it
            loads, onnx)), then run the whole test suite (cargo test --release)
  bench     plugins, then run `nereid bench aggregate` (extra arguments are passed on)
  deps      check that no import circle joins the host's modules (see `deps` below); `test`
            runs it first";

/// Debian packages the build needs (oci-client's TLS through OpenSSL, like wkg).
const BUILD_PACKAGES: &[&str] = &["libssl-dev", "pkg-config"];
/// Debian packages the tests need: a real OCI registry and htpasswd for its basic auth, an MQTT
/// broker and its command-line publisher, podman and skopeo to build, push and pull the
/// container image, iproute2 for the network-namespace fleet, and e2fsprogs for a state disk
/// that turns read-only under a running cloud.
const TEST_PACKAGES: &[&str] = &[
    "docker-registry",
    "apache2-utils",
    "mosquitto",
    "mosquitto-clients",
    "podman",
    "skopeo",
    "iproute2",
    "e2fsprogs",
];
/// The ONNX Runtime the `ort` crate (2.0.0-rc.10) is built for, from its PyPI wheel.
const ONNXRUNTIME_VERSION: &str = "1.22.1";
/// The OpenVINO whose runtime (`libopenvino_c.so` and its CPU plugin) comes from its PyPI wheel:
/// the second wasi-nn backend.
const OPENVINO_VERSION: &str = "2026.4.1";
/// Its libraries' soname suffix (2026.4.1 -> 2641).
const OPENVINO_SONAME: &str = "2641";
/// The `onnx` Python package the inference tests build their ONNX models with.
const ONNX_PYTHON_VERSION: &str = "1.17.0";
/// The Python packages of the environment the external-trainer tests run their trainers in
/// (target/py), besides clients/python itself.
const TRAINER_PYTHON_PACKAGES: &[&str] = &["numpy==2.4.6", "safetensors==0.8.0"];
/// target/py-torch, for the PyTorch example's test: torch from PyPI without what a CPU does not
/// need (triton, the CUDA toolkit's headers and tools) but with the CUDA libraries `import torch`
/// loads; then its pure-Python dependencies, onnx for `torch.onnx.export`, and the trainer's.
const TORCH_PACKAGES_NO_DEPS: &[&str] = &[
    "torch==2.15.0",
    "nvidia-cublas==13.4.1.3",
    "nvidia-cuda-nvrtc==13.2.86",
    "nvidia-cuda-runtime==13.2.86",
    "nvidia-cuda-cupti==13.2.86",
    "nvidia-cudnn-cu13==9.26.0.51",
    "nvidia-cufft==12.2.0.57",
    "nvidia-cufile==1.17.1.22",
    "nvidia-cusolver==12.2.0.11",
    "nvidia-cusparse==12.7.10.12",
    "nvidia-cusparselt-cu13==0.8.1",
    "nvidia-nccl-cu13==2.30.7",
    "nvidia-nvjitlink==13.5.37",
    "nvidia-nvshmem-cu13==3.7.2",
];
const TORCH_PACKAGES: &[&str] = &[
    "filelock",
    "typing-extensions",
    "sympy",
    "networkx",
    "jinja2",
    "fsspec",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "onnx==1.17.0",
];
/// The validator the manifests under deploy/kubernetes are checked with (target/py-k8s), and the
/// Kubernetes version they are checked against.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The wkg the interop tests run against.
const WKG_VERSION: &str = "0.16.1";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((t, r)) => (t.as_str(), r.iter().filter(|a| *a != "--").cloned().collect::<Vec<_>>()),
        None => {
            eprintln!("{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    let result = match task {
        "setup" => setup(),
        "plugins" => plugins(),
        "demo" => plugins()
            .and_then(|()| cargo(&[&["run", "--release", "-p", "nereid", "--", "demo"], &strs(&rest)[..]].concat())),
        "deps" => deps::check(&root().join("host/src")).map(|report| println!("{report}")),
        "test" => deps::check(&root().join("host/src"))
            .map(drop)
            .and_then(|()| plugins())
            .and_then(|()| test_tools())
            .and_then(|()| cargo(&[&["test", "--release"], &strs(&rest)[..]].concat())),
        "bench" => plugins().and_then(|()| {
            cargo(&[&["run", "--release", "-p", "nereid", "--", "bench", "aggregate"], &strs(&rest)[..]].concat())
        }),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown task `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd.current_dir(root()).status().map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed: {status}"))
    }
}

fn cargo(args: &[&str]) -> Result<(), String> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

fn setup() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| format!("rustup is needed to add the wasm32-wasip2 target: {e}"))?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == "wasm32-wasip2") {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))?;
    }
    debian_packages(BUILD_PACKAGES)?;
    onnxruntime()?;
    openvino()
}

/// Where the setup puts ONNX Runtime's shared library (the host finds it there, next to its
/// own target directory).
fn onnxruntime_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    target.join("onnxruntime")
}

/// Fetches `libonnxruntime.so` from the `onnxruntime` wheel on PyPI (pip download; the wheel is
/// a zip) unless it is there already. Debian has no package of it.
fn onnxruntime() -> Result<(), String> {
    let dir = onnxruntime_dir();
    let versioned = format!("libonnxruntime.so.{ONNXRUNTIME_VERSION}");
    if dir.join(&versioned).is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let wheels = dir.join("wheel");
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d"])
        .arg(&wheels)
        .arg(format!("onnxruntime=={ONNXRUNTIME_VERSION}")))?;
    let extract = format!(
        "import glob, sys, zipfile\n\
         wheel = glob.glob(sys.argv[1] + '/onnxruntime-{ONNXRUNTIME_VERSION}-*.whl')[0]\n\
         data = zipfile.ZipFile(wheel).read('onnxruntime/capi/{versioned}')\n\
         open(sys.argv[2], 'wb').write(data)\n"
    );
    let tmp = dir.join(format!("{versioned}.part"));
    run(Command::new("python3").args(["-c", &extract]).arg(&wheels).arg(&tmp))?;
    std::fs::rename(&tmp, dir.join(&versioned)).map_err(|e| format!("{}: {e}", dir.display()))?;
    for link in ["libonnxruntime.so.1", "libonnxruntime.so"] {
        let path = dir.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&versioned, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(())
}

/// Fetches OpenVINO's runtime from the `openvino` wheel on PyPI into target/openvino/: the C
/// API, the core, the ONNX and IR front ends, the CPU plugin and TBB (not the GPU and NPU
/// plugins: no such device here). The libraries find each other through their `$ORIGIN` rpath.
fn openvino() -> Result<(), String> {
    let dir = onnxruntime_dir().with_file_name("openvino");
    let c_api = format!("libopenvino_c.so.{OPENVINO_SONAME}");
    if dir.join("libopenvino_c.so").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let wheels = dir.join("wheel");
    // The libraries are the same in every CPython build of the wheel; naming one makes the
    // download the same whatever python3 runs pip.
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11"])
        .args(["--platform", "manylinux_2_28_x86_64", "-d"])
        .arg(&wheels)
        .arg(format!("openvino=={OPENVINO_VERSION}")))?;
    let extract = format!(
        "import glob, os, sys, zipfile\n\
         wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + '/openvino-{OPENVINO_VERSION}-*.whl')[0])\n\
         wanted = ('libopenvino.so.', 'libopenvino_c.so.', 'libopenvino_onnx_frontend.so.', 'libopenvino_ir_frontend.so.',\n\
                   'libopenvino_intel_cpu_plugin.so', 'libopenvino_auto_plugin.so', 'libtbb', 'libhwloc')\n\
         for name in wheel.namelist():\n\
         \x20   base = os.path.basename(name)\n\
         \x20   if name.startswith('openvino/libs/') and base.startswith(wanted):\n\
         \x20       open(os.path.join(sys.argv[2], base), 'wb').write(wheel.read(name))\n"
    );
    run(Command::new("python3").args(["-c", &extract]).arg(&wheels).arg(&dir))?;
    for (link, target) in [("libopenvino.so", format!("libopenvino.so.{OPENVINO_SONAME}")), ("libopenvino_c.so", c_api)]
    {
        let path = dir.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&target, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(())
}

/// Installs the Debian packages of `wanted` that are missing (apt-get; as root or through sudo).
fn debian_packages(wanted: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| {
        let mut cmd = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    let install = [&["install", "-y", "--no-install-recommends"][..], &missing].concat();
    // A fresh machine may have no package lists yet.
    apt(&install).or_else(|_| apt(&["update"]).and_then(|()| apt(&install)))
}

/// The tools the test suite drives: a real registry, htpasswd, and wkg for the interop tests.
fn test_tools() -> Result<(), String> {
    debian_packages(TEST_PACKAGES)?;
    kubernetes_tools()?;
    trainer_python()?;
    torch_python()?;
    let onnx = Command::new("python3").args(["-c", "import onnx; print(onnx.__version__)"]).output();
    if !onnx.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == ONNX_PYTHON_VERSION) {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("onnx=={ONNX_PYTHON_VERSION}"),
        ]))?;
    }
    let version = Command::new("wkg").arg("--version").output().or_else(|_| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        Command::new(home.join(".cargo/bin/wkg")).arg("--version").output()
    });
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(WKG_VERSION)) {
        return Ok(());
    }
    // An unoptimized build: it compiles in half the time (4.5 instead of 9 minutes on 2 cores),
    // and the tests only push and pull small components with it.
    cargo(&["install", "wkg", "--locked", "--debug", "--version", WKG_VERSION])
}

/// `kubectl` (its `kustomize` renders deploy/kubernetes; Debian's kubernetes-client unless one is
/// on the PATH) and target/py-k8s with kubernetes-validate (the Kubernetes schemas).
fn kubernetes_tools() -> Result<(), String> {
    if !Command::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success()) {
        debian_packages(&["kubernetes-client"])?;
    }
    let python = venv("target/py-k8s")?;
    let found = Command::new(&python).args(["-m", "pip", "show", "kubernetes-validate"]).output();
    let wanted = format!("Version: {KUBERNETES_VALIDATE_VERSION}");
    if !found.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == wanted)) {
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}")))?;
    }
    Ok(())
}

/// target/py: a virtual environment with numpy, safetensors and clients/python (the trainer
/// package, installed again each time so that it is the checkout's).
fn trainer_python() -> Result<(), String> {
    let python = venv("target/py")?;
    let wanted = Command::new(&python)
        .args(["-c", "import numpy, safetensors; print(numpy.__version__, safetensors.__version__)"])
        .output();
    let versions: Vec<&str> = TRAINER_PYTHON_PACKAGES.iter().filter_map(|p| p.split("==").nth(1)).collect();
    if !wanted.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().eq(versions.iter().copied())) {
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(TRAINER_PYTHON_PACKAGES))?;
    }
    install_trainer_package(&python)
}

/// The python of the virtual environment `dir` (relative to the root), made if it is missing.
fn venv(dir: &str) -> Result<PathBuf, String> {
    let venv = root().join(dir);
    if !venv.join("bin/python").is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    Ok(venv.join("bin/python"))
}

/// clients/python, installed again each time so that it is the checkout's.
fn install_trainer_package(python: &Path) -> Result<(), String> {
    run(Command::new(python)
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall"])
        .arg(root().join("clients/python")))
}

/// target/py-torch: PyTorch (see [`TORCH_PACKAGES_NO_DEPS`]), onnx and clients/python.
fn torch_python() -> Result<(), String> {
    let python = venv("target/py-torch")?;
    let ready = Command::new(&python)
        .args(["-c", "import torch, onnx, safetensors; print(torch.__version__.split('+')[0], onnx.__version__)"])
        .output();
    if !ready.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "2.15.0 1.17.0") {
        let started = std::time::Instant::now();
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--no-deps"]).args(TORCH_PACKAGES_NO_DEPS))?;
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(TORCH_PACKAGES))?;
        eprintln!("xtask: PyTorch installed into target/py-torch in {:.0} s", started.elapsed().as_secs_f64());
    }
    install_trainer_package(&python)
}

/// Package names of the crates under `plugins/` and `tests/fixtures/`.
fn plugin_packages() -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for dir in ["plugins", "tests/fixtures"] {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
            continue;
        };
        let mut manifests: Vec<PathBuf> =
            entries.flatten().map(|e| e.path().join("Cargo.toml")).filter(|p| p.is_file()).collect();
        manifests.sort();
        for manifest in manifests {
            let text = std::fs::read_to_string(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
            let name = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').to_string()))
                .ok_or_else(|| format!("{}: no package name", manifest.display()))?;
            names.push(name);
        }
    }
    Ok(names)
}

fn plugins() -> Result<(), String> {
    setup()?;
    let packages = plugin_packages()?;
    let mut args = vec!["build", "--profile", "plugin", "--target", "wasm32-wasip2"];
    for p in &packages {
        args.extend(["-p", p.as_str()]);
    }
    cargo(&args)?;
    language_plugins(Lang::Python)?;
    language_plugins(Lang::JavaScript)
}

/// componentize-py, from PyPI, into target/py-plugin.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// componentize-js, from npm, into target/js-plugin.
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

/// A plugin language other than Rust: the file a plugin directory holds and the tool that makes
/// it a component.
#[derive(Clone, Copy)]
enum Lang {
    Python,
    JavaScript,
}

impl Lang {
    fn entry(self) -> &'static str {
        match self {
            Lang::Python => "app.py",
            Lang::JavaScript => "app.js",
        }
    }

    fn sdk(self) -> PathBuf {
        root().join(match self {
            Lang::Python => "sdk/python",
            Lang::JavaScript => "sdk/js",
        })
    }

    /// The toolchain, installed (from PyPI or npm, under target/) when it is missing.
    fn tool(self) -> Result<PathBuf, String> {
        let (tool, version) = match self {
            Lang::Python => {
                let python = venv("target/py-plugin")?;
                (python.with_file_name("componentize-py"), "componentize-py 0.25.1")
            }
            Lang::JavaScript => (root().join("target/js-plugin/node_modules/.bin/componentize-js"), "0.23.0"),
        };
        let installed = Command::new(&tool).arg("--version").output();
        if !installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == version) {
            match self {
                Lang::Python => {
                    let python = tool.with_file_name("python");
                    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", COMPONENTIZE_PY]))?
                }
                Lang::JavaScript => {
                    // The machine's Node.js and npm serve; Debian's only where there are none.
                    if Command::new("npm").arg("--version").output().is_err() {
                        debian_packages(&["npm"])?;
                    }
                    run(Command::new("npm")
                        .args([
                            "install",
                            "--no-audit",
                            "--no-fund",
                            "--loglevel=error",
                            "--prefix",
                            "target/js-plugin",
                        ])
                        .arg(COMPONENTIZE_JS))?
                }
            }
        }
        Ok(tool)
    }

    fn command(self, tool: &Path, dir: &Path, world: &str, out: &Path) -> Command {
        let mut cmd = Command::new(tool);
        match self {
            Lang::Python => {
                cmd.arg("-d").arg(root().join("wit")).args(["-w", world, "componentize", "-p"]).arg(dir);
                cmd.arg("-p").arg(self.sdk()).args(["app", "-o"]).arg(out);
            }
            // componentize-js wants the WIT path relative to where it runs (the root); it bundles
            // the app's relative imports (the SDK) itself. wasi:http is not offered to plugins.
            Lang::JavaScript => {
                cmd.arg(dir.join(self.entry())).args(["--wit", "wit", "--world-name", world]);
                cmd.args(["--disable", "http", "fetch-event", "-o"]).arg(out);
            }
        }
        cmd
    }
}

/// Plugins in Python and JavaScript: each `plugins/<name>/` (and `tests/fixtures/<name>/`) with
/// an `app.py` or `app.js` and a `plugin.toml` naming its WIT world (`world =
/// "aggregator-plugin"`) becomes `nereid_<name>.wasm` beside the Rust plugins, built by
/// componentize-py or componentize-js with the language's SDK (again only when a source is newer).
fn language_plugins(lang: Lang) -> Result<(), String> {
    let mut dirs: Vec<PathBuf> = ["plugins", "tests/fixtures"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root().join(d)).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.join(lang.entry()).is_file() && p.join("plugin.toml").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Ok(());
    }
    let tool = lang.tool()?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let out_dir = target.join("wasm32-wasip2/plugin");
    let newest = |dir: &Path| -> std::time::SystemTime {
        let mut newest = std::time::UNIX_EPOCH;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                    newest = newest.max(m);
                }
            }
        }
        newest
    };
    let wit = root().join("wit");
    for dir in dirs {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let manifest = std::fs::read_to_string(dir.join("plugin.toml")).map_err(|e| format!("{name}: {e}"))?;
        let world = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("world = ").map(|v| v.trim_matches('"').to_string()))
            .ok_or_else(|| format!("{}: no `world = \"...\"`", dir.join("plugin.toml").display()))?;
        let out = out_dir.join(format!("nereid_{}.wasm", name.replace('-', "_")));
        let built = std::fs::metadata(&out).and_then(|m| m.modified()).ok();
        let sources = newest(&dir).max(newest(&lang.sdk())).max(newest(&wit));
        if built.is_some_and(|b| b >= sources) {
            continue;
        }
        std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        run(&mut lang.command(&tool, &dir, &world, &out))?;
    }
    Ok(())
}
