//! The control plane at fleet scale: a thousand simulated edges (`nereid bench fleet`), long
//! polls held and answered, a fleet enrolled in one command, and plain polling kept as the
//! fallback.
use std::time::Duration;

use serde_json::Value;

use crate::cluster::*;
use crate::common::*;
use crate::federated::job_toml;

#[test]
fn a_thousand_edges_poll_and_long_poll_without_an_error_and_each_gets_its_task_and_its_round_end() {
    let out = nereid(&["bench", "fleet", "--edges", "1000", "--secs", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["edges"], 1000);
    let phases = v["phases"].as_array().expect("phases");
    let phase = |name: &str| {
        phases.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no phase `{name}` in {v}")).clone()
    };
    assert_eq!(phases.len(), 6, "{v}");
    for p in phases {
        assert_eq!(p["errors"], 0, "{p}");
        assert!(p["cloud_rss_bytes"].as_u64().expect("rss") > 0, "{p}");
        assert!(p["cloud_cpu_cores"].as_f64().expect("cpu") >= 0.0, "{p}");
    }
    // Every polling edge asked several times in each plain-polling phase.
    for name in ["poll, idle", "poll, round open"] {
        let p = phase(name);
        assert!(p["requests"].as_u64().expect("requests") >= 2000, "{p}");
        assert_eq!(p["latency"]["count"], p["requests"], "{p}");
    }
    // Through the held requests: every edge got its task, then heard that the round ended.
    for name in ["long poll, task to all", "long poll, stop to all"] {
        let p = phase(name);
        assert_eq!(p["edges_answered"], 1000, "{p}");
        assert_eq!(p["latency"]["count"], 1000, "{p}");
    }
    // Held, not answered: idle edges make no requests but those a held one ends with.
    assert!(phase("long poll, idle")["requests"].as_u64().expect("requests") < 1000, "{v}");
    assert!(phase("long poll, round open")["requests"].as_u64().expect("requests") < 1000, "{v}");
}

#[test]
fn a_long_poll_is_held_until_a_task_appears_and_its_wait_is_bounded() {
    let mut c = Cluster::new(2, "");
    c.start_cloud();
    let (node, token) = c.nodes[0].clone();
    let (other, other_token) = c.nodes[1].clone();
    // Bad waits are refused, naming the bound.
    for (query, says) in [("wait=56", "at most 55"), ("wait=x", "wait"), ("hold=3", "hold")] {
        let (code, body) = http("GET", &c.url(&format!("/v1/task?{query}")), Some(&token), Vec::new());
        assert_eq!(code, 400, "{query}");
        assert!(String::from_utf8_lossy(&body).contains(says), "{query}: {}", String::from_utf8_lossy(&body));
    }
    // Nothing to do: a short wait ends with no task.
    let (code, body) = http("GET", &c.url("/v1/task?wait=1"), Some(&token), Vec::new());
    assert_eq!((code, String::from_utf8_lossy(&body).as_ref()), (200, r#"{"task":null}"#));

    // Two nodes hold 55-second polls; a job for both is applied while they wait: both are
    // online because they wait, the round selects them, and each held poll answers with its task.
    let held = |token: String| {
        let url = c.url("/v1/task?wait=55");
        std::thread::spawn(move || http("GET", &url, Some(&token), Vec::new()))
    };
    let (a, b) = (held(token.clone()), held(other_token.clone()));
    std::thread::sleep(Duration::from_millis(300));
    c.apply("job", &job_toml("digits", "fedavg", 1, 2, 60.0));
    for (node, answer) in [(&node, a), (&other, b)] {
        let (code, body) = answer.join().expect("thread");
        assert_eq!(code, 200);
        let task: nereid::protocol::TaskResponse = serde_json::from_slice(&body).expect("task json");
        let task = task.task.unwrap_or_else(|| panic!("{node}'s held poll ended without its task"));
        assert_eq!((task.job.as_str(), task.round), ("digits", 1), "{node}");
    }
    // The round's state is held while the round waits for the node, and answered when it stops
    // waiting (here: the job is stopped).
    // (The operator's question is held while the round is open.)
    let hold = |token: String| {
        let url = c.url("/v1/jobs/digits/rounds/1?wait=55");
        std::thread::spawn(move || http("GET", &url, Some(&token), Vec::new()))
    };
    let (waiting, operator) = (hold(token.clone()), hold(c.admin.clone()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished() && !operator.is_finished(), "held while the round waits");
    block(c.client().stop("digits")).expect("stop");
    for held in [waiting, operator] {
        let (code, body) = held.join().expect("thread");
        let state: nereid::protocol::RoundState = serde_json::from_slice(&body).expect("state json");
        assert_eq!((code, state.open, state.waits_for_caller), (200, false, false));
    }
    let (_, body) = http("GET", &c.url("/v1/task?wait=1"), Some(&token), Vec::new());
    assert_eq!(String::from_utf8_lossy(&body), r#"{"task":null}"#, "a stopped job offers nothing");
    // Only nodes count as online while they wait (not the operator): the next round selects
    // the two nodes that hold polls.
    let (a, b) = (held(token), held(other_token));
    c.apply("again", &job_toml("second", "fedavg", 1, 2, 60.0));
    for answer in [a, b] {
        let (_, body) = answer.join().expect("thread");
        let task: nereid::protocol::TaskResponse = serde_json::from_slice(&body).expect("task json");
        assert_eq!(task.task.expect("a task").job, "second");
    }
    assert_eq!(c.status("second").current.expect("round 1").selected, [node, other]);
}

#[test]
fn a_fleet_is_enrolled_in_one_command_and_edges_that_poll_plainly_still_train() {
    let mut c = Cluster::new(3, "");
    let config = c.path("cloud.toml");
    let config = config.to_str().expect("utf-8");
    // Refused whole: a bad name, a name given twice, a count of nothing.
    for (args, says) in [
        (vec!["token", "create", "ok-1", "../etc", "--config", config], "node name"),
        (vec!["token", "create", "twice", "twice", "--config", config], "named twice"),
        (vec!["token", "create", "--prefix", "e-", "--count", "0", "--config", config], "--count"),
        (vec!["token", "create", "--config", config], "name the nodes"),
    ] {
        let out = c.nereid(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = c.nereid(&["token", "create", "--prefix", "site-", "--count", "12", "extra", "--config", config]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_once(' ').map(|(n, t)| (n.to_string(), t.to_string())).expect("`<node> <token>`"))
        .collect();
    let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<String> =
        std::iter::once("extra".to_string()).chain((1..=12).map(|i| format!("site-{i:02}"))).collect();
    assert_eq!(names, expected);
    c.start_cloud();
    for (node, token) in &lines {
        let (code, body) = http("GET", &c.url("/v1/task"), Some(token), Vec::new());
        assert_eq!(code, 200, "{node}: {}", String::from_utf8_lossy(&body));
    }
    // The JSON form, for scripts; a token created while the cloud runs works at once.
    let out = c.nereid(&["token", "create", "late-1", "late-2", "--json", "--config", config]);
    let made: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(made[1]["node"], "late-2");
    let late = made[1]["token"].as_str().expect("token");
    assert_eq!(http("GET", &c.url("/v1/task"), Some(late), Vec::new()).0, 200);

    // The nodes just enrolled polled: once they count as offline (online_secs = 5), the job
    // selects only the three edges.
    std::thread::sleep(Duration::from_secs(6));
    // Edges that poll plainly (long_poll_secs = 0, as against a cloud that cannot hold
    // requests) run a job to its end with the same result as long-polling ones.
    for i in 0..3 {
        let path = c.path(&format!("edge-{}/edge.toml", i + 1));
        let toml = std::fs::read_to_string(&path).expect("edge.toml") + "long_poll_secs = 0\n";
        std::fs::write(&path, toml).expect("edge.toml");
        c.start_edge(i);
    }
    c.apply("job", &job_toml("digits", "fedavg", 3, 3, 60.0));
    c.wait_done("digits");
    assert_eq!(c.model("digits", 3), crate::federated::reference_run(3), "plain polling = long polling, bit for bit");
}
