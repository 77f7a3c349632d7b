//! `nereid model`: split an ONNX model at a cut, plan the best cut for a link, export a trained
//! job's model as ONNX, compress a model through a pipeline of compressor plugins, list an edge's
//! model versions (incremental learning).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use nereid::client::CloudClient as Api;
use nereid::config::ServicePlugin;
use nereid::inference::profile;
use nereid::runtime::{Limits, Runtime, SplitterPlugin};
use nereid_onnx::{Link, Message};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write the head (edge) and tail (cloud) halves of a model cut at the given tensors.
    Split(SplitArgs),
    /// Profile a model, list its valid cuts with predicted latencies for a link, and name the
    /// best one.
    Plan(PlanArgs),
    /// Write a trained job's model (weights from a file or from the cloud) as ONNX.
    Export(ExportArgs),
    /// Run a pipeline of compression passes (compressor plugins: quantization, pruning) on a
    /// model; print its size, weight sparsity and accuracy before and after.
    Compress(CompressArgs),
    /// List the model versions of an edge's incremental-learning job: what started each round,
    /// the samples it trained on, its accuracy on the eval set against the serving version's,
    /// and whether it was deployed (`*` marks the version that serves).
    Ls(LsArgs),
}

#[derive(Args)]
pub struct LsArgs {
    /// The edge's API, e.g. http://127.0.0.1:7100 (its `listen`).
    #[arg(long)]
    edge: String,
    /// A token of the edge's API with the `read` right ([api.clients.<name>] in its edge.toml).
    #[arg(long, env = "NEREID_EDGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON (`serving_version` and `versions`).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CompressArgs {
    /// The ONNX model.
    model: PathBuf,
    /// The pipeline (TOML): `[[pass]]` tables with `plugin`, `config` (the plugin's options),
    /// optional `timeout_ms`/`memory_mib`; optional top-level `eval` (a data directory whose
    /// test split is the eval set), `calibration` (a data directory whose train split's first
    /// `calibration_samples` rows, default 64, are the calibration samples) or
    /// `calibration_replay` (an edge's `edge.db`: the first samples its replay buffer holds).
    /// Paths are relative to the pipeline file; a plugin given by name is looked up in the
    /// plugin directory.
    #[arg(long)]
    pipeline: PathBuf,
    /// Where to write the compressed model.
    #[arg(short, long)]
    output: PathBuf,
    /// The eval set's data directory (overrides the pipeline's `eval`).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Directory of the built plugins [default: $NEREID_PLUGIN_DIR, else target/wasm32-wasip2/plugin].
    #[arg(long, value_name = "DIR")]
    plugins_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SplitterArgs {
    /// The splitter plugin [default: split-infer from the plugin directory].
    #[arg(long, value_name = "WASM")]
    splitter: Option<PathBuf>,
}

impl SplitterArgs {
    fn load(&self, runtime: &Runtime) -> anyhow::Result<SplitterPlugin> {
        let path =
            self.splitter.clone().unwrap_or_else(|| super::plugin_path(&super::default_plugin_dir(), "split-infer"));
        let limits = Limits { call_timeout: std::time::Duration::from_secs(60), ..Limits::default() };
        SplitterPlugin::load(runtime, &path, limits, &Default::default())
            .with_context(|| format!("loading the splitter {}", path.display()))
    }
}

#[derive(Args)]
pub struct SplitArgs {
    /// The ONNX model.
    model: PathBuf,
    /// The cut: tensor names, comma-separated. Together they must separate the model's inputs
    /// from its outputs.
    #[arg(long, value_delimiter = ',', required = true)]
    cut: Vec<String>,
    /// Where to write the head (run on the edge).
    #[arg(long)]
    head: PathBuf,
    /// Where to write the tail (run in the cloud).
    #[arg(long)]
    tail: PathBuf,
    #[command(flatten)]
    splitter: SplitterArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PlanArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Link bandwidth, in Mbit/s.
    #[arg(long)]
    bandwidth: f64,
    /// Link round-trip time, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// How many times faster the cloud runs a node than this machine (this machine's profile
    /// stands for both sides, the cloud's times divided by this).
    #[arg(long, default_value_t = 1.0)]
    cloud_speedup: f64,
    /// Timed profiling runs (after 3 warm-up runs).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[command(flatten)]
    splitter: SplitterArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The job file (its `[model]` gives the architecture, its name the job).
    #[arg(long)]
    job: PathBuf,
    /// The weights: a safetensors file (e.g. a global model downloaded from the cloud).
    #[arg(long, conflicts_with = "cloud")]
    weights: Option<PathBuf>,
    /// Fetch the weights from this cloud instead (the job's newest model, or --version).
    #[arg(long, requires = "token")]
    cloud: Option<String>,
    /// Bearer token for --cloud.
    #[arg(long, env = "NEREID_TOKEN")]
    token: Option<String>,
    /// Model version (round) to fetch from the cloud [default: the newest].
    #[arg(long)]
    version: Option<u32>,
    /// Where to write the ONNX model.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(cmd: ModelCommand, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Split(args) => split(args, cache_dir),
        ModelCommand::Plan(args) => plan(args, cache_dir),
        ModelCommand::Export(args) => export(args),
        ModelCommand::Compress(args) => compress(args, cache_dir),
        ModelCommand::Ls(args) => ls(args),
    }
}

