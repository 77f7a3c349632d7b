//! `nereid bench split`: split inference end to end (a cloud and an edge of this binary, the
//! split-infer plugin) through a shaped link at several bandwidths. At each one it reports the
//! edge-only, cloud-only and chosen cut's measured latency, and how far the chosen cut is from
//! the best one found by measuring every cut (a brute-force search that skips a cut only when its
//! transfer time alone exceeds the best latency measured so far, so the best is never missed).
//!
//! The edge runs on CPU 0, the cloud (and this process's client and link) on CPU 1, so neither
//! side's compute is measured while the other computes.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nereid::protocol::routes;
use serde::Serialize;

use nereid::cpu_quota::CpuQuota;
use nereid::inference::profile;
use nereid::inference::wire;
use nereid::link::{LinkProfile, LinkShaper};

#[derive(Args)]
pub struct SplitBench {
    /// The ONNX model to split, e.g. the test CNN:
    /// `python3 tests/fixtures/models/cnn.py wide.onnx --width 128 --size 32`.
    model: PathBuf,
    /// Link bandwidths to measure at, Mbit/s.
    #[arg(long, value_delimiter = ',', default_values_t = [100.0, 10.0, 1.0])]
    bandwidths: Vec<f64>,
    /// Round-trip time the link adds, ms.
    #[arg(long, default_value_t = 4.0)]
    rtt_ms: f64,
    /// Timed requests per cut, after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Slow the edge down to this share of one core (0.01..=1): the edge process runs in a
    /// cgroup of its own with a CPU quota (needs root or a delegated cgroup), so offloading to
    /// the cloud can pay on one machine.
    #[arg(long)]
    edge_cpu: Option<f64>,
    /// The splitter component [default: split-infer from the plugin directory].
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
struct CutTiming {
    cut: Vec<String>,
    upload_bytes: u64,
    predicted_ms: f64,
    /// None: skipped, its transfer alone takes longer than the best measured latency.
    measured_ms: Option<f64>,
}

#[derive(Serialize)]
struct AtBandwidth {
    bandwidth_mbit_s: f64,
    /// What the edge measured on the link when it planned.
    planned_bandwidth_mbit_s: f64,
    planned_rtt_ms: f64,
    edge_only_ms: f64,
    cloud_only_ms: f64,
    chosen: Vec<String>,
    chosen_predicted_ms: f64,
    chosen_ms: f64,
    best: Vec<String>,
    best_ms: f64,
    /// chosen_ms - best_ms.
    gap_ms: f64,
    /// chosen_ms / best_ms.
    gap_ratio: f64,
    measured_cuts: usize,
    skipped_cuts: usize,
    cuts: Vec<CutTiming>,
}

#[derive(Serialize)]
struct SplitReport {
    model: String,
    rtt_ms: f64,
    /// The share of one core the edge had (None: the whole core).
    edge_cpu_share: Option<f64>,
    repeat: usize,
    /// Largest difference between any answer and the edge-only answer.
    max_abs_diff: f64,
    bandwidths: Vec<AtBandwidth>,
}

/// A child process killed when dropped.
pub(super) struct Process(pub(super) Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only write
    // into it and read it (no allocation, so this is also safe between fork and exec).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs this binary's `role` (cloud or edge), on `cpu` if given, in `quota`'s cgroup if given,
/// its log in `log`.
pub(super) fn spawn(
    role: &str,
    config: &Path,
    cache: &Path,
    log: &Path,
    cpu: Option<usize>,
    quota: Option<&CpuQuota>,
) -> anyhow::Result<Process> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(role)
        .arg("--config")
        .arg(config)
        .env("NEREID_CACHE_DIR", cache)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    // SAFETY: prctl takes plain integers. A benchmark interrupted (Ctrl-C, kill) must not leave
    // its cloud and edge running, nor a CPU quota group that cannot be removed while they live.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(cpu) = cpu {
        // SAFETY: the closure only makes the affinity syscall (see pin_current_thread).
        unsafe {
            cmd.pre_exec(move || pin_current_thread(cpu));
        }
    }
    if let Some(quota) = quota {
        let enter = quota.entry();
        // SAFETY: `entry` makes only open/write/close syscalls on a path prepared before fork.
        unsafe {
            cmd.pre_exec(enter);
        }
    }
    Ok(Process(cmd.spawn().with_context(|| format!("starting the {role}"))?))
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(super) async fn wait_healthy(http: &reqwest::Client, url: &str, log: &Path) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{url} did not answer within 120 s; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    outputs: Vec<Output>,
    total_ms: f64,
    #[serde(default)]
    fallback: bool,
}

