//! The soak: a cloud and three edges run a federated job, inference requests and sample
//! batches while a fault injector kills and restarts processes (kill -9), cuts and restores
//! edges' links, and fills the cloud's state disk. Then nothing may be lost or counted twice:
//! every round has all three updates and its model equals a run without faults, every hard
//! example reached the cloud once, every accepted sample batch is in the replay buffer once.
//!
//! `NEREID_SOAK_SECS` sets how long faults are injected (60 s by default: the CI version);
//! `NEREID_SOAK_SEED` the fault sequence. The figures are printed as one JSON line (`soak: `).
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nereid::link::{LinkProfile, LinkShaper};

use crate::cluster::*;
use crate::common::plugin;
use crate::federated::{job_toml, reference_run};
use crate::inference::write_model;
use crate::replay::{batch, stats};
use crate::storage::SmallDisk;

/// A small deterministic generator (xorshift64*): the fault sequence repeats for a seed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }

    /// 500..=2500 ms.
    fn pause(&mut self) -> Duration {
        Duration::from_millis(500 + self.below(2001))
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Default)]
struct Traffic {
    requests: AtomicU64,
    answered_by_cloud: AtomicU64,
    queued: AtomicU64,
    refused: AtomicU64,
    batches: AtomicU64,
    samples: AtomicU64,
    batches_refused: AtomicU64,
}

