//! Inference: split inference's cuts and halves (the test CNN, through the splitter plugin),
//! `nereid model split|plan`, the exported MLP, and joint inference through a cloud outage.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nereid::inference::export::to_onnx;
use nereid::inference::wire::{f32_tensor, f32_values};
use nereid::inference::{profile, NativeModel};
use nereid::runtime::{Limits, SplitterPlugin, TensorData};
use nereid::train::model::ModelSpec;
use nereid_onnx::Message;

use crate::cluster::{block, http, metric, Cluster, EDGE_TOKEN};
use crate::common::*;

/// The test CNN (tests/fixtures/models/cnn.py: 21 nodes, 7 convolutions, a residual block).
pub fn write_cnn(path: &Path) {
    write_cnn_with(path, &[]);
}

/// The test CNN built with cnn.py's options `args` (`--size`, `--width`, `--stem`).
pub fn write_cnn_with(path: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/cnn.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(path)
        .args(args)
        .output()
        .expect("python3 (the `onnx` package: `cargo xtask test` installs it)");
    assert!(out.status.success(), "building the test CNN: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn image(seed: u32) -> TensorData {
    let values: Vec<f32> =
        (0..3 * 64 * 64).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
    f32_tensor("image", vec![1, 3, 64, 64], &values)
}

#[test]
fn split_halves_equal_the_whole_model_at_every_cut() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("cnn.onnx");
    write_cnn(&path);
    let onnx = std::fs::read(&path).expect("model");
    let profiled = profile::profile(&onnx, 2).expect("profiled");
    let typed = profiled.model.encode();
    let cuts = profiled.model.cuts();
    assert!(cuts.len() >= 15, "{} cuts", cuts.len());
    assert!(cuts.iter().any(|c| c.len() == 2), "a cut inside the residual block carries both branches: {cuts:?}");

    let (runtime, _cache) = runtime();
    let mut splitter = SplitterPlugin::load(&runtime, &plugin("split-infer"), Limits::default(), &Default::default())
        .expect("splitter");
    let full = NativeModel::new(&onnx).expect("whole model");
    let inputs = [image(1), image(2)];
    let expected: Vec<Vec<f32>> =
        inputs.iter().map(|x| f32_values(&full.run(std::slice::from_ref(x)).expect("run")[0]).expect("f32")).collect();
    for cut in &cuts {
        let (head, tail) = splitter.partition(&typed, cut).expect("every enumerated cut partitions");
        let head = head.map(|h| NativeModel::new(&h).expect("ONNX Runtime loads the head"));
        let tail = tail.map(|t| NativeModel::new(&t).expect("ONNX Runtime loads the tail"));
        for (x, want) in inputs.iter().zip(&expected) {
            let mut activations = match &head {
                Some(h) => h.run(std::slice::from_ref(x)).expect("head runs"),
                None => Vec::new(),
            };
            if cut.contains(&x.name) {
                activations.push(x.clone());
            }
            let got = match &tail {
                Some(t) => t.run(&activations).expect("tail runs"),
                None => activations,
            };
            let got = f32_values(&got[0]).expect("f32");
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "cut {cut:?}: outputs differ by {worst}");
        }
    }
}

