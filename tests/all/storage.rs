//! A cloud or an edge whose state directory fills up or turns read-only: it refuses what it
//! cannot write (507 with Retry-After, nothing half-written), keeps serving what needs no
//! write, and goes on when space returns, ending with the model a run without the fault makes.
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::*;
use crate::common::plugin;
use crate::federated::job_toml;

/// A small tmpfs mounted for the test's lifetime.
pub(crate) struct SmallDisk(pub(crate) PathBuf);

impl SmallDisk {
    pub(crate) fn mount(at: PathBuf, mib: u32) -> SmallDisk {
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

    /// Writes a file until the disk is full, to its last byte (SQLite fits a small row in
    /// whatever is left).
    pub(crate) fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        for size in [64 << 10, 4 << 10, 1] {
            let chunk = vec![0u8; size];
            while f.write_all(&chunk).is_ok() {}
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An ext4 file system in a file, mounted through a loop device with `errors=remount-ro`: the
/// kernel turns it read-only when it sees an error, with files open for writing (which a
/// remount refuses), as a failing disk does under a running process.
struct Ext4Disk {
    image: PathBuf,
    at: PathBuf,
}

impl Ext4Disk {
    fn mount(image: PathBuf, at: PathBuf, mib: u64) -> Ext4Disk {
        std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).expect("the image");
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        std::fs::create_dir_all(&at).expect("mkdir");
        let disk = Ext4Disk { image, at };
        disk.attach();
        disk
    }

    fn attach(&self) {
        run_ok(Command::new("mount").args(["-o", "loop,errors=remount-ro"]).arg(&self.image).arg(&self.at));
    }

    /// Makes the kernel see a file-system error (ext4's own test hook): from now on every write
    /// fails with EROFS.
    fn turn_read_only(&self) {
        let out = Command::new("losetup").arg("-j").arg(&self.image).output().expect("losetup");
        let text = String::from_utf8_lossy(&out.stdout);
        let device = text.split(':').next().and_then(|d| d.rsplit('/').next()).expect("the loop device");
        std::fs::write(format!("/sys/fs/ext4/{device}/trigger_fs_error"), "the test's fault")
            .expect("trigger_fs_error");
        assert!(std::fs::write(self.at.join("probe"), b"x").is_err(), "the disk is read-only now");
    }

    /// What an operator does: unmount, check the file system, mount it again read-write.
    fn repair(&self) {
        run_ok(Command::new("umount").arg(&self.at));
        // e2fsck exits 1 when it fixed something.
        let out = Command::new("e2fsck").arg("-fy").arg(&self.image).output().expect("e2fsck");
        assert!(matches!(out.status.code(), Some(0 | 1)), "e2fsck: {}", String::from_utf8_lossy(&out.stdout));
        self.attach();
    }
}

impl Drop for Ext4Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Round 1's close cannot commit, the cloud logs that the job waits, and it still answers what
/// needs no write: the job's status, its health, a node's poll, a model.
fn waits_and_serves_reads(c: &Cluster) {
    wait_for_text("the cloud never tried to close round 1", "the job waits for space", || cloud_logs(c.dir.path()));
    let s = c.status("digits");
    assert_eq!((s.status.as_str(), s.rounds_done), ("running", 0), "{s:?}");
    assert_eq!(http("GET", &c.url("/v1/health"), None, Vec::new()).0, 200);
    assert_eq!(http("GET", &c.url("/v1/task"), Some(&c.nodes[0].1), Vec::new()).0, 200, "a node's poll");
    assert_eq!(http("GET", &c.url("/v1/jobs/digits/models/0"), Some(&c.admin), Vec::new()).0, 200);
}

#[derive(PartialEq)]
enum Fault {
    None,
    CloudFull,
    CloudReadOnly,
    EdgeFull,
    EdgeReadOnly,
}

/// Three edges and a 3-round FedAvg job whose rounds close by their deadline (4 s) with two
/// updates when one is missing: edge-3 is held through round 1. With `CloudFull`, the cloud's
/// state is on a small tmpfs that is filled once round 1 has its two updates: an upload gets 507
/// and nothing of it is written; round 1's deadline passes while the cloud cannot commit its
/// close, and the job waits; then the disk has space again. With `CloudReadOnly`, the cloud's
/// state is on an ext4 disk that the kernel turns read-only at the same point; the operator
/// stops the cloud, repairs the file system and starts the cloud again. With `EdgeFull`,
/// edge-1's state is on a small tmpfs, full from before the job to its end: it sends each update
/// without keeping it.
fn run(fault: Fault) -> nereid::model_io::NamedTensors {
    let mut c = Cluster::new(3, "");
    let disk = (fault == Fault::CloudFull).then(|| SmallDisk::mount(c.path("state"), 16));
    let ext4 = (fault == Fault::CloudReadOnly).then(|| Ext4Disk::mount(c.path("state.img"), c.path("state"), 32));
    let toml = std::fs::read_to_string(c.path("cloud.toml")).expect("cloud.toml");
    // Edge-3 stays "online" while held, so that round 2 selects all three in both runs.
    let mut toml = toml.replace("online_secs = 5", "online_secs = 600");
    if disk.is_some() || ext4.is_some() {
        let db = c.path("state").join("cloud.db");
        toml = toml.replace("state = \"cloud.db\"", &format!("state = \"{}\"", db.display()));
    }
    std::fs::write(c.path("cloud.toml"), toml).expect("cloud.toml");
    let edge_disk = (fault == Fault::EdgeFull).then(|| {
        let disk = SmallDisk::mount(c.path("edge-1/state"), 4);
        put_edge_state_on(&c, &disk.0);
        disk
    });
    let edge_ext4 = (fault == Fault::EdgeReadOnly).then(|| {
        let disk = Ext4Disk::mount(c.path("edge-1.img"), c.path("edge-1/state"), 32);
        put_edge_state_on(&c, &disk.at);
        disk
    });
    c.start_cloud();
    (0..3).for_each(|i| c.start_edge(i));
    if edge_disk.is_some() || edge_ext4.is_some() {
        // Filled, or turned read-only, once the edge has opened its store.
        wait_for_edge_start(&c.path("edge-1.log"));
    }
    let edge_filler = edge_disk.as_ref().map(SmallDisk::fill);
    edge_ext4.as_ref().map(Ext4Disk::turn_read_only);
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
        // An upload that fits in one write: its failure is reported too (tokio's file gives it
        // at the next flush; it was once kept cut short and refused as malformed, 400).
        let (code, body) = http("POST", &url, Some(&c.nodes[2].1), vec![7u8; 4096]);
        assert_eq!(code, 507, "{}", String::from_utf8_lossy(&body));
        let files = std::fs::read_dir(d.0.join("cloud.updates")).expect("updates").count();
        // Still full while round 1's deadline passes: the cloud cannot commit the close, says
        // so, and answers what needs no write.
        waits_and_serves_reads(&c);
        assert_eq!(
            std::fs::read_dir(d.0.join("cloud.updates")).expect("updates").count(),
            files,
            "no file of the refused upload is left"
        );
        std::fs::remove_file(filler).expect("space again");
    }
    if let Some(d) = &ext4 {
        d.turn_read_only();
        // Writes fail with EROFS: an upload gets 507 and Retry-After, and the close of round 1
        // at its deadline cannot commit.
        let url = c.url("/v1/jobs/digits/rounds/1/update");
        let (code, body) = http("POST", &url, Some(&c.nodes[2].1), vec![7u8; 4096]);
        let body = String::from_utf8_lossy(&body);
        assert!(code == 507 && body.contains("state directory is full or read-only"), "{code}: {body}");
        waits_and_serves_reads(&c);
        // The operator's repair: the cloud stopped, the file system checked and mounted again.
        c.kill_cloud();
        d.repair();
        c.start_cloud();
    }
    c.wait_until("digits", "round 1 closed", |s| s.rounds_done >= 1);
    c.signal_edge(2, "-CONT");
    let t = Instant::now();
    while c.status("digits").status == "running" {
        if t.elapsed() > Duration::from_secs(60) {
            let edge = std::fs::read_to_string(c.path("edge-1.log")).unwrap_or_default();
            panic!("not done: {:?}\n--- cloud\n{}\n--- edge-1\n{}", c.status("digits"), cloud_logs(c.dir.path()), edge);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = c.wait_done("digits");
    let participants: Vec<usize> = s.history.iter().map(|h| h.participants.len()).collect();
    assert_eq!(participants, [2, 3, 3], "round 1 closed by its deadline, then every edge took part: {s:?}");
    // The held edge read round 1's task after the round had closed: it asked again and trained
    // for round 2 only, not for a round that takes no more updates.
    let held = std::fs::read_to_string(c.path(&format!("{}.log", c.nodes[2].0))).unwrap_or_default();
    assert!(!held.contains("the cloud takes the update no more"), "trained for a closed round: {held}");
    if edge_filler.is_some() || edge_ext4.is_some() {
        let log = std::fs::read_to_string(c.path("edge-1.log")).unwrap_or_default();
        assert_eq!(log.matches("the update is sent without being kept").count(), 3, "one per round: {log}");
    }
    if let Some(filler) = edge_filler {
        assert!(filler.exists(), "full to the end");
    }
    c.model("digits", 3)
}

#[test]
fn a_full_cloud_state_refuses_writes_keeps_serving_and_goes_on_with_space() {
    let reference = run(Fault::None);
    assert_eq!(run(Fault::CloudFull), reference, "the same model as a run without the fault");
}

/// A cloud whose state directory turns read-only under it (the kernel's reaction to a disk
/// error) refuses writes with 507, answers reads and waits; restarted on the repaired file
/// system, it goes on from what it had committed and ends as a run without the fault.
#[test]
fn a_cloud_state_turning_read_only_refuses_writes_keeps_serving_and_goes_on_once_repaired() {
    let reference = run(Fault::None);
    assert_eq!(run(Fault::CloudReadOnly), reference, "the same model as a run without the fault");
}

/// An edge whose state directory is full sends its updates without keeping them: every round
/// counts it, and the job ends with the model of a run without the fault.
#[test]
fn a_full_edge_state_sends_its_updates_from_memory_and_the_job_ends_the_same() {
    let reference = run(Fault::None);
    assert_eq!(run(Fault::EdgeFull), reference, "the same model as a run without the fault");
}

/// The same with edge-1's state directory turned read-only under it (a disk error).
#[test]
fn an_edge_state_turning_read_only_sends_its_updates_from_memory_and_the_job_ends_the_same() {
    let reference = run(Fault::None);
    assert_eq!(run(Fault::EdgeReadOnly), reference, "the same model as a run without the fault");
}

/// A serving edge whose state directory fills up: samples are refused with 507 and Retry-After
/// (the buffer as it was), requests are answered, a hard example goes to the cloud unkept or,
/// with the cloud down too, is dropped and counted; with space again, both are kept as before.
#[test]
fn a_full_edge_state_refuses_samples_answers_requests_and_recovers() {
    use crate::inference::{infer, write_model};
    use crate::replay::{batch, post, stats};
    let mut c = Cluster::new(1, "models = \"models\"\n[services.digits]\nmodel = \"big\"\n");
    let models = c.path("models");
    write_model(&models, "small", 1);
    write_model(&models, "big", 2);
    c.start_cloud();
    let disk = SmallDisk::mount(c.path("edge-1/state"), 4);
    let edge = c.start_serving_edge_on(
        0,
        &disk.0.join("edge.db"),
        &format!(
            "models = {:?}\noutbox_retry_ms = 100\n\
             [services.digits]\nkind = \"joint\"\nmodel = \"small\"\ncloud_timeout_ms = 1000\n\
             router = {{ plugin = {:?}, config = {{ policy = \"cloud-only\" }} }}\n\
             [replay]\nplugin = {:?}\nconfig = {{ policy = \"reservoir\", capacity = 100, seed = 1 }}\n",
            models.display().to_string(),
            plugin("hard-example-mining").display().to_string(),
            plugin("replay-buffer").display().to_string()
        ),
    );
    let url = format!("{edge}/v1/infer/digits");
    assert_eq!(post(&edge, batch(0, 10, 16, 10))["offered"], 10);
    let before = stats(&edge);

    let filler = disk.fill();
    let (code, body, retry) = block(async {
        let r = reqwest::Client::new()
            .post(format!("{edge}/v1/samples"))
            .bearer_auth(EDGE_TOKEN)
            .body(batch(10, 10, 16, 10))
            .send()
            .await
            .expect("samples");
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_string());
        (r.status().as_u16(), r.text().await.unwrap_or_default(), retry)
    });
    assert_eq!(code, 507, "{body}");
    assert!(body.contains("state directory is full or read-only"), "{body}");
    assert_eq!(retry.as_deref(), Some("5"));
    assert_eq!(stats(&edge), before, "nothing of the refused batch is kept");
    let a = infer(&url, 0);
    assert_eq!((a["computed"].clone(), a["results"][0]["queued"].clone()), ("cloud".into(), false.into()), "{a}");
    c.kill_cloud();
    let a = infer(&url, 1);
    assert_eq!(a["computed"], "edge", "{a}");
    assert_eq!((a["results"][0]["queued"].clone(), a["results"][0]["dropped"].clone()), (false.into(), true.into()));
    let m = format!("{edge}/metrics");
    assert_eq!(metric(&m, "nereid_hard_examples_dropped_total{service=\"digits\"}"), 1.0);

    // Space again: the refused batch is taken in, and a hard example waits in the outbox for
    // the cloud, which then holds every example that reached it once.
    std::fs::remove_file(filler).expect("space again");
    let report = post(&edge, batch(10, 10, 16, 10));
    assert_eq!(report["offered"], 20, "{report}");
    let a = infer(&url, 2);
    assert_eq!(a["results"][0]["queued"], true, "{a}");
    c.start_cloud();
    let t = Instant::now();
    while metric(&m, "nereid_outbox_pending") > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the outbox did not drain");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = http("GET", &c.url("/v1/infer/digits/hard-examples"), Some(&c.admin), Vec::new());
    assert_eq!(code, 200);
    let kept: Vec<(String, i64)> = serde_json::from_slice(&body).expect("json");
    let ids: Vec<i64> = kept.iter().map(|(_, id)| *id).collect();
    assert_eq!(kept.len(), 2, "the unkept one sent at once and the queued one: {kept:?}");
    assert!(ids.iter().any(|id| *id < 0) && ids.iter().any(|id| *id > 0), "{kept:?}");
    assert_eq!(metric(&m, "nereid_hard_examples_dropped_total{service=\"digits\"}"), 1.0);
}

/// Points edge-1's edge.toml at a state database in `dir`.
fn put_edge_state_on(c: &Cluster, dir: &std::path::Path) {
    let path = c.path("edge-1/edge.toml");
    let toml = std::fs::read_to_string(&path).expect("edge.toml");
    let db = dir.join("edge.db");
    std::fs::write(&path, toml.replace("state = \"edge.db\"", &format!("state = {:?}", db.display().to_string())))
        .expect("edge.toml");
}

/// Starts `nereid <kind>` with `config` and expects it to exit non-zero within 30 s, saying
/// that the file system at `disk` is read-only: returns its log.
fn refused_to_start(kind: &str, config: &std::path::Path, c: &Cluster, disk: &SmallDisk) -> String {
    let log = c.path(&format!("{kind}.log"));
    let mut child = spawn(&[kind], config, &log, &c.path("cache"));
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the {kind} started on a read-only state directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{text}");
    assert!(text.contains(&disk.0.display().to_string()) && text.contains("Read-only file system"), "{text}");
    text
}

/// An edge whose state directory is read-only does not start, naming the path.
#[test]
fn an_edge_on_a_read_only_state_directory_refuses_to_start_naming_it() {
    let c = Cluster::new(1, "");
    let disk = SmallDisk::mount(c.path("edge-1/state"), 1);
    disk.read_only();
    put_edge_state_on(&c, &disk.0);
    refused_to_start("edge", &c.path("edge-1/edge.toml"), &c, &disk);
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
    let text = refused_to_start("cloud", &c.path("cloud.toml"), &c, &disk);
    assert_eq!(text.matches("Read-only file system").count(), 1, "said once: {text}");
}