#[test]
fn a_fleet_under_random_faults_loses_nothing_and_counts_nothing_twice() {
    let secs = env("NEREID_SOAK_SECS", 60);
    let seed = env("NEREID_SOAK_SEED", 1).max(1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut c = Cluster::new(3, "models = \"models\"\n[services.digits]\nmodel = \"big\"\n");
    let models = c.path("models");
    write_model(&models, "small", 1);
    write_model(&models, "big", 2);

    // The cloud's state on a disk of its own (filled as a fault), sized for the rounds of the
    // run (about 18 a second here, each keeping its model); nodes stay "online" through every
    // outage, so each round selects all three.
    let disk = SmallDisk::mount(c.path("state"), 256.max(secs as u32 / 4));
    let toml = std::fs::read_to_string(c.path("cloud.toml")).expect("cloud.toml");
    let toml = toml
        .replace("online_secs = 5", "online_secs = 600")
        .replace("state = \"cloud.db\"", &format!("state = {:?}", disk.0.join("cloud.db").display().to_string()));
    std::fs::write(c.path("cloud.toml"), toml).expect("cloud.toml");

    // Each edge reaches the cloud through a link the injector can cut.
    let upstream: SocketAddr = format!("127.0.0.1:{}", c.port).parse().expect("addr");
    let profile = LinkProfile { mbit_s: 1000.0, one_way_delay_ms: 0.5 };
    let links: Vec<LinkShaper> =
        (0..3).map(|_| rt.block_on(LinkShaper::start(upstream, profile)).expect("link")).collect();
    let api_port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    for (i, link) in links.iter().enumerate() {
        let path = c.path(&format!("edge-{}/edge.toml", i + 1));
        let mut toml = std::fs::read_to_string(&path).expect("edge.toml");
        toml = toml.replace(&format!("127.0.0.1:{}", c.port), &link.addr().to_string());
        if i == 0 {
            // Edge-1 also serves a joint service (every row a hard example) and a replay buffer.
            toml += &format!(
                "listen = \"127.0.0.1:{api_port}\"\nmodels = {:?}\noutbox_retry_ms = 200\n\
                 [services.digits]\nkind = \"joint\"\nmodel = \"small\"\ncloud_timeout_ms = 1000\n\
                 router = {{ plugin = {:?}, config = {{ policy = \"cloud-only\" }} }}\n\
                 [replay]\nplugin = {:?}\nconfig = {{ policy = \"reservoir\", capacity = 100, seed = 1 }}\n\
                 [api.clients.tests]\ntoken = {EDGE_TOKEN:?}\n",
                models.display().to_string(),
                plugin("hard-example-mining").display().to_string(),
                plugin("replay-buffer").display().to_string()
            );
        }
        std::fs::write(&path, toml).expect("edge.toml");
    }
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    let edge = format!("http://127.0.0.1:{api_port}");
    c.wait_for_edge(0, &edge);
    c.apply("job", &job_toml("digits", "fedavg", 100_000, 3, 600.0));

    // Traffic on edge-1 until the faults stop.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Traffic::default());
    let requests = {
        let (stop, traffic, url) = (stop.clone(), traffic.clone(), format!("{edge}/v1/infer/digits"));
        std::thread::spawn(move || {
            let mut row = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data: Vec<f32> = (0..64).map(|i| ((i as u64 * 7 + row) % 17) as f32).collect();
                let body = serde_json::to_vec(&serde_json::json!({"shape": [1, 64], "data": data})).expect("json");
                let (code, answer) = http("POST", &url, Some(EDGE_TOKEN), body);
                row += 1;
                if code != 200 {
                    eprintln!("soak: request refused: {code} {}", String::from_utf8_lossy(&answer));
                    traffic.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let a: serde_json::Value = serde_json::from_slice(&answer).expect("json");
                traffic.requests.fetch_add(1, Ordering::Relaxed);
                if a["computed"] == "cloud" {
                    traffic.answered_by_cloud.fetch_add(1, Ordering::Relaxed);
                }
                if a["results"][0]["queued"] == true {
                    traffic.queued.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let samples = {
        let (stop, traffic, edge) = (stop.clone(), traffic.clone(), edge.clone());
        std::thread::spawn(move || {
            let mut first = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (code, answer) =
                    http("POST", &format!("{edge}/v1/samples"), Some(EDGE_TOKEN), batch(first, 10, 16, 10));
                if code == 200 {
                    first += 10;
                    traffic.batches.fetch_add(1, Ordering::Relaxed);
                    traffic.samples.fetch_add(10, Ordering::Relaxed);
                } else {
                    eprintln!("soak: sample batch refused: {code} {}", String::from_utf8_lossy(&answer));
                    traffic.batches_refused.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Faults, one at a time, each lasting 0.5-2.5 s, with as long between them.
    let mut dice = Dice(seed);
    let mut faults = std::collections::BTreeMap::<&str, u64>::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(dice.pause());
        let kind = match dice.below(4) {
            0 => {
                c.kill_cloud();
                std::thread::sleep(dice.pause());
                c.start_cloud();
                "cloud killed"
            }
            1 => {
                // Edge-2 or edge-3: edge-1 serves the traffic whose answers are counted.
                let i = 1 + dice.below(2) as usize;
                c.kill_edge(i);
                std::thread::sleep(dice.pause());
                c.start_edge(i);
                "edge killed"
            }
            2 => {
                let link = &links[dice.below(3) as usize];
                link.cut(true);
                std::thread::sleep(dice.pause());
                link.cut(false);
                "link cut"
            }
            _ => {
                let filler = disk.fill();
                std::thread::sleep(dice.pause());
                std::fs::remove_file(filler).expect("space again");
                "cloud disk filled"
            }
        };
        *faults.entry(kind).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    requests.join().expect("requests");
    samples.join().expect("samples");

    // Settled: one more round completes, then round `rounds` is compared with a clean run.
    let after = c.listed("digits").rounds_done;
    c.wait_listed_within(Duration::from_secs(120), "digits", "a round after the faults", |s| s.rounds_done > after);
    let s = c.status("digits");
    let rounds = s.rounds_done;
    let lost_rounds = s.history.iter().filter(|h| h.participants.len() != 3).count();
    let t = Instant::now();
    let m = format!("{edge}/metrics");
    while metric(&m, "nereid_outbox_pending") > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "the outbox did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = http("GET", &c.url("/v1/infer/digits/hard-examples"), Some(&c.admin), Vec::new());
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let kept: Vec<(String, i64)> = serde_json::from_slice(&body).expect("json");
    let answered = traffic.requests.load(Ordering::Relaxed);
    let held = stats(&edge);
    let model = c.model("digits", rounds);
    let report = serde_json::json!({
        "seconds": start.elapsed().as_secs(),
        "seed": seed,
        "faults": faults,
        "rounds": rounds,
        "rounds_missing_an_update": lost_rounds,
        "requests_answered": answered,
        "requests_refused": traffic.refused.load(Ordering::Relaxed),
        "answered_by_the_cloud": traffic.answered_by_cloud.load(Ordering::Relaxed),
        "hard_examples_queued": traffic.queued.load(Ordering::Relaxed),
        "hard_examples_at_the_cloud": kept.len(),
        "hard_examples_lost": answered.saturating_sub(kept.len() as u64),
        "hard_examples_duplicated": (kept.len() as u64).saturating_sub(answered),
        "hard_examples_dropped": metric(&m, "nereid_hard_examples_dropped_total{service=\"digits\"}"),
        "sample_batches_accepted": traffic.batches.load(Ordering::Relaxed),
        "sample_batches_refused": traffic.batches_refused.load(Ordering::Relaxed),
        "samples_accepted": traffic.samples.load(Ordering::Relaxed),
        "samples_offered_in_the_buffer": held["offered"],
        "cloud_state_bytes": std::fs::metadata(disk.0.join("cloud.db")).map_or(0, |m| m.len()),
    });
    eprintln!("soak: {report}");
    assert_eq!(lost_rounds, 0, "every round took all three updates: {report}");
    assert!(kept.iter().all(|(node, _)| node == "edge-1"), "{kept:?}");
    assert_eq!(kept.len() as u64, answered, "every hard example at the cloud once: {report}");
    assert_eq!(traffic.refused.load(Ordering::Relaxed), 0, "{report}");
    assert_eq!(held["offered"], traffic.samples.load(Ordering::Relaxed), "every accepted sample once: {report}");
    assert!(faults.len() == 4 || secs < 60, "every kind of fault injected: {report}");
    drop(c);
    assert_eq!(model, reference_run(rounds), "round {rounds}'s model equals a run without faults: {report}");
}
