//! Operable processes: readiness distinct from liveness, a graceful stop on SIGTERM (exit 0,
//! bounded), JSON logs.
use std::process::Child;
use std::time::{Duration, Instant};

use crate::cluster::*;

/// Sends SIGTERM to `child` and waits for it to exit (20 s at most); its exit status code.
fn terminate(child: &mut Child) -> Option<i32> {
    signal(child, "-TERM");
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still running 20 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_the_cloud_and_the_edges_with_exit_0_and_readiness_is_its_own_probe() {
    let mut c = Cluster::new(2, "");
    // The cloud logs JSON (one object per line).
    let log = c.path("cloud-json.log");
    c.cloud = Some(spawn(&["cloud", "--log-format", "json"], &c.path("cloud.toml"), &log, &c.path("cache")));
    let t = Instant::now();
    while !c.cloud_healthy() {
        assert!(t.elapsed() < Duration::from_secs(30), "the cloud did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http("GET", &c.url("/v1/ready"), None, Vec::new()).0, 200, "ready, without a token");
    c.start_edge(0);
    let edge = c.start_serving_edge(1, "");
    assert_eq!(http("GET", &format!("{edge}/v1/ready"), None, Vec::new()).0, 200);

    // The worker-only edge, the serving edge, then the cloud: each exits 0.
    wait_for_edge_start(&c.path("edge-1.log"));
    for i in [0, 1] {
        let mut child = c.edges[i].take().expect("edge running");
        assert_eq!(terminate(&mut child), Some(0), "edge-{}", i + 1);
    }
    assert_eq!(http("GET", &format!("{edge}/v1/health"), None, Vec::new()).0, 0, "the edge's API is gone");
    let mut cloud = c.cloud.take().expect("cloud running");
    assert_eq!(terminate(&mut cloud), Some(0), "the cloud");

    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["fields"]["message"].as_str()).collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()), "{text}");
    assert!(messages.iter().any(|m| m.contains("SIGTERM")), "{messages:?}");
    assert!(messages.contains(&"cloud stopped"), "{messages:?}");
}

#[test]
fn sigterm_in_the_middle_of_rounds_loses_nothing() {
    let rounds = 3;
    let reference = crate::federated::reference_run(rounds);
    let mut c = Cluster::new(3, "");
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    // edge-3 is held (SIGSTOP) once online, so round 1 waits for its update.
    c.hold_edge_once_online(2);
    c.apply("job", &crate::federated::job_toml("digits", "fedavg", rounds, 3, 60.0));
    c.wait_until("digits", "two updates of round 1", |s| s.current.as_ref().is_some_and(|r| r.received.len() == 2));
    // The cloud is stopped in the middle of round 1 and started again; then edge-3 goes on.
    let mut cloud = c.cloud.take().expect("cloud running");
    assert_eq!(terminate(&mut cloud), Some(0), "the cloud");
    c.start_cloud();
    let open = c.status("digits").current.expect("round 1 is still open");
    assert_eq!((open.round, open.received.len()), (1, 2), "the updates received before the stop are kept");
    // Rounds take milliseconds once every update is in, so edge-1 is held to keep round 2 open
    // while edge-2, having sent its update, is stopped and started again.
    // Held once the restarted cloud has seen it, so that it counts as online and round 2 selects it.
    c.wait_until("digits", "edge-1 seen", |s| s.nodes.iter().any(|n| n.name == "edge-1" && n.last_seen_ms.is_some()));
    c.signal_edge(0, "-STOP");
    c.signal_edge(2, "-CONT");
    c.wait_until("digits", "two updates of round 2", |s| {
        s.current.as_ref().is_some_and(|r| r.round == 2 && r.received.len() == 2)
    });
    let mut edge = c.edges[1].take().expect("edge-2 running");
    assert_eq!(terminate(&mut edge), Some(0), "edge-2");
    c.start_edge(1);
    c.signal_edge(0, "-CONT");
    let s = c.wait_done("digits");
    assert!(s.history.iter().all(|h| h.participants.len() == 3), "no update lost: {:?}", s.history);
    assert_eq!(c.model("digits", rounds), reference, "the same model as a run without stops");
}