fn ls(args: LsArgs) -> anyhow::Result<()> {
    let url = format!("{}{}", args.edge.trim_end_matches('/'), nereid::protocol::routes::MODELS);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, body) = rt.block_on(async {
        let mut req = reqwest::Client::new().get(&url);
        if let Some(token) = &args.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.with_context(|| format!("GET {url}"))?;
        Ok::<_, anyhow::Error>((resp.status(), resp.text().await?))
    })?;
    if !status.is_success() {
        let message = serde_json::from_str::<nereid::protocol::ErrorBody>(&body).map(|e| e.error).unwrap_or(body);
        bail!("GET {url}: {status}: {message}");
    }
    let list: nereid::protocol::VersionList =
        serde_json::from_str(&body).with_context(|| format!("GET {url}: the answer"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<9} {:>6} {:<19} {:<9} {:>8} {:>8} {:>5} {:>8}  trigger / reason",
        "version", "parent", "created (UTC)", "decision", "accuracy", "delta", "new", "replayed"
    );
    for v in &list.versions {
        let mark = if v.version == list.serving_version { "*" } else { " " };
        let created = chrono::DateTime::from_timestamp_millis(v.created_ms)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let metric = |k: &str| v.metrics.get(k).and_then(|m| m.as_f64());
        let delta = metric("accuracy_delta").map_or("-".to_string(), |d| format!("{d:+.4}"));
        println!(
            "{mark}{:<8} {:>6} {:<19} {:<9} {:>8} {:>8} {:>5} {:>8}  {}: {}",
            v.version,
            v.parent.map_or("-".to_string(), |p| p.to_string()),
            created,
            v.decision,
            metric("accuracy").map_or("-".to_string(), |a| format!("{a:.4}")),
            delta,
            v.new_samples,
            v.replayed,
            v.trigger,
            v.reason
        );
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    nereid::files::read_limited(path, nereid::files::MAX_MODEL_BYTES)
        .with_context(|| format!("reading {}", path.display()))
}

/// The model with every tensor typed: as given if the cut's tensors already are, else measured.
fn typed_model(path: &Path, bytes: &[u8], cut: &[String]) -> anyhow::Result<Vec<u8>> {
    let model = nereid_onnx::Model::decode(bytes).with_context(|| path.display().to_string())?;
    if cut.iter().all(|t| model.value_info(t).is_some()) {
        return Ok(model.encode());
    }
    Ok(profile::typed(bytes).with_context(|| format!("typing the tensors of {}", path.display()))?.model.encode())
}

fn split(args: SplitArgs, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let bytes = read(&args.model)?;
    let typed = typed_model(&args.model, &bytes, &args.cut)?;
    let runtime = Runtime::new(cache_dir)?;
    let mut splitter = args.splitter.load(&runtime)?;
    let (head, tail) = splitter
        .partition(&typed, &args.cut)
        .with_context(|| format!("{}: cut {}", args.model.display(), args.cut.join(",")))?;
    let no_tail = tail.is_none();
    let (Some(head), Some(tail)) = (head, tail) else {
        bail!(
            "{}: cut {} leaves {} empty: it is the model's {}; pick a cut between them",
            args.model.display(),
            args.cut.join(","),
            if no_tail { "the tail" } else { "the head" },
            if no_tail { "outputs" } else { "inputs" }
        );
    };
    std::fs::write(&args.head, &head).with_context(|| format!("writing {}", args.head.display()))?;
    std::fs::write(&args.tail, &tail).with_context(|| format!("writing {}", args.tail.display()))?;
    let nodes = |b: &[u8]| nereid_onnx::Model::decode(b).map(|m| m.graph().node.len()).unwrap_or(0);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "cut": args.cut,
                "head": {"path": args.head, "nodes": nodes(&head), "bytes": head.len()},
                "tail": {"path": args.tail, "nodes": nodes(&tail), "bytes": tail.len()},
            })
        );
    } else {
        println!("head: {} ({} nodes, {} bytes)", args.head.display(), nodes(&head), head.len());
        println!("tail: {} ({} nodes, {} bytes)", args.tail.display(), nodes(&tail), tail.len());
    }
    Ok(())
}

