//! Inference under concurrency: a service's pool of instances and sessions, batching, the
//! bounded queue (503 with Retry-After) and a trapping request, on the test CNN.
use std::sync::Barrier;

use nereid::inference::wire::{f32_tensor, f32_values, to_safetensors};
use nereid::inference::NativeModel;
use nereid::runtime::TensorData;

use crate::cluster::{block, metric, Cluster, EDGE_TOKEN};
use crate::common::*;
use crate::inference::write_cnn;

/// `rows` images of the CNN's input, different for every `seed`.
fn images(seed: u32, rows: u64) -> TensorData {
    let n = rows as usize * 3 * 64 * 64;
    let values: Vec<f32> =
        (0..n).map(|i| (((i as u32 ^ seed).wrapping_mul(2654435761) >> 7) % 1000) as f32 / 500.0 - 1.0).collect();
    f32_tensor("image", vec![rows, 3, 64, 64], &values)
}

/// Posts a safetensors body: status, Retry-After, body.
fn post(url: &str, body: Vec<u8>) -> (u16, Option<String>, Vec<u8>) {
    block(async {
        let r = reqwest::Client::new()
            .post(url)
            .bearer_auth(EDGE_TOKEN)
            .header("content-type", "application/safetensors")
            .body(body)
            .send()
            .await
            .expect("post");
        let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        (r.status().as_u16(), retry, r.bytes().await.expect("body").to_vec())
    })
}