#[derive(serde::Deserialize)]
struct Output {
    data: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct PlannedCut {
    tensors: Vec<String>,
    predicted_ms: f64,
}

#[derive(serde::Deserialize)]
struct Plan {
    cut: Vec<String>,
    predicted_ms: f64,
    bandwidth_mbit_s: f64,
    rtt_ms: f64,
    cuts: Vec<PlannedCut>,
}

/// Answers of one cut: a warm-up, then `repeat` timed requests; the median of the edge's
/// `total_ms` and the last answer's outputs.
async fn measure(
    http: &reqwest::Client,
    url: &str,
    body: &[u8],
    cut: &[String],
    repeat: usize,
) -> anyhow::Result<(f64, Vec<f32>)> {
    let mut times = Vec::with_capacity(repeat);
    let mut last = Vec::new();
    for i in 0..=repeat {
        let resp = http
            .post(url)
            .header("content-type", "application/safetensors")
            .header("x-nereid-cut", cut.join(","))
            .body(body.to_vec())
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            bail!("cut {}: {status}: {}", cut.join(","), resp.text().await.unwrap_or_default());
        }
        let answer: Answer = resp.json().await?;
        if answer.fallback {
            bail!("cut {}: the cloud did not answer (the edge fell back to running the whole model)", cut.join(","));
        }
        if i > 0 {
            times.push(answer.total_ms);
        }
        last = answer.outputs.into_iter().flat_map(|o| o.data).collect();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], last))
}