fn plan(args: PlanArgs, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    if args.bandwidth.is_nan()
        || args.bandwidth <= 0.0
        || args.rtt_ms < 0.0
        || args.cloud_speedup.is_nan()
        || args.cloud_speedup <= 0.0
    {
        bail!("--bandwidth and --cloud-speedup must be > 0 and --rtt-ms >= 0");
    }
    let bytes = read(&args.model)?;
    let profiled =
        profile::profile(&bytes, args.runs).with_context(|| format!("profiling {}", args.model.display()))?;
    let profile =
        profiled.split_profile(profiled.node_ms.iter().map(|(n, ms)| (n.clone(), ms / args.cloud_speedup)).collect());
    let typed = profiled.model.encode();
    let runtime = Runtime::new(cache_dir)?;
    let mut splitter = args.splitter.load(&runtime)?;
    let cuts = splitter.plan(&typed, &profile, args.bandwidth, args.rtt_ms)?;
    let link = Link { bandwidth_mbit_s: args.bandwidth, rtt_ms: args.rtt_ms };
    let rows: Vec<serde_json::Value> = cuts
        .iter()
        .map(|c| {
            let p = profile.predict(&profiled.model, &c.tensors, link)?;
            Ok(serde_json::json!({
                "cut": c.tensors,
                "predicted_ms": c.predicted_ms,
                "edge_ms": p.edge_ms,
                "transfer_ms": p.transfer_ms,
                "cloud_ms": p.cloud_ms,
                "upload_bytes": p.upload_bytes,
            }))
        })
        .collect::<Result<_, nereid_onnx::OnnxError>>()?;
    let chosen = cuts.first().map(|c| c.tensors.clone()).unwrap_or_default();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": args.model,
                "bandwidth_mbit_s": args.bandwidth,
                "rtt_ms": args.rtt_ms,
                "whole_model_ms": profiled.run_ms,
                "chosen": chosen,
                "cuts": rows,
                "profile": profile,
            })
        );
        return Ok(());
    }
    println!(
        "{}: {} nodes, whole model {:.3} ms here; link {} Mbit/s, RTT {} ms",
        args.model.display(),
        profiled.model.graph().node.len(),
        profiled.run_ms,
        args.bandwidth,
        args.rtt_ms
    );
    println!(
        "{:>12} {:>9} {:>11} {:>9} {:>12}  cut",
        "predicted ms", "edge ms", "transfer ms", "cloud ms", "upload bytes"
    );
    for r in &rows {
        println!(
            "{:>12.3} {:>9.3} {:>11.3} {:>9.3} {:>12}  {}",
            r["predicted_ms"].as_f64().unwrap_or(0.0),
            r["edge_ms"].as_f64().unwrap_or(0.0),
            r["transfer_ms"].as_f64().unwrap_or(0.0),
            r["cloud_ms"].as_f64().unwrap_or(0.0),
            r["upload_bytes"].as_u64().unwrap_or(0),
            r["cut"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        );
    }
    println!("chosen: {}", chosen.join(","));
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let file: nereid::config::job::JobFile = nereid::config::parse_file(&args.job)?;
    let weights = match (&args.weights, &args.cloud) {
        (Some(path), _) => read(path)?,
        (None, Some(cloud)) => {
            let api = Api::new(cloud, args.token.as_deref().unwrap_or_default(), std::time::Duration::from_secs(120))?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let name = &file.job.name;
            let version = match args.version {
                Some(v) => v,
                None => rt.block_on(api.status(name))?.rounds_done,
            };
            rt.block_on(api.model(name, version))?.to_vec()
        }
        (None, None) => bail!("give the weights: --weights <file.safetensors> or --cloud <url>"),
    };
    let model = nereid::model_io::decode(&weights, Path::new("weights"))?;
    let onnx = nereid::inference::export::to_onnx(&file.model, &model)
        .with_context(|| format!("the weights do not fit `[model]` of {}", args.job.display()))?;
    let bytes = onnx.encode_to_vec();
    std::fs::write(&args.output, &bytes).with_context(|| format!("writing {}", args.output.display()))?;
    println!("{}: {} bytes, input `input`, output `probabilities`", args.output.display(), bytes.len());
    Ok(())
}

/// Where a pipeline's `plugin` points: a built plugin's name, a path, or an `oci://` reference.
fn pass_source(plugin: &str, plugins_dir: &Path) -> String {
    let bare = !plugin.contains('/') && !plugin.ends_with(".wasm") && !nereid_registry::is_reference(plugin);
    if bare {
        super::plugin_path(plugins_dir, plugin).display().to_string()
    } else {
        plugin.to_string()
    }
}