/// The first output's values of an edge answer (panics on anything but 200).
fn answer(url: &str, input: &TensorData) -> Vec<f32> {
    let (code, _, body) = post(url, to_safetensors(std::slice::from_ref(input)).expect("encode"));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    v["outputs"][0]["data"].as_array().expect("data").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// A cluster whose edge serves the CNN as the given joint services (`name`, extra lines,
/// router plugin; hard-example-mining's policy is edge-only), with one batch-scheduled I/O thread
/// (the pools do the work): the cluster, the model's path and the edge's URL.
fn serve(services: &[(&str, &str, &str)]) -> (Cluster, std::path::PathBuf, String) {
    let mut cluster = Cluster::new(1, "");
    let models = cluster.path("models");
    std::fs::create_dir_all(models.join("cnn")).expect("mkdir");
    write_cnn(&models.join("cnn/model.onnx"));
    cluster.start_cloud();
    let mut toml = format!("models = \"{}\"\nio_threads = 1\nio_scheduling = \"batch\"\n", models.display());
    for (name, extra, router) in services {
        let config = if *router == "hard-example-mining" { ", config = { policy = \"edge-only\" }" } else { "" };
        toml += &format!(
            "[services.{name}]\nkind = \"joint\"\nmodel = \"cnn\"\n{extra}\nrouter = {{ plugin = \"{}\"{config} }}\n",
            plugin(router).display()
        );
    }
    let edge = cluster.start_serving_edge(0, &toml);
    let path = models.join("cnn/model.onnx");
    (cluster, path, edge)
}

#[test]
fn concurrent_and_batched_answers_equal_sequential_ones_and_native_onnx_runtime() {
    let (cluster, model, edge) = serve(&[
        ("pool", "instances = 2\nthreads = 1", "hard-example-mining"),
        ("batched", "instances = 2\nbatch_max = 8", "hard-example-mining"),
    ]);
    let native = NativeModel::new(&std::fs::read(&model).expect("cnn")).expect("session");
    let inputs: Vec<TensorData> = (0..24).map(|k| images(k, 1 + u64::from(k % 3))).collect();
    let (pool, batched) = (format!("{edge}/v1/infer/pool"), format!("{edge}/v1/infer/batched"));
    let sequential: Vec<Vec<f32>> = inputs.iter().map(|x| answer(&pool, x)).collect();
    for (x, got) in inputs.iter().zip(&sequential) {
        let want = f32_values(&native.run(std::slice::from_ref(x)).expect("native")[0]).expect("f32");
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(got.len() == want.len() && worst <= 1e-5, "{worst}");
    }
    for url in [&pool, &batched] {
        // 12 clients at once, each its share of the inputs, twice over: every answer is the
        // sequential one, bit for bit (a batch stacks rows; no row's arithmetic changes).
        let barrier = Barrier::new(12);
        let concurrent: Vec<(usize, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..12)
                .map(|c| {
                    let (inputs, barrier) = (&inputs, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        (0..inputs.len())
                            .filter(|k| k % 12 == c)
                            .chain((0..inputs.len()).filter(|k| (k + 5) % 12 == c))
                            .map(|k| (k, answer(url, &inputs[k])))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("client")).collect()
        });
        assert_eq!(concurrent.len(), 48);
        for (k, got) in concurrent {
            assert_eq!(got, sequential[k], "{url}: input {k}");
        }
    }
    let m = format!("{edge}/metrics");
    assert_eq!(metric(&m, "nereid_inferences_total{service=\"batched\"}"), 48.0);
    // Requests were stacked (fewer batches than requests), and without batching never.
    let batches = metric(&m, "nereid_inference_batches_total{service=\"batched\"}");
    assert!(batches < 48.0, "{batches} batches for 48 requests");
    assert_eq!(metric(&m, "nereid_inference_batches_total{service=\"pool\"}"), 24.0 + 48.0);
    assert_eq!(metric(&m, "nereid_inference_refused_total{service=\"pool\"}"), 0.0);
    assert_eq!(metric(&m, "nereid_inference_waiting{service=\"pool\"}"), 0.0);
    // `io_threads = 1`: one async worker however many cores; every thread of the async runtime
    // under SCHED_BATCH (policy 3), the pools' threads under the normal policy (0).
    let log = std::fs::read_to_string(cluster.path(&format!("{}.log", cluster.nodes[0].0))).expect("edge log");
    let started = log.lines().find(|l| l.contains("async runtime")).expect("the runtime's log line");
    assert!(started.contains("io_threads=1 "), "{started}");
    let threads = edge_threads(cluster.edge_pid(0));
    let runtime: Vec<_> = threads.iter().filter(|(comm, _)| comm == "tokio-rt-worker").collect();
    assert!(!runtime.is_empty() && runtime.iter().all(|(_, policy)| *policy == 3), "{threads:?}");
    let pools: Vec<_> = threads.iter().filter(|(comm, _)| comm.starts_with("infer-")).collect();
    assert!(pools.len() >= 4 && pools.iter().all(|(_, policy)| *policy == 0), "{threads:?}");
}

/// Each thread of process `pid`: its name and scheduling policy.
fn edge_threads(pid: u32) -> Vec<(String, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc");
    tasks
        .filter_map(|t| {
            let path = t.expect("task").path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?.trim().to_string();
            // `stat`'s 41st field is the policy; the fields after the name start at the 3rd.
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let policy = stat[stat.rfind(')')? + 1..].split_whitespace().nth(38)?.parse().ok()?;
            Some((comm, policy))
        })
        .collect()
}

#[test]
fn a_trapping_request_fails_alone_and_the_pool_keeps_answering() {
    let (_cluster, _model, edge) = serve(&[
        ("trap", "instances = 2", "test-trap-router"),
        ("trap_batched", "instances = 2\nbatch_max = 8", "test-trap-router"),
    ]);
    let mut poisoned = images(99, 1);
    poisoned.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    for service in ["trap", "trap_batched"] {
        let url = format!("{edge}/v1/infer/{service}");
        let good: Vec<TensorData> = (0..16).map(|k| images(k, 1)).collect();
        let want: Vec<Vec<f32>> = good.iter().map(|x| answer(&url, x)).collect();
        let barrier = Barrier::new(9);
        let (bad, answers) = std::thread::scope(|s| {
            let bad = s.spawn(|| {
                barrier.wait();
                post(&url, to_safetensors(std::slice::from_ref(&poisoned)).expect("encode"))
            });
            let clients: Vec<_> = (0..8)
                .map(|c| {
                    let (good, url, barrier) = (&good, &url, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        (c * 2..c * 2 + 2).map(|k| (k, answer(url, &good[k]))).collect::<Vec<_>>()
                    })
                })
                .collect();
            (bad.join().expect("bad"), clients.into_iter().flat_map(|h| h.join().expect("client")).collect::<Vec<_>>())
        });
        assert_eq!(bad.0, 500, "{service}: {}", String::from_utf8_lossy(&bad.2));
        assert!(String::from_utf8_lossy(&bad.2).contains("trap-router: a non-finite output"), "{service}");
        assert_eq!(answers.len(), 16, "{service}: every other request was answered");
        for (k, got) in answers {
            assert_eq!(got, want[k], "{service}: input {k}");
        }
        // Both instances serve on: more requests than one instance would take in turn.
        for x in &good {
            assert_eq!(answer(&url, x), want[good.iter().position(|g| g.data == x.data).expect("own")]);
        }
    }
}