#[test]
fn model_split_writes_halves_and_refuses_one_branch_of_a_residual_block() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("cnn.onnx");
    write_cnn(&path);
    let (head, tail) = (dir.path().join("head.onnx"), dir.path().join("tail.onnx"));
    let model = path.to_str().expect("utf-8");
    let (h, t) = (head.to_str().expect("utf-8"), tail.to_str().expect("utf-8"));

    let out = nereid(&["model", "split", model, "--cut", "conv4", "--head", h, "--tail", t]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the cut does not separate input `image` from output `probabilities`"),
        "the error says why: {stderr}"
    );
    assert!(!head.exists() && !tail.exists(), "nothing written for a refused cut");

    let out = nereid(&["model", "split", model, "--cut", "pool1,conv4", "--head", h, "--tail", t, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // conv1 relu1 conv2 relu2 pool1 conv3 relu3 conv4 | residual relu4 conv5 ... softmax
    assert_eq!(report["head"]["nodes"], 8, "{report}");
    assert_eq!(report["tail"]["nodes"], 13, "{report}");
    let head = NativeModel::new(&std::fs::read(&head).expect("head")).expect("ONNX Runtime loads the head");
    assert_eq!(head.outputs, ["pool1", "conv4"]);
    NativeModel::new(&std::fs::read(&tail).expect("tail")).expect("ONNX Runtime loads the tail");
}

#[test]
fn model_plan_lists_the_cuts_best_first() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("cnn.onnx");
    write_cnn(&path);
    let plan = |bandwidth: &str, rtt: &str, speedup: &str| -> serde_json::Value {
        let model = path.to_str().expect("utf-8");
        let out = nereid(&[
            "model",
            "plan",
            model,
            "--bandwidth",
            bandwidth,
            "--rtt-ms",
            rtt,
            "--cloud-speedup",
            speedup,
            "--runs",
            "5",
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    for (bandwidth, rtt, speedup) in [("0.1", "1", "1"), ("10000", "0", "1000")] {
        let p = plan(bandwidth, rtt, speedup);
        let cuts = p["cuts"].as_array().expect("cuts");
        assert!(cuts.len() >= 15);
        let predicted: Vec<f64> = cuts.iter().map(|c| c["predicted_ms"].as_f64().expect("number")).collect();
        assert!(predicted.windows(2).all(|w| w[0] <= w[1]), "best first: {predicted:?}");
        assert_eq!(p["chosen"], cuts[0]["cut"]);
        for c in cuts {
            let sum = c["edge_ms"].as_f64().unwrap_or(0.0)
                + c["transfer_ms"].as_f64().unwrap_or(0.0)
                + c["cloud_ms"].as_f64().unwrap_or(0.0);
            assert!((sum - c["predicted_ms"].as_f64().unwrap_or(0.0)).abs() < 1e-6, "{c}");
        }
    }
    // At 0.1 Mbit/s and equal machines nothing beats keeping the whole model on the edge.
    assert_eq!(plan("0.1", "1", "1")["chosen"], serde_json::json!(["probabilities"]));
    // A 1000x faster cloud behind a 10 Gbit/s link with no latency: the edge should not run
    // everything (the input crosses in 0.04 ms, the model takes ~0.5 ms here).
    assert_ne!(plan("10000", "0", "1000")["chosen"], serde_json::json!(["probabilities"]));
}

#[test]
fn the_exported_mlp_computes_what_the_trainer_computes() {
    use candle_core::{Device, Tensor as CTensor};
    let cnn = ModelSpec::Cnn { input_shape: [1, 8, 8], conv: vec![4, 8], hidden: vec![16], classes: 10 };
    let refused = to_onnx(&cnn, &cnn.init(7)).expect_err("CNN export is refused");
    assert!(refused.to_string().contains("candle"), "{refused}");
    for spec in [
        ModelSpec::Mlp { inputs: 64, hidden: vec![32], classes: 10 },
        ModelSpec::Mlp { inputs: 64, hidden: vec![], classes: 10 },
        ModelSpec::Cnn { input_shape: [1, 8, 8], conv: vec![4], hidden: vec![16], classes: 10 },
    ] {
        let weights = spec.init(7);
        let onnx = to_onnx(&spec, &weights).expect("exports").encode_to_vec();
        let native = NativeModel::new(&onnx).expect("ONNX Runtime loads it");
        let x: Vec<f32> = (0..3 * 64).map(|i| ((i * 37) % 17) as f32 / 8.0).collect();
        let got = f32_values(&native.run(&[f32_tensor("input", vec![3, 64], &x)]).expect("run")[0]).expect("f32");
        let net = nereid::train::model::Network::from_tensors(&spec, &weights).expect("network");
        let logits = net.forward(&CTensor::from_vec(x, (3, 64), &Device::Cpu).expect("tensor")).expect("forward");
        let want: Vec<f32> =
            candle_nn::ops::softmax(&logits, 1).expect("softmax").flatten_all().expect("flat").to_vec1().expect("vec");
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{spec:?}: {worst}");
    }
}

pub fn write_model(dir: &Path, name: &str, seed: u64) {
    let spec = ModelSpec::Mlp { inputs: 64, hidden: vec![16], classes: 10 };
    let onnx = to_onnx(&spec, &spec.init(seed)).expect("exports").encode_to_vec();
    std::fs::create_dir_all(dir.join(name)).expect("mkdir");
    std::fs::write(dir.join(name).join("model.onnx"), onnx).expect("write");
}

pub fn infer(url: &str, row: usize) -> serde_json::Value {
    let data: Vec<f32> = (0..64).map(|i| ((i + row) % 16) as f32).collect();
    let body = serde_json::to_vec(&serde_json::json!({"shape": [1, 64], "data": data})).expect("json");
    let (code, body) = http("POST", url, Some(EDGE_TOKEN), body);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("json answer")
}

#[test]
fn joint_inference_answers_through_a_cloud_outage_and_loses_no_hard_example() {
    let mut cluster = Cluster::new(1, "models = \"models\"\n[services.digits]\nmodel = \"big\"\n");
    let models = cluster.path("models");
    write_model(&models, "small", 1);
    write_model(&models, "big", 2);
    let router = plugin("hard-example-mining");
    cluster.start_cloud();
    let edge = cluster.start_serving_edge(
        0,
        &format!(
            "models = \"{}\"\noutbox_retry_ms = 100\n\
             [services.digits]\nkind = \"joint\"\nmodel = \"small\"\ncloud_timeout_ms = 1000\n\
             router = {{ plugin = \"{}\", config = {{ policy = \"cloud-only\" }} }}\n",
            models.display(),
            router.display()
        ),
    );
    let name = cluster.nodes[0].0.clone();
    let url = format!("{edge}/v1/infer/digits");
    let small = NativeModel::new(&std::fs::read(models.join("small/model.onnx")).expect("small")).expect("small");
    let big = NativeModel::new(&std::fs::read(models.join("big/model.onnx")).expect("big")).expect("big");
    let expect = |model: &NativeModel, row: usize| -> Vec<f32> {
        let data: Vec<f32> = (0..64).map(|i| ((i + row) % 16) as f32).collect();
        f32_values(&model.run(&[f32_tensor("input", vec![1, 64], &data)]).expect("run")[0]).expect("f32")
    };
    let close = |a: &serde_json::Value, b: &[f32]| {
        let a: Vec<f32> = a.as_array().expect("data").iter().map(|v| v.as_f64().unwrap_or(f64::NAN) as f32).collect();
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    };

    for row in 0..3 {
        let r = infer(&url, row);
        assert_eq!(r["computed"], "cloud", "{r}");
        assert_eq!(r["results"][0]["route"], "cloud");
        assert!(close(&r["outputs"][0]["data"], &expect(&big, row)), "the cloud's model answered: {r}");
    }
    cluster.kill_cloud();
    for row in 3..7 {
        let r = infer(&url, row);
        assert_eq!(r["computed"], "edge", "{r}");
        assert_eq!(r["results"][0]["queued"], true, "marked: {r}");
        assert!(close(&r["outputs"][0]["data"], &expect(&small, row)), "the edge's model answered: {r}");
    }
    assert_eq!(metric(&format!("{edge}/metrics"), "nereid_outbox_pending"), 4.0);
    cluster.start_cloud();
    let t = Instant::now();
    while metric(&format!("{edge}/metrics"), "nereid_outbox_pending") > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the outbox did not drain");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = http("GET", &cluster.url("/v1/infer/digits/hard-examples"), Some(&cluster.admin), Vec::new());
    assert_eq!(code, 200);
    let kept: Vec<(String, i64)> = serde_json::from_slice(&body).expect("json");
    assert_eq!(kept.len(), 7, "every hard example reached the cloud once: {kept:?}");
    assert!(kept.iter().all(|(n, _)| n == &name));
    let m = format!("{edge}/metrics");
    assert_eq!(metric(&m, "nereid_inferences_total{service=\"digits\"}"), 7.0);
    assert_eq!(metric(&m, "nereid_hard_examples_total{service=\"digits\"}"), 7.0);
    assert_eq!(metric(&m, "nereid_upload_ratio{service=\"digits\"}"), 1.0);
    assert_eq!(metric(&m, "nereid_cloud_fallbacks_total{service=\"digits\"}"), 4.0);
    assert_eq!(metric(&m, "nereid_outbox_delivered_total"), 4.0);
    assert_eq!(metric(&m, "nereid_inference_latency_seconds_count{service=\"digits\",route=\"cloud\"}"), 3.0);
    assert_eq!(metric(&m, "nereid_inference_latency_seconds_count{service=\"digits\",route=\"edge\"}"), 4.0);
    // A histogram, not only a sum: every request is at or under the last bucket.
    assert_eq!(
        metric(&m, "nereid_inference_latency_seconds_bucket{service=\"digits\",route=\"edge\",le=\"+Inf\"}"),
        4.0
    );
    let answered = metric(
        &m,
        "nereid_http_request_duration_seconds_count{route=\"/v1/infer/{service}\",method=\"POST\",code=\"200\"}",
    );
    assert!(answered >= 7.0, "{answered}");
    assert!(metric(&m, "process_resident_memory_bytes") > 1e6);
}

/// The JSON answer of the edge to `body` at the cut `cut` (the `x-nereid-cut` header).
fn infer_at_cut(url: &str, cut: &str, body: &[u8]) -> serde_json::Value {
    block(async {
        let r = reqwest::Client::new()
            .post(url)
            .bearer_auth(EDGE_TOKEN)
            .header("x-nereid-cut", cut)
            .body(body.to_vec())
            .send()
            .await
            .expect("post");
        r.json::<serde_json::Value>().await.expect("json")
    })
}

/// The first output of an edge's JSON answer equals `want` within 1e-5.
pub fn assert_answers(answer: &serde_json::Value, want: &[f32]) {
    let got: Vec<f32> = answer["outputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
        .collect();
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(got.len() == want.len() && worst <= 1e-5, "{worst}: {answer}");
}

/// A cloud serving the test CNN as `camera` and an edge serving it as split service `camera`
/// (with `camera_extra` lines) and, if `also` is not empty, as a plain split service `also`:
/// the cluster, the model directory and the edge's URL.
fn serve_cnn(camera_extra: &str, also: &str) -> (Cluster, std::path::PathBuf, String) {
    let mut cluster = Cluster::new(1, "models = \"models\"\n[services.camera]\nmodel = \"cnn\"\n");
    let models = cluster.path("models");
    std::fs::create_dir_all(models.join("cnn")).expect("mkdir");
    write_cnn(&models.join("cnn/model.onnx"));
    cluster.start_cloud();
    let service = |name: &str| {
        format!(
            "[services.{name}]\nkind = \"split\"\nmodel = \"cnn\"\nsplitter = {{ plugin = \"{}\" }}\n",
            plugin("split-infer").display()
        )
    };
    let extra = if also.is_empty() { String::new() } else { service(also) };
    let edge = cluster.start_serving_edge(
        0,
        &format!("models = \"{}\"\n{}{camera_extra}{extra}", models.display(), service("camera")),
    );
    (cluster, models, edge)
}

#[test]
fn split_inference_serves_the_whole_models_answer_at_the_planned_and_at_a_forced_cut() {
    let (mut cluster, models, edge) = serve_cnn("", "");
    let full = NativeModel::new(&std::fs::read(models.join("cnn/model.onnx")).expect("cnn")).expect("cnn");
    let x = image(5);
    let want = f32_values(&full.run(std::slice::from_ref(&x)).expect("run")[0]).expect("f32");
    let body =
        serde_json::to_vec(&serde_json::json!({"shape": x.shape, "data": f32_values(&x).expect("f32")})).expect("json");
    let check = |r: &serde_json::Value| assert_answers(r, &want);

    let url = format!("{edge}/v1/infer/camera");
    let (code, planned) = http("POST", &url, Some(EDGE_TOKEN), body.clone());
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&planned));
    let planned: serde_json::Value = serde_json::from_slice(&planned).expect("json");
    check(&planned);
    let (code, plan) = http("GET", &format!("{edge}/v1/infer/camera/plan"), Some(EDGE_TOKEN), Vec::new());
    assert_eq!(code, 200);
    let plan: serde_json::Value = serde_json::from_slice(&plan).expect("json");
    assert_eq!(plan["cut"], planned["cut"], "the answer used the plan's cut");
    assert!(plan["cuts"].as_array().expect("cuts").len() >= 15);

    // A forced cut inside the residual block: head on the edge (through the plugin and wasi-nn),
    // tail in the cloud.
    let forced = infer_at_cut(&url, "pool1,conv4", &body);
    assert_eq!(forced["computed"], "split", "{forced}");
    check(&forced);
    let cloud_only = infer_at_cut(&url, "image", &body);
    assert_eq!(cloud_only["computed"], "cloud", "{cloud_only}");
    check(&cloud_only);
    // Tails keep nothing in the cloud (what lets them run on an autoscaled tier, docs/deploy.md).
    let (code, kept) = http("GET", &cluster.url("/v1/infer/camera/hard-examples"), Some(&cluster.admin), Vec::new());
    assert_eq!((code, String::from_utf8_lossy(&kept).trim()), (200, "[]"));

    // The cloud down: the edge runs the whole model and says so.
    cluster.kill_cloud();
    let down = infer_at_cut(&url, "pool1,conv4", &body);
    assert_eq!((down["computed"].clone(), down["fallback"].clone()), ("edge".into(), true.into()), "{down}");
    check(&down);
}

/// `nereid bench split` on the test CNN (32x32 inputs, so 1 Mbit/s stays quick): at 100, 10 and
/// 1 Mbit/s through the shaped loopback link, the edge measures the link, plans, and the cut it
/// chose is compared with every cut measured (pruned only where the transfer alone exceeds the
/// best). Edge and cloud compute at the same speed on one machine, so the best cut is edge-only
/// at every bandwidth: a planner that misread the link or the profiles would choose otherwise.
#[test]
fn the_planned_cut_is_the_measured_best_at_100_10_and_1_mbit() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("cnn32.onnx");
    write_cnn_with(&model, &["--size", "32"]);
    let model = model.display().to_string();
    let out =
        nereid(&["bench", "split", &model, "--bandwidths", "100,10,1", "--rtt-ms", "4", "--repeat", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(report["max_abs_diff"].as_f64().expect("diff") <= 1e-5, "{report}");
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    for b in report["bandwidths"].as_array().expect("bandwidths") {
        let (shaped, measured) = (f(&b["bandwidth_mbit_s"]), f(&b["planned_bandwidth_mbit_s"]));
        assert!(measured > shaped / 2.0 && measured < shaped * 2.0, "the link was measured at {measured} Mbit/s: {b}");
        let (chosen, best) = (f(&b["chosen_ms"]), f(&b["best_ms"]));
        eprintln!(
            "{shaped} Mbit/s: chosen {} {chosen:.2} ms, best {} {best:.2} ms, gap {:.1}%",
            b["chosen"],
            b["best"],
            (chosen / best - 1.0) * 100.0
        );
        assert!(chosen <= 1.5 * best + 1.0, "the chosen cut is far from the best: {b}");
        assert_eq!(b["chosen"], serde_json::json!(["probabilities"]), "{b}");
        // The latency model against the measure, where the link dominates: cloud-only.
        let cloud_only = b["cuts"]
            .as_array()
            .expect("cuts")
            .iter()
            .find(|c| c["cut"] == serde_json::json!(["image"]))
            .expect("cloud-only cut");
        let (predicted, measured) = (f(&cloud_only["predicted_ms"]), f(&cloud_only["measured_ms"]));
        assert!(
            (predicted - measured).abs() <= 0.5 * measured + 5.0,
            "cloud-only: predicted {predicted} ms, measured {measured} ms"
        );
    }
}

/// `nereid bench serve` with short phases: every phase is answered without an error, the edge's
/// answer equals native ONNX Runtime's, the best native setting runs again once the edge has
/// stopped, and the throughput ratio is the pool's two safetensors phases over native's first and
/// last, as the report says.
#[test]
fn bench_serve_compares_the_pool_with_native_measured_at_both_ends_of_the_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("cnn32.onnx");
    write_cnn_with(&model, &["--size", "32"]);
    let model = model.display().to_string();
    let out = nereid(&["bench", "serve", &model, "--clients", "2,4", "--secs", "0.5", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["max_abs_diff"], 0.0, "{report}");
    let phases = report["phases"].as_array().expect("phases");
    for p in phases {
        assert!(p["errors"] == 0 && p["requests"].as_u64().unwrap_or(0) > 0, "{p}");
    }
    let rps = |name: &str, clients: u64| {
        let found: Vec<f64> = phases
            .iter()
            .filter(|p| p["name"] == name && p["clients"] == clients)
            .filter_map(|p| p["requests_per_sec"].as_f64())
            .collect();
        assert_eq!(found.len(), 1, "one phase `{name}` at {clients} clients: {report}");
        found[0]
    };
    let best = report["native_best"].as_str().expect("native_best");
    assert_eq!(phases.last().map(|p| p["name"].clone()), Some(format!("{best}, again").into()), "native last");
    let (first, again) = (rps(best, 2), rps(&format!("{best}, again"), 2));
    let pool_phase = format!("nereid pool: {} instances", report["cores"]);
    let (pool, after) =
        (rps(&format!("{pool_phase}, safetensors"), 2), rps(&format!("{pool_phase}, safetensors, after JSON"), 2));
    rps(&format!("{pool_phase}, safetensors"), 4);
    let ratios = &report["ratios"];
    let close = |got: &serde_json::Value, want: f64| (got.as_f64().unwrap_or(f64::NAN) - want).abs() <= 1e-9 * want;
    assert!(close(&ratios["throughput_vs_native"], (pool + after) / (first + again)), "{ratios}");
    assert!(close(&ratios["throughput_vs_native_first"], pool / first), "{ratios}");
    let json = rps(&format!("{pool_phase}, JSON 17 digits"), 2);
    assert!(close(&ratios["json_vs_safetensors"], json / ((pool + after) / 2.0)), "{ratios}");
    let readers = report["json_readers"].as_array().expect("json_readers");
    assert_eq!(readers.len(), 2, "{report}");
    assert!(readers.iter().all(|r| r["numbers"] == 3 * 32 * 32), "{report}");
}

/// A PNG as the request body, read by the service's adapter (plugins/image-adapter): the answer
/// is the model's on the image as the test decodes and normalises it itself. Another size is
/// resized to the input's; a content type without an adapter is a 415, a broken image a 400.
#[test]
fn an_image_adapter_turns_a_png_body_into_the_models_input() {
    let adapter = format!(
        "adapter = {{ plugin = \"{}\", config = {{ mean = \"0.5,0.4,0.3\", std = \"0.25\" }} }}\n",
        plugin("image-adapter").display()
    );
    let (_cluster, models, edge) = serve_cnn(&adapter, "raw");
    let png = |w: u32, h: u32| {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 3) as u8, ((x + y) * 2) as u8]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, image::ImageFormat::Png).expect("png");
        (img, bytes.into_inner())
    };
    let post = |service: &str, content_type: &str, body: Vec<u8>| {
        block(async {
            let r = reqwest::Client::new()
                .post(format!("{edge}/v1/infer/{service}"))
                .bearer_auth(EDGE_TOKEN)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .expect("post");
            (r.status().as_u16(), r.json::<serde_json::Value>().await.expect("json"))
        })
    };

    let (img, bytes) = png(64, 64);
    let (mean, std) = ([0.5f32, 0.4, 0.3], 0.25f32);
    let mut nchw = vec![0f32; 3 * 64 * 64];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            nchw[c * 64 * 64 + (y * 64 + x) as usize] = (p[c] as f32 / 255.0 - mean[c]) / std;
        }
    }
    let full = NativeModel::new(&std::fs::read(models.join("cnn/model.onnx")).expect("cnn")).expect("cnn");
    let want = f32_values(&full.run(&[f32_tensor("image", vec![1, 3, 64, 64], &nchw)]).expect("run")[0]).expect("f32");
    let (code, answer) = post("camera", "image/png", bytes.clone());
    assert_eq!(code, 200, "{answer}");
    assert_answers(&answer, &want);

    let (code, resized) = post("camera", "image/png", png(80, 48).1);
    assert_eq!(code, 200, "{resized}");
    assert_eq!(resized["outputs"][0]["shape"], serde_json::json!([1, 10]));

    let (code, refused) = post("raw", "image/png", bytes);
    assert_eq!(code, 415, "{refused}");
    assert!(refused["error"].as_str().expect("error").contains("adapter"), "{refused}");
    let (code, broken) = post("camera", "image/png", b"\x89PNG not really".to_vec());
    assert_eq!(code, 400, "{broken}");
    assert!(broken["error"].as_str().expect("error").contains("image/png"), "{broken}");

    // Found by fuzzing: 740 bytes of JPEG declaring 62980x515 pixels, which the decoder filled
    // for over a second of CPU. Its size is read from the header and refused before decoding.
    let bomb = std::fs::read(root().join("tests/fixtures/images/jpeg-62980x515.jpg")).expect("fixture");
    let (code, refused) = post("camera", "image/jpeg", bomb);
    let error = refused["error"].as_str().expect("error");
    assert!(code == 400 && error.contains("62980x515") && error.contains("max_pixels"), "{code}: {refused}");
    let (code, answer) = post("camera", "image/png", png(64, 64).1);
    assert_eq!(code, 200, "answered after the refusal: {answer}");
}