pub fn run(args: SplitBench) -> anyhow::Result<()> {
    if args.repeat == 0 || args.bandwidths.is_empty() {
        bail!("--repeat must be at least 1 and --bandwidths must name one");
    }
    if let Some(bw) = args.bandwidths.iter().find(|b| !(**b > 0.0 && b.is_finite())) {
        bail!("--bandwidths: {bw} is not a positive number of Mbit/s");
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        bail!("this benchmark needs 2 CPUs: the edge runs on one, the cloud on the other");
    }
    let quota = args.edge_cpu.map(CpuQuota::new).transpose().context("--edge-cpu")?;
    let plugin = args
        .plugin
        .clone()
        .unwrap_or_else(|| crate::cli::plugin_path(&crate::cli::default_plugin_dir(), "split-infer"));
    if !plugin.is_file() {
        bail!("splitter plugin {} not found (build the plugins: cargo xtask plugins)", plugin.display());
    }
    let onnx = std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let typed = profile::typed(&onnx).with_context(|| format!("{}", args.model.display()))?;
    let outputs: Vec<String> = typed.model.outputs().into_iter().map(str::to_string).collect();
    let inputs: Vec<String> = typed.model.runtime_inputs().into_iter().map(|v| v.name.clone()).collect();
    let body = wire::to_safetensors(&profile::patterned_inputs(&typed.model, 1)?)?;

    let dir = tempfile::tempdir()?;
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("bench"))?;
    std::fs::write(models.join("bench/model.onnx"), &onnx)?;
    let cache = dir.path().join("cache");
    let cloud_port = free_port()?;
    let token = "bench-edge-token";
    std::fs::write(
        dir.path().join("cloud.toml"),
        format!(
            "listen = \"127.0.0.1:{cloud_port}\"\nstate = \"cloud.db\"\nadmin_token = \"bench-admin\"\n\
             models = \"models\"\n[nodes.bench-edge]\ntoken = \"{token}\"\n[services.bench]\nmodel = \"bench\"\n"
        ),
    )?;

    // This process (client and link) shares the cloud's CPU; threads it starts inherit that.
    pin_current_thread(1).context("pinning the benchmark to CPU 1")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let cloud_log = dir.path().join("cloud.log");
    let _cloud = spawn("cloud", &dir.path().join("cloud.toml"), &cache, &cloud_log, Some(1), None)?;
    rt.block_on(wait_healthy(&http, &format!("http://127.0.0.1:{cloud_port}{}", routes::HEALTH), &cloud_log))?;
    let link = |mbit_s: f64| LinkProfile { mbit_s, one_way_delay_ms: args.rtt_ms / 2.0 };
    let shaper = rt.block_on(LinkShaper::start(([127, 0, 0, 1], cloud_port).into(), link(args.bandwidths[0])))?;

    let progress = indicatif::ProgressBar::new(args.bandwidths.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut reference: Option<Vec<f32>> = None;
    let mut max_abs_diff = 0f64;
    let mut results = Vec::new();
    for (i, &bw) in args.bandwidths.iter().enumerate() {
        progress.set_message(format!("{bw} Mbit/s"));
        shaper.set(link(bw))?;
        let edge_port = free_port()?;
        let edge_toml = dir.path().join(format!("edge-{i}.toml"));
        std::fs::write(
            &edge_toml,
            format!(
                "name = \"bench-edge\"\ncloud = \"http://127.0.0.1:{cloud_port}\"\ntoken = \"{token}\"\n\
                 state = \"edge-{i}.db\"\nlisten = \"127.0.0.1:{edge_port}\"\nmodels = \"models\"\n\
                 [services.bench]\nkind = \"split\"\nmodel = \"bench\"\ncloud = \"http://{}\"\nrelink_secs = 0\n\
                 cloud_timeout_ms = 60000\nsplitter = {{ plugin = {:?} }}\n\
                 # The benchmark's own edge on loopback: its API needs no tokens.\n[api]\nopen = true\n",
                shaper.addr(),
                plugin.display().to_string()
            ),
        )?;
        let edge_log = dir.path().join(format!("edge-{i}.log"));
        let edge = spawn("edge", &edge_toml, &cache, &edge_log, Some(0), quota.as_ref())?;
        let base = format!("http://127.0.0.1:{edge_port}");
        let at = rt.block_on(async {
            wait_healthy(&http, &format!("{base}{}", routes::HEALTH), &edge_log).await?;
            let resp = http.get(format!("{base}{}", routes::plan("bench"))).send().await?;
            if !resp.status().is_success() {
                bail!("planning: {}", resp.text().await.unwrap_or_default());
            }
            let plan: Plan = resp.json().await?;
            let url = format!("{base}{}", routes::infer("bench"));
            let bytes =
                |cut: &[String]| cut.iter().map(|t| typed.tensor_bytes.get(t).copied().unwrap_or(0)).sum::<u64>();
            let edge_only = |cut: &[String]| cut.iter().all(|t| outputs.contains(t));
            let cloud_only = |cut: &[String]| cut.iter().all(|t| inputs.contains(t));
            let mut cuts: Vec<CutTiming> = plan
                .cuts
                .iter()
                .map(|c| CutTiming {
                    cut: c.tensors.clone(),
                    upload_bytes: if edge_only(&c.tensors) { 0 } else { bytes(&c.tensors) },
                    predicted_ms: c.predicted_ms,
                    measured_ms: None,
                })
                .collect();
            cuts.sort_by(|a, b| a.predicted_ms.total_cmp(&b.predicted_ms));
            // The edge-only answer first: every other answer is checked against it.
            if let Some(k) = cuts.iter().position(|c| edge_only(&c.cut)) {
                let c = cuts.remove(k);
                cuts.insert(0, c);
            }
            let mut best = f64::INFINITY;
            for c in &mut cuts {
                let transfer_ms =
                    if c.upload_bytes == 0 { 0.0 } else { c.upload_bytes as f64 * 8.0 / (bw * 1e3) + args.rtt_ms };
                let extreme = edge_only(&c.cut) || cloud_only(&c.cut);
                if transfer_ms >= best && !extreme {
                    continue;
                }
                let (ms, out) = measure(&http, &url, &body, &c.cut, args.repeat).await?;
                match &reference {
                    None => reference = Some(out),
                    Some(r) => {
                        if r.len() != out.len() {
                            bail!(
                                "cut {}: {} outputs, the edge-only answer has {}",
                                c.cut.join(","),
                                out.len(),
                                r.len()
                            );
                        }
                        let diff = r.iter().zip(&out).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
                        max_abs_diff = max_abs_diff.max(diff);
                    }
                }
                best = best.min(ms);
                c.measured_ms = Some(ms);
            }
            let measured_of = |cut: &[String]| cuts.iter().find(|c| c.cut == cut).and_then(|c| c.measured_ms);
            let chosen_ms = measured_of(&plan.cut).context("the chosen cut was not measured")?;
            let (best_cut, best_ms) = cuts
                .iter()
                .filter_map(|c| c.measured_ms.map(|m| (c.cut.clone(), m)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .context("no cut measured")?;
            let extreme_ms =
                |pick: &dyn Fn(&CutTiming) -> bool| cuts.iter().find(|c| pick(c)).and_then(|c| c.measured_ms);
            Ok(AtBandwidth {
                bandwidth_mbit_s: bw,
                planned_bandwidth_mbit_s: plan.bandwidth_mbit_s,
                planned_rtt_ms: plan.rtt_ms,
                edge_only_ms: extreme_ms(&|c| edge_only(&c.cut)).context("edge-only not measured")?,
                cloud_only_ms: extreme_ms(&|c| cloud_only(&c.cut)).context("cloud-only not measured")?,
                chosen: plan.cut.clone(),
                chosen_predicted_ms: plan.predicted_ms,
                chosen_ms,
                best: best_cut,
                best_ms,
                gap_ms: chosen_ms - best_ms,
                gap_ratio: chosen_ms / best_ms,
                measured_cuts: cuts.iter().filter(|c| c.measured_ms.is_some()).count(),
                skipped_cuts: cuts.iter().filter(|c| c.measured_ms.is_none()).count(),
                cuts,
            })
        });
        drop(edge);
        results.push(at.with_context(|| format!("at {bw} Mbit/s (edge log: {})", edge_log.display()))?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
    }
    let report = SplitReport {
        model: args.model.display().to_string(),
        rtt_ms: args.rtt_ms,
        edge_cpu_share: quota.as_ref().map(|q| q.share),
        repeat: args.repeat,
        max_abs_diff,
        bandwidths: results,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let edge = report.edge_cpu_share.map_or(String::new(), |s| format!(", the edge at {:.0}% of a core", s * 100.0));
    println!(
        "{}: RTT {} ms{edge}, median of {} per cut; every answer within {:.1e} of edge-only",
        report.model, report.rtt_ms, report.repeat, report.max_abs_diff
    );
    println!(
        "{:>9} {:>10} {:>11} {:>9} {:>10} {:>8} {:>9}  chosen cut / best cut",
        "Mbit/s", "edge-only", "cloud-only", "chosen", "predicted", "best", "gap"
    );
    for b in &report.bandwidths {
        let best = if b.best == b.chosen { "(same)".to_string() } else { b.best.join(",") };
        println!(
            "{:>9} {:>10.2} {:>11.2} {:>9.2} {:>10.2} {:>8.2} {:>8.1}%  {} / {}",
            b.bandwidth_mbit_s,
            b.edge_only_ms,
            b.cloud_only_ms,
            b.chosen_ms,
            b.chosen_predicted_ms,
            b.best_ms,
            (b.gap_ratio - 1.0) * 100.0,
            b.chosen.join(","),
            best
        );
    }
    Ok(())
}