fn compress(args: CompressArgs, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use nereid::inference::compress::{self, Accuracy, ModelSize};
    let pipeline: nereid::config::pipeline::PipelineFile = nereid::config::parse_file(&args.pipeline)?;
    if pipeline.passes.is_empty() {
        bail!("{}: the pipeline has no [[pass]]", args.pipeline.display());
    }
    let base = args.pipeline.parent().unwrap_or(Path::new(".")).to_path_buf();
    let input = read(&args.model)?;
    let eval_dir = args.eval.clone().or_else(|| pipeline.eval.as_ref().map(|e| base.join(e)));
    let eval_set = eval_dir.as_ref().map(|d| compress::load_data(d, "test")).transpose()?;
    let calibration = match (&pipeline.calibration, &pipeline.calibration_replay) {
        (Some(_), Some(_)) => {
            bail!("{}: give `calibration` or `calibration_replay`, not both", args.pipeline.display())
        }
        (Some(dir), None) => {
            let dir = base.join(dir);
            let data = compress::load_data(&dir, "train")?;
            compress::calibration_samples(&input, &data, pipeline.calibration_samples, &dir.display().to_string())?
        }
        (None, Some(db)) => compress::replay_calibration_samples(&input, &base.join(db), pipeline.calibration_samples)?,
        (None, None) => Vec::new(),
    };
    let models = nereid::runtime::nn::Models::for_guest_models(nereid::runtime::nn::NnBackend::Onnxruntime)?;
    let runtime = Runtime::with_models(cache_dir.clone(), models)?;
    let plugins_dir = args.plugins_dir.clone().unwrap_or_else(super::default_plugin_dir);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let components = super::components(cache_dir.as_deref())?;
    let mut model = input.clone();
    let mut passes = Vec::new();
    for (i, pass) in pipeline.passes.iter().enumerate() {
        let at = format!("{}: pass {} (plugin {})", args.pipeline.display(), i + 1, pass.plugin);
        let cfg = ServicePlugin {
            plugin: pass_source(&pass.plugin, &plugins_dir),
            timeout_ms: pass.timeout_ms.or(Some(120_000)),
            ..pass.clone()
        };
        let p = rt.block_on(components.load_plugin(&cfg, &base, &runtime)).with_context(|| at.clone())?;
        let mut plugin = nereid::runtime::CompressorPlugin::new(&runtime, p.loaded, p.limits, &cfg.config)
            .with_context(|| at.clone())?;
        model = plugin.rewrite_model(&model, &calibration).with_context(|| at.clone())?;
        passes.push(serde_json::json!({"plugin": pass.plugin, "config": pass.config}));
    }
    // ONNX Runtime loading the result is part of the check, with or without an eval set.
    nereid::inference::NativeModel::new(&model)
        .with_context(|| format!("ONNX Runtime refuses the compressed model of {}", args.model.display()))?;
    std::fs::write(&args.output, &model).with_context(|| format!("writing {}", args.output.display()))?;
    let before = compress::model_size(&input)?;
    let after = compress::model_size(&model)?;
    let origin = eval_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
    let accuracy = |onnx: &[u8]| -> anyhow::Result<Option<Accuracy>> {
        Ok(eval_set.as_ref().map(|d| compress::evaluate(onnx, d, &origin)).transpose()?)
    };
    let (acc_before, acc_after) = (accuracy(&input)?, accuracy(&model)?);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "input": args.model,
                "output": args.output,
                "passes": passes,
                "calibration_samples": calibration.len(),
                "before": {"size": before, "accuracy": acc_before},
                "after": {"size": after, "accuracy": acc_after},
                "size_ratio": after.bytes as f64 / before.bytes.max(1) as f64,
            }))?
        );
        return Ok(());
    }
    let row = |label: &str, s: &ModelSize, a: Option<Accuracy>| {
        println!(
            "{label:<7} {:>12} {:>12} {:>10.1}% {:>12} {:>10}",
            s.bytes,
            s.gzip_bytes,
            100.0 * s.zero_weights as f64 / (s.float_weights + s.int8_weights).max(1) as f64,
            s.int8_weights,
            a.map_or("-".to_string(), |a| format!("{:.4}", a.accuracy)),
        )
    };
    println!("{} -> {} ({} pass(es))", args.model.display(), args.output.display(), passes.len());
    println!("{:<7} {:>12} {:>12} {:>11} {:>12} {:>10}", "", "bytes", "gzip bytes", "zero wts", "int8 wts", "accuracy");
    row("before", &before, acc_before);
    row("after", &after, acc_after);
    print!("size: {:.1}% of the input", 100.0 * after.bytes as f64 / before.bytes.max(1) as f64);
    match (acc_before, acc_after) {
        (Some(b), Some(a)) => println!(
            "; accuracy {:+.2} points on {} examples of {}",
            100.0 * (a.accuracy - b.accuracy),
            a.examples,
            origin
        ),
        _ => println!("; no eval set given (--eval or `eval` in the pipeline)"),
    }
    Ok(())
}
