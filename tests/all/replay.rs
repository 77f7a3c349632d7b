//! The edge's replay buffer: samples posted to `POST /v1/samples` live in the edge's SQLite
//! store, the replay-buffer plugin decides on ids and labels; the buffer survives a restart and
//! holds 1.5 GB of samples without the edge's memory growing with them.
use nereid::inference::wire;
use nereid::runtime::bindings::types::Dtype;
use nereid::runtime::TensorData;

use crate::cluster::*;
use crate::common::*;

fn replay_section(policy: &str, capacity: u64) -> String {
    format!(
        "[replay]\nplugin = {:?}\nconfig = {{ policy = {policy:?}, capacity = {capacity}, seed = 3 }}\n",
        plugin("replay-buffer").display().to_string()
    )
}

/// A batch of `n` samples of `size` bytes (their first bytes number them) with labels cycling
/// through `classes`.
pub fn batch(first: u64, n: u64, size: usize, classes: i64) -> Vec<u8> {
    let mut x = vec![0u8; n as usize * size];
    for (i, sample) in x.chunks_mut(size).enumerate() {
        sample[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
        sample[size - 1] = (i % 251) as u8;
    }
    let y: Vec<u8> = (0..n).flat_map(|i| ((first + i) as i64 % classes).to_le_bytes()).collect();
    let tensors = [
        TensorData { name: "x".into(), dtype: Dtype::U8, shape: vec![n, size as u64], data: x },
        TensorData { name: "y".into(), dtype: Dtype::I64, shape: vec![n], data: y },
    ];
    wire::to_safetensors(&tensors).expect("safetensors")
}

pub fn post(edge: &str, body: Vec<u8>) -> serde_json::Value {
    let (code, out) = http("POST", &format!("{edge}/v1/samples"), Some(EDGE_TOKEN), body);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    serde_json::from_slice(&out).expect("json")
}

pub fn stats(edge: &str) -> serde_json::Value {
    let (code, out) = http("GET", &format!("{edge}/v1/samples"), Some(EDGE_TOKEN), Vec::new());
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    serde_json::from_slice(&out).expect("json")
}

#[test]
fn the_buffer_survives_a_restart_and_decides_as_without_one() {
    let mut c = Cluster::new(2, "");
    // Edge 1 is restarted after 300 of 400 samples; edge 2 takes all 400 in one run.
    let a = c.start_serving_edge(0, &replay_section("reservoir", 60));
    let b = c.start_serving_edge(1, &replay_section("reservoir", 60));
    for first in [0, 100, 200] {
        post(&a, batch(first, 100, 32, 3));
    }
    let before = stats(&a);
    assert_eq!((before["held"].as_u64(), before["offered"].as_u64()), (Some(60), Some(300)), "{before}");
    assert_eq!(before["layout"], "u8[32]");
    c.kill_edge(0);
    c.start_edge(0);
    c.wait_for_edge(0, &a);
    let after = stats(&a);
    assert_eq!(after, before, "the store gives back what the buffer held");
    let report = post(&a, batch(300, 100, 32, 3));
    assert_eq!(report["offered"].as_u64(), Some(400), "{report}");
    for first in [0, 100, 200, 300] {
        post(&b, batch(first, 100, 32, 3));
    }
    assert_eq!(stats(&a)["held_digest"], stats(&b)["held_digest"], "the restarted buffer kept the same samples");
    // A batch of another layout is refused, naming both, and changes nothing.
    let (code, out) = http("POST", &format!("{a}/v1/samples"), Some(EDGE_TOKEN), batch(400, 10, 16, 3));
    let text = String::from_utf8_lossy(&out);
    assert!(code == 400 && text.contains("u8[32]") && text.contains("u8[16]"), "{code}: {text}");
    assert_eq!(stats(&a)["offered"].as_u64(), Some(400));
}

/// (status, whether the edge answered a retry, body) of a sample batch sent under `key`.
fn keyed(edge: &str, key: &[u8], body: Vec<u8>) -> (u16, bool, String) {
    block(async {
        let key = reqwest::header::HeaderValue::from_bytes(key).expect("a header value");
        let response = reqwest::Client::new()
            .post(format!("{edge}/v1/samples"))
            .bearer_auth(EDGE_TOKEN)
            .header("Idempotency-Key", key)
            .body(body)
            .send()
            .await
            .expect("the edge answers");
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        (response.status().as_u16(), replayed, response.text().await.expect("body"))
    })
}

#[test]
fn a_batch_sent_again_under_its_idempotency_key_is_taken_in_once() {
    let mut c = Cluster::new(1, "");
    let a = c.start_serving_edge(0, &replay_section("reservoir", 60));
    let first = keyed(&a, b"batch-0001", batch(0, 100, 32, 3));
    assert_eq!((first.0, first.1), (200, false), "{first:?}");
    assert_eq!(keyed(&a, b"batch-0001", batch(0, 100, 32, 3)), (200, true, first.2.clone()), "answered as before");
    assert_eq!(stats(&a)["offered"], 100, "and nothing offered again");
    // The key is kept with the batch: a retry after a kill -9 is recognized.
    c.kill_edge(0);
    c.start_edge(0);
    c.wait_for_edge(0, &a);
    assert_eq!(keyed(&a, b"batch-0001", batch(0, 100, 32, 3)), (200, true, first.2.clone()));
    // Another key is another batch, even with the same samples; a key sent with another body
    // is refused 422 naming it, and takes nothing in.
    let second = keyed(&a, b"batch-0002", batch(0, 100, 32, 3));
    assert_eq!((second.0, second.1), (200, false), "{second:?}");
    let reused = keyed(&a, b"batch-0002", batch(100, 100, 32, 3));
    assert!(reused.0 == 422 && reused.2.contains("batch-0002"), "{reused:?}");
    for bad in [&b""[..], b"two words", &[b'k'; 256], "cl\u{e9}".as_bytes()] {
        let (code, _, body) = keyed(&a, bad, batch(200, 10, 32, 3));
        assert!(code == 400 && body.contains("Idempotency-Key"), "{bad:?}: {code} {body}");
    }
    assert_eq!(stats(&a)["offered"], 200);
    // Without a key the same body twice is two batches, as before.
    post(&a, batch(0, 100, 32, 3));
    assert_eq!(post(&a, batch(0, 100, 32, 3))["offered"], 400);
}

fn rss_bytes(pid: u32) -> u64 {
    nereid_harness::rss_kib(pid, "VmRSS:").expect("VmRSS") * 1024
}

#[test]
fn ten_thousand_224x224x3_samples_grow_the_edge_by_less_than_64_mb() {
    let mut c = Cluster::new(1, "");
    let edge = c.start_serving_edge(0, &replay_section("class-balanced", 10_000));
    let size = 224 * 224 * 3;
    let per_batch = 50;
    // Warm-up: the first batches set up the HTTP server's and SQLite's buffers.
    for i in 0..2 {
        post(&edge, batch(i * per_batch, per_batch, size, 10));
    }
    let base = rss_bytes(c.edge_pid(0));
    let mut peak = base;
    for i in 2..200 {
        post(&edge, batch(i * per_batch, per_batch, size, 10));
        peak = peak.max(rss_bytes(c.edge_pid(0)));
    }
    let s = stats(&edge);
    assert_eq!((s["held"].as_u64(), s["offered"].as_u64()), (Some(10_000), Some(10_000)), "{s}");
    let db = std::fs::metadata(c.path("edge-1/edge.db")).expect("edge.db").len();
    let growth = peak.saturating_sub(base);
    println!(
        "RSS {} MB after warm-up, peak {} MB (+{} MB); edge.db {} MB",
        base >> 20,
        peak >> 20,
        growth >> 20,
        db >> 20
    );
    assert!(db >= 10_000 * size as u64, "the samples are in the store: {db} bytes");
    assert!(growth < 64 << 20, "the edge grew by {} MB", growth >> 20);
}

/// `nereid bench forgetting`: after classes 0-4 then 5-9, fine-tuning on the new classes alone
/// forgets the old ones; with a draw from the replay buffer (class-balanced, 200 places) it keeps
/// most of them.
#[test]
fn replay_keeps_the_old_classes_that_fine_tuning_alone_forgets() {
    let out = nereid(&["bench", "forgetting", "--runs", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let f = |run: &str, k: &str| v[run][k].as_f64().expect("accuracy");
    assert!(f("first_phase", "old") > 0.95, "{v}");
    assert!(f("without_replay", "old") < 0.2, "forgetting: {v}");
    assert!(f("with_replay", "old") > f("without_replay", "old") + 0.6, "{v}");
    assert!(f("with_replay", "new") > 0.9 && f("with_replay", "all") > 0.85, "{v}");
    assert_eq!(v["replayed_per_class"], serde_json::json!([40, 40, 40, 40, 40, 0, 0, 0, 0, 0]), "class-balanced");
}
