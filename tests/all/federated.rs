//! Federated learning across processes on loopback: a cloud and edge hosts (this package's
//! binary), faults (kill -9, a stopped process), and the API's refusals.
use std::process::Command;
use std::time::{Duration, Instant};

use nereid::model_io;
use nereid::protocol::{token_sha256, META_METRICS, META_NUM_EXAMPLES};
use nereid::train::{Dataset, ModelSpec};
use serde_json::Value;

use crate::cluster::*;
use crate::common::*;

pub(crate) fn job_toml(name: &str, strategy: &str, rounds: u32, min_clients: usize, deadline: f64) -> String {
    let plugin = plugin(strategy).display().to_string();
    let objective =
        if strategy == "fedprox" { format!("\n[client_objective]\nplugin = {plugin:?}\n") } else { String::new() };
    format!(
        "[job]\nname = \"{name}\"\nseed = 7\n\n[rounds]\nmin_clients = {min_clients}\nfraction = 1.0\ndeadline_secs = {deadline}\n\n\
         [stop]\nrounds = {rounds}\n\n[model]\nkind = \"mlp\"\ninputs = 64\nhidden = [16]\nclasses = 10\n\n\
         [training]\nepochs = 1\nbatch_size = 16\nlearning_rate = 0.1\noptimizer = \"sgd\"\n\n\
         [training.nodes.edge-2]\nepochs = 2\n\n[aggregator]\nplugin = {plugin:?}\n{objective}"
    )
}

/// A clean run of `rounds` rounds with 3 edges: the reference for the fault tests.
pub(crate) fn reference_run(rounds: u32) -> model_io::NamedTensors {
    reference_of(&job_toml("digits", "fedavg", rounds, 3, 60.0), rounds)
}

fn reference_of(job: &str, rounds: u32) -> model_io::NamedTensors {
    let c = Cluster::running(3);
    c.apply("ref", job);
    // Long soaks compare thousands of rounds: the wait grows with them.
    c.wait_done_within(Duration::from_secs(120 + u64::from(rounds) / 10), "digits");
    c.model("digits", rounds)
}

/// Kills the cloud (kill -9) once round `round` is open, restarts it, and returns the job's
/// final model and the keys of the strategy state each round committed; `job` runs `rounds`
/// rounds.
fn killed_at_round(job: &str, rounds: u32, round: u32) -> (model_io::NamedTensors, Vec<Vec<String>>) {
    let mut c = Cluster::running(3);
    c.apply("job", job);
    let before = c.wait_until("digits", &format!("round {round}"), |s| {
        s.current.as_ref().is_some_and(|r| r.round == round) || s.rounds_done >= round
    });
    c.kill_cloud();
    assert!(before.rounds_done < rounds, "killed while the job was running: {before:?}");
    std::thread::sleep(Duration::from_millis(300));
    c.start_cloud();
    let s = c.wait_done("digits");
    assert_eq!(s.rounds_done, rounds);
    assert!(s.history.iter().all(|h| h.participants.len() == 3), "every update counted once: {:?}", s.history);
    let db = rusqlite::Connection::open(c.path("cloud.db")).expect("the cloud's state");
    let mut stmt =
        db.prepare("SELECT bytes FROM strategy_states WHERE job = 'digits' ORDER BY version").expect("query");
    let states = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .expect("rows")
        .map(|b| {
            let state = model_io::decode(&b.expect("row"), std::path::Path::new("state")).expect("safetensors");
            state.into_iter().map(|(k, _)| k).collect()
        })
        .collect();
    (c.model("digits", rounds), states)
}

#[test]
fn fedadam_killed_mid_job_keeps_its_moments_and_ends_bit_identical() {
    let rounds = 6;
    // A large server step, so that moments lost at the restart would change the model.
    let job = job_toml("digits", "fedadam", rounds, 3, 60.0) + "config = { eta = 0.05, tau = 0.001 }\n";
    let reference = reference_of(&job, rounds);
    let fedavg = reference_run(rounds);
    assert_ne!(reference, fedavg, "FedAdam steps differently from FedAvg");
    let (model, states) = killed_at_round(&job, rounds, 3);
    assert_eq!(model, reference, "bit-identical to the run without the crash");
    // Each round committed the moments of every tensor with its model.
    assert_eq!(states.len(), rounds as usize);
    assert!(states.iter().all(|keys| keys.len() == 8 && keys.contains(&"m/dense.0.weight".to_string())), "{states:?}");
}

