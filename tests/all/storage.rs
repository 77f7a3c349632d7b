//! A cloud whose state directory fills up or turns read-only: it refuses what it cannot write
//! (507 with Retry-After, nothing half-written), keeps serving reads, and goes on when space
//! returns, ending with the model a run without the fault makes.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::*;
use crate::federated::job_toml;

/// A small tmpfs mounted for the test's lifetime.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(&at).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "nereid-test"])
            .arg(&at)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mounting a tmpfs (root): {}", String::from_utf8_lossy(&out.stderr));
        SmallDisk(at)
    }

    /// Read-only from now on (no file on it may be open for writing).
    fn read_only(&self) {
        let out = Command::new("mount").args(["-o", "remount,ro"]).arg(&self.0).output().expect("mount");
        assert!(out.status.success(), "remount ro: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// What the cloud logged (the harness names its log after the start).
fn cloud_log(c: &Cluster) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(c.dir.path()).expect("cluster dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("cloud-") && name.ends_with(".log") {
            text += &std::fs::read_to_string(entry.path()).unwrap_or_default();
        }
    }
    text
}

/// Three edges and a 3-round FedAvg job whose rounds close by their deadline (4 s) with two
/// updates when one is missing: edge-3 is held through round 1. With `fault`, the cloud's state
/// is on a small tmpfs that is filled once round 1 has its two updates: an upload gets 507 and
/// nothing of it is written; round 1's deadline passes while the cloud cannot commit its close,
/// and the job waits; then the disk has space again.
fn run(fault: bool) -> nereid::model_io::NamedTensors {
    let mut c = Cluster::new(3, "");
    let disk = fault.then(|| SmallDisk::mount(c.path("state"), 16));
    let toml = std::fs::read_to_string(c.path("cloud.toml")).expect("cloud.toml");
    // Edge-3 stays "online" while held, so that round 2 selects all three in both runs.
    let mut toml = toml.replace("online_secs = 5", "online_secs = 600");
    if let Some(d) = &disk {
        toml = toml.replace("state = \"cloud.db\"", &format!("state = \"{}\"", d.0.join("cloud.db").display()));
    }
    std::fs::write(c.path("cloud.toml"), toml).expect("cloud.toml");
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    c.hold_edge_once_online(2);
    c.apply("job", &job_toml("digits", "fedavg", 3, 2, 4.0));
    c.wait_until("digits", "round 1's two updates", |s| s.current.as_ref().is_some_and(|r| r.received.len() == 2));
    if let Some(d) = &disk {
        // Full: an upload is refused with 507 and Retry-After, and nothing of it stays.
        let filler = d.fill();
        let url = c.url("/v1/jobs/digits/rounds/1/update");
        let (code, body, retry) = block(async {
            let r = reqwest::Client::new()
                .post(&url)
                .bearer_auth(&c.nodes[2].1)
                .body(vec![7u8; 256 << 10])
                .send()
                .await
                .expect("upload");
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_string());
            (r.status().as_u16(), r.text().await.unwrap_or_default(), retry)
        });
        assert_eq!(code, 507, "{body}");
        assert!(body.contains("state directory is full or read-only"), "{body}");
        assert_eq!(retry.as_deref(), Some("5"));
        let files = std::fs::read_dir(d.0.join("cloud.updates")).expect("updates").count();
        // Still full while round 1's deadline passes: the cloud cannot commit the close, and says so.
        let t = Instant::now();
        while !cloud_log(&c).contains("the job waits for space") {
            assert!(t.elapsed() < Duration::from_secs(30), "the cloud never tried to close round 1: {}", cloud_log(&c));
            std::thread::sleep(Duration::from_millis(100));
        }
        // It still answers what needs no write.
        let s = c.status("digits");
        assert_eq!((s.status.as_str(), s.rounds_done), ("running", 0), "{s:?}");
        assert_eq!(http("GET", &c.url("/v1/health"), None, Vec::new()).0, 200);
        assert_eq!(http("GET", &c.url("/v1/task"), Some(&c.nodes[0].1), Vec::new()).0, 200, "a node's poll");
        assert_eq!(
            std::fs::read_dir(d.0.join("cloud.updates")).expect("updates").count(),
            files,
            "no file of the refused upload is left"
        );
        std::fs::remove_file(filler).expect("space again");
    }
    c.wait_until("digits", "round 1 closed", |s| s.rounds_done >= 1);
    c.signal_edge(2, "-CONT");
    let t = Instant::now();
    while c.status("digits").status == "running" {
        if t.elapsed() > Duration::from_secs(60) {
            let edge = std::fs::read_to_string(c.path("edge-1.log")).unwrap_or_default();
            panic!("not done: {:?}\n--- cloud\n{}\n--- edge-1\n{}", c.status("digits"), cloud_log(&c), edge);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = c.wait_done("digits");
    let participants: Vec<usize> = s.history.iter().map(|h| h.participants.len()).collect();
    assert_eq!(participants, [2, 3, 3], "round 1 closed by its deadline, then every edge took part: {s:?}");
    c.model("digits", 3)
}

#[test]
fn a_full_cloud_state_refuses_writes_keeps_serving_and_goes_on_with_space() {
    let reference = run(false);
    assert_eq!(run(true), reference, "the same model as a run without the fault");
}

/// A cloud whose state directory is read-only does not start: it says which path of the state
/// it could not write, and exits non-zero.
#[test]
fn a_cloud_on_a_read_only_state_directory_refuses_to_start_naming_it() {
    let c = Cluster::new(1, "");
    let disk = SmallDisk::mount(c.path("state"), 1);
    disk.read_only();
    let db = disk.0.join("cloud.db");
    let toml = std::fs::read_to_string(c.path("cloud.toml")).expect("cloud.toml");
    let toml = toml.replace("state = \"cloud.db\"", &format!("state = \"{}\"", db.display()));
    std::fs::write(c.path("cloud.toml"), toml).expect("cloud.toml");
    let log = c.path("cloud.log");
    let mut cloud = spawn(&["cloud"], &c.path("cloud.toml"), &log, &c.path("cache"));
    let t = Instant::now();
    let status = loop {
        if let Some(status) = cloud.try_wait().expect("wait") {
            break status;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = cloud.kill();
            panic!("the cloud started on a read-only state directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{text}");
    let dir = disk.0.display().to_string();
    assert!(text.contains(&dir) && text.contains("Read-only file system"), "{text}");
    assert_eq!(text.matches("Read-only file system").count(), 1, "said once: {text}");
}
