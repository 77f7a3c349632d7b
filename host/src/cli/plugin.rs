//! `nereid plugin inspect` and `nereid plugin aggregate` (`new`, `build` and `test` are in
//! `cli::project`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

use super::LimitArgs;
use serde::Serialize;

use nereid::aggregate::{run_round, Rejection};
use nereid::model_io;
use nereid::runtime::config::{kind_label, parse_cli_value, value_label, ConfigTable};
use nereid::runtime::{self, AggregatorPlugin, ClientUpdate, Limits, RoundContext, Runtime, UpdateKind};

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Show a component's slot (world), name, version, config schema and imports.
    Inspect {
        /// The component: a .wasm file, or oci://host[:port]/repo:tag (or @sha256:<hex>).
        component: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a new plugin project (plugin.toml, a working example of the slot, the contract and
    /// the SDK of the language under .nereid/), ready for `plugin build`.
    New(super::project::NewArgs),
    /// Build a plugin project into a component (cargo, componentize-py or componentize-js), check
    /// its slot as `inspect` does, and run the slot's checks.
    Build(super::project::BuildArgs),
    /// Run the slot's checks on a built component or project: every call of the slot with small
    /// inputs, the answers held to the contract (layouts kept, no NaN, only held samples evicted).
    Test(super::project::TestArgs),
    /// Run any aggregator plugin offline over safetensors files and write the aggregated model.
    Aggregate(AggregateArgs),
    /// Run fedavg and fedprox over generated client updates, checked against a float64
    /// reference and a hand computation of FedProx's client term.
    Demo(super::demo::plugins::DemoArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Weights,
    Delta,
}

#[derive(Args)]
pub struct AggregateArgs {
    /// The aggregator component (.wasm).
    #[arg(long)]
    plugin: PathBuf,
    /// A plugin option, as KEY=VALUE (VALUE is a TOML value: 0.1, 3, true, "text" or a bare word).
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// The current global model (safetensors); needed for delta updates.
    #[arg(long, value_name = "MODEL.safetensors")]
    global: Option<PathBuf>,
    /// A client update and its number of training examples, as FILE.safetensors=N. Repeat.
    #[arg(long = "update", value_name = "FILE=N", required = true)]
    updates: Vec<String>,
    /// Whether the updates are trained weights or deltas to the global model.
    #[arg(long, value_enum, default_value = "weights")]
    kind: KindArg,
    /// Round number passed to the plugin.
    #[arg(long, default_value_t = 1)]
    round: u32,
    /// Seed passed to the plugin.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the aggregated model (safetensors).
    #[arg(long, short)]
    output: PathBuf,
    /// The strategy state (FedAdam's moments, a clipping norm) across offline rounds: read
    /// before the round if the file exists, written after it.
    #[arg(long, value_name = "STATE.safetensors")]
    state: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: PluginCommand, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Demo(args) => super::demo::plugins::run(args, cache_dir),
        PluginCommand::New(args) => super::project::new(args),
        PluginCommand::Build(args) => super::project::build(args, cache_dir),
        PluginCommand::Test(args) => super::project::test(args, cache_dir),
        PluginCommand::Inspect { component, json } => {
            inspect(&Runtime::new(cache_dir.clone())?, &component, json, cache_dir.as_deref())
        }
        PluginCommand::Aggregate(args) => aggregate(&Runtime::new(cache_dir)?, args),
    }
}

#[derive(Serialize)]
struct ConfigFieldReport {
    key: String,
    kind: &'static str,
    required: bool,
    default: Option<String>,
    description: String,
}

#[derive(Serialize)]
struct InspectReport {
    component: String,
    digest: String,
    /// For a registry component: the reference pinned to its manifest digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pinned: Option<String>,
    world: String,
    slots: Vec<runtime::Slot>,
    name: String,
    version: String,
    description: String,
    config: Vec<ConfigFieldReport>,
    imports: Vec<String>,
}

fn inspect(runtime: &Runtime, component: &str, json: bool, cache_dir: Option<&Path>) -> anyhow::Result<()> {
    let (loaded, pinned) = if nereid_registry::is_reference(component) {
        let components = super::components(cache_dir)?;
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let fetched = rt.block_on(components.fetch(component, Path::new("."), None))?;
        (runtime.load_bytes(&fetched.bytes, component)?, fetched.pinned)
    } else {
        (runtime.load_file(Path::new(component))?, None)
    };
    let info = runtime::describe(runtime, &loaded, &Limits::default())?;
    let report = InspectReport {
        component: loaded.origin.clone(),
        digest: loaded.digest.clone(),
        pinned,
        world: runtime::describe_worlds(&loaded.slots),
        slots: loaded.slots.clone(),
        name: info.name,
        version: info.version,
        description: info.description,
        config: info
            .config_schema
            .into_iter()
            .map(|f| ConfigFieldReport {
                key: f.key,
                kind: kind_label(f.kind),
                required: f.required,
                default: f.default_value.as_ref().map(value_label),
                description: f.description,
            })
            .collect(),
        imports: loaded.imports.clone(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("component    {}", report.component);
    println!("digest       {}", report.digest);
    if let Some(p) = &report.pinned {
        println!("pinned       {p}");
    }
    println!("implements   {}", report.world);
    println!("name         {}", report.name);
    println!("version      {}", report.version);
    println!("description  {}", report.description);
    if report.config.is_empty() {
        println!("config       (no options)");
    } else {
        println!("config");
        for f in &report.config {
            let default = match (&f.default, f.required) {
                (Some(d), _) => format!("default {d}"),
                (None, true) => "required".to_string(),
                (None, false) => "optional".to_string(),
            };
            println!("  {:<14} {:<8} {:<16} {}", f.key, f.kind, default, f.description);
        }
    }
    println!("imports");
    for i in &report.imports {
        println!("  {i}");
    }
    Ok(())
}

/// Parses `KEY=VALUE` options into a config table.
pub fn config_table(pairs: &[String]) -> anyhow::Result<ConfigTable> {
    let mut table = ConfigTable::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--config `{pair}`: expected KEY=VALUE");
        };
        if table.insert(key.trim().to_string(), parse_cli_value(value.trim())).is_some() {
            bail!("--config: key `{}` is given twice", key.trim());
        }
    }
    Ok(table)
}

#[derive(Serialize)]
struct AggregateReport {
    plugin: String,
    version: String,
    digest: String,
    compile_cache: runtime::CacheOutcome,
    accepted: Vec<String>,
    rejected: Vec<Rejection>,
    restarts: u32,
    metrics: Vec<(String, f64)>,
    output: String,
    tensors: usize,
}

fn parse_update(spec: &str) -> anyhow::Result<(PathBuf, u64)> {
    let Some((file, n)) = spec.rsplit_once('=') else {
        bail!("--update `{spec}`: expected FILE.safetensors=NUM_EXAMPLES");
    };
    let n: u64 =
        n.trim().parse().with_context(|| format!("--update `{spec}`: `{n}` is not a whole number of examples"))?;
    Ok((PathBuf::from(file), n))
}

fn aggregate(runtime: &Runtime, args: AggregateArgs) -> anyhow::Result<()> {
    let config = config_table(&args.config)?;
    let updates: Vec<(PathBuf, u64)> = args.updates.iter().map(|s| parse_update(s)).collect::<anyhow::Result<_>>()?;
    let global = args.global.as_deref().map(model_io::read).transpose()?;
    let mut plugin = AggregatorPlugin::load(runtime, &args.plugin, args.limits.limits(), &config)?;
    if let Some(path) = args.state.as_ref().filter(|p| p.exists()) {
        plugin.set_state(model_io::read(path)?);
    }
    let kind = match args.kind {
        KindArg::Weights => UpdateKind::Weights,
        KindArg::Delta => UpdateKind::Delta,
    };
    let ctx = RoundContext { job: "offline".into(), round: args.round, seed: args.seed };
    let load = |i: usize| {
        let (path, n) = &updates[i];
        let client = path.display().to_string();
        match model_io::read(path) {
            Ok(tensors) => Ok(ClientUpdate {
                client,
                kind,
                tensors,
                num_examples: *n,
                metrics: Vec::new(),
                file: Some(path.clone()),
            }),
            Err(e) => Err(Rejection { update: client, reason: e.to_string() }),
        }
    };
    let report = run_round(&mut plugin, &ctx, global.as_ref(), updates.len(), load)?;
    let info = plugin.sandbox().info().cloned();
    let (name, version) = info.map(|i| (i.name, i.version)).unwrap_or_default();
    let mut metadata = HashMap::from([
        ("nereid.aggregator".to_string(), format!("{name} {version}")),
        ("nereid.round".to_string(), args.round.to_string()),
    ]);
    metadata.insert("nereid.accepted_updates".into(), report.accepted.len().to_string());
    model_io::write(&args.output, &report.result.tensors, Some(metadata))?;
    if let Some(path) = &args.state {
        model_io::write(path, &report.result.state, None)?;
    }

    let component = plugin.sandbox().component();
    let out = AggregateReport {
        plugin: name,
        version,
        digest: component.digest.clone(),
        compile_cache: component.cache,
        accepted: report.accepted,
        rejected: report.rejected,
        restarts: report.restarts,
        metrics: report.result.metrics,
        output: args.output.display().to_string(),
        tensors: report.result.tensors.len(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "aggregator {} {} ({}, {})",
        out.plugin,
        out.version,
        out.digest,
        match out.compile_cache {
            runtime::CacheOutcome::Hit => "compile cache hit",
            runtime::CacheOutcome::Compiled => "compiled",
        }
    );
    println!("accepted {} of {} updates", out.accepted.len(), updates.len());
    for r in &out.rejected {
        println!("rejected {}: {}", r.update, r.reason);
    }
    if out.restarts > 0 {
        println!("the plugin instance was lost {} time(s) and replaced; the round was replayed", out.restarts);
    }
    let metrics: Vec<String> = out.metrics.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("wrote {} ({} tensors) {}", out.output, out.tensors, metrics.join(" "));
    Ok(())
}
