//! Offloading from an edge slower than the cloud: the edge process gets a share of one core (a
//! cgroup CPU quota, `nereid::cpu_quota`), and split inference plans a middle cut or the cloud
//! where that is faster, and a joint service with `offload_when_faster` sends whole requests to
//! the cloud while its answers come back sooner, and comes back when the edge is fast again.
use std::time::{Duration, Instant};

use nereid::cpu_quota::CpuQuota;
use nereid::inference::wire::f32_values;
use nereid::inference::NativeModel;

use crate::cluster::{http, metric, Cluster, EDGE_TOKEN};
use crate::common::*;
use crate::inference::{assert_answers, image, write_cnn_with};

/// `nereid bench split --edge-cpu` and its report.
fn bench_split(model: &std::path::Path, edge_cpu: &str, bandwidths: &str) -> serde_json::Value {
    let model = model.display().to_string();
    let args =
        ["bench", "split", &model, "--edge-cpu", edge_cpu, "--bandwidths", bandwidths, "--repeat", "3", "--json"];
    let out = nereid(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(report["max_abs_diff"].as_f64().expect("diff") <= 1e-5, "every cut answers as the whole model: {report}");
    report
}

fn ms(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The chosen cut at one bandwidth, after checking it is near the best measured one.
fn chosen(b: &serde_json::Value) -> Vec<String> {
    let (chosen, best) = (ms(&b["chosen_ms"]), ms(&b["best_ms"]));
    eprintln!(
        "{} Mbit/s: edge-only {:.1} ms, cloud-only {:.1} ms, chosen {} {chosen:.1} ms, best {} {best:.1} ms",
        b["bandwidth_mbit_s"],
        ms(&b["edge_only_ms"]),
        ms(&b["cloud_only_ms"]),
        b["chosen"],
        b["best"]
    );
    assert!(chosen <= 1.5 * best + 1.0, "the chosen cut is far from the best: {b}");
    serde_json::from_value(b["chosen"].clone()).expect("cut")
}

/// The test CNN with a cheap strided stem (128x128 inputs, whose stem output is a sixth of the
/// input's bytes), on an edge with a tenth of a core: at 100 Mbit/s sending the stem's output
/// beats both computing everything on the slow edge and sending the whole input; at 1 Mbit/s
/// the transfer costs more than the edge's compute and the plan stays on the edge. The plain
/// CNN at 128x128 on an edge with 5% of a core: at 100 Mbit/s the input goes to the cloud. (At
/// 64x64 its 0.7 ms of CPU on a fast machine fits in one of the quota's 1 ms slices, so a cut
/// took anything from 7 to 34 ms by where in the 20 ms period it started, and a lucky 7 ms made
/// a middle cut look best; at 128x128 it needs three slices: edge-only timed 59.6-60.0 ms in
/// the runs tried.)
#[test]
fn a_slowed_edge_plans_a_middle_cut_or_the_cloud_where_that_is_faster() {
    let dir = tempfile::tempdir().expect("tmp");
    let stem = dir.path().join("stem.onnx");
    write_cnn_with(&stem, &["--stem", "--size", "128", "--width", "128"]);
    let report = bench_split(&stem, "0.1", "100,1");
    assert_eq!(ms(&report["edge_cpu_share"]), 0.1, "{report}");
    let at = report["bandwidths"].as_array().expect("bandwidths");
    let fast = chosen(&at[0]);
    assert!(
        fast != ["image"] && fast != ["probabilities"],
        "a middle cut at 100 Mbit/s on the slowed edge, got {fast:?}: {}",
        at[0]
    );
    assert!(ms(&at[0]["chosen_ms"]) < ms(&at[0]["edge_only_ms"]), "{}", at[0]);
    assert_eq!(chosen(&at[1]), ["probabilities"], "edge-only at 1 Mbit/s: {}", at[1]);

    let cnn = dir.path().join("cnn.onnx");
    write_cnn_with(&cnn, &["--size", "128"]);
    let report = bench_split(&cnn, "0.05", "100");
    let at = &report["bandwidths"][0];
    assert_eq!(chosen(at), ["image"], "cloud-only at 100 Mbit/s from an edge with 5% of a core: {at}");
}

/// Requests to the joint service at `url` until `done` holds for the last answer (at most
/// `max`), then `count` more: where those were computed.
fn requests_until(url: &str, max: usize, count: usize, done: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
    let body = |seed: u32| {
        let x = image(seed);
        serde_json::to_vec(&serde_json::json!({"shape": x.shape, "data": f32_values(&x).expect("f32")})).expect("json")
    };
    let post = |seed: u32| {
        let (code, answer) = http("POST", url, Some(EDGE_TOKEN), body(seed));
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));
        serde_json::from_slice::<serde_json::Value>(&answer).expect("json")
    };
    let t = Instant::now();
    let mut n = 0;
    while !done(&post(n)) {
        n += 1;
        assert!((n as usize) < max && t.elapsed() < Duration::from_secs(60), "not reached after {n} requests");
    }
    (0..count as u32).map(|i| post(1000 + i)["computed"].as_str().unwrap_or("?").to_string()).collect()
}

