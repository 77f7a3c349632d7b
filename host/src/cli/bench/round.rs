//! `nereid bench round`: the cloud's server-side cost of a round (upload, persist, aggregate,
//! commit; no training) with many simulated clients on loopback, and its peak memory.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use nereid::model_io;
use nereid::protocol::{new_token, META_METRICS, META_NUM_EXAMPLES};
use nereid::runtime::config::ConfigTable;
use nereid::runtime::{AggregatorPlugin, ClientUpdate, Limits, RoundContext, Runtime, UpdateKind};
use nereid::train::ModelSpec;

use crate::cli::demo::fleet::{free_port, start_cloud};
use nereid::client::CloudClient as Api;

#[derive(Args)]
pub struct RoundBench {
    /// Simulated clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Model size: an MLP of WIDTH inputs and WIDTH classes (WIDTH^2 + WIDTH parameters).
    #[arg(long, default_value_t = 1000)]
    width: usize,
    /// Rounds to time; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Uploads in flight at once from the simulated clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Serve the cloud over mutual TLS (a CA, the cloud's certificate and one per client made
    /// for the run; nodes known by token and certificate, each with its own connection), to
    /// compare with the default plain HTTP run.
    #[arg(long)]
    tls: bool,
    /// Directory of the built plugins [default: $NEREID_PLUGIN_DIR, else target/wasm32-wasip2/plugin].
    #[arg(long, value_name = "DIR")]
    plugins_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    clients: usize,
    /// Mutual TLS (`--tls`) or plain HTTP.
    tls: bool,
    parameters: u64,
    model_bytes: usize,
    round_ms: Vec<f64>,
    median_round_ms: f64,
    /// The same FedAvg over the same updates in this process, read from their files: the floor.
    in_process_fedavg_ms: f64,
    ratio_to_in_process: f64,
    /// Peak RSS from just before round 1 to the end.
    cloud_peak_rss_bytes: u64,
    /// RSS with the job applied and no round run yet.
    cloud_rss_before_rounds_bytes: u64,
    /// (peak - RSS before the rounds) / model size.
    peak_rss_above_fixed_over_model_size: f64,
    /// Peak RSS of this process up to the end of the rounds: making the updates and streaming
    /// them from disk (the in-process floor comes after).
    client_peak_rss_bytes: u64,
}

/// A CA, the cloud's certificate (localhost) and one per client under `<work>/pki`; the
/// directory and each client's TLS settings.
fn fleet_pki(work: &std::path::Path, names: &[String]) -> anyhow::Result<(PathBuf, Vec<nereid_net::tls::ClientTls>)> {
    use crate::cli::cert::write_pair;
    use nereid_net::pki;
    let dir = work.join("pki");
    let ca = pki::authority("nereid bench", 1)?;
    write_pair(&dir, "ca", &ca)?;
    write_pair(&dir, "localhost", &pki::issue(&ca, "localhost", &["127.0.0.1".to_string()], 1)?)?;
    let mut clients = Vec::new();
    for name in names {
        write_pair(&dir, name, &pki::issue(&ca, name, &[], 1)?)?;
        clients.push(nereid_net::tls::ClientTls {
            ca: Some(dir.join("ca.pem")),
            cert: Some(dir.join(format!("{name}.pem"))),
            key: Some(dir.join(format!("{name}.key"))),
        });
    }
    Ok((dir, clients))
}

pub fn rss_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    nereid_harness::rss_kib(pid, field).context("reading /proc (Linux only)")
}

