//! A plugin author's project: `nereid plugin new` writes one, `nereid plugin build` builds it
//! with its language's toolchain (cargo, componentize-py, componentize-js), checks the component's
//! slot as `plugin inspect` does and runs the slot's checks (`plugin test`).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use nereid::config::project::{slot_names, Language, PluginProject};
use nereid::runtime::config::ConfigTable;
use nereid::runtime::nn::{Models, NnBackend};
use nereid::runtime::{self, Runtime, Slot};

mod check;
mod templates;

/// componentize-py and componentize-js, as the docs and the errors name them.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

#[derive(Args)]
pub struct NewArgs {
    /// The project's directory (made; it must not exist or be empty). Its last part is the
    /// plugin's name unless --name says otherwise.
    dir: PathBuf,
    /// The slot: aggregator, client-objective, sampler, compressor, router, splitter, adapter.
    #[arg(long, value_parser = parse_slot)]
    slot: Slot,
    /// rust, python or javascript.
    #[arg(long, value_parser = parse_language, default_value = "rust")]
    lang: Language,
    /// The plugin's name (letters, digits, '-' and '_').
    #[arg(long)]
    name: Option<String>,
}

#[derive(Args)]
pub struct BuildArgs {
    /// The project's directory (with plugin.toml).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Where to write the component [default: <dir>/<name>.wasm].
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Build only: do not run the slot's checks.
    #[arg(long)]
    no_test: bool,
    #[command(flatten)]
    limits: super::LimitArgs,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TestArgs {
    /// A project's directory (its built <name>.wasm is tested) or a component (.wasm).
    target: PathBuf,
    /// The component's slot, for a .wasm that implements several [default: the project's, or
    /// the one the component implements].
    #[arg(long, value_parser = parse_slot)]
    slot: Option<Slot>,
    #[command(flatten)]
    limits: super::LimitArgs,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

fn parse_slot(s: &str) -> Result<Slot, String> {
    Slot::named(s).ok_or_else(|| format!("unknown slot `{s}`: one of {}", slot_names()))
}

fn parse_language(s: &str) -> Result<Language, String> {
    match s {
        "rust" => Ok(Language::Rust),
        "python" | "py" => Ok(Language::Python),
        "javascript" | "js" => Ok(Language::Javascript),
        _ => Err(format!("unknown language `{s}`: rust, python or javascript")),
    }
}

pub fn new(args: NewArgs) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{}: name the plugin with --name", args.dir.display()))?,
    };
    nereid::names::check(nereid::names::Kind::Plugin, &name)?;
    let files = templates::project(&name, args.slot, args.lang);
    if args.dir.exists() && std::fs::read_dir(&args.dir)?.next().is_some() {
        bail!("{}: exists and is not empty", args.dir.display());
    }
    for (path, text) in &files {
        let path = args.dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
    }
    let source = match args.lang {
        Language::Rust => "src/lib.rs",
        Language::Python => "app.py",
        Language::Javascript => "app.js",
    };
    println!(
        "wrote {dir}: a {lang} {slot} plugin `{name}` ({dir}/{source}); build and check it with\n  nereid plugin build {dir}",
        dir = args.dir.display(),
        lang = args.lang.name(),
        slot = args.slot.name(),
    );
    Ok(())
}

#[derive(Serialize)]
struct Report {
    component: String,
    slot: &'static str,
    name: String,
    version: String,
    bytes: u64,
    build_seconds: Option<f64>,
    checks: Vec<CheckReport>,
}

#[derive(Serialize)]
struct CheckReport {
    check: &'static str,
    millis: f64,
}

fn read_project(dir: &Path) -> anyhow::Result<PluginProject> {
    let path = dir.join("plugin.toml");
    if !path.is_file() {
        bail!("{}: no plugin.toml (make a project with `nereid plugin new`)", dir.display());
    }
    Ok(nereid::config::parse_checked_file(&path)?)
}

pub fn build(args: BuildArgs, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let project = read_project(&args.dir)?;
    let out = args.output.clone().unwrap_or_else(|| args.dir.join(format!("{}.wasm", project.name)));
    let started = Instant::now();
    let (slot, wit, out_abs) =
        (project.slot, templates::wit_dir(project.language, project.slot), std::path::absolute(&out)?);
    match project.language {
        Language::Rust => build_rust(&args.dir, &project, &out)?,
        Language::Python => {
            let tool =
                toolchain("componentize-py", "NEREID_COMPONENTIZE_PY", &format!("pip install {COMPONENTIZE_PY}"))?;
            let mut cmd = Command::new(tool);
            cmd.args(["-d", wit, "-w", slot.world(), "componentize", "-p", ".", "-p"]);
            cmd.args([".nereid/python", "app", "-o"]).arg(out_abs);
            run(cmd.current_dir(&args.dir))?;
        }
        Language::Javascript => {
            let tool =
                toolchain("componentize-js", "NEREID_COMPONENTIZE_JS", &format!("npm install -g {COMPONENTIZE_JS}"))?;
            let mut cmd = Command::new(tool);
            // wasi:http is not offered to plugins: the component must not import it.
            cmd.args(["app.js", "--wit", wit, "--world-name", slot.world()]);
            cmd.args(["--disable", "http", "fetch-event", "-o"]).arg(out_abs);
            run(cmd.current_dir(&args.dir))?;
        }
    }
    let build_seconds = started.elapsed().as_secs_f64();
    let runtime = runtime_with_models(cache_dir)?;
    let checks = if args.no_test { None } else { Some((&project.config, adapter_input(&project, &args.dir)?)) };
    let report = test_component(&runtime, &out, Some(slot), &args.limits, checks)?;
    print_report(Report { build_seconds: Some(build_seconds), ..report }, args.json)
}

