//! `nereid`: the edge/cloud host and the tools for plugin authors.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(name = "nereid", version, about = "Edge AI with every algorithm a sandboxed WebAssembly component")]
struct Cli {
    /// Directory of the caches (compiled components; pulled components under oci/) [default:
    /// $NEREID_CACHE_DIR, else $XDG_CACHE_HOME/nereid, else ~/.cache/nereid].
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile components on every load instead of using the compile cache.
    #[arg(long, global = true)]
    no_cache: bool,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log lines as text, or as JSON objects (one per line, for log collectors).
    #[arg(long, global = true, env = "NEREID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Tools for plugin authors: start a project, build and check it, inspect a component, run an
    /// aggregator offline.
    #[command(subcommand)]
    Plugin(cli::plugin::PluginCommand),
    /// Benchmarks, reported as ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// The demo: a cloud and three edges on loopback train on the UCI digits, split non-IID,
    /// with FedAvg and then FedProx.
    Demo(cli::demo::DemoArgs),
    /// Run the cloud host (jobs, rounds, the API edges and operators use).
    Cloud {
        /// cloud.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Run an edge host (one node: local data, local training).
    Edge {
        /// edge.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Federated-learning jobs on a cloud: apply, list, status, stop.
    #[command(subcommand)]
    Job(cli::serve::JobCommand),
    /// Node tokens.
    #[command(subcommand)]
    Token(cli::serve::TokenCommand),
    /// ONNX models: split at a cut, plan the best cut for a link, export a trained job's model,
    /// compress (quantize, prune) through compressor plugins.
    #[command(subcommand)]
    Model(cli::model::ModelCommand),
    /// Push a component to an OCI registry (the CNCF Wasm artifact layout `wkg` uses).
    Push(cli::oci::PushArgs),
    /// Pull a component from an OCI registry (verified, through the local cache).
    Pull(cli::oci::PullArgs),
    /// The local cache of pulled components: list, garbage-collect.
    #[command(subcommand)]
    Cache(cli::oci::CacheCommand),
    /// The embedded OCI registry, and tag listing.
    #[command(subcommand)]
    Registry(cli::oci::RegistryCommand),
    /// Certificates for a fleet: a CA, and a certificate per host (TLS, mutual TLS).
    #[command(subcommand)]
    Cert(cli::cert::CertCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 if matches!(cli.command, Command::Cloud { .. } | Command::Edge { .. } | Command::Registry(_)) => "info",
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    // The registry cache lives under the same directory; --no-cache concerns compiled code only.
    let cache_root = cli.cache_dir.clone().or_else(nereid::runtime::CompileCache::default_dir);
    let cache_dir = if cli.no_cache { None } else { cache_root.clone() };
    let result = match cli.command {
        Command::Plugin(cmd) => cli::plugin::run(cmd, cache_dir),
        Command::Bench(cmd) => cli::bench::run(cmd, cache_dir),
        Command::Demo(args) => cli::demo::run(args, cache_dir),
        Command::Cloud { config } => cli::serve::cloud(config, cache_dir),
        Command::Edge { config } => cli::serve::edge(config, cache_dir),
        Command::Job(cmd) => cli::serve::job(cmd, cache_dir),
        Command::Token(cmd) => cli::serve::token(cmd),
        Command::Cert(cmd) => cli::cert::run(cmd),
        Command::Model(cmd) => cli::model::run(cmd, cache_dir),
        Command::Push(args) => cli::oci::push(args, cache_root.as_deref()),
        Command::Pull(args) => cli::oci::pull(args, cache_root.as_deref()),
        Command::Cache(cmd) => cli::oci::cache(cmd, cache_root.as_deref()),
        Command::Registry(cmd) => cli::oci::registry(cmd, cache_root.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
