//! `nereid bench swap`: what a plugin swap costs when the new component is already pulled and
//! compiled, against a cold pull and first instantiation, both measured in this run against the
//! embedded registry on loopback.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use nereid::components::Components;
use nereid::runtime::{AggregatorPlugin, Limits, Runtime};
use nereid_registry::server::ServerOptions;
use nereid_registry::Reference;

#[derive(Args)]
pub struct SwapBench {
    /// Warm swaps to time; the median and the 95th percentile are reported.
    #[arg(long, default_value_t = 200)]
    swaps: usize,
    /// Cold pulls to time (each with empty caches); the median is reported.
    #[arg(long, default_value_t = 5)]
    cold: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct SwapReport {
    component_bytes: u64,
    cold_pull_ms: f64,
    cold_compile_and_instantiate_ms: f64,
    cold_total_ms: f64,
    warm_swap_median_ms: f64,
    warm_swap_p95_ms: f64,
    /// The round-boundary step alone: replacing the live instance (the new one is ready).
    switch_median_us: f64,
    warm_over_cold: f64,
    target_ms: f64,
    /// Resident memory of this process before and after the timed swaps (after a warm-up): a
    /// swapped-out instance that lingered would show here.
    rss_before_swaps_kib: u64,
    rss_after_swaps_kib: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn quantile(mut v: Vec<Duration>, q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Pull (registry cache hit or not), load (compile cache hit or not), instantiate and configure.
async fn load(
    components: &Components,
    runtime: &Runtime,
    reference: &Reference,
) -> anyhow::Result<(AggregatorPlugin, Duration, Duration)> {
    let t = Instant::now();
    let fetched = components.fetch_reference(reference, None).await?;
    let pulled = t.elapsed();
    let loaded = runtime.load_bytes(&fetched.bytes, &fetched.origin)?;
    let plugin = AggregatorPlugin::new(runtime, loaded, Limits::default(), &Default::default())?;
    Ok((plugin, pulled, t.elapsed() - pulled))
}

pub fn run(args: SwapBench) -> anyhow::Result<()> {
    if args.swaps < 2 || args.cold == 0 {
        bail!("--swaps must be at least 2 and --cold at least 1");
    }
    let dir = tempfile::tempdir()?;
    let plugins = crate::cli::default_plugin_dir();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let host = listener.local_addr()?.to_string();
    let options = ServerOptions::open(dir.path().join("registry"));
    rt.spawn(nereid_registry::server::serve(listener, options));

    let pusher = Components::new(dir.path().join("push-cache"), &Default::default())?;
    let mut pinned = Vec::new();
    let mut component_bytes = 0;
    for name in ["fedavg", "clipped-mean"] {
        let bytes = std::fs::read(crate::cli::plugin_path(&plugins, name))?;
        component_bytes = component_bytes.max(bytes.len() as u64);
        let reference = Reference::parse(&format!("oci://{host}/bench/{name}:1"))?;
        let pushed = rt.block_on(pusher.client().push(bytes, &reference, None))?;
        pinned.push(reference.pinned(&pushed.manifest_digest));
    }

    let bar = indicatif::ProgressBar::new((args.cold + args.swaps) as u64);
    let (mut pulls, mut loads, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.cold {
        let caches = dir.path().join(format!("cold-{i}"));
        let components = Components::new(caches.join("oci"), &Default::default())?;
        let runtime = Runtime::new(Some(caches.clone()))?;
        let (_, pulled, loaded) = rt.block_on(load(&components, &runtime, &pinned[0]))?;
        pulls.push(pulled);
        loads.push(loaded);
        totals.push(pulled + loaded);
        bar.inc(1);
    }

    // Warm: both components pulled and compiled once; then swap back and forth.
    let caches: PathBuf = dir.path().join("warm");
    let components = Components::new(caches.join("oci"), &Default::default())?;
    let runtime = Runtime::new(Some(caches.clone()))?;
    let mut live = None;
    for r in &pinned {
        live = Some(Arc::new(Mutex::new(rt.block_on(load(&components, &runtime, r))?.0)));
    }
    let slot = Mutex::new(live.ok_or_else(|| anyhow::anyhow!("nothing loaded"))?);
    let (mut swaps, mut switches) = (Vec::new(), Vec::new());
    let swap = |i: usize| -> anyhow::Result<(Duration, Duration)> {
        let t = Instant::now();
        let (plugin, _, _) = rt.block_on(load(&components, &runtime, &pinned[i % 2]))?;
        let s = Instant::now();
        let old = std::mem::replace(
            &mut *slot.lock().map_err(|_| anyhow::anyhow!("poisoned"))?,
            Arc::new(Mutex::new(plugin)),
        );
        drop(old);
        Ok((t.elapsed(), s.elapsed()))
    };
    // Warm-up: allocator pools and caches reach their steady size first.
    for i in 0..20 {
        swap(i)?;
    }
    let pid = std::process::id();
    let rss_before = super::round::rss_kib(pid, "VmRSS:")?;
    for i in 0..args.swaps {
        let (total, switch) = swap(i)?;
        swaps.push(total);
        switches.push(switch);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rss_after = super::round::rss_kib(pid, "VmRSS:")?;
    check_live_instances(1)?;

    let cold_total = quantile(totals, 0.5);
    let warm = quantile(swaps.clone(), 0.5);
    let report = SwapReport {
        component_bytes,
        cold_pull_ms: ms(quantile(pulls, 0.5)),
        cold_compile_and_instantiate_ms: ms(quantile(loads, 0.5)),
        cold_total_ms: ms(cold_total),
        warm_swap_median_ms: ms(warm),
        warm_swap_p95_ms: ms(quantile(swaps, 0.95)),
        switch_median_us: quantile(switches, 0.5).as_secs_f64() * 1e6,
        warm_over_cold: warm.as_secs_f64() / cold_total.as_secs_f64(),
        target_ms: 5.0,
        rss_before_swaps_kib: rss_before,
        rss_after_swaps_kib: rss_after,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("component: {} bytes, registry on {host} (loopback)", report.component_bytes);
    println!(
        "cold pull + first instantiation   {:>8.2} ms  (pull {:.2} ms, compile + instantiate {:.2} ms; median of {})",
        report.cold_total_ms, report.cold_pull_ms, report.cold_compile_and_instantiate_ms, args.cold
    );
    println!(
        "warm swap (cached, precompiled)   {:>8.2} ms  (p95 {:.2} ms; median of {}; target < {} ms)",
        report.warm_swap_median_ms, report.warm_swap_p95_ms, args.swaps, report.target_ms
    );
    println!("  of which the switch itself       {:>8.2} us", report.switch_median_us);
    println!("warm / cold                       {:>8.3}x", report.warm_over_cold);
    println!(
        "resident memory over the swaps    {} -> {} KiB ({:+} KiB); plugin instances alive after: 1",
        report.rss_before_swaps_kib,
        report.rss_after_swaps_kib,
        report.rss_after_swaps_kib as i64 - report.rss_before_swaps_kib as i64
    );
    Ok(())
}

/// Swapped-out instances must be gone: only the live one remains.
fn check_live_instances(expected: usize) -> anyhow::Result<()> {
    let live = nereid::runtime::state::live_instances();
    if live != expected {
        bail!("{live} plugin instances are alive after the swaps, expected {expected}");
    }
    Ok(())
}