/// A joint service with `offload_when_faster`: the edge serves the test CNN at twice its
/// width, the cloud one twice as wide again (about 4x the compute). At full speed the edge
/// answers; with the edge at 5% of a core the whole requests go to the cloud (answered by the cloud's model, kept nowhere as
/// hard examples); with the cloud down they are answered on the edge; with the edge at full
/// speed again and the cloud back, the edge answers again once it is measured again.
#[test]
fn a_joint_service_offloads_while_the_cloud_answers_sooner() {
    let mut cluster = Cluster::new(1, "models = \"models\"\n[services.camera]\nmodel = \"wide\"\n");
    let models = cluster.path("models");
    // The edge's model takes several quotas of CPU (1 ms each), so even a request that starts
    // with a fresh quota waits a few periods on the slowed edge, while sending it to the cloud
    // takes a fraction of one: the default CNN (about 1.6 ms) let a lucky edge request look as
    // fast as the cloud's path.
    for (name, args) in [("cnn", &["--width", "64"][..]), ("wide", &["--width", "128"][..])] {
        std::fs::create_dir_all(models.join(name)).expect("mkdir");
        write_cnn_with(&models.join(name).join("model.onnx"), args);
    }
    cluster.start_cloud();
    let edge = cluster.start_serving_edge(
        0,
        &format!(
            "models = \"{}\"\n[services.camera]\nkind = \"joint\"\nmodel = \"cnn\"\noffload_when_faster = true\n\
             relink_secs = 1\nrouter = {{ plugin = \"{}\", config = {{ policy = \"edge-only\" }} }}\n",
            models.display(),
            plugin("hard-example-mining").display()
        ),
    );
    let url = format!("{edge}/v1/infer/camera");
    let plan = || {
        let (code, plan) = http("GET", &format!("{url}/plan"), Some(EDGE_TOKEN), Vec::new());
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&plan));
        serde_json::from_slice::<serde_json::Value>(&plan).expect("json")
    };
    let native = |name: &str| {
        let m = NativeModel::new(&std::fs::read(models.join(name).join("model.onnx")).expect("model")).expect("model");
        f32_values(&m.run(&[image(7)]).expect("run")[0]).expect("f32")
    };
    let (small, wide) = (native("cnn"), native("wide"));
    let answer_to_7 = || {
        let x = image(7);
        let body = serde_json::json!({"shape": x.shape, "data": f32_values(&x).expect("f32")});
        let (code, answer) = http("POST", &url, Some(EDGE_TOKEN), serde_json::to_vec(&body).expect("json"));
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));
        serde_json::from_slice::<serde_json::Value>(&answer).expect("json")
    };
    // The path not taken is measured again once every `relink_secs` (1 s): on a loaded machine
    // the request after a check can be that measure. The faster path's answer is the first of
    // up to three requests taking it.
    let answer_on = |path: &str| {
        let mut others = Vec::new();
        for _ in 0..3 {
            let a = answer_to_7();
            if a["computed"] == path {
                return a;
            }
            others.push(a);
        }
        panic!("three requests, none computed on the {path}: {others:?}");
    };

    // Full speed: both paths measured (the edge first, then the cloud once), the edge faster.
    let computed = requests_until(&url, 50, 10, |_| plan()["cloud_ms"].is_number());
    let p = plan();
    assert_eq!(p["path"], "edge", "{p}");
    assert!(computed.iter().filter(|c| *c == "edge").count() >= 8, "{computed:?}: {p}");
    let a = answer_on("edge");
    assert_answers(&a, &small);

    // A slow edge: its requests take longer and longer until the cloud's path is the faster.
    let quota = CpuQuota::new(0.05).expect("a cgroup CPU quota (root)");
    let pid = cluster.edge_pid(0);
    quota.add(pid).expect("the edge into the quota");
    let computed = requests_until(&url, 200, 10, |a| a["offloaded"] == true);
    let p = plan();
    assert_eq!(p["path"], "cloud", "{p}");
    assert!(computed.iter().filter(|c| *c == "cloud").count() >= 8, "{computed:?}: {p}");
    let a = answer_on("cloud");
    assert_eq!(a["offloaded"], true, "{a}");
    assert_eq!(a["results"][0]["route"], "cloud", "{a}");
    assert!(a["results"][0]["score"].is_null(), "the router did not run: {a}");
    assert_answers(&a, &wide);
    let offloads = metric(&format!("{edge}/metrics"), "nereid_offloads_total{service=\"camera\"}");
    assert!(offloads >= 9.0, "{offloads}");
    let (code, kept) = http("GET", &cluster.url("/v1/infer/camera/hard-examples"), Some(&cluster.admin), Vec::new());
    assert_eq!((code, String::from_utf8_lossy(&kept).trim()), (200, "[]"), "offloads are no hard examples");

    // The cloud down: answered on the edge, nothing refused.
    cluster.kill_cloud();
    for _ in 0..3 {
        let a = answer_to_7();
        assert_eq!(a["computed"], "edge", "{a}");
        assert_answers(&a, &small);
    }
    assert_eq!(plan()["path"], "edge");

    // Full speed and the cloud back: the edge is measured again within `relink_secs` and serves.
    cluster.start_cloud();
    quota.release(pid).expect("the edge out of the quota");
    std::thread::sleep(Duration::from_millis(1100));
    let computed = requests_until(&url, 200, 10, |_| {
        let p = plan();
        p["path"] == "edge" && p["cloud_ms"].is_number()
    });
    assert!(computed.iter().filter(|c| *c == "edge").count() >= 8, "{computed:?}: {}", plan());
}