#[test]
fn a_full_job_runs_across_processes_and_is_visible() {
    let c = Cluster::running(3);
    c.apply("job", &job_toml("digits", "fedprox", 4, 3, 60.0));
    let s = c.wait_done("digits");
    assert_eq!((s.rounds_done, s.history.len()), (4, 4));
    for h in &s.history {
        assert_eq!(h.participants, vec!["edge-1", "edge-2", "edge-3"], "round {}", h.round);
        assert!(h.bytes_up > 0 && h.bytes_down > 0 && h.examples > 0);
        assert_eq!(h.closed_by, "quorum");
    }
    let acc: Vec<f64> = s.history.iter().map(|h| h.accuracy.expect("accuracy")).collect();
    assert!(acc[3] > acc[0], "the global model improves: {acc:?}");
    assert_eq!(s.history[0].aggregator_metrics.get("mu"), Some(&0.01), "fedprox's metrics reach the summary");
    // Prometheus metrics and the CLI.
    assert_eq!(c.metric("nereid_updates_accepted_total"), 12.0);
    assert_eq!(c.metric("nereid_rounds_closed_total"), 4.0);
    let uploads = c.metric(
        "nereid_http_request_duration_seconds_count{route=\"/v1/jobs/{job}/rounds/{round}/update\",method=\"POST\",code=\"200\"}",
    );
    assert!(uploads >= 12.0, "every accepted upload is observed: {uploads}");
    assert!(c.metric("process_cpu_seconds_total") > 0.0);
    let out = c.nereid(&["job", "status", "digits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("rounds     4/4") && text.contains("edge-2"), "{text}");
    let list = String::from_utf8_lossy(&c.nereid(&["job", "list", "--json"]).stdout).to_string();
    let v: Value = serde_json::from_str(&list).expect("json");
    assert_eq!(v[0]["status"], "done");

    // The history in pages, through the API and the CLI; a page past the bound is refused.
    let page = |from: Option<u32>, limit: Option<u32>| {
        let s = block(c.client().status_page("digits", from, limit)).expect("page");
        (s.history.iter().map(|h| h.round).collect::<Vec<_>>(), s.history_next, s.bytes_up_total)
    };
    let total = s.history.iter().map(|h| h.bytes_up).sum::<u64>();
    assert_eq!(page(Some(2), Some(2)), (vec![2, 3], Some(4), total), "the total spans every round");
    assert_eq!(page(None, Some(1)), (vec![4], None, total), "without `from`, the newest rounds");
    assert_eq!(block(c.client().history("digits")).expect("history"), s.history);
    for (query, named) in [("limit=0", "`limit`"), ("limit=10001", "`limit`"), ("offset=2", "offset")] {
        let (code, body) = http("GET", &c.url(&format!("/v1/jobs/digits?{query}")), Some(&c.admin), vec![]);
        let body = String::from_utf8_lossy(&body);
        assert!(code == 400 && body.contains(named), "{query}: {code} {body}");
    }
    let out = c.nereid(&["job", "status", "digits", "--from", "1", "--limit", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("(more rounds: --from 3)"), "{text}");
}

#[test]
fn killing_the_cloud_mid_round_loses_nothing_and_changes_nothing() {
    let rounds = 5;
    let reference = reference_run(rounds);

    let mut c = Cluster::running(3);
    // edge-3 held, the first round waits for it however fast the others are: the kill -9 comes
    // while the round has some but not all of its updates.
    c.hold_edge_once_online(2);
    c.apply("job", &job_toml("digits", "fedavg", rounds, 3, 60.0));
    let before = c.wait_until("digits", "round 1 to receive the other updates", |s| {
        s.current.as_ref().is_some_and(|r| r.round == 1 && r.received.len() == 2)
    });
    c.kill_cloud();
    assert_eq!(before.rounds_done, 0, "killed while the first round was open: {before:?}");
    std::thread::sleep(Duration::from_millis(300));
    c.start_cloud();
    c.signal_edge(2, "-CONT");
    let s = c.wait_done("digits");
    assert_eq!(s.rounds_done, rounds);
    for h in &s.history {
        assert_eq!(h.participants.len(), 3, "round {}: every update counted once", h.round);
    }
    assert_eq!(c.model("digits", rounds), reference, "bit-identical to the run without the crash");
}

#[test]
fn an_edge_killed_mid_job_rejoins_and_the_result_is_unchanged() {
    // Rounds take ~50 ms here: enough of them that a loaded machine still kills the edge mid-job.
    let rounds = 8;
    let reference = reference_run(rounds);

    let mut c = Cluster::running(3);
    c.apply("job", &job_toml("digits", "fedavg", rounds, 3, 60.0));
    let before =
        c.wait_until("digits", "round 2", |s| s.current.as_ref().is_some_and(|r| r.round == 2) || s.rounds_done >= 2);
    c.kill_edge(1);
    assert!(before.rounds_done < rounds, "killed while the job was running: {before:?}");
    std::thread::sleep(Duration::from_millis(400));
    c.start_edge(1);
    let s = c.wait_done("digits");
    assert!(s.history.iter().all(|h| h.participants.len() == 3));
    assert_eq!(c.model("digits", rounds), reference);
}

#[test]
fn a_straggler_is_left_out_after_the_deadline_and_catches_up() {
    let c = Cluster::running(3);
    // Stopped before the job starts: rounds take ~0.1 s here, a stop after round 1 could come
    // after the last one.
    c.hold_edge_once_online(2);
    c.apply("job", &job_toml("digits", "fedavg", 5, 2, 1.5));
    c.wait_until("digits", "a round without edge-3", |s| s.history.iter().any(|h| h.closed_by == "deadline"));
    c.signal_edge(2, "-CONT");
    let s = c.wait_done("digits");
    let late = s.history.iter().find(|h| h.closed_by == "deadline").expect("a deadline round");
    assert_eq!(late.participants, vec!["edge-1", "edge-2"], "closed without the straggler");
    let last = s.history.last().expect("rounds");
    assert_eq!(last.participants.len(), 3, "the straggler is back: {:?}", s.history);
}

/// A round past its deadline but short of `min_clients` stays open: an edge held over the
/// deadline reads its task late, asks again, is given the same round and trains for it.
#[test]
fn an_edge_reading_late_the_task_of_a_round_still_open_trains_for_it() {
    let c = Cluster::running(3);
    c.hold_edge_once_online(2);
    c.apply("job", &job_toml("digits", "fedavg", 1, 3, 1.0));
    let s =
        c.wait_until("digits", "round 1's two updates", |s| s.current.as_ref().is_some_and(|r| r.received.len() == 2));
    let deadline_ms = s.current.as_ref().map(|r| r.deadline_ms).expect("round 1 open");
    while nereid::store::now_ms() <= deadline_ms + 200 {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.status("digits").rounds_done, 0, "short of min_clients, round 1 waits past its deadline");
    c.signal_edge(2, "-CONT");
    let s = c.wait_done("digits");
    assert_eq!(s.history[0].participants.len(), 3, "the late edge trained for the open round: {:?}", s.history);
}

/// The test plays three nodes by hand against a cloud.
#[test]
fn duplicates_replays_unauthorized_oversized_and_malformed_uploads() {
    let mut c = Cluster::new(3, "max_upload_mib = 1");
    c.start_cloud();
    c.apply("job", &job_toml("digits", "fedavg", 1, 3, 60.0));
    let (a, b, n3) = (c.nodes[0].1.clone(), c.nodes[1].1.clone(), c.nodes[2].1.clone());
    // The nodes poll until the round opens with them.
    let t = Instant::now();
    loop {
        let (_, ta) = http("GET", &c.url("/v1/task"), Some(&a), Vec::new());
        http("GET", &c.url("/v1/task"), Some(&b), Vec::new());
        http("GET", &c.url("/v1/task"), Some(&n3), Vec::new());
        let v: Value = serde_json::from_slice(&ta).expect("task");
        if !v["task"].is_null() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no task");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![16], classes: 10 };
    let update = |n: u64| {
        let meta = std::collections::HashMap::from([
            (META_NUM_EXAMPLES.to_string(), n.to_string()),
            (META_METRICS.to_string(), "{\"eval_accuracy\":0.5,\"eval_loss\":1.0,\"eval_examples\":10,\"train_loss\":1.0,\"penalty\":0.0,\"steps\":1}".to_string()),
        ]);
        model_io::encode(&spec.init(n), Some(meta)).expect("encode")
    };
    let up = c.url("/v1/jobs/digits/rounds/1/update");
    let accepted = || c.metric("nereid_updates_accepted_total");

    assert_eq!(http("POST", &up, None, update(10)).0, 401, "no token");
    assert_eq!(http("POST", &up, Some("forged"), update(10)).0, 401, "wrong token");
    assert_eq!(http("POST", &up, Some(&c.admin), update(10)).0, 403, "the operator is not a node");
    assert_eq!(http("POST", &up, Some(&a), vec![0u8; 2 << 20]).0, 413, "over max_upload_mib");
    let (code, body) = http("POST", &up, Some(&a), b"not safetensors".to_vec());
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    let wrong =
        model_io::encode(&ModelSpec::Mlp { inputs: 64, hidden: vec![8], classes: 10 }.init(1), None).expect("encode");
    let (code, body) = http("POST", &up, Some(&a), wrong);
    assert_eq!(code, 400);
    assert!(String::from_utf8_lossy(&body).contains("dense.0.weight"), "{}", String::from_utf8_lossy(&body));
    assert_eq!(accepted(), 0.0, "refused requests change nothing");

    // The fold takes updates in node-name order as soon as they are contiguous: edge-3's waits
    // (on disk) for edge-1 and edge-2; edge-1's goes in at once.
    let folded = |c: &Cluster| c.status("digits").current.map(|r| (r.received, r.folded)).unwrap_or_default();
    assert_eq!(http("POST", &up, Some(&n3), update(5)).0, 200);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(folded(&c), (vec!["edge-3".to_string()], vec![]));
    let (code, body) = http("POST", &up, Some(&a), update(10));
    assert_eq!((code, String::from_utf8_lossy(&body).contains("accepted")), (200, true));
    c.wait_until("digits", "edge-1 folded", |s| s.current.as_ref().is_some_and(|r| r.folded == ["edge-1"]));
    let (code, body) = http("POST", &up, Some(&a), update(10));
    assert_eq!((code, String::from_utf8_lossy(&body).contains("duplicate")), (200, true), "a retry is acknowledged");
    assert_eq!(accepted(), 2.0);
    assert_eq!(folded(&c).1, vec!["edge-1"], "edge-3 still waits for edge-2");
    assert_eq!(http("POST", &up, Some(&b), update(30)).0, 200);
    let s = c.wait_done("digits");
    assert_eq!(s.history[0].participants, vec!["edge-1", "edge-2", "edge-3"]);
    assert_eq!(s.history[0].examples, 45, "10 + 30 + 5: the duplicate counted once");
    // Every accepted body's bytes, the last one's too (the round closes right after its commit),
    // and not the duplicate's.
    let bytes = |n: u64| update(n).len() as u64;
    assert_eq!(s.history[0].bytes_up, bytes(10) + bytes(30) + bytes(5));
    // A replay after the round closed is still only acknowledged.
    let (code, body) = http("POST", &up, Some(&a), update(10));
    assert_eq!((code, String::from_utf8_lossy(&body).contains("duplicate")), (200, true));
    assert_eq!(accepted(), 3.0);
    assert_eq!(c.metric("nereid_unauthorized_requests_total"), 2.0);
    // Tokens can also be issued by the CLI into the cloud's state.
    let out = c.nereid(&["token", "create", "edge-9", "--config", c.path("cloud.toml").to_str().expect("utf-8")]);
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(token.len(), 64);
    assert_eq!(http("GET", &c.url("/v1/task"), Some(&token), Vec::new()).0, 200);
    assert_ne!(token_sha256(&token), token);
}

fn apply_error(job: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, job).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(["job", "apply", "--dry-run", "--token", "x"])
        .arg(&path)
        .env("NEREID_CACHE_DIR", dir.path().join("cache"))
        .output()
        .expect("run");
    assert!(!out.status.success(), "should fail: {job}");
    String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "job.toml")
}

/// Applying `job` fails with an error that starts `job.toml:<line of needle>:<at_line>` and
/// also says `also`.
fn expect_error_at(job: &str, needle: &str, at_line: &str, also: &str) {
    let line = job.lines().position(|l| l.contains(needle)).expect("needle") + 1;
    let e = apply_error(job);
    assert!(e.contains(&format!("job.toml:{line}:{at_line}")) && e.contains(also), "{e}");
}

#[test]
fn bad_job_files_are_refused_naming_file_line_and_key() {
    let good = job_toml("digits", "fedprox", 3, 2, 10.0);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, &good).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(["job", "apply", "--dry-run", "--token", "x"])
        .arg(&path)
        .env("NEREID_CACHE_DIR", dir.path().join("cache"))
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let unknown = good.replace("fraction = 1.0", "fraction = 1.0\nfractoin = 0.5");
    expect_error_at(&unknown, "fractoin", "1: key `rounds.fractoin`: unknown field `fractoin`", "");
    let wrong_type = good.replace("rounds = 3", "rounds = \"three\"");
    expect_error_at(&wrong_type, "\"three\"", "", "key `stop.rounds`");
    let range = good.replace("fraction = 1.0", "fraction = 1.5");
    expect_error_at(&range, "fraction", "1: key `rounds.fraction`: must be in (0, 1]", "");
    let missing = good.replacen(&plugin("fedprox").display().to_string(), "/nonexistent/agg.wasm", 1);
    expect_error_at(&missing, "nonexistent", "", "key `aggregator.plugin`: cannot read /nonexistent/agg.wasm");
    let rejected = good.replace("[client_objective]", "[aggregator.config]\nmu = -1.0\n\n[client_objective]");
    expect_error_at(&rejected, "mu = -1.0", "1: key `aggregator.config.mu`: plugin `fedprox` refuses it", "");

    let fedprox = format!("{:?}", plugin("fedprox").display().to_string());
    let fedavg = format!("{:?}", plugin("fedavg").display().to_string());
    let wrong_slot = good
        .replace(&format!("[client_objective]\nplugin = {fedprox}"), &format!("[client_objective]\nplugin = {fedavg}"));
    let e = apply_error(&wrong_slot);
    assert!(
        e.contains("key `client_objective.plugin`") && e.contains("expected world `client-objective-plugin`"),
        "{e}"
    );

    let e = apply_error(&good.replace("kind = \"mlp\"", "kind = \"transformer\""));
    assert!(e.contains("key `model.kind`"), "{e}");

    // Registry plugins: a malformed reference, an unreachable registry, follow_tag on a file.
    let bad_ref = good.replacen(&fedprox, "\"oci://localhost/Agg:1\"", 1);
    expect_error_at(
        &bad_ref,
        "oci://",
        "",
        "key `aggregator.plugin`: invalid component reference `oci://localhost/Agg:1`",
    );
    let unreachable = good.replacen(&fedprox, "\"oci://127.0.0.1:1/ns/agg:1\"", 1);
    let e = apply_error(&unreachable);
    assert!(e.contains("key `aggregator.plugin`") && e.contains("cannot reach registry 127.0.0.1:1"), "{e}");
    let follow = good.replacen(&format!("plugin = {fedprox}"), &format!("plugin = {fedprox}\nfollow_tag = true"), 1);
    expect_error_at(
        &follow,
        "follow_tag",
        "",
        "key `aggregator.follow_tag`: only a plugin given as an oci:// tag can follow it",
    );
}

#[test]
fn fedprox_client_term_changes_local_training() {
    use nereid::runtime::bindings::types::{ConfigEntry, ConfigValue};
    use nereid::runtime::{Limits, ObjectivePlugin, RoundContext};
    use nereid::train::{train, OptimizerKind, TrainParams};

    let (data, _) = Dataset::digits().holdout(0.5, 3);
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![16], classes: 10 };
    let global = spec.init(1);
    let params = TrainParams { epochs: 3, batch_size: 16, learning_rate: 0.1, optimizer: OptimizerKind::Sgd };
    let (rt, _dir) = runtime();
    let run = |mu: Option<f64>| {
        let mut obj = mu.map(|mu| {
            let mut p = ObjectivePlugin::load(&rt, &plugin("fedprox"), Limits::default(), &Default::default())
                .expect("fedprox");
            let server = vec![ConfigEntry { key: "mu".into(), value: ConfigValue::Float(mu) }];
            p.begin_round(&RoundContext::default(), &global, &server).expect("begin");
            p
        });
        train(&spec, &global, &data, &params, 11, obj.as_mut(), |_, _| {}).expect("train")
    };
    let distance = |m: &model_io::NamedTensors| -> f64 {
        m.iter()
            .zip(&global)
            .map(|((_, a), (_, b))| {
                a.to_f64_vec().iter().zip(b.to_f64_vec()).map(|(x, y)| (x - y).powi(2)).sum::<f64>()
            })
            .sum::<f64>()
            .sqrt()
    };
    let plain = run(None);
    assert_eq!(run(Some(0.0)).model, plain.model, "mu = 0 is plain training");
    let prox = run(Some(1.0));
    assert_ne!(prox.model, plain.model);
    assert!(
        distance(&prox.model) < 0.8 * distance(&plain.model),
        "the proximal term keeps w near w_global: {} vs {}",
        distance(&prox.model),
        distance(&plain.model)
    );
    assert!(prox.penalty > 0.0);
}