/// A runtime whose plugins reach the models the checks register (a router runs one through
/// wasi-nn); ONNX Runtime is loaded only when one is.
fn runtime_with_models(cache_dir: Option<PathBuf>) -> anyhow::Result<(Runtime, Models)> {
    let models = Models::new(NnBackend::Onnxruntime);
    Ok((Runtime::with_models(cache_dir, models.clone())?, models))
}

pub fn test(args: TestArgs, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let runtime = runtime_with_models(cache_dir)?;
    let (component, project) = if args.target.is_dir() {
        let project = read_project(&args.target)?;
        (args.target.join(format!("{}.wasm", project.name)), Some(project))
    } else {
        (args.target.clone(), None)
    };
    let no_config = ConfigTable::new();
    let (slot, config, input) = match &project {
        Some(p) => (args.slot.or(Some(p.slot)), &p.config, adapter_input(p, &args.target)?),
        None => (args.slot, &no_config, None),
    };
    let report = test_component(&runtime, &component, slot, &args.limits, Some((config, input)))?;
    print_report(report, args.json)
}

/// The adapter check's payload that a project's `[test]` names, read from the project.
fn adapter_input(project: &PluginProject, dir: &Path) -> anyhow::Result<Option<check::AdapterInput>> {
    let Some(t) = &project.test else { return Ok(None) };
    let path = dir.join(&t.payload);
    let bytes =
        nereid::files::read_limited(&path, 64 << 20).with_context(|| format!("test.payload: {}", path.display()))?;
    Ok(Some((t.content_type.clone(), bytes)))
}

/// Loads `component`, checks that it implements `slot` (as `plugin inspect` shows it) and, given
/// a config and an adapter payload, runs the slot's checks.
fn test_component(
    (runtime, models): &(Runtime, Models),
    component: &Path,
    slot: Option<Slot>,
    limits: &super::LimitArgs,
    checks: Option<(&ConfigTable, Option<check::AdapterInput>)>,
) -> anyhow::Result<Report> {
    let loaded = runtime.load_file(component)?;
    let slot = match slot {
        Some(s) if loaded.slots.contains(&s) => s,
        Some(s) => bail!(
            "{}: plugin.toml says slot {}, but the component implements {}",
            component.display(),
            s.name(),
            runtime::describe_worlds(&loaded.slots)
        ),
        None => match loaded.slots.as_slice() {
            [one] => *one,
            _ => bail!(
                "{}: implements {}; name the slot to test with --slot",
                component.display(),
                runtime::describe_worlds(&loaded.slots)
            ),
        },
    };
    let info = runtime::describe(runtime, &loaded, &limits.limits())?;
    let checks = match checks {
        Some((config, input)) => check::run(runtime, models, &loaded, slot, limits.limits(), config, input)?,
        None => Vec::new(),
    };
    Ok(Report {
        component: component.display().to_string(),
        slot: slot.name(),
        name: info.name,
        version: info.version,
        bytes: std::fs::metadata(component).map(|m| m.len()).unwrap_or(0),
        build_seconds: None,
        checks: checks.into_iter().map(|c| CheckReport { check: c.name, millis: c.millis }).collect(),
    })
}

fn print_report(report: Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let built = report.build_seconds.map(|s| format!(", built in {s:.1} s")).unwrap_or_default();
    println!(
        "{}: {} {} {} ({} KB{built})",
        report.component,
        report.slot,
        report.name,
        report.version,
        report.bytes.div_ceil(1024)
    );
    for c in &report.checks {
        println!("  ok  {} ({:.0} ms)", c.check, c.millis);
    }
    if !report.checks.is_empty() {
        println!("{} checks of the {} slot passed", report.checks.len(), report.slot);
    }
    Ok(())
}

/// cargo for wasm32-wasip2 in release; the component is the cdylib cargo reports.
fn build_rust(dir: &Path, project: &PluginProject, out: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--message-format", "json-render-diagnostics"])
        .current_dir(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", cargo.to_string_lossy()))?;
    if !output.status.success() {
        bail!(
            "cargo build of {} failed ({}); the wasm32-wasip2 target comes with `rustup target add wasm32-wasip2`",
            dir.display(),
            output.status
        );
    }
    let built = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == project.name.replace('-', "_"))
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
        .with_context(|| format!("cargo built no .wasm for package {}", project.name))?;
    std::fs::copy(&built, out).with_context(|| format!("{} -> {}", built.display(), out.display()))?;
    Ok(())
}

/// The tool from `$env`, else from PATH; if neither, an error that says how to install it.
fn toolchain(tool: &str, env: &str, install: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file());
    found.with_context(|| format!("{tool} is not on PATH: install it (`{install}`) or set {env} to it"))
}

/// Runs a toolchain; what it prints goes to stderr, so that stdout holds only the report.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.stdout(std::io::stderr()).status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}
