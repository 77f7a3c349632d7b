//! `nereid bench serve`: a joint inference service under concurrent clients, against ONNX
//! Runtime called natively from as many threads on the same model, in one run.
//!
//! Native configurations (each client a thread calling `Session::run` in a loop): a session per
//! client with one intra-op thread; one session per core shared by the clients, one thread
//! each; one session with a thread per core shared by all. The best is the baseline, and runs
//! again once the edge has stopped: the pool's throughput (the mean of its safetensors phases
//! before and after JSON's) is compared with the mean of native's first and last phases.
//! nereid: a cloud and an edge of this binary on loopback, the edge serving the model through
//! the hard-example-mining router (edge-only, so the cloud is never asked) as three services:
//! `one` (1 instance), `pool` (an instance per core) and `batch` (an instance per core,
//! batches of up to 8, only for a model whose first dimension is open); every instance's
//! session uses one thread. Clients are HTTP/1.1 keep-alive connections in this process.
//! `pool` is also sent JSON bodies: the same values in 17 digits (as Python writes float32
//! values), and random float32 values in their shortest form, then safetensors bodies again:
//! JSON is compared with the mean of the safetensors phases before and after it, so a machine
//! whose speed drifts during the run (a shared host) moves both sides alike. The JSON bodies'
//! number arrays are also read in this process by the edge's reader and number by number.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde::Serialize;

use super::fleet::Latency;
use nereid::inference::{profile, wire};
use nereid::protocol::routes;
use nereid::runtime::TensorData;

#[derive(Args)]
pub struct ServeBench {
    /// The ONNX model, e.g. the test CNN: `python3 tests/fixtures/models/cnn.py cnn.onnx`.
    model: PathBuf,
    /// Concurrent clients of each measured phase (the first is the one compared with native).
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64])]
    clients: Vec<usize>,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// The router component [default: hard-example-mining from the plugin directory].
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Keep the benchmark's directory (configs, logs, state) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Phase {
    name: String,
    clients: usize,
    requests: u64,
    errors: u64,
    requests_per_sec: f64,
    latency: Latency,
    /// The edge process after the phase (nereid phases only).
    #[serde(skip_serializing_if = "Option::is_none")]
    edge_threads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    edge_rss_bytes: Option<u64>,
    /// CPU the edge used during the phase, in cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    edge_cpu_cores: Option<f64>,
    /// CPU this process (the clients, or native ONNX Runtime) used during the phase, in cores.
    client_cpu_cores: f64,
}

#[derive(Serialize)]
struct Ratios {
    /// pool (safetensors, the mean of the phases before and after JSON's) / the best native
    /// configuration (the mean of its phase at the start and its phase at the end), at the first
    /// client count.
    throughput_vs_native: f64,
    /// pool (the phase before JSON's) / the best native configuration's phase at the start.
    throughput_vs_native_first: f64,
    /// pool's p99 / that native configuration's p99.
    p99_vs_native: f64,
    /// pool / one (one intra-op thread per session).
    pool_vs_one: f64,
    /// pool with JSON bodies (numbers in 17 significant digits, as Python writes float32
    /// values) / pool with safetensors bodies (the mean of the phases before and after JSON's).
    json_vs_safetensors: f64,
    /// pool with JSON bodies of random float32 values in their shortest form (as serde_json
    /// writes an `f32`) / pool with safetensors bodies (the same mean).
    json_shortest_vs_safetensors: f64,
    /// batch / pool (None without a batch service).
    batch_vs_pool: Option<f64>,
    /// Edge threads and RSS at the last client count over the first (pool).
    threads_growth: f64,
    rss_growth: f64,
}

#[derive(Serialize)]
struct ServeReport {
    model: String,
    cores: usize,
    secs: f64,
    /// Largest difference between the edge's answer and native ONNX Runtime's.
    max_abs_diff: f64,
    native_best: String,
    phases: Vec<Phase>,
    ratios: Ratios,
    /// The JSON bodies' number arrays read in this process, by each reader.
    json_readers: Vec<JsonReading>,
}