#[test]
fn a_job_stops_at_its_target_accuracy_or_when_an_operator_stops_it() {
    let c = Cluster::running(3);
    let early = job_toml("early", "fedavg", 30, 3, 60.0).replace("rounds = 30", "rounds = 30\ntarget_accuracy = 0.6");
    c.apply("early", &early);
    let s = c.wait_done("early");
    assert!(s.rounds_done < 30, "{s:?}");
    assert!(s.reason.as_deref().is_some_and(|r| r.contains("reached the target 0.6")), "{s:?}");
    assert!(s.history.last().and_then(|h| h.accuracy).is_some_and(|a| a >= 0.6));

    c.apply("long", &job_toml("long", "fedavg", 1000, 3, 60.0));
    c.wait_until("long", "a round", |s| s.rounds_done >= 1);
    let out = c.nereid(&["job", "stop", "long"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = c.wait_until("long", "the stop", |s| s.status != "running");
    assert_eq!(s.status, "stopped");
    let done = s.rounds_done;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.status("long").rounds_done, done, "no round runs after the stop");
}

/// A job whose rounds are a differentially private mean (adaptive clipping) then FedAdam's
/// server step, with the privacy section `privacy`.
fn private_job(rounds: u32, privacy: &str) -> String {
    let fedadam = plugin("fedadam").display().to_string();
    job_toml("digits", "dp-adaptive-clipping", rounds, 3, 60.0)
        + "config = { noise_multiplier = 0.8, clipped_count_stddev = 0.5, initial_clipping_norm = 0.5 }\n\n"
        + &format!("[[aggregator.then]]\nplugin = {fedadam:?}\nconfig = {{ eta = 0.05, tau = 0.001 }}\n\n[privacy]\n{privacy}\n")
}

#[test]
fn a_private_chain_killed_mid_job_keeps_its_clipping_norm_and_moments_and_ends_bit_identical() {
    let rounds = 5;
    let job = private_job(rounds, "delta = 1e-5");
    let reference = reference_of(&job, rounds);
    let (model, states) = killed_at_round(&job, rounds, 3);
    assert_eq!(model, reference, "bit-identical to the run without the crash");
    let last = states.last().expect("a state per round");
    assert!(last.contains(&"clipping_norm".to_string()), "{last:?}");
    assert!(last.contains(&"then[0]/m/dense.0.weight".to_string()), "{last:?}");
}

#[test]
fn a_private_job_reports_epsilon_after_every_round_and_stops_at_its_budget() {
    // Every node selected (q = 1) with z = 0.8: epsilon after k rounds, computed here.
    let after = |k: u32| {
        let mut a = nereid::privacy::Accountant::default();
        (0..k).for_each(|_| a.step(1.0, 0.8));
        a.epsilon(1e-5)
    };
    let budget = (after(2) + after(3)) / 2.0;
    let c = Cluster::running(3);
    c.apply("job", &private_job(10, &format!("delta = 1e-5\nepsilon_budget = {budget}")));
    let s = c.wait_done("digits");
    assert_eq!(s.rounds_done, 2, "the third round would pass the budget: {:?}", s.reason);
    assert!(s.reason.as_deref().is_some_and(|r| r.contains("privacy budget spent")), "{:?}", s.reason);
    for (k, h) in s.history.iter().enumerate() {
        let p = h.privacy.as_ref().expect("a private round reports its privacy");
        assert_eq!((p.noise_multiplier, p.sampling_rate, p.delta), (0.8, 1.0, 1e-5));
        assert!(
            (p.epsilon - after(k as u32 + 1)).abs() < 1e-9,
            "round {}: {} vs {}",
            h.round,
            p.epsilon,
            after(k as u32 + 1)
        );
        assert!(h.aggregator_metrics.contains_key("then[0].eta_t"), "FedAdam's metrics: {:?}", h.aggregator_metrics);
    }
    let (_, body) = http("GET", &c.url("/metrics"), None, Vec::new());
    let text = String::from_utf8(body).expect("utf-8");
    let line = text.lines().find(|l| l.starts_with("nereid_privacy_epsilon{job=\"digits\"")).expect("the gauge");
    let epsilon: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number");
    assert!((epsilon - after(2)).abs() < 1e-9, "/metrics: {epsilon}");
    let text = String::from_utf8_lossy(&c.nereid(&["job", "status", "digits"]).stdout).to_string();
    assert!(text.contains("privacy    epsilon") && text.contains("privacy budget spent"), "{text}");
}

#[test]
fn a_chain_stage_of_the_wrong_slot_is_refused_naming_it() {
    let c = Cluster::running(0);
    let clipping = plugin("dp-client-clipping").display().to_string();
    let job = job_toml("digits", "fedavg", 2, 1, 60.0)
        + &format!("\n[[aggregator.then]]\nplugin = {clipping:?}\nconfig = {{ clipping_norm = 1.0 }}\n");
    let path = c.path("chain.toml");
    std::fs::write(&path, job).expect("job file");
    let out = c.nereid(&["job", "apply", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused");
    assert!(err.contains("aggregator.then[0].plugin") && err.contains("compressor"), "{err}");
}

fn selection_job(selector: &str, config: &str) -> String {
    let selector = plugin(selector).display().to_string();
    job_toml("digits", "fedavg", 1000, 2, 60.0).replace("fraction = 1.0", "fraction = 0.6")
        + &format!("\n[client_selection]\nplugin = {selector:?}\nconfig = {{ {config} }}\n")
}

#[test]
fn client_selection_is_a_sampler_plugin_that_follows_the_loss_and_swaps_live() {
    let c = Cluster::running(3);
    c.apply("job", &selection_job("power-of-choice", "candidates = 1.5"));
    c.wait_until("digits", "three rounds", |s| s.rounds_done >= 3);
    c.apply("job", &selection_job("replay-buffer", "capacity = 16"));
    let swapped = c.wait_until("digits", "the swap and two rounds after it", |s| {
        s.swaps.iter().any(|w| w.slot == "client_selection" && s.rounds_done > w.round)
    });
    let out = c.nereid(&["job", "stop", "digits"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = c.status("digits");
    assert!(s.rounds_done >= swapped.rounds_done);
    let swap = s.swaps.iter().find(|w| w.slot == "client_selection").expect("the selector swapped");
    assert!(swap.error.is_none() && swap.from.starts_with("sha256:") && swap.from != swap.to, "{swap:?}");
    assert!(s.history.iter().all(|h| h.participants.len() == 2), "two of three nodes per round");

    // Before the swap, each round took the two nodes with the highest training loss they last
    // reported (nodes that reported none first, in name order).
    let db = rusqlite::Connection::open(c.path("cloud.db")).expect("the cloud's state");
    let mut stmt = db.prepare("SELECT round, node, metrics FROM updates WHERE job = 'digits'").expect("query");
    let updates: Vec<(u32, String, f64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?)))
        .expect("rows")
        .map(|row| {
            let (round, node, metrics) = row.expect("row");
            let m: Value = serde_json::from_str(&metrics).expect("metrics");
            (round, node, m["train_loss"].as_f64().expect("train loss"))
        })
        .collect();
    for h in s.history.iter().filter(|h| h.round < swap.round) {
        let mut last: std::collections::BTreeMap<&str, (u32, f64)> = Default::default();
        for (round, node, loss) in updates.iter().filter(|u| u.0 < h.round) {
            if last.get(node.as_str()).is_none_or(|(r, _)| r < round) {
                last.insert(node, (*round, *loss));
            }
        }
        let rank = |n: &str| last.get(n).map_or(i64::MAX, |(_, l)| (l * 1e6).round() as i64);
        let mut nodes = ["edge-1", "edge-2", "edge-3"];
        nodes.sort_by(|a, b| rank(b).cmp(&rank(a)).then(a.cmp(b)));
        let mut want: Vec<&str> = nodes[..2].to_vec();
        want.sort();
        assert_eq!(h.participants, want, "round {}: losses {last:?}", h.round);
    }
    assert!(swap.round >= 4, "power-of-choice chose at least three rounds: {swap:?}");
}