/// A split service with a compressor (plugins/quantize, INT8 with nearest rounding): the edge
/// encodes the cut tensors, the cloud decodes them before the tail; the answer stays close to
/// the whole model's and about a quarter of the bytes travel. A cloud service without the same
/// compressor refuses encoded tensors, naming what is missing.
#[test]
fn split_activations_travel_int8_through_a_compressor() {
    let quantize = plugin("quantize").display().to_string();
    let codec =
        format!("compressor = {{ plugin = {quantize:?}, config = {{ update = \"int8\", rounding = \"nearest\" }} }}\n");
    let mut cluster = Cluster::new(
        1,
        &format!("models = \"models\"\n[services.camera]\nmodel = \"cnn\"\n{codec}[services.plain]\nmodel = \"cnn\"\n"),
    );
    let models = cluster.path("models");
    std::fs::create_dir_all(models.join("cnn")).expect("mkdir");
    write_cnn(&models.join("cnn/model.onnx"));
    cluster.start_cloud();
    let splitter = plugin("split-infer").display().to_string();
    let service = |name: &str, cloud_service: &str, extra: &str| {
        format!(
            "[services.{name}]\nkind = \"split\"\nmodel = \"cnn\"\ncloud_service = {cloud_service:?}\nsplitter = {{ plugin = {splitter:?} }}\n{extra}"
        )
    };
    let edge = cluster.start_serving_edge(
        0,
        &format!(
            "models = \"{}\"\n{}{}{}",
            models.display(),
            service("camera", "camera", &codec),
            service("float", "camera", ""),
            service("mismatch", "plain", &codec)
        ),
    );
    let full = NativeModel::new(&std::fs::read(models.join("cnn/model.onnx")).expect("cnn")).expect("cnn");
    let x = image(9);
    let want = f32_values(&full.run(std::slice::from_ref(&x)).expect("run")[0]).expect("f32");
    let body =
        serde_json::to_vec(&serde_json::json!({"shape": x.shape, "data": f32_values(&x).expect("f32")})).expect("json");
    let cut = "pool1,conv4";
    let compressed = infer_at_cut(&format!("{edge}/v1/infer/camera"), cut, &body);
    assert_eq!(compressed["computed"], "split", "{compressed}");
    let float = infer_at_cut(&format!("{edge}/v1/infer/float"), cut, &body);
    assert_answers(&float, &want);
    let got: Vec<f64> =
        compressed["outputs"][0]["data"].as_array().expect("data").iter().filter_map(|v| v.as_f64()).collect();
    let worst = got.iter().zip(&want).map(|(a, b)| (a - *b as f64).abs()).fold(0.0, f64::max);
    assert!(got.len() == want.len() && worst <= 0.01, "INT8 cut tensors move the probabilities by {worst}");
    let bytes = |v: &serde_json::Value| v["upload_bytes"].as_f64().expect("upload_bytes");
    // pool1 and conv4 are [1, 32, 32, 32] each: 262,144 bytes as float32.
    assert!(bytes(&float) >= 262_144.0 && bytes(&float) / bytes(&compressed) >= 3.5, "{float} vs {compressed}");
    let refused = infer_at_cut(&format!("{edge}/v1/infer/mismatch"), cut, &body);
    let message = refused["error"].as_str().unwrap_or_default();
    assert!(message.contains("has no compressor") && message.contains("[services.plain]"), "{refused}");
}
