//! What an attacker or a careless operator sends the cloud, the edges and their configs: each
//! defect found that way, and the servers' refusal of what they cannot handle.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nereid::inference::export::to_onnx;
use nereid::model_io;
use nereid::protocol::{META_METRICS, META_NUM_EXAMPLES};
use nereid::train::{Dataset, ModelSpec};
use nereid_onnx::Message;
use serde_json::{json, Value};

use crate::cluster::*;
use crate::common::*;

fn job_toml(name: &str, model: &str, training: &str, rounds: u32, min_clients: usize) -> String {
    format!(
        "[job]\nname = {name:?}\nseed = 7\n\n[rounds]\nmin_clients = {min_clients}\ndeadline_secs = 60\n\n\
         [stop]\nrounds = {rounds}\n\n[model]\nkind = \"mlp\"\n{model}\n\n[training]\n{training}\n\n\
         [aggregator]\nplugin = {:?}\n",
        plugin("fedavg").display().to_string()
    )
}

const MODEL: &str = "inputs = 64\nhidden = [16]\nclasses = 10";
const TRAINING: &str = "epochs = 1\nbatch_size = 16\nlearning_rate = 0.1";

/// `nereid job apply --dry-run` of `job`: its stderr if it was refused.
fn dry_run(dir: &Path, job: &str) -> Result<(), String> {
    let path = dir.join("job.toml");
    std::fs::write(&path, job).expect("job file");
    let out = nereid(&["job", "apply", "--dry-run", "--token", "x", path.to_str().expect("utf-8")]);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A valid job's spec as the CLI would send it (its component uploaded to the cloud), as JSON
/// to tamper with.
fn valid_spec(c: &Cluster) -> Value {
    let path = c.path("valid.toml");
    std::fs::write(&path, job_toml("valid", MODEL, TRAINING, 1, 1)).expect("job file");
    let (runtime, _cache) = runtime();
    let fetch = |source: &str, base: &Path| {
        let file = base.join(source);
        let bytes = std::fs::read(&file)?;
        Ok(nereid::runtime::Fetched {
            digest: nereid::runtime::content_digest(&bytes),
            bytes,
            pinned: None,
            origin: file.display().to_string(),
        })
    };
    let loaded = nereid::config::job::load(&path, &runtime, &fetch).expect("a valid job");
    for bytes in loaded.components.into_values() {
        assert_eq!(http("POST", &c.url("/v1/components"), Some(&c.admin), bytes).0, 200);
    }
    serde_json::to_value(&loaded.spec).expect("json")
}

/// POSTs `spec` to `/v1/jobs` as the operator: (status, body).
fn submit(c: &Cluster, spec: &Value) -> (u16, String) {
    block(async {
        let resp = reqwest::Client::new()
            .post(c.url("/v1/jobs"))
            .bearer_auth(&c.admin)
            .json(&json!({ "spec": spec }))
            .send()
            .await
            .expect("POST /v1/jobs");
        (resp.status().as_u16(), resp.text().await.unwrap_or_default())
    })
}

fn with(spec: &Value, pointer: &str, value: Value) -> Value {
    let mut s = spec.clone();
    *s.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer}")) = value;
    s
}

#[test]
fn names_that_are_paths_labels_or_too_long_are_refused_by_the_cli_and_the_api() {
    let mut c = Cluster::new(1, "");
    c.start_cloud();
    let spec = valid_spec(&c);
    let long = "x".repeat(218);
    for name in ["../../../../tmp/x/pwn", long.as_str(), "x\"} 1\nnereid_forged_total 1", ""] {
        let (code, body) = submit(&c, &with(&spec, "/name", json!(name)));
        assert_eq!(code, 400, "{name:?}: {body}");
        assert!(body.contains("job.name"), "{body}");
        let refused = dry_run(c.dir.path(), &job_toml(name, MODEL, TRAINING, 1, 1)).expect_err(name);
        assert!(refused.contains("key `job.name`"), "{refused}");
    }
    let metrics = String::from_utf8_lossy(&http("GET", &c.url("/metrics"), None, Vec::new()).1).into_owned();
    assert!(!metrics.contains("nereid_forged"), "{metrics}");
    assert!(!Path::new("/tmp/x/pwn").exists());
    // The node names of per-node overrides follow the same rule.
    let (code, body) = submit(&c, &with(&spec, "/training/nodes", json!({ "../edge": { "epochs": 2 } })));
    assert!(code == 400 && body.contains("training.nodes"), "{code}: {body}");
}