/// How fast the number array of one of the benchmark's JSON bodies is read: by the reader the
/// edge uses (SIMD where the CPU has it) and number by number, best of 10 x 20 reads each.
#[derive(Serialize)]
struct JsonReading {
    body: String,
    numbers: usize,
    edge_reader_ns_per_number: f64,
    number_by_number_ns_per_number: f64,
}

/// A JSON array reader: the bytes and where the `[` is, to the f32 bytes and where it ends.
type ArrayReader = fn(&[u8], usize) -> Option<(Vec<u8>, usize)>;

fn json_reading(body_name: &str, body: &[u8]) -> anyhow::Result<JsonReading> {
    use nereid::inference::json_array::{f32_array, f32_array_number_by_number};
    let key = b"\"data\":";
    let at = body.windows(key.len()).position(|w| w == key).context("no data array in the JSON body")? + key.len();
    let want = f32_array_number_by_number(body, at).context("the JSON body's data array")?;
    if f32_array(body, at).as_ref() != Some(&want) {
        bail!("the edge's JSON reader and the number-by-number one read the {body_name} body differently");
    }
    let numbers = want.0.len() / 4;
    let best_ns = |read: ArrayReader| {
        (0..10)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..20 {
                    std::hint::black_box(read(std::hint::black_box(body), at));
                }
                t.elapsed().as_nanos() as f64 / 20.0 / numbers.max(1) as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    Ok(JsonReading {
        body: body_name.to_string(),
        numbers,
        edge_reader_ns_per_number: best_ns(f32_array),
        number_by_number_ns_per_number: best_ns(f32_array_number_by_number),
    })
}

/// Runs `clients` threads calling `call` for `secs`: requests and latencies.
fn native_phase(
    name: &str,
    clients: usize,
    secs: f64,
    call: impl Fn(usize) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Phase> {
    let stop = AtomicBool::new(false);
    let micros = Mutex::new(Vec::new());
    let errors = AtomicU64::new(0);
    let started = Instant::now();
    let cpu = nereid_harness::cpu_seconds(std::process::id())?;
    std::thread::scope(|s| {
        for c in 0..clients {
            let (stop, micros, errors, call) = (&stop, &micros, &errors, &call);
            s.spawn(move || {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match call(c) {
                        Ok(()) => mine.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX)),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                super::fleet::lock(micros).extend(mine);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed().as_secs_f64();
    let client_cpu_cores = (nereid_harness::cpu_seconds(std::process::id())? - cpu) / elapsed;
    let micros = std::mem::take(&mut *super::fleet::lock(&micros));
    Ok(Phase {
        name: name.to_string(),
        clients,
        requests: micros.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        requests_per_sec: micros.len() as f64 / elapsed,
        latency: Latency::of(micros),
        edge_threads: None,
        edge_rss_bytes: None,
        edge_cpu_cores: None,
        client_cpu_cores,
    })
}

fn session(onnx: &[u8], threads: usize) -> anyhow::Result<ort::session::Session> {
    let options = nereid::runtime::onnxruntime::SessionOptions { intra_threads: Some(threads) };
    Ok(nereid::runtime::onnxruntime::build_session(onnx, options)?)
}

fn run_session(session: &mut ort::session::Session, inputs: &[TensorData]) -> anyhow::Result<()> {
    let values = inputs
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            Ok((t.name.clone(), ort::value::Tensor::from_array((shape, wire::le_f32s(&t.data)))?.into_dyn()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outputs = session.run(values)?;
    for (_, v) in outputs.iter() {
        std::hint::black_box(v.try_extract_tensor::<f32>()?);
    }
    Ok(())
}

/// The native configurations, in the order `native` runs them.
const NATIVE_CONFIGS: usize = 3;

/// Native configuration `config` (of `NATIVE_CONFIGS`) at `clients`, named by `suffix` after
/// its description.
fn native(
    config: usize,
    suffix: &str,
    (onnx, inputs): (&[u8], &[TensorData]),
    clients: usize,
    secs: f64,
    cores: usize,
) -> anyhow::Result<Phase> {
    nereid::runtime::nn::init_onnxruntime()?;
    let sessions = |count: usize, threads: usize| -> anyhow::Result<Vec<Mutex<ort::session::Session>>> {
        (0..count).map(|_| session(onnx, threads).map(Mutex::new)).collect()
    };
    match config {
        0 => {
            let own = sessions(clients, 1)?;
            native_phase(&format!("native: a session per client, 1 thread{suffix}"), clients, secs, |c| {
                run_session(&mut super::fleet::lock(&own[c]), inputs)
            })
        }
        1 => {
            let shared = sessions(cores, 1)?;
            native_phase(&format!("native: {cores} sessions shared, 1 thread each{suffix}"), clients, secs, |c| {
                run_session(&mut super::fleet::lock(&shared[c % cores]), inputs)
            })
        }
        _ => {
            let one = sessions(1, cores)?;
            native_phase(&format!("native: 1 session shared, {cores} threads{suffix}"), clients, secs, |_| {
                run_session(&mut super::fleet::lock(&one[0]), inputs)
            })
        }
    }
}

type Conn = SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Conn> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn post(conn: &mut Conn, path: &str, media: &str, body: Bytes) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
    conn.ready().await?;
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, "127.0.0.1")
        .header(hyper::header::CONTENT_TYPE, media)
        .body(Full::new(body))?;
    let resp = conn.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// `clients` connections posting `body` to `path` for `secs`.
async fn http_phase(
    name: &str,
    addr: std::net::SocketAddr,
    path: &str,
    (media, body): (&str, &Bytes),
    clients: usize,
    secs: f64,
    edge_pid: u32,
) -> anyhow::Result<Phase> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let cpu = (nereid_harness::cpu_seconds(edge_pid)?, nereid_harness::cpu_seconds(std::process::id())?);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut conn = connect(addr).await?;
        let (path, media, body) = (path.to_string(), media.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let (mut micros, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match post(&mut conn, &path, &media, body.clone()).await {
                    Ok((s, _)) if s.is_success() => {
                        micros.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX))
                    }
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        match connect(addr).await {
                            Ok(c) => conn = c,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            (micros, errors)
        }));
    }
    let (mut micros, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (m, e) = t.await?;
        micros.extend(m);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let edge_cpu_cores = (nereid_harness::cpu_seconds(edge_pid)? - cpu.0) / elapsed;
    let client_cpu_cores = (nereid_harness::cpu_seconds(std::process::id())? - cpu.1) / elapsed;
    let threads = super::round::rss_kib(edge_pid, "Threads:")?;
    Ok(Phase {
        name: name.to_string(),
        clients,
        requests: micros.len() as u64,
        errors,
        requests_per_sec: micros.len() as f64 / elapsed,
        latency: Latency::of(micros),
        edge_threads: Some(threads),
        edge_rss_bytes: Some(super::round::rss_kib(edge_pid, "VmRSS:")? * 1024),
        edge_cpu_cores: Some(edge_cpu_cores),
        client_cpu_cores,
    })
}

pub fn run(args: ServeBench) -> anyhow::Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) || !args.secs.is_finite() || args.secs <= 0.0 {
        bail!("--clients must name positive counts and --secs must be positive");
    }
    let dir = tempfile::tempdir()?;
    let report = measure_in(&args, dir.path())?;
    if args.keep {
        let kept = dir.keep();
        eprintln!("kept {}", kept.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} on {} cores, {} s per phase; answers within {:.1e} of native",
        report.model, report.cores, report.secs, report.max_abs_diff
    );
    println!(
        "{:<48} {:>7} {:>9} {:>8} {:>8} {:>9} {:>9} {:>7} {:>8}",
        "phase", "clients", "req/s", "p50 ms", "p99 ms", "edge CPU", "this CPU", "threads", "RSS MB"
    );
    for p in &report.phases {
        println!(
            "{:<48} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>9} {:>9.2} {:>7} {:>8}{}",
            p.name,
            p.clients,
            p.requests_per_sec,
            p.latency.p50_ms,
            p.latency.p99_ms,
            p.edge_cpu_cores.map_or("-".into(), |c| format!("{c:.2}")),
            p.client_cpu_cores,
            p.edge_threads.map_or("-".into(), |t| t.to_string()),
            p.edge_rss_bytes.map_or("-".into(), |r| format!("{:.1}", r as f64 / 1e6)),
            if p.errors > 0 { format!("  ({} errors)", p.errors) } else { String::new() }
        );
    }
    for j in &report.json_readers {
        println!(
            "JSON body, {} ({} numbers): read {:.2} ns a number by the edge's reader, {:.2} number by number ({:.2}x)",
            j.body,
            j.numbers,
            j.edge_reader_ns_per_number,
            j.number_by_number_ns_per_number,
            j.number_by_number_ns_per_number / j.edge_reader_ns_per_number
        );
    }
    let r = &report.ratios;
    println!(
        "pool vs best native ({}): throughput {:.2}x (start and end; {:.2}x the first phases alone), p99 {:.2}x; pool vs one: {:.2}x; JSON vs safetensors (before and after): {:.2}x (shortest f32 text {:.2}x){}; edge threads {:.2}x and RSS {:.2}x from {} to {} clients",
        report.native_best,
        r.throughput_vs_native,
        r.throughput_vs_native_first,
        r.p99_vs_native,
        r.pool_vs_one,
        r.json_vs_safetensors,
        r.json_shortest_vs_safetensors,
        r.batch_vs_pool.map_or(String::new(), |b| format!("; batch vs pool: {b:.2}x")),
        r.threads_growth,
        r.rss_growth,
        args.clients[0],
        args.clients[args.clients.len() - 1],
    );
    Ok(())
}

/// A JSON body of the same shapes as `inputs` holding random float32 values in [-1, 1), each
/// written in its shortest form (serde_json's `f32`: 9 significant digits or fewer, about 11
/// characters), where Python writes every float32 value in 17 digits.
fn shortest_json(inputs: &[TensorData]) -> anyhow::Result<Bytes> {
    #[derive(Serialize)]
    struct Tensor<'a> {
        shape: &'a [u64],
        data: Vec<f32>,
    }
    #[derive(Serialize)]
    struct Body<'a> {
        inputs: std::collections::BTreeMap<&'a str, Tensor<'a>>,
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = || {
        // xorshift64; the top 24 bits as a float32 in [-1, 1), exactly
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u32 << 23) as f32 - 1.0
    };
    let inputs = inputs
        .iter()
        .map(|t| (t.name.as_str(), Tensor { shape: &t.shape, data: (0..t.data.len() / 4).map(|_| random()).collect() }))
        .collect();
    // Serialized from `f32`s directly: through serde_json's `Value` they would become f64s.
    Ok(Bytes::from(serde_json::to_vec(&Body { inputs })?))
}

fn measure_in(args: &ServeBench, dir: &Path) -> anyhow::Result<ServeReport> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let router = args
        .plugin
        .clone()
        .unwrap_or_else(|| crate::cli::plugin_path(&crate::cli::default_plugin_dir(), "hard-example-mining"));
    if !router.is_file() {
        bail!("router plugin {} not found (build the plugins: cargo xtask plugins)", router.display());
    }
    let onnx = std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let model = nereid_onnx::Model::decode(onnx.as_slice()).with_context(|| format!("{}", args.model.display()))?;
    let inputs = profile::patterned_inputs(&model, 1)?;
    let open_batch = profile::input_specs(&model)?.iter().all(|s| matches!(s.shape.first(), Some(None)));
    let safetensors = Bytes::from(wire::to_safetensors(&inputs)?);
    let json = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "inputs": inputs.iter().map(|t| (t.name.clone(), serde_json::json!({"shape": t.shape, "data": wire::le_f32s(&t.data)}))).collect::<serde_json::Map<_, _>>()
    }))?);
    let json_shortest = shortest_json(&inputs)?;
    let json_readers = vec![json_reading("17 digits", &json)?, json_reading("shortest f32", &json_shortest)?];

    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_message("native ONNX Runtime");
    let first = args.clients[0];
    let mut phases = (0..NATIVE_CONFIGS)
        .map(|config| native(config, "", (&onnx, &inputs), first, args.secs, cores))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (best_index, _) = phases
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.requests_per_sec.total_cmp(&b.1.requests_per_sec))
        .context("no native phase")?;
    let native_best = phases[best_index].name.clone();
    let (native_rps, native_p99) = (phases[best_index].requests_per_sec, phases[best_index].latency.p99_ms);

    let models = dir.join("models");
    std::fs::create_dir_all(models.join("bench"))?;
    std::fs::write(models.join("bench/model.onnx"), &onnx)?;
    let cache = dir.join("cache");
    let (cloud_port, edge_port) = (super::split::free_port()?, super::split::free_port()?);
    let token = "bench-edge-token";
    std::fs::write(
        dir.join("cloud.toml"),
        format!(
            "listen = \"127.0.0.1:{cloud_port}\"\nstate = \"cloud.db\"\nadmin_token = \"bench-admin\"\n\
             [nodes.bench-edge]\ntoken = \"{token}\"\n"
        ),
    )?;
    let service = |name: &str, instances: usize, batch: usize| {
        format!(
            "[services.{name}]\nkind = \"joint\"\nmodel = \"bench\"\ninstances = {instances}\nthreads = 1\nqueue = 1024\n\
             batch_max = {batch}\nrouter = {{ plugin = {:?}, config = {{ policy = \"edge-only\" }} }}\n",
            router.display().to_string()
        )
    };
    let batch_service = if open_batch { service("batch", cores, 8) } else { String::new() };
    std::fs::write(
        dir.join("edge.toml"),
        format!(
            "name = \"bench-edge\"\ncloud = \"http://127.0.0.1:{cloud_port}\"\ntoken = \"{token}\"\n\
             state = \"edge.db\"\nlisten = \"127.0.0.1:{edge_port}\"\nmodels = \"models\"\n\
             # The pools keep every core busy: one async worker, which does not preempt them.\n\
             io_threads = 1\nio_scheduling = \"batch\"\n\
             {}{}{batch_service}\
             # The benchmark's own edge on loopback: its API needs no tokens.\n[api]\nopen = true\n",
            service("one", 1, 1),
            service("pool", cores, 1),
        ),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cores).enable_all().build()?;
    let http = reqwest::Client::new();
    let cloud_log = dir.join("cloud.log");
    let cloud = super::split::spawn("cloud", &dir.join("cloud.toml"), &cache, &cloud_log, None, None)?;
    let edge_log = dir.join("edge.log");
    let edge = super::split::spawn("edge", &dir.join("edge.toml"), &cache, &edge_log, None, None)?;
    let edge_pid = edge.0.id();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], edge_port).into();
    let max_abs_diff = rt.block_on(async {
        super::split::wait_healthy(&http, &format!("http://127.0.0.1:{cloud_port}{}", routes::HEALTH), &cloud_log)
            .await?;
        super::split::wait_healthy(&http, &format!("http://{addr}{}", routes::HEALTH), &edge_log).await?;
        let mut conn = connect(addr).await?;
        let (status, body) =
            post(&mut conn, &routes::infer("pool"), "application/safetensors", safetensors.clone()).await?;
        if !status.is_success() {
            bail!("the edge refused the request: {status}: {}", String::from_utf8_lossy(&body));
        }
        let answer: serde_json::Value = serde_json::from_slice(&body)?;
        let got: Vec<f32> = answer["outputs"]
            .as_array()
            .context("outputs")?
            .iter()
            .flat_map(|o| o["data"].as_array().cloned().unwrap_or_default())
            .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
            .collect();
        let want: Vec<f32> = nereid::inference::NativeModel::new(&onnx)?
            .run(&inputs)?
            .iter()
            .map(wire::f32_values)
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        if got.len() != want.len() {
            bail!("the edge answered {} values, native ONNX Runtime {}", got.len(), want.len());
        }
        anyhow::Ok(got.iter().zip(&want).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max))
    })?;

    let st = ("application/safetensors", &safetensors);
    // The pool at every client count before any other phase, so its threads and memory are
    // compared with nothing else having run in between (the batch service's sessions hold
    // bigger buffers).
    let mut plan: Vec<(String, &str, (&str, &Bytes), usize)> =
        vec![("nereid one: 1 instance, safetensors".to_string(), "one", st, first)];
    for &c in &args.clients {
        plan.push((format!("nereid pool: {cores} instances, safetensors"), "pool", st, c));
    }
    plan.push((format!("nereid pool: {cores} instances, JSON 17 digits"), "pool", ("application/json", &json), first));
    plan.push((
        format!("nereid pool: {cores} instances, JSON shortest f32"),
        "pool",
        ("application/json", &json_shortest),
        first,
    ));
    plan.push((format!("nereid pool: {cores} instances, safetensors, after JSON"), "pool", st, first));
    if open_batch {
        plan.push((format!("nereid batch: {cores} instances, up to 8, safetensors"), "batch", st, first));
    }
    for (name, service, body, clients) in plan {
        progress.set_message(format!("{name}, {clients} clients"));
        let path = routes::infer(service);
        phases.push(rt.block_on(http_phase(&name, addr, &path, body, clients, args.secs, edge_pid))?);
    }
    // The edge and the cloud stopped, the best native configuration once more: the pool's
    // throughput is compared with native's at the start and the end of the run alike.
    drop(edge);
    drop(cloud);
    progress.set_message("native ONNX Runtime again");
    let native_again = native(best_index, ", again", (&onnx, &inputs), first, args.secs, cores)?;
    let native_around = (native_rps + native_again.requests_per_sec) / 2.0;
    phases.push(native_again);
    progress.finish_and_clear();
    let find = |service: &str, body: &str, clients: usize| {
        phases.iter().find(|p| p.name.contains(service) && p.name.contains(body) && p.clients == clients)
    };
    let (one, pool, pool_json, pool_json_shortest, pool_after) = (
        find("nereid one", "safetensors", first).context("one")?,
        find("nereid pool", "safetensors", first).context("pool")?,
        find("nereid pool", "JSON 17", first).context("pool JSON")?,
        find("nereid pool", "JSON shortest", first).context("pool JSON, shortest")?,
        find("nereid pool", "after JSON", first).context("pool after JSON")?,
    );
    let safetensors_around_json = (pool.requests_per_sec + pool_after.requests_per_sec) / 2.0;
    let last_clients = args.clients[args.clients.len() - 1];
    let last_pool = find("nereid pool", "safetensors", last_clients).context("pool at the last client count")?;
    let ratios = Ratios {
        throughput_vs_native: safetensors_around_json / native_around,
        throughput_vs_native_first: pool.requests_per_sec / native_rps,
        p99_vs_native: pool.latency.p99_ms / native_p99,
        pool_vs_one: pool.requests_per_sec / one.requests_per_sec,
        json_vs_safetensors: pool_json.requests_per_sec / safetensors_around_json,
        json_shortest_vs_safetensors: pool_json_shortest.requests_per_sec / safetensors_around_json,
        batch_vs_pool: find("nereid batch", "safetensors", first).map(|b| b.requests_per_sec / pool.requests_per_sec),
        threads_growth: last_pool.edge_threads.unwrap_or(0) as f64 / pool.edge_threads.unwrap_or(1).max(1) as f64,
        rss_growth: last_pool.edge_rss_bytes.unwrap_or(0) as f64 / pool.edge_rss_bytes.unwrap_or(1).max(1) as f64,
    };
    Ok(ServeReport {
        model: args.model.display().to_string(),
        cores,
        secs: args.secs,
        max_abs_diff,
        native_best,
        phases,
        ratios,
        json_readers,
    })
}
