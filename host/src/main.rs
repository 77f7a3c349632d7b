//! `nereid`: the edge/cloud host and the tools for plugin authors.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(name = "nereid", version, about = "Edge AI with every algorithm a sandboxed WebAssembly component")]
struct Cli {
    /// Directory of the compiled-component cache [default: $NEREID_CACHE_DIR, else
    /// $XDG_CACHE_HOME/nereid, else ~/.cache/nereid].
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile components on every load instead of using the cache.
    #[arg(long, global = true)]
    no_cache: bool,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tools for plugin authors: inspect a component, run an aggregator offline.
    #[command(subcommand)]
    Plugin(cli::plugin::PluginCommand),
    /// Benchmarks, reported as ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// The demo: FedAvg and FedProx plugins over generated client updates, checked against a
    /// float64 reference, and FedProx's client term on a local step.
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let cache_dir =
        if cli.no_cache { None } else { cli.cache_dir.or_else(nereid::runtime::ComponentCache::default_dir) };
    let result = match cli.command {
        Command::Plugin(cmd) => cli::plugin::run(cmd, cache_dir),
        Command::Bench(cmd) => cli::bench::run(cmd, cache_dir),
        Command::Demo(args) => cli::demo::run(args, cache_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