#[test]
fn every_range_of_a_job_is_checked_by_the_api_as_by_the_cli() {
    let mut c = Cluster::new(1, "");
    c.start_cloud();
    let spec = valid_spec(&c);
    let cases: [(&str, Value, &str); 12] = [
        ("/training/batch_size", json!(0), "training.batch_size"),
        ("/training/epochs", json!(0), "training.epochs"),
        ("/training/epochs", json!(4294967295u64), "training.epochs"),
        ("/training/learning_rate", json!(-0.1), "training.learning_rate"),
        ("/training/learning_rate", json!(1e308), "training.learning_rate"),
        ("/rounds/min_clients", json!(0), "rounds.min_clients"),
        ("/rounds/deadline_secs", json!(-5.0), "rounds.deadline_secs"),
        ("/rounds/fraction", json!(0.0), "rounds.fraction"),
        ("/stop/rounds", json!(0), "stop.rounds"),
        ("/model/hidden", json!([17179869184u64]), "model.hidden"),
        ("/model/inputs", json!(4611686018427387904u64), "model.inputs"),
        ("/aggregator/limits/memory_bytes", json!(1u64 << 40), "aggregator.memory_mib"),
    ];
    for (pointer, value, key) in cases {
        let (code, body) = submit(&c, &with(&spec, pointer, value.clone()));
        assert_eq!(code, 400, "{pointer} = {value}: {body}");
        assert!(body.contains(key), "{pointer} = {value}: {body}");
    }
    // A model within the caps but larger than the cloud takes in one upload.
    let big = with(&spec, "/model/inputs", json!(1 << 16));
    let (code, body) = submit(&c, &with(&big, "/model/hidden", json!([1024])));
    assert!(code == 400 && body.contains("max_upload_mib"), "{code}: {body}");
    assert_eq!(http("GET", &c.url("/v1/health"), None, Vec::new()).0, 200, "the cloud is still there");
    assert_eq!(http("GET", &c.url("/v1/jobs"), Some(&c.admin), Vec::new()).1, b"[]", "nothing was created");
    // The CLI refuses the defects' own files with their line and key.
    let refused =
        dry_run(c.dir.path(), &job_toml("big", "inputs = 64\nhidden = [17179869184]\nclasses = 10", TRAINING, 1, 1))
            .expect_err("refused");
    assert!(refused.contains(":15:1:") && refused.contains("key `model.hidden`"), "{refused}");
    let refused = dry_run(c.dir.path(), &job_toml("lr", MODEL, "learning_rate = 1e308", 1, 1)).expect_err("refused");
    assert!(refused.contains("key `training.learning_rate`"), "{refused}");
}

/// A node's update of the job's model with `n` examples and `metrics`.
fn update(n: &str, metrics: &str) -> Vec<u8> {
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![16], classes: 10 };
    let meta = std::collections::HashMap::from([
        (META_NUM_EXAMPLES.to_string(), n.to_string()),
        (META_METRICS.to_string(), metrics.to_string()),
    ]);
    model_io::encode(&spec.init(3), Some(meta)).expect("encode")
}

const GOOD_METRICS: &str =
    "{\"eval_accuracy\":0.5,\"eval_loss\":1.0,\"eval_examples\":10,\"train_loss\":1.0,\"penalty\":0.0,\"steps\":1}";

