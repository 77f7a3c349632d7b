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
    /// Requests that reached edge-1 but got no answer (it was killed): each may or may not have
    /// left a hard example.
    unanswered: AtomicU64,
    /// Requests edge-1 was not there to take (connection refused while it was down).
    not_taken: AtomicU64,
    batches: AtomicU64,
    samples: AtomicU64,
    batches_refused: AtomicU64,
    /// Sample batches sent again under their idempotency key after an attempt got no answer.
    batches_retried: AtomicU64,
    /// Retries edge-1 answered as already taken in (the first attempt's answer was lost).
    batches_replayed: AtomicU64,
    /// The rows of answered requests and of unanswered ones (each request's input names its row).
    rows: std::sync::Mutex<(Vec<u64>, Vec<u64>)>,
}

/// How a request to edge-1 ended.
enum Sent {
    Answered {
        code: u16,
        replayed: bool,
        body: Vec<u8>,
    },
    /// Not connected: the request never reached the edge.
    NotTaken,
    /// Sent, then the connection broke without an answer.
    Unanswered,
}

fn send(url: &str, body: Vec<u8>, key: Option<&str>) -> Sent {
    block(async {
        let mut req = reqwest::Client::new().post(url).bearer_auth(EDGE_TOKEN).body(body);
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        match req.send().await {
            Ok(r) => {
                let code = r.status().as_u16();
                let replayed = r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
                match r.bytes().await {
                    Ok(body) => Sent::Answered { code, replayed, body: body.to_vec() },
                    Err(_) => Sent::Unanswered,
                }
            }
            Err(e) if e.is_connect() => Sent::NotTaken,
            Err(_) => Sent::Unanswered,
        }
    })
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
    // run (about 18 a second here, each keeping its summary; models past the newest 100 are
    // dropped) and the hard examples; nodes stay "online" through every outage, so each round
    // selects all three.
    let disk = SmallDisk::mount(c.path("state"), 256.max(secs as u32 / 16));
    let toml = std::fs::read_to_string(c.path("cloud.toml")).expect("cloud.toml");
    // The newest 100 models kept (a few seconds of rounds): the state stops growing, and the final
    // model, read at once, must still equal the clean run's.
    let toml = toml
        .replace("online_secs = 5", "online_secs = 600\nkeep_model_versions = 100")
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
                // The first value names the request (exact in f32 below 2^24), so each hard
                // example at the cloud can be traced to its request.
                let mut data: Vec<f32> = (0..64).map(|i| ((i as u64 * 7 + row) % 17) as f32).collect();
                data[0] = row as f32;
                let body = serde_json::to_vec(&serde_json::json!({"shape": [1, 64], "data": data})).expect("json");
                row += 1;
                let (code, answer) = match send(&url, body, None) {
                    Sent::Answered { code, body, .. } => (code, body),
                    Sent::NotTaken => {
                        traffic.not_taken.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Sent::Unanswered => {
                        traffic.unanswered.fetch_add(1, Ordering::Relaxed);
                        traffic.rows.lock().expect("rows").1.push(row - 1);
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                if code != 200 {
                    eprintln!("soak: request refused: {code} {}", String::from_utf8_lossy(&answer));
                    traffic.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let a: serde_json::Value = serde_json::from_slice(&answer).expect("json");
                traffic.requests.fetch_add(1, Ordering::Relaxed);
                traffic.rows.lock().expect("rows").0.push(row - 1);
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
            // A batch whose answer is lost (edge-1 killed) is sent again under its key until it
            // is answered: taken in once either way.
            let (mut first, mut retry) = (0u64, false);
            while !stop.load(Ordering::Relaxed) {
                let url = format!("{edge}/v1/samples");
                match send(&url, batch(first, 10, 16, 10), Some(&format!("soak-{first}"))) {
                    Sent::Answered { code: 200, replayed, .. } => {
                        first += 10;
                        traffic.batches.fetch_add(1, Ordering::Relaxed);
                        traffic.samples.fetch_add(10, Ordering::Relaxed);
                        traffic.batches_replayed.fetch_add(u64::from(replayed), Ordering::Relaxed);
                        retry = false;
                    }
                    Sent::Answered { code, body, .. } => {
                        eprintln!("soak: sample batch refused: {code} {}", String::from_utf8_lossy(&body));
                        traffic.batches_refused.fetch_add(1, Ordering::Relaxed);
                        first += 10;
                        retry = false;
                    }
                    Sent::NotTaken | Sent::Unanswered => {
                        traffic.batches_retried.fetch_add(u64::from(!retry), Ordering::Relaxed);
                        retry = true;
                    }
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
                // Edge-1 also serves the traffic.
                let i = dice.below(3) as usize;
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
    c.wait_for_edge(0, &edge);
    let after = c.listed("digits").rounds_done;
    c.wait_listed_within(Duration::from_secs(120), "digits", "a round after the faults", |s| s.rounds_done > after);
    let rounds = c.listed("digits").rounds_done;
    let model = c.model("digits", rounds);
    // The job runs on: rounds closed after `rounds` are not compared.
    let history: Vec<_> = c.history("digits").into_iter().filter(|h| h.round <= rounds).collect();
    assert_eq!(history.len(), rounds as usize, "a summary for every round");
    let lost_rounds = history.iter().filter(|h| h.participants.len() != 3).count();
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
    let examples = ExamplesKept::check(&disk.0.join("cloud.db"), &traffic.rows.lock().expect("rows"));
    let held = stats(&edge);
    let report = serde_json::json!({
        "seconds": start.elapsed().as_secs(),
        "seed": seed,
        "faults": faults,
        "rounds": rounds,
        "rounds_missing_an_update": lost_rounds,
        "requests_answered": answered,
        "requests_refused": traffic.refused.load(Ordering::Relaxed),
        "requests_unanswered": traffic.unanswered.load(Ordering::Relaxed),
        "requests_not_taken": traffic.not_taken.load(Ordering::Relaxed),
        "answered_by_the_cloud": traffic.answered_by_cloud.load(Ordering::Relaxed),
        "hard_examples_queued": traffic.queued.load(Ordering::Relaxed),
        "hard_examples_at_the_cloud": kept.len(),
        "hard_examples_lost": examples.lost,
        "hard_examples_duplicated": examples.duplicated,
        "hard_examples_of_unanswered_requests": examples.of_unanswered,
        "hard_examples_of_no_request": examples.stray,
        "hard_examples_dropped": metric(&m, "nereid_hard_examples_dropped_total{service=\"digits\"}"),
        "sample_batches_accepted": traffic.batches.load(Ordering::Relaxed),
        "sample_batches_refused": traffic.batches_refused.load(Ordering::Relaxed),
        "sample_batches_retried": traffic.batches_retried.load(Ordering::Relaxed),
        "sample_batches_answered_as_retries": traffic.batches_replayed.load(Ordering::Relaxed),
        "samples_accepted": traffic.samples.load(Ordering::Relaxed),
        "samples_offered_in_the_buffer": held["offered"],
        "cloud_state_bytes": std::fs::metadata(disk.0.join("cloud.db")).map_or(0, |m| m.len()),
    });
    eprintln!("soak: {report}");
    assert_eq!(lost_rounds, 0, "every round took all three updates: {report}");
    assert!(kept.iter().all(|(node, _)| node == "edge-1"), "{kept:?}");
    assert_eq!(
        (examples.lost, examples.duplicated, examples.stray),
        (0, 0, 0),
        "every answered request's hard example at the cloud once, none of another: {report}"
    );
    assert_eq!(kept.len() as u64, answered + examples.of_unanswered, "{report}");
    assert_eq!(traffic.refused.load(Ordering::Relaxed), 0, "{report}");
    assert_eq!(held["offered"], traffic.samples.load(Ordering::Relaxed), "every accepted sample once: {report}");
    assert!(faults.len() == 4 || secs < 60, "every kind of fault injected: {report}");
    drop(c);
    assert_eq!(model, reference_run(rounds), "round {rounds}'s model equals a run without faults: {report}");
}

/// The hard examples the cloud kept, traced to the soak's requests by their first value.
struct ExamplesKept {
    /// Answered requests without a hard example.
    lost: u64,
    /// Requests with more than one.
    duplicated: u64,
    /// Hard examples of requests whose answer was lost (edge-1 killed): may or may not exist.
    of_unanswered: u64,
    /// Hard examples of no request sent.
    stray: u64,
}

impl ExamplesKept {
    fn check(db: &std::path::Path, (answered, unanswered): &(Vec<u64>, Vec<u64>)) -> ExamplesKept {
        let db = rusqlite::Connection::open(db).expect("the cloud's state");
        let mut stmt = db.prepare("SELECT input FROM hard_examples").expect("query");
        let mut kept = std::collections::HashMap::<u64, u64>::new();
        for input in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).expect("rows") {
            let tensors = nereid::inference::wire::from_safetensors(&input.expect("row")).expect("an input");
            let first = tensors[0].data.first_chunk::<4>().map(|b| f32::from_le_bytes(*b)).expect("a value");
            *kept.entry(first as u64).or_default() += 1;
        }
        let unanswered: std::collections::HashSet<u64> = unanswered.iter().copied().collect();
        let answered_set: std::collections::HashSet<u64> = answered.iter().copied().collect();
        ExamplesKept {
            lost: answered.iter().filter(|r| !kept.contains_key(r)).count() as u64,
            duplicated: kept.values().filter(|&&n| n > 1).count() as u64,
            of_unanswered: kept.keys().filter(|r| unanswered.contains(r)).count() as u64,
            stray: kept.keys().filter(|r| !answered_set.contains(r) && !unanswered.contains(r)).count() as u64,
        }
    }
}