#[test]
fn requests_past_the_queue_get_503_with_retry_after_and_the_service_recovers() {
    let (_cluster, _model, edge) = serve(&[("narrow", "instances = 1\nqueue = 1", "hard-example-mining")]);
    let url = format!("{edge}/v1/infer/narrow");
    // 48 rows take the one instance tens of milliseconds: 10 requests at once cannot all run
    // or wait.
    let heavy = to_safetensors(&[images(1, 48)]).expect("encode");
    let barrier = Barrier::new(10);
    let results: Vec<(u16, Option<String>, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| {
                let (heavy, url, barrier) = (&heavy, &url, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    post(url, heavy.clone())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    let answered = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(refused.len() + answered, 10, "only 200 and 503: {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(!refused.is_empty() && answered >= 1, "{} refused, {answered} answered", refused.len());
    for (_, retry, body) in &refused {
        assert_eq!(retry.as_deref(), Some("1"));
        let body = String::from_utf8_lossy(body);
        assert!(body.contains("service `narrow` is busy") && body.contains("1 requests wait"), "{body}");
    }
    let m = format!("{edge}/metrics");
    assert_eq!(metric(&m, "nereid_inference_refused_total{service=\"narrow\"}"), refused.len() as f64);
    // Recovered: one request at a time is answered again, and nothing is left waiting.
    for k in 0..3 {
        answer(&url, &images(k, 1));
    }
    assert_eq!(metric(&m, "nereid_inference_waiting{service=\"narrow\"}"), 0.0);
}

/// What an edge with `rest` in its edge.toml says when it refuses to start (it must, within a
/// minute).
fn refused_edge(dir: &std::path::Path, rest: &str) -> String {
    let cfg = dir.join("edge.toml");
    std::fs::write(
        &cfg,
        format!("name = \"e\"\ncloud = \"http://127.0.0.1:9\"\ntoken = \"t\"\nstate = \"edge.db\"\nlisten = \"127.0.0.1:0\"\n{rest}\n[api]\nopen = true\n"),
    )
    .expect("edge.toml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nereid"))
        .args(["edge", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nereid edge");
    let t = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the edge started with {rest}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_service_refuses_settings_it_cannot_honour() {
    let dir = tempfile::tempdir().expect("tmp");
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("cnn")).expect("mkdir");
    write_cnn(&models.join("cnn/model.onnx"));
    let router = format!("router = {{ plugin = \"{}\" }}", plugin("hard-example-mining").display());
    let splitter = format!("splitter = {{ plugin = \"{}\" }}", plugin("split-infer").display());
    for (service, says) in [
        (format!("kind = \"joint\"\ninstances = 0\n{router}"), "instances: must be 1..=64 (got 0)"),
        (format!("kind = \"joint\"\nthreads = 65\n{router}"), "threads: must be 1..=64 (got 65)"),
        (format!("kind = \"joint\"\nqueue = 0\n{router}"), "queue: must be 1..=4096 (got 0)"),
        (format!("kind = \"split\"\nbatch_max = 4\n{splitter}"), "batch_max: only for kind = \"joint\""),
        (format!("kind = \"joint\"\nbatch_max = 300\n{router}"), "batch_max: must be 1..=256 (got 300)"),
        (
            format!("kind = \"split\"\noffload_when_faster = true\n{splitter}"),
            "offload_when_faster: only for kind = \"joint\"",
        ),
    ] {
        let toml = format!("models = \"{}\"\n[services.s]\nmodel = \"cnn\"\n{service}\n", models.display());
        let out = refused_edge(dir.path(), &toml);
        assert!(out.contains("[services.s]") && out.contains(says), "{says}: {out}");
    }
}
