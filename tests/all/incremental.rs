//! The edge's incremental-learning job: samples arrive through the API and the inbox directory,
//! each trigger (count, a daily window wrapping midnight, an accuracy drop) starts a round, a
//! round's version is deployed or not by the deploy condition, and the joint service switches to
//! a deployed version without a restart.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nereid::edge::replay::batch_of;
use nereid::inference::export::to_onnx;
use nereid::inference::wire;
use nereid::runtime::bindings::types::Dtype;
use nereid::runtime::TensorData;
use nereid::train::{self, Dataset, ModelSpec, OptimizerKind, TrainParams};
use nereid_onnx::Message;

use crate::cluster::*;
use crate::common::*;

/// Rows `range` of `data`.
fn rows(data: &Dataset, range: std::ops::Range<usize>) -> Dataset {
    data.subset(&range.collect::<Vec<_>>())
}

/// Samples as `POST /v1/samples`, the inbox and MQTT take them: `x` f32 [n, 64], `y` i64 [n].
fn batch(data: &Dataset) -> Vec<u8> {
    let (x, y) = batch_of(data);
    wire::to_safetensors(&[x, y]).expect("safetensors")
}

/// Polls `f` until it gives a value (120 s at most, then fails with `what` and the last state).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let t = Instant::now();
    loop {
        match f() {
            Ok(value) => return value,
            Err(state) => assert!(t.elapsed() < Duration::from_secs(120), "{what}: {state}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get_json(url: &str) -> serde_json::Value {
    let (code, body) = http("GET", url, Some(EDGE_TOKEN), Vec::new());
    assert_eq!(code, 200, "{url}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("json")
}

fn post_samples(edge: &str, data: &Dataset) {
    let (code, body) = http("POST", &format!("{edge}/v1/samples"), Some(EDGE_TOKEN), batch(data));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

fn status(edge: &str) -> serde_json::Value {
    get_json(&format!("{edge}/v1/incremental"))
}

/// The job's status once `done` holds for it.
fn wait_for_status(edge: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    eventually(what, || {
        let s = status(edge);
        if done(&s) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

/// The job's status once `checks` more checks have run than when it was called.
fn after_checks(edge: &str, checks: u64) -> serde_json::Value {
    let start = status(edge)["checks"].as_u64().unwrap_or(0);
    wait_for_status(edge, "the job stopped checking", |s| s["checks"].as_u64().unwrap_or(0) >= start + checks)
}

fn versions(edge: &str) -> serde_json::Value {
    get_json(&format!("{edge}/v1/models"))
}

/// Waits until the edge has recorded `count` versions (version 0 included).
fn wait_for_versions(edge: &str, count: usize) -> serde_json::Value {
    eventually(&format!("no version {count}"), || {
        let v = versions(edge);
        match v["versions"].as_array().map_or(0, Vec::len) >= count {
            true => Ok(v),
            false => Err(format!("{v}\nstatus: {}", status(edge))),
        }
    })
}

struct Digits {
    train: Dataset,
    test: Dataset,
}

/// The digits split, a model that learned classes 0-4 (the service's model, version 0) and the
/// whole test split as the eval set.
fn setup(c: &Cluster) -> Digits {
    let (train_set, test) = Dataset::digits().holdout(0.2, 5);
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![32], classes: 10 };
    let params = TrainParams { epochs: 20, batch_size: 16, learning_rate: 0.05, optimizer: OptimizerKind::Sgd };
    let first = train::train(&spec, &spec.init(5), &train_set.of_classes(0..5), &params, 5, None, |_, _| {})
        .expect("trains")
        .model;
    let dir = c.path("models/digits");
    std::fs::create_dir_all(&dir).expect("models");
    std::fs::write(dir.join("model.onnx"), to_onnx(&spec, &first).expect("exports").encode_to_vec()).expect("write");
    std::fs::create_dir_all(c.path("eval")).expect("eval");
    test.write_csv(&c.path("eval/test.csv")).expect("eval csv");
    Digits { train: train_set, test }
}

/// The edge.toml of a joint service `digits` with a replay buffer and an incremental job.
fn edge_toml(c: &Cluster, job: &str, trigger: &str) -> String {
    format!(
        "models = {models:?}\n\
         [services.digits]\nkind = \"joint\"\nmodel = \"digits\"\ninstances = 2\n\
         router = {{ plugin = {router:?}, config = {{ policy = \"edge-only\" }} }}\n\
         [replay]\nplugin = {replay:?}\nconfig = {{ policy = \"class-balanced\", capacity = 300, seed = 3 }}\n\
         [incremental]\nservice = \"digits\"\neval = {eval:?}\ncheck_ms = 100\nreplay_draw = 300\n\
         training = {{ epochs = 20, batch_size = 16, learning_rate = 0.05, optimizer = \"sgd\" }}\n{job}\n\
         [incremental.trigger]\n{trigger}\n",
        models = c.path("models").display().to_string(),
        router = plugin("hard-example-mining").display().to_string(),
        replay = plugin("replay-buffer").display().to_string(),
        eval = c.path("eval").display().to_string(),
    )
}

/// Classes the edge's service predicts for `data`'s rows, and how many were right.
fn correct(edge: &str, data: &Dataset) -> usize {
    let body = serde_json::json!({ "shape": [data.len(), 64], "data": data.x });
    let (code, out) =
        http("POST", &format!("{edge}/v1/infer/digits"), Some(EDGE_TOKEN), serde_json::to_vec(&body).expect("json"));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out).expect("json");
    let p: Vec<f64> =
        answer["outputs"][0]["data"].as_array().expect("data").iter().filter_map(|v| v.as_f64()).collect();
    p.chunks(10)
        .zip(&data.y)
        .filter(|(row, &y)| {
            let best = row.iter().enumerate().fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
            best == y as usize
        })
        .count()
}

/// Puts a file in the inbox as a producer should: written under another name, then renamed.
fn drop_in(inbox: &std::path::Path, name: &str, bytes: &[u8]) {
    let tmp = inbox.join(format!("{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, inbox.join(name)).expect("rename");
}

#[test]
fn the_count_trigger_starts_a_round_on_samples_from_the_api_and_the_inbox() {
    let mut c = Cluster::new(1, "");
    let d = setup(&c);
    let inbox = c.path("inbox");
    std::fs::create_dir_all(&inbox).expect("inbox");
    let job = format!("inbox = {:?}", inbox.display().to_string());
    let edge = c.start_serving_edge(0, &edge_toml(&c, &job, "min_new_samples = 200"));
    let old = d.train.of_classes(0..5);
    post_samples(&edge, &rows(&old, 0..120));
    let s = after_checks(&edge, 3);
    assert_eq!(s["new_samples"], 120, "{s}");
    assert!(s["trigger"].as_str().unwrap_or("").contains("waiting for new samples: 120 of 200"), "{s}");
    assert_eq!(versions(&edge)["versions"].as_array().map(Vec::len), Some(1), "only version 0");

    // A refused file goes to failed/ with its error; a good one brings the count to 200.
    let no_labels = wire::to_safetensors(&[wire::f32_tensor("x", vec![1, 64], &[0.0; 64])]).expect("safetensors");
    drop_in(&inbox, "a-bad.safetensors", &no_labels);
    drop_in(&inbox, "b-good.safetensors", &batch(&rows(&old, 120..200)));
    let v = wait_for_versions(&edge, 2);
    let v1 = &v["versions"][1];
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["parent"], 0);
    assert_eq!(v1["new_samples"], 200, "{v1}");
    assert!(v1["trigger"].as_str().unwrap_or("").contains("200 new samples (>= 200)"), "{v1}");
    let error = std::fs::read_to_string(inbox.join("failed/a-bad.safetensors.error")).expect("the error is kept");
    assert!(error.contains("`y`"), "{error}");
    assert!(inbox.join("done/b-good.safetensors").is_file() && !inbox.join("b-good.safetensors").exists());
    let s = status(&edge);
    assert_eq!(
        (s["inbox_taken"].as_u64(), s["inbox_failed"].as_u64(), s["new_samples"].as_u64()),
        (Some(1), Some(1), Some(0)),
        "{s}"
    );

    // The same content again (a re-dropped file) is moved, not taken twice.
    drop_in(&inbox, "c-again.safetensors", &batch(&rows(&old, 120..200)));
    let moved = inbox.join("done/c-again.safetensors");
    eventually("the inbox did not move the file", || {
        moved.is_file().then_some(()).ok_or_else(|| status(&edge).to_string())
    });
    let s = after_checks(&edge, 1);
    assert_eq!((s["inbox_taken"].as_u64(), s["new_samples"].as_u64()), (Some(1), Some(0)), "{s}");

    // A batch the model cannot take is refused at the door, naming what it takes.
    let (code, out) = http("POST", &format!("{edge}/v1/samples"), Some(EDGE_TOKEN), {
        let x = wire::f32_tensor("x", vec![1, 32], &[0.0; 32]);
        let y = TensorData { name: "y".into(), dtype: Dtype::I64, shape: vec![1], data: 3i64.to_le_bytes().to_vec() };
        wire::to_safetensors(&[x, y]).expect("safetensors")
    });
    let text = String::from_utf8_lossy(&out);
    assert!(code == 400 && text.contains("f32[64]"), "{code}: {text}");

    // `nereid model ls` shows both versions, the serving one marked.
    let out = c.nereid(&["model", "ls", "--edge", &edge]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[1].starts_with("*0") && lines[1].contains("initial"), "{text}");
    assert!(lines[2].starts_with(" 1") && lines[2].contains(v1["decision"].as_str().unwrap_or("?")), "{text}");
    let out = c.nereid(&["model", "ls", "--edge", &edge, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert_eq!(json["versions"].as_array().map(Vec::len), Some(2));
}

/// Minutes after midnight, local time (as the edge reads it).
fn local_minute() -> u16 {
    use chrono::Timelike;
    let now = chrono::Local::now();
    (now.hour() * 60 + now.minute()) as u16
}

fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[test]
fn the_window_trigger_waits_outside_a_window_that_wraps_midnight() {
    // Both windows below wrap midnight; right before midnight that leaves no room around now.
    while !(3..1435).contains(&local_minute()) {
        std::thread::sleep(Duration::from_secs(10));
    }
    let m = local_minute();
    // Excluding now: [start, 24:00) and [00:00, end) with end <= now < start.
    let (start, end) = if m < 720 { (m + 30, m.saturating_sub(30)) } else { ((m + 30).min(1439), m - 30) };
    let outside = format!("{}-{}", hhmm(start), hhmm(end));
    // Including now: from before now past midnight, or from late evening to after now.
    let inside = if m >= 720 { format!("{}-01:00", hhmm(m - 30)) } else { format!("23:00-{}", hhmm(m + 30)) };
    let mut c = Cluster::new(1, "");
    let d = setup(&c);
    let edge = c.start_serving_edge(0, &edge_toml(&c, "", &format!("min_new_samples = 50\nwindow = {outside:?}")));
    post_samples(&edge, &rows(&d.train.of_classes(0..5), 0..60));
    let s = after_checks(&edge, 5);
    assert!(s["trigger"].as_str().unwrap_or("").contains(&format!("outside the window {outside}")), "{s}");
    assert_eq!(versions(&edge)["versions"].as_array().map(Vec::len), Some(1), "no round outside {outside}");

    // The same samples, waiting in the store across the restart, start a round inside the window.
    c.kill_edge(0);
    let edge = c.start_serving_edge(0, &edge_toml(&c, "", &format!("min_new_samples = 50\nwindow = {inside:?}")));
    let v = wait_for_versions(&edge, 2);
    let v1 = &v["versions"][1];
    assert_eq!(v1["new_samples"], 60, "{v1}");
    assert!(v1["trigger"].as_str().unwrap_or("").contains(&format!("within {inside}")), "{v1}");
}

#[test]
fn the_metric_trigger_starts_a_round_only_when_accuracy_on_new_samples_drops() {
    let mut c = Cluster::new(1, "");
    let d = setup(&c);
    let edge = c.start_serving_edge(0, &edge_toml(&c, "", "min_new_samples = 40\naccuracy_drop = 0.2"));
    // Samples of the classes the model knows: it does better on them than on the eval set.
    post_samples(&edge, &rows(&d.train.of_classes(0..5), 0..40));
    let s = after_checks(&edge, 5);
    let trigger = s["trigger"].as_str().unwrap_or("");
    assert!(trigger.contains("40 new samples, no drop"), "{s}");
    assert_eq!(versions(&edge)["versions"].as_array().map(Vec::len), Some(1), "no round without a drop");
    // New classes arrive: the serving model gets most of the new samples wrong.
    post_samples(&edge, &rows(&d.train.of_classes(5..10), 0..200));
    let v = wait_for_versions(&edge, 2);
    let v1 = &v["versions"][1];
    assert_eq!(v1["new_samples"], 240, "{v1}");
    assert!(v1["trigger"].as_str().unwrap_or("").contains("accuracy dropped by"), "{v1}");
}

#[test]
fn a_better_version_is_deployed_and_served_without_a_restart_a_worse_one_is_not() {
    let mut c = Cluster::new(1, "");
    let d = setup(&c);
    let edge =
        c.start_serving_edge(0, &edge_toml(&c, "deploy_if = [\"accuracy_delta >= 0.01\"]", "min_new_samples = 300"));
    let pid = c.edge_pid(0);
    let (old, new) = (d.train.of_classes(0..5), d.train.of_classes(5..10));
    let new_test = d.test.of_classes(5..10);
    let before = correct(&edge, &new_test);
    println!("served answers on classes 5-9 before: {before}/{}", new_test.len());
    assert!(before <= new_test.len() / 10, "version 0 never learned 5-9");

    // Round 1: more of what the model knows. It cannot gain a point on the eval set: kept.
    post_samples(&edge, &rows(&old, 0..300));
    let v = wait_for_versions(&edge, 2);
    let v1 = &v["versions"][1];
    assert_eq!(v1["decision"], "kept", "{v1}");
    assert!(v1["metrics"]["accuracy_delta"].as_f64().unwrap_or(1.0) < 0.01, "{v1}");
    assert!(v1["reason"].as_str().unwrap_or("").contains("`accuracy_delta >= 0.01` fails"), "{v1}");
    assert_eq!(v["serving_version"], 0);
    assert!(correct(&edge, &new_test) <= new_test.len() / 10, "still version 0");

    // Round 2: classes 5-9 arrive; with the buffer's draw of 0-4 the model learns them without
    // forgetting the old ones. Requests keep coming while the round runs and the service switches.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, answered, url, probe) = (stop.clone(), answered.clone(), edge.clone(), d.test.subset(&[0]));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                correct(&url, &probe);
                answered.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    post_samples(&edge, &rows(&new, 0..300));
    let v = wait_for_versions(&edge, 3);
    let before = answered.load(Ordering::Relaxed);
    while answered.load(Ordering::Relaxed) < before + 20 {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().expect("every request during the switch was answered (correct() asserts 200)");
    let v2 = &v["versions"][2];
    println!("version 1: {}\nversion 2: {}", v["versions"][1]["metrics"], v2["metrics"]);
    assert_eq!(v2["decision"], "deployed", "{v2}");
    assert_eq!(v2["parent"], 0, "fine-tuned from the serving version, not the kept one");
    assert!(v2["replayed"].as_u64().unwrap_or(0) >= 100, "old classes came from the buffer: {v2}");
    assert!(v2["metrics"]["accuracy_delta"].as_f64().unwrap_or(0.0) >= 0.2, "{v2}");
    assert_eq!(v["serving_version"], 2);
    let s = status(&edge);
    assert_eq!(s["serving_model"], "digits@v2", "{s}");
    assert_eq!(c.edge_pid(0), pid, "no restart");
    let out = c.nereid(&["model", "ls", "--edge", &edge]);
    let listing = String::from_utf8_lossy(&out.stdout);
    println!("{listing}");
    let marked: Vec<&str> = listing.lines().filter(|l| l.starts_with('*')).collect();
    assert!(marked.len() == 1 && marked[0].starts_with("*2 ") && marked[0].contains("deployed"), "{listing}");
    let right = correct(&edge, &new_test);
    println!("served answers on classes 5-9 after the switch: {right}/{}", new_test.len());
    assert!(right >= new_test.len() * 8 / 10, "the service answers with version 2: {right}/{}", new_test.len());
    // Concurrent requests reach both instances of the pool: each answers with version 2.
    let concurrent: Vec<usize> = std::thread::scope(|s| {
        let runs: Vec<_> =
            (0..4).map(|_| s.spawn(|| (0..3).map(|_| correct(&edge, &new_test)).collect::<Vec<_>>())).collect();
        runs.into_iter().flat_map(|r| r.join().expect("a concurrent request")).collect()
    });
    assert!(concurrent.iter().all(|&n| n == right), "every instance serves version 2: {concurrent:?} against {right}");
    let old_test = d.test.of_classes(0..5);
    assert!(correct(&edge, &old_test) >= old_test.len() * 8 / 10, "and still knows 0-4");

    // After a restart the deployed version serves again.
    c.kill_edge(0);
    c.start_edge(0);
    c.wait_for_edge(0, &edge);
    assert_eq!(versions(&edge)["serving_version"], 2);
    assert_eq!(correct(&edge, &new_test), right, "the same version, the same answers");
}

#[test]
fn a_bad_incremental_section_is_refused_naming_the_line_or_the_section() {
    let c = Cluster::new(1, "");
    setup(&c);
    let dir = c.path("bad");
    std::fs::create_dir_all(&dir).expect("dir");
    let base = "name = \"edge-1\"\ncloud = \"http://127.0.0.1:9\"\ntoken = \"t\"\nstate = \"edge.db\"\nlisten = \"127.0.0.1:0\"\n";
    let run = |toml: &str| -> String {
        let path = dir.join("edge.toml");
        std::fs::write(&path, format!("{base}{toml}\n[api]\nopen = true\n")).expect("edge.toml");
        let out = nereid(&["edge", "--config", &path.display().to_string()]);
        assert!(!out.status.success(), "refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let good = edge_toml(&c, "", "min_new_samples = 10\nwindow = \"22:00-06:00\"");
    let line = |text: &str, what: &str| text.lines().position(|l| l.contains(what)).map(|i| i + 6).expect(what);
    let bad_window = good.replace("22:00-06:00", "25:00-06:00");
    let err = run(&bad_window);
    assert!(
        err.contains(&format!("edge.toml:{}", line(&bad_window, "25:00"))) && err.contains("not a daily window"),
        "{err}"
    );
    let bad_condition = good.replace("check_ms = 100", "check_ms = 100\ndeploy_if = [\"accuracy ~ 1\"]");
    let err = run(&bad_condition);
    assert!(err.contains(&format!("edge.toml:{}", line(&bad_condition, "accuracy ~"))) && err.contains(">="), "{err}");
    let err = run(&good.replace("learning_rate = 0.05", "learning_rate = -1.0"));
    assert!(err.contains("[incremental]") && err.contains("learning_rate above 0"), "{err}");
    let lines: Vec<&str> = good.lines().collect();
    let at = lines.iter().position(|l| *l == "[replay]").expect("[replay]");
    let no_replay = [&lines[..at], &lines[at + 3..]].concat().join("\n");
    let err = run(&no_replay);
    assert!(err.contains("[incremental]") && err.contains("[replay]"), "{err}");
    let no_trainer = good.replace("check_ms = 100", "check_ms = 100\nlearner = \"trainer\"");
    let err = run(&no_trainer);
    assert!(
        err.contains(&format!("edge.toml:{}", line(&no_trainer, "learner ="))) && err.contains("[trainer] command"),
        "{err}"
    );
    let unknown = good.replace("check_ms = 100", "check_ms = 100\nlearner = \"pytorch\"");
    let err = run(&unknown);
    assert!(err.contains(&format!("edge.toml:{}", line(&unknown, "learner ="))) && err.contains("builtin"), "{err}");
}

/// Debian's mosquitto on a free port of 127.0.0.1, stopped when dropped.
struct Broker {
    child: std::process::Child,
    port: u16,
    /// With TLS: the directory of `ca.pem` and the client's `publisher.pem`/`.key`.
    pki: Option<std::path::PathBuf>,
}

impl Broker {
    fn start(dir: &std::path::Path) -> Broker {
        Broker::start_with(dir, None)
    }

    /// mosquitto over TLS with client certificates required, its certificate and the CA in `pki`.
    fn start_tls(dir: &std::path::Path, pki: &std::path::Path) -> Broker {
        Broker::start_with(dir, Some(pki))
    }

    fn start_with(dir: &std::path::Path, pki: Option<&std::path::Path>) -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let conf = dir.join("mosquitto.conf");
        if let Some(p) = pki {
            // mosquitto started as root reads its files as the `mosquitto` user.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p.join("localhost.key"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let tls = pki.map_or(String::new(), |p| {
            format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                p.join("ca.pem").display(),
                p.join("localhost.pem").display(),
                p.join("localhost.key").display()
            )
        });
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\n{tls}allow_anonymous true\npersistence false\n"))
            .expect("mosquitto.conf");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("mosquitto.log")).expect("log"))
            .spawn()
            .expect("mosquitto (Debian's mosquitto package; `cargo xtask test` installs it)");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "mosquitto did not start on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { child, port, pki: pki.map(std::path::Path::to_path_buf) }
    }

    /// Publishes `payload` with QoS 1 through mosquitto_pub (another MQTT client than the edge's).
    fn publish(&self, dir: &std::path::Path, topic: &str, payload: &[u8]) {
        let file = dir.join("message");
        std::fs::write(&file, payload).expect("message");
        let mut cmd = std::process::Command::new("mosquitto_pub");
        if let Some(pki) = &self.pki {
            cmd.args(["-h", "localhost", "--cafile"])
                .arg(pki.join("ca.pem"))
                .arg("--cert")
                .arg(pki.join("publisher.pem"))
                .arg("--key")
                .arg(pki.join("publisher.key"));
        } else {
            cmd.args(["-h", "127.0.0.1"]);
        }
        let out = cmd
            .args(["-p", &self.port.to_string(), "-q", "1", "-t", topic, "-f"])
            .arg(&file)
            .output()
            .expect("mosquitto_pub (Debian's mosquitto-clients package)");
        assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn batches_published_over_mqtt_arrive_also_while_the_edge_is_down() {
    let mut c = Cluster::new(1, "");
    let d = setup(&c);
    let broker = Broker::start(&c.path(""));
    let job = format!("[incremental.mqtt]\nbroker = \"127.0.0.1:{}\"\ntopic = \"site/+/samples\"", broker.port);
    let toml = edge_toml(&c, "", "min_new_samples = 100");
    // `[incremental.mqtt]` after the trigger table, so it does not end up inside it.
    let edge = c.start_serving_edge(0, &format!("{toml}{job}\n"));
    wait_for_status(&edge, "the edge subscribes", |s| s["mqtt"].as_str().unwrap_or("").starts_with("subscribed"));
    let old = d.train.of_classes(0..5);
    broker.publish(&c.path(""), "site/a/samples", &batch(&rows(&old, 0..60)));
    let s = wait_for_status(&edge, "60 samples arrive", |s| s["new_samples"] == 60);
    assert_eq!(s["mqtt_taken"], 1, "{s}");
    // Not a batch: refused, nothing taken in.
    broker.publish(&c.path(""), "site/b/samples", b"not safetensors");
    let s = wait_for_status(&edge, "the bad message is refused", |s| s["mqtt_refused"] == 1);
    assert_eq!(s["new_samples"], 60, "{s}");

    // Published while the edge is down: the broker keeps it for the edge's session.
    c.kill_edge(0);
    broker.publish(&c.path(""), "site/a/samples", &batch(&rows(&old, 60..100)));
    c.start_edge(0);
    c.wait_for_edge(0, &edge);
    let v = wait_for_versions(&edge, 2);
    assert_eq!(v["versions"][1]["new_samples"], 100, "{}", v["versions"][1]);
    let s = status(&edge);
    assert_eq!(s["mqtt_taken"], 1, "the batch sent while the edge was down, taken in once: {s}");
}

#[test]
fn batches_arrive_over_mqtts_with_client_certificates() {
    let mut c = Cluster::new(1, "");
    let d = setup(&c);
    let pki = c.path("pki");
    let pki_str = pki.to_str().expect("utf-8").to_string();
    for args in [
        vec!["cert", "ca", "--out", &pki_str],
        vec!["cert", "issue", "localhost", "--ca", &pki_str, "--san", "127.0.0.1"],
        vec!["cert", "issue", "edge-1", "--ca", &pki_str],
        vec!["cert", "issue", "publisher", "--ca", &pki_str],
    ] {
        let out = c.nereid(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let broker = Broker::start_tls(&c.path(""), &pki);
    let job = format!(
        "[incremental.mqtt]\nbroker = \"mqtts://localhost:{}\"\ntopic = \"site/+/samples\"\n\
         [incremental.mqtt.tls]\nca = \"{pki_str}/ca.pem\"\ncert = \"{pki_str}/edge-1.pem\"\nkey = \"{pki_str}/edge-1.key\"",
        broker.port
    );
    let toml = edge_toml(&c, "", "min_new_samples = 100");
    let edge = c.start_serving_edge(0, &format!("{toml}{job}\n"));
    wait_for_status(&edge, "the edge subscribes over TLS", |s| {
        s["mqtt"].as_str().unwrap_or("").starts_with("subscribed")
    });
    let old = d.train.of_classes(0..5);
    broker.publish(&c.path(""), "site/a/samples", &batch(&rows(&old, 0..60)));
    let s = wait_for_status(&edge, "60 samples arrive", |s| s["new_samples"] == 60);
    assert_eq!(s["mqtt_taken"], 1, "{s}");
}

/// An edge whose incremental job fine-tunes the PyTorch example's CNN through `trainer` (a
/// script run by the PyTorch environment's python): version 0 is the CNN as PyTorch initialises
/// it (seeded), exported by `torch.onnx.export`. Returns the edge's URL and the digits' train
/// and test splits (the test split is the eval set).
fn start_pytorch_edge(c: &mut Cluster, trainer: &str) -> (String, Dataset, Dataset) {
    use crate::pytorch::{example, python};
    let (train_set, test) = Dataset::digits().holdout(0.2, 5);
    std::fs::create_dir_all(c.path("eval")).expect("eval");
    test.write_csv(&c.path("eval/test.csv")).expect("eval csv");
    let init = c.path("init.safetensors");
    let out = std::process::Command::new(python()).arg(example("init.py")).arg(&init).output().expect("python");
    assert!(out.status.success(), "init.py: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::create_dir_all(c.path("models/digits")).expect("models");
    let out = std::process::Command::new(python())
        .arg(example("export.py"))
        .arg(&init)
        .arg(c.path("models/digits/model.onnx"))
        .arg(c.path("eval/test.csv"))
        .output()
        .expect("python");
    assert!(out.status.success(), "export.py: {}", String::from_utf8_lossy(&out.stderr));
    let toml = edge_toml(c, "learner = \"trainer\"\ndeploy_if = [\"accuracy_delta >= 0.05\"]", "min_new_samples = 300")
        .replace(
            "training = { epochs = 20, batch_size = 16, learning_rate = 0.05, optimizer = \"sgd\" }",
            "training = { epochs = 15, batch_size = 16, learning_rate = 0.005, optimizer = \"adam\" }",
        );
    let toml = format!(
        "{toml}\n[trainer]\ncommand = [{:?}, {:?}]\ntask_timeout_secs = 300\n",
        python().display().to_string(),
        trainer
    );
    let edge = c.start_serving_edge(0, &toml);
    (edge, train_set, test)
}

/// `[incremental] learner = "trainer"`: the PyTorch example's CNN, exported by
/// `torch.onnx.export`, fine-tuned by its own trainer on the samples the edge hands over (new
/// ones plus the replay buffer's draw), evaluated by ONNX Runtime and deployed when better.
#[test]
fn an_incremental_round_through_the_pytorch_trainer_deploys_a_better_version() {
    let mut c = Cluster::new(1, "");
    let (edge, train_set, test) = start_pytorch_edge(&mut c, &crate::pytorch::example("trainer.py"));
    let v0 = versions(&edge)["versions"][0].clone();
    let chance = v0["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(chance < 0.3, "version 0 is untrained: {v0}");
    // Round 1: classes 0-4 arrive; round 2: classes 5-9, with the buffer's draw of 0-4.
    let (old, new) = (train_set.of_classes(0..5), train_set.of_classes(5..10));
    post_samples(&edge, &rows(&old, 0..300));
    let v = wait_for_versions(&edge, 2);
    let v1 = &v["versions"][1];
    assert_eq!(v1["decision"], "deployed", "{v1}");
    assert_eq!(v1["replayed"], 0, "nothing older than the new samples in the buffer: {v1}");
    post_samples(&edge, &rows(&new, 0..300));
    let v = wait_for_versions(&edge, 3);
    let v2 = &v["versions"][2];
    println!("version 0: {}\nversion 1: {}\nversion 2: {}", v0["metrics"], v1["metrics"], v2["metrics"]);
    assert_eq!(v2["decision"], "deployed", "{v2}");
    assert_eq!(v2["parent"], 1, "fine-tuned from the serving version");
    assert!(v2["replayed"].as_u64().unwrap_or(0) >= 100, "old classes came from the buffer: {v2}");
    assert_eq!(v2["metrics"]["examples"].as_u64(), Some(300 + v2["replayed"].as_u64().unwrap_or(0)), "{v2}");
    assert!(v2["metrics"]["train_loss"].as_f64().is_some(), "the trainer's loss is recorded: {v2}");
    let accuracy = v2["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.85, "the fine-tuned CNN knows every class: {v2}");
    assert_eq!(status(&edge)["serving_model"], "digits@v2");

    // The service answers with version 2, as ONNX Runtime measured it on the eval set.
    let served = correct(&edge, &test) as f64 / test.len() as f64;
    println!("served accuracy on the eval set: {served:.4} (measured at the round: {accuracy:.4})");
    assert!((served - accuracy).abs() < 1e-9, "served {served} vs recorded {accuracy}");

    // After a restart the stored version (its initializers checked against the model's) serves.
    c.kill_edge(0);
    c.start_edge(0);
    c.wait_for_edge(0, &edge);
    assert_eq!(versions(&edge)["serving_version"], 2);
    assert_eq!(correct(&edge, &test) as f64 / test.len() as f64, served);
}

/// A trainer that crashes or returns NaN in an incremental round fails that round only: nothing
/// is recorded, the service keeps answering with the serving version, the status names what
/// the trainer did, and the round runs again (after a growing wait) once the trainer behaves.
#[test]
fn an_incremental_round_whose_trainer_fails_is_retried_and_the_service_keeps_serving() {
    let mut c = Cluster::new(1, "");
    let flaky = root().join("tests/fixtures/trainers/flaky_torch.py").display().to_string();
    let mode = c.path(&format!("{}/mode", c.nodes[0].0));
    std::fs::write(&mode, "crash").expect("mode");
    let (edge, train_set, test) = start_pytorch_edge(&mut c, &flaky);
    let before = correct(&edge, &test);
    post_samples(&edge, &rows(&train_set, 0..300));
    for (m, what, failures) in [("crash", "exited", 1), ("nan", "not finite", 2)] {
        if m != "crash" {
            std::fs::write(&mode, m).expect("mode");
        }
        let s = wait_for_status(&edge, &format!("a failed round ({m})"), |s| {
            s["failed_rounds"].as_u64() >= Some(failures) && s["trigger"].as_str().is_some_and(|t| t.contains(what))
        });
        println!("{m}: {}", s["trigger"]);
        assert!(s["trigger"].as_str().unwrap_or("").contains("failed round(s) in a row"), "{s}");
        assert_eq!(versions(&edge)["versions"].as_array().map(Vec::len), Some(1), "nothing recorded");
        assert_eq!(correct(&edge, &test), before, "version 0 still answers");
        assert_eq!(s["new_samples"], 300, "the new samples wait for the round");
    }
    std::fs::remove_file(&mode).expect("mode");
    let v = wait_for_versions(&edge, 2);
    assert_eq!(v["versions"][1]["decision"], "deployed", "{v}");
    assert_eq!(status(&edge)["new_samples"], 0);
}
