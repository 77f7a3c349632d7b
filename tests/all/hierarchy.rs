//! Hierarchical aggregation: regional clouds (a cloud.toml with `[upstream]`) between the edges
//! and the top cloud, each folding its own edges' updates and sending one result up.
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use nereid::client::CloudClient;
use nereid::model_io::NamedTensors;
use nereid::protocol::JobStatus;

use crate::cluster::*;
use crate::federated::job_toml;

/// The regions of the three edges: edge-1 and edge-2 in region-a, edge-3 in region-b.
const REGIONS: [(&str, &[usize]); 2] = [("region-a", &[0, 1]), ("region-b", &[2])];

struct Region {
    name: &'static str,
    port: u16,
    dir: PathBuf,
    process: Option<Child>,
}

/// A top cloud that knows two regions (`region = true`), two regional clouds, and the edges of
/// [`Cluster::new`] (the same data as the flat runs), each edge pointed at its region.
struct Hierarchy {
    top: Cluster,
    regions: Vec<Region>,
}

impl Drop for Hierarchy {
    fn drop(&mut self) {
        for r in &mut self.regions {
            if let Some(mut p) = r.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }
}

impl Hierarchy {
    fn new() -> Hierarchy {
        let declared: String = REGIONS
            .iter()
            .map(|(name, _)| format!("[nodes.{name}]\ntoken = \"token-of-{name}\"\nregion = true\n"))
            .collect();
        let top = Cluster::new(3, &declared);
        let regions = REGIONS
            .iter()
            .map(|&(name, members)| {
                let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
                let dir = top.path(name);
                std::fs::create_dir_all(&dir).expect("mkdir");
                let mut config = format!(
                    "listen = \"127.0.0.1:{port}\"\nstate = \"cloud.db\"\nadmin_token = \"{}\"\nonline_secs = 5\n\n\
                     [upstream]\nurl = \"http://127.0.0.1:{}\"\ntoken = \"token-of-{name}\"\nmin_clients = {}\n\n",
                    top.admin,
                    top.port,
                    members.len()
                );
                for &i in members {
                    let (edge, token) = &top.nodes[i];
                    config.push_str(&format!("[nodes.{edge}]\ntoken = \"{token}\"\n"));
                    let toml = top.path(&format!("{edge}/edge.toml"));
                    let text = std::fs::read_to_string(&toml).expect("edge.toml").replace(
                        &format!("cloud = \"http://127.0.0.1:{}\"", top.port),
                        &format!("cloud = \"http://127.0.0.1:{port}\""),
                    );
                    std::fs::write(&toml, text).expect("edge.toml");
                }
                std::fs::write(dir.join("cloud.toml"), config).expect("cloud.toml");
                Region { name, port, dir, process: None }
            })
            .collect();
        Hierarchy { top, regions }
    }

