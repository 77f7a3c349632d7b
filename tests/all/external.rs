//! Federated learning through the user's own trainer (edge.toml [trainer], the trainer protocol,
//! `clients/python`): a NumPy MLP trained across three edges; FedProx's term through the
//! protocol; trainers that crash, hang or answer wrong cost their task only; an edge killed while
//! its trainer runs changes nothing; INT8-coded updates.
use std::path::{Path, PathBuf};
use std::process::Command;

use nereid::model_io::{self, NamedTensors};

use crate::cluster::Cluster;
use crate::common::{plugin, root, venv_python};

/// The Python environment `cargo xtask test` makes (numpy, safetensors, clients/python).
fn python() -> PathBuf {
    venv_python("py", "numpy, safetensors, clients/python")
}

fn faulty_trainer() -> PathBuf {
    root().join("tests/fixtures/trainers/faulty.py")
}

/// A cluster whose edges train through the fixture trainer (the NumPy example unless ./mode
/// says otherwise), with the example's initial weights in `init.safetensors`.
fn cluster(edges: usize, task_timeout_secs: f64) -> Cluster {
    let c = Cluster::new(edges, "");
    let command = [python().display().to_string(), faulty_trainer().display().to_string()];
    c.add_trainer(
        &command,
        &format!(
            "task_timeout_secs = {task_timeout_secs}
start_timeout_secs = 60
\
             env = {{ OPENBLAS_NUM_THREADS = \"1\", OMP_NUM_THREADS = \"1\" }}"
        ),
    );
    let init = root().join("examples/numpy-digits/init.py");
    let out = Command::new(python()).arg(init).arg(c.path("init.safetensors")).output().expect("python");
    assert!(out.status.success(), "init.py: {}", String::from_utf8_lossy(&out.stderr));
    c
}

fn start(mut c: Cluster) -> Cluster {
    c.start_cloud();
    (0..c.nodes.len()).for_each(|i| c.start_edge(i));
    c
}

fn set_mode(c: &Cluster, edge: usize, mode: &str) {
    std::fs::write(c.path(&format!("{}/mode", c.nodes[edge].0)), mode).expect("mode");
}

/// A job of the external model with FedAvg; `extra` adds tables (objective, compressor).
fn job(name: &str, rounds: u32, min_clients: usize, extra: &str) -> String {
    job_with(name, rounds, min_clients, "fedavg", extra)
}

/// A FedProx job with `mu`: its aggregator publishes mu, its client objective adds the term.
fn fedprox_job(name: &str, mu: f64) -> String {
    let objective = plugin("fedprox").display().to_string();
    job_with(
        name,
        1,
        1,
        "fedprox",
        &format!("[aggregator.config]\nmu = {mu:?}\n\n[client_objective]\nplugin = {objective:?}\n"),
    )
}

fn job_with(name: &str, rounds: u32, min_clients: usize, aggregator: &str, extra: &str) -> String {
    format!(
        "[job]\nname = {name:?}\nseed = 11\n\n[rounds]\nmin_clients = {min_clients}\ndeadline_secs = 120\n\n\
         [stop]\nrounds = {rounds}\n\n[model]\nkind = \"external\"\ninit = \"init.safetensors\"\n\n\
         [training]\nepochs = 2\nbatch_size = 16\nlearning_rate = 0.1\n\n[training.nodes.edge-2]\nepochs = 3\n\n\
         [aggregator]\nplugin = {:?}\n{extra}",
        plugin(aggregator).display().to_string()
    )
}

fn distance(a: &NamedTensors, b: &NamedTensors) -> f64 {
    a.iter()
        .zip(b)
        .map(|((_, x), (_, y))| {
            x.as_f32()
                .expect("f32")
                .iter()
                .zip(y.as_f32().expect("f32"))
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

fn init_weights(c: &Cluster) -> NamedTensors {
    model_io::read(&c.path("init.safetensors")).expect("init")
}

#[test]
fn a_numpy_trainer_trains_a_federated_job_across_three_edges() {
    let c = start(cluster(3, 120.0));
    c.apply("job", &job("digits", 5, 3, ""));
    let s = c.wait_done("digits");
    assert_eq!(s.rounds_done, 5);
    for h in &s.history {
        assert_eq!(h.participants, vec!["edge-1", "edge-2", "edge-3"], "round {}", h.round);
        assert!(h.train_loss.is_some_and(|l| l > 0.0), "the trainer's loss reaches the summary: {h:?}");
        // Its own metrics too (the mean over the nodes, weighted by examples).
        let steps = h.trainer_metrics.get("steps").copied().unwrap_or_default();
        assert!(steps >= 2.0 && h.trainer_metrics.contains_key("loss"), "{:?}", h.trainer_metrics);
    }
    let acc: Vec<f64> = s.history.iter().map(|h| h.accuracy.expect("accuracy")).collect();
    // The accuracy of round r is the global model of round r-1 evaluated by the trainers.
    assert!(acc[4] > 0.85 && acc[4] > acc[0] + 0.5, "the model learns: {acc:?}");
    let model = c.model("digits", 5);
    assert_eq!(model.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["b1", "b2", "w1", "w2"]);
    // The job's per-node override reached edge-2's trainer, and only edge-2's.
    let log = |node: &str| std::fs::read_to_string(c.path(&format!("{node}/edge.trainer/trainer.log"))).expect("log");
    assert!(log("edge-2").contains("fit round 5 mode ok epochs 3"), "{}", log("edge-2"));
    assert!(log("edge-1").contains("fit round 5 mode ok epochs 2"), "{}", log("edge-1"));
    let text = String::from_utf8_lossy(&c.nereid(&["job", "status", "digits"]).stdout).to_string();
    assert!(text.contains("rounds     5/5") && text.contains("trainers   round 5: loss "), "{text}");
}

#[test]
fn fedprox_acts_through_an_external_trainer() {
    let c = start(cluster(1, 120.0));
    let init = init_weights(&c);
    c.apply("plain", &job("plain", 1, 1, ""));
    c.wait_done("plain");
    c.apply("mu0", &fedprox_job("mu0", 0.0));
    c.wait_done("mu0");
    c.apply("mu1", &fedprox_job("mu1", 1.0));
    c.wait_done("mu1");
    let (plain, mu0, mu1) = (c.model("plain", 1), c.model("mu0", 1), c.model("mu1", 1));
    assert_eq!(mu0, plain, "mu = 0: the same model as without an objective");
    assert_ne!(mu1, plain, "mu > 0 changes training");
    let (far, near) = (distance(&plain, &init), distance(&mu1, &init));
    assert!(near < far * 0.9, "the proximal term keeps the update near the global model: {near} vs {far}");
}

#[test]
fn trainers_that_crash_hang_or_answer_wrong_cost_their_task_only() {
    let c = start(cluster(3, 4.0));
    let cases = [
        ("crash", "exited"),
        ("hang", "did not finish the task within"),
        ("raise", "the camera's data folder is empty"),
        ("wrong_names", "missing [\"b2\"], not in the model [\"extra\"]"),
        ("wrong_shape", "tensor `w2` is F32[10, 31], the model's is F32[10, 32]"),
        ("nan", "tensor `w1` has a value that is not finite"),
        ("float64", "tensor `b1` is F64[32]"),
        ("garbage", "not a protocol frame"),
        ("no_examples", "num_examples is missing"),
    ];
    for (i, (mode, reason)) in cases.iter().enumerate() {
        set_mode(&c, 2, mode);
        let name = format!("j{i}");
        c.apply(&name, &job(&name, 1, 2, ""));
        let s = c.wait_done(&name);
        let h = &s.history[0];
        assert_eq!(h.participants, vec!["edge-1", "edge-2"], "{mode}: the round goes on with the others");
        let failed = h.rejected.iter().find(|r| r.update == "edge-3").unwrap_or_else(|| panic!("{mode}: {h:?}"));
        assert!(failed.reason.contains(reason), "{mode}: {}", failed.reason);
    }
    // The edge and its (restarted) trainer serve the next job.
    set_mode(&c, 2, "ok");
    c.apply("after", &job("after", 1, 3, ""));
    let s = c.wait_done("after");
    assert_eq!(s.history[0].participants, vec!["edge-1", "edge-2", "edge-3"]);
}

#[test]
fn an_edge_killed_while_its_trainer_runs_changes_nothing() {
    let reference = {
        let c = start(cluster(3, 120.0));
        c.apply("job", &job("digits", 3, 3, ""));
        c.wait_done("digits");
        c.model("digits", 3)
    };
    let mut c = start(cluster(3, 120.0));
    set_mode(&c, 1, "slow");
    c.apply("job", &job("digits", 3, 3, ""));
    c.wait_until("digits", "round 2 with edge-2 training", |s| {
        s.current.as_ref().is_some_and(|r| r.round == 2 && r.received.len() == 2)
    });
    let trainer_pid = std::fs::read_to_string(c.path("edge-2/edge.trainer/trainer.pid")).expect("pid file");
    c.kill_edge(1);
    c.start_edge(1);
    let s = c.wait_done("digits");
    assert!(s.history.iter().all(|h| h.participants.len() == 3));
    assert_eq!(c.model("digits", 3), reference, "bit-identical to the run without the kill");
    // The trainer the killed edge left was stopped by the new one.
    let pid = trainer_pid.trim();
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || !is_running(pid), "the old trainer {pid} still runs");
}

fn is_running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn an_external_trainers_updates_travel_int8_coded() {
    let c = start(cluster(2, 120.0));
    let quantize = plugin("quantize").display().to_string();
    let compressor = format!("[compressor]\nplugin = {quantize:?}\n[compressor.config]\nupdate = \"int8\"\n");
    c.apply("plain", &job("plain", 2, 2, ""));
    let plain = c.wait_done("plain");
    c.apply("int8", &job("int8", 2, 2, &compressor));
    let coded = c.wait_done("int8");
    let (up_plain, up_int8) = (plain.history[1].bytes_up, coded.history[1].bytes_up);
    assert!(up_int8 * 3 < up_plain, "INT8 updates are about a quarter of f32: {up_int8} vs {up_plain}");
    let (a, b) = (c.model("plain", 2), c.model("int8", 2));
    let rel = distance(&a, &b) / distance(&a, &init_weights(&c));
    assert!(rel < 0.05, "the coded job's model stays near the plain one: {rel}");
    assert!(coded.history[1].accuracy.expect("accuracy") > 0.5, "{coded:?}");
}