/// Polls `/v1/task` as every node of `c` until the round opens for them.
fn wait_for_round(c: &Cluster) {
    let t = Instant::now();
    loop {
        let answers: Vec<Value> = c
            .nodes
            .iter()
            .map(|(_, token)| {
                serde_json::from_slice(&http("GET", &c.url("/v1/task"), Some(token), Vec::new()).1).expect("task")
            })
            .collect();
        if answers.iter().all(|a| !a["task"].is_null()) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no task");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn example_counts_and_metrics_are_checked_and_a_node_sees_only_its_models() {
    let mut c = Cluster::new(2, "");
    c.start_cloud();
    c.apply(
        "job",
        &format!(
            "{}\n",
            job_toml("digits", MODEL, TRAINING, 1, 2)
                .replace("deadline_secs = 60", "deadline_secs = 60\nmax_examples = 1000")
        ),
    );
    // A node that never polled is not selected: it may not read the job's models.
    let (code, _) = http("GET", &c.url("/v1/jobs/digits/models/0"), Some("token-of-edge-2"), Vec::new());
    assert_eq!(code, 403);
    wait_for_round(&c);
    let (a, b) = (c.nodes[0].1.clone(), c.nodes[1].1.clone());
    assert_eq!(http("GET", &c.url("/v1/jobs/digits/models/0"), Some(&a), Vec::new()).0, 200);
    assert_eq!(http("GET", &c.url("/v1/jobs/digits/models/1"), Some(&a), Vec::new()).0, 403, "no round 2");
    let up = c.url("/v1/jobs/digits/rounds/1/update");
    let refused = |n: &str, metrics: &str, what: &str| {
        let (code, body) = http("POST", &up, Some(&a), update(n, metrics));
        let body = String::from_utf8_lossy(&body);
        assert!(code == 400 && body.contains(what), "{n} {metrics}: {code} {body}");
    };
    refused("18446744073709551615", GOOD_METRICS, "max_examples");
    refused("1001", GOOD_METRICS, "max_examples");
    refused("0", GOOD_METRICS, "max_examples");
    refused("10", &GOOD_METRICS.replace("0.5", "1e9"), "eval_accuracy");
    refused("10", &GOOD_METRICS.replace("\"train_loss\":1.0", "\"train_loss\":null"), "metrics");
    refused("10", &GOOD_METRICS.replace("\"eval_examples\":10", "\"eval_examples\":100000"), "eval_examples");
    assert_eq!(c.metric("nereid_updates_accepted_total"), 0.0);
    assert_eq!(http("POST", &up, Some(&a), update("1000", GOOD_METRICS)).0, 200);
    assert_eq!(http("POST", &up, Some(&b), update("7", GOOD_METRICS)).0, 200);
    let s = c.wait_done("digits");
    assert_eq!(s.history[0].examples, 1007);
    assert_eq!(s.history[0].accuracy, Some(0.5));
}

/// Opens a chunked upload as `token` and sends `first` bytes of it (if any), then nothing.
fn stalled_upload(c: &Cluster, path: &str, token: &str, first: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", c.port)).expect("connect");
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .expect("headers");
    if !first.is_empty() {
        write!(tcp, "{:x}\r\n", first.len()).expect("chunk size");
        tcp.write_all(first).expect("chunk");
        tcp.write_all(b"\r\n").expect("chunk end");
    }
    tcp
}

/// What the server answers on `tcp` before it closes it (at most `within`).
fn answer(tcp: &mut TcpStream, within: Duration) -> String {
    tcp.set_read_timeout(Some(within)).expect("timeout");
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn one_node_cannot_hold_the_upload_slots_and_unauthenticated_bodies_are_never_read() {
    let mut c = Cluster::new(2, "[http]\nbody_idle_secs = 3");
    c.start_cloud();
    c.apply("job", &job_toml("digits", MODEL, TRAINING, 1, 2));
    wait_for_round(&c);
    let (a, b) = (c.nodes[0].1.clone(), c.nodes[1].1.clone());
    let path = "/v1/jobs/digits/rounds/1/update";
    let body = update("10", GOOD_METRICS);
    // Node a stalls four uploads: the first holds a slot, the others are refused at once.
    let mut first = stalled_upload(&c, path, &a, &body[..100]);
    std::thread::sleep(Duration::from_millis(300));
    // (These send no body: the server answers without reading one and closes.)
    let refused: Vec<String> =
        (0..3).map(|_| stalled_upload(&c, path, &a, &[])).map(|mut s| answer(&mut s, Duration::from_secs(5))).collect();
    assert!(refused.iter().all(|r| r.starts_with("HTTP/1.1 429")), "{refused:?}");
    // Node b's upload goes through meanwhile.
    let sent = block(async {
        reqwest::Client::new()
            .post(c.url(path))
            .bearer_auth(&b)
            .body(body.clone())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert_eq!(sent.ok(), Some(200), "another node's upload is not held up");
    // The stalled one ends with 408 once its body idles past body_idle_secs, freeing node a.
    let late = answer(&mut first, Duration::from_secs(15));
    assert!(late.starts_with("HTTP/1.1 408"), "{late}");
    assert_eq!(http("POST", &c.url(path), Some(&a), body.clone()).0, 200);
    c.wait_done("digits");
    assert_eq!(c.metric("nereid_updates_accepted_total"), 2.0);

    // A request without a valid token is answered before its body is sent.
    for (method, path) in [("POST", "/v1/ping"), ("POST", "/v1/jobs"), ("POST", "/v1/components"), ("POST", path)] {
        let mut tcp = TcpStream::connect(("127.0.0.1", c.port)).expect("connect");
        write!(tcp, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n").expect("headers");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut first = [0u8; 12];
        let got = tcp.read_exact(&mut first).map(|()| String::from_utf8_lossy(&first).into_owned());
        assert_eq!(got.ok().as_deref(), Some("HTTP/1.1 401"), "{method} {path}");
    }
}

/// Writes the digits split for edge `i` of `c`, with every training feature set to `value`
/// (3e38 makes the forward pass overflow).
fn poison_data(c: &Cluster, i: usize, value: f32) {
    let data = c.path(&format!("{}/data", c.nodes[i].0));
    let (mut train, test) = Dataset::digits().holdout(0.2, 1);
    train.x.iter_mut().for_each(|v| *v = value);
    train.write_csv(&data.join("train.csv")).expect("csv");
    test.write_csv(&data.join("test.csv")).expect("csv");
}

#[test]
fn a_node_whose_training_diverges_fails_its_round_and_the_others_go_on() {
    let mut c = Cluster::new(3, "");
    poison_data(&c, 2, 3e38);
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    c.apply("job", &job_toml("digits", MODEL, TRAINING, 2, 2));
    let s = c.wait_done("digits");
    for h in &s.history {
        assert_eq!(h.participants, ["edge-1", "edge-2"], "round {}", h.round);
        assert_eq!(h.closed_by, "quorum", "not the deadline: the round did not wait for edge-3");
        let failed = h.rejected.iter().find(|r| r.update == "edge-3").expect("edge-3 failed");
        assert!(failed.reason.contains("diverged"), "{failed:?}");
    }
    // Alone, the node fails every round; the rounds close at once, the model stays as it was.
    let mut c = Cluster::new(1, "");
    poison_data(&c, 0, 3e38);
    c.start_cloud();
    c.start_edge(0);
    c.apply("job", &job_toml("alone", MODEL, TRAINING, 2, 1));
    let s = c.wait_done("alone");
    assert!(s.history.iter().all(|h| h.closed_by == "failures" && h.participants.is_empty()), "{:?}", s.history);
    assert_eq!(c.model("alone", 2), c.model("alone", 0));
}

#[test]
fn an_edge_is_not_held_by_a_bad_job_and_stops_training_a_stopped_one() {
    let c = Cluster::running(2);
    // Job `wrong` does not fit the edges' data (32 features): both report it and go on.
    c.apply("wrong", &job_toml("wrong", "inputs = 32\nclasses = 10", TRAINING, 3, 2));
    let s = c.wait_done("wrong");
    assert!(s.history.iter().all(|h| h.closed_by == "failures"), "{:?}", s.history);
    assert!(s.history[0].rejected.iter().any(|r| r.reason.contains("32")), "{:?}", s.history[0]);
    // A long job is stopped while the edges train; they leave it and take the next job.
    c.apply("long", &job_toml("long", MODEL, "epochs = 5000\nbatch_size = 1\nlearning_rate = 0.01", 1, 2));
    c.wait_until("long", "training", |s| s.current.is_some());
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.nereid(&["job", "stop", "long"]).status.success());
    c.apply("next", &job_toml("next", MODEL, TRAINING, 1, 2));
    c.wait_done("next");
    for (name, _) in &c.nodes {
        let log = std::fs::read_to_string(c.path(&format!("{name}.log"))).expect("log");
        assert!(log.contains("training cancelled"), "{name}: {log}");
    }
}

/// A joint service `digits` on a small MLP, and a replay buffer.
fn serving_edge_toml(c: &Cluster, api: &str) -> String {
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![16], classes: 10 };
    let dir = c.path("models/digits");
    std::fs::create_dir_all(&dir).expect("models");
    std::fs::write(dir.join("model.onnx"), to_onnx(&spec, &spec.init(1)).expect("onnx").encode_to_vec())
        .expect("write");
    format!(
        "models = {:?}\n[services.digits]\nkind = \"joint\"\nmodel = \"digits\"\n\
         router = {{ plugin = {:?}, config = {{ policy = \"edge-only\" }} }}\n\
         [replay]\nplugin = {:?}\nconfig = {{ policy = \"reservoir\", capacity = 10, seed = 1 }}\n{api}",
        c.path("models").display().to_string(),
        plugin("hard-example-mining").display().to_string(),
        plugin("replay-buffer").display().to_string()
    )
}

#[test]
fn the_edge_api_needs_a_token_with_the_right_to_do_what_is_asked() {
    let mut c = Cluster::new(1, "");
    c.start_cloud();
    let api = "[api.clients.camera]\ntoken = \"camera-token-1\"\nallow = [\"infer\"]\n\
               [api.clients.feeder]\ntoken_env = \"NEREID_TEST_FEEDER_TOKEN\"\nallow = [\"samples\"]\n\
               [api.clients.reader]\ntoken_file = \"reader.token\"\nallow = [\"read\"]\n";
    std::env::set_var("NEREID_TEST_FEEDER_TOKEN", "feeder-token-1");
    std::fs::create_dir_all(c.path("edge-1")).expect("dir");
    std::fs::write(c.path("edge-1/reader.token"), "reader-token-1\n").expect("token file");
    let edge = c.start_serving_edge(0, &serving_edge_toml(&c, api));
    let x: Vec<f32> = (0..64).map(|i| i as f32 % 16.0).collect();
    let infer = serde_json::to_vec(&json!({"shape": [1, 64], "data": x})).expect("json");
    let samples = {
        use nereid::runtime::bindings::types::Dtype;
        use nereid::runtime::TensorData;
        let x = TensorData {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![1, 64],
            data: x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let y = TensorData { name: "y".into(), dtype: Dtype::I64, shape: vec![1], data: 3i64.to_le_bytes().to_vec() };
        nereid::inference::wire::to_safetensors(&[x, y]).expect("safetensors")
    };
    let call = |method: &str, path: &str, token: Option<&str>, body: &[u8]| {
        http(method, &format!("{edge}{path}"), token, body.to_vec()).0
    };
    for (method, path, body) in
        [("POST", "/v1/infer/digits", &infer), ("POST", "/v1/samples", &samples), ("GET", "/v1/samples", &Vec::new())]
    {
        assert_eq!(call(method, path, None, body), 401, "{method} {path}");
        assert_eq!(call(method, path, Some("guess-guess"), body), 401, "{method} {path}");
    }
    assert_eq!(call("POST", "/v1/infer/digits", Some("camera-token-1"), &infer), 200);
    assert_eq!(call("POST", "/v1/samples", Some("camera-token-1"), &samples), 403);
    assert_eq!(call("POST", "/v1/samples", Some("feeder-token-1"), &samples), 200);
    assert_eq!(call("POST", "/v1/infer/digits", Some("feeder-token-1"), &infer), 403);
    assert_eq!(call("GET", "/v1/samples", Some("feeder-token-1"), &[]), 403, "no `read`");
    assert_eq!(call("GET", "/v1/samples", Some("reader-token-1"), &[]), 200, "a token from a file");
    assert_eq!(call("POST", "/v1/samples", Some("reader-token-1"), &samples), 403);
    assert_eq!(call("GET", "/v1/health", None, &[]), 200);
    assert_eq!(call("GET", "/metrics", None, &[]), 200);
    // An edge that listens without saying who may call it does not start.
    let path = c.path("open.toml");
    std::fs::write(&path, "name = \"edge-1\"\ncloud = \"http://127.0.0.1:9\"\ntoken = \"t\"\nstate = \"e.db\"\nlisten = \"127.0.0.1:0\"\n")
        .expect("edge.toml");
    let out = nereid(&["edge", "--config", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("open.toml:5") && err.contains("[api]"), "{err}");
}

/// Runs `nereid args` for at most 30 s; its stderr, or a panic if it still runs then.
fn finishes(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(args)
        .env("NEREID_CACHE_DIR", std::env::temp_dir().join("nereid-hostile-cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("`nereid {}` still runs after 30 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read");
    err
}

#[test]
fn files_that_are_not_regular_or_not_what_they_claim_are_refused_without_echoing_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let fifo = dir.path().join("agg.wasm");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "root:$6$very-secret-hash:19000:0:99999:7:::\n").expect("secret");
    let job = dir.path().join("job.toml");
    for component in [fifo.to_str().expect("utf-8"), "/dev/zero", secret.to_str().expect("utf-8")] {
        std::fs::write(
            &job,
            job_toml("j", MODEL, TRAINING, 1, 1).replace(&plugin("fedavg").display().to_string(), component),
        )
        .expect("job");
        let err = finishes(&["job", "apply", "--dry-run", "--token", "x", job.to_str().expect("utf-8")]);
        assert!(err.contains("aggregator.plugin") && !err.contains("very-secret"), "{component}: {err}");
        if component != secret.to_str().expect("utf-8") {
            assert!(err.contains("not a regular file"), "{err}");
        }
    }
    // A config file that is not TOML: the error names the file, not its lines.
    let err = finishes(&["cloud", "--config", secret.to_str().expect("utf-8")]);
    assert!(err.contains("secret.txt") && !err.contains("very-secret"), "{err}");
    let err = finishes(&["cloud", "--config", fifo.to_str().expect("utf-8")]);
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn a_registry_that_trickles_fails_a_job_apply_in_seconds() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\n");
                // One header byte a second, for ever: no read ever waits long.
                for _ in 0..600 {
                    if conn.write_all(b"X").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
    });
    let dir = tempfile::tempdir().expect("tmp");
    let job = dir.path().join("job.toml");
    let reference = format!("oci://127.0.0.1:{port}/team/agg:1");
    std::fs::write(
        &job,
        job_toml("j", MODEL, TRAINING, 1, 1).replace(&plugin("fedavg").display().to_string(), &reference),
    )
    .expect("job");
    // `finishes` fails the test past 30 s; the message says the deadline is what ended it.
    let err = finishes(&["job", "apply", "--dry-run", "--token", "x", job.to_str().expect("utf-8")]);
    // The whole operation's deadline or, on a loaded machine, the wait for the next bytes.
    let deadline = err.contains("took longer than") || err.contains("timed out");
    assert!(deadline && err.contains(&format!("127.0.0.1:{port}")), "{err}");
}