    fn start_region(&mut self, k: usize) {
        let r = &mut self.regions[k];
        let log = r.dir.join(format!("cloud-{}.log", Instant::now().elapsed().as_nanos()));
        r.process = Some(spawn(&["cloud"], &r.dir.join("cloud.toml"), &log, &r.dir.join("cache")));
        let t = Instant::now();
        while http("GET", &format!("http://127.0.0.1:{}/v1/health", r.port), None, Vec::new()).0 != 200 {
            assert!(t.elapsed() < Duration::from_secs(30), "{} did not start", r.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_region(&mut self, k: usize) {
        let mut p = self.regions[k].process.take().expect("region running");
        p.kill().expect("kill -9");
        p.wait().expect("reap");
    }

    fn signal_region(&self, k: usize, sig: &str) {
        signal(self.regions[k].process.as_ref().expect("region running"), sig);
    }

    /// The top cloud, then the regions, then the edges.
    fn running() -> Hierarchy {
        let mut h = Hierarchy::new();
        h.top.start_cloud();
        (0..h.regions.len()).for_each(|k| h.start_region(k));
        (0..3).for_each(|i| h.top.start_edge(i));
        h
    }

    /// The region's copy of `job` (an error until the region took its first round).
    fn try_region_status(&self, k: usize, job: &str) -> Result<JobStatus, String> {
        let url = format!("http://127.0.0.1:{}", self.regions[k].port);
        let client = CloudClient::new(&url, &self.top.admin, Duration::from_secs(30)).expect("client");
        block(client.status(job)).map_err(|e| format!("{}: {e}", self.regions[k].name))
    }

    fn region_status(&self, k: usize, job: &str) -> JobStatus {
        self.try_region_status(k, job).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the digits job through the regions; the top cloud's status and final model.
    fn run(&self, rounds: u32) -> (JobStatus, NamedTensors) {
        self.top.apply("job", &hierarchical_job(rounds));
        let s = self.top.wait_done("digits");
        (s, self.top.model("digits", rounds))
    }
}

/// The flat runs' job, at the top cloud: its quorum is both regions.
fn hierarchical_job(rounds: u32) -> String {
    job_toml("digits", "fedavg", rounds, REGIONS.len(), 60.0)
}

fn max_abs_diff(a: &NamedTensors, b: &NamedTensors) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            let (va, vb) = (ta.as_f32().expect("f32"), tb.as_f32().expect("f32"));
            va.iter().zip(vb.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

/// Every round of the top cloud folded both regions' results, and every round of each region
/// its own edges' updates, each once.
fn assert_every_update_counted_once(h: &Hierarchy, top: &JobStatus, rounds: u32) {
    assert_eq!(top.rounds_done, rounds);
    for r in &top.history {
        assert_eq!(r.participants, vec!["region-a", "region-b"], "top round {}: {r:?}", r.round);
    }
    for (k, (_, members)) in REGIONS.iter().enumerate() {
        let region = h.region_status(k, "digits");
        let want: Vec<String> = members.iter().map(|&i| h.top.nodes[i].0.clone()).collect();
        assert_eq!(region.history.len(), rounds as usize, "{}: {region:?}", h.regions[k].name);
        for r in &region.history {
            assert_eq!(r.participants, want, "{} round {}", h.regions[k].name, r.round);
        }
    }
}

#[test]
fn hierarchical_aggregation_equals_the_flat_run_on_the_digits_job() {
    let rounds = 3;
    let flat = Cluster::running(3);
    flat.apply("job", &job_toml("digits", "fedavg", rounds, 3, 60.0));
    let flat_status = flat.wait_done("digits");
    let flat_model = flat.model("digits", rounds);
    drop(flat);

    let h = Hierarchy::running();
    let (top, model) = h.run(rounds);
    assert_every_update_counted_once(&h, &top, rounds);
    // The same examples in every round, and the round's figures weighted as a flat round's.
    for (t, f) in top.history.iter().zip(&flat_status.history) {
        assert_eq!(t.examples, f.examples, "round {}", t.round);
        let (ta, fa) = (t.accuracy.expect("accuracy"), f.accuracy.expect("accuracy"));
        assert!((ta - fa).abs() < 1e-4, "round {}: accuracy {ta} hierarchical, {fa} flat", t.round);
    }
    // FedAvg of the regions' means, each weighted by its examples, is FedAvg of all the updates;
    // only the order of the float sums differs (a region's mean is rounded to f32 once more),
    // and each round trains from the model the round before made.
    let diff = max_abs_diff(&model, &flat_model);
    eprintln!("hierarchical vs flat after {rounds} rounds: max |difference| {diff:e}");
    assert!(diff < 1e-4, "hierarchical and flat differ by {diff}");
    assert!(max_abs_diff(&model, &h.top.model("digits", 0)) > 1e-2, "the job trained the model");
}

#[test]
fn a_regional_aggregator_killed_mid_round_loses_nothing() {
    let rounds = 3;
    let (_, reference) = Hierarchy::running().run(rounds);

    let mut h = Hierarchy::new();
    h.top.start_cloud();
    (0..h.regions.len()).for_each(|k| h.start_region(k));
    (0..3).for_each(|i| h.top.start_edge(i));
    // edge-2 held: region-a's first round has edge-1's update and waits for edge-2's.
    h.top.hold_edge_once_online(1);
    h.top.apply("job", &hierarchical_job(rounds));
    let t = Instant::now();
    loop {
        let s = h.try_region_status(0, "digits");
        if s.as_ref().is_ok_and(|s| s.current.as_ref().is_some_and(|c| c.round == 1 && c.received.len() == 1)) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "region-a's round 1 to receive edge-1's update: {s:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
    h.kill_region(0);
    std::thread::sleep(Duration::from_millis(300));
    h.start_region(0);
    h.top.signal_edge(1, "-CONT");
    let top = h.top.wait_done("digits");
    assert_every_update_counted_once(&h, &top, rounds);
    assert_eq!(h.top.model("digits", rounds), reference, "bit-identical to the run without the kill");
}

/// A region paused (SIGSTOP) while its ask for a task is held: the top cloud answers it with
/// round 1, which closes by its deadline without the region. Resumed, the region reads round 1's
/// task late, asks again and runs only what the top cloud gives now, never the closed round.
#[test]
fn a_paused_region_runs_no_round_that_closed_while_it_slept() {
    let mut h = Hierarchy::new();
    h.top.start_cloud();
    (0..h.regions.len()).for_each(|k| h.start_region(k));
    (0..3).for_each(|i| h.top.start_edge(i));
    // Past region-b's first ask, which the top cloud holds.
    wait_for_text("region-b's relay did not start", "taking rounds from the upper cloud", || {
        cloud_logs(&h.regions[1].dir)
    });
    std::thread::sleep(Duration::from_millis(300));
    h.signal_region(1, "-STOP");
    h.top.apply("job", &job_toml("digits", "fedavg", 2, 1, 4.0));
    h.top.wait_until("digits", "round 1 closed", |s| s.rounds_done >= 1);
    h.signal_region(1, "-CONT");
    let top = h.top.wait_done("digits");
    assert_eq!(top.history[0].participants, vec!["region-a"], "{top:?}");
    let log = cloud_logs(&h.regions[1].dir);
    let taken: Vec<&str> = log.lines().filter(|l| l.contains("region: round taken from the upper cloud")).collect();
    assert!(!taken.iter().any(|l| l.contains("round=1")), "region-b ran the closed round 1: {log}");
    assert!(log.contains("a task read after its round's deadline"), "{log}");
}