pub fn run(args: RoundBench, cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    if args.clients == 0 || args.width == 0 || args.rounds == 0 || args.concurrency == 0 {
        bail!("--clients, --width, --rounds and --concurrency must be at least 1");
    }
    let work = tempfile::tempdir()?;
    let plugins = args.plugins_dir.clone().unwrap_or_else(crate::cli::default_plugin_dir);
    let cache = cache_dir.unwrap_or_else(|| work.path().join("cache"));
    let port = free_port()?;
    let url = if args.tls { format!("https://localhost:{port}") } else { format!("http://127.0.0.1:{port}") };
    let admin = new_token();
    let names: Vec<String> = (0..args.clients).map(|i| format!("client-{i:03}")).collect();
    let tokens: Vec<String> = names.iter().map(|_| new_token()).collect();
    let mut cloud_toml = format!(
        "listen = \"127.0.0.1:{port}\"\nstate = \"cloud.db\"\nadmin_token = \"{admin}\"\nmax_upload_mib = 256\n"
    );
    let identities = if args.tls { Some(fleet_pki(work.path(), &names)?) } else { None };
    if let Some((pki, _)) = &identities {
        cloud_toml.push_str(&format!(
            "node_auth = \"token-and-certificate\"\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            pki.join("localhost.pem"),
            pki.join("localhost.key"),
            pki.join("ca.pem")
        ));
    }
    for (n, t) in names.iter().zip(&tokens) {
        cloud_toml.push_str(&format!("[nodes.{n}]\ntoken = \"{t}\"\n"));
    }
    std::fs::write(work.path().join("cloud.toml"), cloud_toml)?;
    let fedavg = crate::cli::plugin_path(&plugins, "fedavg");
    let job = format!(
        "[job]\nname = \"bench\"\n\n[rounds]\nmin_clients = {c}\ndeadline_secs = 3600\n\n[stop]\nrounds = {r}\n\n\
         [model]\nkind = \"mlp\"\ninputs = {w}\nclasses = {w}\n\n[aggregator]\nplugin = {p:?}\n",
        c = args.clients,
        r = args.rounds,
        w = args.width,
        p = fedavg.display().to_string()
    );
    std::fs::write(work.path().join("job.toml"), job)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let operator_tls =
        nereid_net::tls::ClientTls { ca: identities.as_ref().map(|(pki, _)| pki.join("ca.pem")), ..Default::default() };
    let api = Api::connect(&url, &admin, Duration::from_secs(120), &operator_tls, false)?;
    let fleet = start_cloud(work.path(), &cache, &api, &rt)?;
    let pid = fleet.0[0].id();

    // The clients' updates, made before any timing (this is "training") and written to files
    // one at a time: the harness streams them from disk, so it holds no more than a chunk of
    // each upload in flight whatever the number of clients and the model's size.
    let spec = ModelSpec::Mlp { inputs: args.width, hidden: vec![], classes: args.width };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let updates_dir = work.path().join("updates");
    std::fs::create_dir_all(&updates_dir)?;
    let mut updates: Vec<(PathBuf, u64)> = Vec::new();
    let mut model_bytes = 0;
    let making = indicatif::ProgressBar::new(args.clients as u64);
    for i in 0..args.clients {
        let model = spec.init(i as u64);
        let n: u64 = rng.gen_range(10..1000);
        let meta = std::collections::HashMap::from([
            (META_NUM_EXAMPLES.to_string(), n.to_string()),
            (META_METRICS.to_string(), "{}".to_string()),
        ]);
        let path = updates_dir.join(format!("client-{i}.safetensors"));
        model_io::write(&path, &model, Some(meta))?;
        model_bytes = std::fs::metadata(&path)?.len() as usize;
        updates.push((path, n));
        making.inc(1);
    }
    making.finish_and_clear();
    let parameters: u64 = spec.parameters().iter().map(|(_, s)| s.iter().product::<u64>()).sum();

    let runtime = Runtime::new(Some(cache.clone()))?;
    let components = crate::cli::components(Some(&cache))?;
    let job = nereid::config::job::load(&work.path().join("job.toml"), &runtime, &|s, b| {
        crate::cli::fetcher(&rt, &components, s, b)
    })?;
    rt.block_on(api.apply(job))?;
    // The fixed overhead: the cloud with the job applied (aggregator compiled and instantiated),
    // before any round; then the peak is measured from here on.
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = rss_kib(pid, "VmRSS:")? * 1024;
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("resetting the cloud's peak RSS")?;
    // Plain HTTP: one client per simulated node, sharing one connection pool. Mutual TLS: each
    // node with its own certificate, so its own connections.
    let nodes: Vec<Api> = match &identities {
        None => {
            let http = reqwest::Client::new();
            tokens.iter().map(|t| Api::with_http(&url, t, http.clone())).collect()
        }
        Some((_, tls)) => tokens
            .iter()
            .zip(tls)
            .map(|(t, tls)| Api::connect(&url, t, Duration::from_secs(120), tls, false))
            .collect::<Result<_, _>>()?,
    };
    let mut round_ms = Vec::new();
    let progress = indicatif::ProgressBar::new(args.rounds as u64);
    for round in 1..=args.rounds {
        // Every client asks for work until the round is open for it.
        rt.block_on(async {
            loop {
                let mut open = 0;
                for node in &nodes {
                    open += usize::from(node.task().await?.is_some_and(|t| t.round == round));
                }
                if open == nodes.len() {
                    return Ok::<_, anyhow::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })?;
        let t0 = Instant::now();
        rt.block_on(async {
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency));
            let mut tasks = Vec::new();
            for (node, (path, _)) in nodes.iter().zip(&updates) {
                let (node, sem, path) = (node.clone(), sem.clone(), path.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = sem.acquire().await?;
                    let file = tokio::fs::File::open(&path).await?;
                    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                    node.upload_body("bench", round, body).await?;
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            loop {
                if api.status("bench").await?.rounds_done >= round {
                    return Ok::<_, anyhow::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })?;
        round_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let peak = rss_kib(pid, "VmHWM:")? * 1024;
    let client_peak = rss_kib(std::process::id(), "VmHWM:")? * 1024;
    drop(fleet);

    // Floor: the same fold in this process, the updates read from their files.
    let mut plugin = AggregatorPlugin::load(
        &runtime,
        &fedavg,
        Limits { call_timeout: Duration::from_secs(600), ..Limits::default() },
        &ConfigTable::new(),
    )?;
    let t0 = Instant::now();
    plugin.begin_round(&RoundContext::default(), None)?;
    for (i, (path, n)) in updates.iter().enumerate() {
        plugin.accumulate(&ClientUpdate {
            client: i.to_string(),
            kind: UpdateKind::Weights,
            tensors: model_io::read(path)?,
            num_examples: *n,
            metrics: Vec::new(),
            file: None,
        })?;
    }
    plugin.finish()?;
    let floor_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut sorted = round_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let report = Report {
        clients: args.clients,
        tls: args.tls,
        parameters,
        model_bytes,
        median_round_ms: median,
        round_ms,
        in_process_fedavg_ms: floor_ms,
        ratio_to_in_process: median / floor_ms,
        cloud_peak_rss_bytes: peak,
        cloud_rss_before_rounds_bytes: rss_before,
        peak_rss_above_fixed_over_model_size: (peak as f64 - rss_before as f64) / model_bytes as f64,
        client_peak_rss_bytes: client_peak,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "round with {} clients x {} parameters ({:.1} MB per update), {} rounds, {}",
        report.clients,
        report.parameters,
        model_bytes as f64 / 1e6,
        args.rounds,
        if args.tls { "mutual TLS" } else { "plain HTTP" }
    );
    println!(
        "  server-side round time (upload, persist, aggregate, commit): median {:.0} ms {:?}",
        median,
        report.round_ms.iter().map(|m| m.round()).collect::<Vec<_>>()
    );
    println!(
        "  the same FedAvg in one process, updates read from their files: {:.0} ms (round / that = {:.2}x)",
        floor_ms, report.ratio_to_in_process
    );
    println!(
        "  cloud peak RSS during the rounds {:.1} MB = {:.1} MB fixed (job applied, before round 1) + {:.2} x one model",
        peak as f64 / 1e6,
        rss_before as f64 / 1e6,
        (peak as f64 - rss_before as f64) / model_bytes as f64
    );
    println!(
        "  the benchmark's own peak RSS up to the end of the rounds (clients streaming from disk): {:.1} MB",
        client_peak as f64 / 1e6
    );
    Ok(())
}
